"""The ``cryovae`` command: one subcommand per workflow stage, each a thin call into the package.

Every subcommand takes ``--config``: a YAML/JSON config file or an inline JSON object
(the workflow passes the part of the config a rule depends on, so that changing a
parameter reruns exactly the rules it affects).  Bad input exits with status 2 and one
message; any other failure exits non-zero with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import resource
import sys
import textwrap
import time
from pathlib import Path

from cryovae import __version__
from cryovae.errors import InputError

_STARTED = time.perf_counter()  # before the verb's imports: they are part of what a job costs
RESOURCE_LINE = re.compile(
    r"(?P<verb>[\w-]+) finished: wall (?P<wall_s>[\d.]+) s, CPU (?P<cpu_s>[\d.]+) s, "
    r"peak memory (?P<peak_mib>\d+) MiB"
)

# verb -> (module:function, help, example, [(flags, kwargs), ...])
# The function is called with the parsed config first, then the named arguments.
_P = Path
# the --maps of the verbs that read every seen class's reference map
SEEN_MAPS = (("--maps",), {"type": _P, "nargs": "+", "required": True,
                           "help": "reference maps of the seen classes (MRC, named {class}.mrc)"})
VERBS: dict[str, tuple[str, str, str, list[tuple[tuple[str, ...], dict]]]] = {
    "structure": (
        "cryovae.structures:prepare_structure",
        "Read (or download, or generate) one class's structure, clean it, write mmCIF.",
        "cryovae structure --config config.yaml --class-name 1bxn --output results/structures/1bxn.cif",
        [
            (("--class-name",), {"required": True,
                                 "help": "class whose structure to prepare (a key of the config's structures)"}),
            (("--output",), {"type": _P, "required": True, "help": "cleaned structure to write (mmCIF)"}),
        ],
    ),
    "descriptor": (
        "cryovae.affinity:compute_descriptor",
        "Averaged SOAP descriptor of one cleaned structure (NumPy .npy).",
        "cryovae descriptor --config config.yaml --structure results/structures/1bxn.cif "
        "--output results/affinity/soap/1bxn.npy",
        [
            (("--structure",), {"type": _P, "required": True,
                                "help": "cleaned structure (mmCIF, from cryovae structure)"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "averaged SOAP descriptor to write (.npy, one vector)"}),
        ],
    ),
    "affinity": (
        "cryovae.affinity:build_affinity",
        "Combine per-class descriptors into the affinity matrix (CSV) and its heatmap (PNG).",
        "cryovae affinity --config config.yaml --descriptors results/affinity/soap/*.npy "
        "--csv results/affinity/affinity.csv --plot results/affinity/affinity.png",
        [
            (("--descriptors",), {"type": _P, "nargs": "+", "required": True,
                                  "help": "one descriptor (.npy) per class, named {class}.npy, all classes of the config"}),
            (("--csv",), {"type": _P, "required": True,
                          "help": "affinity matrix to write (CSV: header of class names, then N×N in config order)"}),
            (("--plot",), {"type": _P, "required": True,
                           "help": "heatmap to write (PNG, classes ordered by similarity)"}),
        ],
    ),
    "map": (
        "cryovae.maps:make_map",
        "Reference density map of one class (MRC) at the configured pixel size and box.",
        "cryovae map --config config.yaml --class-name 1bxn --structure results/structures/1bxn.cif "
        "--output results/maps/1bxn.mrc",
        [
            (("--class-name",), {"required": True,
                                 "help": "class whose map to make (a key of the config's structures)"}),
            (("--structure",), {"type": _P, "default": None,
                                "help": "cleaned structure to simulate the map from; omit when maps.files gives the class a map"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "reference map to write (MRC at the configured pixel size and box)"}),
        ],
    ),
    "simulate": (
        "cryovae.simulate:simulate_shard",
        "Simulate one shard of subtomograms with known poses, plus its ground-truth STAR.",
        "cryovae simulate --config config.yaml --split train --shard 0 --maps results/maps/*.mrc "
        "--output results/subtomograms/train/shard_000.npy --star results/subtomograms/train/shard_000.star",
        [
            (("--split",), {"required": True, "choices": ["train", "val", "test"],
                            "help": "which split the shard belongs to (test also holds the unseen classes)"}),
            (("--shard",), {"type": int, "required": True, "help": "shard index within the split (0-based)"}),
            (("--maps",), {"type": _P, "nargs": "+", "required": True,
                           "help": "reference maps of the split's classes (MRC, named {class}.mrc)"}),
            (("--output",), {"type": _P, "required": True, "help": "subtomograms to write (.npy, shape (n, D, H, W))"}),
            (("--star",), {"type": _P, "required": True,
                           "help": "ground-truth STAR of the shard to write (class, pose, CTF)"}),
        ],
    ),
    "simulate-tomogram": (
        "cryovae.tomosim:simulate_tomogram",
        "Simulate one tomogram as real ones are made (crowded slab, tilt series, CTF, dose, back-projection).",
        "cryovae simulate-tomogram --config config.yaml --index 0 --maps results/maps/*.mrc "
        "--output-dir results/tomograms/sim_00",
        [
            (("--index",), {"type": int, "required": True, "help": "tomogram index (sim_{index:02d}, 0-based)"}),
            (("--maps",), {"type": _P, "nargs": "*", "default": [],
                           "help": "the workflow's maps of the classes tomogram_simulation.maps does not give "
                                   "(MRC, named {class}.mrc)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "folder for NAME.mrc, NAME.tlt, tomograms.star, NAME.star, picks.star, truth.star"}),
        ],
    ),
    "gather": (
        "cryovae.shards:gather_star",
        "Concatenate per-shard STAR files into a split's particles.star.",
        "cryovae gather --config config.yaml --inputs results/subtomograms/train/shard_*.star "
        "--output results/subtomograms/train/particles.star",
        [
            (("--inputs",), {"type": _P, "nargs": "+", "required": True,
                             "help": "per-shard STAR files of one split, in shard order"}),
            (("--output",), {"type": _P, "required": True, "help": "the split's particles.star to write"}),
        ],
    ),
    "extract": (
        "cryovae.extract:extract_tomogram",
        "Cut subtomograms out of one tomogram at its picked coordinates (memory-mapped).",
        "cryovae extract --config config.yaml --tomogram TS_01 --output-dir results/subtomograms/TS_01",
        [
            (("--tomogram",), {"required": True,
                               "help": "tomogram name (a key of extraction.tomograms in the config)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "folder to write the shards and particles.star into"}),
        ],
    ),
    "provenance": (
        "cryovae.config:write_provenance",
        "Record the package version and the whole validated config of a run (JSON).",
        "cryovae provenance --config config.yaml --output results/provenance.json",
        [(("--output",), {"type": _P, "required": True, "help": "provenance record to write (JSON)"})],
    ),
    "export": (
        "cryovae.export:export_relion3",
        "Write a split as MRC files plus a RELION 3.1 particles STAR (3D subtomograms).",
        "cryovae export --config config.yaml --split-dir results/subtomograms/test "
        "--output-dir results/export/test",
        [
            (("--split-dir",), {"type": _P, "required": True, "help": "split folder (shards + particles.star)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "folder to write subtomograms/*.mrc and particles.star into"}),
        ],
    ),
    "train": (
        "cryovae.train:train",
        "Train the affinity-VAE; resumes from the last checkpoint in the output folder.",
        "cryovae train --config config.yaml --train-dir results/subtomograms/train "
        "--val-dir results/subtomograms/val --affinity results/affinity/affinity.csv --maps results/maps/*.mrc "
        "--output-dir results/model",
        [
            (("--train-dir",), {"type": _P, "required": True,
                                "help": "training split folder (shards + particles.star)"}),
            (("--val-dir",), {"type": _P, "required": True,
                              "help": "validation split folder (shards + particles.star)"}),
            (("--affinity",), {"type": _P, "required": True, "help": "affinity matrix CSV (from cryovae affinity)"}),
            (("--maps",), {"type": _P, "nargs": "*", "default": None,
                           "help": "reference maps of the seen classes (symmetric classes need theirs)"}),
            (("--unlabelled-dirs",), {"type": _P, "nargs": "*", "default": None,
                                      "help": "split folders trained on without their labels "
                                              "(training.semi_supervised.unlabelled)"}),
            (("--train-match",), {"type": _P, "default": None,
                                  "help": "match output of the training split (training.shape_frame: matched)"}),
            (("--val-match",), {"type": _P, "default": None,
                                "help": "match output of the validation split (training.shape_frame: matched)"}),
            (("--unlabelled-matches",), {"type": _P, "nargs": "*", "default": None,
                                         "help": "match outputs of the unlabelled splits, in their order "
                                                 "(training.shape_frame: matched)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "folder for model.pt, history.csv, loss_curves.png and the checkpoint"}),
        ],
    ),
    "embed": (
        "cryovae.embed:embed",
        "Encode a split with the final model: latent means, poses (model frame), shifts.",
        "cryovae embed --config config.yaml --model results/model/model.pt "
        "--split-dir results/subtomograms/test --output results/embeddings/latent/test.npz",
        [
            (("--model",), {"type": _P, "required": True, "help": "trained model (model.pt from cryovae train)"}),
            (("--split-dir",), {"type": _P, "required": True,
                                "help": "split folder to encode (shards + particles.star)"}),
            (("--match",), {"type": _P, "default": None,
                            "help": "match output of the same split (a model of training.shape_frame: matched)"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "latents to write (.npz: ids, latent means, poses, shifts)"}),
        ],
    ),
    "classifier": (
        "cryovae.classify:fit_classifier",
        "Fit the class model on training latents; calibrate the unknown threshold on validation.",
        "cryovae classifier --config config.yaml --train results/embeddings/latent/train.npz "
        "--val results/embeddings/latent/val.npz --output results/model/classifier.npz",
        [
            (("--train",), {"type": _P, "required": True,
                            "help": "latents of the training split (.npz from cryovae embed)"}),
            (("--val",), {"type": _P, "required": True,
                          "help": "latents of the validation split (.npz from cryovae embed)"}),
            (("--train-match",), {"type": _P, "default": None, "help": "match output of the training split"}),
            (("--val-match",), {"type": _P, "default": None, "help": "match output of the validation split"}),
            (("--output",), {"type": _P, "required": True, "help": "class model to write (.npz)"}),
        ],
    ),
    "train-pose": (
        "cryovae.pose_training:train_pose_network",
        "Train the pose network (matching.starts: network) on particles simulated on the fly from the seen "
        "classes' maps.",
        "cryovae train-pose --config config.yaml --maps results/maps/*.mrc --output results/model/pose_network.pt "
        "--history results/model/pose_network_history.csv",
        [
            SEEN_MAPS,
            (("--output",), {"type": _P, "required": True, "help": "pose network to write (.pt)"}),
            (("--history",), {"type": _P, "required": True,
                              "help": "validation figures during training to write (.csv)"}),
        ],
    ),
    "match": (
        "cryovae.match:match_split",
        "Template-match every particle of a split against the seen classes' maps: scores and poses.",
        "cryovae match --config config.yaml --split-dir results/subtomograms/test --maps results/maps/*.mrc "
        "--output results/embeddings/match/test.npz",
        [
            (("--split-dir",), {"type": _P, "required": True,
                                "help": "split folder to match (shards + particles.star)"}),
            SEEN_MAPS,
            (("--output",), {"type": _P, "required": True, "help": "scores and poses to write (.npz)"}),
            (("--per-class",), {"type": int, "default": None,
                                "help": "match a seeded subset of at most this many particles of every class "
                                        "(the workflow's training split: matching.train_per_class)"}),
            (("--pose-network",), {"type": _P, "default": None,
                                   "help": "pose network whose proposals start the local searches "
                                           "(matching.starts: network; the train-pose verb's output)"}),
            (("--part",), {"type": int, "default": None,
                           "help": "match only this part (0-based) of --parts equal slices of the particles, "
                                   "for match-join (the contrast check then runs there)"}),
            (("--parts",), {"type": int, "default": 1, "help": "how many parts the split is matched in"}),
        ],
    ),
    "match-join": (
        "cryovae.match_parts:join_match_parts",
        "Join the parts of a split's match (cryovae match --part K --parts N) into one match file.",
        "cryovae match-join --config config.yaml --parts results/embeddings/match/test/part_*.npz "
        "--output results/embeddings/match/test.npz",
        [
            (("--parts",), {"type": _P, "nargs": "+", "required": True, "help": "the part files, part 0 first"}),
            (("--output",), {"type": _P, "required": True, "help": "the split's match file to write (.npz)"}),
        ],
    ),
    "align": (
        "cryovae.align:align_frames",
        "Rotation from the model's canonical frame to each class's reference map.",
        "cryovae align --config config.yaml --model results/model/model.pt "
        "--latents results/embeddings/latent/train.npz --maps results/maps/*.mrc --output results/model/frames.json",
        [
            (("--model",), {"type": _P, "required": True, "help": "trained model (model.pt from cryovae train)"}),
            (("--latents",), {"type": _P, "required": True,
                              "help": "latents of the training split (.npz from cryovae embed)"}),
            (("--maps",), {"type": _P, "nargs": "*", "default": [],
                           "help": "reference maps of the seen classes (MRC, named {class}.mrc; 2D models: "
                                   "reference images, or none for the user's own images)"}),
            (("--split-dir",), {"type": _P, "default": None,
                                "help": "2D models: the split folder the latents encode (its class averages are aligned)"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "frames to write (JSON: rotation from the model's frame to each map, symmetry axes)"}),
        ],
    ),
    "adapt": (
        "cryovae.classify:adapt_classifier",
        "Classifier of one extracted split: refit on its own unlabelled particles by EM (classification.adapt).",
        "cryovae adapt --config config.yaml --classifier results/model/classifier.npz "
        "--latents results/embeddings/latent/tomo1.npz --match results/embeddings/match/tomo1.npz "
        "--output results/model/classifier_tomo1.npz",
        [
            (("--classifier",), {"type": _P, "required": True,
                                 "help": "class model fitted on simulated particles (.npz from cryovae classifier)"}),
            (("--latents",), {"type": _P, "required": True, "help": "latents of the split (.npz from cryovae embed)"}),
            (("--match",), {"type": _P, "default": None, "help": "match output of the same split"}),
            (("--output",), {"type": _P, "required": True, "help": "the split's class model to write (.npz)"}),
        ],
    ),
    "annotate": (
        "cryovae.classify:annotate",
        "Per-particle table: latent, class probabilities, unknown score, class, pose in the map's frame.",
        "cryovae annotate --config config.yaml --latents results/embeddings/latent/test.npz "
        "--classifier results/model/classifier.npz --frames results/model/frames.json "
        "--output results/embeddings/test.csv",
        [
            (("--latents",), {"type": _P, "required": True, "help": "latents of the split (.npz from cryovae embed)"}),
            (("--classifier",), {"type": _P, "required": True, "help": "class model (.npz from cryovae classifier)"}),
            (("--frames",), {"type": _P, "required": True, "help": "frames (JSON from cryovae align)"}),
            (("--match",), {"type": _P, "default": None, "help": "match output of the same split"}),
            (("--output",), {"type": _P, "required": True, "help": "per-particle table to write (CSV)"}),
        ],
    ),
    "priors": (
        "cryovae.priors:write_priors",
        "Pose priors as a RELION 5/4/3 particles STAR file, plus one file per predicted class.",
        "cryovae priors --config config.yaml --embeddings results/embeddings/test.csv "
        "--split-dir results/subtomograms/test --output results/priors/test.star",
        [
            (("--embeddings",), {"type": _P, "required": True,
                                 "help": "per-particle table of the split (CSV from cryovae annotate)"}),
            (("--split-dir",), {"type": _P, "required": True,
                                "help": "split folder (particles.star: tomograms, coordinates, defocus)"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "STAR file of all particles to write; per-class files go to the folder of its stem"}),
        ],
    ),
    "evaluate": (
        "cryovae.evaluate:evaluate",
        "Metrics (metrics.json) and plots of one split against its ground truth.",
        "cryovae evaluate --config config.yaml --embeddings results/embeddings/test.csv "
        "--split-dir results/subtomograms/test --affinity results/affinity/affinity.csv "
        "--model results/model/model.pt --history results/model/history.csv --frames results/model/frames.json "
        "--output-dir results/evaluation/test",
        [
            (("--embeddings",), {"type": _P, "required": True,
                                 "help": "per-particle table of the split (CSV from cryovae annotate)"}),
            (("--split-dir",), {"type": _P, "required": True,
                                "help": "split folder (particles.star with the ground truth, if any)"}),
            (("--affinity",), {"type": _P, "required": True, "help": "affinity matrix CSV (from cryovae affinity)"}),
            (("--model",), {"type": _P, "required": True, "help": "trained model (model.pt from cryovae train)"}),
            (("--history",), {"type": _P, "required": True,
                              "help": "training history (history.csv from cryovae train)"}),
            (("--frames",), {"type": _P, "required": True, "help": "frames (JSON from cryovae align)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "folder to write metrics.json, metrics.html and the plots into"}),
        ],
    ),
    "interpret": (
        "cryovae.interpret:interpret",
        "What the latent dimensions mean: disentanglement (MIG), sparse and symbolic class models, traversals.",
        "cryovae interpret --config config.yaml --embeddings results/embeddings/test.csv "
        "--split-dir results/subtomograms/test --train-latents results/embeddings/latent/train.npz "
        "--affinity results/affinity/affinity.csv --model results/model/model.pt --output-dir results/interpret/test",
        [
            (("--embeddings",), {"type": _P, "required": True, "help": "annotate table of the judged split"}),
            (("--split-dir",), {"type": _P, "required": True, "help": "folder of the judged split (simulated or extracted): its truth"}),
            (("--train-latents",), {"type": _P, "required": True, "help": "embed output of the training split"}),
            (("--affinity",), {"type": _P, "required": True, "help": "affinity CSV (structural similarity of the classes)"}),
            (("--model",), {"type": _P, "required": True, "help": "trained model.pt (decodes the traversals)"}),
            (("--output-dir",), {"type": _P, "required": True, "help": "folder for the JSON, expressions and plots"}),
        ],
    ),
    "make-images": (
        "cryovae.images2d:make_images",
        "Generate one split of 2D glyph images (images.kind suits or alphanumeric) with their true in-plane poses.",
        "cryovae make-images --config config.yaml --split train --output-dir results/images/train",
        [
            (("--split",), {"required": True, "help": "split to generate (a key of images.splits)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "split folder to write (shards, particles.star, montage.png)"}),
        ],
    ),
    "import-images": (
        "cryovae.images2d:import_images",
        "Read one split of the user's 2D images and labels (images.kind files) into a split folder.",
        "cryovae import-images --config config.yaml --split train --output-dir results/images/train",
        [
            (("--split",), {"required": True, "help": "split to import (a key of images.splits)"}),
            (("--output-dir",), {"type": _P, "required": True,
                                 "help": "split folder to write (shards, particles.star, montage.png)"}),
        ],
    ),
    "image-affinity": (
        "cryovae.images2d:image_affinity",
        "Rotation-invariant shape affinity of the configured glyphs: affinity CSV and heatmap.",
        "cryovae image-affinity --config config.yaml --csv results/images/affinity.csv "
        "--plot results/images/affinity.png",
        [
            (("--csv",), {"type": _P, "required": True,
                          "help": "affinity matrix to write (CSV: header of class names, then N×N in class order)"}),
            (("--plot",), {"type": _P, "required": True, "help": "heatmap to write (PNG, classes ordered by similarity)"}),
        ],
    ),
    "export-classifier": (
        "cryovae.model.io:export_classifier",
        "The classifier head of a semi-supervised model as a torch.export program, to run without cryovae.",
        "cryovae export-classifier --config config.yaml --model results/model/model.pt --output classifier.pt2",
        [
            (("--model",), {"type": _P, "required": True, "help": "trained model with a classifier head (model.pt)"}),
            (("--output",), {"type": _P, "required": True,
                             "help": "program to write (.pt2; torch.export.load(path).module()(x) -> class probabilities)"}),
        ],
    ),
    "image-reference": (
        "cryovae.images2d:image_reference",
        "The canonical glyph of one class as a 2D MRC image (the reference align measures poses against).",
        "cryovae image-reference --config config.yaml --class-name hearts --output results/maps/hearts.mrc",
        [
            (("--class-name",), {"required": True, "help": "class whose reference image to write"}),
            (("--output",), {"type": _P, "required": True, "help": "reference image to write (2D MRC)"}),
        ],
    ),
}


def _schema(config_path: str | None, output: Path | None) -> None:
    import json

    from cryovae.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        from cryovae.atomic import write_text_atomic

        write_text_atomic(output, text)


def resource_summary(verb: str) -> str:
    """The last line of every verb's log: wall time since the process started (imports
    included), CPU time and peak memory; benchmarks/bench_scaling.py reads it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    peak_mib = usage.ru_maxrss / 1024  # kilobytes on Linux
    return (f"{verb} finished: wall {time.perf_counter() - _STARTED:.2f} s, "
            f"CPU {cpu:.2f} s, peak memory {peak_mib:.0f} MiB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryovae",
        description="cryo-ET affinity-VAE workflow stages (the Snakefile calls these).",
    )
    parser.add_argument("--version", action="version", version=f"cryovae {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text, example, args) in VERBS.items():
        p = sub.add_parser(
            verb, help=help_text, description=help_text,
            epilog="example:\n" + textwrap.indent(example, "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", required=True, help="config file (YAML/JSON) or an inline JSON object")
        for flags, kwargs in args:
            p.add_argument(*flags, **kwargs)
    p = sub.add_parser(
        "schema", help="Print (or write) the config JSON schema generated from the typed config.",
        epilog="example:\n  cryovae schema --output workflow/schemas/config.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", type=_P, default=None, help="schema file to write (default: print it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    verb = args.pop("verb")
    try:
        if verb == "schema":
            _schema(None, args["output"])
            return 0
        from cryovae.config import load_config

        config = load_config(args.pop("config"))
        module_name, func_name = VERBS[verb][0].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        func(config, **args)
        logging.getLogger("cryovae").info(resource_summary(verb))
    except InputError as err:
        print(f"cryovae {verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
