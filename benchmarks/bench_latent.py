"""What the affinity-VAE's latent carries on its own: the figures of a finished run, one table row per run.

    python benchmarks/bench_latent.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a workflow output folder (or a copy of its embeddings/, evaluation/ and
bench_config.yaml).  Per run, from the latents alone (no template matching): the class model
fitted on the training split's latents, its unknown threshold set on val, scored on test
(accuracy with unknown calls counted wrong, nearest-class accuracy, unseen AUROC of its
Mahalanobis score); from evaluation/test/metrics.json: the Spearman correlation of class-mean
latent cosine similarity with the SOAP affinity, where each unseen class lands (rank, in latent
cosine order, of the seen class the affinity ranks nearest: 1 = as the affinity says), and the
network's own pose error (median, degrees).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_features import load_run, score_subset
from cryovae.config import load_config


def row(run_dir: Path) -> str:
    config = load_config(run_dir / "bench_config.yaml")
    latent = score_subset(load_run(run_dir, config), ["latent"], config)
    metrics = json.loads((run_dir / "evaluation/test/metrics.json").read_text())
    placement = metrics.get("unseen_placement") or {}
    ranks = ", ".join(f"{name} → {p['nearest_seen_in_latent']} (rank {p['affinity_nearest_rank_in_latent']} "
                      f"of {p['nearest_seen_by_affinity']})" for name, p in placement.items())
    t = config.training
    return (f"| {run_dir.name} | {t.shape_frame} | {t.gamma:g} | {latent['accuracy']:.3f} | {latent['nearest']:.3f} | "
            f"{latent['auroc']:.3f} | {metrics['affinity_spearman']:.3f} | {ranks} | "
            f"{metrics['network_pose_error_median_deg']:.1f}° |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", type=Path, nargs="+")
    args = ap.parse_args()
    print("| run | shape frame | γ | latent accuracy | latent nearest class | latent unseen AUROC | Spearman "
          "(latent, affinity) | unseen placement | network pose median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run_dir in args.run_dirs:
        print(row(run_dir))


if __name__ == "__main__":
    main()
