"""Interpretable models of an existing run's latents: accuracy and complexity, and the engines.

For every run given (a workflow output folder holding embeddings/, embeddings/latent/train.npz,
model/model.pt, affinity/ and the split's particles.star) it runs the interpret stage on one
split into ``{run}/bench_interpret/{split}/`` and prints the black-box, sparse and symbolic
accuracies, their complexity and the disentanglement scores side by side (e.g. a run with the
affinity loss beside the same run with gamma = 0, a plain beta-VAE).

With ``--engines`` it also fits, for every seen class of the first run, its one-vs-rest
indicator from its sparse dimensions with Operon (pyoperon, the engine the stage uses) and
with gplearn (installed separately: ``pip install gplearn``), timing both on the same data.

    python benchmarks/bench_interpret.py --config CONFIG.yaml --run gamma2=OUT2 --run gamma0=OUT0 --engines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np


def run_stage(config, run: Path, split: str) -> tuple[dict, float]:
    from cryovae.interpret import interpret

    out = run / "bench_interpret" / split
    candidates = [run / "subtomograms" / split, run / "images" / split, run / "extracted" / split]
    split_dir = next((c for c in candidates if (c / "particles.star").exists()), candidates[0])
    start = time.perf_counter()
    interpret(config, run / f"embeddings/{split}.csv", split_dir, run / "embeddings/latent/train.npz",
              run / "affinity/affinity.csv", run / "model/model.pt", out)
    return json.loads((out / "interpretation.json").read_text()), time.perf_counter() - start


def summary_row(name: str, r: dict, seconds: float) -> str:
    d, bb, sp, sy = r["disentanglement"], r["black_box"], r["sparse"]["kept"], r["symbolic"]
    pose = [d["mig"][f] for f in d["factors"] if f.startswith(("angle_", "shift_"))]
    return (f"| {name} | {bb['accuracy']:.3f} ({bb['n_parameters']} par.) | {sp['accuracy']:.3f} "
            f"({sp['fraction_of_black_box']:.3f}; {sp['dims_per_class']} dims, {sp['n_parameters']} par.) | "
            f"{sy['accuracy']:.3f} ({sy['fraction_of_black_box']:.3f}; total length {sy['total_length']}) | "
            f"{d['mig_class']:.3f} | {d['mig_class_indicators_mean']:.3f} | {np.mean(pose):.3f} | {seconds:.0f} s |")


def compare_engines(config, run: Path, split: str, result: dict, n_classes: int) -> list[str]:
    """Operon and gplearn on each class's sparse dims: time, one-vs-rest accuracy, length."""
    from gplearn.genetic import SymbolicRegressor

    from cryovae.classify import load_latents
    from cryovae.evaluate import read_embeddings
    from cryovae.symbolic import fit_symbolic

    opt, seed = config.interpretation, config.seed
    train = load_latents(run / "embeddings/latent/train.npz")
    z_train, y_train = train["latent_mean"].astype(float), train["class_name"].astype(str)
    table, cols = read_embeddings(run / f"embeddings/{split}.csv", config)
    truth = load_latents(run / f"embeddings/latent/{split}.npz")["class_name"].astype(str)
    seen = np.isin(truth, config.seen_classes)
    centre, scale = z_train.mean(0), z_train.std(0) + 1e-8
    zt, ze, ye = (z_train - centre) / scale, (table[cols].to_numpy(float)[seen] - centre) / scale, truth[seen]
    rows = np.sort(np.random.default_rng(seed).permutation(len(zt))[: opt.symbolic_max_particles])
    from sklearn.metrics import roc_auc_score

    lines = ["| class | Operon s | Operon acc | Operon AUROC | Operon length | gplearn s | gplearn acc | gplearn AUROC "
             "| gplearn length |", "|---|---|---|---|---|---|---|---|---|"]
    for k, c in enumerate(sorted(set(y_train.tolist()))[:n_classes]):
        dims = result["sparse"]["ranking"][c][: opt.max_dims]
        x, y = zt[rows][:, dims], (y_train[rows] == c).astype(float)
        t0 = time.perf_counter()
        fit = fit_symbolic(x, y, [f"z{j}" for j in dims], seed + k, opt.symbolic_generations,
                           opt.symbolic_population, opt.symbolic_max_length)
        t1 = time.perf_counter()
        gp = SymbolicRegressor(population_size=opt.symbolic_population, generations=opt.symbolic_generations,
                               function_set=("add", "sub", "mul", "div"), parsimony_coefficient=0.001,
                               random_state=seed + k, n_jobs=1).fit(x, y)
        t2 = time.perf_counter()
        score_op, score_gp = fit.chosen.evaluate(fit.regressor, ze[:, dims]), gp.predict(ze[:, dims])
        acc_op, acc_gp = np.mean((score_op > 0.5) == (ye == c)), np.mean((score_gp > 0.5) == (ye == c))
        auc_op, auc_gp = roc_auc_score(ye == c, score_op), roc_auc_score(ye == c, score_gp)
        lines.append(f"| {c} | {t1 - t0:.1f} | {acc_op:.3f} | {auc_op:.3f} | {fit.chosen.length} | {t2 - t1:.1f} | "
                     f"{acc_gp:.3f} | {auc_gp:.3f} | {gp._program.length_} |")
    return lines


def main() -> None:
    from cryovae.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the runs were made with")
    parser.add_argument("--run", action="append", required=True, help="NAME=OUTPUT_DIR (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--engines", action="store_true", help="also time Operon against gplearn")
    parser.add_argument("--engine-classes", type=int, default=1000, help="classes in the engine comparison (first N)")
    parser.add_argument("--skip-stage", action="store_true", help="read {run}/bench_interpret/{split} instead of running it")
    args = parser.parse_args()
    config = load_config(args.config)
    print(f"machine: {os.cpu_count()} cores; {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| run | black box | sparse (fraction) | symbolic (fraction) | MIG class | MIG is_class mean "
          "| MIG pose/shift mean | time |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for spec in args.run:
        name, folder = spec.split("=", 1)
        if args.skip_stage:
            path = Path(folder) / "bench_interpret" / args.split / "interpretation.json"
            result, seconds = json.loads(path.read_text()), float("nan")
        else:
            result, seconds = run_stage(config, Path(folder), args.split)
        results.append((Path(folder), result))
        print(summary_row(name, result, seconds), flush=True)
    if args.engines:
        print("\n".join(compare_engines(config, results[0][0], args.split, results[0][1], args.engine_classes)))


if __name__ == "__main__":
    main()
