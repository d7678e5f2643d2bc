"""Template-matching throughput at 32³: particles per second against the eight seen SHREC maps.

    python benchmarks/bench_match.py [--particles 1024] [--threads 2] [--refine-top 2]

Particles are simulated from the shared SHREC 2021 maps (SNR 0.5, CTF, ±60° wedge) and
matched in blocks as the ``match`` stage does; the set-up (rotated reference banks) is
timed apart.  Accuracy: the class of best fit against the true class, and the angle between
the refined rotation of the true class and the true rotation (no symmetry taken into account).  Prints one block to append to benchmarks/RESULTS.md.
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
from cryovae.rotations import geodesic_distance_deg, random_rotations
from cryovae.simulate import ParticleDraws, simulate_volumes

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "shrec2021" / "maps_10A"
SEEN = ["1bxn", "1qvr", "1u6g", "2cg9", "3cf3", "3d2f", "3h84", "3qm1"]
BOX = 32


def centred(volume: np.ndarray) -> np.ndarray:
    centre = np.round(ndimage.center_of_mass(np.clip(volume, 0, None))).astype(int)
    return volume[tuple(slice(c - BOX // 2, c + BOX // 2) for c in centre)].astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine-top", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": 0.5}, "matching": {"refine_top": args.refine_top},
    })
    maps = np.stack([centred(mrcfile.read(MAPS / f"{c}.mrc")) for c in SEEN])
    rng = np.random.default_rng(0)
    n = args.particles
    draws = ParticleDraws(rng.integers(0, len(SEEN), n), random_rotations(n, rng), rng.uniform(-1, 1, (n, 3)),
                          rng.uniform(2.0, 5.0, n))
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(0))
    start = time.perf_counter()
    matcher = Matcher(config, dict(zip(SEEN, maps)), (-60.0, 60.0))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    blocks = []
    for first in range(0, n, CHUNK):
        rows = slice(first, min(n, first + CHUNK))
        ctf = ctf_3d(torch.as_tensor(draws.defocus_um[rows]), BOX, 10.0, 300.0, 2.7, 0.07)
        blocks.append(matcher.match(volumes[rows], ctf))
    seconds = time.perf_counter() - start
    fit = np.concatenate([b["fit"] for b in blocks])
    rotation = np.concatenate([b["rotation"] for b in blocks])[np.arange(n), draws.class_index]
    accuracy = float((np.nan_to_num(fit, nan=-np.inf).argmax(1) == draws.class_index).mean())
    error_deg = geodesic_distance_deg(rotation, draws.rotation)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n## Template matching ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f})")
    print(f"- {n} particles, 32³, 8 classes, 4,401-rotation global grid at 16³, refine_top {args.refine_top}")
    print(f"- set-up (reference banks): {setup:.1f} s; matching: {seconds:.1f} s = {n / seconds:.0f} particles/s")
    print(f"- class accuracy (best fit) {accuracy:.3f}; rotation error at the true class: median "
          f"{np.median(error_deg):.1f}°, within 10° {(error_deg < 10).mean():.3f}")
    print(f"- peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
