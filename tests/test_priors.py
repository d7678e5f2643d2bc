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
                                               "coordinates": str(tmp_path / "ts01.csv")}}},
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
