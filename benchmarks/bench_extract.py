"""Throughput of subtomogram extraction and of volume rotation (the simulation's hot path).

    .venv/bin/python benchmarks/bench_extract.py [--particles 5000] [--what extract rotate] [--out-dir DIR]

extract: a 512 x 512 x 200 float32 tomogram (seeded noise) written as MRC in a temporary
folder, N random picks (CSV), ``extract_tomogram`` with 32³ boxes, per-particle
normalisation, padding; timed on a warm page cache (a first run reads the file), best of 3.
Also binning 2 (64³ cut, 32³ out).  The output (128 KiB per particle) goes to ``--out-dir``
(default: the system temporary folder; /dev/shm shows the cost without the disk).

rotate: ``volumes.rigid_transform`` (grid_sample, trilinear) on batches of 32³ float32 volumes
with random rotations and shifts, and scipy's ``rotate_volume`` (order 1) per volume.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryovae.config import validate_config
from cryovae.extract import extract_tomogram
from cryovae.rotations import random_rotations
from cryovae.star import write_csv_coordinates
from cryovae.volumes import rigid_transform, rotate_volume

SHAPE_ZYX = (200, 512, 512)


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_extract(n_particles: int, repeats: int, out_dir: str | None) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=out_dir) as out_tmp:
        folder = Path(tmp)
        tomo = folder / "TS_01.mrc"
        with mrcfile.new(tomo) as mrc:
            mrc.set_data(rng.standard_normal(SHAPE_ZYX, dtype=np.float32))
            mrc.voxel_size = 10.0
        coords = pd.DataFrame({
            "tomo_name": "TS_01",
            "x_px": rng.uniform(0, 511, n_particles),
            "y_px": rng.uniform(0, 511, n_particles),
            "z_px": rng.uniform(0, 199, n_particles),
        })
        write_csv_coordinates(coords, folder / "coords.csv")
        for binning in (1, 2):
            config = validate_config({
                "structures": {"a": "demo:a", "b": "demo:b"},
                "box_size": 32,
                "extraction": {
                    "tomograms": {"TS_01": {"tomogram": str(tomo), "coordinates": str(folder / "coords.csv")}},
                    "binning": binning, "normalise": True, "out_of_bounds": "pad", "particles_per_shard": 512,
                },
            })
            out = Path(out_tmp) / f"out_b{binning}"
            cold = _best_of(lambda: extract_tomogram(config, "TS_01", out), 1)
            warm = _best_of(lambda: extract_tomogram(config, "TS_01", out), repeats)
            print(f"extract binning {binning}: {n_particles} particles of 32^3 from 512x512x200 float32: "
                  f"first run {cold:.2f} s ({n_particles / cold:.0f}/s), best warm {warm:.2f} s "
                  f"({n_particles / warm:.0f} subtomograms/s), output in {out_tmp}")


def bench_rotate(repeats: int) -> None:
    rng = np.random.default_rng(0)
    for batch in (64, 256):
        vols = torch.from_numpy(rng.standard_normal((batch, 32, 32, 32), dtype=np.float32))
        mats = torch.from_numpy(random_rotations(batch, rng).astype(np.float32))
        shifts = torch.from_numpy(rng.normal(scale=1.0, size=(batch, 3)).astype(np.float32))
        rigid_transform(vols, mats, shifts)
        t = _best_of(lambda: rigid_transform(vols, mats, shifts), repeats)
        print(f"rigid_transform batch {batch}: {batch / t:.0f} volumes/s (32^3, float32, "
              f"{torch.get_num_threads()} threads)")
    vol = rng.standard_normal((32, 32, 32)).astype(np.float32)
    mats = random_rotations(50, rng)
    t = _best_of(lambda: [rotate_volume(vol, m, (3.0, -2.0, 1.0), 10.0) for m in mats], repeats)
    print(f"rotate_volume (scipy, order 1): {50 / t:.0f} volumes/s (32^3, float32, one at a time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=None, help="where the extracted shards are written")
    parser.add_argument("--what", nargs="+", choices=["extract", "rotate"], default=["extract", "rotate"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "extract" in args.what:
        bench_extract(args.particles, args.repeats, args.out_dir)
    if "rotate" in args.what:
        bench_rotate(args.repeats)


if __name__ == "__main__":
    main()
