"""Pose parametrisations of the encoder: in-plane angles and their 3D embedding.

The rigid transform that applies a pose to a volume is :func:`cryovae.volumes.rigid_transform`
(RELION's convention: rotation about voxel N//2, arrays (z, y, x), rotations on (x, y, z)).
"""

from __future__ import annotations

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
