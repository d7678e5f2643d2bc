"""The encoder: a strided CNN giving a shape latent (mean, log-variance) and an explicit pose."""

from __future__ import annotations

import math

import torch
from torch import nn

from cryovae.model.transform import embed_rotation_2d, rotation_from_angle_vector
from cryovae.rotations import matrix_from_6d_torch


def conv_layer(ndim: int, transpose: bool = False) -> type[nn.Module]:
    """nn.Conv2d/3d or nn.ConvTranspose2d/3d for 2 or 3 spatial dimensions."""
    if transpose:
        return nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def reduced_size(size: int, depth: int) -> int:
    """Edge after ``depth`` stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(depth):
        size = (size + 1) // 2
    return size


class Encoder(nn.Module):
    """(n, 1, D, H, W) or (n, 1, H, W) -> latent mean/logvar (n, L), rotation, shift in voxels.

    One stride-2 3x3(x3) convolution + SiLU per entry of ``channels``, then a hidden layer and
    linear heads.  The 3D rotation is predicted in the continuous 6D representation (bias
    initialised to the identity) and returned as a (n, 3, 3) particle-from-canonical matrix;
    in 2D an angle as a (cos, sin) pair gives (n, 2, 2).  The shift (n, d) is in voxels,
    (x, y[, z]), the displacement of the particle's content centre from voxel N//2.
    """

    def __init__(self, spatial_shape: tuple[int, ...], channels: list[int], latent_dims: int, hidden: int):
        super().__init__()
        self.ndim = len(spatial_shape)
        self.latent_dims = latent_dims
        conv = conv_layer(self.ndim)
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [conv(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        n_features = c_in * math.prod(reduced_size(s, len(channels)) for s in spatial_shape)
        self.hidden = nn.Sequential(nn.Linear(n_features, hidden), nn.SiLU())
        self.pose_dims = 6 if self.ndim == 3 else 2
        self.head = nn.Linear(hidden, 2 * latent_dims + self.pose_dims + self.ndim)
        with torch.no_grad():
            identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] if self.ndim == 3 else [1.0, 0.0]
            self.head.bias[2 * latent_dims : 2 * latent_dims + self.pose_dims] = torch.tensor(identity)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (n, 1, *spatial) -> latent_mean, latent_logvar (n, L); rotation (n, d, d); shift_voxels (n, d);
        hidden (n, hidden): the trunk's last layer, which a classifier head reads."""
        x = x.to(memory_format=torch.channels_last_3d if self.ndim == 3 else torch.channels_last)
        hidden = self.hidden(self.features(x))
        out = self.head(hidden).float()
        lat = self.latent_dims
        pose = out[:, 2 * lat : 2 * lat + self.pose_dims]
        rotation = matrix_from_6d_torch(pose) if self.ndim == 3 else rotation_from_angle_vector(pose)
        return {
            "latent_mean": out[:, :lat],
            "latent_logvar": out[:, lat : 2 * lat],
            "rotation": rotation,
            "shift_voxels": out[:, 2 * lat + self.pose_dims :],
            "hidden": hidden,
        }


def rotation_3x3(rotation: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) unchanged; (n, 2, 2) in-plane rotations as rotations about z."""
    return rotation if rotation.shape[-1] == 3 else embed_rotation_2d(rotation)
