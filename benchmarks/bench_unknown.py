"""Unknowns of tomogram splits: the distance model against the fit mixture, on a finished run.

    python benchmarks/bench_unknown.py OUTPUT_DIR [--splits sim_00 sim_01 ...]

For each extracted split with truth (``extracted/{split}/particles.star``) of a workflow run
in OUTPUT_DIR (its ``bench_config.yaml``, model/classifier.npz, embeddings/latent and match
files), both unknown models are refitted in-process on the split's own particles, from the
simulated classifier, as ``cryovae adapt`` does:

- distance: the adapted Gaussian model over ``classification.unknown_features`` with its
  chi-squared threshold (``unknown_model: distance``); beside it the same score with the
  threshold that keeps 95 % of the split's seen particles, chosen with the truth (a ceiling
  for any threshold on that score, not a method);
- fit_mixture: P(unknown | fit, nearest class) at ``unknown_posterior`` 0.5 and 0.8.

Printed per split: seen-class accuracy (unknown counts as wrong), nearest-class accuracy,
unknown AUROC (unseen and novel against seen), the fraction of seen particles called unknown
and of unknowns flagged; then the mean fit of each true class.  Append to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path
import os

import numpy as np
import starfile
from cryovae import classify as C
from cryovae.config import load_config
from sklearn.metrics import roc_auc_score


def split_truth(out: Path, split: str, particle_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true class (n,), novel (n,) bool) in the latent file's particle order."""
    table = starfile.read(out / "extracted" / split / "particles.star", always_dict=True)["particles"]
    novel = table["cryovaeNovel"] > 0 if "cryovaeNovel" in table.columns else np.zeros(len(table), bool)
    by_id = dict(zip(table["cryovaeParticleId"].astype(str), zip(table["cryovaeClassName"].astype(str), novel)))
    rows = [by_id[i] for i in particle_id.astype(str)]
    return np.array([r[0] for r in rows]), np.array([bool(r[1]) for r in rows])


def row(name: str, nearest, score, threshold, true, novel, seen_classes, unseen) -> str:
    is_seen = np.isin(true, seen_classes) & ~novel
    is_unknown = np.isin(true, unseen) | novel
    called = np.where(score > threshold, C.UNKNOWN, nearest)
    both = is_seen | is_unknown
    auroc = roc_auc_score(is_unknown[both], score[both]) if is_unknown.any() and is_seen.any() else float("nan")
    return (f"| {name} | {np.mean(called[is_seen] == true[is_seen]):.3f} | {np.mean(nearest[is_seen] == true[is_seen]):.3f} "
            f"| {auroc:.3f} | {np.mean(called[is_seen] == C.UNKNOWN):.3f} | {np.mean(called[is_unknown] == C.UNKNOWN):.3f} |")


def bench_split(out: Path, config, split: str) -> list[str]:
    cc = config.classification
    latents, match = out / "embeddings/latent" / f"{split}.npz", out / "embeddings/match" / f"{split}.npz"
    data, matches = C.load_matches(match, C.load_latents(latents), config.seen_classes)
    x, x_unknown = C.features(cc.features, data, matches), C.features(cc.unknown_features, data, matches)
    fit = C.fit_column(matches, latents)
    true, novel = split_truth(out, split, data["particle_id"])
    base = C.Classifier.load(out / "model/classifier.npz")
    classes, _ = C.adapt_model(base.classes, x, cc.adapt_prior_counts, cc.adapt_unknown_fraction, cc.accept_fraction)
    unknown, _ = C.adapt_model(base.unknown, x_unknown, cc.adapt_prior_counts, cc.adapt_unknown_fraction,
                               cc.accept_fraction)
    k = C.nearest_index(config, classes, x, matches)
    nearest = classes.classes[k]
    args = (true, novel, config.seen_classes, config.unseen)
    _, distance = unknown.predict(x_unknown)
    seen = np.isin(true, config.seen_classes) & ~novel
    lines = [f"**{split}** ({len(true)} particles; {int(seen.sum())} seen, {int((~seen).sum())} unseen, novel or unmatched)", "",
             "| unknown model | seen accuracy | nearest class | unknown AUROC | seen called unknown | unknowns flagged |",
             "|---|---|---|---|---|---|",
             row("distance, chi-squared threshold", nearest, distance, unknown.threshold, *args),
             row("distance, threshold keeping 95 % of seen (truth)", nearest, distance,
                 np.quantile(distance[seen], 0.95), *args)]
    for threshold in (0.5, 0.8):
        mixture = C.FitMixture.fit(fit, k, len(classes.classes), cc.adapt_prior_counts, cc.adapt_unknown_fraction,
                                   threshold)
        lines.append(row(f"fit_mixture, P(unknown) > {threshold}", nearest, mixture.posterior(fit, k), threshold, *args))
    groups = [(c, true == c) for c in config.class_names] + [("novel", novel)]
    lines += ["", "mean fit by true class: " + ", ".join(f"{c} {fit[sel].mean():.3f}" for c, sel in groups if sel.any()), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--splits", nargs="*", help="extracted splits (default: every one with latents)")
    args = parser.parse_args()
    out = args.output_dir
    config = load_config(out / "bench_config.yaml")
    splits = args.splits or sorted(p.stem for p in (out / "embeddings/latent").glob("*.npz")
                                   if (out / "extracted" / p.stem / "particles.star").is_file())
    print(f"## Unknowns of tomogram splits ({out}; {date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n")
    for split in splits:
        print("\n".join(bench_split(out, config, split)))


if __name__ == "__main__":
    main()
