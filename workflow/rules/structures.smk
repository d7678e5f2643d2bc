# Structures in, SOAP affinity matrix out.


rule structure:
    output:
        f"{OUT}/structures/{{cls}}.cif",
    params:
        depends=class_source,
    log:
        f"{OUT}/logs/structure/{{cls}}.log",
    group:
        "structures"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=20,
    shell:
        "cryovae structure --config {CONFIG_JSON} --class-name {wildcards.cls} --output {output} 2> {log}"


rule descriptor:
    input:
        f"{OUT}/structures/{{cls}}.cif",
    output:
        f"{OUT}/affinity/soap/{{cls}}.npy",
    params:
        depends=depends_on("affinity", global_keys=()),
    log:
        f"{OUT}/logs/descriptor/{{cls}}.log",
    group:
        "structures"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=20,
    shell:
        "cryovae descriptor --config {CONFIG_JSON} --structure {input} --output {output} 2> {log}"


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
        depends=depends_on("affinity", global_keys=("structures",)),
    log:
        f"{OUT}/logs/affinity.log",
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=10,
    shell:
        "cryovae affinity --config {CONFIG_JSON} --descriptors {input} "
        "--csv {output.csv} --plot {output.plot} 2> {log}"


rule provenance:
    output:
        f"{OUT}/provenance.json",
    params:
        depends=depends_on(*[k for k in CFG.model_fields if k not in GLOBAL_KEYS + ("output_dir",)]),
    log:
        f"{OUT}/logs/provenance.log",
    localrule: True
    shell:
        "cryovae provenance --config {CONFIG_JSON} --output {output} 2> {log}"
