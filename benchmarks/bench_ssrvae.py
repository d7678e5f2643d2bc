"""The ss-rVAE distribution-shift experiment on card suits, cryovae beside pyroVED's ssiVAE.

As in Ziatdinov, Kalinin et al. (Digital Discovery 2024): a few labelled images with weak
rotational disorder, many unlabelled ones with strong rotational and positional disorder, and a
validation set drawn like the unlabelled ones.  Defaults (the issue's):

- labelled: 200 per class, rotation ±5°, shear 15°, scale 1–1.3, no translation;
- unlabelled: 3,000 per class, rotation ±60°, translation 0.1 of the edge (same shear, scale);
- validation: 1,000 per class drawn like the unlabelled images, never seen in training;
- a held-out labelled set (50 per class, the labelled distribution) is what training validates
  on, so nothing about the validation set steers training.

Each variant trains cryovae's model (``training.semi_supervised``) and is scored on the
validation set from the classifier head's probabilities (``embed``):

- ``supervised``: the labelled images only;
- ``semi``: plus the unlabelled images through the M2 ELBO;
- ``supervised_aug`` / ``semi_aug``: the same with the model's rotational invariance imposed by
  turning (±180°) and shifting (±``--aug-shift`` px) every training image on the fly.

Semi-supervised batches hold ``--labelled-fraction`` labelled images (cycled); the labelled-only
variants train as many more epochs as make the same number of optimiser steps.

``--peer PYTHON`` runs ``benchmarks/ssrvae_peer.py`` (pyroVED's ssiVAE, in its own environment)
on exactly the same arrays.  Writes ``summary.json`` and prints a Markdown table.

    python benchmarks/bench_ssrvae.py --output /tmp/ssrvae --epochs 20 --peer /work/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cryovae.affinity import write_affinity_csv
from cryovae.config import validate_config
from cryovae.embed import encode_split
from cryovae.glyphs import glyph_dataset, shape_affinity
from cryovae.images2d import write_image_split
from cryovae.train import train

VARIANTS = {
    "supervised": (False, False),   # (unlabelled term, augmentation)
    "semi": (True, False),
    "supervised_aug": (False, True),
    "semi_aug": (True, True),
}


def make_data(args) -> dict:
    """The four sets as glyph datasets (seeded apart)."""
    labelled = dict(rotation_deg=(-5.0, 5.0), shear_deg=15.0, scale=(1.0, 1.3), translation=0.0)
    shifted = dict(rotation_deg=(-60.0, 60.0), shear_deg=15.0, scale=(1.0, 1.3), translation=0.1)
    common = dict(size=args.size, render_size=args.render_size, noise_sd=args.noise)
    return {
        "train": glyph_dataset("suits", args.labelled, seed=[args.seed, 1], **labelled, **common),
        "holdout": glyph_dataset("suits", 50, seed=[args.seed, 4], **labelled, **common),
        "unlabelled": glyph_dataset("suits", args.unlabelled, seed=[args.seed, 2], **shifted, **common),
        "validation": glyph_dataset("suits", args.validation, seed=[args.seed, 3], **shifted, **common),
    }


def write_splits(data: dict, root: Path) -> dict[str, Path]:
    folders = {}
    for name, ds in data.items():
        folders[name] = root / "splits" / name
        names = [ds.class_names[i] for i in ds.labels]
        write_image_split(folders[name], ds.images, names, ds.class_names, 1.0, 4096,
                          psi_deg=ds.psi_deg, shift_px=ds.shift_px)
    return folders


def variant_config(args, class_names: list[str], unlabelled: bool, augment: bool):
    semi = {"classifier": True, "classifier_weight": args.alpha, "decoded_classes": args.decoded_classes,
            "classifier_input": args.classifier_input, "labelled_fraction": args.labelled_fraction}
    if augment:
        semi.update(augment_rotation_deg=180.0, augment_shift_px=args.aug_shift)
    # a labelled-only variant sees (labelled + unlabelled) / labelled times fewer images an epoch:
    # it trains that many more epochs, so that every variant takes the same optimiser steps
    steps = args.unlabelled / ((1 - args.labelled_fraction) * args.labelled)   # labelled-only epochs per one
    epochs = args.epochs if unlabelled else args.epochs * round(steps)
    return validate_config({
        "structures": {n: f"demo:{n}" for n in class_names}, "box_size": args.size, "seed": args.seed,
        "training": {"epochs": epochs, "batch_size": args.batch_size, "latent_dims": args.latent_dims,
                     "channels": [16, 32, 64], "decoder": args.decoder, "pose_weight": 0.0, "beta": 0.01, "gamma": args.gamma,
                     "learning_rate": args.learning_rate, "threads": args.threads, "device": "cpu",
                     "semi_supervised": semi},
    })


def per_class_accuracy(predicted: np.ndarray, truth: np.ndarray, class_names: list[str]) -> dict:
    per = {c: float((predicted[truth == i] == i).mean()) for i, c in enumerate(class_names)}
    confusion = np.zeros((len(class_names),) * 2, dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    return {"per_class": per, "mean_per_class": float(np.mean(list(per.values()))),
            "overall": float((predicted == truth).mean()), "confusion": confusion.tolist()}


def run_variant(args, name: str, folders: dict, affinity: Path, class_names: list[str], truth: np.ndarray) -> dict:
    unlabelled, augment = VARIANTS[name]
    cfg = variant_config(args, class_names, unlabelled, augment)
    out = args.output / "runs" / name
    started = time.perf_counter()
    train(cfg, folders["train"], folders["holdout"], affinity, out,
          unlabelled_dirs=[folders["unlabelled"]] if unlabelled else None)
    seconds = time.perf_counter() - started
    arrays = encode_split(cfg, out / "model.pt", folders["validation"])
    order = [list(arrays["classifier_class_names"]).index(c) for c in class_names]
    predicted = arrays["class_probabilities"][:, order].argmax(1)
    result = per_class_accuracy(predicted, truth, class_names)
    result.update(training_seconds=seconds, epochs=cfg.training.epochs)
    return result


def run_peer(args, data: dict) -> dict:
    """pyroVED's ssiVAE on the same arrays (its own environment; benchmarks/ssrvae_peer.py)."""
    arrays = args.output / "peer_data.npz"
    np.savez(arrays, labelled_x=data["train"].images, labelled_y=data["train"].labels,
             unlabelled_x=data["unlabelled"].images, val_x=data["validation"].images,
             val_y=data["validation"].labels, class_names=np.array(data["train"].class_names))
    report = args.output / "peer.json"
    command = [args.peer, str(Path(__file__).with_name("ssrvae_peer.py")), "--data", str(arrays),
               "--output", str(report), "--seed", str(args.seed)]
    if args.peer_epochs:
        command += ["--epochs", str(args.peer_epochs)]
    subprocess.run(command, check=True)
    return json.loads(report.read_text())


