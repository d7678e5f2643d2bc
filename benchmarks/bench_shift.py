"""Does the classifier survive the shift from simulated training particles to another program's particles?

    python benchmarks/bench_shift.py [--seeds 0 1] [--per-class 40] [--threads 2]

Source (what the classifier is fitted on): cryovae's own simulation at SNR 0.5, defocus
2–5 µm, from cryovae's maps of the SHREC PDB entries (``maps.structure_to_map``).
Target (what it is judged on): particles simulated from the polnet 10 Å maps
(../shared/data/shrec2021/maps_10A) at SNR 0.1 and defocus 4–7 µm: the eight seen classes,
the two unseen ones (1s3x, 3gl1) and three decoys no config names (4cr2, 4v94, 5mrc).
Both are template-matched (``match.Matcher``) against cryovae's maps of the seen classes;
the class model sees template + fit, the unknown score the same or the fit alone.

Alternatives: (a) no adaptation; (b) EM adaptation on the target (``classify.adapt_model``);
(c) scale-free features only (template_relative + margin), no adaptation; (b+c) both;
(d) training particles simulated at the target's SNR and defocus, no adaptation.
Per alternative and seed: seen accuracy (unknown calls count as wrong), nearest-class
accuracy, unknown AUROC (seen against unseen + decoys), fraction of seen called unknown,
fraction of novel flagged.  Match outputs are cached in benchmarks/out/bench_shift/.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from cryovae.classify import ClassModel, adapt_model, features
from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.maps import structure_to_map
from cryovae.match import CHUNK, Matcher
from cryovae.rotations import random_rotations
from cryovae.simulate import ParticleDraws, simulate_volumes
from scipy import ndimage
from sklearn.metrics import roc_auc_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "shrec2021"
OUT = Path(__file__).resolve().parent / "out" / "bench_shift"
SEEN = ["1bxn", "1qvr", "1u6g", "2cg9", "3cf3", "3d2f", "3h84", "3qm1"]
UNSEEN = ["1s3x", "3gl1"]
DECOYS = ["4cr2", "4v94", "5mrc"]
BOX, PIXEL = 32, 10.0
SOURCE = {"snr": 0.5, "defocus_range_um": (2.0, 5.0)}
TARGET = {"snr": 0.1, "defocus_range_um": (4.0, 7.0)}
FEATURES = {"raw": ["template", "fit"], "scale-free": ["template_relative", "margin"]}


def cryovae_maps() -> np.ndarray:
    """cryovae's maps of the seen classes from the PDB entries (cached): (8, B, B, B)."""
    path = OUT / "cryovae_maps.npy"
    if not path.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        np.save(path, np.stack([structure_to_map(SHARED / "pdb" / f"{c}.pdb", PIXEL, BOX) for c in SEEN]))
    return np.load(path)


