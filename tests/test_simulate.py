"""Simulated subtomograms: reproducible shards, ground truth that matches the volumes, SNR, wedge, CTF."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryovae import simulate as sim
from cryovae import splits
from cryovae.config import validate_config
from cryovae.ctf import ctf_3d, integer_k2, missing_wedge_mask
from cryovae.errors import InputError
from cryovae.rotations import relion_euler_to_matrix
from cryovae.shards import read_particles_star
from cryovae.volumes import rotate_volume

BOX = 24
PIXEL = 10.0


def _blob_map(centres_xyz: list[tuple[float, float, float]], sigma: float = 1.6) -> np.ndarray:
    """An asymmetric (BOX³) map: Gaussian blobs at offsets (x, y, z) from voxel N//2."""
    zz, yy, xx = np.indices((BOX, BOX, BOX)).astype(float) - BOX // 2
    volume = np.zeros((BOX, BOX, BOX))
    for i, (x, y, z) in enumerate(centres_xyz):
        volume += (1.0 + 0.3 * i) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * sigma**2))
    return volume.astype(np.float32)


MAP_A = _blob_map([(0, 0, 0), (5, 0, 0), (0, 3, 0), (-2, -2, 4)])
MAP_B = _blob_map([(0, 0, 0), (-4, 2, 1), (3, -3, -3)])
MAP_C = _blob_map([(1, 1, 1), (-5, 0, 0)])


def _config(simulation: dict | None = None, **top) -> object:
    data = {
        "structures": {"a": "demo:a", "b": "demo:b", "c": "demo:c"},
        "unseen": ["c"],
        "pixel_size_angstrom": PIXEL,
        "box_size": BOX,
        "seed": 5,
        "simulation": {"particles_per_class": 20, "particles_per_shard": 16, **(simulation or {})},
        "training": {"batch_size": 16},  # at most the 2 x 20 training particles
    }
    data.update(top)
    return validate_config(data)


@pytest.fixture(scope="module")
def map_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("maps")
    paths = []
    for name, volume in (("a", MAP_A), ("b", MAP_B), ("c", MAP_C)):
        with mrcfile.new(folder / f"{name}.mrc") as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = PIXEL
        paths.append(folder / f"{name}.mrc")
    return paths


def _volumes(config, split="train", shard=0) -> tuple[np.ndarray, sim.ParticleDraws]:
    classes = splits.split_classes(config, split)
    maps = np.stack([{"a": MAP_A, "b": MAP_B, "c": MAP_C}[c] for c in classes])
    draws, generator = sim.draw_particles(config, split, shard)
    slot = np.array([classes.index(config.class_names[i]) for i in draws.class_index])
    return sim.simulate_volumes(config, maps, slot, draws, generator), draws


CLEAN = {"snr": None, "ctf": False, "tilt_range_deg": None, "normalise": False, "max_shift_px": 2.0}


# ----------------------------------------------------------------------------- plan and splits


def test_shard_plan_totals_and_split_classes():
    config = _config({"particles_per_class": 20, "val_fraction": 0.25, "test_fraction": 0.5,
                      "particles_per_shard": 16})
    assert splits.shard_plan(config, "train") == [14, 13, 13]  # 2 seen classes × 20, equal shards of <= 16
    assert splits.shard_plan(config, "val") == [10]  # 2 × round(5)
    assert splits.shard_plan(config, "test") == [15, 15]  # 3 classes × 10
    assert [splits.shard_start(config, "train", k) for k in range(3)] == [0, 14, 27]
    assert splits.shard_names(config, "train") == ["shard_000", "shard_001", "shard_002"]
    for split, classes in (("train", {"a", "b"}), ("val", {"a", "b"}), ("test", {"a", "b", "c"})):
        names = [config.class_names[i] for i in splits.class_sequence(config, split)]
        assert set(names) == classes
        assert len(names) == sum(splits.shard_plan(config, split))
        counts = {c: names.count(c) for c in classes}
        assert len(set(counts.values())) == 1  # balanced
    # the classes are interleaved, not in blocks
    seq = splits.class_sequence(config, "train")
    assert 0 < np.mean(seq[:16] == seq[0]) < 1


