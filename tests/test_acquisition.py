"""Acquisition metadata: readers, what extraction writes with the particles, the per-tilt 3D CTF, contrast."""

from __future__ import annotations

import logging

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from cryovae.acquisition import (
    Acquisition,
    complete_acquisition,
    read_acquisition,
    read_mdoc,
    read_relion5_tomograms,
    read_split_acquisitions,
    read_tlt,
    split_tilt_range_deg,
    tilts_from_range,
)
from cryovae.config import TomogramInput, validate_config
from cryovae.ctf import (
    ParticleCtfs,
    ctf_3d,
    defocus_offset_angstrom,
    missing_wedge_mask,
    particle_defocus_um,
    per_tilt_ctf_3d,
    tilt_insertion_weights,
    weighted_ctf_3d,
)
from cryovae.errors import InputError
from cryovae.extract import extract_tomogram
from cryovae.match import Matcher, split_particle_ctfs
from cryovae.match_parts import contrast_warnings
from cryovae.rotations import random_rotations
from cryovae.shards import SubtomogramSet
from cryovae.star import write_star_blocks
from synthetic_particles import class_blobs, render_blobs

TILTS = np.array([0.0, 3.0, -3.0, 6.0, -6.0, 9.0, -9.0])  # dose-symmetric order


def _spec(**keys) -> TomogramInput:
    return TomogramInput(tomogram="t.mrc", coordinates="c.csv", **keys)


# ----------------------------------------------------------------------------- readers


def test_tlt_reads_angles_and_names_a_bad_line(tmp_path):
    path = tmp_path / "ts.tlt"
    path.write_text("-60.0\n -57\n\n54.5\n")
    np.testing.assert_array_equal(read_tlt(path).tilt_deg, [-60.0, -57.0, 54.5])
    path.write_text("-60.0\n-57,0\n")
    with pytest.raises(InputError, match=r"ts\.tlt, line 2: expected a tilt angle .*'-57,0'"):
        read_tlt(path)


def _mdoc_text(defocus_um=3.0, dose=2.5) -> str:
    lines = ["PixelSpacing = 2.5", "Voltage = 300", "ImageFile = ts.mrc", ""]
    for z, tilt in enumerate(TILTS):
        lines += [f"[ZValue = {z}]", f"TiltAngle = {tilt:.2f}", f"Defocus = {-(defocus_um + 0.1 * z):.3f}",
                  f"ExposureDose = {dose}", ""]
    return "\n".join(lines)


def test_mdoc_reads_tilts_defocus_dose_and_optics(tmp_path):
    path = tmp_path / "ts.mdoc"
    path.write_text(_mdoc_text())
    acq = read_mdoc(path)
    np.testing.assert_allclose(acq.tilt_deg, TILTS)
    np.testing.assert_allclose(acq.defocus_um, 3.0 + 0.1 * np.arange(len(TILTS)))  # SerialEM: negative = under
    np.testing.assert_allclose(acq.pre_exposure_e_per_angstrom2, 2.5 * np.arange(len(TILTS)))
    assert acq.voltage_kv == 300.0 and acq.pixel_size_angstrom == 2.5 and acq.spherical_aberration_mm is None


def test_mdoc_malformed_line_is_named(tmp_path):
    path = tmp_path / "ts.mdoc"
    path.write_text(_mdoc_text().replace("TiltAngle = 6.00", "TiltAngle = six"))
    with pytest.raises(InputError, match=r"ts\.mdoc, line \d+: expected TiltAngle .*'six'"):
        read_mdoc(path)
    path.write_text(_mdoc_text().replace("TiltAngle = 6.00", "TiltAngle 6.00"))
    with pytest.raises(InputError, match=r"ts\.mdoc, line 21: expected 'Key = value'"):
        read_mdoc(path)


