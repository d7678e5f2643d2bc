"""Rotations, once: the RELION Euler convention and everything built on rotation matrices.

Convention (RELION, verified with ``relion_reconstruct``): for Euler angles
(rot, tilt, psi) in degrees,

    A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv()

is ``rotation_matrix_particle_from_reference``: it maps reference coordinates (x, y, z,
about the box centre at voxel N//2) to particle coordinates, ``x_particle = A @ x_ref``.
A particle whose content centre sits at voxel N//2 + d has ``rlnOriginX/Y/ZAngst = -d *
pixel size``.

All matrices here act on (x, y, z) column vectors; arrays have shape (..., 3, 3).  This
module holds SO(3) maths only; volumes and their transforms are :mod:`cryovae.volumes`.

Symmetry: a reference with point group G satisfies ``ref(g x) = ref(x)`` for g in G, so a
particle made with ``A`` is the same as one made with ``A @ g`` (right multiplication).
Distances and losses under symmetry therefore take the minimum over ``b @ g``.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial.transform import Rotation

from cryovae.errors import InputError

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------- sampling


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly on SO(3) (Haar measure); shape (n, 3, 3)."""
    quats = rng.standard_normal((n, 4))
    return Rotation.from_quat(quats).as_matrix()


# ----------------------------------------------------------------------------- RELION Euler


def relion_euler_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, shape (..., 3) -> particle-from-reference matrices (..., 3, 3)."""
    angles_deg = np.asarray(angles_deg, dtype=np.float64)
    flat = angles_deg.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).inv().as_matrix()
    return mats.reshape(angles_deg.shape[:-1] + (3, 3))


def matrix_to_relion_euler(matrices: np.ndarray) -> np.ndarray:
    """Particle-from-reference matrices (..., 3, 3) -> RELION (rot, tilt, psi) in degrees (..., 3).

    rot and psi lie in (-180, 180], tilt in [0, 180].  At tilt 0 or 180 (gimbal lock) only
    rot + psi (or rot - psi) is defined: psi is set to 0 and the triplet still gives the same
    matrix (to about 1e-7), so scipy's warning about it is not shown.
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    flat = matrices.reshape(-1, 3, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gimbal lock detected", category=UserWarning)
        angles = Rotation.from_matrix(flat).inv().as_euler("ZYZ", degrees=True)
    return angles.reshape(matrices.shape[:-2] + (3,))


# ----------------------------------------------------------------------------- 6D representation


def matrix_to_quaternion(matrices: np.ndarray) -> np.ndarray:
    """Unit quaternions (..., 4) of rotation matrices (..., 3, 3); |q1 · q2| = cos(angle / 2)."""
    matrices = np.asarray(matrices, dtype=np.float64)
    return Rotation.from_matrix(matrices.reshape(-1, 3, 3)).as_quat().reshape(matrices.shape[:-2] + (4,))


def quaternion_to_matrix(quaternions: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) as :func:`matrix_to_quaternion` writes
    them (any norm, any sign)."""
    quaternions = np.asarray(quaternions, dtype=np.float64)
    return Rotation.from_quat(quaternions.reshape(-1, 4)).as_matrix().reshape(quaternions.shape[:-1] + (3, 3))


def matrix_to_6d(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> continuous 6D representation (..., 6) (Zhou et al. 2019).

    The 6 numbers are the first column followed by the second column.
    """
    m = np.asarray(matrices, dtype=np.float64)
    return np.concatenate([m[..., :, 0], m[..., :, 1]], axis=-1)


def matrix_from_6d(x: np.ndarray) -> np.ndarray:
    """6D representation (..., 6) -> rotation matrices (..., 3, 3) by Gram–Schmidt.

    Column 1 is the normalised first 3-vector, column 2 the second one made orthogonal to
    column 1 and normalised, column 3 their cross product.
    """
    x = np.asarray(x, dtype=np.float64)
    b1 = x[..., 0:3] / np.linalg.norm(x[..., 0:3], axis=-1, keepdims=True)
    a2 = x[..., 3:6]
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-1)


