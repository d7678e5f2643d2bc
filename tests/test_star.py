"""STAR and CSV coordinate files: round trips, RELION 4 <-> 5 consistency, errors naming file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cryovae.errors import InputError
from cryovae.star import (
    OpticsInfo,
    coordinates_format,
    read_coordinates,
    star_pixel_size_angstrom,
    write_csv_coordinates,
    write_relion4_particles,
    write_relion5_particles,
    write_star_blocks,
)

SHAPE = (512, 480, 200)  # x, y, z pixels
PIXEL = 13.48
OPTICS = OpticsInfo(tilt_series_pixel_size_angstrom=PIXEL, image_pixel_size_angstrom=2 * PIXEL, image_size_px=32)


def _table(n=5, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "tomo_name": ["TS_01"] * (n - 2) + ["TS_02"] * 2,
        "x_px": rng.uniform(0, SHAPE[0], n),
        "y_px": rng.uniform(0, SHAPE[1], n),
        "z_px": rng.uniform(0, SHAPE[2], n),
        "rot_deg": rng.uniform(-180, 180, n),
        "tilt_deg": rng.uniform(0, 180, n),
        "psi_deg": rng.uniform(-180, 180, n),
        "origin_x_angstrom": rng.normal(size=n),
        "origin_y_angstrom": rng.normal(size=n),
        "origin_z_angstrom": rng.normal(size=n),
        "class_number": rng.integers(1, 4, n),
        "rlnAngleTiltPrior": rng.uniform(0, 180, n),
        "rlnAnglePsiPrior": rng.uniform(-180, 180, n),
        "cryovaeConfidence": rng.uniform(0, 1, n),
    })


def _assert_same(got: pd.DataFrame, want: pd.DataFrame, atol=2e-6):
    assert list(got["tomo_name"]) == list(want["tomo_name"])
    for col in want.columns:
        if col == "tomo_name":
            continue
        np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), atol=atol, err_msg=col)


def test_relion4_round_trip(tmp_path):
    table = _table()
    path = tmp_path / "particles.star"
    write_relion4_particles(table, path, OPTICS)
    assert coordinates_format(path) == "relion4"
    got = read_coordinates(path)
    _assert_same(got, table)
    assert got["class_number"].dtype.kind == "i"
    raw = starfile.read(path, always_dict=True)
    assert raw["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(2 * PIXEL)
    assert raw["optics"]["rlnImageSize"].iloc[0] == 32
    np.testing.assert_allclose(raw["particles"]["rlnCoordinateX"], table["x_px"], atol=1e-6)
    assert star_pixel_size_angstrom(path) == pytest.approx(PIXEL)


def test_relion5_known_answer_and_round_trip(tmp_path):
    table = _table()
    shapes = {"TS_01": SHAPE, "TS_02": (400, 400, 150)}
    path = tmp_path / "particles.star"
    write_relion5_particles(table, path, OPTICS, shapes)
    raw = starfile.read(path, always_dict=True)
    assert set(raw) == {"general", "optics", "particles"}
    parts = raw["particles"]
    sizes = np.array([shapes[t] for t in table["tomo_name"]], float)
    for k, axis in enumerate("XYZ"):
        want = (table[f"{axis.lower()}_px"] - sizes[:, k] / 2) * PIXEL
        np.testing.assert_allclose(parts[f"rlnCenteredCoordinate{axis}Angst"], want, atol=1e-6)
    assert "rlnCoordinateX" not in parts.columns
    assert coordinates_format(path) == "relion5"
    _assert_same(read_coordinates(path, shapes, PIXEL), table, atol=1e-6)


def test_relion5_centre_of_tomogram_is_zero(tmp_path):
    table = pd.DataFrame({"tomo_name": ["t"], "x_px": [256.0], "y_px": [240.0], "z_px": [100.0]})
    path = tmp_path / "p.star"
    write_relion5_particles(table, path, OPTICS, SHAPE)
    parts = starfile.read(path, always_dict=True)["particles"]
    for axis in "XYZ":
        assert parts[f"rlnCenteredCoordinate{axis}Angst"].iloc[0] == pytest.approx(0.0)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, (6, 3), elements=st.floats(0, 199, allow_nan=False)))
def test_relion4_to_relion5_conversion_consistent(tmp_path_factory, coords):
    folder = tmp_path_factory.mktemp("conv")
    table = pd.DataFrame({"tomo_name": ["TS_7"] * 6, "x_px": coords[:, 0], "y_px": coords[:, 1], "z_px": coords[:, 2]})
    write_relion4_particles(table, folder / "r4.star", OPTICS)
    from_r4 = read_coordinates(folder / "r4.star")
    write_relion5_particles(from_r4, folder / "r5.star", OPTICS, (200, 200, 200))
    from_r5 = read_coordinates(folder / "r5.star", (200, 200, 200), PIXEL)
    _assert_same(from_r5[table.columns], table, atol=1e-6)
    write_relion4_particles(from_r5, folder / "back.star", OPTICS)
    _assert_same(read_coordinates(folder / "back.star")[table.columns], table, atol=1e-6)


def test_csv_round_trip_and_header_variants(tmp_path):
    table = _table()[["tomo_name", "x_px", "y_px", "z_px"]]
    path = tmp_path / "coords.csv"
    write_csv_coordinates(table, path)
    assert coordinates_format(path) == "csv"
    _assert_same(read_coordinates(path), table)
    assert star_pixel_size_angstrom(path) is None
    other = tmp_path / "plain.txt"
    other.write_text("X,Y,Z\n1,2,3\n4.5,5.5,6.5\n")
    got = read_coordinates(other, default_tomo_name="TS_9")
    assert list(got["tomo_name"]) == ["TS_9", "TS_9"]
    np.testing.assert_allclose(got[["x_px", "y_px", "z_px"]], [[1, 2, 3], [4.5, 5.5, 6.5]])


def test_hand_written_relion4_coordinates_without_optics(tmp_path):
    path = tmp_path / "coords.star"
    path.write_text(
        "\ndata_\n\nloop_\n_rlnTomoName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n_rlnCoordinateZ #4\n"
        "01 10.0 20.0 30.0\n01 11.5 21.5 31.5\n"
    )
    got = read_coordinates(path)
    assert list(got["tomo_name"]) == ["01", "01"]  # numeric-looking names stay strings
    np.testing.assert_allclose(got[["x_px", "y_px", "z_px"]], [[10, 20, 30], [11.5, 21.5, 31.5]])
    assert star_pixel_size_angstrom(path) is None


def test_hand_written_relion5_file(tmp_path):
    path = tmp_path / "particles.star"
    path.write_text(
        "data_general\n\n_rlnTomoSubTomosAre2DStacks 1\n\n"
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnTomoTiltSeriesPixelSize #3\n"
        "_rlnImagePixelSize #4\n_rlnTomoSubtomogramBinning #5\n"
        "1 opticsGroup1 1.35 10.8 8\n\n"
        "data_particles\n\nloop_\n_rlnTomoName #1\n_rlnCenteredCoordinateXAngst #2\n"
        "_rlnCenteredCoordinateYAngst #3\n_rlnCenteredCoordinateZAngst #4\n_rlnAngleRot #5\n"
        "_rlnAngleTilt #6\n_rlnAnglePsi #7\n_rlnOpticsGroup #8\n"
        "TS_01 0.0 13.5 -27.0 10 20 30 1\n"
    )
    assert star_pixel_size_angstrom(path) == pytest.approx(1.35)
    got = read_coordinates(path, (4000, 4000, 1000), 1.35)
    np.testing.assert_allclose(got[["x_px", "y_px", "z_px"]].to_numpy()[0], [2000, 2010, 480])
    np.testing.assert_allclose(got[["rot_deg", "tilt_deg", "psi_deg"]].to_numpy()[0], [10, 20, 30])


# ----------------------------------------------------------------------------- errors


def test_missing_relion4_column_names_column_and_file(tmp_path):
    path = tmp_path / "bad.star"
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["a"], "rlnCoordinateX": [1.0],
                                               "rlnCoordinateY": [2.0]})}, path)
    with pytest.raises(InputError, match=r"bad\.star: missing column rlnCoordinateZ"):
        read_coordinates(path)


def test_missing_relion5_column_names_column_and_file(tmp_path):
    path = tmp_path / "bad5.star"
    starfile.write({"particles": pd.DataFrame({"rlnCenteredCoordinateXAngst": [1.0],
                                               "rlnCenteredCoordinateZAngst": [2.0]})}, path)
    with pytest.raises(InputError, match=r"bad5\.star: missing column rlnCenteredCoordinateYAngst"):
        read_coordinates(path, SHAPE, PIXEL)


def test_relion5_needs_shape_and_pixel_size(tmp_path):
    path = tmp_path / "p.star"
    write_relion5_particles(_table(), path, OPTICS, {"TS_01": SHAPE, "TS_02": SHAPE})
    with pytest.raises(InputError, match="tomogram shape"):
        read_coordinates(path, None, PIXEL)
    with pytest.raises(InputError, match="pixel size"):
        read_coordinates(path, SHAPE, None)
    with pytest.raises(InputError, match="TS_02"):
        read_coordinates(path, {"TS_01": SHAPE}, PIXEL)


def test_no_coordinate_block(tmp_path):
    path = tmp_path / "optics_only.star"
    starfile.write({"optics": pd.DataFrame({"rlnVoltage": [300.0]})}, path)
    with pytest.raises(InputError, match=r"optics_only\.star: no block has column _rlnCoordinateX"):
        read_coordinates(path)


def test_csv_missing_column_and_bad_value(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("x,y,tomo\n1,2,a\n")
    with pytest.raises(InputError, match=r"c\.csv: missing column z"):
        read_coordinates(path)
    path.write_text("x,y,z\n1,2,3\n4,five,6\n")
    with pytest.raises(InputError, match=r"c\.csv: column y, data line 2: expected a finite number, got 'five'"):
        read_coordinates(path)


def test_nan_coordinate_names_the_row(tmp_path):
    path = tmp_path / "nan.star"
    starfile.write({"particles": pd.DataFrame({"rlnCoordinateX": [1.0, np.nan], "rlnCoordinateY": [2.0, 2.0],
                                               "rlnCoordinateZ": [3.0, 3.0]})}, path)
    with pytest.raises(InputError, match=r"nan\.star: column rlnCoordinateX, row 2"):
        read_coordinates(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_coordinates(tmp_path / "nope.star")
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        read_coordinates(tmp_path / "empty.csv")


def test_several_pixel_sizes_is_an_error(tmp_path):
    path = tmp_path / "two.star"
    starfile.write({
        "optics": pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnTomoTiltSeriesPixelSize": [1.35, 2.7]}),
        "particles": pd.DataFrame({"rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0], "rlnCoordinateZ": [3.0]}),
    }, path)
    with pytest.raises(InputError, match="several pixel sizes"):
        star_pixel_size_angstrom(path)


def test_writer_rejects_table_without_coordinates_and_leaves_old_file(tmp_path):
    path = tmp_path / "keep.star"
    write_relion4_particles(_table(), path, OPTICS)
    before = Path(path).read_bytes()
    with pytest.raises(ValueError, match="z_px"):
        write_relion4_particles(_table().drop(columns="z_px"), path, OPTICS)
    assert Path(path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.star"]


def test_write_star_blocks_known_bytes_without_a_time_stamp(tmp_path):
    """The exact text of a loop block and a one-value block: no time of writing in it."""
    path = tmp_path / "b.star"
    write_star_blocks({"a": pd.DataFrame({"x": [1.0, 2.5], "s": ["u v", "w"]}), "b": {"y": 1}}, path)
    assert path.read_text() == (
        "# written by cryovae\n\n"
        "data_a\n\nloop_\n_x #1\n_s #2\n1.000000\t\"u v\"\n2.500000\tw\n\n\n"
        "data_b\n\n_y\t\t\t1\n\n\n"
    )
    blocks = starfile.read(path, always_dict=True)
    assert list(blocks["a"]["s"]) == ["u v", "w"] and blocks["b"]["y"] == 1
