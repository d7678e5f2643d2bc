"""The affinity-VAE: encoder (shape latent + explicit pose) and a CNN or splat decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cryovae.model.decoders import CnnDecoder, SplatDecoder
from cryovae.model.encoder import Encoder, rotation_3x3


class AffinityVAE(nn.Module):
    """Shape latent + pose -> reconstruction, for 2D images (H, W) or 3D volumes (D, H, W).

    Inputs are (n, 1, *spatial_shape).  The pose is explicit: the decoder builds the
    canonical-frame volume of the shape latent and the predicted pose moves it into the
    particle frame, so the latent carries shape, the pose carries orientation and shift.
    """

    def __init__(
        self,
        spatial_shape: tuple[int, ...] | list[int],
        channels: list[int],
        latent_dims: int,
        decoder: str = "cnn",
        n_splats: int = 128,
        hidden: int = 256,
        pixel_size_angstrom: float = 1.0,
    ):
        super().__init__()
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) not in (2, 3):
            raise ValueError(f"expected 2D (H, W) or 3D (D, H, W) data, got spatial shape {spatial_shape}")
        self.config = {
            "spatial_shape": list(spatial_shape), "channels": [int(c) for c in channels],
            "latent_dims": int(latent_dims), "decoder": decoder, "n_splats": int(n_splats),
            "hidden": int(hidden), "pixel_size_angstrom": float(pixel_size_angstrom),
        }
        self.spatial_shape = spatial_shape
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.encoder = Encoder(spatial_shape, list(channels), latent_dims, hidden)
        if decoder == "cnn":
            self.decoder = CnnDecoder(spatial_shape, list(channels), latent_dims, hidden)
        elif decoder == "splat":
            self.decoder = SplatDecoder(spatial_shape, n_splats, latent_dims, hidden)
        else:
            raise ValueError(f"decoder must be 'cnn' or 'splat', got {decoder!r}")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Everything :class:`AffinityVAE` needs to be rebuilt (plain types)."""
        return dict(self.config)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> dict:
        """x (n, 1, *spatial) -> encoder outputs plus ``z`` (n, L) and ``reconstruction`` (x's shape).

        With ``sample`` the latent is drawn by reparameterisation with noise from
        ``generator`` (a CPU generator, so that runs are reproducible on any device);
        otherwise the mean is used.
        """
        enc = self.encoder(x)
        z = enc["latent_mean"]
        if sample:
            eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
            if z.device.type == "cuda":   # asynchronous copy: a pageable one would wait for the GPU
                eps = eps.pin_memory()
            eps = eps.to(z.device, non_blocking=True)
            z = z + eps * torch.exp(0.5 * enc["latent_logvar"])
        enc["z"] = z
        enc["reconstruction"] = self.decoder.posed(z, enc["rotation"], enc["shift_voxels"])
        return enc

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (n, 1, *spatial) -> latent_mean, latent_logvar (n, L); rotation (n, 3, 3);
        origin_angstrom (n, 3).

        rotation is particle-from-canonical in RELION's convention (2D: about z);
        origin_angstrom is rlnOriginX/Y/ZAngst = -shift * pixel size (2D: z = 0).
        """
        enc = self.encoder(x)
        shift = enc["shift_voxels"]
        if shift.shape[1] == 2:
            shift = torch.cat([shift, torch.zeros_like(shift[:, :1])], dim=1)
        return {
            "latent_mean": enc["latent_mean"],
            "latent_logvar": enc["latent_logvar"],
            "rotation": rotation_3x3(enc["rotation"]),
            "origin_angstrom": -shift * self.pixel_size_angstrom,
        }

    def decode(self, z: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor) -> torch.Tensor:
        """Particle-frame volume (n, 1, *spatial) of latents (n, L) in pose (rotation (n, d, d), shift (n, d))."""
        return self.decoder.posed(z, rotation, shift_voxels)

    @torch.no_grad()
    def decode_canonical(self, z: torch.Tensor) -> torch.Tensor:
        """Canonical-frame volume (n, 1, *spatial) of latents (n, L)."""
        return self.decoder.canonical(z)
