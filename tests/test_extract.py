"""Extraction from a synthetic tomogram with asymmetric particles at known positions and poses."""

from __future__ import annotations

import logging
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.extract import box_starts, extract_tomogram
from cryovae.rotations import random_rotations
from cryovae.shards import SubtomogramSet, read_particles_star
from cryovae.star import OpticsInfo, write_csv_coordinates, write_relion4_particles, write_relion5_particles

SHAPE_ZYX = (48, 64, 80)
SHAPE_XYZ = SHAPE_ZYX[::-1]
PIXEL = 10.0
BOX = 16
BACKGROUND = 0.25
# positions (x, y, z) in tomogram pixels; the last one sits 3 px from the x = 0 face
POSITIONS = np.array([[20, 20, 16], [50, 18, 30], [24, 44, 24], [60, 46, 20], [40, 32, 34], [3, 30, 24]], float)
POSES = random_rotations(len(POSITIONS), np.random.default_rng(7))
# an asymmetric particle: three Gaussians (centre in reference x, y, z px, sigma px, height)
BLOBS = [((3.0, 0.0, 0.0), 1.5, 1.0), ((0.0, 2.0, 0.0), 1.2, 0.7), ((-1.0, -1.0, 3.0), 1.0, 0.5)]


def density_at(points_xyz: np.ndarray) -> np.ndarray:
    """The synthetic tomogram's density at (m, 3) points (x, y, z pixels), analytically."""
    out = np.full(len(points_xyz), BACKGROUND)
    for pos, a in zip(POSITIONS, POSES):
        local = (points_xyz - pos) @ a  # rows: A^T (p - pos), reference coordinates
        for mu, sigma, height in BLOBS:
            out += height * np.exp(-np.sum((local - mu) ** 2, axis=1) / (2 * sigma**2))
    return out


def _grid_points(shape_zyx, origin_xyz, step=1.0):
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    return np.stack([xx, yy, zz], -1).reshape(-1, 3) * step + np.asarray(origin_xyz, float)


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory) -> tuple[Path, np.ndarray]:
    data = density_at(_grid_points(SHAPE_ZYX, (0, 0, 0))).reshape(SHAPE_ZYX).astype(np.float32)
    path = tmp_path_factory.mktemp("tomo") / "TS_01.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = PIXEL
    return path, data


def _coords_table(name="TS_01") -> pd.DataFrame:
    return pd.DataFrame({"tomo_name": name, "x_px": POSITIONS[:, 0], "y_px": POSITIONS[:, 1],
                         "z_px": POSITIONS[:, 2]})


def _write_coords(folder: Path, fmt: str, pixel=PIXEL, table=None) -> Path:
    table = _coords_table() if table is None else table
    optics = OpticsInfo(tilt_series_pixel_size_angstrom=pixel)
    path = folder / ("coords.csv" if fmt == "csv" else f"coords_{fmt}.star")
    if fmt == "relion4":
        write_relion4_particles(table, path, optics)
    elif fmt == "relion5":
        write_relion5_particles(table, path, optics, SHAPE_XYZ)
    else:
        write_csv_coordinates(table, path)
    return path


# what an acquisition file would give (these tests use none)
MICROSCOPE = {"tilt_range_deg": [-60.0, 60.0], "voltage_kv": 300.0, "spherical_aberration_mm": 2.7,
              "amplitude_contrast": 0.07, "defocus_um": 3.0}


def _config(tomo: Path, coords: Path, pixel_size_angstrom: float = PIXEL, **extraction):
    return validate_config({
        "structures": {"a": "demo:a", "b": "demo:b"},
        "box_size": BOX,
        "pixel_size_angstrom": pixel_size_angstrom,
        "extraction": {"tomograms": {"TS_01": {"tomogram": str(tomo), "coordinates": str(coords), **MICROSCOPE}},
                       "normalise": False, **extraction},
    })


