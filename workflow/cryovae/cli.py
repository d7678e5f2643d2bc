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
import sys
import textwrap
from pathlib import Path

from cryovae import __version__
from cryovae.errors import InputError

# verb -> (module:function, help, example, [(flags, kwargs), ...])
# The function is called with the parsed config first, then the named arguments.
_P = Path
VERBS: dict[str, tuple[str, str, str, list[tuple[tuple[str, ...], dict]]]] = {
    "structure": (
        "cryovae.structures:prepare_structure",
        "Read (or download, or generate) one class's structure, clean it, write mmCIF.",
        "cryovae structure --config config.yaml --class-name 1bxn --output results/structures/1bxn.cif",
        [(("--class-name",), {"required": True}), (("--output",), {"type": _P, "required": True})],
    ),
    "descriptor": (
        "cryovae.affinity:compute_descriptor",
        "Averaged SOAP descriptor of one cleaned structure (NumPy .npy).",
        "cryovae descriptor --config config.yaml --structure results/structures/1bxn.cif "
        "--output results/affinity/soap/1bxn.npy",
        [(("--structure",), {"type": _P, "required": True}), (("--output",), {"type": _P, "required": True})],
    ),
    "affinity": (
        "cryovae.affinity:build_affinity",
        "Combine per-class descriptors into the affinity matrix (CSV) and its heatmap (PNG).",
        "cryovae affinity --config config.yaml --descriptors results/affinity/soap/*.npy "
        "--csv results/affinity/affinity.csv --plot results/affinity/affinity.png",
        [
            (("--descriptors",), {"type": _P, "nargs": "+", "required": True}),
            (("--csv",), {"type": _P, "required": True}),
            (("--plot",), {"type": _P, "required": True}),
        ],
    ),
    "map": (
        "cryovae.maps:make_map",
        "Reference density map of one class (MRC) at the configured pixel size and box.",
        "cryovae map --config config.yaml --class-name 1bxn --structure results/structures/1bxn.cif "
        "--output results/maps/1bxn.mrc",
        [
            (("--class-name",), {"required": True}),
            (("--structure",), {"type": _P, "default": None}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "simulate": (
        "cryovae.simulate:simulate_shard",
        "Simulate one shard of subtomograms with known poses, plus its ground-truth STAR.",
        "cryovae simulate --config config.yaml --split train --shard 0 --maps results/maps/*.mrc "
        "--output results/subtomograms/train/shard_000.npy --star results/subtomograms/train/shard_000.star",
        [
            (("--split",), {"required": True, "choices": ["train", "val", "test"]}),
            (("--shard",), {"type": int, "required": True}),
            (("--maps",), {"type": _P, "nargs": "+", "required": True}),
            (("--output",), {"type": _P, "required": True}),
            (("--star",), {"type": _P, "required": True}),
        ],
    ),
    "gather": (
        "cryovae.shards:gather_star",
        "Concatenate per-shard STAR files into a split's particles.star.",
        "cryovae gather --config config.yaml --inputs results/subtomograms/train/shard_*.star "
        "--output results/subtomograms/train/particles.star",
        [(("--inputs",), {"type": _P, "nargs": "+", "required": True}), (("--output",), {"type": _P, "required": True})],
    ),
    "extract": (
        "cryovae.extract:extract_tomogram",
        "Cut subtomograms out of one tomogram at its picked coordinates (memory-mapped).",
        "cryovae extract --config config.yaml --tomogram TS_01 --output-dir results/subtomograms/TS_01",
        [(("--tomogram",), {"required": True}), (("--output-dir",), {"type": _P, "required": True})],
    ),
    "provenance": (
        "cryovae.config:write_provenance",
        "Record the package version and the whole validated config of a run (JSON).",
        "cryovae provenance --config config.yaml --output results/provenance.json",
        [(("--output",), {"type": _P, "required": True})],
    ),
    "export": (
        "cryovae.export:export_relion3",
        "Write a split as MRC files plus a RELION 3.1 particles STAR (3D subtomograms).",
        "cryovae export --config config.yaml --split-dir results/subtomograms/test "
        "--output-dir results/export/test",
        [(("--split-dir",), {"type": _P, "required": True}), (("--output-dir",), {"type": _P, "required": True})],
    ),
    "train": (
        "cryovae.train:train",
        "Train the affinity-VAE; resumes from the last checkpoint in the output folder.",
        "cryovae train --config config.yaml --train-dir results/subtomograms/train "
        "--val-dir results/subtomograms/val --affinity results/affinity/affinity.csv --maps results/maps/*.mrc "
        "--output-dir results/model",
        [
            (("--train-dir",), {"type": _P, "required": True}),
            (("--val-dir",), {"type": _P, "required": True}),
            (("--affinity",), {"type": _P, "required": True}),
            (("--maps",), {"type": _P, "nargs": "*", "default": None,
                           "help": "reference maps of the seen classes (symmetric classes need theirs)"}),
            (("--output-dir",), {"type": _P, "required": True}),
        ],
    ),
    "embed": (
        "cryovae.embed:embed",
        "Encode a split with the final model: latent means, poses (model frame), shifts.",
        "cryovae embed --config config.yaml --model results/model/model.pt "
        "--split-dir results/subtomograms/test --output results/embeddings/latent/test.npz",
        [
            (("--model",), {"type": _P, "required": True}),
            (("--split-dir",), {"type": _P, "required": True}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "classifier": (
        "cryovae.classify:fit_classifier",
        "Fit the class model on training latents; calibrate the unknown threshold on validation.",
        "cryovae classifier --config config.yaml --train results/embeddings/latent/train.npz "
        "--val results/embeddings/latent/val.npz --output results/model/classifier.npz",
        [
            (("--train",), {"type": _P, "required": True}),
            (("--val",), {"type": _P, "required": True}),
            (("--train-match",), {"type": _P, "default": None, "help": "match output of the training split"}),
            (("--val-match",), {"type": _P, "default": None, "help": "match output of the validation split"}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "match": (
        "cryovae.match:match_split",
        "Template-match every particle of a split against the seen classes' maps: scores and poses.",
        "cryovae match --config config.yaml --split-dir results/subtomograms/test --maps results/maps/*.mrc "
        "--output results/embeddings/match/test.npz",
        [
            (("--split-dir",), {"type": _P, "required": True}),
            (("--maps",), {"type": _P, "nargs": "+", "required": True}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "align": (
        "cryovae.align:align_frames",
        "Rotation from the model's canonical frame to each class's reference map.",
        "cryovae align --config config.yaml --model results/model/model.pt "
        "--latents results/embeddings/latent/train.npz --maps results/maps/*.mrc --output results/model/frames.json",
        [
            (("--model",), {"type": _P, "required": True}),
            (("--latents",), {"type": _P, "required": True}),
            (("--maps",), {"type": _P, "nargs": "+", "required": True}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "annotate": (
        "cryovae.classify:annotate",
        "Per-particle table: latent, class probabilities, unknown score, class, pose in the map's frame.",
        "cryovae annotate --config config.yaml --latents results/embeddings/latent/test.npz "
        "--classifier results/model/classifier.npz --frames results/model/frames.json "
        "--output results/embeddings/test.csv",
        [
            (("--latents",), {"type": _P, "required": True}),
            (("--classifier",), {"type": _P, "required": True}),
            (("--frames",), {"type": _P, "required": True}),
            (("--match",), {"type": _P, "default": None, "help": "match output of the same split"}),
            (("--output",), {"type": _P, "required": True}),
        ],
    ),
    "priors": (
        "cryovae.priors:write_priors",
        "Pose priors as a RELION 5/4/3 particles STAR file, plus one file per predicted class.",
        "cryovae priors --config config.yaml --embeddings results/embeddings/test.csv "
        "--split-dir results/subtomograms/test --output results/priors/test.star",
        [
            (("--embeddings",), {"type": _P, "required": True}),
            (("--split-dir",), {"type": _P, "required": True}),
            (("--output",), {"type": _P, "required": True}),
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
            (("--embeddings",), {"type": _P, "required": True}),
            (("--split-dir",), {"type": _P, "required": True}),
            (("--affinity",), {"type": _P, "required": True}),
            (("--model",), {"type": _P, "required": True}),
            (("--history",), {"type": _P, "required": True}),
            (("--frames",), {"type": _P, "required": True}),
            (("--output-dir",), {"type": _P, "required": True}),
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
            (("--split-dir",), {"type": _P, "required": True}),
            (("--train-latents",), {"type": _P, "required": True, "help": "embed output of the training split"}),
            (("--affinity",), {"type": _P, "required": True}),
            (("--model",), {"type": _P, "required": True}),
            (("--output-dir",), {"type": _P, "required": True}),
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
    p.add_argument("--output", type=_P, default=None)
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
    except InputError as err:
        print(f"cryovae {verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
