"""Volume maths: the rigid transform about voxel N//2 (scipy and torch), Fourier crop/pad and
shift, rfft weights, low/band-pass filters and the cross-correlation peak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryovae.rotations import random_rotations, relion_euler_to_matrix
from cryovae.volumes import (
    bandpass_filter, check_rigid_transform, correlation_peak, cross_correlation, energy_support, fourier_crop,
    fourier_resample, friedel_half, ball_points, frequency_magnitude, lowpass_filter, nearby_cross_correlation, phase_shift, raised_cosine_lowpass, rfft_weights,
    rigid_transform, rigid_transform_within, rotate_volume, sample_rigid, support_radius, window_peak,
)


def _blob_volume(shape, centre_xyz, sigma=1.5):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    x, y, z = centre_xyz
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * sigma**2))


def _centre_of_mass_xyz(vol):
    zz, yy, xx = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]].astype(float)
    return np.array([(vol * xx).sum(), (vol * yy).sum(), (vol * zz).sum()]) / vol.sum()


# ----------------------------------------------------------------------------- the scipy reference


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 28, 30), (25, 25, 25)])
def test_rotate_volume_moves_blob_to_a_times_position_plus_shift(shape):
    centre = np.array([s // 2 for s in shape[::-1]], float)  # x, y, z
    p = np.array([4.0, -3.0, 2.5])
    ref = _blob_volume(shape, centre + p)
    a = relion_euler_to_matrix([30.0, 60.0, 100.0])
    pixel = 2.5
    origin = np.array([1.0, -2.0, 0.5]) * pixel  # rlnOriginX/Y/ZAngst
    particle = rotate_volume(ref, a, origin, pixel)
    # content that was at c + p sits at c + A p + d, with d = -origin / pixel
    np.testing.assert_allclose(_centre_of_mass_xyz(particle), centre + a @ p - origin / pixel, atol=0.02)


def test_rotate_volume_of_an_image_moves_blob_to_r_times_position_plus_shift():
    box, theta = 20, 0.9
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    p, d = np.array([3.0, -2.0]), np.array([1.25, -0.5])
    yy, xx = np.mgrid[:box, :box].astype(float) - box // 2
    img = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 1.2**2))
    out = rotate_volume(img, rot, -d)
    w = out / out.sum()
    np.testing.assert_allclose([(w * xx).sum(), (w * yy).sum()], rot @ p + d, atol=0.03)


def test_rotate_volume_centre_is_voxel_n_over_2():
    shape = (16, 16, 16)
    ref = np.zeros(shape)
    ref[8, 8, 8] = 1.0  # voxel N//2: fixed by any rotation
    out = rotate_volume(ref, relion_euler_to_matrix([33.0, 71.0, -12.0]))
    assert out[8, 8, 8] == pytest.approx(1.0)


def test_rotate_volume_then_inverse_returns_reference():
    shape = (32, 32, 32)
    ref = _blob_volume(shape, (18.0, 13.0, 16.0), 2.0) + _blob_volume(shape, (12.0, 17.0, 20.0), 1.5)
    a = relion_euler_to_matrix([75.0, 40.0, 15.0])
    back = rotate_volume(rotate_volume(ref, a, order=3), a.T, order=3)
    assert np.corrcoef(back.ravel(), ref.ravel())[0, 1] > 0.999


# ----------------------------------------------------------------------------- the torch transform


@pytest.mark.parametrize("shape", [(12, 15, 16), (16, 16, 16), (15, 15, 15), (15, 16), (20, 20)])
def test_rigid_transform_agrees_with_scipy_about_n_over_2(shape):
    assert check_rigid_transform(rigid_transform, shape=shape) < 1e-12
    assert check_rigid_transform(rigid_transform, shape=shape, dtype=torch.float32) < 2e-6


def test_check_rigid_transform_catches_the_wrong_centre_and_the_inverse_rotation():
    def about_the_array_middle(v, r, s):  # torch's affine_grid: rotation about (N - 1) / 2
        theta = torch.cat([r.transpose(1, 2), torch.zeros(len(r), 3, 1, dtype=r.dtype)], 2)
        grid = torch.nn.functional.affine_grid(theta, (len(v), 1) + tuple(v.shape[1:]), align_corners=False)
        return torch.nn.functional.grid_sample(v[:, None], grid, align_corners=False)[:, 0]

    assert check_rigid_transform(about_the_array_middle, shape=(16, 16, 16), with_shift=False) > 0.05
    assert check_rigid_transform(lambda v, r, s: rigid_transform(v, r.transpose(1, 2), s)) > 0.1
    assert check_rigid_transform(lambda v, r, s: rigid_transform(v, r, -s)) > 0.1


def test_rigid_transform_keeps_channels_and_is_differentiable():
    rng = np.random.default_rng(2)
    vols = torch.tensor(rng.standard_normal((2, 3, 6, 7, 8)), requires_grad=True)
    rot = torch.tensor(random_rotations(2, rng), requires_grad=True)
    shift = torch.tensor(rng.uniform(-1, 1, (2, 3)), requires_grad=True)
    out = rigid_transform(vols, rot, shift)
    assert out.shape == vols.shape
    for c in range(3):  # each channel moved as a volume of its own
        torch.testing.assert_close(out[:, c], rigid_transform(vols[:, c], rot, shift))
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (vols, rot, shift))


def test_rigid_transform_matches_smooth_analytic_rotation():
    # Against the exact rotated object (not another interpolation): within interpolation error.
    shape = (32, 32, 32)
    c = np.array([16.0, 16.0, 16.0])
    p1, p2 = np.array([5.0, 0.0, -3.0]), np.array([-2.0, 6.0, 1.0])
    ref = _blob_volume(shape, c + p1, 2.0) + _blob_volume(shape, c + p2, 2.0)
    a = relion_euler_to_matrix([12.0, 100.0, 47.0])
    exact = _blob_volume(shape, c + a @ p1, 2.0) + _blob_volume(shape, c + a @ p2, 2.0)
    ours = rigid_transform(torch.tensor(ref[None]), torch.tensor(a[None])).numpy()[0]
    assert np.abs(ours - exact).max() < 0.1  # trilinear error on sigma = 2 voxel blobs of height 1
    assert np.corrcoef(ours.ravel(), exact.ravel())[0, 1] > 0.998


# ----------------------------------------------------------------------------- Fourier grids and weights


@pytest.mark.parametrize("shape", [(8, 8, 8), (6, 7, 9), (5, 5, 5), (7, 10)])
def test_rfft_weights_give_parseval_and_the_variance_without_dc(shape):
    x = torch.randn((3,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 2.0
    dims = tuple(range(1, len(shape) + 1))
    power = torch.fft.rfftn(x, dim=dims).abs() ** 2
    voxels = int(np.prod(shape))
    torch.testing.assert_close((rfft_weights(shape) * power).sum(dims) / voxels, (x**2).sum(dims))
    variance = (rfft_weights(shape, dc_weight=0.0) * power).sum(dims) / voxels**2
    torch.testing.assert_close(variance, x.flatten(1).var(1, unbiased=False))


def test_frequency_magnitude_of_a_non_cubic_grid():
    k = frequency_magnitude((4, 6, 8))
    assert k.shape == (4, 6, 5)
    assert k[1, 0, 0] == pytest.approx(0.25) and k[0, 5, 0] == pytest.approx(1 / 6) and k[0, 0, 4] == 0.5
    assert k[2, 3, 4] == pytest.approx(np.sqrt(0.5**2 + 0.5**2 + 0.5**2))


# ----------------------------------------------------------------------------- crop, pad and shift


def test_fourier_crop_keeps_the_centre_voxel_and_the_mean():
    fine = torch.zeros((64, 64, 64))
    fine[32, 32, 32] = 1.0
    fine[10, 50, 20] = 0.5
    coarse = fourier_resample(fine, 32).numpy()
    assert np.unravel_index(np.argmax(coarse), coarse.shape) == (16, 16, 16)
    assert coarse.mean() == pytest.approx(fine.mean().item(), rel=1e-5)


def test_fourier_crop_keeps_low_frequencies_and_pad_then_crop_is_the_identity():
    rng = np.random.default_rng(3)
    vol = torch.as_tensor(rng.normal(size=(2, 16, 16, 16)))
    spectrum = torch.fft.rfftn(vol, dim=(1, 2, 3))
    small = fourier_crop(spectrum, 8)
    # frequencies |k| < 4 (Fourier pixels) of the small box are the big box's, times (8/16)^3
    for kz, ky, kx in ((0, 0, 0), (1, 2, 3), (-3, 1, 2), (2, -3, 0)):
        assert small[:, kz, ky, kx] == pytest.approx(spectrum[:, kz, ky, kx].numpy() / 8)
    assert (small[:, 4] == 0).all() and (small[:, :, 4] == 0).all() and (small[..., 4] == 0).all()
    kept = fourier_crop(spectrum, 8, keep_nyquist=True)  # the -4 planes of the big box, and kx = +4
    assert kept[:, 4, 1, 2] == pytest.approx(spectrum[:, -4, 1, 2].numpy() / 8)
    assert kept[:, 1, 4, 4] == pytest.approx(spectrum[:, 1, -4, 4].numpy() / 8)
    smooth = fourier_resample(vol, 8)
    np.testing.assert_allclose(fourier_resample(fourier_resample(smooth, 16), 8), smooth, atol=1e-12)
    np.testing.assert_allclose(fourier_resample(smooth, 8), smooth, atol=1e-12)
    # padding interpolates: every second voxel of the padded volume is the small one
    np.testing.assert_allclose(fourier_resample(smooth, 16)[:, ::2, ::2, ::2], smooth, atol=1e-12)


def test_phase_shift_by_whole_voxels_is_a_roll():
    rng = np.random.default_rng(3)
    vol = torch.as_tensor(rng.normal(size=(2, 16, 16, 16)), dtype=torch.float32)
    shifts = torch.tensor([[2.0, -1.0, 3.0], [0.0, 5.0, -7.0]])
    moved = torch.fft.irfftn(phase_shift(torch.fft.rfftn(vol, dim=(1, 2, 3)), shifts), s=(16,) * 3, dim=(1, 2, 3))
    np.testing.assert_allclose(moved[0], np.roll(vol[0].numpy(), (3, -1, 2), axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(moved[1], np.roll(vol[1].numpy(), (-7, 5, 0), axis=(0, 1, 2)), atol=1e-5)
    odd = torch.as_tensor(rng.normal(size=(1, 15, 15, 15)))
    moved = torch.fft.irfftn(phase_shift(torch.fft.rfftn(odd, dim=(1, 2, 3)), shifts[:1]), s=(15,) * 3, dim=(1, 2, 3))
    np.testing.assert_allclose(moved[0], np.roll(odd[0].numpy(), (3, -1, 2), axis=(0, 1, 2)), atol=1e-5)


# ----------------------------------------------------------------------------- filters


def test_lowpass_and_bandpass_transmission():
    box, pixel = 32, 5.0
    k_px = frequency_magnitude(box).numpy() * box
    low = lowpass_filter(box, pixel, 20.0).numpy()  # cutoff 8 Fourier pixels, edge 7..9
    assert low[k_px <= 7].min() == 1.0 and low[k_px >= 9].max() == 0.0
    assert low[0, 0, 8] == pytest.approx(0.5)
    band = bandpass_filter(box, pixel, 80.0, 20.0).numpy()  # 2 .. 8 Fourier pixels
    assert band[0, 0, 0] == 0.0 and band[0, 0, 2] == pytest.approx(0.5) and band[0, 0, 8] == pytest.approx(0.5)
    assert band[(k_px >= 3) & (k_px <= 7)].min() == 1.0 and band[k_px <= 1].max() == 0.0
    with pytest.raises(ValueError, match="low > high"):
        bandpass_filter(box, pixel, 20.0, 80.0)
    # any shape, cycles per pixel: the edge from 0.8 to 1.0 x cutoff
    t = raised_cosine_lowpass((10, 12, 16), 0.9 * 0.25, 0.2 * 0.25).numpy()
    k = frequency_magnitude((10, 12, 16)).numpy()
    assert t[k <= 0.2].min() == 1.0 and t[k >= 0.25].max() == 0.0


# ----------------------------------------------------------------------------- correlation peak


def test_correlation_peak_finds_integer_and_sub_voxel_shifts():
    shape = (24, 26, 28)  # blobs stay inside: the correlation is circular
    c = np.array([s // 2 for s in shape[::-1]], float)
    ref = _blob_volume(shape, c + [1.0, -2.0, 0.5], 2.0) + 0.5 * _blob_volume(shape, c + [-3.0, 2.0, 1.0], 1.5)
    shifts = np.array([[3.0, -2.0, 4.0], [0.3, -0.4, 0.2], [-6.0, 5.0, -1.0]])
    moved = np.stack([_blob_volume(shape, c + [1.0, -2.0, 0.5] + d, 2.0)
                      + 0.5 * _blob_volume(shape, c + [-3.0, 2.0, 1.0] + d, 1.5) for d in shifts])
    ref_ft = torch.fft.rfftn(torch.tensor(ref))
    cc = cross_correlation(torch.fft.rfftn(torch.tensor(moved), dim=(1, 2, 3)), ref_ft, shape)
    displacement, peak = correlation_peak(cc)
    np.testing.assert_allclose(displacement.numpy(), shifts, atol=0.1)
    assert peak[0] == pytest.approx(float((ref * ref).sum()), rel=1e-6)  # a whole-voxel move: the autocorrelation


def test_nearby_cross_correlation_is_the_padded_correlation_near_zero_displacement():
    """On a 16³ product spectrum: the values of the correlation padded to 32³ at displacements
    within 4 voxels, and a peak (sub-voxel too) where the padded correlation has it."""
    rng = np.random.default_rng(5)
    blob = _blob_volume((32, 32, 32), np.array([16.0, 15.0, 17.0]), 2.5)
    spectrum = fourier_crop(torch.fft.rfftn(torch.tensor(blob)), 16)
    shifts = torch.tensor([[2.0, -3.0, 1.0], [0.6, -1.3, 2.4]]) / 2  # content moved (x, y, z), in 16³ voxels
    product = phase_shift(spectrum.expand(2, *spectrum.shape), shifts) * spectrum.conj()
    product = product + 0.01 * torch.tensor(rng.normal(size=product.shape))  # not Hermitian-exact: still a real part
    padded = torch.fft.irfftn(fourier_crop(product, 32), s=(32,) * 3, dim=(1, 2, 3))
    window = torch.arange(-4, 5) % 32
    expected = padded[:, window][:, :, window][:, :, :, window]
    near = nearby_cross_correlation(product, 32, 4)
    assert torch.allclose(near, expected, atol=1e-9 * float(expected.abs().max()))
    displacement, peak = window_peak(near)
    full_displacement, full_peak = correlation_peak(padded)
    assert torch.allclose(displacement, full_displacement, atol=1e-9) and torch.allclose(peak, full_peak)
    np.testing.assert_allclose(displacement.numpy(), 2 * shifts.numpy(), atol=0.15)


def test_window_peak_gives_no_sub_voxel_offset_at_the_window_edge():
    cc = torch.zeros(1, 5, 5, 5, dtype=torch.float64)
    cc[0, 2, 2, 4], cc[0, 2, 2, 3] = 1.0, 0.5  # peak at x = +2 (the edge), rising towards it
    displacement, peak = window_peak(cc)
    assert displacement.tolist() == [[2.0, 0.0, 0.0]] and float(peak) == 1.0


@pytest.mark.parametrize("shape", [(12, 15, 16), (9, 14)])
def test_sample_rigid_gives_the_rigid_transform_at_the_points_it_is_asked_for(shape):
    """At every voxel of an odd and uneven box (3D) or image (2D), with channels and shifts,
    sample_rigid is rigid_transform, and so it agrees with scipy about voxel N//2."""
    rng = np.random.default_rng(3)
    ndim = len(shape)
    volumes = torch.tensor(rng.normal(size=(3, 2) + shape))
    rotation = torch.linalg.qr(torch.tensor(rng.normal(size=(3, ndim, ndim))))[0]
    shift = torch.tensor(rng.uniform(-2, 2, (3, ndim)))
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    every = torch.stack(grids[::-1], -1).reshape(-1, ndim)  # (x, y[, z]) per voxel, flat (z, y, x) order
    chosen = every[torch.as_tensor(rng.choice(len(every), 50, replace=False))]
    full = rigid_transform(volumes, rotation, shift).reshape(3, 2, -1)
    flat_index = sum(chosen[:, a] * int(np.prod(shape[::-1][:a])) for a in range(ndim))
    assert torch.allclose(sample_rigid(volumes, rotation, every, shift), full, atol=1e-12)
    assert torch.allclose(sample_rigid(volumes, rotation, chosen, shift), full[..., flat_index], atol=1e-12)
    assert check_rigid_transform(lambda v, a, d: sample_rigid(v, a, every, d).reshape(v.shape), shape=shape) < 1e-12


