# data: images: 2D image splits (generated glyphs or the user's stacks), their shape affinity and
# reference images; the model, classes and evaluation rules are the subtomograms' own.


rule images:
    output:
        directory(f"{OUT}/images/{{imsplit}}"),
    params:
        config=stage_config(),
        verb="import-images" if CFG.images.kind == "files" else "make-images",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/images/{{imsplit}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=30,
    message:
        "Images of the {wildcards.imsplit} split (log: {log}; a montage lands beside them)"
    shell:
        "cryovae {params.verb} --config {params.config:q} --split {wildcards.imsplit} --output-dir {output} "
        "2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule image_affinity:
    output:
        csv=f"{OUT}/affinity/affinity.csv",
        plot=report(
            f"{OUT}/affinity/affinity.png",
            caption="../report/affinity.rst",
            category="Affinity",
        ),
    params:
        config=stage_config(),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/affinity.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Shape affinity of the image classes -> {output.csv} (log: {log})"
    shell:
        "cryovae image-affinity --config {params.config:q} --csv {output.csv} --plot {output.plot} "
        "2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule image_reference:
    output:
        f"{OUT}/maps/{{cls}}.mrc",
    params:
        config=stage_config(),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/map/{{cls}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    message:
        "Reference image of {wildcards.cls} (log: {log})"
    shell:
        "cryovae image-reference --config {params.config:q} --class-name {wildcards.cls} --output {output} "
        "2> {log} || (tail -n 1 {log} >&2; exit 1)"
