# Input functions, targets and the config passed to every `cryovae` verb.
import functools
import os

from cryovae.config import GLOBAL_KEYS, stage_config_json, validate_config
from cryovae.splits import (
    match_parts as split_match_parts, match_subset_per_class as split_match_subset_per_class,
    shard_names as split_shard_names,
)
from cryovae.tomosim import simulated_tomogram_names, tomogram_files, with_simulated_tomograms

# Validated first with the typed config, whose messages name the bad key.
CFG = validate_config(config, "(workflow config)")
# Simulated tomograms (tomogram_simulation.tomograms > 0) join extraction.tomograms as sim_NN.
CFG = with_simulated_tomograms(CFG)
SIM_TOMOGRAMS = simulated_tomogram_names(CFG)
OUT = CFG.output_dir
CLASSES = CFG.class_names
SEEN = CFG.seen_classes
IMAGES = CFG.data == "images"
SIM_SPLITS = ["train", "val", "test"]  # the model's three splits: simulated, or images with data: images
TOMOGRAMS = list(CFG.extraction.tomograms)
IMAGE_SPLITS = list(CFG.images.splits) if IMAGES else []
EXTRA_IMAGE_SPLITS = [s for s in IMAGE_SPLITS if s not in SIM_SPLITS]  # e.g. the unlabelled images
CONDA_ENV = "../../envs/cryovae.yaml"
ALL_SECTIONS = [k for k in CFG.model_fields if k not in GLOBAL_KEYS]
# Every rule's command ends in `2> {log} || (tail -n 1 {log} >&2; exit 1)`: the verb writes
# its progress and errors to the rule's log, and when it fails the log's last line (its
# one-line error, or the exception) goes to the terminal; `message:` names the log.


def stage_config(*sections):
    """The config a rule's verb receives: the global keys and the named sections only.
    As a param, it triggers a rerun when (and only when) that part changes."""
    return stage_config_json(CFG, *sections)


def class_stage_config(*sections):
    """A param function: the stage config of one class's job ({cls}), holding that class's
    structure alone, so that changing another class does not rerun the job."""
    return lambda wildcards: stage_config_json(CFG, *sections, class_name=wildcards.cls)


def shard_names(split):
    return split_shard_names(CFG, split)


def shard_files(split, extension):
    """A simulated split's shard files (npy) or their STAR files (star)."""
    return expand(f"{OUT}/subtomograms/{split}/{{shard}}.{extension}", shard=shard_names(split))


def split_dir(split):
    """Folder of a split's shards and particles.star: simulated, extracted or images."""
    if IMAGES:
        return f"{OUT}/images/{split}"
    if split in SIM_SPLITS:
        return f"{OUT}/subtomograms/{split}"
    return f"{OUT}/extracted/{split}"


def split_path(split):
    """A split as an input: the gathered STAR (simulated), or the extraction or images folder."""
    if split in SIM_SPLITS and not IMAGES:
        return f"{OUT}/subtomograms/{split}/particles.star"
    return split_dir(split)


def folder_of(path):
    """The split folder of a :func:`split_path`: the STAR's folder, or the folder itself."""
    return os.path.dirname(path) if path.endswith(".star") else path


def split_input(wildcards):
    """Input of a split: :func:`split_path` of the rule's {simsplit} or {split}."""
    return split_path(wildcards.get("simsplit", wildcards.get("split")))


def unlabelled_splits():
    """The folders training.semi_supervised.unlabelled names (tomogram or image splits)."""
    return [split_dir(s) for s in CFG.training.semi_supervised.unlabelled]


def seen_references():
    """The seen classes' reference maps (images: reference images; none for the user's own images)."""
    if IMAGES and CFG.images.kind == "files":
        return []
    return expand(f"{OUT}/maps/{{cls}}.mrc", cls=SEEN)


def split_classes(split):
    """Classes that occur in a simulated split: train and val see the seen ones, test all."""
    return CLASSES if split == "test" else SEEN


def class_maps(wildcards):
    return expand(f"{OUT}/maps/{{cls}}.mrc", cls=split_classes(wildcards.simsplit))


def map_input(wildcards):
    """A class's map is simulated from its structure unless maps.files gives one."""
    if wildcards.cls in CFG.maps.files:
        return []
    return f"{OUT}/structures/{wildcards.cls}.cif"


def mem_mb(base):
    """Memory that grows with the attempt, so a job killed for memory comes back with more."""
    return lambda wildcards, attempt: base * attempt


ANSWER_SPLITS = ["test"] + TOMOGRAMS
EVAL_SPLITS = ["val", "test"]


