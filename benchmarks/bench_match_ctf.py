"""Template matching with each particle's own per-tilt 3D CTF against the isotropic CTF x wedge.

    python benchmarks/bench_match_ctf.py [--particles 512] [--threads 2] [--tilt-step 3] [--bin 250]

The particles of benchmarks/bench_match.py (eight seen SHREC maps, 32³ at 10 Å, SNR 0.5) are
given positions in a 6000 x 6000 x 1500 Å tomogram and a dose-symmetric tilt series (±60°,
``--tilt-step``, 3 e/Å² per tilt); each block is matched twice: with :func:`cryovae.ctf.ctf_3d`
(the old route) and with :class:`cryovae.ctf.ParticleCtfs` (the per-tilt route, cached per
defocus bin of ``--bin`` Å, the default of matching).  Times the CTF construction and the matching apart.  Prints one
block to append to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mrcfile
import numpy as np
import torch
from bench_match import BOX, MAPS, SEEN, centred
from cryovae.acquisition import Acquisition
from cryovae.config import validate_config
from cryovae.ctf import ParticleCtfs, ctf_3d
from cryovae.match import CHUNK, Matcher
from cryovae.rotations import random_rotations
from cryovae.simulate import ParticleDraws, simulate_volumes


def dose_symmetric(step_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Tilts over ±60° in dose-symmetric order (0, +s, -s, +2s, ...) and their pre-exposure (3 e/Å² each)."""
    tilts = [0.0]
    for k in range(1, int(60 // step_deg) + 1):
        tilts += [k * step_deg, -k * step_deg]
    return np.array(tilts), 3.0 * np.arange(len(tilts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tilt-step", type=float, default=3.0)
    ap.add_argument("--bin", type=float, default=250.0, help="defocus bin of the CTF cache, Å")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = validate_config({"structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX,
                              "pixel_size_angstrom": 10.0, "simulation": {"snr": 0.5}})
    maps = np.stack([centred(mrcfile.read(MAPS / f"{c}.mrc")) for c in SEEN])
    rng = np.random.default_rng(0)
    n = args.particles
    draws = ParticleDraws(rng.integers(0, len(SEEN), n), random_rotations(n, rng), rng.uniform(-1, 1, (n, 3)),
                          np.full(n, 3.0))
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(0))
    coords = rng.uniform([-3000, -3000, -750], [3000, 3000, 750], (n, 3))
    tilts, dose = dose_symmetric(args.tilt_step)
    acq = Acquisition(tilts, np.full(len(tilts), 3.0), dose, 300.0, 2.7, 0.07)
    ctfs = ParticleCtfs({"TS": acq}, BOX, 10.0, args.bin)
    matcher = Matcher(config, dict(zip(SEEN, maps)), (-60.0, 60.0), device="cpu")
    times = {"isotropic": [0.0, 0.0], "per-tilt": [0.0, 0.0]}
    for first in range(0, n, CHUNK):
        rows = slice(first, min(n, first + CHUNK))
        for route, spent in times.items():
            start = time.perf_counter()
            if route == "isotropic":
                ctf = ctf_3d(torch.as_tensor(draws.defocus_um[rows]), BOX, 10.0, 300.0, 2.7, 0.07)
            else:
                ctf = ctfs(["TS"] * (rows.stop - rows.start), coords[rows])
            middle = time.perf_counter()
            matcher.match(volumes[rows], ctf)
            spent[0] += middle - start
            spent[1] += time.perf_counter() - middle
    print(f"\n## Matching with the per-tilt 3D CTF ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads, load {os.getloadavg()[0]:.1f})")
    print(f"- `python benchmarks/bench_match_ctf.py --particles {n} --threads {args.threads} "
          f"--tilt-step {args.tilt_step:g} --bin {args.bin:g}`: {n} particles, 32³, 8 classes, {len(tilts)} tilts, "
          f"{len(ctfs._cache)} distinct CTFs (bins of {args.bin:g} Å in x and z)")
    for route, (ctf_s, match_s) in times.items():
        print(f"- {route}: CTF {ctf_s:.2f} s ({1e3 * ctf_s / n:.2f} ms/particle), matching {match_s:.1f} s; "
              f"{n / (ctf_s + match_s):.1f} particles/s in all")


if __name__ == "__main__":
    main()
