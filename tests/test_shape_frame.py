"""training.shape_frame: matched: the shape latent reads each particle turned upright by its
template-matched pose, so it does not change when the particle turns with its pose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryovae.cli import main
from cryovae.config import validate_config
from cryovae.embed import embed
from cryovae.errors import InputError
from cryovae.match import best_fit_frames
from cryovae.model import AffinityVAE, load_model
from cryovae.model.io import ClassifierHead
from cryovae.shards import SubtomogramSet
from cryovae.train import train
from cryovae.volumes import rigid_transform
from synthetic_particles import class_blobs, make_particles, write_affinity_csv, write_split

NAMES = ["p", "q"]
QUARTER_TURN_Z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _particles(n: int, box: int = 16) -> torch.Tensor:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, n)
    eye = np.tile(np.eye(3), (n, 1, 1))
    return torch.tensor(make_particles(class_blobs(2, 3, box, 0), labels, eye, np.zeros((n, 3)), box, 0.0, rng))[:, None]


def _model(shape_frame: str, n_classes: int = 0) -> AffinityVAE:
    torch.manual_seed(0)
    return AffinityVAE((16, 16, 16), [4, 8], 4, hidden=32, n_classes=n_classes, shape_frame=shape_frame).eval()


def test_matched_latent_is_unchanged_when_the_particle_turns_with_its_frame():
    """A quarter turn maps the grid onto itself, so x and its turned copy read in frames I and A
    are the same upright volume (but for the faint density at the box's edge): the latent and
    the class stay, the reconstruction turns along; a particle-frame model's latent moves."""
    x = _particles(6)
    turn = torch.tensor(QUARTER_TURN_Z, dtype=torch.float32).repeat(6, 1, 1)
    turned = rigid_transform(x, turn, torch.zeros(6, 3))
    eye, zero = torch.eye(3).repeat(6, 1, 1), torch.zeros(6, 3)
    matched, plain = _model("matched", n_classes=2), _model("particle")
    with torch.no_grad():
        a = matched(x, sample=False, frame=(eye, zero))
        b = matched(turned, sample=False, frame=(turn, zero))
        moved = (plain(x, sample=False)["latent_mean"] - plain(turned, sample=False)["latent_mean"]).abs().max()
    assert (a["latent_mean"] - b["latent_mean"]).abs().max() < 0.01 * moved
    np.testing.assert_allclose(a["class_logits"], b["class_logits"], atol=1e-4)
    np.testing.assert_allclose(rigid_transform(a["reconstruction"], turn, zero), b["reconstruction"], atol=1e-4)


def test_a_matched_model_needs_frames():
    with pytest.raises(ValueError, match="matched frame"):
        _model("matched")(_particles(2))
    with pytest.raises(ValueError, match="3D subtomograms"):
        AffinityVAE((16, 16), [4, 8], 4, hidden=32, shape_frame="matched")


def test_best_fit_frames_take_the_refined_class_of_best_fit(tmp_path):
    rng = np.random.default_rng(0)
    rotation = rng.normal(size=(3, 2, 3, 3))
    origin = rng.normal(size=(3, 2, 3))
    fit = np.array([[0.2, np.nan], [0.1, 0.3], [np.nan, 0.05]])
    np.savez(tmp_path / "m.npz", particle_id=np.array(["a", "b", "c"]), fit=fit, rotation=rotation,
             origin_angstrom=origin)
    rot, shift = best_fit_frames(tmp_path / "m.npz", np.array(["a", "b", "c"]), 4.0)
    best = [0, 1, 1]
    np.testing.assert_allclose(rot, rotation[np.arange(3), best], rtol=1e-6)
    np.testing.assert_allclose(shift, -origin[np.arange(3), best] / 4.0, rtol=1e-6)
    with pytest.raises(InputError, match="particles differ"):
        best_fit_frames(tmp_path / "m.npz", np.array(["a", "c", "b"]), 4.0)


def _config(**training):
    base = {"epochs": 1, "batch_size": 8, "channels": [4, 8], "latent_dims": 3, "threads": 1, "device": "cpu",
            "shape_frame": "matched", "semi_supervised": {"classifier": True}}
    base.update(training)
    return validate_config({"structures": {n: f"demo:{n}" for n in NAMES}, "box_size": 8, "training": base})


def _true_pose_match(split, path):
    """A match output whose poses are the split's true ones (one class refined per particle)."""
    from cryovae.model.data import ParticleData

    data = ParticleData.open(split, NAMES)
    n = len(data)
    rotation = np.tile(np.eye(3), (n, 2, 1, 1))
    rotation[:, 1] = data.true_rotation
    origin = np.zeros((n, 2, 3))
    origin[:, 1] = -data.true_shift_voxels * data.pixel_size_angstrom
    fit = np.column_stack([np.full(n, np.nan), np.ones(n)])
    ids = data.source.particles["cryovaeParticleId"].astype(str).to_numpy().astype(str)
    np.savez(path, particle_id=ids, fit=fit, rotation=rotation, origin_angstrom=origin)
    return data.true_rotation, data.true_shift_voxels


def test_train_and_embed_read_particles_in_their_matched_frames(tmp_path):
    write_split(tmp_path / "train", NAMES, 8, box=8, seed=1)
    write_split(tmp_path / "val", NAMES, 5, box=8, seed=2, particles_per_shard=4)
    write_affinity_csv(tmp_path / "affinity.csv", NAMES, np.eye(2))
    _true_pose_match(tmp_path / "train", tmp_path / "train.npz")
    rot, shift = _true_pose_match(tmp_path / "val", tmp_path / "val.npz")
    with pytest.raises(InputError, match="--train-match"):
        train(_config(), tmp_path / "train", tmp_path / "val", tmp_path / "affinity.csv", tmp_path / "model")
    config = json.dumps(_config().model_dump(mode="json"))
    assert main(["train", "--config", config, "--train-dir", str(tmp_path / "train"), "--val-dir",
                 str(tmp_path / "val"), "--affinity", str(tmp_path / "affinity.csv"), "--output-dir",
                 str(tmp_path / "model"), "--train-match", str(tmp_path / "train.npz"),
                 "--val-match", str(tmp_path / "val.npz")]) == 0
    model_path = tmp_path / "model" / "model.pt"
    with pytest.raises(InputError, match="--match"):
        embed(_config(), model_path, tmp_path / "val", tmp_path / "val_latent.npz")
    assert main(["embed", "--config", config, "--model", str(model_path), "--split-dir", str(tmp_path / "val"),
                 "--match", str(tmp_path / "val.npz"), "--output", str(tmp_path / "val_latent.npz")]) == 0
    model, _ = load_model(model_path)
    assert model.shape_frame == "matched"
    x = torch.from_numpy(SubtomogramSet.open(tmp_path / "val").volumes(np.arange(len(rot)))).unsqueeze(1)
    frame = (torch.from_numpy(rot), torch.from_numpy(shift))
    expected = model.encode(x, frame)
    with np.load(tmp_path / "val_latent.npz") as out:
        np.testing.assert_allclose(out["latent_mean"], expected["latent_mean"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["class_probabilities"], expected["class_probabilities"].numpy(), atol=1e-6)
    probabilities = ClassifierHead(model)(x, *frame)
    np.testing.assert_allclose(probabilities.detach().numpy(), expected["class_probabilities"].numpy(), atol=1e-6)


def test_matched_frames_need_template_matching():
    with pytest.raises(InputError, match="shape_frame is matched .* but matching.enabled is false"):
        validate_config({"structures": {n: f"demo:{n}" for n in NAMES}, "matching": {"enabled": False},
                         "classification": {"features": ["latent"], "unknown_features": ["latent"]},
                         "training": {"shape_frame": "matched"}})
