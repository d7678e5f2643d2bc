"""Which evidence classifies and flags unknowns: the class model refitted on feature subsets of a finished run.

    python benchmarks/bench_features.py RUN_DIR [--config CONFIG]

RUN_DIR is a workflow output folder with embeddings/latent/{train,val,test}.npz and
embeddings/match/{train,val,test}.npz (e.g. benchmarks/out/shrec2021).  For every subset of
latent / template / fit the class model is fitted on train, its unknown threshold set on val
(the run's accept fraction), and scored on test: accuracy (unknown calls count as wrong),
accuracy of the nearest class, and the unseen AUROC of that subset's unknown score (the
model's smallest Mahalanobis distance; what ``classification.unknown_features`` chooses).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cryovae.classify import ClassModel, features, load_latents, load_matches
from cryovae.config import load_config


def load_run(run_dir: Path, config) -> dict[str, tuple[dict, dict]]:
    """(latents, match) of the train, val and test splits of a finished run."""
    splits = {}
    for split in ("train", "val", "test"):
        # the training split's latents cut to the particles its match file holds (matching.train_per_class)
        splits[split] = load_matches(run_dir / "embeddings/match" / f"{split}.npz",
                                     load_latents(run_dir / "embeddings/latent" / f"{split}.npz"), config.seen_classes)
    return splits


def score_subset(splits: dict[str, tuple[dict, dict]], subset: list[str], config) -> dict[str, float]:
    """The class model on features ``subset`` fitted on train, its unknown threshold set on val,
    scored on test: accuracy (unknown calls wrong), nearest-class accuracy, unseen AUROC."""
    x = {s: features(list(subset), *splits[s]) for s in splits}
    model = ClassModel.fit(x["train"], splits["train"][0]["class_name"].astype(str))
    _, val_score = model.predict(x["val"])
    threshold = np.quantile(val_score, config.classification.accept_fraction)
    probs, score = model.predict(x["test"])
    truth = splits["test"][0]["class_name"].astype(str)
    known = np.isin(truth, config.seen_classes)
    nearest = model.classes[probs.argmax(1)]
    called = np.where(score > threshold, "unknown", nearest)
    return {"accuracy": float(np.mean(called[known] == truth[known])),
            "nearest": float(np.mean(nearest[known] == truth[known])),
            "auroc": float(roc_auc_score(~known, score)) if (~known).any() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--config", type=Path, default=None, help="default: RUN_DIR/bench_config.yaml")
    args = ap.parse_args()
    config = load_config(args.config or args.run_dir / "bench_config.yaml")
    splits = load_run(args.run_dir, config)
    known = np.isin(splits["test"][0]["class_name"].astype(str), config.seen_classes)
    print(f"\n## Classifier features on {args.run_dir} (test: {known.sum()} seen, {(~known).sum()} unseen)")
    for size in (1, 2, 3):
        for subset in itertools.combinations(("latent", "template", "fit"), size):
            r = score_subset(splits, list(subset), config)
            print(f"- {' + '.join(subset):24s} accuracy {r['accuracy']:.3f}, nearest class {r['nearest']:.3f}, "
                  f"unseen AUROC {r['auroc']:.3f}")


if __name__ == "__main__":
    main()