def table(results: dict, class_names: list[str]) -> str:
    head = "| model | " + " | ".join(class_names) + " | mean per class | overall | training s |"
    rows = [head, "|" + "---|" * (len(class_names) + 4)]
    for name, r in results.items():
        per = r["per_class"]
        rows.append(f"| {name} | " + " | ".join(f"{per[c]:.3f}" for c in class_names)
                    + f" | {r['mean_per_class']:.3f} | {r['overall']:.3f} | {r.get('training_seconds', 0):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--labelled", type=int, default=200, help="labelled images per class")
    ap.add_argument("--unlabelled", type=int, default=3000, help="unlabelled images per class")
    ap.add_argument("--validation", type=int, default=1000, help="validation images per class")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--render-size", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--latent-dims", type=int, default=4)
    ap.add_argument("--decoder", default="cnn", choices=["cnn", "splat"],
                    help="the model's decoder (cnn: the one the recorded results were measured with)")
    ap.add_argument("--gamma", type=float, default=1.0, help="affinity loss weight (shape affinity of the suits)")
    ap.add_argument("--alpha", type=float, default=30.0,
                    help="classifier_weight (the ss-rVAE notebook's aux_loss_multiplier is 30)")
    ap.add_argument("--decoded-classes", type=int, default=0, help="top-k classes of the unlabelled ELBO (0: all)")
    ap.add_argument("--classifier-input", default="canonical", choices=["canonical", "trunk"])
    ap.add_argument("--labelled-fraction", type=float, default=0.5)
    ap.add_argument("--aug-shift", type=float, default=5.0, help="augmentation shift, pixels per axis")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", help="python of the environment with pyroved (runs benchmarks/ssrvae_peer.py)")
    ap.add_argument("--peer-epochs", type=int, default=0, help="peer epochs (0: the published notebook's)")
    args = ap.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    class_names = list(data["train"].class_names)
    folders = write_splits(data, args.output)
    affinity = args.output / "affinity.csv"
    write_affinity_csv(affinity, class_names, shape_affinity(data["train"].canonical))
    truth = data["validation"].labels
    results = {}
    for name in args.variants:
        results[name] = run_variant(args, name, folders, affinity, class_names, truth)
        print(f"{name}: mean per-class accuracy {results[name]['mean_per_class']:.3f}", file=sys.stderr)
    if args.peer:
        results["pyroved_ssiVAE"] = run_peer(args, data)
    summary = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(results, class_names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