def _relion5(tmp_path, defocus_v="rlnDefocusV") -> Acquisition:
    tilts = pd.DataFrame({"rlnTomoNominalStageTiltAngle": TILTS, "rlnDefocusU": 30000.0 + 100 * np.arange(7),
                          defocus_v: 31000.0 + 100 * np.arange(7), "rlnMicrographPreExposure": 3.0 * np.arange(7)})
    (tmp_path / "tilt_series").mkdir(exist_ok=True)
    write_star_blocks({"TS_01": tilts}, tmp_path / "tilt_series" / "TS_01.star")
    table = pd.DataFrame([{"rlnTomoName": "TS_01", "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                           "rlnAmplitudeContrast": 0.1, "rlnTomoTiltSeriesPixelSize": 1.35,
                           "rlnTomoTiltSeriesStarFile": "tilt_series/TS_01.star"},
                          {"rlnTomoName": "TS_02", "rlnVoltage": 200.0, "rlnSphericalAberration": 2.7,
                           "rlnAmplitudeContrast": 0.1, "rlnTomoTiltSeriesPixelSize": 1.35,
                           "rlnTomoTiltSeriesStarFile": "tilt_series/TS_02.star"}])
    write_star_blocks({"global": table}, tmp_path / "tomograms.star")
    return read_acquisition(tmp_path / "tomograms.star", "TS_01")


def test_relion5_tomograms_star(tmp_path):
    acq = _relion5(tmp_path)
    np.testing.assert_allclose(acq.tilt_deg, TILTS)
    np.testing.assert_allclose(acq.defocus_um, 3.05 + 0.01 * np.arange(7))  # mean of U and V, µm
    np.testing.assert_allclose(acq.pre_exposure_e_per_angstrom2, 3.0 * np.arange(7))
    assert (acq.voltage_kv, acq.spherical_aberration_mm, acq.amplitude_contrast) == (300.0, 2.7, 0.1)
    with pytest.raises(InputError, match=r"tomogram 'TS_02': tilt-series STAR tilt_series/TS_02\.star does not"):
        read_relion5_tomograms(tmp_path / "tomograms.star", "TS_02")
    with pytest.raises(InputError, match=r"names tomograms \['TS_01', 'TS_02'\] but not 'TS_09'"):
        read_relion5_tomograms(tmp_path / "tomograms.star", "TS_09")


def test_relion5_bad_value_names_the_tilt(tmp_path):
    _relion5(tmp_path)
    path = tmp_path / "tilt_series" / "TS_01.star"
    path.write_text(path.read_text().replace("30400.000000", "n/a"))
    with pytest.raises(InputError, match=r"TS_01\.star: rlnDefocusU of tilt 5 is 'n/a'"):
        read_acquisition(tmp_path / "tomograms.star", "TS_01")


def test_missing_fields_come_from_the_config_or_name_the_tomogram(tmp_path):
    path = tmp_path / "ts.tlt"
    path.write_text("\n".join(map(str, TILTS)))
    acq = read_tlt(path)
    with pytest.raises(InputError, match=r"tomogram 'TS_01': .*ts\.tlt gives no voltage; set "
                                         r"extraction\.tomograms\.TS_01\.voltage_kv"):
        complete_acquisition(acq, _spec(defocus_um=3.0), "TS_01")
    with pytest.raises(InputError, match=r"gives no defocus; set extraction\.tomograms\.TS_01\.defocus_um"):
        complete_acquisition(acq, _spec(voltage_kv=300.0), "TS_01")
    full = complete_acquisition(acq, _spec(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07,
                                           defocus_um=4.0), "TS_01")
    np.testing.assert_array_equal(full.defocus_um, np.full(7, 4.0))
    np.testing.assert_array_equal(full.pre_exposure_e_per_angstrom2, np.zeros(7))
    np.testing.assert_allclose(tilts_from_range((-60, 60)), np.arange(-60, 61, 3.0))


# ----------------------------------------------------------------------------- extraction writes them

SHAPE_ZYX, PIXEL, BOX = (24, 40, 48), 10.0, 8
POSITIONS = np.array([[10.0, 12.0, 8.0], [38.0, 20.0, 14.0], [24.0, 30.0, 12.0]])


@pytest.fixture
def tomogram(tmp_path):
    data = np.random.default_rng(3).normal(size=SHAPE_ZYX).astype(np.float32)
    path = tmp_path / "TS_01.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = PIXEL
    coords = tmp_path / "TS_01.csv"
    pd.DataFrame(POSITIONS, columns=["x", "y", "z"]).to_csv(coords, index=False)
    (tmp_path / "TS_01.mdoc").write_text(_mdoc_text())
    return path, coords


