"""The tomogram simulator: tilt geometry, dose order, SNR by linearity, reconstruction, truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cryovae import tomosim
from cryovae.config import validate_config
from cryovae.extract import truth_columns
from cryovae.rotations import random_rotations, relion_euler_to_matrix
from cryovae.volumes import rotate_volume

ROOT = Path(__file__).resolve().parents[1]


def _config(**simulation):
    defaults = {"size_xyz_px": [64, 64, 24], "particles_per_class": 3, "ctf": False, "dose_per_tilt": 0.0,
                "snr": None, "tomograms": 1}
    return validate_config({
        "structures": {"a": "demo:globule_a", "b": "demo:rod_a"}, "pixel_size_angstrom": 24.0, "box_size": 16,
        "tomogram_simulation": {**defaults, **simulation},
    })


def _blob_map(seed: int, box: int = 16) -> np.ndarray:
    """An asymmetric density: three Gaussians of different sizes about the box centre."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(box) - box // 2,) * 3, indexing="ij"), -1).astype(np.float64)
    volume = np.zeros((box,) * 3)
    for sigma in (1.2, 1.6, 2.0):
        centre_zyx = rng.uniform(-3, 3, 3)
        volume += np.exp(-np.sum((grid - centre_zyx) ** 2, -1) / (2 * sigma**2))
    return volume.astype(np.float32)


