"""Pose-prior STAR files: extracted particles keep tomogram names and coordinates exactly."""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryovae.config import validate_config
from cryovae.extract import extract_tomogram
from cryovae.priors import write_priors
from cryovae.star import read_coordinates

COORDS = np.array([[20.0, 31.0, 12.0], [40.0, 17.0, 25.0], [33.0, 45.0, 20.0]])


@pytest.fixture()
def extracted(tmp_path):
    rng = np.random.default_rng(0)
    tomogram = tmp_path / "ts01.mrc"
    with mrcfile.new(tomogram) as mrc:
        mrc.set_data(rng.normal(size=(40, 64, 64)).astype(np.float32))
        mrc.voxel_size = 10.0
    pd.DataFrame(COORDS, columns=["x", "y", "z"]).to_csv(tmp_path / "ts01.csv", index=False)
    return tmp_path


def _config(tmp_path, fmt):
    return validate_config({
        "structures": {"a": "demo:globule_a", "b": "demo:rod_a"}, "box_size": 16, "output_dir": str(tmp_path),
        "extraction": {"tomograms": {"ts01": {"tomogram": str(tmp_path / "ts01.mrc"),
                                               "coordinates": str(tmp_path / "ts01.csv"),
                                               "tilt_range_deg": [-60.0, 60.0], "voltage_kv": 300.0,
                                               "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.07,
                                               "defocus_um": 3.0}}},
        "priors": {"format": fmt},
    })


def _embeddings(path, ids):
    rng = np.random.default_rng(1)
    n = len(ids)
    table = pd.DataFrame({
        "particle_id": ids, "angle_rot": rng.uniform(-180, 180, n), "angle_tilt": rng.uniform(0, 180, n),
        "angle_psi": rng.uniform(-180, 180, n), "origin_x_angstrom": 1.0, "origin_y_angstrom": -2.0,
        "origin_z_angstrom": 0.5, "predicted_class": ["a", "unknown", "b"][:n], "confidence": 0.9,
        "unknown_score": 1.0,
    })
    table.to_csv(path, index=False)
    return table


@pytest.mark.parametrize("fmt", ["relion5", "relion4"])
def test_extracted_priors_keep_tomogram_and_coordinates(extracted, fmt):
    config = _config(extracted, fmt)
    split = extracted / "extracted" / "ts01"
    extract_tomogram(config, "ts01", split)
    ids = starfile.read(split / "particles.star", parse_as_string=["cryovaeParticleId"])["particles"]["cryovaeParticleId"]
    emb = _embeddings(extracted / "emb.csv", list(ids))
    out = extracted / "priors" / "ts01.star"
    write_priors(config, extracted / "emb.csv", split, out)
    back = read_coordinates(out, tomogram_shape_xyz=(64, 64, 40), pixel_size_angstrom=10.0)
    assert np.array_equal(back[["x_px", "y_px", "z_px"]].to_numpy(), COORDS)
    assert set(back["tomo_name"]) == {"ts01"}
    particles = starfile.read(out, always_dict=True)["particles"]
    assert np.allclose(particles["rlnAngleTilt"], emb["angle_tilt"], atol=1e-6)
    assert np.allclose(particles["rlnAnglePsiPrior"], emb["angle_psi"], atol=1e-6)
    assert particles["rlnClassNumber"].tolist() == [1, 0, 2]
    per_class = starfile.read(out.with_suffix("") / "b.star", always_dict=True)["particles"]
    assert len(per_class) == 1 and per_class["rlnAngleRot"].iloc[0] == pytest.approx(emb["angle_rot"][2], abs=1e-6)
    if fmt == "relion5":
        assert set(starfile.read(out, always_dict=True)) == {"general", "optics", "particles"}


def test_extracted_relion3_priors_name_the_exported_boxes_and_the_tomograms_microscope(extracted):
    """RELION 3 reads subtomogram files: an extracted split's priors name its exported boxes, and the
    optics are the tomogram's (200 kV here), not the simulator's (300 kV)."""
    from cryovae.export import export_relion3

    config = _config(extracted, "relion3")
    config.extraction.tomograms["ts01"].voltage_kv = 200.0
    split = extracted / "extracted" / "ts01"
    extract_tomogram(config, "ts01", split)
    export_relion3(config, split, extracted / "export" / "ts01")
    ids = starfile.read(split / "particles.star", parse_as_string=["cryovaeParticleId"])["particles"]["cryovaeParticleId"]
    _embeddings(extracted / "emb.csv", list(ids))
    out = extracted / "priors" / "ts01.star"
    write_priors(config, extracted / "emb.csv", split, out)
    blocks = starfile.read(out, always_dict=True)
    exported = {}
    for pid in ids:
        with mrcfile.open(split.parent.parent / "export" / "ts01" / "subtomograms" / f"{pid}.mrc") as mrc:
            exported[pid] = mrc.data.copy()
    for pid, name in zip(blocks["particles"]["cryovaeParticleId"].astype(str), blocks["particles"]["rlnImageName"]):
        with mrcfile.open(extracted / name) as mrc:
            np.testing.assert_array_equal(mrc.data, exported[pid])
    assert float(blocks["optics"]["rlnVoltage"].iloc[0]) == 200.0