def test_shards_sized_by_work_hold_at_most_a_gib_of_voxels():
    big = {"particles_per_class": 10_000, "particles_per_shard": None}
    config = _config(big, box_size=32)
    assert splits.max_particles_per_shard(config) == 8192
    assert splits.shard_plan(config, "train") == [6667, 6667, 6666]  # 20,000 in 3 shards of <= 8,192
    assert splits.max_particles_per_shard(_config(big, box_size=64)) == 1024
    assert splits.shard_plan(_config(big, box_size=64), "val")[:2] == [1000, 1000]  # 5,000 in 5


def test_shard_that_does_not_exist_is_an_error():
    with pytest.raises(InputError, match="shard 3"):
        sim.draw_particles(_config(), "train", 3)


# ----------------------------------------------------------------------------- reproducibility and STAR


def test_same_config_same_bytes_and_shards_differ(map_files, tmp_path):
    config = _config()
    for name in ("one", "two"):
        sim.simulate_shard(config, "train", 0, map_files, tmp_path / name / "shard_000.npy",
                           tmp_path / name / "shard_000.star")
    sim.simulate_shard(config, "train", 1, map_files, tmp_path / "one" / "shard_001.npy",
                       tmp_path / "one" / "shard_001.star")
    first = (tmp_path / "one" / "shard_000.npy").read_bytes()
    assert first == (tmp_path / "two" / "shard_000.npy").read_bytes()
    assert (tmp_path / "one" / "shard_000.star").read_text().split("\n", 1)[1] == \
        (tmp_path / "two" / "shard_000.star").read_text().split("\n", 1)[1]  # line 1 holds a timestamp
    a = np.load(tmp_path / "one" / "shard_000.npy")
    b = np.load(tmp_path / "one" / "shard_001.npy")
    assert a.shape == (14, BOX, BOX, BOX) and a.dtype == np.float32
    assert np.array_equal(a, _volumes(config)[0])  # written batch by batch: the same as made in memory
    np.save(tmp_path / "whole.npy", a)
    assert (tmp_path / "whole.npy").read_bytes() == first  # and the bytes np.save writes
    assert abs(np.corrcoef(a[: len(b)].ravel(), b.ravel())[0, 1]) < 0.2
    other_seed = _config(seed=6)
    sim.simulate_shard(other_seed, "train", 0, map_files, tmp_path / "s6.npy", tmp_path / "s6.star")
    assert not np.array_equal(np.load(tmp_path / "s6.npy"), a)


def test_npy_written_in_batches_is_what_numpy_saves(tmp_path):
    whole = np.random.default_rng(0).standard_normal((7, 3, 4, 5)).astype(np.float32)
    sim.write_npy_batches(tmp_path / "b.npy", whole.shape, iter([whole[:3], whole[3:6], whole[6:]]))
    np.save(tmp_path / "a.npy", whole)
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()
    with pytest.raises(RuntimeError, match="wrote 3 of 7"):
        sim.write_npy_batches(tmp_path / "c.npy", whole.shape, iter([whole[:3]]))


def test_float16_storage_holds_the_float32_particles_rounded_and_reads_back_as_float32(map_files, tmp_path):
    from cryovae.shards import SubtomogramSet

    for dtype in ("float32", "float16"):
        folder = tmp_path / dtype
        folder.mkdir()
        sim.simulate_shard(_config({"storage_dtype": dtype}), "train", 0, map_files, folder / "shard_000.npy",
                           folder / "particles.star")
    single = np.load(tmp_path / "float32" / "shard_000.npy")
    half = np.load(tmp_path / "float16" / "shard_000.npy")
    assert half.dtype == np.dtype("<f2") and half.nbytes * 2 == single.nbytes
    assert np.array_equal(half, single.astype(np.float16))  # the same particles, rounded once
    read = SubtomogramSet.open(tmp_path / "float16").volumes(np.arange(len(half)))
    assert read.dtype == np.float32 and np.array_equal(read, half.astype(np.float32))
    assert np.abs(read - single).max() <= 2.0**-11 * np.abs(single).max()