def _extract(tmp_path, tomogram, name, **keys):
    path, coords = tomogram
    spec = {"tomogram": str(path), "coordinates": str(coords), "acquisition": str(tmp_path / "TS_01.mdoc"),
            "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.07, **keys}
    config = validate_config({"structures": {"a": "demo:a", "b": "demo:b"}, "box_size": BOX,
                              "pixel_size_angstrom": PIXEL, "extraction": {"tomograms": {"TS_01": spec},
                                                                           "normalise": False,
                                                                           "binning": "auto"}})
    extract_tomogram(config, "TS_01", tmp_path / name)
    return SubtomogramSet.open(tmp_path / name)


def test_extraction_writes_acquisition_with_the_particles(tmp_path, tomogram):
    plain = _extract(tmp_path, tomogram, "plain")
    table, optics = plain.particles, plain.optics
    assert (optics["rlnVoltage"].iloc[0], optics["rlnSphericalAberration"].iloc[0],
            optics["rlnAmplitudeContrast"].iloc[0]) == (300.0, 2.7, 0.07)
    assert int(optics["rlnTomoSubtomogramBinning"].iloc[0]) == 1  # auto: 10 Å / 10 Å
    centred = (POSITIONS - np.array(SHAPE_ZYX[::-1]) / 2.0) * PIXEL
    np.testing.assert_allclose(table[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]], centred, atol=1e-4)
    # the defocus at the particle at the zero tilt (the first image: 3.0 µm at the axis)
    expected = 3.0e4 + defocus_offset_angstrom(centred, [0.0])[:, 0]
    np.testing.assert_allclose(table["rlnDefocusU"], expected, atol=1e-3)
    np.testing.assert_allclose(table["rlnDefocusV"], expected, atol=1e-3)
    assert split_tilt_range_deg(table) == (-9.0, 9.0)
    assert (table["cryovaeInvertContrast"] == 0).all()
    back = read_split_acquisitions(tmp_path / "plain")["TS_01"]
    source = read_mdoc(tmp_path / "TS_01.mdoc")
    np.testing.assert_allclose(back.tilt_deg, source.tilt_deg)
    np.testing.assert_allclose(back.defocus_um, source.defocus_um, atol=1e-6)
    np.testing.assert_allclose(back.pre_exposure_e_per_angstrom2, source.pre_exposure_e_per_angstrom2)
    assert (back.voltage_kv, back.spherical_aberration_mm, back.amplitude_contrast) == (300.0, 2.7, 0.07)

    # matching's per-particle CTFs come from acquisition.star: each the particle's own (to its bin)
    per_tilt, names, coords = split_particle_ctfs(plain)
    np.testing.assert_allclose(coords, centred, atol=1e-4)
    ctfs = per_tilt(names, coords).numpy()
    acq = complete_acquisition(source, _spec(spherical_aberration_mm=2.7, amplitude_contrast=0.07), "TS_01")
    for k in range(len(POSITIONS)):
        own = weighted_ctf_3d(tilt_insertion_weights(acq.tilt_deg, BOX),
                              particle_defocus_um(acq.defocus_um, acq.tilt_deg, centred[k:k + 1])[0],
                              acq.pre_exposure_e_per_angstrom2, BOX, PIXEL, 300.0, 2.7, 0.07).numpy()
        assert np.corrcoef(ctfs[k].ravel(), own.ravel())[0, 1] > 0.999

    inverted = _extract(tmp_path, tomogram, "inverted", invert_contrast=True)
    assert (inverted.particles["cryovaeInvertContrast"] == 1).all()
    rows = np.arange(len(plain))
    np.testing.assert_array_equal(inverted.volumes(rows), -plain.volumes(rows))


def test_no_acquisition_and_no_tilt_range_is_an_error(tmp_path, tomogram):
    with pytest.raises(InputError, match=r"tomogram 'TS_01': set extraction\.tomograms\.TS_01\.acquisition"):
        _extract(tmp_path, tomogram, "out", acquisition=None)


# ----------------------------------------------------------------------------- the per-tilt 3D CTF

