"""Matching in parts: how many jobs a split gets, and joining their files."""

import numpy as np
import pytest

from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.match_parts import join_match_parts, write_match_file
from cryovae.splits import match_particles, match_parts, part_rows

STRUCTURES = {"a": "demo:a", "b": "demo:b", "c": "demo:c"}


def _config(**matching):
    return validate_config({"structures": STRUCTURES, "unseen": ["c"], "box_size": 16,
                            "simulation": {"particles_per_class": 1000, "test_fraction": 0.5},
                            "matching": matching})


def test_a_split_is_matched_in_parts_of_at_most_particles_per_job():
    config = _config(particles_per_job=300, train_per_class=400)
    assert match_particles(config, "train") == 2 * 400  # the per-class subset of the training split
    assert match_particles(config, "test") == 3 * 500
    assert match_parts(config, "train") == 3 and match_parts(config, "test") == 5
    assert match_parts(_config(), "test") == 1
    whole = _config(particles_per_job=300, train_per_class=None)
    assert match_particles(whole, "train") == 2000 and match_parts(whole, "train") == 7


def test_a_user_tomogram_is_counted_from_its_picks(tmp_path):
    picks = tmp_path / "picks.csv"
    picks.write_text("tomo_name,x,y,z\n" + "".join(f"{t},{i},1,1\n" for t in ("TS_01", "TS_02") for i in range(7)))
    (tmp_path / "t.mrc").write_bytes(b"")
    spec = {"tomogram": str(tmp_path / "t.mrc"), "coordinates": str(picks), "tilt_range_deg": [-60, 60]}
    config = validate_config({"structures": STRUCTURES, "box_size": 16, "matching": {"particles_per_job": 3},
                              "extraction": {"tomograms": {"TS_01": spec, "TS_03": spec}}})
    assert match_particles(config, "TS_01") == 7 and match_parts(config, "TS_01") == 3
    assert match_particles(config, "TS_03") == 14  # a name the file does not hold: extraction reads every row
    simulated = validate_config({"structures": STRUCTURES, "box_size": 16, "matching": {"particles_per_job": 25},
                                 "tomogram_simulation": {"tomograms": 1, "particles_per_class": 10}})
    assert match_particles(simulated, "sim_00") == 30 and match_parts(simulated, "sim_00") == 2


def test_part_rows_cover_every_row_once_in_order():
    rows = np.arange(10) * 3
    pieces = [part_rows(rows, k, 4) for k in range(4)]
    np.testing.assert_array_equal(np.concatenate(pieces), rows)
    assert [len(p) for p in pieces] == [3, 3, 2, 2]
    with pytest.raises(InputError, match="part 4 of 4"):
        part_rows(rows, 4, 4)


def _part(path, ids, margin=(0.5, 0.4)):
    n = len(ids)
    write_match_file(path, {"particle_id": np.array(ids), "classes": np.array(["a", "b"]),
                            "class_self_margin": np.array(margin), "subset_per_class": np.int64(0),
                            "scores": np.arange(2 * n, dtype=float).reshape(n, 2),
                            "rotation": np.tile(np.eye(3), (n, 2, 1, 1))})
    return path


def test_join_concatenates_parts_in_order_and_refuses_mixed_ones(tmp_path):
    parts = [_part(tmp_path / "p0.npz", ["x", "y"]), _part(tmp_path / "p1.npz", []), _part(tmp_path / "p2.npz", ["z"])]
    join_match_parts(None, parts, tmp_path / "joined.npz")
    joined = np.load(tmp_path / "joined.npz")
    assert list(joined["particle_id"]) == ["x", "y", "z"]
    np.testing.assert_array_equal(joined["scores"], [[0, 1], [2, 3], [0, 1]])
    assert joined["rotation"].shape == (3, 2, 3, 3) and list(joined["class_self_margin"]) == [0.5, 0.4]
    other = _part(tmp_path / "other.npz", ["w"], margin=(0.1, 0.4))
    with pytest.raises(InputError, match="another match"):
        join_match_parts(None, [parts[0], other], tmp_path / "bad.npz")
    with pytest.raises(InputError, match="'x' is in more than one part"):
        join_match_parts(None, [parts[0], parts[0]], tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()
    unsearched = [_part(tmp_path / f"n{k}.npz", [f"n{k}"], margin=(np.nan, np.nan)) for k in range(2)]
    join_match_parts(None, unsearched, tmp_path / "unsearched.npz")   # no global search: NaN self-margins agree
    assert np.isnan(np.load(tmp_path / "unsearched.npz")["class_self_margin"]).all()
    with pytest.raises(InputError, match="another match"):
        join_match_parts(None, [parts[0], unsearched[0]], tmp_path / "bad.npz")
