"""Embedding a split with a trained model: the .npz's keys, shapes, conventions and agreement
with the model's own encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryovae.config import validate_config
from cryovae.embed import embed
from cryovae.errors import InputError
from cryovae.model import load_model
from cryovae.model.losses import reconstruction_error, wedge_mask
from synthetic_particles import write_affinity_csv, write_split
from cryovae.shards import SubtomogramSet, read_particles_star, write_particles_star
from cryovae.train import train

NAMES = ["p", "q"]


def _config(**training):
    base = {"epochs": 1, "batch_size": 8, "channels": [4, 8], "latent_dims": 3, "threads": 1, "device": "cpu"}
    base.update(training)
    return validate_config({"structures": {n: f"demo:{n}" for n in NAMES}, "box_size": 8, "training": base})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    write_split(root / "train", NAMES, 8, box=8, seed=1)
    write_split(root / "val", NAMES, 5, box=8, seed=2, particles_per_shard=4)
    write_affinity_csv(root / "affinity.csv", NAMES, np.eye(2))
    train(_config(), root / "train", root / "val", root / "affinity.csv", root / "model")
    return root


def test_embed_values_match_the_encoder(trained, tmp_path):
    cfg = _config(batch_size=3)      # batches that straddle shard boundaries
    embed(cfg, trained / "model" / "model.pt", trained / "val", tmp_path / "val.npz")
    with np.load(tmp_path / "val.npz", allow_pickle=False) as f:
        out = {k: f[k] for k in f.files}
    assert set(out) == {"particle_id", "class_name", "latent_mean", "latent_logvar", "rotation",
                        "origin_angstrom", "recon_error"}
    star = SubtomogramSet.open(trained / "val")
    n = len(star)
    assert out["particle_id"].tolist() == star.particles["cryovaeParticleId"].astype(str).tolist()
    assert out["class_name"].tolist() == star.particles["cryovaeClassName"].tolist()
    assert out["latent_mean"].shape == (n, 3) and out["latent_mean"].dtype == np.float32
    assert out["latent_logvar"].shape == (n, 3) and out["recon_error"].shape == (n,)
    assert out["rotation"].shape == (n, 3, 3) and out["rotation"].dtype == np.float64
    np.testing.assert_allclose(out["rotation"] @ out["rotation"].transpose(0, 2, 1), np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-5)

    model, meta = load_model(trained / "model" / "model.pt")
    x = torch.from_numpy(star.volumes(np.arange(n))).unsqueeze(1)
    enc = model.encode(x)
    np.testing.assert_allclose(out["latent_mean"], enc["latent_mean"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["rotation"], enc["rotation"].double().numpy(), atol=1e-6)
    np.testing.assert_allclose(out["origin_angstrom"], enc["origin_angstrom"].double().numpy(), atol=1e-4)
    with torch.no_grad():
        full = model(x, sample=False)
        np.testing.assert_allclose(out["origin_angstrom"], -10.0 * full["shift_voxels"].double().numpy(), atol=1e-4)
        expected = reconstruction_error(full["reconstruction"], x, wedge_mask((8, 8, 8), (-60.0, 60.0)))
    np.testing.assert_allclose(out["recon_error"], expected.numpy(), rtol=1e-5)


def test_embed_unlabelled_split_and_plain_mse(trained, tmp_path):
    """Extracted-style particles (class 'unknown', no poses) embed; without the wedge the error is the MSE."""
    particles, optics = read_particles_star(trained / "val" / "particles.star")
    particles = particles.drop(columns=[c for c in particles.columns if c.startswith("rlnAngle") or c.startswith("rlnOrigin")])
    particles["cryovaeClassName"] = "unknown"
    particles["rlnClassNumber"] = 0
    split = tmp_path / "extracted"
    split.mkdir()
    for shard in sorted((trained / "val").glob("shard_*.npy")):
        (split / shard.name).write_bytes(shard.read_bytes())
    write_particles_star(particles, optics, split / "particles.star")
    cfg = _config(wedge_masked_loss=False)
    embed(cfg, trained / "model" / "model.pt", split, tmp_path / "x.npz")
    with np.load(tmp_path / "x.npz", allow_pickle=False) as f:
        assert set(f["class_name"].tolist()) == {"unknown"}
        model, _ = load_model(trained / "model" / "model.pt")
        x = torch.from_numpy(SubtomogramSet.open(split).volumes(np.arange(len(particles)))).unsqueeze(1)
        with torch.no_grad():
            recon = model(x, sample=False)["reconstruction"]
        np.testing.assert_allclose(f["recon_error"], ((recon - x) ** 2).flatten(1).mean(1).numpy(), rtol=1e-5)


def test_embed_rejects_a_split_of_another_box(trained, tmp_path):
    write_split(tmp_path / "big", NAMES, 2, box=10, seed=3)
    with pytest.raises(InputError, match=r"particle shape \(10, 10, 10\) differs from the model's"):
        embed(_config(), trained / "model" / "model.pt", tmp_path / "big", tmp_path / "big.npz")
    assert not (tmp_path / "big.npz").exists()
