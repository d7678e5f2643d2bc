"""Loss terms of the affinity-VAE.

total = reconstruction + beta * (KL + class KL) + gamma * affinity + pose_weight * pose
        + alpha * classifier

- reconstruction: per-voxel mean squared error, optionally only over the Fourier
  components the missing wedge leaves measured (3D);
- KL: KL(q(z|x) || N(0, I)) summed over latent dimensions, averaged over the batch;
- affinity: mean over pairs i < j of |cos(mu_i, mu_j) - affinity[c_i, c_j]| (L1) or its
  square (L2), pairs of particles with a known class only;
- pose (simulated data): geodesic angle in radians to the true rotation (the closest
  symmetry mate for symmetric classes) plus the squared shift error in voxels;
- classifier, class KL (a model with classes): the labelled cross entropy and the unlabelled
  rows' KL of q(y|x) from the uniform prior (:mod:`cryovae.model.semisup`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cryovae.rotations import geodesic_distance_torch
from cryovae.volumes import rfft_weights

COMPONENTS = ("recon", "kl", "affinity", "pose")   # the loss terms, in history/log order
CLASSIFIER_COMPONENTS = ("classifier", "class_kl")   # and those of a model with classes


def kl_divergence(latent_mean: torch.Tensor, latent_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) for (n, L) inputs, summed over L, mean over n: scalar."""
    per_dim = -0.5 * (1.0 + latent_logvar - latent_mean**2 - latent_logvar.exp())
    return per_dim.sum(dim=1).mean()


def affinity_loss(
    latent_mean: torch.Tensor, class_index: torch.Tensor, affinity: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Pull pairwise latent cosine similarities toward class affinities: scalar.

    latent_mean (n, L); class_index (n,) int64 rows of ``affinity`` (C, C), -1 for a particle
    of no known class (left out).  Mean over the pairs i < j of known particles; zero (with
    a gradient path) when there is no such pair.
    """
    known = torch.nonzero(class_index >= 0).flatten()
    if known.numel() < 2:
        return latent_mean.sum() * 0.0
    pairs = torch.combinations(known, r=2)
    i, j = pairs[:, 0], pairs[:, 1]
    cos = F.cosine_similarity(latent_mean[i], latent_mean[j], dim=1, eps=1e-8)
    target = affinity[class_index[i], class_index[j]].to(cos.dtype)
    diff = cos - target
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return (diff**2).mean()
    raise ValueError(f"affinity loss must be 'l1' or 'l2', got {kind!r}")


def wedge_mask(spatial_shape: tuple[int, ...], tilt_range_deg: tuple[float, float]) -> torch.Tensor:
    """Fourier components a tilt series measures, in ``torch.fft.rfftn`` layout: bool (D, H, W//2+1).

    The simulation's own mask (:func:`cryovae.ctf.missing_wedge_mask`: tilt about Y, beam
    along Z, a tilt theta images along (-sin theta, 0, cos theta)), so that the loss ignores
    exactly what the simulated particles lack; extracted particles pass their own tilt range
    (:func:`cryovae.acquisition.split_tilt_range_deg`).  Cubic boxes only.
    """
    from cryovae.ctf import missing_wedge_mask

    if len(spatial_shape) != 3 or len(set(spatial_shape)) != 1:
        raise ValueError(f"the missing-wedge mask needs a cubic 3D box, got {spatial_shape}")
    return missing_wedge_mask(int(spatial_shape[0]), tilt_range_deg)


def reconstruction_error(
    reconstruction: torch.Tensor, target: torch.Tensor, fourier_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-particle mean squared error over the voxels: (n, 1, *spatial) x2 -> (n,).

    With ``fourier_mask`` (a (D, H, W//2+1) bool from :func:`wedge_mask`) the error is
    sum over measured components of |rfftn(r - x)|^2 (orthonormal, Hermitian-weighted)
    divided by the number of voxels: equal to the MSE when every component is measured.
    Computed in float32 whatever the input precision.
    """
    diff = (reconstruction.float() - target.float()).flatten(0, 1)   # (n, *spatial) (one channel)
    if fourier_mask is None:
        return diff.pow(2).flatten(1).mean(dim=1)
    spatial = tuple(diff.shape[1:])
    spectrum = torch.fft.rfftn(diff, dim=tuple(range(1, diff.ndim)), norm="ortho")
    weights = (rfft_weights(spatial).to(diff.device) * fourier_mask.to(diff.device)).float()
    power = spectrum.real**2 + spectrum.imag**2
    return (power * weights).flatten(1).sum(dim=1) / math.prod(spatial)


def pose_loss(
    rotation: torch.Tensor,
    shift_voxels: torch.Tensor,
    true_rotation: torch.Tensor,
    true_shift_voxels: torch.Tensor,
    symmetry_ops: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised pose term: mean geodesic angle (radians) + mean squared shift error (voxels^2).

    rotation, true_rotation (n, 3, 3) particle-from-reference; shifts (n, d) voxels.
    symmetry_ops (n, G, 3, 3): each particle's point group (identity-padded); the angle is
    to the closest of true_rotation @ g, the rotations that make the same particle.
    """
    if symmetry_ops is None:
        angle = geodesic_distance_torch(rotation, true_rotation)
    else:
        mates = true_rotation[:, None] @ symmetry_ops.to(true_rotation.dtype)
        angle = geodesic_distance_torch(rotation[:, None], mates).min(dim=1).values
    shift_err = (shift_voxels - true_shift_voxels).pow(2).sum(dim=1)
    return angle.mean() + shift_err.mean()
