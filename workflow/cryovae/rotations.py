"""Rotations, once: the RELION Euler convention and everything built on rotation matrices.

Convention (RELION, verified with ``relion_reconstruct``): for Euler angles
(rot, tilt, psi) in degrees,

    A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv()

is ``rotation_matrix_particle_from_reference``: it maps reference coordinates (x, y, z,
about the box centre at voxel N//2) to particle coordinates, ``x_particle = A @ x_ref``.

All matrices here act on (x, y, z) column vectors; arrays have shape (..., 3, 3).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly on SO(3) (Haar measure); shape (n, 3, 3)."""
    quats = rng.standard_normal((n, 4))
    return Rotation.from_quat(quats).as_matrix()


def relion_euler_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, shape (..., 3) -> particle-from-reference matrices (..., 3, 3)."""
    angles_deg = np.asarray(angles_deg, dtype=np.float64)
    flat = angles_deg.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).inv().as_matrix()
    return mats.reshape(angles_deg.shape[:-1] + (3, 3))


def matrix_to_relion_euler(matrices: np.ndarray) -> np.ndarray:
    """Particle-from-reference matrices (..., 3, 3) -> RELION (rot, tilt, psi) in degrees (..., 3).

    rot and psi lie in (-180, 180], tilt in [0, 180].
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    flat = matrices.reshape(-1, 3, 3)
    angles = Rotation.from_matrix(flat).inv().as_euler("ZYZ", degrees=True)
    return angles.reshape(matrices.shape[:-2] + (3,))


def geodesic_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle of the rotation taking ``a`` to ``b`` in degrees; shapes (..., 3, 3) broadcast."""
    rel = np.einsum("...ji,...jk->...ik", np.asarray(a, float), np.asarray(b, float))
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
