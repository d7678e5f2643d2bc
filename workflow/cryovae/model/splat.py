"""Rendering isotropic Gaussians onto a voxel grid, separably.

A Gaussian k with centre mu_k (voxels, (x, y[, z]) relative to the box centre N//2), weight
w_k (amplitude at its centre) and width sigma_k (voxels) contributes
w_k exp(-|r - mu_k|^2 / (2 sigma_k^2)).  Isotropic Gaussians factor over the axes, so

    vol[b, z, y, x] = sum_k w[b, k] gz[b, k, z] gy[b, k, y] gx[b, k, x]

is two contractions of 1D profiles: no (batch x voxels x K) tensor is ever formed; the
largest intermediate is (batch, K, D, H).  Each 1D profile is cut to zero below exp(-20)
of its peak (see :func:`gaussian_profiles`).
"""

from __future__ import annotations

import torch


def axis_coordinates(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Voxel positions of one axis relative to the box centre N//2: (size,)."""
    return torch.arange(size, dtype=dtype, device=device) - float(size // 2)


PROFILE_CUTOFF = 20.0   # exp(-20) = 2e-9: profile values below it are exactly zero


def gaussian_profiles(centre: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """1D profiles exp(-(t - centre)^2 / (2 sigma^2)): centre, sigma (B, K) -> (B, K, size).

    Values below exp(-20) (beyond 6.3 sigma) are set to exactly 0: the far tails would
    otherwise be denormal floats, on which CPU arithmetic (and the renderer's matrix
    products) runs many times slower.
    """
    t = axis_coordinates(size, centre.dtype, centre.device)
    arg = 0.5 * ((t - centre[..., None]) / sigma[..., None]) ** 2
    return torch.exp(-arg.clamp(max=PROFILE_CUTOFF)) * (arg < PROFILE_CUTOFF)


def render_splats(
    centres_xyz: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor, spatial_shape: tuple[int, ...]
) -> torch.Tensor:
    """Separable rendering: centres (B, K, d) voxels in (x, y[, z]), weights and sigma (B, K).

    spatial_shape (D, H, W) -> (B, D, H, W); (H, W) -> (B, H, W).
    """
    if len(spatial_shape) == 2:
        height, width = spatial_shape
        gx = gaussian_profiles(centres_xyz[..., 0], sigma, width)
        gy = gaussian_profiles(centres_xyz[..., 1], sigma, height) * weights[..., None]
        return torch.bmm(gy.transpose(1, 2), gx)
    depth, height, width = spatial_shape
    gx = gaussian_profiles(centres_xyz[..., 0], sigma, width)
    gy = gaussian_profiles(centres_xyz[..., 1], sigma, height)
    gz = gaussian_profiles(centres_xyz[..., 2], sigma, depth) * weights[..., None]
    zy = gz[:, :, :, None] * gy[:, :, None, :]                       # (B, K, D, H)
    batch, n_splats = weights.shape
    vol = torch.bmm(zy.reshape(batch, n_splats, depth * height).transpose(1, 2), gx)  # (B, D*H, W)
    return vol.reshape(batch, depth, height, width)


def render_splats_dense(
    centres_xyz: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor, spatial_shape: tuple[int, ...]
) -> torch.Tensor:
    """Reference rendering by direct evaluation over (B, voxels, K): same arguments and result."""
    axes = [axis_coordinates(n, centres_xyz.dtype, centres_xyz.device) for n in spatial_shape]
    grid_zyx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial_shape))
    grid_xyz = grid_zyx.flip(-1)                                     # (V, d)
    dist2 = ((grid_xyz[None, :, None, :] - centres_xyz[:, None, :, :]) ** 2).sum(-1)  # (B, V, K)
    vals = weights[:, None, :] * torch.exp(-0.5 * dist2 / sigma[:, None, :] ** 2)
    return vals.sum(-1).reshape((centres_xyz.shape[0],) + tuple(spatial_shape))