def test_star_columns_and_optics(map_files, tmp_path):
    config = _config({"snr": 0.1})
    sim.simulate_shard(config, "test", 1, map_files, tmp_path / "shard_001.npy", tmp_path / "shard_001.star")
    particles, optics = read_particles_star(tmp_path / "shard_001.star")
    n = splits.shard_plan(config, "test")[1]
    assert list(particles["cryovaeParticleId"][:2]) == ["test_001_00000", "test_001_00001"]
    assert set(particles["cryovaeShard"]) == {"shard_001.npy"}
    assert list(particles["cryovaeIndex"]) == list(range(n))
    for name, number in zip(particles["cryovaeClassName"], particles["rlnClassNumber"]):
        assert config.class_names[number - 1] == name
    np.testing.assert_allclose(particles["cryovaeSnr"], 0.1)
    lo, hi = config.simulation.defocus_range_um
    assert particles["rlnDefocusU"].between(lo * 1e4, hi * 1e4).all()
    origins = particles[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy()
    assert np.abs(origins).max() <= config.simulation.max_shift_px * PIXEL
    row = optics.iloc[0]
    assert (row["rlnOpticsGroup"], row["rlnImageDimensionality"], row["rlnImageSize"]) == (1, 3, BOX)
    assert (row["rlnImagePixelSize"], row["rlnVoltage"], row["rlnSphericalAberration"],
            row["rlnAmplitudeContrast"]) == (PIXEL, 300.0, 2.7, 0.07)


def test_missing_or_wrong_map_is_an_error(map_files, tmp_path):
    config = _config()
    with pytest.raises(InputError, match="'b'.*b.mrc"):
        sim.simulate_shard(config, "train", 0, [map_files[0]], tmp_path / "x.npy", tmp_path / "x.star")
    wrong = tmp_path / "b.mrc"
    with mrcfile.new(wrong) as mrc:
        mrc.set_data(np.ones((8, 8, 8), np.float32))
        mrc.voxel_size = PIXEL
    with pytest.raises(InputError, match=r"b\.mrc.*box_size"):
        sim.simulate_shard(config, "train", 0, [map_files[0], wrong], tmp_path / "x.npy", tmp_path / "x.star")
    assert not (tmp_path / "x.npy").exists()


# ----------------------------------------------------------------------------- the truth


def _sphere_band(volume: np.ndarray) -> np.ndarray:
    """The volume limited to the Nyquist sphere |k| < N/2 (the simulation's Fourier support)."""
    inside = integer_k2(volume.shape[-1]) < (volume.shape[-1] // 2) ** 2
    return np.fft.irfftn(np.fft.rfftn(volume) * inside, s=volume.shape, axes=(0, 1, 2))


def test_fourier_rendering_agrees_with_rotations_rotate_volume():
    """Spectra sampled at A^T k with a phase for the shift = rotations.rotate_volume (order-5 spline)."""
    rng = np.random.default_rng(0)
    rotation = sim.random_rotations(6, rng)
    shift = rng.uniform(-2, 2, (6, 3))
    support = sim.FourierSupport.from_config(_config(CLEAN))
    spectra = sim.padded_spectra(MAP_A[None], 2)
    values = sim.particle_spectra(spectra, 2, np.zeros(6, int), rotation, shift, support)
    out = sim.to_volumes(values, support)
    for i in range(6):
        ref = _sphere_band(rotate_volume(MAP_A, rotation[i], -shift[i] * PIXEL, PIXEL, order=5))
        assert np.corrcoef(out[i].ravel(), ref.ravel())[0, 1] > 0.999
        np.testing.assert_allclose(out[i].sum(), MAP_A.sum(), rtol=0.05)  # gridding correction: +3.5% at DC


def test_star_truth_reproduces_the_map(map_files, tmp_path):
    """Noise-free: the stored angles and origins take each particle back onto its class map."""
    config = _config(CLEAN)
    sim.simulate_shard(config, "train", 0, map_files, tmp_path / "s.npy", tmp_path / "s.star")
    volumes = np.load(tmp_path / "s.npy")
    particles, _ = read_particles_star(tmp_path / "s.star")
    maps = {"a": MAP_A, "b": MAP_B}
    for i, row in particles.iterrows():
        a = relion_euler_to_matrix(row[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float))
        origin = row[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float)
        d = -origin / PIXEL
        back = rotate_volume(volumes[i], a.T, (a.T @ d) * PIXEL, PIXEL, order=3)
        reference = maps[row["cryovaeClassName"]]
        assert np.corrcoef(back.ravel(), reference.ravel())[0, 1] > 0.97
        forward = rotate_volume(reference, a, origin, PIXEL, order=3)
        assert np.corrcoef(forward.ravel(), volumes[i].ravel())[0, 1] > 0.995
        wrong = rotate_volume(reference, a.T, origin, PIXEL, order=3)
        assert np.corrcoef(wrong.ravel(), volumes[i].ravel())[0, 1] < 0.95


# ----------------------------------------------------------------------------- noise, wedge, CTF


@pytest.mark.parametrize("ctf", [False, True])
@pytest.mark.parametrize("tilt", [None, (-60.0, 60.0)])
def test_snr_is_the_target(ctf, tilt):
    noisy_cfg = _config({**CLEAN, "snr": 0.3, "ctf": ctf, "tilt_range_deg": tilt})
    clean_cfg = _config({**CLEAN, "ctf": ctf, "tilt_range_deg": tilt})
    noisy, _ = _volumes(noisy_cfg)
    clean, _ = _volumes(clean_cfg)  # same poses: the pose draws do not depend on the noise
    snr = clean.var(axis=(1, 2, 3)) / (noisy - clean).var(axis=(1, 2, 3))
    np.testing.assert_allclose(snr, 0.3, rtol=1e-4)


def test_seen_classes_snr_reference_gives_every_class_one_noise_level(map_files, tmp_path):
    noisy_cfg = _config({**CLEAN, "snr": 0.3, "snr_reference": "seen_classes"})
    clean_cfg = _config({**CLEAN, "snr_reference": "seen_classes"})
    classes = splits.split_classes(noisy_cfg, "test")
    maps = np.stack([{"a": MAP_A, "b": MAP_B, "c": MAP_C}[c] for c in classes])
    class_snr = sim.class_snr(noisy_cfg, classes, maps)
    power = {c: m.astype(np.float64).var() for c, m in zip(classes, maps)}
    mean_seen = (power["a"] + power["b"]) / 2  # c is unseen: the noise level comes from the seen classes
    np.testing.assert_allclose(class_snr, [0.3 * power[c] / mean_seen for c in classes])
    assert sim.class_snr(clean_cfg, classes, maps) is None
    draws, generator = sim.draw_particles(noisy_cfg, "test", 0)
    slot = np.array([classes.index(noisy_cfg.class_names[i]) for i in draws.class_index])
    with pytest.raises(ValueError, match="class_snr"):
        sim.simulate_volumes(noisy_cfg, maps, slot, draws, generator)
    noisy = sim.simulate_volumes(noisy_cfg, maps, slot, draws, generator, class_snr)
    clean = sim.simulate_volumes(clean_cfg, maps, slot, *sim.draw_particles(clean_cfg, "test", 0))
    noise_var = (noisy - clean).var(axis=(1, 2, 3))
    np.testing.assert_allclose(clean.var(axis=(1, 2, 3)) / noise_var, class_snr[slot], rtol=1e-4)
    assert noise_var.max() / noise_var.min() < 1.1  # one noise level, whatever the class
    assert class_snr.max() / class_snr.min() > 1.3  # while the classes' SNRs differ
    sim.simulate_shard(noisy_cfg, "test", 0, map_files, tmp_path / "s.npy", tmp_path / "s.star")
    particles, _ = read_particles_star(tmp_path / "s.star")
    expected = dict(zip(classes, class_snr))
    np.testing.assert_allclose(particles["cryovaeSnr"], particles["cryovaeClassName"].map(expected), rtol=1e-5)


def test_missing_wedge_has_no_fourier_power():
    tilt = (-50.0, 60.0)
    volumes, _ = _volumes(_config({"snr": 1.0, "tilt_range_deg": tilt, "ctf": True}))
    power = np.abs(np.fft.rfftn(volumes, axes=(1, 2, 3))) ** 2
    sampled = missing_wedge_mask(BOX, tilt).numpy()
    assert power[:, ~sampled].sum() < 1e-10 * power.sum()
    assert power[:, sampled].mean() > 0


def test_wedge_geometry():
    """atan2(kz, kx) in the tilt range is sampled: ±60° keeps |kz| <= tan 60° |kx|."""
    mask = missing_wedge_mask(16, (-60.0, 60.0)).numpy()  # (kz, ky, kx) rfft layout
    assert mask[0, 3, 0] and mask[0, 0, 1] and mask[1, 0, 1]  # ky axis, kx axis, 45°
    assert not mask[5, 0, 0] and not mask[2, 4, 1]  # kz axis, 63° off kx
    asym = missing_wedge_mask(16, (-30.0, 60.0)).numpy()
    assert asym[1, 0, 1]  # kz = +1, kx = 1: +45°
    assert not asym[-1, 0, 1]  # kz = -1, kx = 1: -45°
    full = missing_wedge_mask(16, (-90.0, 90.0)).numpy()
    assert full.all()


def test_tilt_geometry_beam_and_defocus_gradient():
    """The beam at +30° is (-sin 30°, 0, cos 30°); at a positive tilt the +x side is more underfocused."""
    from cryovae.ctf import defocus_offset_angstrom, tilt_rotations_xyz

    rotations = tilt_rotations_xyz([0.0, 30.0])
    np.testing.assert_allclose(rotations[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(rotations[1, 2], [-0.5, 0.0, np.sqrt(3) / 2], atol=1e-12)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (2, 3, 3)),
                               atol=1e-12)
    offsets = defocus_offset_angstrom(np.array([[1000.0, 0, 0], [0, 500.0, 0], [0, 0, 200.0]]), [0.0, 30.0])
    np.testing.assert_allclose(offsets, [[0.0, 500.0], [0.0, 0.0], [-200.0, -200.0 * np.sqrt(3) / 2]], atol=1e-9)
    # the central plane a tilt samples is normal to its beam: the wedge holds the image x axis
    mask = missing_wedge_mask(32, (29.0, 31.0)).numpy()
    kx, kz = 8 * np.cos(np.deg2rad(30)), 8 * np.sin(np.deg2rad(30))
    assert mask[int(round(kz)), 0, int(round(kx))] and not mask[-int(round(kz)), 0, int(round(kx))]


def test_ctf_matches_torch_ctf_1d_and_is_positive_at_low_frequency():
    from torch_ctf import calculate_ctf_1d

    box, pixel = 64, 4.0
    ctf = ctf_3d(torch.tensor([2.5]), box, pixel, 300.0, 2.7, 0.07)[0]
    line = calculate_ctf_1d(defocus=2.5, voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.07,
                            phase_shift=0.0, pixel_size=pixel, n_samples=box // 2 + 1, oversampling_factor=1)
    np.testing.assert_allclose(ctf[0, 0, :].numpy(), line.numpy(), atol=2e-5)
    np.testing.assert_allclose(ctf[0, 5, :], ctf[5, 0, :], atol=1e-6)  # isotropic
    assert ctf[0, 0, 0] == pytest.approx(0.07, abs=1e-6)
    assert ctf[0, 0, 1] > 0.07  # first lobe positive: a white particle stays white


def test_electron_wavelength_and_numpy_ctf_table_match_torch_ctf():
    from torch_ctf.ctf_aberrations import calculate_relativistic_electron_wavelength

    from cryovae.ctf import ctf_table, electron_wavelength_angstrom

    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.019687, abs=1e-6)  # textbook value
    for kv in (100.0, 200.0, 300.0):
        assert electron_wavelength_angstrom(kv) == pytest.approx(
            float(calculate_relativistic_electron_wavelength(kv * 1e3)) * 1e10, rel=1e-6)
    table = ctf_table(np.array([1.5, 4.0]), 32, 10.0, 300.0, 2.7, 0.07)
    gathered = table[:, integer_k2(32)]
    ctf = ctf_3d(torch.tensor([1.5, 4.0]), 32, 10.0, 300.0, 2.7, 0.07).numpy()
    np.testing.assert_array_equal(gathered, ctf)  # the tensor route is the table, gathered
    assert table.dtype == np.float32 and table.shape == (2, 3 * 16**2 + 1)


def test_hermitian_noise_is_the_spectrum_of_real_white_noise():
    """On the support: Hermitian-consistent, and its Parseval variance is the real-space one."""
    support = sim.FourierSupport.from_config(_config({**CLEAN, "tilt_range_deg": (-60.0, 60.0)}))
    noise = sim.hermitian_noise(64, support, np.random.default_rng(0))
    real = sim.to_volumes(noise, support)
    again = np.fft.rfftn(real, axes=(-3, -2, -1)).reshape(64, -1)[:, support.flat]
    np.testing.assert_allclose(again, noise, atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(sim._variance(noise, support), real.astype(np.float64).var(axis=(1, 2, 3)), rtol=1e-4)
    # white noise of unit variance keeps the support's share of the variance
    share = float(support.weights.sum()) * BOX**3
    assert real.var() == pytest.approx(share, rel=0.02)


def test_particles_are_band_limited_to_the_nyquist_sphere():
    volumes, _ = _volumes(_config({"tilt_range_deg": None}))
    power = np.abs(np.fft.rfftn(volumes, axes=(1, 2, 3))) ** 2
    outside = integer_k2(BOX) >= (BOX // 2) ** 2
    assert power[:, outside].sum() < 1e-10 * power.sum()


@pytest.mark.parametrize("settings", [{}, {"ctf": False, "tilt_range_deg": None},
                                      {"bandpass_angstrom": [200.0, 30.0]}])
def test_normalised_particles_have_zero_mean_unit_variance(settings):
    volumes, _ = _volumes(_config(settings))
    np.testing.assert_allclose(volumes.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(volumes.std(axis=(1, 2, 3)), 1.0, rtol=1e-4)


def test_bandpass_removes_frequencies_outside_the_band():
    volumes, _ = _volumes(_config({"bandpass_angstrom": [100.0, 40.0], "tilt_range_deg": None}))
    k_px = BOX * np.sqrt(sum(f**2 for f in np.meshgrid(np.fft.fftfreq(BOX), np.fft.fftfreq(BOX),
                                                       np.fft.rfftfreq(BOX), indexing="ij")))
    power = np.abs(np.fft.rfftn(volumes, axes=(1, 2, 3))) ** 2
    outside = (k_px > PIXEL / 40.0 * BOX + 1.01) | (k_px < PIXEL / 100.0 * BOX - 1.01)
    assert power[:, outside].sum() < 1e-10 * power.sum()


def test_bad_bandpass_is_an_error():
    with pytest.raises(InputError, match="bandpass_angstrom"):
        _volumes(_config({"bandpass_angstrom": [20.0, 200.0]}))


def test_padded_spectra_hold_the_centred_transform():
    """Entry factor·q + factor·N/2 holds sum_x map(x) exp(-2 pi i q·(x - N//2) / N) (apodisation undone)."""
    spectra = sim.padded_spectra(MAP_A[None], 2)[0]
    centre = BOX  # factor · N / 2
    assert spectra.shape == (2 * BOX + 1,) * 3
    assert spectra[centre, centre, centre] == pytest.approx(MAP_A.sum() * 1.0, rel=0.05)
    grid = np.indices(MAP_A.shape) - BOX // 2
    apod = np.prod([np.sinc(g / (2 * BOX)) ** 2 for g in grid], axis=0)
    for q_zyx in ((0, 0, 3), (2, -1, 0), (-4, 5, 1)):
        phase = np.exp(-2j * np.pi * sum(q * g for q, g in zip(q_zyx, grid)) / BOX)
        expected = (MAP_A / apod * phase).sum()
        got = spectra[tuple(centre + 2 * np.array(q_zyx))]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4 * float(MAP_A.sum()))
    np.testing.assert_allclose(spectra[-1], spectra[0], rtol=1e-6)  # periodic extra plane


# ----------------------------------------------------------------------------- what a simulate job imports


def test_the_simulate_verb_imports_no_torch():
    """A simulate job starts without torch (over a second of every job's start-up)."""
    code = ("import sys; from cryovae.cli import main; import cryovae.simulate, cryovae.config; "
            "print(sorted(m for m in ('torch', 'torch_ctf', 'cryovae.volumes') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(sim.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("", None), ("many", None)])
def test_simulation_threads_follow_omp_num_threads(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    default = sim.numba.config.NUMBA_NUM_THREADS
    assert sim.simulation_threads() == (expected if expected is not None else default)
