# Structures in, SOAP affinity matrix out.


rule structure:
    output:
        f"{OUT}/structures/{{cls}}.cif",
    params:
        config=class_stage_config("structure_options"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/structure/{{cls}}.log",
    group:
        "structures"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=20,
    shell:
        "cryovae structure --config {params.config:q} --class-name {wildcards.cls} --output {output} 2> {log}"


rule descriptor:
    input:
        f"{OUT}/structures/{{cls}}.cif",
    output:
        f"{OUT}/affinity/soap/{{cls}}.npy",
    params:
        config=class_stage_config("affinity"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/descriptor/{{cls}}.log",
    group:
        "structures"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=20,
    shell:
        "cryovae descriptor --config {params.config:q} --structure {input} --output {output} 2> {log}"


rule affinity:
    input:
        expand(f"{OUT}/affinity/soap/{{cls}}.npy", cls=CLASSES),
    output:
        csv=f"{OUT}/affinity/affinity.csv",
        plot=report(
            f"{OUT}/affinity/affinity.png",
            caption="../report/affinity.rst",
            category="Affinity",
        ),
    params:
        config=stage_config("affinity"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/affinity.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    shell:
        "cryovae affinity --config {params.config:q} --descriptors {input} "
        "--csv {output.csv} --plot {output.plot} 2> {log}"


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
    shell:
        "cryovae provenance --config {params.config:q} --output {output} 2> {log}"
