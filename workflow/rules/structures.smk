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
    message:
        "Structure of class {wildcards.cls} (log: {log})"
    shell:
        "cryovae structure --config {params.config:q} --class-name {wildcards.cls} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


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
    message:
        "SOAP descriptor of {wildcards.cls} (log: {log})"
    shell:
        "cryovae descriptor --config {params.config:q} --structure {input} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


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
    message:
        "Affinity matrix of all classes -> {output.csv} (log: {log})"
    shell:
        "cryovae affinity --config {params.config:q} --descriptors {input} "
        "--csv {output.csv} --plot {output.plot} 2> {log} || (tail -n 1 {log} >&2; exit 1)"
