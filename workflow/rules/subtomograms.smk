# Reference maps, simulated subtomograms, extraction from tomograms, and the RELION export.


rule map:
    input:
        map_input,
    output:
        f"{OUT}/maps/{{cls}}.mrc",
    params:
        config=class_stage_config("maps"),
        structure=lambda wildcards, input: f"--structure {input[0]}" if input else "",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/map/{{cls}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=30,
    message:
        "Reference map of {wildcards.cls} (log: {log})"
    shell:
        "cryovae map --config {params.config:q} --class-name {wildcards.cls} {params.structure} "
        "--output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule simulate:
    input:
        class_maps,
    output:
        shard=f"{OUT}/subtomograms/{{simsplit}}/{{shard}}.npy",
        star=f"{OUT}/subtomograms/{{simsplit}}/{{shard}}.star",
    params:
        config=stage_config("simulation"),
        index=lambda wildcards: int(wildcards.shard.split("_")[1]),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/simulate/{{simsplit}}_{{shard}}.log",
    group:
        "simulation"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
    message:
        "Simulating {wildcards.simsplit} {wildcards.shard} (log: {log})"
    shell:
        "cryovae simulate --config {params.config:q} --split {wildcards.simsplit} --shard {params.index} "
        "--maps {input} --output {output.shard} --star {output.star} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule gather:
    input:
        # the shards too: a deleted or stale shard reruns its simulate job (the split's STAR
        # is what later rules name, and it is only as good as the shards beside it)
        stars=lambda wildcards: shard_files(wildcards.simsplit, "star"),
        shards=lambda wildcards: shard_files(wildcards.simsplit, "npy"),
    output:
        f"{OUT}/subtomograms/{{simsplit}}/particles.star",
    params:
        config=stage_config(),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/gather/{{simsplit}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    message:
        "Gathering the {wildcards.simsplit} shards -> {output} (log: {log})"
    shell:
        "cryovae gather --config {params.config:q} --inputs {input.stars} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule extract:
    input:
        tomogram=lambda wildcards: CFG.extraction.tomograms[wildcards.tomo].tomogram,
        coordinates=lambda wildcards: CFG.extraction.tomograms[wildcards.tomo].coordinates,
        acquisition=lambda wildcards: [f for f in [CFG.extraction.tomograms[wildcards.tomo].acquisition] if f],
        truth=lambda wildcards: CFG.extraction.tomograms[wildcards.tomo].truth or [],
    output:
        directory(f"{OUT}/extracted/{{tomo}}"),
    params:
        config=stage_config("extraction"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/extract/{{tomo}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=60,
    message:
        "Extracting subtomograms from tomogram {wildcards.tomo} (log: {log})"
    shell:
        "cryovae extract --config {params.config:q} --tomogram {wildcards.tomo} --output-dir {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule export:
    input:
        split_input,
    output:
        directory(f"{OUT}/export/{{split}}"),
    params:
        config=stage_config("simulation", "extraction"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/export/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=30,
    message:
        "Exporting {wildcards.split} as MRC files (progress: {log})"
    shell:
        "cryovae export --config {params.config:q} --split-dir {params.split_dir} --output-dir {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"
