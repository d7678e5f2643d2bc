"""The separable Gaussian-splat renderer against a direct dense evaluation, and its pose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryovae.model.decoders import SplatDecoder
from cryovae.model.splat import render_splats, render_splats_dense
from cryovae.rotations import random_rotations
from cryovae.volumes import rigid_transform


def _random_splats(batch: int, k: int, ndim: int, box: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(batch, k, ndim, generator=g, dtype=torch.float64) - 0.5) * box * 0.8
    weights = torch.randn(batch, k, generator=g, dtype=torch.float64)
    sigma = 0.6 + 2.0 * torch.rand(batch, k, generator=g, dtype=torch.float64)
    return centres, weights, sigma


@pytest.mark.parametrize("shape", [(12, 10, 8), (9, 9)])
def test_separable_render_equals_dense_evaluation(shape):
    centres, weights, sigma = _random_splats(3, 17, len(shape), min(shape))
    fast = render_splats(centres, weights, sigma, shape)
    dense = render_splats_dense(centres, weights, sigma, shape)
    assert fast.shape == (3,) + shape
    # the separable profiles are cut below exp(-20) of their peak: |difference| <= 2e-9 * sum |w|
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=2e-9 * float(weights.abs().sum(1).max()))


def test_dense_reference_is_a_gaussian_at_the_right_voxel():
    """One splat at (x, y, z) = (2, -1, 3) rel. to N//2: the peak is at array index (z, y, x) = c + (3, -1, 2)."""
    box = 10
    centres = torch.tensor([[[2.0, -1.0, 3.0]]], dtype=torch.float64)
    vol = render_splats(centres, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), (box,) * 3)
    peak = np.unravel_index(int(vol.argmax()), vol.shape[1:])
    assert peak == (box // 2 + 3, box // 2 - 1, box // 2 + 2)
    assert float(vol.max()) == pytest.approx(1.0)
    # the value one voxel away along x is exp(-1/2)
    assert float(vol[0, peak[0], peak[1], peak[2] + 1]) == pytest.approx(np.exp(-0.5))


def test_render_gradients_match_dense_gradients():
    centres, weights, sigma = _random_splats(2, 5, 3, 8, seed=3)
    target = torch.randn(2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (render_splats, render_splats_dense):
        params = [t.clone().requires_grad_(True) for t in (centres, weights, sigma)]
        ((fn(*params, (8, 8, 8)) - target) ** 2).sum().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_splat_pose_agrees_with_rigidly_moving_the_canonical_rendering():
    """Rotating the centres exactly (splat) and resampling the canonical volume (grid_sample) agree."""
    torch.manual_seed(0)
    box = 24
    dec = SplatDecoder((box,) * 3, n_splats=6, latent_dims=4, hidden=16).double()
    with torch.no_grad():
        dec.mlp[-1].bias.view(6, 5)[:, :3] *= 0.5   # centres within ~5 voxels of the box centre
        dec.mlp[-1].bias.view(6, 5)[:, 4] = 4.0     # sigma ~4.5 voxels: trilinear error ~2%
    z = torch.randn(2, 4, dtype=torch.float64)
    rot = torch.tensor(random_rotations(2, np.random.default_rng(4)))
    shift = torch.tensor([[1.5, -0.5, 0.75], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        posed = dec.posed(z, rot, shift)
        moved = rigid_transform(dec.canonical(z), rot, shift)
    # compare within 8 voxels of the centre: the resampled canonical volume is cut at the box
    # edge (12 voxels), which the exact splats are not
    r = torch.arange(box, dtype=torch.float64) - box // 2
    inner = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= 8**2
    err = (posed - moved)[:, 0][:, inner].abs().max() / posed.abs().max()
    assert err < 0.03