def matrix_from_6d_torch(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable 6D -> rotation matrix: x (..., 6) -> (..., 3, 3), same layout as :func:`matrix_from_6d`.

    Vectors are divided by max(norm, ``eps``): exact for ordinary inputs, finite for a
    degenerate one (a zero vector, or two parallel ones).
    """
    import torch  # here, not at the top: the simulation imports this module and needs no torch

    a1, a2 = x[..., 0:3], x[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1, eps=eps)
    b2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = torch.nn.functional.normalize(b2, dim=-1, eps=eps)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


# ----------------------------------------------------------------------------- distances


def _angle_from_relative(rel_trace: np.ndarray, rel_skew_norm: np.ndarray) -> np.ndarray:
    """Rotation angle (radians) from trace and |vee(R - R^T)| of the relative rotation R."""
    return np.arctan2(rel_skew_norm, rel_trace - 1.0)


def geodesic_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle of the rotation taking ``a`` to ``b`` in degrees; shapes (..., 3, 3) broadcast.

    Computed as atan2(|vee(R - R^T)|, trace(R) - 1) with R = a^T b: accurate near 0 and 180.
    """
    rel = np.einsum("...ji,...jk->...ik", np.asarray(a, float), np.asarray(b, float))
    skew = np.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]], -1
    )
    trace = np.trace(rel, axis1=-2, axis2=-1)
    return np.degrees(_angle_from_relative(trace, np.linalg.norm(skew, axis=-1)))


def geodesic_distance_torch(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Angle (radians) of the rotation taking ``a`` to ``b``; shapes (..., 3, 3) broadcast -> (...).

    atan2(|vee(R - R^T)|, trace(R) - 1) with R = a^T b.  Unlike arccos of the trace, its
    gradient stays finite at 0 and at pi (``eps`` under the square root of the skew norm;
    it biases the angle by at most sqrt(eps)/2 radians).
    """
    import torch

    rel = a.transpose(-1, -2) @ b
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]], -1
    )
    sin2 = torch.sqrt((skew * skew).sum(-1) + eps)
    cos2 = rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0
    return torch.atan2(sin2, cos2)


def symmetric_geodesic_distance_deg(a: np.ndarray, b: np.ndarray, group: np.ndarray) -> np.ndarray:
    """min over g in ``group`` of the angle between ``a`` and ``b @ g``, degrees.

    a, b: particle-from-reference matrices (..., 3, 3), broadcast; group: (G, 3, 3) from
    :func:`symmetry_group`.  Returns (...).  Zero for ``a`` vs ``a @ g``: both make the same
    particle from a G-symmetric reference.
    """
    a = np.asarray(a, float)[..., None, :, :]
    bg = np.asarray(b, float)[..., None, :, :] @ np.asarray(group, float)
    return geodesic_distance_deg(a, bg).min(axis=-1)


# ----------------------------------------------------------------------------- symmetry groups

_PHI = (1.0 + 5.0**0.5) / 2.0


def axis_angle_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Right-handed rotation by ``angle_rad`` about ``axis`` (x, y, z; normalised here), (3, 3)."""
    axis = np.asarray(axis, float)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle_rad).as_matrix()


def _closure(generators: list[np.ndarray], max_size: int = 120) -> np.ndarray:
    """The finite group generated by ``generators`` (each (3, 3)), identity first; (G, 3, 3)."""
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = g @ h
                if not any(np.abs(p - e).max() < 1e-6 for e in elements):
                    elements.append(p)
                    new.append(p)
        if len(elements) > max_size:
            raise ValueError("generators do not close to a finite point group")
        frontier = new
    return np.stack(elements)


def _cyclic_dihedral(name: str) -> np.ndarray | None:
    """Cn (n-fold about z) or Dn (Cn, then Cn times a 2-fold about x), or None."""
    if not (name[:1] in ("C", "D") and name[1:].isdigit() and int(name[1:]) >= 1):
        return None
    n = int(name[1:])
    cn = np.stack([axis_angle_matrix([0, 0, 1], 2 * np.pi * k / n) for k in range(n)])
    return cn if name[0] == "C" else np.concatenate([cn, axis_angle_matrix([1, 0, 0], np.pi) @ cn])


def _generators(name: str) -> list[np.ndarray] | None:
    """RELION's generators (src/symmetries.cpp) of T, O, I, or None."""
    if name == "T":
        return [axis_angle_matrix([0, 0, 1], 2 * np.pi / 3),
                axis_angle_matrix([0, np.sqrt(2 / 3), np.sqrt(1 / 3)], np.pi)]
    if name == "O":
        return [axis_angle_matrix([1, 1, 1], 2 * np.pi / 3), axis_angle_matrix([0, 0, 1], np.pi / 2)]
    if name in ("I", "I2"):
        return [axis_angle_matrix([0, 0, 1], np.pi),
                axis_angle_matrix([1, 0, _PHI], 2 * np.pi / 5),
                axis_angle_matrix([0, 1, _PHI**2], 2 * np.pi / 3)]
    return None


