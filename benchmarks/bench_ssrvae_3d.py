"""ss-rVAE in 3D: labelled simulated particles, unlabelled particles of a tomogram made as real ones are.

Takes a finished workflow run that has simulated splits and simulated tomograms (for example the
``bench_workflow.py config/shrec2021.yaml --split sim_00 --set tomogram_simulation.tomograms=2``
run of benchmarks/RESULTS.md) and trains the classifier head twice on the run's own splits, with
the run's config and ``training.semi_supervised.classifier: true``:

- ``supervised``: the simulated training split only;
- ``semi``: plus the particles of ``--unlabelled`` tomograms through the M2 ELBO (their labels and
  poses stripped before training; see ``ParticleData.without_labels``).

Each model then encodes the tomogram splits and the simulated test split; the figures come from
the classifier head alone (argmax of q(y|x); unknown score 1 - max q), scored against the truth
the splits carry:

- seen-class accuracy (seen-class particles whose argmax is their class);
- unknown AUROC (unseen classes and decoys against seen particles);
- on a tomogram that was not in training (``sim_01`` when only ``sim_00`` is unlabelled), the same,
  so the gain is not only transductive.

With the run's ``training.shape_frame: matched`` every split is read in its template-matched pose
(``embeddings/match/{split}.npz`` of the run), as the workflow's train and embed rules read them.

    python benchmarks/bench_ssrvae_3d.py --run-dir /work/bench-out/shrec_tomo --unlabelled sim_00 \
        --evaluate sim_00 sim_01 test --epochs 10 --output /tmp/ssrvae3d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from cryovae.config import validate_config
from cryovae.embed import encode_split
from cryovae.train import train


def split_folder(run: Path, split: str) -> Path:
    simulated = run / "subtomograms" / split
    return simulated if simulated.is_dir() else run / "extracted" / split


def match(run: Path, config, split: str) -> Path | None:
    """The split's template-matching output where the model reads matched frames, else None."""
    return run / "embeddings" / "match" / f"{split}.npz" if config.training.shape_frame == "matched" else None


def head_metrics(arrays: dict, seen: list[str]) -> dict:
    """Accuracy and unknown AUROC of the classifier head on one encoded split (with truth)."""
    names = list(arrays["classifier_class_names"])
    probs = arrays["class_probabilities"]
    truth = arrays["class_name"].astype(str)
    predicted = np.array(names)[probs.argmax(1)]
    is_seen = np.isin(truth, seen)
    per_class = {c: float((predicted[truth == c] == c).mean()) for c in seen if (truth == c).any()}
    unknown_score = 1.0 - probs.max(1)
    novel = ~is_seen & (truth != "unknown")
    auroc = float(roc_auc_score(novel[is_seen | novel], unknown_score[is_seen | novel])) \
        if novel.any() and is_seen.any() else None
    return {"seen_accuracy": float((predicted[is_seen] == truth[is_seen]).mean()), "per_class": per_class,
            "unknown_auroc": auroc, "n_seen": int(is_seen.sum()), "n_novel": int(novel.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished workflow output folder")
    ap.add_argument("--unlabelled", nargs="+", required=True, help="tomogram splits trained on without labels")
    ap.add_argument("--evaluate", nargs="+", required=True, help="splits the heads are scored on")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--decoded-classes", type=int, default=3)
    ap.add_argument("--classifier-input", default="auto", choices=["auto", "canonical", "trunk"])
    ap.add_argument("--variants", nargs="+", default=["supervised", "semi"], choices=["supervised", "semi"])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    raw = yaml.safe_load((args.run_dir / "bench_config.yaml").read_text())
    raw["training"] = {**raw.get("training", {}), "epochs": args.epochs, "semi_supervised": {
        "classifier": True, "decoded_classes": args.decoded_classes, "classifier_input": args.classifier_input}}
    config = validate_config(raw)
    seen = config.seen_classes
    results = {}
    for variant in args.variants:
        out = args.output / variant
        unlabelled = [split_folder(args.run_dir, s) for s in args.unlabelled] if variant == "semi" else None
        frames = {"train_match": match(args.run_dir, config, "train"), "val_match": match(args.run_dir, config, "val"),
                  "unlabelled_matches": [match(args.run_dir, config, s) for s in args.unlabelled]
                  if variant == "semi" and config.training.shape_frame == "matched" else None}
        started = time.perf_counter()
        train(config, split_folder(args.run_dir, "train"), split_folder(args.run_dir, "val"),
              args.run_dir / "affinity" / "affinity.csv", out, maps=sorted((args.run_dir / "maps").glob("*.mrc")),
              unlabelled_dirs=unlabelled, **frames)
        results[variant] = {"training_seconds": time.perf_counter() - started}
        for split in args.evaluate:
            arrays = encode_split(config, out / "model.pt", split_folder(args.run_dir, split),
                                  match(args.run_dir, config, split))
            results[variant][split] = head_metrics(arrays, seen)
            print(f"{variant} {split}: {results[variant][split]}", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "summary.json").write_text(json.dumps({"settings": vars(args) | {
        "run_dir": str(args.run_dir), "output": str(args.output)}, "results": results}, indent=2, default=str))
    for split in args.evaluate:
        print(f"| {split} | " + " | ".join(
            f"{v}: acc {results[v][split]['seen_accuracy']:.3f}, AUROC {results[v][split]['unknown_auroc'] or float('nan'):.3f}"
            for v in args.variants) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