def _simulated_split(folder, n=4):
    """A hand-written simulated split (poses, defocus) of random 16³ volumes; returns them."""
    from cryovae.shards import POSE_COLUMNS, write_particles_star

    rng = np.random.default_rng(2)
    volumes = rng.standard_normal((n, 16, 16, 16)).astype(np.float32)
    folder.mkdir(parents=True)
    np.save(folder / "shard_000.npy", volumes)
    table = pd.DataFrame({
        "cryovaeParticleId": [f"test_{i:05d}" for i in range(n)], "cryovaeShard": "shard_000.npy",
        "cryovaeIndex": np.arange(n), "cryovaeClassName": ["a", "b", "a", "b"][:n],
        "rlnClassNumber": [1, 2, 1, 2][:n], **{col: 0.0 for col in POSE_COLUMNS},
        "rlnDefocusU": 20000.0 + 1000 * np.arange(n), "rlnDefocusV": 19000.0 + 1000 * np.arange(n),
        "rlnDefocusAngle": 10.0 * np.arange(n),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [10.0], "rlnImageSize": [16]})
    write_particles_star(table, optics, folder / "particles.star")
    return table, volumes


@pytest.mark.parametrize("fmt", ["relion5", "relion4", "relion3"])
def test_simulated_priors_name_images_from_the_output_folder_and_carry_defocus(tmp_path, fmt):
    """rlnImageName opens, from output_dir, the particle's own volume in every file; defocus is the split's."""
    from cryovae.export import export_relion3

    config = validate_config({"structures": {"a": "demo:globule_a", "b": "demo:rod_a"}, "box_size": 16,
                              "output_dir": str(tmp_path), "priors": {"format": fmt}})
    split = tmp_path / "subtomograms" / "test"
    truth, volumes = _simulated_split(split)
    export_relion3(config, split, tmp_path / "export" / "test")
    pd.DataFrame({
        "particle_id": truth["cryovaeParticleId"], "angle_rot": 10.0, "angle_tilt": 20.0, "angle_psi": 30.0,
        "origin_x_angstrom": 0.0, "origin_y_angstrom": 0.0, "origin_z_angstrom": 0.0,
        "predicted_class": ["a", "b", "a", "b"], "confidence": 0.9, "unknown_score": 0.1,
    }).to_csv(tmp_path / "emb.csv", index=False)
    out = tmp_path / "priors" / "test.star"
    write_priors(config, tmp_path / "emb.csv", split, out)
    for path in (out, out.with_suffix("") / "a.star", out.with_suffix("") / "b.star"):
        particles = starfile.read(path, always_dict=True)["particles"]
        rows = [int(pid.split("_")[1]) for pid in particles["cryovaeParticleId"]]
        for i, name in zip(rows, particles["rlnImageName"]):
            assert name == f"export/test/subtomograms/test_{i:05d}.mrc"
            with mrcfile.open(tmp_path / name) as mrc:
                np.testing.assert_array_equal(mrc.data, volumes[i])
        assert list(particles["rlnCtfImage"]) == [f"export/test/ctf/test_{i:05d}.mrc" for i in rows]
        assert all((tmp_path / name).is_file() for name in particles["rlnCtfImage"])
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            np.testing.assert_allclose(particles[col], truth[col].to_numpy()[rows], err_msg=f"{path.name} {col}")


@pytest.mark.parametrize("fmt", ["relion5", "relion4"])
def test_undetermined_poses_go_to_a_global_search_file_without_angle_priors(extracted, fmt):
    """The matcher's confidence travels into the STAR files; undetermined particles are listed apart."""
    from cryovae.priors import global_search_path

    config = _config(extracted, fmt)
    split = extracted / "extracted" / "ts01"
    extract_tomogram(config, "ts01", split)
    ids = starfile.read(split / "particles.star", parse_as_string=["cryovaeParticleId"])["particles"]["cryovaeParticleId"]
    emb = _embeddings(extracted / "emb.csv", list(ids))
    emb["pose_margin"], emb["pose_sigma_deg"], emb["pose_determined"] = [5.0, 0.5, 4.0], [3.0, 40.0, 2.5], [1, 0, 1]
    emb["pose_spread_deg"] = 1.0
    emb.to_csv(extracted / "emb.csv", index=False)
    out = extracted / "priors" / "ts01.star"
    write_priors(config, extracted / "emb.csv", split, out)
    particles = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_allclose(particles["cryovaePoseMargin"], [5.0, 0.5, 4.0])
    np.testing.assert_allclose(particles["cryovaePoseSigmaDeg"], [3.0, 40.0, 2.5])
    assert particles["cryovaePoseDetermined"].tolist() == [1, 0, 1]
    search = starfile.read(global_search_path(out), always_dict=True)["particles"]
    assert search["cryovaeParticleId"].astype(str).tolist() == [str(ids.iloc[1])]
    assert "rlnAngleTiltPrior" not in search.columns and "rlnAnglePsiPrior" not in search.columns
    assert search["rlnAngleRot"].iloc[0] == pytest.approx(emb["angle_rot"][1], abs=1e-6)
