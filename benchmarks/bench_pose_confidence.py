"""Pose search failures and pose confidence of template matching at low SNR (32³, 10 Å SHREC maps).

    python benchmarks/bench_pose_confidence.py [--per-class 20] [--snr 0.1] [--threads 2]
        [--coarse-keep 1] [--coarse-step 15] [--coarse-binning 2] [--coarse-rank 256]

Particles of the eight seen SHREC classes are simulated (``simulate_volumes``: random pose,
±1 px shift, CTF with defocus 2–5 µm, ±60° wedge, noise at SNR ``--snr``) and matched in
blocks as the ``match`` stage does.  For each particle, at its true class:

- search failure: the full-size matched-filter correlation at the TRUE pose (translation
  found by the same FFT peak) is higher than at the pose the matcher returned;
- rotation error of the returned pose against the true one, modulo the point groups of
  config/shrec2021.yaml (axes located in each map), shift error in pixels;
- pose confidence: ``pose_margin`` AUROC separating errors < 15° from > 45°, median error of
  particles the matcher calls determined and undetermined, fraction determined per class.

Prints one block to append to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from cryovae.align import orient_symmetry
from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.match import CHUNK, Matcher
from cryovae.rotations import (
    random_rotations,
    symmetric_geodesic_distance_deg,
    symmetry_group_in_frame,
)
from cryovae.simulate import ParticleDraws, simulate_volumes
from scipy import ndimage

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "shrec2021" / "maps_10A"
SEEN = ["1bxn", "1qvr", "1u6g", "2cg9", "3cf3", "3d2f", "3h84", "3qm1"]
SYMMETRY = {"1bxn": "C4", "2cg9": "C2", "3h84": "C2"}  # config/shrec2021.yaml
BOX = 32


def centred(volume: np.ndarray) -> np.ndarray:
    centre = np.round(ndimage.center_of_mass(np.clip(volume, 0, None))).astype(int)
    return volume[tuple(slice(c - BOX // 2, c + BOX // 2) for c in centre)].astype(np.float32)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-top", type=int, default=2)
    ap.add_argument("--coarse-keep", type=int, default=None, help="matching.coarse_keep (default: the config's)")
    ap.add_argument("--coarse-step", type=float, default=15.0)
    ap.add_argument("--coarse-binning", type=int, default=2)
    ap.add_argument("--coarse-rank", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def true_pose_fit(matcher: Matcher, volumes: np.ndarray, ctf: torch.Tensor, cls: str, rotations: np.ndarray):
    """Full-size matched-filter correlation (n,) of each particle at the true rotation (best translation)."""
    spectra = torch.fft.rfftn(matcher._tensor(volumes), dim=(1, 2, 3)) * matcher.wedge
    spectra[:, 0, 0, 0] = 0.0
    norm = ((matcher.weights * spectra.abs() ** 2).sum((1, 2, 3)) / BOX**3).sqrt()
    _, fit = matcher.correlate(spectra * ctf, cls, rotations, ctf, norm)
    return fit.cpu().numpy()


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(positive) else float("nan")


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    matching = {"refine_top": args.refine_top, "coarse_binning": args.coarse_binning,
                "coarse_step_deg": args.coarse_step, "coarse_rank": args.coarse_rank}
    if args.coarse_keep is not None:
        matching["coarse_keep"] = args.coarse_keep
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": args.snr, "max_shift_px": 1.0}, "matching": matching,
        "alignment": {"symmetry": SYMMETRY},
    })
    maps = np.stack([centred(mrcfile.read(MAPS / f"{c}.mrc")) for c in SEEN])
    rng = np.random.default_rng(args.seed)
    n = args.per_class * len(SEEN)
    draws = ParticleDraws(np.repeat(np.arange(len(SEEN)), args.per_class), random_rotations(n, rng),
                          rng.uniform(-1, 1, (n, 3)), rng.uniform(2.0, 5.0, n))
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(args.seed + 1))
    ctf = ctf_3d(torch.as_tensor(draws.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    matcher = Matcher(config, dict(zip(SEEN, maps)), (-60.0, 60.0))
    start, cpu_start = time.perf_counter(), time.process_time()
    blocks = [matcher.match(volumes[s : s + CHUNK], ctf[s : s + CHUNK]) for s in range(0, n, CHUNK)]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    rows, k = np.arange(n), draws.class_index
    found_fit = result["fit"][rows, k]
    true_fit = np.empty(n)
    for j, cls in enumerate(SEEN):
        sel = k == j
        true_fit[sel] = true_pose_fit(matcher, volumes[sel], ctf[sel], cls, draws.rotation[sel])
    refined = result["refined"][rows, k]
    error = np.empty(n)
    for j, cls in enumerate(SEEN):
        sel = k == j
        group = np.eye(3)[None]
        if cls in SYMMETRY:
            group = symmetry_group_in_frame(SYMMETRY[cls], orient_symmetry(maps[j], SYMMETRY[cls])[0])
        error[sel] = symmetric_geodesic_distance_deg(result["rotation"][sel, j], draws.rotation[sel], group)
    shift_px = np.linalg.norm(result["displacement_voxels"][rows, k] - draws.shift_xyz_px, axis=1)
    failed = refined & (true_fit > found_fit + 1e-4)
    print(f"\n## Pose confidence ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f})")
    print(f"- {n} particles ({args.per_class}/class, 8 SHREC classes) at SNR {args.snr}, 32³, CTF, ±60° wedge; "
          f"grid {len(matcher.grid)} rotations at {matcher.small}³ rank {args.coarse_rank}, "
          f"coarse_keep {config.matching.coarse_keep if hasattr(config.matching, 'coarse_keep') else 1}, "
          f"refine_top {args.refine_top}")
    print(f"- matching: {seconds:.1f} s wall = {n / seconds:.1f} particles/s, {cpu_seconds / n * 1e3:.0f} CPU-ms/particle")
    print(f"- true class refined for {refined.mean():.3f}; search failure (true pose scores higher): "
          f"{failed.sum() / max(refined.sum(), 1):.3f}")
    print(f"- rotation error at the true class: median {np.median(error[refined]):.1f}°, "
          f"within 10° {(error[refined] < 10).mean():.3f}; shift error median {np.median(shift_px[refined]):.2f} px")
    line = []
    for j, cls in enumerate(SEEN):
        sel = (k == j) & refined
        line.append(f"{cls} {np.median(error[sel]):.0f}°/{(failed[sel]).mean():.2f}")
    print("- per class (median error / failure fraction): " + ", ".join(line))
    if "pose_margin" in result:
        margin = result["pose_margin"][rows, k]
        determined = result["pose_determined"][rows, k]
        clear = refined & ((error < 15) | (error > 45))
        print(f"- pose_margin AUROC (err < 15° vs > 45°): {auroc(error[clear] < 15, margin[clear]):.3f}; "
              f"determined {determined[refined].mean():.3f}: median error determined "
              f"{np.median(error[refined & determined]) if (refined & determined).any() else float('nan'):.1f}°, "
              f"undetermined {np.median(error[refined & ~determined]) if (refined & ~determined).any() else float('nan'):.1f}°")
        good, bad = refined & (error < 15), refined & (error > 45)
        print(f"- pose_margin quartiles: err < 15° {np.percentile(margin[good], [25, 50, 75]).round(2).tolist()}, "
              f"err > 45° {np.percentile(margin[bad], [25, 50, 75]).round(2).tolist() if bad.any() else 'none'}")
        print("- determined fraction per class: " + ", ".join(
            f"{cls} {determined[(k == j) & refined].mean():.2f}" for j, cls in enumerate(SEEN)))
        print("- map self-margin per class (noise-free NCC gap to the best rotation > pose_far_deg): " + ", ".join(
            f"{cls} {m:.3f}" for cls, m in zip(SEEN, matcher.self_margin)))


if __name__ == "__main__":
    main()