def _expected_box(centre_xyz, binning=1):
    """Analytic box: binned voxel k averages the b^3 tomogram voxels around centre + b (k - B//2)."""
    sub = (np.arange(binning) - (binning - 1) / 2.0)
    total = np.zeros(BOX**3)
    for dz in sub:
        for dy in sub:
            for dx in sub:
                origin = np.asarray(centre_xyz) - binning * (BOX // 2) + np.array([dx, dy, dz])
                total += density_at(_grid_points((BOX,) * 3, origin, step=binning))
    return (total / binning**3).reshape((BOX,) * 3)


def _corr(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


@pytest.mark.parametrize("fmt", ["relion4", "relion5", "csv"])
def test_extracted_boxes_match_placed_particles(tmp_path, tomogram, fmt):
    tomo, _ = tomogram
    out = tmp_path / "out"
    extract_tomogram(_config(tomo, _write_coords(tmp_path, fmt), out_of_bounds="skip"), "TS_01", out)
    subtomos = SubtomogramSet.open(out)
    assert len(subtomos) == len(POSITIONS) - 1  # the edge particle is skipped
    parts = subtomos.particles
    assert list(parts["cryovaeParticleId"]) == [f"TS_01_{i:06d}" for i in range(5)]
    np.testing.assert_allclose(parts[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]], POSITIONS[:5],
                               atol=1e-5)
    assert (parts["cryovaeClassName"] == "unknown").all() and (parts["rlnClassNumber"] == 0).all()
    assert set(parts["rlnTomoName"]) == {"TS_01"}
    assert subtomos.pixel_size_angstrom == PIXEL
    assert int(subtomos.optics["rlnImageSize"].iloc[0]) == BOX
    vols = subtomos.volumes(np.arange(5))
    assert vols.dtype == np.float32 and vols.shape == (5, BOX, BOX, BOX)
    for k in range(5):
        expected = _expected_box(POSITIONS[k])
        np.testing.assert_allclose(vols[k], expected, atol=1e-5)
        assert _corr(vols[k], expected) > 0.99999
        # the picked point is at voxel B//2: a one-voxel shift would not match
        assert _corr(vols[k], _expected_box(POSITIONS[k] + [1, 0, 0])) < 0.95


def test_padding_fills_with_tomogram_mean(tmp_path, tomogram, caplog):
    tomo, data = tomogram
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cryovae.extract"):
        extract_tomogram(_config(tomo, _write_coords(tmp_path, "relion4"), out_of_bounds="pad"), "TS_01", out)
    assert "1 box(es) left the tomogram (padded" in caplog.text
    subtomos = SubtomogramSet.open(out)
    assert len(subtomos) == len(POSITIONS)
    edge = subtomos.volumes([5])[0]
    x0 = int(POSITIONS[5, 0]) - BOX // 2  # -5: the first 5 x-planes lie outside
    np.testing.assert_allclose(edge[:, :, : -x0], data.mean(dtype=np.float64), rtol=1e-5)
    np.testing.assert_allclose(edge[:, :, -x0:], _expected_box(POSITIONS[5])[:, :, -x0:], atol=1e-5)


def test_skipping_logs_the_count(tmp_path, tomogram, caplog):
    tomo, _ = tomogram
    with caplog.at_level(logging.INFO, logger="cryovae.extract"):
        extract_tomogram(_config(tomo, _write_coords(tmp_path, "csv"), out_of_bounds="skip"), "TS_01", tmp_path / "o")
    assert "5 particles in 1 shard(s)" in caplog.text and "1 box(es) left the tomogram (skipped)" in caplog.text


def test_binning_2(tmp_path, tomogram):
    tomo, _ = tomogram
    out = tmp_path / "out"
    config = _config(tomo, _write_coords(tmp_path, "relion4"), 2 * PIXEL, binning=2, out_of_bounds="skip")
    extract_tomogram(config, "TS_01", out)
    subtomos = SubtomogramSet.open(out)
    assert subtomos.pixel_size_angstrom == 2 * PIXEL
    kept = [0, 1, 2, 3]  # the 32-px boxes of particles 5 (z) and 6 (x) leave the tomogram
    assert list(subtomos.particles["cryovaeParticleId"]) == [f"TS_01_{i:06d}" for i in kept]
    # integer coordinates with b = 2: the box centre sits half a tomogram pixel above the pick
    shifts = subtomos.particles[[f"cryovaeExtractionShift{a}Angst" for a in "XYZ"]].to_numpy()
    np.testing.assert_allclose(shifts, -0.5 * PIXEL)
    vols = subtomos.volumes(np.arange(len(kept)))
    for k, row in enumerate(kept):
        centre = POSITIONS[row] - shifts[k] / PIXEL
        expected = _expected_box(centre, binning=2)
        np.testing.assert_allclose(vols[k], expected, atol=1e-5)
        assert _corr(vols[k], expected) > 0.99999


def test_box_starts_geometry():
    starts, shifts = box_starts(np.array([[10.0, 10.4, 10.6]]), 16, 1)
    np.testing.assert_array_equal(starts[0], [2, 2, 3])
    np.testing.assert_allclose(shifts[0], [0.0, 0.4, -0.4])
    starts, shifts = box_starts(np.array([[10.0, 10.5, 11.0]]), 16, 3)
    # b = 3: box centre s + 3*8 + 1 is the nearest tomogram voxel, ties go up
    np.testing.assert_array_equal(starts[0], [-15, -14, -14])
    np.testing.assert_allclose(shifts[0], [0.0, -0.5, 0.0])
    starts, shifts = box_starts(np.array([[10.0, 10.0, 10.0]]), 16, 2)
    np.testing.assert_array_equal(starts[0], [-6, -6, -6])  # 32 voxels, centre at -6 + 16.5 = 10.5
    np.testing.assert_allclose(shifts[0], [-0.5, -0.5, -0.5])


def test_several_shards_and_normalisation(tmp_path, tomogram):
    tomo, _ = tomogram
    out = tmp_path / "out"
    config = _config(tomo, _write_coords(tmp_path, "relion4"), particles_per_shard=4, normalise=True)
    extract_tomogram(config, "TS_01", out)
    assert sorted(p.name for p in out.iterdir()) == ["acquisition.star", "particles.star", "shard_000.npy",
                                                     "shard_001.npy"]
    assert np.load(out / "shard_000.npy").shape == (4, BOX, BOX, BOX)
    assert np.load(out / "shard_001.npy").shape == (2, BOX, BOX, BOX)
    subtomos = SubtomogramSet.open(out)
    assert list(subtomos.particles["cryovaeShard"]) == ["shard_000.npy"] * 4 + ["shard_001.npy"] * 2
    assert list(subtomos.particles["cryovaeIndex"]) == [0, 1, 2, 3, 0, 1]
    vols = subtomos.volumes(np.arange(6))
    np.testing.assert_allclose(vols.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(vols.std(axis=(1, 2, 3)), 1.0, rtol=1e-4)
    assert _corr(vols[2], _expected_box(POSITIONS[2])) > 0.99999
    # same config, same bytes
    extract_tomogram(config, "TS_01", tmp_path / "again")
    for name in ("shard_000.npy", "shard_001.npy", "particles.star"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_rerun_replaces_previous_output(tmp_path, tomogram):
    tomo, _ = tomogram
    out = tmp_path / "out"
    extract_tomogram(_config(tomo, _write_coords(tmp_path, "relion4"), particles_per_shard=2), "TS_01", out)
    assert (out / "shard_002.npy").exists()
    extract_tomogram(_config(tomo, _write_coords(tmp_path, "relion4"), particles_per_shard=8), "TS_01", out)
    assert sorted(p.name for p in out.iterdir()) == ["acquisition.star", "particles.star", "shard_000.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coords_relion4.star", "out"]


def test_tomogram_selected_by_name(tmp_path, tomogram):
    tomo, _ = tomogram
    table = pd.concat([_coords_table("TS_01"), _coords_table("TS_02").iloc[:2]], ignore_index=True)
    coords = _write_coords(tmp_path, "relion4", table=table)
    extract_tomogram(_config(tomo, coords, out_of_bounds="pad"), "TS_01", tmp_path / "out")
    assert len(read_particles_star(tmp_path / "out" / "particles.star")[0]) == len(POSITIONS)
    table["tomo_name"] = table["tomo_name"].str.replace("TS_01", "TS_03")
    coords = _write_coords(tmp_path, "relion4", table=table)
    with pytest.raises(InputError, match=r"none named 'TS_01'"):
        extract_tomogram(_config(tomo, coords), "TS_01", tmp_path / "none")


# ----------------------------------------------------------------------------- pixel sizes


def test_pixel_size_disagreement(tmp_path, tomogram):
    tomo, _ = tomogram
    coords = _write_coords(tmp_path, "relion4", pixel=13.5)
    with pytest.raises(InputError, match=r"coords_relion4\.star: pixel size 13.5 Å disagrees with 10 Å"):
        extract_tomogram(_config(tomo, coords), "TS_01", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    extract_tomogram(_config(tomo, coords, 13.5, trust_pixel_size="star"), "TS_01", tmp_path / "b")
    assert SubtomogramSet.open(tmp_path / "b").pixel_size_angstrom == pytest.approx(13.5)
    extract_tomogram(_config(tomo, coords, trust_pixel_size="mrc"), "TS_01", tmp_path / "c")
    assert SubtomogramSet.open(tmp_path / "c").pixel_size_angstrom == pytest.approx(10.0)


def test_pixel_size_from_config_when_header_has_none(tmp_path, tomogram):
    _, data = tomogram
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)  # voxel size left at 0
    coords = _write_coords(tmp_path, "csv")
    with pytest.raises(InputError, match=r"set extraction\.tomograms\.TS_01\.pixel_size_angstrom"):
        extract_tomogram(_config(path, coords), "TS_01", tmp_path / "a")
    config = _config(path, coords, 7.5)
    config.extraction.tomograms["TS_01"].pixel_size_angstrom = 7.5
    extract_tomogram(config, "TS_01", tmp_path / "b")
    assert SubtomogramSet.open(tmp_path / "b").pixel_size_angstrom == pytest.approx(7.5)


@pytest.mark.parametrize("workflow_px, binning, expected", [
    (20.0, 1, r"set extraction\.binning: 2 \(bins 10 Å to 20 Å\)"),
    (30.0, 2, r"= 20 Å, but the workflow's maps and model are at pixel_size_angstrom 30 Å; set extraction\.binning: 3"),
    (24.0, 1, r"24 / 10 is not an integer binning"),
    (5.0, 1, r"5 / 10 is not an integer binning"),
])
def test_tomogram_at_another_pixel_size_than_the_workflow(tmp_path, tomogram, workflow_px, binning, expected):
    tomo, _ = tomogram
    config = _config(tomo, _write_coords(tmp_path, "csv"), workflow_px, binning=binning, out_of_bounds="skip")
    with pytest.raises(InputError, match=rf"TS_01\.mrc \(extraction\.tomograms\.TS_01\): pixel size 10 Å .*{expected}"):
        extract_tomogram(config, "TS_01", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")
    if "set extraction" in expected:  # doing what the message says extracts at the workflow's pixel size
        config = _config(tomo, _write_coords(tmp_path, "csv"), workflow_px, binning=round(workflow_px / PIXEL),
                         out_of_bounds="pad")
        extract_tomogram(config, "TS_01", tmp_path / "out")
        assert SubtomogramSet.open(tmp_path / "out").pixel_size_angstrom == pytest.approx(workflow_px)


# ----------------------------------------------------------------------------- bad input


def _assert_nothing_written(folder: Path, out: Path):
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in folder.iterdir())


def test_not_3d_mrc(tmp_path):
    path = tmp_path / "image.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((32, 32), np.float32))
    coords = _write_coords(tmp_path, "csv")
    with pytest.raises(InputError, match=r"image\.mrc: expected a 3D volume"):
        extract_tomogram(_config(path, coords), "TS_01", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_complex_mrc(tmp_path):
    path = tmp_path / "complex.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.complex64))
    with pytest.raises(InputError, match=r"complex\.mrc: MRC mode 4 is complex"):
        extract_tomogram(_config(path, _write_coords(tmp_path, "csv")), "TS_01", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_not_an_mrc(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_text("not a map\n" * 200)
    with pytest.raises(InputError, match=r"text\.mrc: not a readable MRC file"):
        extract_tomogram(_config(path, _write_coords(tmp_path, "csv")), "TS_01", tmp_path / "out")


def test_star_missing_column(tmp_path, tomogram):
    tomo, _ = tomogram
    coords = tmp_path / "bad.star"
    coords.write_text("data_particles\n\nloop_\n_rlnCoordinateX\n_rlnCoordinateZ\n10 10\n")
    with pytest.raises(InputError, match=r"bad\.star: missing column rlnCoordinateY"):
        extract_tomogram(_config(tomo, coords), "TS_01", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_in_a_box(tmp_path, tomogram):
    _, data = tomogram
    bad = data.copy()
    bad[30, 32, 40] = np.nan  # inside the box of particle 5 (40, 32, 34)
    path = tmp_path / "nan.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(bad)
        mrc.voxel_size = PIXEL
    with pytest.raises(InputError, match=r"nan\.mrc: NaN or infinite values in the box of particle 5"):
        extract_tomogram(_config(path, _write_coords(tmp_path, "relion4"), out_of_bounds="skip"), "TS_01",
                         tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_coordinates_outside_tomogram(tmp_path, tomogram):
    tomo, _ = tomogram
    table = _coords_table()
    table.loc[3, "z_px"] = 60.0  # the tomogram has 48 slices
    coords = _write_coords(tmp_path, "relion4", table=table)
    with pytest.raises(InputError, match=r"particle 4 at \(x, y, z\) = \(60.0, 46.0, 60.0\) px lies outside"):
        extract_tomogram(_config(tomo, coords), "TS_01", tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unknown_tomogram_key(tmp_path, tomogram):
    tomo, _ = tomogram
    with pytest.raises(InputError, match="no tomogram 'TS_09'"):
        extract_tomogram(_config(tomo, _write_coords(tmp_path, "csv")), "TS_09", tmp_path / "out")
