# Interpretable models of the latent space: what each latent dimension carries, and class
# rules that use few of them (sparse and symbolic), fitted on train and judged on the split.

INTERPRET_PLOTS = ["disentanglement", "sparse", "symbolic", "traversal_slices", "traversal_projections"]


rule interpret:
    input:
        embeddings=f"{OUT}/embeddings/{{split}}.csv",
        split=split_input,
        train_latents=f"{OUT}/embeddings/latent/train.npz",
        affinity=f"{OUT}/affinity/affinity.csv",
        model=f"{OUT}/model/model.pt",
    output:
        json=f"{OUT}/interpret/{{split}}/interpretation.json",
        expressions=report(
            f"{OUT}/interpret/{{split}}/expressions.txt",
            caption="../report/interpret_expressions.rst",
            category="Interpretation",
            subcategory="{split}",
        ),
        plots=[
            report(
                f"{OUT}/interpret/{{split}}/{name}.png",
                caption=f"../report/interpret_{name}.rst",
                category="Interpretation",
                subcategory="{split}",
            )
            for name in INTERPRET_PLOTS
        ],
    params:
        config=stage_config("interpretation"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
        output_dir=lambda wildcards: f"{OUT}/interpret/{wildcards.split}",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/interpret/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=30,
    message:
        "Interpreting the latent space on the {wildcards.split} split: symbolic regression takes a while; progress in {log}"
    shell:
        "cryovae interpret --config {params.config:q} --embeddings {input.embeddings} "
        "--split-dir {params.split_dir} --train-latents {input.train_latents} --affinity {input.affinity} "
        "--model {input.model} --output-dir {params.output_dir} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


# What made the outputs: the package version and the whole validated config.

rule provenance:
    output:
        f"{OUT}/provenance.json",
    params:
        config=stage_config(*ALL_SECTIONS),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/provenance.log",
    localrule: True
    message:
        "Provenance of the run -> {output} (log: {log})"
    shell:
        "cryovae provenance --config {params.config:q} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"
