"""Cost and fidelity of the tomogram simulator (cryovae.tomosim) on the SHREC 2021 polnet maps.

    PYTHONPATH=workflow python benchmarks/bench_tomosim.py [--threads 1]

Prints (1) the cost of one 256x256x64 tomogram at 10 Å (ten classes + three decoys, 10 per
kind, CTF, dose, SNR 0.1) by stage, and of 5 and 20 per kind (cost per 100 particles); (2) the
correlation of the noise-free reconstruction (no CTF, no dose) with the wedge-filtered slab;
(3) the real-space projector against torch-fourier-slice's Fourier-slice projector
(``project_3d_to_2d`` of the slab zero-padded to a cube): time per tilt series and agreement.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from cryovae import tomosim
from cryovae.config import validate_config
from cryovae.ctf import tilt_rotations_xyz

MAPS = Path(__file__).resolve().parents[2] / "shared/data/shrec2021/maps_10A"
CLASSES = ["1bxn", "1qvr", "1s3x", "1u6g", "2cg9", "3cf3", "3d2f", "3gl1", "3h84", "3qm1"]
DECOYS = ["4cr2", "4v94", "5mrc"]


def config(**overrides):
    ts = {"tomograms": 1, "maps": {c: str(MAPS / f"{c}.mrc") for c in CLASSES},
          "decoys": {d: str(MAPS / f"{d}.mrc") for d in DECOYS}, **overrides}
    return validate_config({"structures": {c: "demo:globule_a" for c in CLASSES}, "unseen": ["1s3x", "3gl1"],
                            "pixel_size_angstrom": 10.0, "box_size": 32, "tomogram_simulation": ts})


def timed(label, fn, *args):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    print(f"  {label}: wall {time.perf_counter() - start_wall:.2f} s, CPU {time.process_time() - start_cpu:.2f} s")
    return out


def cost(per_kind: int, species, size_xyz_px=(256, 256, 64)) -> None:
    cfg = config(particles_per_class=per_kind, size_xyz_px=list(size_xyz_px))
    print(f"one tomogram {size_xyz_px}, {per_kind} per kind ({per_kind * len(species)} particles):")
    timed("simulate (all stages)", tomosim.simulate, cfg, 0, species)


def stages(species) -> None:
    cfg = config()
    ts = cfg.tomogram_simulation
    rng = tomosim.tomogram_seed(cfg, 0)
    kinds = np.repeat(np.arange(len(species)), ts.particles_per_class)
    radii = np.array([species[k].radius_px for k in kinds])
    print(f"stages of one tomogram ({len(kinds)} particles):")
    positions = timed("place", tomosim.place_particles, radii, ts.size_xyz_px, 19.0, rng)
    rotations = tomosim.random_rotations(len(kinds), rng)
    slab = timed("slab", tomosim.build_slab, species, kinds, positions, rotations, ts.size_xyz_px, 10.0)
    series = tomosim.tilt_series(cfg)
    with torch.no_grad():
        images = timed("project (real space)", tomosim.project_slab, slab, series.tilts_deg)
        images = timed("project + CTF + exposure", tomosim.signal_images, slab, series, cfg)
        timed("back-project", tomosim.backproject, images, series.tilts_deg, 64, 3.0)


def fidelity(species) -> None:
    cfg = config(ctf=False, dose_per_tilt=0.0, snr=None)
    result = tomosim.simulate(cfg, 0, species)
    wedge = tomosim.wedge_filtered(result.slab_zyx, cfg.tomogram_simulation.tilt_range_deg)
    r = np.corrcoef(result.signal_zyx.ravel(), wedge.ravel())[0, 1]
    print(f"noise-free reconstruction vs wedge-filtered slab: correlation {r:.4f}")


def projectors(species) -> None:
    from torch_fourier_slice import project_3d_to_2d

    cfg = config(ctf=False, dose_per_tilt=0.0, snr=None)
    result = tomosim.simulate(cfg, 0, species)
    slab = result.slab_zyx
    tilts = tomosim.tilt_series(cfg).tilts_deg
    with torch.no_grad():
        start = time.perf_counter()
        real = tomosim.project_slab(slab, tilts).numpy()
        real_s = time.perf_counter() - start
        nz, _, nx = slab.shape
        cube = np.zeros((nx, nx, nx), np.float32)
        cube[nx // 2 - nz // 2: nx // 2 - nz // 2 + nz] = slab
        rotations = torch.as_tensor(tilt_rotations_xyz(tilts), dtype=torch.float32)
        best = None
        for name, matrices in (("R", rotations), ("R^T", rotations.transpose(-1, -2))):
            start = time.perf_counter()
            fourier = project_3d_to_2d(torch.as_tensor(cube), matrices, pad_factor=2.0).numpy()
            fourier_s = time.perf_counter() - start
            centre = slice(nx // 4, 3 * nx // 4)  # columns the finite slab fills at every tilt
            r = np.corrcoef(real[..., centre].ravel(), fourier[..., centre].ravel())[0, 1]
            if best is None or r > best[1]:
                best = (name, r, fourier_s)
    print(f"projectors, {len(tilts)} tilts of {slab.shape[::-1]} (x, y, z): real space {real_s:.2f} s; "
          f"torch-fourier-slice (cube {nx}³, pad 2, matrices {best[0]}) {best[2]:.2f} s; "
          f"correlation over the central half of the columns {best[1]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    species = tomosim.load_species(config(), [])
    stages(species)
    for per_kind in (5, 10):
        cost(per_kind, species)
    for per_kind in (10, 20):  # 20 per kind (with the three large decoys) does not fit in 256 x 256 x 64
        cost(per_kind, species, (384, 384, 64))
    fidelity(species)
    projectors(species)


if __name__ == "__main__":
    main()