CTF_BOX, CTF_PIXEL, OPTICS = 32, 10.0, (300.0, 2.7, 0.07)
SERIES = np.arange(-60.0, 61.0, 3.0)


def _inside_nyquist(box: int) -> np.ndarray:
    kz, ky = np.fft.fftfreq(box)[:, None, None], np.fft.fftfreq(box)[None, :, None]
    kx = np.fft.rfftfreq(box)[None, None, :]
    return np.sqrt(kz**2 + ky**2 + kx**2) < 0.5


def _tilt_angle_deg(box: int) -> np.ndarray:
    """Angle of each rfft voxel's (kx, kz) direction, folded into [0, 90]: the tilt that samples it."""
    kz, kx = np.fft.fftfreq(box)[:, None, None], np.fft.rfftfreq(box)[None, None, :]
    angle = np.abs(np.rad2deg(np.arctan2(kz, kx)))
    return np.broadcast_to(np.minimum(angle, 180.0 - angle), (box, box, box // 2 + 1))


def test_per_tilt_ctf_at_the_tilt_axis_is_wedge_times_isotropic_ctf():
    n = len(SERIES)
    per_tilt = per_tilt_ctf_3d(np.full(n, 3.0), SERIES, np.zeros(n), CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    iso = (ctf_3d(torch.tensor([3.0]), CTF_BOX, CTF_PIXEL, *OPTICS)[0]
           * missing_wedge_mask(CTF_BOX, (-60.0, 60.0))).numpy()
    inside = _inside_nyquist(CTF_BOX)
    assert np.corrcoef(per_tilt[inside], iso[inside])[0, 1] > 0.99
    assert np.all(per_tilt[~missing_wedge_mask(CTF_BOX, (-60.0, 60.0)).numpy()] == 0)


def test_per_tilt_ctf_off_axis_differs_at_high_tilts():
    n = len(SERIES)
    axis = per_tilt_ctf_3d(np.full(n, 3.0), SERIES, np.zeros(n), CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    defocus = particle_defocus_um(np.full(n, 3.0), SERIES, np.array([[2000.0, 0.0, 0.0]]))[0]
    off = per_tilt_ctf_3d(defocus, SERIES, np.zeros(n), CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    inside, angle = _inside_nyquist(CTF_BOX), _tilt_angle_deg(CTF_BOX)
    low, high = inside & (angle < 10), inside & (angle > 45) & (angle <= 60)

    def change(mask):
        return np.linalg.norm(off[mask] - axis[mask]) / np.linalg.norm(axis[mask])

    assert change(low) < 0.03  # near zero tilt the offset 2000 sin(t) Å is small
    assert change(high) > 0.1  # at 45-60° it is 0.14-0.17 µm more underfocus


def test_weighted_gather_agrees_with_inserting_the_2d_ctfs():
    """ParticleCtfs' route (insertion weights once, each tilt's CTF at the voxel's |k|) against
    inserting torch-ctf's 2D CTFs, off-axis and dose-weighted."""
    n = len(SERIES)
    dose = 3.0 * np.arange(n)
    defocus = particle_defocus_um(np.full(n, 3.0), SERIES, np.array([[2000.0, 300.0, 500.0]]))[0]
    inserted = per_tilt_ctf_3d(defocus, SERIES, dose, CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    weights = tilt_insertion_weights(SERIES, CTF_BOX)
    gathered = weighted_ctf_3d(weights, defocus, dose, CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    inside = _inside_nyquist(CTF_BOX)
    assert np.corrcoef(inserted[inside], gathered[inside])[0, 1] > 0.999


def test_dose_weighting_lowers_high_frequencies_and_the_cache_shares_bins():
    n = len(SERIES)
    clean = per_tilt_ctf_3d(np.full(n, 3.0), SERIES, np.zeros(n), CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    dosed = per_tilt_ctf_3d(np.full(n, 3.0), SERIES, 3.0 * np.arange(n), CTF_BOX, CTF_PIXEL, *OPTICS).numpy()
    assert np.abs(dosed[0, 0, 12:]).sum() < 0.8 * np.abs(clean[0, 0, 12:]).sum()
    acq = Acquisition(SERIES, np.full(n, 3.0), np.zeros(n), 300.0, 2.7, 0.07)
    ctfs = ParticleCtfs({"TS_01": acq}, CTF_BOX, CTF_PIXEL)
    out = ctfs(["TS_01"] * 3, np.array([[10.0, 5.0, 10.0], [20.0, -900.0, 30.0], [3000.0, 0.0, 10.0]]))
    assert len(ctfs._cache) == 2
    torch.testing.assert_close(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


# ----------------------------------------------------------------------------- contrast


def test_contrast_check_warns_for_negated_particles(caplog):
    box, n = 16, 12
    config = validate_config({"structures": {"a": "demo:a", "b": "demo:b"}, "box_size": box,
                              "matching": {"coarse_step_deg": 30.0, "coarse_rank": 0, "refine_steps_deg": [10.0]}})
    blobs = class_blobs(2, 3, box, seed=1)
    refs = {c: render_blobs(blobs[k], box).astype(np.float32) for k, c in enumerate("ab")}
    rng = np.random.default_rng(0)
    rotations = random_rotations(n, rng)
    volumes = np.stack([render_blobs(blobs[i % 2] @ r.T, box) for i, r in enumerate(rotations)])
    volumes = (volumes + rng.normal(scale=0.3 * volumes.std(), size=volumes.shape)).astype(np.float32)
    matcher = Matcher(config, refs, None, device="cpu")
    white, dark = matcher.match(volumes, None), matcher.match(-volumes, None)
    names = np.array(["TS_white"] * n)
    assert contrast_warnings(white["scores"], white["scores_min"], names) == []
    with caplog.at_level(logging.WARNING):
        messages = contrast_warnings(dark["scores"], dark["scores_min"], np.array(["TS_dark"] * n))
    assert len(messages) == 1 and "TS_dark" in messages[0] and "set invert_contrast: true" in messages[0]
    assert "TS_dark" in caplog.text


def test_match_split_of_an_extracted_split_uses_its_acquisition(tmp_path, tomogram, caplog):
    """match_split on an extracted split: per-tilt CTFs from acquisition.star, the contrast check runs."""
    from cryovae.maps import write_map
    from cryovae.match import match_split

    _extract(tmp_path, tomogram, "split")
    config = validate_config({"structures": {"a": "demo:a", "b": "demo:b"}, "box_size": BOX,
                              "pixel_size_angstrom": PIXEL, "matching": {"coarse_step_deg": 30.0, "coarse_rank": 0,
                                                                          "refine_steps_deg": [10.0],
                                                                          "device": "cpu"}})
    blobs = class_blobs(2, 3, BOX, seed=2, n_blobs=2)
    maps = []
    for k, c in enumerate("ab"):
        maps.append(tmp_path / f"{c}.mrc")
        write_map(render_blobs(blobs[k], BOX, sigma_voxels=1.0).astype(np.float32), PIXEL, maps[-1])
    with caplog.at_level(logging.INFO):
        match_split(config, tmp_path / "split", maps, tmp_path / "match.npz")
    result = np.load(tmp_path / "match.npz")
    assert result["scores"].shape == result["scores_min"].shape == (len(POSITIONS), 2)
    assert np.all(result["scores_min"] <= result["scores"])
    assert "CTF per tilt, per particle" in caplog.text and "wedge (-9.0, 9.0)" in caplog.text
    # in parts, as the workflow runs it: the joined file is the whole one, a part past the end is empty
    from cryovae.match_parts import join_match_parts

    parts = [tmp_path / f"part_{k}.npz" for k in range(4)]
    for k, path in enumerate(parts):
        match_split(config, tmp_path / "split", maps, path, part=k, parts=len(parts))
    assert len(np.load(parts[3])["particle_id"]) == 0  # 3 particles in 4 parts
    join_match_parts(config, parts, tmp_path / "joined.npz")
    joined = np.load(tmp_path / "joined.npz")
    assert sorted(joined.files) == sorted(result.files)
    assert list(joined["tomogram_name"]) == ["TS_01"] * len(POSITIONS)
    for key in result.files:
        if np.issubdtype(result[key].dtype, np.floating):
            np.testing.assert_allclose(joined[key], result[key], rtol=1e-4, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(joined[key], result[key], err_msg=key)
