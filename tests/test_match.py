"""Template matching: poses, shifts and class scores of simulated particles of real maps."""

import mrcfile
import numpy as np
import pytest
import torch
from scipy import ndimage

from cryovae.align import orient_symmetry, symmetry_operators
from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.errors import InputError
from cryovae.match import Matcher, class_subset
from cryovae.rotations import (
    geodesic_distance_deg, random_rotations, relion_euler_to_matrix, symmetric_geodesic_distance_deg, symmetry_group,
)
from cryovae.simulate import ParticleDraws, simulate_volumes
from cryovae.volumes import check_rigid_transform, rotate_volume

CLASSES = ["1qvr", "1u6g", "3d2f"]  # asymmetric at 10 Å (3d2f: two complexes by a pseudo 2-fold)
BOX = 32


def centred_box(volume: np.ndarray) -> np.ndarray:
    """The BOX^3 cut of a (larger) map with its centre of mass at voxel BOX // 2, as ``map`` makes them."""
    centre = np.round(ndimage.center_of_mass(np.clip(volume, 0, None))).astype(int)
    return volume[tuple(slice(c - BOX // 2, c + BOX // 2) for c in centre)]


@pytest.fixture(scope="module")
def particles(shrec_dir):
    """20 particles of each of three SHREC classes at SNR 0.5 with CTF and a ±60° wedge."""
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in CLASSES}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": 0.5, "ctf": True, "tilt_range_deg": [-60, 60], "max_shift_px": 1.0},
        "classification": {"features": ["latent", "template"]},
    })
    maps = np.stack([centred_box(mrcfile.read(shrec_dir / "maps_10A" / f"{c}.mrc")) for c in CLASSES])
    rng = np.random.default_rng(0)
    n = 60
    draws = ParticleDraws(np.repeat(np.arange(3), n // 3), random_rotations(n, rng),
                          rng.uniform(-1, 1, size=(n, 3)), rng.uniform(2.0, 5.0, size=n))
    volumes = simulate_volumes(config, maps.astype(np.float32), draws.class_index, draws,
                               np.random.default_rng(1))
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    ctf = ctf_3d(torch.as_tensor(draws.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    return config, maps.astype(np.float32), draws, matcher.match(volumes, ctf)


def test_scores_classify_the_particles(particles):
    _, _, draws, result = particles
    assert np.mean(result["scores"].argmax(1) == draws.class_index) >= 0.95


def test_poses_of_the_true_class_are_within_a_few_degrees(particles):
    _, _, draws, result = particles
    rows = np.arange(len(draws.class_index))
    refined = result["refined"][rows, draws.class_index]
    errors = geodesic_distance_deg(result["rotation"][rows, draws.class_index], draws.rotation)
    assert refined.mean() >= 0.95
    assert np.median(errors) < 6.0
    assert np.mean(errors < 15.0) >= 0.85


def test_fit_is_the_correlation_with_the_modulated_reference(particles, shrec_dir):
    """Noise-free particles correlate ~0.9 with their class at the found pose (trilinear
    rotation of the reference and the residual pose error cost the rest); at SNR 0.5 the
    ceiling is sqrt(0.5 / 1.5) = 0.58 (the signal's share of the variance); other classes fit worse."""
    config, maps, draws, _ = particles
    clean = config.model_copy(update={"simulation": config.simulation.model_copy(update={"snr": None})})
    first = np.r_[0:3, 20:23, 40:43]
    sub = ParticleDraws(draws.class_index[first], draws.rotation[first], draws.shift_xyz_px[first],
                        draws.defocus_um[first])
    volumes = simulate_volumes(clean, maps, sub.class_index, sub, np.random.default_rng(2))
    ctf = ctf_3d(torch.as_tensor(sub.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    noise_free = Matcher(clean, dict(zip(CLASSES, maps)), (-60.0, 60.0)).match(volumes, ctf)
    clean_fit = noise_free["fit"][np.arange(9), sub.class_index]
    assert np.median(clean_fit) > 0.88 and clean_fit.min() > 0.8

    _, _, draws, result = particles
    rows = np.arange(len(draws.class_index))
    fit_true = result["fit"][rows, draws.class_index]
    assert 0.45 < np.nanmedian(fit_true) < 0.62
    others = np.where(np.arange(3) == draws.class_index[:, None], np.nan, result["fit"])
    assert np.nanmedian(others) < np.nanmedian(fit_true) - 0.05


def test_shifts_are_within_half_a_voxel(particles):
    _, _, draws, result = particles
    rows = np.arange(len(draws.class_index))
    shift_error = np.linalg.norm(result["displacement_voxels"][rows, draws.class_index] - draws.shift_xyz_px, axis=1)
    assert np.median(shift_error) < 0.5


def test_matcher_rotates_references_about_n_over_2():
    """The matcher's rotated references agree with scipy's rigid transform about voxel N//2."""
    def rotated(volumes, rotations, _shifts):
        return torch.cat([Matcher._rotated(v, r[None].numpy()) for v, r in zip(volumes, rotations)])

    assert check_rigid_transform(rotated, with_shift=False, dtype=torch.float32) < 2e-6


def test_symmetry_axes_are_found_where_the_map_has_them():
    """A C4 volume with its axis turned away from z: the located group is the map's own."""
    rng = np.random.default_rng(5)
    blob = np.zeros((BOX,) * 3)
    for centre in rng.uniform(10, 22, size=(6, 3)):
        zyx = np.indices(blob.shape).T - centre
        blob += np.exp(-(zyx**2).sum(-1).T / 6.0)
    c4 = sum(rotate_volume(blob, g) for g in symmetry_group("C4"))
    turn = relion_euler_to_matrix(np.array([30.0, 70.0, -20.0]))
    volume = rotate_volume(c4, turn)
    axes, score = orient_symmetry(volume, "C4")
    assert score > 0.95
    found = symmetry_operators({"symmetry": "C4", "symmetry_axes": axes.tolist()})
    expected = turn @ symmetry_group("C4") @ turn.T
    # every located operator is within 3 degrees of one of the true ones
    errors = symmetric_geodesic_distance_deg(found, np.repeat(np.eye(3)[None], len(found), 0), expected)
    assert errors.max() < 3.0


@pytest.fixture(scope="module")
def global_searches(particles):
    """The global search of the same particles in float64 over every voxel (the reference), in float32
    in the leading principal directions (the default), and in bfloat16 there (what CUDA runs)."""
    config, maps, draws, _ = particles
    volumes = simulate_volumes(config, maps, draws.class_index, draws, np.random.default_rng(1))
    ctf = ctf_3d(torch.as_tensor(draws.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    out = {}
    for name, rank, dtype in (("exact", 0, torch.float64), ("low_rank", 256, torch.float32),
                              ("bf16", 256, torch.bfloat16)):
        cfg = config.model_copy(update={"matching": config.matching.model_copy(
            update={"coarse_rank": rank, "coarse_step_deg": 30.0})})
        matcher = Matcher(cfg, dict(zip(CLASSES, maps)), (-60.0, 60.0), search_dtype=dtype)
        spectra = torch.fft.rfftn(torch.as_tensor(volumes), dim=(1, 2, 3)) * matcher.wedge
        spectra[:, 0, 0, 0] = 0.0
        out[name] = matcher.coarse(spectra * ctf)
    return out


@pytest.mark.parametrize("name, score_tolerance, same_rotation", [("low_rank", 0.01, 0.9), ("bf16", 0.02, 0.8)])
def test_global_search_in_principal_directions_and_bf16_agrees_with_float64(global_searches, name,
                                                                            score_tolerance, same_rotation):
    exact_scores, exact_rotations = global_searches["exact"]
    scores, rotations = global_searches[name]
    assert np.abs(scores - exact_scores).max() < score_tolerance
    assert np.mean(geodesic_distance_deg(rotations, exact_rotations) < 1e-3) >= same_rotation


def test_matching_device_cuda_without_a_gpu_is_an_input_error(particles, monkeypatch):
    config, maps, _, _ = particles
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = config.model_copy(update={"matching": config.matching.model_copy(update={"device": "cuda"})})
    with pytest.raises(InputError, match="matching.device is 'cuda' but no CUDA device is available"):
        Matcher(cuda, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    auto = config.model_copy(update={"matching": config.matching.model_copy(
        update={"device": "auto", "coarse_step_deg": 60.0})})
    matcher = Matcher(auto, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    assert matcher.device == torch.device("cpu") and matcher.search_dtype == torch.float32
    basis, rows = matcher.banks[CLASSES[0]]
    assert basis.device.type == rows.device.type == "cpu" and rows.dtype == torch.float32


def test_full_spectrum_of_an_even_quantity_matches_the_full_fft():
    """The rfft half of |FFT|² (real, even) unfolds to the fftshifted full-grid |FFT|²."""
    from cryovae.match import _full_spectrum

    volume = torch.as_tensor(np.random.default_rng(5).standard_normal((2, 8, 8, 8)), dtype=torch.float32)
    half = torch.fft.rfftn(volume, dim=(1, 2, 3)).abs() ** 2
    full = torch.fft.fftshift(torch.fft.fftn(volume, dim=(1, 2, 3)).abs() ** 2, dim=(1, 2, 3))
    torch.testing.assert_close(_full_spectrum(half, 8), full, rtol=1e-4, atol=1e-3)


def test_true_class_poses_are_determined_where_the_map_fixes_them(particles):
    """At SNR 0.5 the poses of 1qvr and 1u6g at their true class are determined (margin over
    pose_margin_min), with a suggested sigma under pose_far_deg (3d2f's pseudo two-fold leaves
    many of its poses undetermined); classes not refined carry no confidence."""
    config, _, draws, result = particles
    rows = np.arange(len(draws.class_index))
    k = draws.class_index
    assert result["pose_determined"][rows, k][k < 2].mean() >= 0.9
    assert np.median(result["pose_sigma_deg"][rows, k]) <= config.matching.pose_far_deg
    refined = result["refined"]
    assert np.all(np.isnan(result["pose_margin"][~refined])) and not result["pose_determined"][~refined].any()


@pytest.fixture(scope="module")
def off_centre(shrec_dir):
    """30 particles of the three classes at SNR 0.5, 2.5 to 3.5 px off the box centre on every axis
    (signs random), as picks with errors give them; matched without and with the centre search."""
    config = validate_config({
        "structures": {c: f"demo:{c}" for c in CLASSES}, "box_size": BOX, "pixel_size_angstrom": 10.0,
        "simulation": {"snr": 0.5, "ctf": True, "tilt_range_deg": [-60, 60], "max_shift_px": 4.0},
    })
    maps = np.stack([centred_box(mrcfile.read(shrec_dir / "maps_10A" / f"{c}.mrc")) for c in CLASSES])
    rng = np.random.default_rng(5)
    n = 30
    shifts = rng.uniform(2.5, 3.5, (n, 3)) * rng.choice([-1.0, 1.0], (n, 3))
    draws = ParticleDraws(np.repeat(np.arange(3), n // 3), random_rotations(n, rng), shifts, rng.uniform(2.0, 5.0, n))
    volumes = simulate_volumes(config, maps.astype(np.float32), draws.class_index, draws, np.random.default_rng(6))
    ctf = ctf_3d(torch.as_tensor(draws.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    results = {}
    for radius in (0.0, 8.0):
        searched = config.model_copy(update={"matching": config.matching.model_copy(update={"centre_search_px": radius})})
        results[radius] = Matcher(searched, dict(zip(CLASSES, maps)), (-60.0, 60.0)).match(volumes, ctf)
    return draws, results


def test_the_centre_search_recovers_particles_picked_3_px_off_centre(off_centre):
    draws, results = off_centre
    rows = np.arange(len(draws.class_index))

    def errors(result):
        pose = geodesic_distance_deg(result["rotation"][rows, draws.class_index], draws.rotation)
        shift = np.linalg.norm(result["displacement_voxels"][rows, draws.class_index] - draws.shift_xyz_px, axis=1)
        return np.median(pose), np.median(shift), np.mean(result["scores"].argmax(1) == draws.class_index)

    pose, shift, accuracy = errors(results[8.0])
    assert pose < 6.0 and shift < 0.5 and accuracy >= 0.9
    pose_at_centre, _, _ = errors(results[0.0])
    assert pose_at_centre > 2 * pose  # the global search at the box centre misses these particles' poses


def test_rotational_average_keeps_a_centred_isotropic_blob_and_makes_any_map_isotropic():
    from cryovae.volumes import rotational_average

    grid = np.indices((17, 17, 17)) - 8
    radius = np.sqrt((grid**2).sum(0))
    blob = np.exp(-(radius**2) / (2 * 3.0**2))
    assert np.abs(rotational_average(blob) - blob).max() < 0.02
    lopsided = np.exp(-(((grid[2] - 3) ** 2 + grid[1] ** 2 + grid[0] ** 2) / 4.0))
    average = rotational_average(lopsided)
    on_axes = [average[8, 8, 13], average[8, 13, 8], average[13, 8, 8], average[3, 8, 8]]
    assert np.ptp(on_axes) < 1e-12 and average.sum() > 0


def test_windowed_peak_ignores_a_higher_peak_outside_the_window():
    from cryovae.volumes import windowed_correlation_peak

    cc = torch.zeros(1, 16, 16, 16)
    cc[0, 2, 1, 15] = 1.0  # displacement (x, y, z) = (-1, 1, 2)
    cc[0, 8, 0, 0] = 5.0  # z = -8: outside a 4-voxel window
    displacement, peak = windowed_correlation_peak(cc, 4.0)
    assert torch.allclose(displacement, torch.tensor([[-1.0, 1.0, 2.0]])) and float(peak) == 1.0


def test_screen_is_the_matched_filter_correlation_at_the_best_translation(particles):
    """A particle that is exactly the class's reference at a grid rotation, CTF- and wedge-filtered and
    moved (3, -2, 3) px: the screen of that class is ~1 (a cosine, the translation found), the other
    classes less; the translation it found is the move.  Moved 6 px, beyond the screen's window, the
    screen says it does not know the translation, and the refinement still finds it."""
    config, maps, _, _ = particles
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    g = 1234
    ctf = ctf_3d(torch.as_tensor([3.0]), BOX, 10.0, 300.0, 2.7, 0.07)
    template = torch.fft.rfftn(Matcher._rotated(matcher.refs[CLASSES[1]], matcher.grid[g][None]), dim=(1, 2, 3))
    particle = torch.fft.irfftn(template * ctf * matcher.wedge, s=(BOX,) * 3, dim=(1, 2, 3))
    particle = torch.roll(particle, shifts=(3, -2, 3), dims=(1, 2, 3))
    spectra = torch.fft.rfftn(particle, dim=(1, 2, 3)) * matcher.wedge
    spectra[:, 0, 0, 0] = 0.0
    rotations = np.repeat(matcher.grid[g][None, None], len(CLASSES), 1)  # every class at the particle's rotation
    screen, shift = matcher.screen(spectra, ctf, rotations, None)
    screen = screen[0]
    assert screen[1] > 0.88  # the rest: the reference rotated at the coarse box (trilinear at 16³)
    assert screen[[0, 2]].max() < screen[1] - 0.2
    assert torch.allclose(shift[0, 1], torch.tensor([3.0, -2.0, 3.0]), atol=0.3)

    far = torch.roll(particle, shifts=(0, 0, 3), dims=(1, 2, 3))  # x: 3 + 3 = 6 px
    far_spectra = torch.fft.rfftn(far, dim=(1, 2, 3)) * matcher.wedge
    assert matcher.screen(far_spectra, ctf, rotations, None)[1][0, 1].isnan().all()
    far_spectra[:, 0, 0, 0] = 0.0
    norm = ((matcher.weights * far_spectra.abs() ** 2).sum((1, 2, 3)) / BOX**3).sqrt()
    both = torch.cat([shift[:, 1], torch.full((1, 3), torch.nan)])  # one known, one not
    d = matcher._first_centring(torch.cat([spectra, far_spectra]) * ctf, CLASSES[1], np.repeat(rotations[:, 1], 2, 0),
                                torch.cat([ctf, ctf]), torch.cat([norm, norm]), both)
    assert torch.equal(d[0], shift[0, 1])
    assert torch.allclose(d[1], torch.tensor([6.0, -2.0, 3.0]), atol=0.3)


def test_the_screen_ranks_the_class_of_particles_picked_3_px_off_centre(off_centre):
    """With the centre search the global score still compares at one place per class; the screen
    searches the translation at each class's best rotation and ranks the right class first."""
    draws, results = off_centre
    centred = results[8.0]
    screen_right = np.mean(centred["screen"].argmax(1) == draws.class_index)
    assert screen_right >= 0.9
    assert screen_right >= np.mean(centred["scores"].argmax(1) == draws.class_index)
    assert np.mean(np.nanargmax(centred["fit"], 1) == draws.class_index) >= 0.9


def test_the_start_that_fits_at_full_size_wins_over_a_flip_the_coarse_box_cannot_see():
    """An ellipsoid (2-folds about its axes) with an asymmetric fine pattern on one side (period 2.5
    voxels: beyond the coarse box's Nyquist), posed so that its flip about z is a grid rotation: on the
    coarse box the flip fits as well as the pose, and better than the global search's start nearest the
    pose (11° off).  Only at full size does the pose win: the starts must not compete on the coarse box."""
    config = validate_config({"structures": {"blob": "demo:1qvr", "other": "demo:1u6g"}, "box_size": BOX,
                              "pixel_size_angstrom": 10.0, "matching": {"coarse_keep": 4}})
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
    ellipsoid = np.exp(-(x**2 / 60.0 + y**2 / 15.0 + z**2 / 5.0))
    pattern = np.exp(-((x - 5) ** 2 + y**2 + z**2) / 10.0) * np.cos(2 * np.pi * (x + y + z) / 2.5)
    reference = (ellipsoid + pattern / np.abs(pattern).max()).astype(np.float32)
    matcher = Matcher(config, {"blob": reference}, (-90.0, 90.0))
    flip = np.diag([-1.0, -1.0, 1.0])  # 180° about z
    truth = matcher.grid[777] @ flip
    particle = Matcher._rotated(torch.as_tensor(reference), truth[None]).numpy()
    result = matcher.match(particle, None)
    error = geodesic_distance_deg(result["rotation"][:, 0], truth[None])[0]
    assert error < 4.0, f"pose {error:.1f}° from the truth"


def test_class_subset_takes_at_most_so_many_of_every_class_the_same_for_one_seed():
    names = np.array(["a"] * 50 + ["b"] * 8 + ["c"] * 30)[np.random.default_rng(0).permutation(88)]
    rows = class_subset(names, 20, seed=4)
    assert np.all(np.diff(rows) > 0)
    assert {c: int((names[rows] == c).sum()) for c in "abc"} == {"a": 20, "b": 8, "c": 20}
    np.testing.assert_array_equal(rows, class_subset(names, 20, seed=4))
    assert not np.array_equal(rows, class_subset(names, 20, seed=5))


def test_the_local_score_over_the_support_is_the_score_over_the_whole_ball(particles):
    """The local search compares only the voxels that hold the reference and norms over the
    frequencies that hold its power (``Matcher._local_bank``): its scores are those over the
    whole ball and every frequency, the particle less its mean over its norm, each reference
    over its norm about its mean.  (The particle's mean and norm are those of its own voxels
    in the ball, which no rotation changes, not of its interpolated copy.)"""
    from cryovae.match import _power_spectra
    from cryovae.volumes import sample_rigid, standardise_volumes

    config, maps, draws, _ = particles
    matcher = Matcher(config, dict(zip(CLASSES, maps)), (-60.0, 60.0))
    rows = np.r_[0:4, 20:24]
    sub = ParticleDraws(draws.class_index[rows], draws.rotation[rows], draws.shift_xyz_px[rows], draws.defocus_um[rows])
    volumes = torch.as_tensor(simulate_volumes(config, maps, sub.class_index, sub, np.random.default_rng(3)))
    ctf = ctf_3d(torch.as_tensor(sub.defocus_um), BOX, 10.0, 300.0, 2.7, 0.07)
    filtered = torch.fft.rfftn(volumes, dim=(1, 2, 3)) * matcher.wedge * ctf
    filtered[:, 0, 0, 0] = 0.0
    filter_full = matcher.local_filter(ctf, len(rows))
    start = sub.rotation @ matcher.deltas[0][7]  # off the truth, so the scores vary across the grid
    for cls in CLASSES[:2]:
        assert len(matcher.local[cls].real_xyz) < 0.3 * len(matcher.ball)  # the point of it, on these maps
        got = matcher.local_score(filtered, cls, filter_full, torch.zeros(len(rows), 3))(start, 0)
        turned = Matcher._rotated(matcher.refs[cls], matcher.deltas[0]).reshape(len(matcher.deltas[0]), -1)
        back = torch.as_tensor(start.transpose(0, 2, 1), dtype=torch.float32)
        centred = torch.fft.irfftn(filtered, s=(BOX,) * 3, dim=(1, 2, 3))
        ball = centred.reshape(len(rows), -1)[:, matcher.ball]  # the particle's own voxels: any rotation's mean and norm
        mean, norm = ball.mean(1, keepdim=True), (ball - ball.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
        references = turned[:, matcher.ball]  # each over its norm about its mean, zero where the map is
        references = references / (references - references.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
        numerator = ((sample_rigid(centred, back, matcher.ball_xyz) - mean) / norm) @ references.T
        power = _power_spectra(standardise_volumes(turned), BOX)[:, matcher.ball]
        want = (numerator / (sample_rigid(filter_full, back, matcher.ball_xyz) @ power.T).sqrt()).numpy()
        spread = want.max(1) - want.min(1)
        assert np.abs(got - want).max(1).max() < 0.02 * spread.min()
        assert (got.argmax(1) == want.argmax(1)).all()
        # compared across calls, the rotated particle's own mean and norm over the ball ...
        sampled = sample_rigid(centred, back, matcher.ball_xyz)
        scale = (norm / (sampled - sampled.mean(1, keepdim=True)).norm(dim=1, keepdim=True)).numpy()
        across = matcher.local_score(filtered, cls, filter_full, torch.zeros(len(rows), 3))(start, 0, across=True)
        assert scale.min() > 1.05  # interpolation smooths the noise: the two differ
        # ... estimated from the support and every CENSUS_STRIDE-th other voxel of the ball: to 2 % of the best
        exact = want * scale
        assert (np.abs(across - exact).max(1) < 0.02 * np.abs(exact).max(1)).all()
        assert (across.argmax(1) == exact.argmax(1)).all()
