# cryovae: structures -> SOAP affinity -> subtomograms -> affinity-VAE -> classes, unknowns, pose priors.
# This file is the table of contents; every rule calls one `cryovae` verb (workflow/rules/).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.json")


report: "workflow/report/workflow.rst"


include: "workflow/rules/structures.smk"
include: "workflow/rules/subtomograms.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/answers.smk"


rule all:
    input:
        all_targets(),
    default_target: True
