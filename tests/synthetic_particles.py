"""Small synthetic particle sets with known poses: a test fixture (the benchmarks use it too).

Each class is a fixed asymmetric arrangement of Gaussian blobs in the canonical frame
(positions in voxels, (x, y[, z]) relative to voxel N//2).  A particle is its class
rendered exactly (no interpolation) in a random pose: blob p lands at A p + d, with A a
uniform random rotation (3D) or angle (2D) and d a uniform shift in voxels, plus white
noise.  Splits are written in the shard format of :mod:`cryovae.shards`, with RELION
angles and origins in particles.star.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryovae.affinity import write_affinity_csv
from cryovae.atomic import atomic_path
from cryovae.rotations import matrix_to_relion_euler, random_rotations
from cryovae.shards import write_particles_star

__all__ = ["class_blobs", "render_blobs", "random_poses", "make_particles", "write_split", "write_affinity_csv"]


def class_blobs(n_classes: int, ndim: int, box: int, seed: int = 0, n_blobs: int = 4) -> np.ndarray:
    """Blob positions (n_classes, n_blobs, ndim) in voxels, within +-box/4 of the centre."""
    rng = np.random.default_rng([seed, 7919])
    return rng.uniform(-box / 4, box / 4, size=(n_classes, n_blobs, ndim))


def render_blobs(positions: np.ndarray, box: int, sigma_voxels: float = 1.5) -> np.ndarray:
    """Sum of unit Gaussians at positions (K, d) voxels (x, y[, z]) rel. to N//2: (box,)*d array (z, y, x)."""
    ndim = positions.shape[-1]
    axes = np.arange(box) - box // 2
    grids = np.meshgrid(*([axes] * ndim), indexing="ij")[::-1]   # x, y[, z] grids in (z, y, x) layout
    out = np.zeros((box,) * ndim)
    for p in positions:
        out += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, p)) / (2 * sigma_voxels**2))
    return out


def random_poses(n: int, ndim: int, max_shift_voxels: float, rng: np.random.Generator,
                 max_angle_deg: float = 180.0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 3) particle-from-reference rotations (2D: about z) and (n, 3) shifts in voxels (2D: z = 0).

    Rotations are uniform on SO(3) (2D: uniform angles); with ``max_angle_deg`` < 180 they
    are rotations by a uniform angle up to it about a uniform random axis (2D: uniform angle
    within +-max_angle_deg).
    """
    if ndim == 3 and max_angle_deg >= 180.0:
        rot = random_rotations(n, rng)
    elif ndim == 3:
        axis = rng.standard_normal((n, 3))
        axis /= np.linalg.norm(axis, axis=1, keepdims=True)
        rot = Rotation.from_rotvec(axis * np.radians(rng.uniform(0.0, max_angle_deg, (n, 1)))).as_matrix()
    else:
        ang = rng.uniform(-np.radians(max_angle_deg), np.radians(max_angle_deg), n)
        rot = np.zeros((n, 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = (
            np.cos(ang), -np.sin(ang), np.sin(ang), np.cos(ang), 1.0)
    shift = rng.uniform(-max_shift_voxels, max_shift_voxels, (n, 3))
    if ndim == 2:
        shift[:, 2] = 0.0
    return rot, shift


def make_particles(blobs: np.ndarray, labels: np.ndarray, rotations: np.ndarray, shifts_voxels: np.ndarray,
                   box: int, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """Render particles: class ``labels`` (n,) of ``blobs`` in poses (n, 3, 3), (n, 3): (n, box, box[, box]) float32."""
    ndim = blobs.shape[-1]
    out = []
    for lab, rot, d in zip(labels, rotations, shifts_voxels):
        moved = blobs[lab] @ rot[:ndim, :ndim].T + d[:ndim]
        out.append(render_blobs(moved, box))
    vols = np.stack(out)
    return (vols + noise_sd * rng.standard_normal(vols.shape)).astype(np.float32)


def write_split(folder: str | Path, class_names: list[str], n_per_class: int, *, ndim: int = 3, box: int = 16,
                pixel_size_angstrom: float = 10.0, noise_sd: float = 0.1, max_shift_voxels: float = 1.0,
                seed: int = 0, particles_per_shard: int = 64, blob_seed: int = 0,
                max_angle_deg: float = 180.0) -> None:
    """Write a synthetic split: shard_*.npy + particles.star with true classes and poses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blobs = class_blobs(len(class_names), ndim, box, blob_seed)
    labels = rng.permutation(np.repeat(np.arange(len(class_names)), n_per_class))
    rot, shift = random_poses(len(labels), ndim, max_shift_voxels, rng, max_angle_deg)
    angles = matrix_to_relion_euler(rot)
    rows = []
    for i, lab in enumerate(labels):
        shard, index = divmod(i, particles_per_shard)
        rows.append({
            "cryovaeParticleId": f"p{i:05d}", "cryovaeShard": f"shard_{shard:03d}.npy", "cryovaeIndex": index,
            "cryovaeClassName": class_names[lab], "rlnClassNumber": int(lab) + 1,
            "rlnAngleRot": angles[i, 0], "rlnAngleTilt": angles[i, 1], "rlnAnglePsi": angles[i, 2],
            "rlnOriginXAngst": -shift[i, 0] * pixel_size_angstrom, "rlnOriginYAngst": -shift[i, 1] * pixel_size_angstrom,
            "rlnOriginZAngst": -shift[i, 2] * pixel_size_angstrom,
        })
    for start in range(0, len(labels), particles_per_shard):
        part = slice(start, start + particles_per_shard)
        vols = make_particles(blobs, labels[part], rot[part], shift[part], box, noise_sd, rng)
        with atomic_path(folder / f"shard_{start // particles_per_shard:03d}.npy") as tmp:
            np.save(tmp, vols)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [pixel_size_angstrom], "rlnImageSize": [box]})
    write_particles_star(pd.DataFrame(rows), optics, folder / "particles.star")
