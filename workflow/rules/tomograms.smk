# Tomograms simulated as real ones are made (tomogram_simulation): each becomes an extraction
# tomogram of its own (common.smk adds it to extraction.tomograms), with its truth.


rule simulate_tomogram:
    input:
        maps=simulated_tomogram_maps,
        external=[*CFG.tomogram_simulation.maps.values(), *CFG.tomogram_simulation.decoys.values()],
    output:
        **{role: str(path) for role, path in tomogram_files(CFG, "{simtomo}").items()},
    params:
        config=stage_config("tomogram_simulation"),
        index=lambda wildcards: SIM_TOMOGRAMS.index(wildcards.simtomo),
        output_dir=lambda wildcards: f"{OUT}/tomograms/{wildcards.simtomo}",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/simulate_tomogram/{{simtomo}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=30,
    message:
        "Simulating tomogram {wildcards.simtomo} (tilt series and back-projection; log: {log})"
    shell:
        "cryovae simulate-tomogram --config {params.config:q} --index {params.index} --maps {input.maps} "
        "--output-dir {params.output_dir} 2> {log} || (tail -n 1 {log} >&2; exit 1)"
