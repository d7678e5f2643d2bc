# Training the affinity-VAE and encoding every split with the final model.


rule train:
    input:
        train=split_path("train"),
        val=split_path("val"),
        affinity=f"{OUT}/affinity/affinity.csv",
        maps=seen_references(),
        # training.semi_supervised.unlabelled: splits trained on without labels (ss-rVAE)
        unlabelled=unlabelled_splits(),
        # training.shape_frame: matched: every split's template-matched poses
        frames=frame_matches(["train", "val", *CFG.training.semi_supervised.unlabelled]),
    output:
        model=f"{OUT}/model/model.pt",
        history=f"{OUT}/model/history.csv",
        curves=report(
            f"{OUT}/model/loss_curves.png", caption="../report/training_curves.rst", category="Training"
        ),
    params:
        config=stage_config("training", "simulation", "alignment"),
        train_dir=lambda wildcards, input: folder_of(input.train),
        val_dir=lambda wildcards, input: folder_of(input.val),
        output_dir=lambda wildcards, output: os.path.dirname(output.model),
        frames=frame_options(
            train_match="train", val_match="val", unlabelled_matches=CFG.training.semi_supervised.unlabelled
        ),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/train.log",
    threads: CFG.training.threads
    resources:
        mem_mb=mem_mb(8000),
        runtime=240,
        gpu=1 if CFG.training.device != "cpu" else 0,
    message:
        "Training the affinity-VAE: the longest step; per-epoch progress in {log}"
    shell:
        # The device line tells where the job ran (a cluster's GPU node, or this machine).
        "(echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-unset}}; "
        "cryovae train --config {params.config:q} --train-dir {params.train_dir} "
        "--val-dir {params.val_dir} --affinity {input.affinity} --maps {input.maps} "
        "--unlabelled-dirs {input.unlabelled} {params.frames} --output-dir {params.output_dir}) "
        "> {log} 2>&1 || (tail -n 1 {log} >&2; exit 1)"


rule embed:
    input:
        model=f"{OUT}/model/model.pt",
        split=split_input,
        frames=lambda wildcards: frame_matches([wildcards.split]),
    output:
        f"{OUT}/embeddings/latent/{{split}}.npz",
    params:
        config=stage_config("training", "simulation"),
        split_dir=lambda wildcards: split_dir(wildcards.split),
        frames=lambda wildcards: frame_options(match=wildcards.split),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/embed/{{split}}.log",
    threads: 2
    resources:
        mem_mb=mem_mb(4000),
        runtime=60,
    message:
        "Encoding the {wildcards.split} split (progress: {log})"
    shell:
        "cryovae embed --config {params.config:q} --model {input.model} --split-dir {params.split_dir} "
        "{params.frames} --output {output} 2> {log} || (tail -n 1 {log} >&2; exit 1)"


rule pose_network:
    input:
        maps=expand(f"{OUT}/maps/{{cls}}.mrc", cls=SEEN),
    output:
        model=f"{OUT}/model/pose_network.pt",
        history=f"{OUT}/model/pose_network_history.csv",
    params:
        config=stage_config("pose_network", "simulation", "alignment"),
    conda:
        CONDA_ENV
    log:
        f"{OUT}/logs/pose_network.log",
    threads: CFG.pose_network.threads
    resources:
        mem_mb=mem_mb(4000),
        runtime=240,
        gpu=1 if CFG.pose_network.device != "cpu" else 0,
    message:
        "Training the pose network on particles simulated on the fly: a long step; progress in {log}"
    shell:
        "(echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-unset}}; "
        "cryovae train-pose --config {params.config:q} --maps {input.maps} --output {output.model} "
        "--history {output.history}) > {log} 2>&1 || (tail -n 1 {log} >&2; exit 1)"