def all_targets():
    if IMAGES:
        return [
            *expand(f"{OUT}/images/{{imsplit}}", imsplit=IMAGE_SPLITS),
            f"{OUT}/affinity/affinity.csv",
            *expand(f"{OUT}/embeddings/{{split}}.csv", split=SIM_SPLITS),
            *expand(f"{OUT}/evaluation/{{split}}/metrics.json", split=EVAL_SPLITS),
            *expand(f"{OUT}/interpret/{{split}}/interpretation.json", split=EVAL_SPLITS),
            f"{OUT}/provenance.json",
        ]
    # The simulated shards are targets: snakemake does not remake a deleted input of a job
    # whose output is up to date, only a deleted target (and then everything downstream).
    return [
        *(f for split in SIM_SPLITS for ext in ("npy", "star") for f in shard_files(split, ext)),
        f"{OUT}/affinity/affinity.csv",
        f"{OUT}/affinity/affinity.png",
        *expand(f"{OUT}/embeddings/{{split}}.csv", split=SIM_SPLITS + TOMOGRAMS),
        *expand(f"{OUT}/priors/{{split}}.star", split=ANSWER_SPLITS),
        *expand(f"{OUT}/evaluation/{{split}}/metrics.json", split=EVAL_SPLITS + TOMOGRAMS),
        *expand(f"{OUT}/interpret/{{split}}/interpretation.json", split=EVAL_SPLITS),
        f"{OUT}/provenance.json",
    ]


def priors_inputs(wildcards):
    inputs = {"embeddings": f"{OUT}/embeddings/{wildcards.split}.csv", "split": split_input(wildcards)}
    if wildcards.split in SIM_SPLITS or CFG.priors.format == "relion3":
        # simulated particles have no tomogram, and RELION 3 reads subtomogram files:
        # the priors name the exported subtomograms
        inputs["export"] = f"{OUT}/export/{wildcards.split}"
    return inputs


def matched(split):
    """The match output of a split, or nothing when matching is off."""
    return {"match": f"{OUT}/embeddings/match/{split}.npz"} if CFG.matching.enabled else {}


def match_subset_option(split):
    """The match verb's --per-class (cryovae.splits.match_subset_per_class): for the training split
    matching.train_per_class, unless training reads every training particle in its matched pose."""
    per_class = split_match_subset_per_class(CFG, split)
    return "" if per_class is None else f"--per-class {per_class} "


@functools.cache
def match_part_count(split):
    """How many parts a split is matched in (matching.particles_per_job; cryovae.splits.match_parts).
    Cached: a user's tomogram is counted from its picks file, once per parse, not once per job."""
    return split_match_parts(CFG, split)


def match_part_files(split):
    """The part files a split is matched in (:func:`match_part_count` of them)."""
    return [f"{OUT}/embeddings/match/{split}/part_{k:03d}.npz" for k in range(match_part_count(split))]


def pose_network_input():
    """The pose network, when matching starts its local searches from its proposals
    (matching.starts: network)."""
    if CFG.matching.enabled and CFG.matching.starts == "network":
        return [f"{OUT}/model/pose_network.pt"]
    return []


def match_option(flag, path):
    """A verb's option naming a match output, or nothing when matching is off."""
    return f"{flag} {path}" if CFG.matching.enabled else ""


def frame_matches(splits):
    """The match outputs of ``splits`` when the model reads particles in their matched frame
    (training.shape_frame: matched), otherwise none."""
    if CFG.training.shape_frame != "matched":
        return []
    return [f"{OUT}/embeddings/match/{split}.npz" for split in splits]


def frame_options(**flags):
    """Options naming the match outputs of training.shape_frame: matched, e.g.
    frame_options(train_match="train"): '--train-match {OUT}/embeddings/match/train.npz';
    a list of splits gives one option with several paths; nothing for a particle-frame model."""
    parts = []
    for flag, splits in flags.items():
        paths = frame_matches([splits] if isinstance(splits, str) else splits)
        if paths:
            parts.append(f"--{flag.replace('_', '-')} " + " ".join(paths))
    return " ".join(parts)


def split_classifier(wildcards):
    """The class model a split is annotated with: an extracted split's own (rule adapt),
    the one fitted on simulated particles for simulated splits."""
    if wildcards.split in TOMOGRAMS:
        return f"{OUT}/model/classifier_{wildcards.split}.npz"
    return f"{OUT}/model/classifier.npz"


def simulated_tomogram_maps(wildcards):
    """The workflow's maps of the classes tomogram_simulation.maps does not replace."""
    return expand(f"{OUT}/maps/{{cls}}.mrc", cls=[c for c in CLASSES if c not in CFG.tomogram_simulation.maps])
