"""Rotations, once: the RELION Euler convention and everything built on rotation matrices.

Convention (RELION, verified with ``relion_reconstruct``): for Euler angles
(rot, tilt, psi) in degrees,

    A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv()

is ``rotation_matrix_particle_from_reference``: it maps reference coordinates (x, y, z,
about the box centre at voxel N//2) to particle coordinates, ``x_particle = A @ x_ref``.
A particle whose content centre sits at voxel N//2 + d has ``rlnOriginX/Y/ZAngst = -d *
pixel size``.

All matrices here act on (x, y, z) column vectors; arrays have shape (..., 3, 3).  Volumes
are (z, y, x) arrays, as mrcfile gives them.

Symmetry: a reference with point group G satisfies ``ref(g x) = ref(x)`` for g in G, so a
particle made with ``A`` is the same as one made with ``A @ g`` (right multiplication).
Distances and losses under symmetry therefore take the minimum over ``b @ g``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryovae.errors import InputError

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


def matrix_to_6d_torch(matrices: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`matrix_to_6d`: (..., 3, 3) -> (..., 6)."""
    return torch.cat([matrices[..., :, 0], matrices[..., :, 1]], dim=-1)


def matrix_from_6d_torch(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable 6D -> rotation matrix: x (..., 6) -> (..., 3, 3), same layout as :func:`matrix_from_6d`.

    Vectors are divided by max(norm, ``eps``): exact for ordinary inputs, finite for a
    degenerate one (a zero vector, or two parallel ones).
    """
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


def symmetric_geodesic_distance_torch(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Torch version of :func:`symmetric_geodesic_distance_deg`, in radians (the pose loss).

    a, b: (..., 3, 3); group: (G, 3, 3) (moved to b's device and dtype).  Returns (...).
    The gradient flows through the closest symmetry mate only.
    """
    bg = b.unsqueeze(-3) @ torch.as_tensor(group).to(device=b.device, dtype=b.dtype)
    return geodesic_distance_torch(a.unsqueeze(-3), bg).min(dim=-1).values


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


# ----------------------------------------------------------------------------- aligning frames


def _project_to_so3(m: np.ndarray) -> np.ndarray:
    """Closest rotation to a (3, 3) matrix in Frobenius norm (SVD with det fix)."""
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _align_plain(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_R sum_i ||a_i R - b_i||_F^2 = projection of sum_i a_i^T b_i onto SO(3)."""
    return _project_to_so3(np.einsum("nji,njk->ik", a, b))


def _align_symmetric(a: np.ndarray, b: np.ndarray, group: np.ndarray, n_starts: int) -> np.ndarray:
    """Alternate: symmetry mate per particle given R, then R given the mates; best of several starts."""
    best, best_cost = np.eye(3), np.inf
    starts = np.linspace(0, len(a) - 1, min(n_starts, len(a))).astype(int)
    for k in starts:
        r = a[k].T @ b[k]
        for _ in range(50):
            # b_i ~ a_i g_i R  <=>  a_i^T b_i R^T ~ g_i
            cand = a[:, None] @ group[None] @ r  # (n, G, 3, 3)
            dist = geodesic_distance_deg(cand, b[:, None])
            g_idx = dist.argmin(axis=1)
            r_new = _align_plain(a @ group[g_idx], b)
            converged = np.abs(r_new - r).max() < 1e-10
            r = r_new
            if converged:
                break
        cost = float((geodesic_distance_deg(a[:, None] @ group[None] @ r, b[:, None]).min(1) ** 2).sum())
        if cost < best_cost:
            best, best_cost = r, cost
    return best


def align_rotation_sets(a: np.ndarray, b: np.ndarray, group: np.ndarray | None = None, n_starts: int = 8) -> np.ndarray:
    """The global rotation R (3, 3) with ``b_i ~ a_i @ R`` for every i.

    a, b: (n, 3, 3).  Without ``group``: R minimises sum_i ||a_i R - b_i||_F^2, solved in
    closed form (SVD of sum_i a_i^T b_i).  Typical use: ``a`` the true particle-from-reference
    matrices T_i, ``b`` a model's predictions P_i = T_i @ G expressed in its own canonical frame;
    the result is G (so ``b_i @ R.T`` are predictions in the reference frame).

    With ``group`` (G, 3, 3): b_i ~ a_i @ g_i @ R with an unknown symmetry mate g_i per
    particle; R is found by alternating minimisation from ``n_starts`` starts (R is then
    defined up to left multiplication by an element of the group).
    """
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 3 or a.shape[1:] != (3, 3) or len(a) == 0:
        raise ValueError(f"expected two (n, 3, 3) arrays of equal shape, got {a.shape} and {b.shape}")
    if group is None or len(group) == 1:
        return _align_plain(a, b)
    return _align_symmetric(a, b, np.asarray(group, float), n_starts)


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


# ----------------------------------------------------------------------------- volumes


def _centre_zyx(shape_zyx: tuple[int, ...]) -> np.ndarray:
    """RELION's box centre, voxel N//2 on every axis, in (z, y, x) order."""
    return np.array([s // 2 for s in shape_zyx], dtype=np.float64)


def rotate_volume(
    volume_zyx: np.ndarray,
    rotation_matrix_particle_from_reference: np.ndarray,
    origin_xyz_angstrom=(0.0, 0.0, 0.0),
    pixel_size_angstrom: float = 1.0,
    order: int = 1,
) -> np.ndarray:
    """The particle made from a reference volume by a rotation and a RELION origin; (D, H, W) -> (D, H, W).

    With c the centre (voxel N//2 per axis), A the rotation and d = -origin / pixel size (voxels):

        particle(x) = reference(c + A^T (x - c - d))        x, c, d in (x, y, z) voxels

    so reference content at c + p lands at c + A p + d, and the particle's ``rlnOriginX/Y/ZAngst``
    is -d * pixel size (``origin_xyz_angstrom``).  ``relion_reconstruct`` of such particles with
    their angles and origins gives the reference back (tests/test_rotations.py, marked slow).
    ``scipy.ndimage.affine_transform`` works on (z, y, x) indices, so A^T is permuted to
    P A^T P with P the axis reversal.  Outside the input counts as 0 (``grid-constant``, the
    same as :func:`rotate_volumes_torch`'s zero padding).  ``order``: spline order (1 = trilinear).
    """
    vol = np.asarray(volume_zyx)
    a = np.asarray(rotation_matrix_particle_from_reference, np.float64)
    d_zyx = -np.asarray(origin_xyz_angstrom, np.float64)[::-1] / pixel_size_angstrom
    c = _centre_zyx(vol.shape)
    m = a.T[::-1, ::-1]
    offset = c - m @ (c + d_zyx)
    return ndimage.affine_transform(vol, m, offset=offset, order=order, mode="grid-constant", cval=0.0)


def rotate_volumes_torch(
    volumes: torch.Tensor,
    matrices: torch.Tensor,
    origins_angstrom: torch.Tensor | None = None,
    pixel_size_angstrom: float = 1.0,
) -> torch.Tensor:
    """Batched :func:`rotate_volume` (trilinear) with ``grid_sample``.

    volumes: (n, D, H, W) in (z, y, x) order; matrices: (n, 3, 3) particle-from-reference
    (acting on x, y, z); origins_angstrom: (n, 3) rlnOriginX/Y/ZAngst or None.  Returns (n, D, H, W).

    Coordinate mapping (the classic source of bugs, so spelled out):

    - ``grid_sample``'s grid has shape (n, D, H, W, 3) and its last axis is (x, y, z): entry
      0 indexes W, 1 indexes H, 2 indexes D, although the volume is stored (z, y, x).
    - With ``align_corners=True`` a normalised coordinate g in [-1, 1] is the voxel index
      i = (g + 1) (S - 1) / 2 along an axis of size S, i.e. g = 2 i / (S - 1) - 1.
      ``affine_grid`` would rotate about g = 0, the voxel (S - 1) / 2, which is NOT RELION's
      centre S // 2 for even S; so the grid is built here from voxel indices instead.
    - For output voxel x (x, y, z indices), the input index sampled is
      q = c + A^T (x - c - d) with c = S // 2 and d = -origin / pixel size; as a row vector,
      (x - c - d) @ A.  Outside the input counts as 0 (``padding_mode="zeros"``).

    Differentiable with respect to ``volumes``, ``matrices`` and ``origins_angstrom``.  Agrees
    with :func:`rotate_volume` (order 1) to rounding error.
    """
    n, depth, height, width = volumes.shape
    dtype, device = volumes.dtype, volumes.device
    mats = matrices.to(dtype=dtype, device=device)
    sizes_xyz = (width, height, depth)
    centre = torch.tensor([s // 2 for s in sizes_xyz], dtype=dtype, device=device)
    scale = 2.0 / (torch.tensor(sizes_xyz, dtype=dtype, device=device) - 1.0)
    shift = centre.expand(n, 3)
    if origins_angstrom is not None:
        d = -origins_angstrom.to(dtype=dtype, device=device) / pixel_size_angstrom  # (n, 3)
        shift = shift - (d.unsqueeze(1) @ mats).squeeze(1)
    # grid = ((x - c) @ A + c - d @ A) * scale - 1.  (x - c) @ A = sum_i (x - c)_i A[i, :] separates
    # into one term per axis, summed by broadcasting: (n, 1, 1, W, 3) + (n, 1, H, 1, 3) + (n, D, 1, 1, 3).
    a_scaled = mats * scale
    terms = []
    for axis, size in enumerate(sizes_xyz):
        ticks = torch.arange(size, dtype=dtype, device=device) - (size // 2)
        terms.append(ticks[None, :, None] * a_scaled[:, None, axis, :])  # (n, size, 3)
    bias = (shift * scale - 1.0)[:, None, :]
    grid = (terms[2] + bias)[:, :, None, None, :] + terms[1][:, None, :, None, :] + terms[0][:, None, None, :, :]
    out = torch.nn.functional.grid_sample(
        volumes.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.squeeze(1)


def standardise_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, voxels) with zero mean and unit norm per row: dot products are correlations."""
    flat = volumes.reshape(len(volumes), -1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-12)


def _principal_frames(reference: np.ndarray, step_deg: float = 5.0) -> np.ndarray:
    """Frames whose z is a principal axis of the map's positive density, spun about z: (3 * 360/step, 3, 3).

    A symmetry axis of a map is a principal axis of its inertia, so these frames contain
    the orientation of any Cn or Dn group up to the grid step.
    """
    density = np.clip(reference - reference.mean(), 0.0, None).astype(np.float64)
    zyx = np.indices(reference.shape).reshape(3, -1).T - np.array(reference.shape) // 2
    xyz, weight = zyx[:, ::-1].astype(np.float64), density.reshape(-1)
    xyz = xyz - (xyz * weight[:, None]).sum(0) / weight.sum()
    _, axes = np.linalg.eigh((xyz * weight[:, None]).T @ xyz)
    frames = []
    for i in range(3):
        z, x = axes[:, i], axes[:, (i + 1) % 3]
        base = np.stack([x, np.cross(z, x), z], 1)
        frames += [base @ axis_angle_matrix(np.array([0.0, 0.0, 1.0]), a) for a in np.radians(np.arange(0, 360, step_deg))]
    return np.array(frames)


def symmetry_group_in_frame(name: str, axes: np.ndarray) -> np.ndarray:
    """Point group ``name`` with its standard axes turned by ``axes`` (the O of
    :func:`orient_symmetry`): ``O G O^T``, (G, 3, 3)."""
    axes = np.asarray(axes, dtype=np.float64)
    return axes @ symmetry_group(name) @ axes.T


def orient_symmetry(reference: np.ndarray, group: str) -> tuple[np.ndarray, float]:
    """Where a point group sits in a map: (O (3, 3), mean self-correlation under the group).

    ``rotations.symmetry_group`` gives the group in RELION's standard orientation (main axis
    z); in the map it is ``O G O^T``.  O maximises the correlation of the map with itself
    rotated by each non-identity element: principal-axis frames and a 20 deg grid, then
    local grids of 5, 2.5 and 1.25 deg.
    """
    ops = torch.as_tensor(symmetry_group(group)[1:], dtype=torch.float32)
    if not len(ops):
        return np.eye(3), 1.0
    ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32)
    target = standardise_volumes(ref[None])[0]

    def score(frames: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(frames), 128):
            f = torch.as_tensor(frames[start : start + 128], dtype=torch.float32)
            mats = (f[:, None] @ ops[None] @ f[:, None].transpose(-1, -2)).reshape(-1, 3, 3)
            rotated = standardise_volumes(rotate_volumes_torch(ref.expand(len(mats), *ref.shape), mats))
            out.append((rotated @ target).reshape(len(f), len(ops)).mean(1))
        return torch.cat(out).numpy()

    frames = np.concatenate([_principal_frames(reference), so3_grid(20.0)])
    scores = score(frames)
    best, best_score = frames[scores.argmax()], float(scores.max())
    for step in (5.0, 2.5, 1.25):
        frames = local_grid(best, step, 1)
        scores = score(frames)
        if scores.max() > best_score:
            best, best_score = frames[scores.argmax()], float(scores.max())
    return best, best_score