def _species() -> list[tomosim.Species]:
    return [tomosim.Species(name, v, k + 1, False, tomosim.particle_radius_px(v))
            for k, (name, v) in enumerate((("a", _blob_map(1)), ("b", _blob_map(2))))]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_a_point_at_plus_x_projects_to_x_cos_plus_z_sin():
    nx, ny, nz = 96, 8, 32
    x, z = 20, 8  # centred: voxel index = centred + size / 2; a smooth point (Gaussian, sd 1.5 px)
    zz, xx = np.meshgrid(np.arange(nz) - nz / 2, np.arange(nx) - nx / 2, indexing="ij")
    slab = np.zeros((nz, ny, nx), np.float32)
    slab[:, ny // 2, :] = np.exp(-((xx - x) ** 2 + (zz - z) ** 2) / (2 * 1.5**2))
    image = tomosim.project_slab(slab, np.array([30.0]))[0, ny // 2].numpy()
    u = np.arange(nx) - nx / 2
    centroid = float((image * u).sum() / image.sum())
    assert centroid == pytest.approx(x * np.cos(np.deg2rad(30)) + z * np.sin(np.deg2rad(30)), abs=0.05)
    # the integral of the projection: the blob's mass, each slice sampled at 1 / cos t spacing
    assert image.sum() == pytest.approx(slab.sum(), rel=1e-3)


def test_dose_symmetric_order_is_hagen():
    tilts = tomosim.tilt_angles_deg((-9.0, 9.0), 3.0)
    np.testing.assert_allclose(tilts, [-9, -6, -3, 0, 3, 6, 9])
    order = tomosim.dose_symmetric_order(tilts)
    # acquisition: 0, +3, +6, -3, -6, +9, -9
    assert [float(tilts[i]) for i in np.argsort(order)] == [0, 3, 6, -3, -6, 9, -9]


def test_defocus_gradient_sign_follows_ctf_module():
    defocus = tomosim.strip_defocus_um(30.0, 256, 32, 10.0, 3.0)
    assert np.all(np.diff(defocus) > 0)  # +x more underfocused at a positive tilt
    np.testing.assert_allclose(defocus.mean(), 3.0, atol=1e-9)
    # column u sees x = u / cos t on the mid-plane: offset x sin t = u tan t
    np.testing.assert_allclose(defocus[-1] - 3.0, (112 * np.tan(np.deg2rad(30))) * 10.0 / 1e4, rtol=1e-9)


def test_noise_free_reconstruction_matches_the_wedge_filtered_slab():
    config = _config()
    result = tomosim.simulate(config, 0, _species())
    wedge = tomosim.wedge_filtered(result.slab_zyx, config.tomogram_simulation.tilt_range_deg)
    assert _correlation(result.signal_zyx, wedge) > 0.9
    assert not np.any(result.noise_zyx)


def test_snr_is_calibrated_by_linearity_within_ten_percent():
    config = _config(snr=0.5)
    result = tomosim.simulate(config, 0, _species())
    positions = result.truth[["x_px", "y_px", "z_px"]].to_numpy()
    box = config.box_size
    measured = tomosim.box_variance(result.signal_zyx, positions, box) / tomosim.box_variance(
        result.noise_zyx, positions, box)
    assert measured == pytest.approx(0.5, rel=1e-6)
    # a second, independent noise realisation at the same scale gives the same SNR within 10 %
    series = result.series
    unit = torch.from_numpy(np.random.default_rng(5).standard_normal(
        (len(series.tilts_deg), 64, 64)).astype(np.float32))
    other = tomosim.backproject(unit, series.tilts_deg, 24, 3.0).numpy()
    scale = np.sqrt(tomosim.box_variance(result.noise_zyx, positions, box) /
                    tomosim.box_variance(tomosim.backproject(torch.from_numpy(np.random.default_rng(6).standard_normal(
                        (len(series.tilts_deg), 64, 64)).astype(np.float32)), series.tilts_deg, 24, 3.0).numpy(),
                        positions, box))
    snr_other = tomosim.box_variance(result.signal_zyx, positions, box) / tomosim.box_variance(
        scale * other, positions, box)
    assert snr_other == pytest.approx(0.5, rel=0.1)
    assert _correlation(result.tomogram_zyx, result.signal_zyx + result.noise_zyx) == pytest.approx(1.0)


def test_dark_contrast_negates_the_tomogram():
    bright = tomosim.simulate(_config(), 0, _species()).tomogram_zyx
    dark = tomosim.simulate(_config(dark_contrast=True), 0, _species()).tomogram_zyx
    np.testing.assert_allclose(dark, -bright)


def test_truth_angles_rotate_the_map_onto_the_reconstructed_particle():
    config = _config(ctf=True, dose_per_tilt=3.0, size_xyz_px=[96, 96, 32], particles_per_class=4)
    species = _species()
    result = tomosim.simulate(config, 0, species)
    rng = np.random.default_rng(0)
    at_truth, at_random = [], []
    for row in result.truth.itertuples():
        volume = species[row.class_number - 1].volume_zyx
        box = volume.shape[0]
        position = np.array([row.x_px, row.y_px, row.z_px])
        anchor = np.floor(position).astype(int)
        start = anchor[::-1] - box // 2
        if np.any(start < 0) or np.any(start + box > result.signal_zyx.shape):
            continue
        cut = result.signal_zyx[tuple(slice(s, s + box) for s in start)]
        shift = -(position - anchor) * 24.0
        truth_rotation = relion_euler_to_matrix(np.array([row.rot_deg, row.tilt_deg, row.psi_deg]))
        at_truth.append(_correlation(cut, rotate_volume(volume, truth_rotation, shift, 24.0)))
        at_random.append(_correlation(cut, rotate_volume(volume, random_rotations(1, rng)[0], shift, 24.0)))
    assert len(at_truth) >= 4
    assert np.median(at_truth) > 0.6
    assert np.median(at_truth) > np.median(at_random) + 0.3


def test_extraction_takes_the_truth_of_the_nearest_true_particle():
    truth = pd.DataFrame({"x_px": [10.0, 40.0], "y_px": [10.0, 40.0], "z_px": [5.0, 5.0],
                          "rot_deg": [10.0, 20.0], "tilt_deg": [30.0, 40.0], "psi_deg": [50.0, 60.0],
                          "class_number": [1, 0], "cryovaeClassName": ["a", "decoy"], "cryovaeNovel": [0, 1]})
    picks = np.array([[40.6, 39.7, 5.2], [11.0, 10.0, 5.0], [25.0, 25.0, 5.0]])
    centres = np.round(picks)
    out = truth_columns(picks, centres, truth, 10.0, max_distance_px=4.0)
    assert list(out["cryovaeClassName"]) == ["decoy", "a", "unknown"]
    assert list(out["cryovaeNovel"]) == [1, 0, 0]
    # the true centre sits at box centre + d: rlnOrigin = -d x pixel size
    np.testing.assert_allclose(out.loc[0, ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float),
                               [-(40 - 41) * 10.0, -(40 - 40) * 10.0, -(5 - 5) * 10.0])
    assert np.isnan(out.loc[2, "rlnAngleRot"])


def test_written_files_round_trip(tmp_path):
    import starfile
    from cryovae.star import read_coordinates

    config = _config(snr=1.0, pick_error_px=1.0)
    result = tomosim.simulate(config, 0, _species())
    tomosim.write_tomogram(config, "sim_00", result, tmp_path)
    truth = read_coordinates(tmp_path / "truth.star", (64, 64, 24), 24.0, "sim_00")
    np.testing.assert_allclose(truth[["x_px", "y_px", "z_px"]].to_numpy(),
                               result.truth[["x_px", "y_px", "z_px"]].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(truth["rot_deg"], result.truth["rot_deg"], atol=1e-5)
    picks = read_coordinates(tmp_path / "picks.star", (64, 64, 24), 24.0, "sim_00")
    error = picks[["x_px", "y_px", "z_px"]].to_numpy() - result.truth[["x_px", "y_px", "z_px"]].to_numpy()
    assert np.abs(error).max() <= 1.0 + 1e-5 and np.abs(error).max() > 0.3
    tilts = starfile.read(tmp_path / "sim_00.star")
    np.testing.assert_allclose(tilts["rlnTomoNominalStageTiltAngle"], result.series.tilts_deg)
    assert tilts["rlnMicrographPreExposure"].min() == 0.0
    np.testing.assert_allclose(np.loadtxt(tmp_path / "sim_00.tlt"), result.series.tilts_deg)


@pytest.mark.slow
def test_workflow_runs_on_a_simulated_tomogram(tmp_path):
    """The tiny config with one simulated tomogram: sim_00 is extracted and evaluated with its truth."""
    import json

    config = yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text())
    config["output_dir"] = str(tmp_path / "results")
    config["tomogram_simulation"] = {"tomograms": 1, "particles_per_class": 4, "size_xyz_px": [96, 96, 32],
                                     "snr": 1.0}
    path = tmp_path / "tiny_tomogram.yaml"
    path.write_text(yaml.safe_dump(config))
    from test_workflow import (
        snakemake,  # the workflow's snakemake, this environment on PATH
    )

    target = f"{tmp_path}/results/evaluation/sim_00/metrics.json"
    snakemake(target, "--configfile", str(path))
    metrics = json.loads(Path(target).read_text())
    assert metrics["has_ground_truth"] is True
    assert metrics["n_seen_particles"] + metrics["n_unseen_particles"] == metrics["n_particles"]
    assert metrics["pose_error_n_particles"] > 0
    assert 0.0 <= metrics["unseen_auroc"] <= 1.0


def test_simulated_tomograms_join_extraction_with_their_truth():
    config = tomosim.with_simulated_tomograms(_config(tomograms=2))
    assert [n for n in config.extraction.tomograms] == ["sim_00", "sim_01"]
    spec = config.extraction.tomograms["sim_01"]
    assert spec.truth.endswith("tomograms/sim_01/truth.star") and spec.coordinates.endswith("sim_01/picks.star")
    assert spec.tomogram.endswith("tomograms/sim_01/sim_01.mrc")


def test_evaluate_counts_novel_particles_as_unknowns():
    from cryovae.evaluate import attach_truth, unseen_auroc

    config = validate_config({"structures": {"a": "demo:globule_a", "b": "demo:rod_a", "c": "demo:ring_a"},
                              "unseen": ["c"]})
    particles = pd.DataFrame({"cryovaeParticleId": ["p0", "p1", "p2", "p3"],
                              "cryovaeClassName": ["a", "b", "4cr2", "c"], "cryovaeNovel": [0, 0, 1, 0]})
    table = pd.DataFrame({"particle_id": ["p3", "p2", "p1", "p0"], "unknown_score": [0.9, 0.8, 0.1, 0.2]})
    merged = attach_truth(table, particles, Path("e.csv"), Path("p.star"), config)
    assert list(merged["novel"]) == [False, False, True, False]
    score = merged["unknown_score"].to_numpy()
    true_class = merged["true_class"].to_numpy(dtype=object)
    assert unseen_auroc(true_class, score, config, merged["novel"].to_numpy()) == 1.0
    with pytest.raises(Exception, match="4cr2"):  # a class of no config that is not marked novel
        attach_truth(table, particles.assign(cryovaeNovel=0), Path("e.csv"), Path("p.star"), config)
