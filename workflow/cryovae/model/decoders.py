"""Decoders: a shape latent -> a volume in the canonical frame, moved into the particle's pose.

Both decoders share one interface:

- ``canonical(z)``: (n, L) -> (n, 1, *spatial), the volume in the canonical frame;
- ``posed(z, rotation, shift_voxels)``: (n, 1, *spatial) in the particle frame, where
  rotation (n, d, d) is particle-from-canonical and shift_voxels (n, d) is (x, y[, z]) (see
  :mod:`cryovae.volumes` for the convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cryovae.model.encoder import conv_layer, reduced_size
from cryovae.model.splat import render_splats
from cryovae.volumes import rigid_transform


def centre_crop(volume: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """Crop (n, C, *bigger) to (n, C, *spatial_shape), keeping voxel M//2 at N//2 (even sizes)."""
    slices = [slice(None), slice(None)]
    for have, want in zip(volume.shape[2:], spatial_shape):
        start = have // 2 - want // 2
        slices.append(slice(start, start + want))
    return volume[tuple(slices)]


class CnnDecoder(nn.Module):
    """Latent -> canonical volume by transposed convolutions; pose applied by grid_sample.

    Mirrors the encoder: a hidden layer, a (channels[-1], s, s[, s]) seed with s the
    encoder's reduced edge, then one kernel-4 stride-2 transposed convolution per stage
    (channels reversed, the last giving one channel), cropped to the box.
    """

    def __init__(self, spatial_shape: tuple[int, ...], channels: list[int], latent_dims: int, hidden: int):
        super().__init__()
        self.spatial_shape = tuple(spatial_shape)
        ndim = len(spatial_shape)
        self.seed_shape = (channels[-1],) + tuple(reduced_size(s, len(channels)) for s in spatial_shape)
        self.project = nn.Sequential(
            nn.Linear(latent_dims, hidden), nn.SiLU(), nn.Linear(hidden, math.prod(self.seed_shape)), nn.SiLU()
        )
        deconv = conv_layer(ndim, transpose=True)
        chans = list(reversed(channels)) + [1]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans, chans[1:])):
            layers.append(deconv(c_in, c_out, 4, stride=2, padding=1))
            if i < len(chans) - 2:
                layers.append(nn.SiLU())
        self.upsample = nn.Sequential(*layers)

    def canonical(self, z: torch.Tensor) -> torch.Tensor:
        seed = self.project(z).reshape((z.shape[0],) + self.seed_shape)
        return centre_crop(self.upsample(seed), self.spatial_shape)

    def posed(self, z: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor) -> torch.Tensor:
        return rigid_transform(self.canonical(z), rotation, shift_voxels)


class SplatDecoder(nn.Module):
    """Latent -> K isotropic Gaussians (centres, weights, widths) in the canonical frame.

    The pose rotates and shifts the centres exactly (mu' = A mu + d) before separable
    rendering (:func:`cryovae.model.splat.render_splats`).  Centres lie within
    +-0.45 * box edge of the centre (tanh), widths are >= 0.5 voxel (softplus).
    """

    min_sigma_voxels = 0.5

    def __init__(self, spatial_shape: tuple[int, ...], n_splats: int, latent_dims: int, hidden: int):
        super().__init__()
        self.spatial_shape = tuple(spatial_shape)
        self.ndim = len(spatial_shape)
        self.n_splats = n_splats
        self.extent_voxels = 0.45 * min(spatial_shape)
        self.mlp = nn.Sequential(
            nn.Linear(latent_dims, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, n_splats * (self.ndim + 2)),
        )
        last = self.mlp[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            bias = last.bias.view(n_splats, self.ndim + 2)
            bias[:, : self.ndim].uniform_(-1.0, 1.0)
            bias[:, self.ndim] = 0.0
            bias[:, self.ndim + 1] = 0.5

    def splats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (n, L) -> canonical centres (n, K, d) in voxels (x, y[, z]), weights (n, K), sigma (n, K) voxels."""
        raw = self.mlp(z).float().view(z.shape[0], self.n_splats, self.ndim + 2)
        centres = self.extent_voxels * torch.tanh(raw[..., : self.ndim])
        weights = raw[..., self.ndim]
        sigma = self.min_sigma_voxels + F.softplus(raw[..., self.ndim + 1])
        return centres, weights, sigma

    def posed(self, z: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor) -> torch.Tensor:
        centres, weights, sigma = self.splats(z)
        moved = torch.einsum("nij,nkj->nki", rotation.float(), centres) + shift_voxels.float()[:, None, :]
        return render_splats(moved, weights, sigma, self.spatial_shape)[:, None]

    def canonical(self, z: torch.Tensor) -> torch.Tensor:
        centres, weights, sigma = self.splats(z)
        return render_splats(centres, weights, sigma, self.spatial_shape)[:, None]
