# From a trained model to answers: classes and unknowns, poses in the reference frame,
# pose priors for subtomogram averaging, and the evaluation.
import re


rule match:
    input:
        split=split_input,
        maps=expand(f"{OUT}/maps/{{cls}}.mrc", cls=SEEN),
        pose_network=pose_network_input(),
    output:
        temp(f"{OUT}/embeddings/match/{{split}}/part_{{part}}.npz"),
    wildcard_constraints:
        part=r"\d\d\d+",
    params:
        config=stage_config("matching", "simulation", "alignment"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
        subset=lambda wildcards: match_subset_option(wildcards.split),
        pose_network=lambda wildcards, input: "".join(f"--pose-network {p} " for p in input.pose_network),
        parts=lambda wildcards: f"--part {int(wildcards.part)} --parts {match_part_count(wildcards.split)}",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/match/{{split}}/part_{{part}}.log",
    threads: CFG.matching.threads
    resources:
        mem_mb=mem_mb(4000),
        runtime=120,
    message:
        "Template matching of part {wildcards.part} of the {wildcards.split} split: a long step; progress in {log}"
    shell:
        "cryovae match --config {params.config:q} --split-dir {params.split_dir} --maps {input.maps} "
        "{params.subset}{params.pose_network}{params.parts} --output {output} 2> {log} "
        "|| (tail -n 1 {log} >&2; exit 1)"


rule match_join:
    input:
        parts=lambda wildcards: match_part_files(wildcards.split),
    output:
        f"{OUT}/embeddings/match/{{split}}.npz",
    params:
        config=stage_config(),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/match_join/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Joining the {wildcards.split} split's match parts (log: {log})"
    shell:
        "cryovae match-join --config {params.config:q} --parts {input.parts} --output {output} 2> {log} "
        "|| (tail -n 1 {log} >&2; exit 1)"


rule classifier:
    input:
        unpack(lambda wildcards: {f"train_{k}": v for k, v in matched("train").items()}),
        unpack(lambda wildcards: {f"val_{k}": v for k, v in matched("val").items()}),
        train=f"{OUT}/embeddings/latent/train.npz",
        val=f"{OUT}/embeddings/latent/val.npz",
    output:
        f"{OUT}/model/classifier.npz",
    params:
        config=stage_config("classification"),
        match=match_option("--train-match", f"{OUT}/embeddings/match/train.npz")
        + " "
        + match_option("--val-match", f"{OUT}/embeddings/match/val.npz"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/classifier.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Fitting the class model and the unknown threshold (log: {log})"
    shell:
        "cryovae classifier --config {params.config:q} --train {input.train} --val {input.val} "
        "{params.match} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule align:
    input:
        model=f"{OUT}/model/model.pt",
        latents=f"{OUT}/embeddings/latent/train.npz",
        maps=seen_references(),
        split=split_path("train"),
    output:
        f"{OUT}/model/frames.json",
    params:
        config=stage_config("alignment", "training"),
        split_dir=lambda wildcards, input: folder_of(input.split),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/align.log",
    threads: 2
    resources:
        mem_mb=mem_mb(4000),
        runtime=30,
    message:
        "Aligning the model's frame to each class map (log: {log})"
    shell:
        "cryovae align --config {params.config:q} --model {input.model} --latents {input.latents} "
        "--maps {input.maps} --split-dir {params.split_dir} --output {output} "
        "2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule adapt:
    input:
        unpack(lambda wildcards: matched(wildcards.split)),
        latents=f"{OUT}/embeddings/latent/{{split}}.npz",
        classifier=f"{OUT}/model/classifier.npz",
    output:
        f"{OUT}/model/classifier_{{split}}.npz",
    wildcard_constraints:
        split="|".join(re.escape(t) for t in TOMOGRAMS) or "no-extracted-split",
    params:
        config=stage_config("classification"),
        match=lambda wildcards: match_option("--match", f"{OUT}/embeddings/match/{wildcards.split}.npz"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/adapt/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Class model of the {wildcards.split} split from its own particles (log: {log})"
    shell:
        "cryovae adapt --config {params.config:q} --classifier {input.classifier} --latents {input.latents} "
        "{params.match} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule annotate:
    input:
        unpack(lambda wildcards: matched(wildcards.split)),
        latents=f"{OUT}/embeddings/latent/{{split}}.npz",
        classifier=split_classifier,
        frames=f"{OUT}/model/frames.json",
    output:
        f"{OUT}/embeddings/{{split}}.csv",
    params:
        config=stage_config("classification", "alignment"),
        match=lambda wildcards: match_option("--match", f"{OUT}/embeddings/match/{wildcards.split}.npz"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/annotate/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Classes, unknowns and poses of the {wildcards.split} split (log: {log})"
    shell:
        "cryovae annotate --config {params.config:q} --latents {input.latents} --classifier {input.classifier} "
        "--frames {input.frames} {params.match} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule priors:
    input:
        unpack(priors_inputs),
    output:
        star=f"{OUT}/priors/{{split}}.star",
        by_class=directory(f"{OUT}/priors/{{split}}"),
        global_search=f"{OUT}/priors/{{split}}_global_search.star",
    params:
        config=stage_config("priors", "simulation", "extraction"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/priors/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=10,
    message:
        "Pose priors of the {wildcards.split} split -> {output.star} (log: {log})"
    shell:
        "cryovae priors --config {params.config:q} --embeddings {input.embeddings} "
        "--split-dir {params.split_dir} --output {output.star} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


# Figures of each split in the report; the training curves (the same for every split) are
# reported once, by the train rule.
EVAL_PLOTS = [
    "umap",
    "confusion",
    "affinity_vs_latent",
    "pose_error",
    "pose_confidence",
    "reconstructions",
    "interpolation",
]


rule evaluate:
    input:
        embeddings=f"{OUT}/embeddings/{{split}}.csv",
        split=split_input,
        affinity=f"{OUT}/affinity/affinity.csv",
        model=f"{OUT}/model/model.pt",
        history=f"{OUT}/model/history.csv",
        frames=f"{OUT}/model/frames.json",
    output:
        metrics=f"{OUT}/evaluation/{{split}}/metrics.json",
        table=report(
            f"{OUT}/evaluation/{{split}}/metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
            subcategory="{split}",
        ),
        curves=f"{OUT}/evaluation/{{split}}/training_curves.png",
        plots=[
            report(
                f"{OUT}/evaluation/{{split}}/{name}.png",
                caption=f"../report/{name}.rst",
                category="Evaluation",
                subcategory="{split}",
            )
            for name in EVAL_PLOTS
        ],
    params:
        config=stage_config("alignment", "training", "matching"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
        output_dir=lambda wildcards: f"{OUT}/evaluation/{wildcards.split}",
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/evaluate/{{split}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=20,
    message:
        "Evaluating the {wildcards.split} split -> {output.metrics} (log: {log})"
    shell:
        "cryovae evaluate --config {params.config:q} --embeddings {input.embeddings} "
        "--split-dir {params.split_dir} --affinity {input.affinity} --model {input.model} "
        "--history {input.history} --frames {input.frames} --output-dir {params.output_dir} 2> {log} || (tail -n 1 {log} >&2; exit 1)"
