"""Template-matching throughput at 32³: particles per second against the eight seen SHREC maps.

    python benchmarks/bench_match.py [--particles 1024] [--threads 2] [--refine-top 2] [--refine-by screen] [--snr 0.5]

Particles are simulated from the shared SHREC 2021 maps (SNR ``--snr``, CTF, ±60° wedge) and
matched in blocks as the ``match`` stage does; the set-up (rotated reference banks) is
timed apart.  Accuracy: the class of best fit against the true class, and the angle between
the refined rotation of the true class and the true rotation, without symmetry and modulo the
classes' point groups (``alignment.symmetry`` of config/shrec2021.yaml: 1bxn C4, 2cg9 and 3h84 C2,
which the matcher also uses to keep its peaks apart).  Prints one block to append to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from scipy import ndimage

from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.match import CHUNK, Matcher
from cryovae.rotations import geodesic_distance_deg, random_rotations, symmetric_geodesic_distance_deg
from cryovae.simulate import ParticleDraws, simulate_volumes

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "shrec2021" / "maps_10A"
SEEN = ["1bxn", "1qvr", "1u6g", "2cg9", "3cf3", "3d2f", "3h84", "3qm1"]
SYMMETRY = {"1bxn": "C4", "2cg9": "C2", "3h84": "C2"}
BOX = 32


def centred(volume: np.ndarray) -> np.ndarray:
    centre = np.round(ndimage.center_of_mass(np.clip(volume, 0, None))).astype(int)
    return volume[tuple(slice(c - BOX // 2, c + BOX // 2) for c in centre)].astype(np.float32)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-top", type=int, default=2)
    ap.add_argument("--refine-by", choices=["screen", "global"], default="screen")
    ap.add_argument("--coarse-keep", type=int, default=4, help="matching.coarse_keep")
    ap.add_argument("--max-shift", type=float, default=1.0, help="particles off the box centre by up to this, px per axis")
    ap.add_argument("--centre-search", type=float, default=None, help="matching.centre_search_px (default: the config's)")
    ap.add_argument("--snr", type=float, default=0.5, help="signal-to-noise ratio of the simulated particles")
    ap.add_argument("--coarse-binning", type=int, default=2, help="matching.coarse_binning")
    ap.add_argument("--coarse-step", type=float, default=15.0, help="matching.coarse_step_deg")
    ap.add_argument("--coarse-rank", type=int, default=256, help="matching.coarse_rank")
    ap.add_argument("--refine-steps", default="6,2.5", help="matching.refine_steps_deg, comma-separated ('' for none)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="matching.device")
    ap.add_argument("--search-dtype", choices=["float32", "bfloat16", "float64"], default=None,
                    help="dtype of the global search (default: bfloat16 on CUDA, float32 on the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": args.snr}, "alignment": {"symmetry": SYMMETRY}, "matching": {
            "coarse_keep": args.coarse_keep,
            **({} if args.centre_search is None else {"centre_search_px": args.centre_search}),
            "refine_top": args.refine_top, "refine_by": args.refine_by, "coarse_binning": args.coarse_binning, "coarse_step_deg": args.coarse_step,
            "coarse_rank": args.coarse_rank,
            "refine_steps_deg": [float(x) for x in args.refine_steps.split(",") if x], "device": args.device},
    })
    maps = np.stack([centred(mrcfile.read(MAPS / f"{c}.mrc")) for c in SEEN])
    rng = np.random.default_rng(0)
    n = args.particles
    draws = ParticleDraws(rng.integers(0, len(SEEN), n), random_rotations(n, rng), rng.uniform(-args.max_shift, args.max_shift, (n, 3)),
                          rng.uniform(2.0, 5.0, n))
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(0))
    start = time.perf_counter()
    dtype = None if args.search_dtype is None else getattr(torch, args.search_dtype)
    matcher = Matcher(config, dict(zip(SEEN, maps)), (-60.0, 60.0), search_dtype=dtype)
    synchronise(matcher.device)
    setup = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    blocks = []
    for first in range(0, n, CHUNK):
        rows = slice(first, min(n, first + CHUNK))
        ctf = ctf_3d(torch.as_tensor(draws.defocus_um[rows]), BOX, 10.0, 300.0, 2.7, 0.07)
        blocks.append(matcher.match(volumes[rows], ctf))
    synchronise(matcher.device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    fit = np.concatenate([b["fit"] for b in blocks])
    rotation = np.concatenate([b["rotation"] for b in blocks])[np.arange(n), draws.class_index]
    shift = np.concatenate([b["displacement_voxels"] for b in blocks])[np.arange(n), draws.class_index]
    shift_error = np.linalg.norm(shift - draws.shift_xyz_px, axis=1)
    accuracy = float((np.nan_to_num(fit, nan=-np.inf).argmax(1) == draws.class_index).mean())
    error_deg = geodesic_distance_deg(rotation, draws.rotation)
    groups = [matcher.symmetry[c] for c in SEEN]
    sym_deg = np.array([symmetric_geodesic_distance_deg(r, t, groups[k])
                        for r, t, k in zip(rotation, draws.rotation, draws.class_index)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n## Template matching ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f})")
    print(f"- {n} particles at SNR {args.snr}, 32³, 8 classes, {len(matcher.grid):,}-rotation global grid at "
          f"{matcher.small}³ (rank {args.coarse_rank}, {matcher.search_dtype}), refine_top {args.refine_top} by {args.refine_by}, "
          f"coarse_keep {args.coarse_keep}, "
          f"device {matcher.device}")
    print(f"- set-up (reference banks): {setup:.1f} s; matching: {seconds:.1f} s wall = {n / seconds:.0f} particles/s, "
          f"{cpu_seconds:.1f} s CPU (user+sys) = {n / cpu_seconds:.0f} particles per CPU-second")
    print(f"- class accuracy (best fit) {accuracy:.3f}; rotation error at the true class: median "
          f"{np.median(error_deg):.1f}°, within 10° {(error_deg < 10).mean():.3f}; modulo the point groups: median "
          f"{np.median(sym_deg):.2f}°, within 10° {(sym_deg < 10).mean():.3f}, beyond 15° {(sym_deg > 15).mean():.3f}")
    print(f"- shift error at the true class (particles up to {args.max_shift:g} px off per axis, centre search "
          f"{matcher.centre_radius:g} px): median {np.median(shift_error):.2f} px, beyond 1 px {(shift_error > 1).mean():.3f}")
    print(f"- peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
