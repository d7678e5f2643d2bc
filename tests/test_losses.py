"""Loss terms against hand-computed values and second routes; weight schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryovae.config import Schedule
from cryovae.model.losses import (
    affinity_loss, kl_divergence, pose_loss, reconstruction_error, wedge_mask,
)
from cryovae.rotations import symmetry_group
from cryovae.schedules import schedule_value

MU = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -2.0]])
AFFINITY = torch.tensor([[1.0, 0.5], [0.5, 1.0]])


def test_affinity_loss_l1_hand_computed():
    # pairs (0,1): cos 0 vs 0.5; (0,2): cos 1/sqrt2 vs 1; (1,2): cos 1/sqrt2 vs 0.5; particle 3 is unknown
    classes = torch.tensor([0, 1, 0, -1])
    expected = (0.5 + (1 - 1 / math.sqrt(2)) + (1 / math.sqrt(2) - 0.5)) / 3
    assert float(affinity_loss(MU, classes, AFFINITY, "l1")) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1 / 3)


def test_affinity_loss_l2_hand_computed():
    classes = torch.tensor([0, 1, 0, -1])
    expected = (0.25 + (1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2) - 0.5) ** 2) / 3
    assert float(affinity_loss(MU, classes, AFFINITY, "l2")) == pytest.approx(expected, rel=1e-6)


def test_affinity_loss_without_known_pairs_is_zero_with_gradient():
    mu = MU.clone().requires_grad_(True)
    loss = affinity_loss(mu, torch.tensor([0, -1, -1, -1]), AFFINITY, "l1")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(mu.grad == 0)


def test_kl_hand_computed_and_against_torch_distributions():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    # particle 0: 0.5 + (3.5 - ln 2); particle 1: 0
    assert float(kl_divergence(mean, logvar)) == pytest.approx((0.5 + 3.5 - math.log(2.0)) / 2, rel=1e-6)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert float(kl_divergence(mean, logvar)) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("shape", [(8, 8, 8), (6, 7, 9)])
def test_fourier_error_with_nothing_missing_is_the_mse(shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn((3, 1) + shape, generator=g), torch.randn((3, 1) + shape, generator=g)
    rfft_shape = shape[:-1] + (shape[-1] // 2 + 1,)
    full = wedge_mask(shape, (-90.0, 90.0)) if len(set(shape)) == 1 else torch.ones(rfft_shape, dtype=torch.bool)
    assert bool(full.all()) and full.shape == rfft_shape
    torch.testing.assert_close(reconstruction_error(a, b, full), ((a - b) ** 2).flatten(1).mean(1))


def test_wedge_mask_geometry():
    n = 16
    mask = wedge_mask((n, n, n), (-60.0, 60.0))
    # index [kz, ky, kx] (kz, ky wrap around as in fftfreq)
    assert mask[0, 0, 4]                      # along kx: measured at every tilt
    assert not mask[4, 0, 0]                  # along kz (the beam): missing
    assert mask[0, 5, 0]                      # the tilt axis ky: always measured
    assert mask[3, 2, 3] and mask[-3, 1, 3]   # 45 degrees either side: measured
    assert not mask[6, 0, 2]                  # atan(6/2) = 71.6 degrees: missing
    assert not mask[-6, 0, 2]
    # an asymmetric range is not symmetric in kz: a tilt theta images along (-sin theta, 0, cos theta)
    # (cryovae.ctf's tilt geometry), so it samples the direction (kx, kz) = (cos theta, sin theta)
    tilted = wedge_mask((n, n, n), (-30.0, 60.0))
    assert tilted[3, 0, 3] and not tilted[-3, 0, 3]


def test_masked_error_ignores_content_in_the_missing_wedge():
    n = 16
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    along_z = torch.cos(2 * math.pi * 3 * z / n)[None, None]   # only kz = +-3: missing
    along_x = torch.cos(2 * math.pi * 3 * x / n)[None, None]   # only kx = 3: measured
    mask = wedge_mask((n, n, n), (-60.0, 60.0))
    zero = torch.zeros_like(along_z)
    assert float(reconstruction_error(along_z, zero, mask)) == pytest.approx(0.0, abs=1e-9)
    assert float(reconstruction_error(along_x, zero, mask)) == pytest.approx(0.5, rel=1e-5)
    assert float(reconstruction_error(along_z, zero, None)) == pytest.approx(0.5, rel=1e-5)


def test_pose_loss_known_angles_and_symmetry():
    true = torch.tensor(Rotation.from_euler("zyz", [[10, 20, 30]], degrees=True).as_matrix(), dtype=torch.float64)
    about_z = torch.tensor(Rotation.from_euler("z", [30], degrees=True).as_matrix(), dtype=torch.float64)
    shift = torch.zeros(1, 3, dtype=torch.float64)
    assert float(pose_loss(true, shift, true, shift)) == pytest.approx(0.0, abs=1e-5)
    pred = true @ about_z
    assert float(pose_loss(pred, shift, true, shift)) == pytest.approx(math.radians(30), rel=1e-6)
    assert float(pose_loss(true, shift + torch.tensor([[1.0, 2.0, 0.0]]), true, shift)) == pytest.approx(5.0, abs=1e-5)
    # with C2 about z, true @ Rz(180) + 30 degrees is 30 degrees from a mate, not 150
    c2 = torch.tensor(symmetry_group("C2"), dtype=torch.float64)[None]
    flip = torch.tensor(Rotation.from_euler("z", [210], degrees=True).as_matrix(), dtype=torch.float64)
    assert float(pose_loss(true @ flip, shift, true, shift)) == pytest.approx(math.radians(150), rel=1e-6)
    assert float(pose_loss(true @ flip, shift, true, shift, c2)) == pytest.approx(math.radians(30), rel=1e-6)


def test_pose_loss_gradient_is_finite_at_zero_error():
    true = torch.tensor(Rotation.random(4, random_state=1).as_matrix(), dtype=torch.float32)
    pred = true.clone().requires_grad_(True)
    pose_loss(pred, torch.zeros(4, 3), true, torch.zeros(4, 3)).backward()
    assert torch.isfinite(pred.grad).all()


def test_schedules():
    assert schedule_value(2.0, Schedule(kind="constant", start=0.3), 7) == 2.0
    ramp = Schedule(kind="ramp", start=0.0, ramp_epochs=4)
    assert [schedule_value(2.0, ramp, e) for e in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    ramp_from = Schedule(kind="ramp", start=0.5, ramp_epochs=2)
    assert [schedule_value(1.0, ramp_from, e) for e in range(3)] == [0.5, 0.75, 1.0]
    cyc = Schedule(kind="cyclical", start=0.0, ramp_epochs=4)
    assert [schedule_value(1.0, cyc, e) for e in range(9)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0]
    assert np.all(np.diff([schedule_value(1.0, ramp, e) for e in range(10)]) >= 0)
