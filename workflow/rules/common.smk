# Input functions, targets and the config passed to every `cryovae` verb.
import json
import shlex

from cryovae.config import validate_config
from cryovae.simulate import shard_plan

# Validated first with the typed config, whose messages name the bad key.
CFG = validate_config(config, "(workflow config)")
OUT = CFG.output_dir
CLASSES = CFG.class_names
SEEN = CFG.seen_classes
SIM_SPLITS = ["train", "val", "test"]
TOMOGRAMS = list(CFG.extraction.tomograms)
# The whole validated config, as the verbs receive it.
CONFIG_JSON = shlex.quote(CFG.model_dump_json())
GLOBAL_KEYS = ("seed", "structures", "unseen", "pixel_size_angstrom", "box_size")


wildcard_constraints:
    cls="|".join(CLASSES),
    split="|".join(SIM_SPLITS + TOMOGRAMS),
    simsplit="|".join(SIM_SPLITS),
    tomo="|".join(TOMOGRAMS) if TOMOGRAMS else "(?!)",
    shard=r"shard_\d{3}",


def depends_on(*sections, global_keys=GLOBAL_KEYS):
    """The part of the config a rule depends on, as a params value: changing any of it
    (and nothing else) reruns the rule."""
    dump = CFG.model_dump(mode="json")
    return json.dumps({k: dump[k] for k in (*global_keys, *sections)}, sort_keys=True)


def class_source(wildcards):
    """What one class's structure rule depends on: its own entry only."""
    return json.dumps(
        {"source": CFG.structures[wildcards.cls], "options": CFG.structure_options.model_dump()},
        sort_keys=True,
    )


def shard_names(split):
    return [f"shard_{k:03d}" for k in range(len(shard_plan(CFG, split)))]


def split_dir(split):
    """Folder of a split's shards and particles.star: simulated or extracted."""
    if split in SIM_SPLITS:
        return f"{OUT}/subtomograms/{split}"
    return f"{OUT}/extracted/{split}"


def split_input(wildcards):
    """What a rule reading a split waits for: the gathered STAR, or the extraction folder."""
    split = wildcards.get("simsplit", wildcards.get("split"))
    if split in SIM_SPLITS:
        return f"{OUT}/subtomograms/{split}/particles.star"
    return f"{OUT}/extracted/{split}"


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
    return [
        f"{OUT}/affinity/affinity.csv",
        f"{OUT}/affinity/affinity.png",
        *expand(f"{OUT}/embeddings/{{split}}.csv", split=SIM_SPLITS + TOMOGRAMS),
        *expand(f"{OUT}/priors/{{split}}.star", split=ANSWER_SPLITS),
        *expand(f"{OUT}/evaluation/{{split}}/metrics.json", split=EVAL_SPLITS + TOMOGRAMS),
        f"{OUT}/provenance.json",
    ]
