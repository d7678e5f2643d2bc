# cryovae: structures -> SOAP affinity -> subtomograms -> affinity-VAE -> classes, unknowns, pose priors.
# This file is the table of contents; every rule calls one `cryovae` verb (workflow/rules/).
from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default, unless the user names config files (`--configfile`): those replace it
# whole, rather than being merged into it (merging would keep the demo structures).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.json")


wildcard_constraints:
    cls="|".join(CLASSES),
    split="|".join(SIM_SPLITS + TOMOGRAMS + EXTRA_IMAGE_SPLITS),
    imsplit="|".join(IMAGE_SPLITS) if IMAGE_SPLITS else "(?!)",
    simsplit="|".join(SIM_SPLITS),
    tomo="|".join(TOMOGRAMS) if TOMOGRAMS else "(?!)",
    simtomo="|".join(SIM_TOMOGRAMS) if SIM_TOMOGRAMS else "(?!)",
    shard=r"shard_\d\d\d+",  # shard_{k:03d}: a split may have a thousand shards or more




report: "workflow/report/workflow.rst"


if IMAGES:  # data: images: 2D splits, shape affinity, reference images

    include: "workflow/rules/images.smk"

else:  # data: subtomograms: structures, SOAP affinity, maps, subtomograms, tomograms

    include: "workflow/rules/structures.smk"
    include: "workflow/rules/subtomograms.smk"
    include: "workflow/rules/tomograms.smk"


include: "workflow/rules/model.smk"
include: "workflow/rules/answers.smk"
include: "workflow/rules/interpret.smk"


rule all:
    input:
        all_targets(),
    default_target: True