@functools.lru_cache(maxsize=64)
def _symmetry_group_cached(name: str) -> np.ndarray:
    group = _cyclic_dihedral(name)
    if group is None:
        gens = _generators(name)
        if gens is None:
            raise InputError(
                f"unknown symmetry group {name!r}: expected C1, Cn, Dn (n a positive integer), T, O or I"
            )
        group = _closure(gens)
    group.setflags(write=False)
    return group


def symmetry_group(name: str) -> np.ndarray:
    """Rotation matrices of a point group in RELION's orientation, shape (G, 3, 3), identity first.

    Orientation (generators as in RELION's ``src/symmetries.cpp``):

    - ``Cn`` (n >= 1): n-fold about z; G = n.
    - ``Dn``: Cn plus a 2-fold about x; G = 2n.
    - ``T``: 3-fold about z, 2-fold about (0, sqrt(2/3), sqrt(1/3)); G = 12.
    - ``O``: 4-folds about x, y, z, 3-fold about (1, 1, 1); G = 24.
    - ``I`` (= RELION's ``I2``, its default, Crowther's convention): 2-folds about x, y, z,
      a 5-fold about (1, 0, phi) in the xz plane, a 3-fold about (0, 1, phi^2); G = 60.

    Names are case-insensitive; anything else raises :class:`InputError`.
    """
    key = str(name).strip().upper()
    return _symmetry_group_cached(key).copy()


# ----------------------------------------------------------------------------- search grids


def so3_grid(step_deg: float) -> np.ndarray:
    """Roughly uniform rotations with about ``step_deg`` between neighbours, (n, 3, 3).

    Super-Fibonacci spiral on the unit quaternions (Alexa, CVPR 2022): deterministic, with
    n = ceil(8 pi^2 / step^3) (the volume of SO(3) in the angle metric over a cube of edge
    ``step``; 15 deg gives 4,401 rotations, RELION's healpix order 2 has 4,608).  Every
    rotation lies within about ``step_deg`` of a grid point.
    """
    if not step_deg > 0:
        raise ValueError(f"expected a positive step in degrees, got {step_deg}")
    step = np.radians(step_deg)
    n = int(np.ceil(8 * np.pi**2 / step**3))
    s = np.arange(n) + 0.5
    r, big_r = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha = 2 * np.pi * s / np.sqrt(2.0)
    beta = 2 * np.pi * s / 1.533751168755204288118041
    quats = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta), big_r * np.cos(beta)], -1)
    return Rotation.from_quat(quats).as_matrix()


def local_grid(center: np.ndarray, step_deg: float, n: int) -> np.ndarray:
    """Rotations ``center @ exp(v)`` for v on a cubic grid in so(3), ((2n+1)^3, 3, 3).

    v = step_deg * (i, j, k) (as a rotation vector, degrees) for i, j, k in -n..n; the first
    half of the output is ordered as ``itertools.product``, the centre (v = 0) sits at index
    ((2n+1)^3 - 1) / 2.  Each output is exactly |v| degrees from ``center``.
    """
    ticks = np.arange(-n, n + 1) * np.radians(step_deg)
    vecs = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), -1).reshape(-1, 3)
    return np.asarray(center, float) @ Rotation.from_rotvec(vecs).as_matrix()


def local_deltas(steps_deg, half_width: int) -> list[np.ndarray]:
    """One local grid about the identity per step (:func:`local_grid`): [((2 h + 1)^3, 3, 3), ...]."""
    return [local_grid(np.eye(3), float(step), half_width) for step in steps_deg]


def refine_rotations(score, rotations: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    """Coarse-to-fine local search, the one used everywhere: (n, 3, 3) -> (n, 3, 3).

    For each level k (``deltas`` from :func:`local_deltas`, coarsest first) every rotation
    R_i moves to the best of R_i @ deltas[k][j]; ``score(rotations, k)`` returns the scores
    (n, m) of those m candidates per rotation (higher is better).  The identity is in every
    local grid, so no rotation moves to a candidate its score function rates lower.
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    for level, delta in enumerate(deltas):
        best = np.asarray(score(rotations, level)).argmax(1)
        rotations = rotations @ delta[best]
    return rotations


def symmetry_group_in_frame(name: str, axes: np.ndarray) -> np.ndarray:
    """Point group ``name`` with its standard axes turned by ``axes`` (the O of
    :func:`cryovae.align.orient_symmetry`): ``O G O^T``, (G, 3, 3)."""
    axes = np.asarray(axes, dtype=np.float64)
    return axes @ symmetry_group(name) @ axes.T