def polnet_map(name: str) -> np.ndarray:
    """A polnet 10 Å map cut to the box about its centre of mass: (B, B, B) float32."""
    volume = mrcfile.read(SHARED / "maps_10A" / f"{name}.mrc").astype(np.float32)
    pad = np.pad(volume, BOX)
    centre = np.round(ndimage.center_of_mass(np.clip(pad, 0, None))).astype(int)
    return pad[tuple(slice(c - BOX // 2, c + BOX // 2) for c in centre)]


def config_for(sim: dict) -> object:
    return validate_config({"structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX,
                            "pixel_size_angstrom": PIXEL, "simulation": sim})


def simulate(maps: np.ndarray, per_class: int, sim: dict, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volumes (n, B, B, B), class index (n,), defocus µm (n,)) at the settings ``sim``."""
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(len(maps)), per_class)
    n = len(index)
    draws = ParticleDraws(index, random_rotations(n, rng), rng.uniform(-1, 1, (n, 3)),
                          rng.uniform(*sim["defocus_range_um"], n))
    return simulate_volumes(config_for(sim), maps, index, draws, rng), index, draws.defocus_um


def match_set(matcher: Matcher, volumes: np.ndarray, defocus_um: np.ndarray) -> dict[str, np.ndarray]:
    blocks = []
    for first in range(0, len(volumes), CHUNK):
        rows = slice(first, min(len(volumes), first + CHUNK))
        ctf = ctf_3d(torch.as_tensor(defocus_um[rows]), BOX, PIXEL, 300.0, 2.7, 0.07)
        blocks.append(matcher.match(volumes[rows], ctf))
    return {k: np.concatenate([b[k] for b in blocks]) for k in ("scores", "fit")}


def particle_sets(seed: int, per_class: int, matcher: Matcher, references: np.ndarray) -> dict[str, dict]:
    """Matched sets (cached per seed): source train/val at the source and at the target settings, target."""
    path = OUT / f"sets_seed{seed}_n{per_class}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: {k.split("/")[1]: data[k] for k in data.files if k.startswith(name + "/")}
                    for name in {k.split("/")[0] for k in data.files}}
    target_maps = np.stack([polnet_map(c) for c in SEEN + UNSEEN + DECOYS])
    plan = {"train": (references, per_class, SOURCE, 1), "val": (references, per_class, SOURCE, 2),
            "train_matched": (references, per_class, TARGET, 3), "val_matched": (references, per_class, TARGET, 4),
            "target": (target_maps, per_class, TARGET, 5)}
    sets = {}
    for name, (maps, n, sim, offset) in plan.items():
        start = time.perf_counter()
        volumes, index, defocus = simulate(maps, n, sim, 1000 * seed + offset)
        sets[name] = match_set(matcher, volumes, defocus) | {"index": index}
        print(f"  {name}: {len(index)} particles simulated and matched in {time.perf_counter() - start:.0f} s")
    np.savez(path, **{f"{name}/{k}": v for name, s in sets.items() for k, v in s.items()})
    return sets


def judge(classes: ClassModel, unknown: ClassModel, x: np.ndarray, x_unknown: np.ndarray,
          truth: np.ndarray) -> dict[str, float]:
    """Scores on the target of a class model and an unknown model (threshold set); truth (n,) class index."""
    probs, _ = classes.predict(x)
    _, score = unknown.predict(x_unknown)
    seen = truth < len(SEEN)
    nearest = probs.argmax(1)
    flagged = score > unknown.threshold
    return {"accuracy": float(np.mean(((nearest == truth) & ~flagged)[seen])),
            "nearest": float(np.mean((nearest == truth)[seen])),
            "auroc": float(roc_auc_score(~seen, score)),
            "seen_unknown": float(flagged[seen].mean()), "novel_flagged": float(flagged[~seen].mean())}


def fitted(sets: dict, names: list[str], train: str, val: str, accept: float) -> ClassModel:
    """A class model on the source's training set, its threshold on the source's validation set."""
    x = {s: features(names, {}, sets[s]) for s in (train, val)}
    model = ClassModel.fit(x[train], np.array(SEEN)[sets[train]["index"]])
    _, score = model.predict(x[val])
    model.threshold = float(np.quantile(score, accept))
    return model


ALTERNATIVES = [("(a) none", "raw", False, False), ("(b) EM", "raw", False, True),
                ("(c) scale-free", "scale-free", False, False), ("(b+c) EM, scale-free", "scale-free", False, True),
                ("(d) matched simulation", "raw", True, False)]


def alternatives(sets: dict, unknown_names: list[str] | None, accept: float, counts: float,
                 unknown_fraction: float) -> dict[str, dict]:
    """Every alternative on one seed's sets; ``unknown_names`` None: the unknown score sees the class features."""
    truth = sets["target"]["index"]
    out = {}
    for label, kind, matched, adapt in ALTERNATIVES:
        suffix = "_matched" if matched else ""
        names_u = FEATURES[kind] if unknown_names is None or kind == "scale-free" else unknown_names
        models, xs = [], []
        for names in (FEATURES[kind], names_u):
            model = fitted(sets, names, "train" + suffix, "val" + suffix, accept)
            x = features(names, {}, sets["target"])
            if adapt:
                model, _ = adapt_model(model, x, counts, unknown_fraction, accept)
            models.append(model)
            xs.append(x)
        out[label] = judge(*models, *xs, truth)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--per-class", type=int, default=40, help="particles per class in every set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--accept", type=float, default=0.95, help="classification.accept_fraction")
    ap.add_argument("--counts", type=float, default=5.0, help="classification.adapt_prior_counts")
    ap.add_argument("--unknown-fraction", type=float, default=0.25, help="classification.adapt_unknown_fraction")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    references = cryovae_maps()
    config = validate_config({"structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX,
                              "pixel_size_angstrom": PIXEL})
    matcher = Matcher(config, dict(zip(SEEN, references)), (-60.0, 60.0))
    rows = {}
    for seed in args.seeds:
        sets = particle_sets(seed, args.per_class, matcher, references)
        for unknown_names in (None, ["fit"]):
            for label, result in alternatives(sets, unknown_names, args.accept, args.counts,
                                              args.unknown_fraction).items():
                rows.setdefault((label, "class features" if unknown_names is None else "fit"), []).append(result)
    print(f"\n## Classifier under the simulation-to-target shift ({time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, seeds {args.seeds}, {args.per_class}/class, "
          f"accept {args.accept}, prior counts {args.counts}, unknown fraction {args.unknown_fraction})")
    print("| alternative | unknown score sees | seen accuracy | nearest class | unknown AUROC | seen called unknown "
          "| novel flagged |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (label, unknown), results in rows.items():
        if unknown == "fit" and "scale-free" in label:
            continue  # the scale-free alternatives keep their own unknown features
        cells = [" / ".join(f"{r[k]:.3f}" for r in results)
                 for k in ("accuracy", "nearest", "auroc", "seen_unknown", "novel_flagged")]
        print(f"| {label} | {unknown} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