def test_ball_points_are_the_voxels_within_half_the_box_of_the_centre():
    xyz, flat = ball_points(8)
    zz, yy, xx = np.mgrid[:8, :8, :8]
    inside = (xx - 4) ** 2 + (yy - 4) ** 2 + (zz - 4) ** 2 <= 16
    assert np.array_equal(flat.numpy(), np.flatnonzero(inside))
    assert np.array_equal(xyz.numpy(), np.stack([xx, yy, zz], -1).reshape(-1, 3)[np.flatnonzero(inside)])


def test_support_radius_holds_a_blob_and_gives_the_whole_box_to_a_background():
    blob = torch.as_tensor(_blob_volume((32, 32, 32), (16, 16, 16), sigma=2.0))
    radius = support_radius(blob, 1e-6)
    # a Gaussian's energy beyond r falls as exp(-r²/σ²): 1e-6 of it lies beyond about 3.7 σ, plus 2 voxels
    assert 8.5 < radius < 11.5
    assert support_radius(blob + 0.1, 1e-6) >= np.sqrt(3) * 16


def test_rigid_transform_within_the_support_is_the_rigid_transform():
    blob = torch.as_tensor(_blob_volume((32, 32, 32), (18, 15, 17), sigma=2.0), dtype=torch.float32)
    rotations = torch.as_tensor(random_rotations(3, np.random.default_rng(0)), dtype=torch.float32)
    stack = blob.expand(3, *blob.shape)
    within = rigid_transform_within(stack, rotations, ball_points(32, support_radius(blob, 1e-8)))
    full = rigid_transform(stack, rotations)
    assert ((within - full) ** 2).sum() <= 1e-8 * (full**2).sum()  # the tolerance asked for, in energy
    small = rigid_transform_within(stack, rotations, ball_points(32, 3.0))  # too small a ball: content lost
    assert (full - small).abs().max() > 0.1 * full.max()


def test_energy_support_keeps_the_fewest_columns_holding_the_energy():
    rows = torch.tensor([[3.0, 0.0, 1.0, 0.1], [4.0, 0.0, 0.0, 0.1]])  # column energies 25, 0, 1, 0.02
    assert energy_support(rows, 0.05).tolist() == [0]
    assert energy_support(rows, 0.01).tolist() == [0, 2]
    assert energy_support(rows, 0.0).tolist() == [0, 2, 3]


def test_friedel_half_sums_an_even_quantity_over_half_the_frequencies():
    box = 16
    xyz, _ = ball_points(box)
    k = (xyz - box // 2).double()
    even = torch.exp(-(k**2).sum(1) / 20.0) * (1 + k[:, 0] ** 2 * k[:, 1] ** 2)  # f(k) = f(-k)
    half, weight = friedel_half(xyz, box)
    assert len(half) < 0.52 * len(xyz)
    assert torch.isclose((even[half] * weight.double()).sum(), even.sum())
    odd = even * k[:, 2]  # an odd quantity does not fold: the test can tell
    assert not torch.isclose((odd[half] * weight.double()).sum(), odd.sum(), atol=1e-3)
