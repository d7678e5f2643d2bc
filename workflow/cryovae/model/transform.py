"""Differentiable rigid transforms in RELION's convention, and pose parametrisations.

Convention (RELION's, as in :mod:`cryovae.rotations`): a rotation ``A`` = rotation_matrix_particle_from_reference
acts on (x, y, z) column vectors about the box centre at voxel ``N//2`` on every axis; arrays
are (z, y, x).  A pose (A, d) with a shift ``d`` in voxels (x, y, z) turns a canonical
volume ``ref`` into the particle

    particle[q] = ref[A^T (q - c - d) + c],        c = N//2 per axis,

so content at reference position p (relative to c) lands at ``A p + d``; the particle's
``rlnOriginX/Y/ZAngst`` is ``-d * pixel_size``.

``torch.nn.functional.affine_grid``/``grid_sample`` (align_corners=False) address voxel i
of an axis of size N by the normalised coordinate u = (2 i + 1) / N - 1, i.e.
i = S u + o with S = N/2 and o = (N - 1)/2; voxel N//2 is u = 1/N for even N, not 0.
The normalised affine that samples ``ref`` at A^T (q - c - d) + c is therefore

    theta_linear = S^-1 A^T S,     theta_shift = S^-1 (A^T (o - c - d) + c - o).

2D images (H, W) use the same formulas with 2x2 rotations acting on (x, y).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rotation_from_angle_vector(x: torch.Tensor) -> torch.Tensor:
    """In-plane rotation from an unnormalised (cos, sin) pair (..., 2) -> (..., 2, 2) on (x, y)."""
    cs = F.normalize(x, dim=-1, eps=1e-8)
    c, s = cs[..., 0], cs[..., 1]
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def embed_rotation_2d(rotation_2d: torch.Tensor) -> torch.Tensor:
    """(..., 2, 2) in-plane rotations -> (..., 3, 3) rotations about z."""
    out = torch.zeros(rotation_2d.shape[:-2] + (3, 3), dtype=rotation_2d.dtype, device=rotation_2d.device)
    out[..., :2, :2] = rotation_2d
    out[..., 2, 2] = 1.0
    return out


def normalised_affine(
    rotation: torch.Tensor, shift_voxels: torch.Tensor, spatial_shape: tuple[int, ...]
) -> torch.Tensor:
    """The ``affine_grid`` theta (n, d, d+1) of the pose (A, d) about voxel N//2.

    rotation: (n, d, d) particle-from-reference on (x, y[, z]); shift_voxels: (n, d) in
    (x, y[, z]) order; spatial_shape: (D, H, W) or (H, W).  See the module docstring.
    """
    sizes_xyz = torch.tensor(spatial_shape[::-1], dtype=rotation.dtype, device=rotation.device)
    half = sizes_xyz / 2.0                                   # S
    offset = (sizes_xyz - 1.0) / 2.0                         # o
    centre = torch.tensor([n // 2 for n in spatial_shape[::-1]], dtype=rotation.dtype, device=rotation.device)
    a_t = rotation.transpose(-1, -2)
    linear = a_t * half[None, None, :] / half[None, :, None]
    shift = torch.einsum("nij,nj->ni", a_t, offset - centre - shift_voxels) + centre - offset
    return torch.cat([linear, (shift / half)[..., None]], dim=-1)


@functools.lru_cache(maxsize=8)
def _base_grid(spatial_shape: tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    """Normalised voxel centres (align_corners=False) plus a 1, (x, y[, z], 1), voxels in array order: (V, d+1)."""
    axes = [(2.0 * torch.arange(n, dtype=torch.float64) + 1.0) / n - 1.0 for n in spatial_shape]
    mesh = torch.meshgrid(*axes, indexing="ij")[::-1]                      # x, y[, z]
    flat = torch.stack([m.reshape(-1) for m in mesh] + [torch.ones(mesh[0].numel(), dtype=torch.float64)], -1)
    return flat.to(device=device, dtype=dtype)


def affine_grid(theta: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """``F.affine_grid(theta, (n, C, *spatial), align_corners=False)`` as one batched matmul on a cached
    base grid (cheaper on the CPU): theta (n, d, d+1) -> grid (n, *spatial, d)."""
    base = _base_grid(tuple(spatial_shape), str(theta.device), theta.dtype)
    grid = torch.matmul(base, theta.transpose(1, 2))                       # (n, V, d)
    return grid.view((theta.shape[0],) + tuple(spatial_shape) + (len(spatial_shape),))


def rigid_transform(volume: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor) -> torch.Tensor:
    """Move canonical volumes into the particle frame (trilinear/bilinear, zeros outside).

    volume: (n, C, D, H, W) or (n, C, H, W); rotation: (n, 3, 3) or (n, 2, 2) particle from
    reference; shift_voxels: (n, 3) or (n, 2) in (x, y[, z]).  Returns the volume's shape.
    """
    spatial = tuple(volume.shape[2:])
    dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32   # never a half-precision grid
    theta = normalised_affine(rotation.to(dtype), shift_voxels.to(dtype), spatial)
    grid = affine_grid(theta, spatial)
    return F.grid_sample(volume.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
