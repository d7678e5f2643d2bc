"""The semi-supervised model (ss-rVAE): classifier head, M2 terms, unlabelled splits, invariance."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.model.io import load_model
from cryovae.model.losses import reconstruction_error
from cryovae.model.semisup import class_kl, class_weights, expected_reconstruction, semisupervised_terms
from cryovae.model.vae import AffinityVAE
from cryovae.train import Batch, augment_batch, build_run, train
from synthetic_particles import class_blobs, make_particles, write_affinity_csv, write_split

NAMES = ["a", "b"]


def _config(box=16, **semi):
    return validate_config({
        "structures": {n: f"demo:{n}" for n in NAMES}, "box_size": box, "seed": 0,
        "training": {"epochs": 40, "batch_size": 32, "channels": [8, 16], "latent_dims": 4, "beta": 0.01,
                     "gamma": 1.0, "pose_weight": 0.0, "learning_rate": 3e-3, "threads": 2, "device": "cpu",
                     "semi_supervised": {"classifier": True, **semi}},
    })


def test_class_weights_balance_the_labelled_classes():
    weights = class_weights(np.array([0, 0, 0, 1, -1, -1]), 3)
    # inverse frequency (1/3, 1), mean 1 over the classes present; an absent class weighs nothing
    np.testing.assert_allclose(weights.numpy(), [0.5, 1.5, 0.0], rtol=1e-6)


def test_class_kl_is_zero_for_the_prior_and_log_c_for_certainty():
    unlabelled = torch.tensor([True, True, False])
    assert float(class_kl(torch.zeros(3, 4), unlabelled)) == pytest.approx(0.0, abs=1e-6)
    certain = torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0], [0, 0, 0, 0]])
    assert float(class_kl(certain, unlabelled)) == pytest.approx(math.log(4), abs=1e-4)
    assert float(class_kl(certain, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_expected_reconstruction_sums_over_the_classes_weighted_by_q():
    torch.manual_seed(0)
    model = AffinityVAE((8, 8), [4], latent_dims=2, hidden=16, n_classes=3).eval()
    x = torch.randn(5, 1, 8, 8)
    enc = model.encode_outputs(x)
    logits = torch.randn(5, 3)
    z = enc["latent_mean"]
    each = torch.stack([reconstruction_error(model.decode(z, enc["rotation"], enc["shift_voxels"],
                                                          y=torch.eye(3)[[c] * 5]), x) for c in range(3)], 1)
    probs = torch.softmax(logits, 1)
    full = expected_reconstruction(model, z, enc, x, logits, None, top_k=0)
    torch.testing.assert_close(full, (probs * each).sum(1))
    best = expected_reconstruction(model, z, enc, x, logits, None, top_k=1)
    torch.testing.assert_close(best, each.gather(1, probs.argmax(1, keepdim=True))[:, 0])


def test_labelled_rows_decode_under_their_own_class():
    torch.manual_seed(1)
    model = AffinityVAE((8, 8), [4], latent_dims=2, hidden=16, n_classes=2).eval()
    x = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, -1, 1])
    enc, terms = semisupervised_terms(model, x, labels, None, torch.ones(2), 0, None, sample=False)
    z = enc["latent_mean"]
    known = labels >= 0
    own = reconstruction_error(model.decode(z[known], enc["rotation"][known], enc["shift_voxels"][known],
                                            y=torch.eye(2)[labels[known]]), x[known])
    unl = expected_reconstruction(model, z[~known], {"decoded_pose": tuple(t[~known] for t in enc["decoded_pose"])},
                                  x[~known], enc["class_logits"][~known], None, 0)
    torch.testing.assert_close(terms["recon"], torch.cat([own, unl]).mean())
    ce = torch.nn.functional.cross_entropy(enc["class_logits"][known], labels[known])
    torch.testing.assert_close(terms["classifier"], ce)


def test_augmentation_moves_the_true_pose_with_the_image():
    box, rng = 16, np.random.default_rng(0)
    blobs = class_blobs(1, 2, box)
    rot = np.tile(np.eye(3), (3, 1, 1))
    angle = np.radians([20.0, -50.0, 75.0])
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    shift = np.array([[1.0, -0.5, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    images = make_particles(blobs, np.zeros(3, int), rot, shift, box, 0.0, rng)
    batch = Batch(torch.tensor(images)[:, None], torch.zeros(3, dtype=torch.int64),
                  torch.tensor(rot, dtype=torch.float32), torch.tensor(shift, dtype=torch.float32))
    moved = augment_batch(batch, 180.0, 2.0, torch.Generator().manual_seed(3))
    expected = make_particles(blobs, np.zeros(3, int), moved.true_rotation.double().numpy(),
                              moved.true_shift_voxels.double().numpy(), box, 0.0, rng)
    for got, want in zip(moved.volumes[:, 0].numpy(), expected):
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98


def test_unlabelled_splits_train_without_their_labels_or_poses(tmp_path):
    write_split(tmp_path / "train", NAMES, 8, ndim=2, box=16, seed=1)
    write_split(tmp_path / "val", NAMES, 4, ndim=2, box=16, seed=2)
    write_split(tmp_path / "target", NAMES, 6, ndim=2, box=16, seed=3)
    write_affinity_csv(tmp_path / "affinity.csv", NAMES, np.eye(2))
    run = build_run(_config(), tmp_path / "train", tmp_path / "val", tmp_path / "affinity.csv", tmp_path / "out",
                    unlabelled_dirs=[tmp_path / "target"])
    assert len(run.train_data) == 16 + 12
    np.testing.assert_array_equal(run.train_data.class_index[16:], -1)
    np.testing.assert_array_equal(run.train_data.pose_known, [True] * 16 + [False] * 12)
    assert run.model.n_classes == 2 and run.setup.classifier.class_names == NAMES


def test_config_names_what_the_semi_supervised_settings_need():
    base = {"structures": {n: f"demo:{n}" for n in NAMES}}
    with pytest.raises(InputError, match="needs training.semi_supervised.classifier: true"):
        validate_config({**base, "training": {"semi_supervised": {"unlabelled": ["tomo"]}}})
    with pytest.raises(InputError, match="'network'"):
        validate_config({**base, "classification": {"features": ["network"]}, "matching": {"enabled": False}})
    with pytest.raises(InputError, match="not a tomogram split"):
        validate_config({**base, "training": {"semi_supervised": {"classifier": True, "unlabelled": ["tomo"]}}})
    ok = validate_config({**base, "tomogram_simulation": {"tomograms": 1},
                          "training": {"semi_supervised": {"classifier": True, "unlabelled": ["sim_00"]}}})
    assert ok.training.semi_supervised.unlabelled == ["sim_00"]


def test_rotating_a_subtomogram_for_augmentation_is_refused(tmp_path):
    write_split(tmp_path / "train", NAMES, 4, box=8, seed=1)
    write_split(tmp_path / "val", NAMES, 2, box=8, seed=2)
    write_affinity_csv(tmp_path / "affinity.csv", NAMES, np.eye(2))
    with pytest.raises(InputError, match="missing wedge"):
        build_run(_config(box=8, augment_rotation_deg=30.0), tmp_path / "train", tmp_path / "val",
                  tmp_path / "affinity.csv", tmp_path / "out")


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """A tiny 2D ss-rVAE: labelled images within ±10°, unlabelled and validation ones at any angle."""
    root = tmp_path_factory.mktemp("ss2d")
    write_split(root / "train", NAMES, 40, ndim=2, box=16, seed=1, max_angle_deg=10.0, noise_sd=0.05)
    write_split(root / "target", NAMES, 80, ndim=2, box=16, seed=2, noise_sd=0.05)
    write_split(root / "val", NAMES, 30, ndim=2, box=16, seed=3, noise_sd=0.05)
    write_affinity_csv(root / "affinity.csv", NAMES, np.eye(2))
    cfg = _config(unlabelled=[], augment_rotation_deg=180.0, augment_shift_px=1.0)
    train(cfg, root / "train", root / "val", root / "affinity.csv", root / "out", unlabelled_dirs=[root / "target"])
    return root


def test_the_classifier_learns_across_the_rotation_shift(shifted_run):
    history = pd.read_csv(shifted_run / "out" / "history.csv")
    assert history["val_accuracy"].iloc[-1] >= 0.9
    assert {"train_classifier", "val_class_kl"} <= set(history.columns)


def test_predictions_stay_when_inputs_turn_and_shift(shifted_run):
    model, meta = load_model(shifted_run / "out" / "model.pt")
    assert meta["classifier_class_names"] == NAMES
    images = np.load(shifted_run / "val" / "shard_000.npy")
    x = torch.tensor(images)[:, None]
    turned = torch.tensor(np.roll(np.rot90(images, 1, axes=(1, 2)), 1, axis=2).copy())[:, None]
    before = model.class_probabilities(x).argmax(1)
    after = model.class_probabilities(turned).argmax(1)
    assert (before == after).float().mean() >= 0.9


def test_embed_writes_the_class_probabilities_the_network_feature_reads(shifted_run):
    from cryovae.classify import features
    from cryovae.embed import encode_split

    cfg = _config()
    arrays = encode_split(cfg, shifted_run / "out" / "model.pt", shifted_run / "val")
    probs = arrays["class_probabilities"]
    assert list(arrays["classifier_class_names"]) == NAMES
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    truth = np.array([NAMES.index(c) for c in arrays["class_name"]])
    assert (probs.argmax(1) == truth).mean() >= 0.9
    np.testing.assert_allclose(features(["network"], arrays, None), np.log(np.maximum(probs.astype(float), 1e-6)))


def test_class_means_decode_under_their_class_and_unseen_ones_under_none():
    model = AffinityVAE((8, 8), [4], latent_dims=2, hidden=16, n_classes=2)
    model.classifier_class_names = ["a", "b"]
    np.testing.assert_allclose(model.class_condition(["b", "a", "unseen"]).numpy(),
                               [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert AffinityVAE((8, 8), [4], latent_dims=2, hidden=16).class_condition(["a"]) is None


def test_the_exported_classifier_runs_without_cryovae_and_agrees(shifted_run, tmp_path):
    import subprocess
    import sys

    from cryovae.cli import main

    config = json.dumps({"structures": {n: f"demo:{n}" for n in NAMES}})
    assert main(["export-classifier", "--config", config, "--model", str(shifted_run / "out" / "model.pt"),
                 "--output", str(tmp_path / "head.pt2")]) == 0
    images = np.load(shifted_run / "val" / "shard_000.npy")[:8]
    np.save(tmp_path / "x.npy", images)
    # a fresh interpreter that never imports cryovae (its path is not on sys.path)
    script = ("import json, sys, numpy as np, torch; extra = {'meta.json': ''}; "
              f"m = torch.export.load({str(tmp_path / 'head.pt2')!r}, extra_files=extra).module(); "
              f"x = torch.tensor(np.load({str(tmp_path / 'x.npy')!r}))[:, None]; "
              "print(json.dumps({'p': m(x).tolist(), 'meta': json.loads(extra['meta.json']), "
              "'cryovae': 'cryovae' in sys.modules}))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = json.loads(subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                                    check=True, env=env, cwd=tmp_path).stdout)
    model, _ = load_model(shifted_run / "out" / "model.pt")
    expected = model.class_probabilities(torch.tensor(images)[:, None]).numpy()
    np.testing.assert_allclose(np.array(out["p"]), expected, rtol=1e-5, atol=1e-6)
    assert out["meta"]["class_names"] == NAMES and not out["cryovae"]


def test_mixed_batches_hold_the_labelled_share_and_pass_over_the_larger_part():
    from cryovae.train import mixed_epoch_batches

    classes = np.array([0, 1] * 5 + [-1] * 100)
    batches = mixed_epoch_batches(classes, 16, 0.25, seed=3, epoch=2)
    unlabelled = np.concatenate([b[classes[b] < 0] for b in batches])
    assert set(unlabelled.tolist()) == set(range(10, 110))              # each at least once
    assert len(batches) == 9 and len(unlabelled) == 9 * 12
    assert all((classes[b] >= 0).sum() == 4 for b in batches)            # 4 of 16 labelled in each
    labelled = np.concatenate([b[classes[b] >= 0] for b in batches])
    assert np.bincount(labelled, minlength=10)[:10].min() >= 3            # cycled through all of them
    again = mixed_epoch_batches(classes, 16, 0.25, seed=3, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    # many labelled beside few unlabelled: the epoch is a pass over the labelled ones
    few = np.array([0, 1] * 50 + [-1] * 6)
    batches = mixed_epoch_batches(few, 16, 0.5, seed=3, epoch=0)
    assert len(batches) == 13 and set(np.concatenate([b[few[b] >= 0] for b in batches]).tolist()) == set(range(100))


def test_auto_classifier_input_is_canonical_for_images_and_trunk_for_subtomograms():
    from cryovae.train import classifier_input

    assert classifier_input("auto", (48, 48)) == "canonical"
    assert classifier_input("auto", (32, 32, 32)) == "trunk"
    assert classifier_input("canonical", (32, 32, 32)) == "canonical"
