"""Evaluation of a split: metrics on synthetic embeddings whose answers are known, and the plots.

The trained VAE is replaced by a tiny torch module with the two methods evaluation uses
(``decode_canonical`` and ``encode``), so these tests do not depend on training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch

from cryovae import evaluate as ev
from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.plots import central_slices, history_components
from cryovae.rotations import matrix_to_relion_euler, relion_euler_to_matrix, random_rotations, symmetry_group
from cryovae.shards import write_particles_star

CLASSES = ["alpha", "beta", "gamma", "delta"]  # delta is unseen
SEEN = ["alpha", "beta", "gamma"]
BOX = 8
PLOTS = ["umap.png", "confusion.png", "affinity_vs_latent.png", "pose_error.png", "reconstructions.png",
         "interpolation.png", "training_curves.png", "pose_confidence.png"]


def make_config(**extra):
    data = {"structures": {c: f"demo:{c}" for c in CLASSES}, "unseen": ["delta"], "seed": 3,
            "alignment": {"symmetry": {"beta": "C2"}}}
    data.update(extra)
    return validate_config(data)


class TinyModel(torch.nn.Module):
    """Stand-in VAE: a fixed linear decoder to (1, BOX, BOX, BOX) volumes and a linear encoder."""

    def __init__(self, latent_dims: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.decoder = torch.nn.Linear(latent_dims, BOX**3)
        self.encoder = torch.nn.Linear(BOX**3, latent_dims)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def decode_canonical(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(-1, 1, BOX, BOX, BOX)

    def class_condition(self, classes):   # a model without a classifier head
        return None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(len(x), -1))


def class_centres(latent_dims: int = 6) -> dict[str, np.ndarray]:
    """Well separated class directions in the latent space."""
    rng = np.random.default_rng(11)
    return {c: 3.0 * rng.standard_normal(latent_dims) for c in CLASSES}


def write_split(folder: Path, ids, classes, angles=None, origins=None) -> Path:
    """A split folder with only particles.star (evaluation never reads the volumes)."""
    particles = pd.DataFrame({
        "cryovaeParticleId": ids, "cryovaeShard": "shard_000.npy", "cryovaeIndex": np.arange(len(ids)),
        "cryovaeClassName": classes,
        "rlnClassNumber": [CLASSES.index(c) + 1 if c in CLASSES else 0 for c in classes],
    })
    if angles is not None:
        for col, values in zip(ev.TRUE_ANGLE_COLUMNS, angles.T):
            particles[col] = values
        for col, values in zip(ev.TRUE_ORIGIN_COLUMNS, origins.T):
            particles[col] = values
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [10.0], "rlnImageSize": [BOX],
                           "rlnImageDimensionality": [3]})
    folder.mkdir(parents=True, exist_ok=True)
    write_particles_star(particles, optics, folder / "particles.star")
    return folder


def embeddings_table(ids, latents, predicted, angles, origins, unknown_score) -> pd.DataFrame:
    n = len(ids)
    table = pd.DataFrame({"particle_id": ids})
    for i in range(latents.shape[1]):
        table[f"latent_{i}"] = latents[:, i]
    for col, values in zip(ev.ANGLE_COLUMNS, angles.T):
        table[col] = values
    for col, values in zip(ev.ORIGIN_COLUMNS, origins.T):
        table[col] = values
    table["predicted_class"] = predicted
    nearest = [p if p != "unknown" else "alpha" for p in predicted]
    table["nearest_class"] = nearest
    for c in SEEN:
        table[f"prob_{c}"] = [1.0 if c == p else 0.0 for p in nearest]
    table["unknown_score"] = unknown_score
    table["confidence"] = np.ones(n)
    table["recon_error"] = np.zeros(n)
    return table


def write_affinity(path: Path, names, matrix) -> Path:
    pd.DataFrame(matrix, columns=names).to_csv(path, index=False)
    return path


def write_history(path: Path) -> Path:
    epochs = np.arange(1, 6)
    pd.DataFrame({"epoch": epochs, "train_loss": 10.0 / epochs, "val_loss": 12.0 / epochs,
                  "seconds": np.full(5, 1.5), "train_recon": 5.0 / epochs, "val_recon": 6.0 / epochs,
                  "train_kl": 0.1 * epochs, "train_affinity": 1.0 / epochs, "train_pose": 2.0 / epochs,
                  }).to_csv(path, index=False)
    return path


def write_frames(path: Path, config) -> Path:
    """``align`` output with identity frames and each class's group about RELION's axes."""
    frames = {c: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0.0] * 3,
                  "symmetry": config.alignment.symmetry.get(c, "C1"), "symmetry_axes": np.eye(3).tolist()}
              for c in config.seen_classes}
    path.write_text(json.dumps(frames))
    return path


def run_evaluate(tmp: Path, config, table: pd.DataFrame, split_dir: Path, affinity: Path, out: Path) -> dict:
    """evaluate() with the stand-in model; returns the parsed metrics.json."""
    table.to_csv(tmp / "embeddings.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "load_trained_model", lambda path, dims: TinyModel(dims).eval())
        ev.evaluate(config, tmp / "embeddings.csv", split_dir, affinity, tmp / "model.pt",
                    write_history(tmp / "history.csv"), write_frames(tmp / "frames.json", config), out)
    return json.loads((out / "metrics.json").read_text())


def perfect_data(tmp: Path, per_class: int, seed: int):
    """``per_class`` simulated particles of each class, predicted perfectly; the table is shuffled.

    Class beta is C2: its predicted rotations are the true ones times the 2-fold about z,
    which is the same particle, so its pose error must still be zero.  The affinity is a
    strictly increasing function of the cosine similarity of the class-mean latents.
    Returns (table, split_dir, affinity_csv).
    """
    rng = np.random.default_rng(seed)
    classes = np.repeat(CLASSES, per_class)
    ids = [f"test_{i:05d}" for i in range(len(classes))]
    centres = class_centres()
    latents = np.stack([centres[c] for c in classes]) + 0.05 * rng.standard_normal((len(classes), 6))
    true_mats = random_rotations(len(classes), rng)
    origins = rng.uniform(-10, 10, (len(classes), 3))
    split_dir = write_split(tmp / "test", ids, classes, matrix_to_relion_euler(true_mats), origins)
    pred_mats = true_mats.copy()
    pred_mats[classes == "beta"] = true_mats[classes == "beta"] @ symmetry_group("C2")[1]
    predicted = np.where(classes == "delta", "unknown", classes)
    score = np.where(classes == "delta", 0.9, 0.1) + 0.01 * rng.random(len(classes))
    table = embeddings_table(ids, latents, predicted, matrix_to_relion_euler(pred_mats), origins, score)
    means = np.stack([latents[classes == c].mean(axis=0) for c in CLASSES])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    affinity = write_affinity(tmp / "affinity.csv", CLASSES, np.exp(unit @ unit.T) / np.e)
    return table.iloc[rng.permutation(len(table))], split_dir, affinity


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    """evaluate() once on 60 perfectly predicted particles (15 per class: the UMAP route)."""
    tmp = tmp_path_factory.mktemp("perfect")
    config = make_config()
    table, split_dir, affinity = perfect_data(tmp, 15, seed=5)
    out = tmp / "evaluation" / "test"
    metrics = run_evaluate(tmp, config, table, split_dir, affinity, out)
    return {"metrics": metrics, "out": out, "tmp": tmp, "config": config, "table": table,
            "split_dir": split_dir, "affinity": affinity}


def test_perfect_predictions_give_perfect_metrics(perfect):
    m = perfect["metrics"]
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["unseen_auroc"] == 1.0
    assert m["pose_error_median_deg"] == pytest.approx(0.0, abs=1e-4)
    assert m["pose_error_mean_deg"] == pytest.approx(0.0, abs=1e-4)
    assert m["pose_error_n_particles"] == 45
    assert m["shift_error_median_angstrom"] == pytest.approx(0.0, abs=1e-6)
    assert m["seen_unknown_rate"] == 0.0
    assert m["unseen_flagged_fraction"] == 1.0
    assert m["per_class_accuracy"] == {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}
    assert m["n_particles"] == 60 and m["n_seen_particles"] == 45 and m["n_unseen_particles"] == 15
    assert m["split"] == "test"
    assert m["has_ground_truth"] is True
    lo, hi = m["unknown_threshold_bounds"]
    assert 0.1 <= lo < hi <= 0.92


def test_perfect_confusion_matrix_is_diagonal_with_unseen_in_unknown(perfect):
    m = perfect["metrics"]
    assert m["classes"] == CLASSES
    assert m["predicted_labels"] == ["alpha", "beta", "gamma", "unknown"]
    assert m["confusion_matrix"] == [[15, 0, 0, 0], [0, 15, 0, 0], [0, 0, 15, 0], [0, 0, 0, 15]]


def test_affinity_spearman_is_one_for_a_monotone_affinity(perfect):
    assert perfect["metrics"]["affinity_spearman"] == pytest.approx(1.0)
    assert perfect["metrics"]["affinity_spearman_predicted_classes"] == pytest.approx(1.0)


def test_plots_are_valid_images(perfect):
    for name in PLOTS:
        path = perfect["out"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 150 and image.shape[1] > 150, name
        assert image[..., :3].std() > 0.02, f"{name} is blank"


def test_metrics_json_is_sorted_and_deterministic(perfect, tmp_path):
    text = (perfect["out"] / "metrics.json").read_text()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    again = run_evaluate(perfect["tmp"], perfect["config"], perfect["table"], perfect["split_dir"],
                         perfect["affinity"], tmp_path / "again")
    assert (tmp_path / "again" / "metrics.json").read_text() == text
    assert (tmp_path / "again" / "umap.png").read_bytes() == (perfect["out"] / "umap.png").read_bytes()
    assert again["accuracy"] == 1.0


def test_rows_are_matched_by_particle_id_not_position(perfect):
    """Wrong predictions on a shuffled table: metrics equal those of the same table in order."""
    config, table = perfect["config"], perfect["table"].copy()
    table.loc[table["particle_id"].isin(["test_00000", "test_00001", "test_00020"]), "predicted_class"] = "gamma"
    particles = ev.SubtomogramSet.open(perfect["split_dir"]).particles
    affinity = ev.read_affinity(perfect["affinity"], config)
    results = []
    for frame in (table, table.sort_values("particle_id")):
        merged = ev.attach_truth(frame.reset_index(drop=True), particles, Path("e.csv"), Path("p.star"), config)
        latents = merged[[f"latent_{i}" for i in range(6)]].to_numpy()
        results.append(ev.compute_metrics(config, merged, latents, affinity, ev.pose_errors(merged, config), "t"))
    assert results[0] == results[1]
    assert results[0]["accuracy"] == pytest.approx(42 / 45)
    assert results[0]["confusion_matrix"][0] == [13, 0, 2, 0]
    assert results[0]["confusion_matrix"][1] == [0, 14, 1, 0]


def test_known_confusion_matrix_accuracy_and_f1():
    config = make_config()
    true = np.array(["alpha"] * 4 + ["beta"] * 4 + ["delta"] * 2, dtype=object)
    pred = np.array(["alpha", "alpha", "alpha", "beta", "beta", "beta", "unknown", "alpha", "unknown", "beta"],
                    dtype=object)
    m = ev.classification_metrics(true, pred, np.where(pred == "unknown", "beta", pred), config)
    assert m["classes"] == ["alpha", "beta", "delta"]
    assert m["confusion_matrix"] == [[3, 1, 0, 0], [1, 2, 0, 1], [0, 1, 0, 1]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    # alpha: precision 3/4, recall 3/4 -> F1 0.75; beta: precision 2/3, recall 2/4 -> F1 4/7
    assert m["macro_f1"] == pytest.approx((0.75 + 4 / 7) / 2)
    assert m["per_class_accuracy"] == {"alpha": 0.75, "beta": 0.5}
    assert m["seen_unknown_rate"] == pytest.approx(1 / 8)
    assert m["nearest_class_accuracy"] == pytest.approx(6 / 8)
    assert m["unseen_flagged_fraction"] == 0.5


def test_auroc_perfect_inverted_and_random():
    config = make_config()
    true = np.array(["alpha"] * 50 + ["delta"] * 50, dtype=object)
    score = np.r_[np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 50)]
    assert ev.unseen_auroc(true, score, config) == 1.0
    assert ev.unseen_auroc(true, -score, config) == 0.0
    rng = np.random.default_rng(0)
    big = np.array(["beta"] * 3000 + ["delta"] * 3000, dtype=object)
    assert ev.unseen_auroc(big, rng.random(6000), config) == pytest.approx(0.5, abs=0.03)
    assert ev.unseen_auroc(np.array(["alpha", "beta"], dtype=object), np.array([0.1, 0.2]), config) is None


def _pose_frame(classes, pred_angles, true_angles):
    n = len(classes)
    frame = pd.DataFrame({"particle_id": [str(i) for i in range(n)], "true_class": classes,
                          "predicted_class": classes})
    for col, values in zip(ev.ANGLE_COLUMNS, pred_angles.T):
        frame[col] = values
    for col, values in zip(ev.TRUE_ANGLE_COLUMNS, true_angles.T):
        frame[col] = values
    for col in (*ev.ORIGIN_COLUMNS, *ev.TRUE_ORIGIN_COLUMNS):
        frame[col] = 0.0
    return frame


def test_c2_class_predicted_rotated_by_its_twofold_has_zero_error():
    config = make_config()  # beta: C2, alpha: C1
    rng = np.random.default_rng(1)
    true = random_rotations(6, rng)
    pred = true @ symmetry_group("C2")[1]
    frame = _pose_frame(["beta"] * 3 + ["alpha"] * 3, matrix_to_relion_euler(pred), matrix_to_relion_euler(true))
    errors = ev.pose_errors(frame, config)["rotation_error_deg"].to_numpy()
    np.testing.assert_allclose(errors[:3], 0.0, atol=1e-5)
    np.testing.assert_allclose(errors[3:], 180.0, atol=1e-5)  # C1: the 2-fold is a 180° error


def test_symmetry_axes_located_in_the_map_are_used():
    """A C2 whose axis lies along x in the map: a flip about x is no error, a flip about z is."""
    config = make_config()
    axes = relion_euler_to_matrix(np.array([0.0, 90.0, 0.0]))  # takes z onto a horizontal axis
    frames = {"beta": {"symmetry": "C2", "symmetry_axes": axes.tolist()}}
    twofold_in_map = axes @ symmetry_group("C2")[1] @ axes.T
    true = random_rotations(4, np.random.default_rng(4))
    pred = np.concatenate([true[:2] @ twofold_in_map, true[2:] @ symmetry_group("C2")[1]])
    frame = _pose_frame(["beta"] * 4, matrix_to_relion_euler(pred), matrix_to_relion_euler(true))
    errors = ev.pose_errors(frame, config, frames)["rotation_error_deg"].to_numpy()
    np.testing.assert_allclose(errors[:2], 0.0, atol=1e-5)
    np.testing.assert_allclose(errors[2:], 180.0, atol=1e-5)


def test_pose_error_equals_the_applied_rotation():
    config = make_config()
    rng = np.random.default_rng(2)
    true = random_rotations(5, rng)
    angles_deg = np.array([5.0, 20.0, 45.0, 90.0, 135.0])
    delta = np.stack([relion_euler_to_matrix(np.array([0.0, a, 0.0])) for a in angles_deg])
    frame = _pose_frame(["alpha"] * 5, matrix_to_relion_euler(true @ delta), matrix_to_relion_euler(true))
    errors = ev.pose_errors(frame, config)
    np.testing.assert_allclose(errors["rotation_error_deg"], angles_deg, atol=1e-6)
    summary = ev.pose_metrics(errors)
    assert summary["pose_error_median_deg"] == pytest.approx(45.0)
    assert summary["pose_error_mean_deg"] == pytest.approx(angles_deg.mean())


def test_spearman_of_monotone_and_reversed_relations():
    theta = np.radians([0.0, 10.0, 35.0, 70.0, 80.0])
    means = np.stack([np.cos(theta), np.sin(theta), np.zeros(5)], axis=1) * np.arange(1, 6)[:, None]
    latent = ev.cosine_similarity_matrix(means)
    np.testing.assert_allclose(latent, np.cos(theta[:, None] - theta[None, :]), atol=1e-12)
    assert ev.upper_triangle_spearman(latent, latent**3) == pytest.approx(1.0)
    assert ev.upper_triangle_spearman(latent, -latent) == pytest.approx(-1.0)
    assert ev.upper_triangle_spearman(latent[:2, :2], latent[:2, :2]) is None  # one pair: undefined


def test_extracted_data_without_truth_gives_nulls(tmp_path):
    config = make_config()
    rng = np.random.default_rng(4)
    n = 12  # fewer than 15: the latent map falls back to PCA
    ids = [f"TS_01_{i:03d}" for i in range(n)]
    split_dir = write_split(tmp_path / "TS_01", ids, ["unknown"] * n)
    predicted = np.array(["alpha", "beta", "gamma", "unknown"] * 3)
    centres = class_centres()
    latents = np.stack([centres["delta" if p == "unknown" else p] for p in predicted])
    latents += 0.1 * rng.standard_normal(latents.shape)
    table = embeddings_table(ids, latents, predicted, rng.uniform(0, 90, (n, 3)), np.zeros((n, 3)),
                             rng.random(n))
    affinity = write_affinity(tmp_path / "affinity.csv", CLASSES, np.eye(4) * 0.5 + 0.5)
    m = run_evaluate(tmp_path, config, table, split_dir, affinity, tmp_path / "out")
    for key in ("accuracy", "macro_f1", "unseen_auroc", "pose_error_median_deg", "pose_error_mean_deg",
                "affinity_spearman", "confusion_matrix", "classes", "per_class_accuracy", "seen_unknown_rate",
                "unseen_flagged_fraction"):
        assert key in m and m[key] is None, key
    assert m["has_ground_truth"] is False
    assert m["n_particles"] == n
    assert m["predicted_counts"] == {"alpha": 3, "beta": 3, "gamma": 3, "unknown": 3}
    for name in PLOTS:
        assert matplotlib.image.imread(tmp_path / "out" / name).shape[0] > 150, name


def test_missing_and_extra_particles_are_named(tmp_path):
    config = make_config()
    particles = pd.DataFrame({"cryovaeParticleId": ["a", "b", "c"], "cryovaeClassName": ["alpha"] * 3})
    table = pd.DataFrame({"particle_id": ["a", "b", "x"]})
    with pytest.raises(InputError, match=r"e\.csv: particle 'x' .*not in p\.star"):
        ev.attach_truth(table, particles, Path("e.csv"), Path("p.star"), config)
    with pytest.raises(InputError, match=r"particle 'c' of p\.star .*has no row"):
        ev.attach_truth(pd.DataFrame({"particle_id": ["a", "b"]}), particles, Path("e.csv"), Path("p.star"), config)


def test_bad_embeddings_and_affinity_are_reported(tmp_path):
    config = make_config()
    ids = ["p1", "p2"]
    table = embeddings_table(ids, np.zeros((2, 3)), ["alpha", "zeta"], np.zeros((2, 3)), np.zeros((2, 3)),
                             np.zeros(2))
    table.to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(InputError, match=r"e\.csv: particle 'p2': predicted_class 'zeta'"):
        ev.read_embeddings(tmp_path / "e.csv", config)
    table.drop(columns="latent_1").to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(InputError, match="latent_0 … latent_1"):
        ev.read_embeddings(tmp_path / "e.csv", config)
    write_affinity(tmp_path / "a.csv", CLASSES[:3], np.eye(3))
    with pytest.raises(InputError, match=r"a\.csv: class\(es\) \['delta'\]"):
        ev.read_affinity(tmp_path / "a.csv", config)


def test_affinity_is_reordered_to_config_order(tmp_path):
    config = make_config()
    names = ["delta", "gamma", "beta", "alpha"]
    matrix = np.arange(16, dtype=float).reshape(4, 4)
    frame = ev.read_affinity(write_affinity(tmp_path / "a.csv", names, matrix), config)
    assert list(frame.index) == CLASSES and list(frame.columns) == CLASSES
    assert frame.loc["alpha", "delta"] == matrix[3, 0]
    assert frame.loc["gamma", "beta"] == matrix[1, 2]


def test_threshold_bounds_read_off_the_calls():
    pred = np.array(["alpha", "unknown", "beta", "unknown"], dtype=object)
    assert ev.threshold_bounds(pred, np.array([0.1, 0.7, 0.3, 0.9])) == [0.3, 0.7]
    assert ev.threshold_bounds(pred, np.array([0.8, 0.7, 0.3, 0.9])) is None
    assert ev.threshold_bounds(np.array(["alpha"], dtype=object), np.array([0.2])) is None


def test_decoded_class_means_and_central_slices():
    model = TinyModel(4).eval()
    z = np.random.default_rng(0).standard_normal((3, 4))
    volumes = ev.decode_latents(model, z)
    assert volumes.shape == (3, BOX, BOX, BOX)
    with torch.no_grad():
        expected = model.decoder(torch.as_tensor(z, dtype=torch.float32)).reshape(3, BOX, BOX, BOX).numpy()
    np.testing.assert_allclose(volumes, expected, rtol=1e-6)
    vol = np.arange(4 * 6 * 8).reshape(4, 6, 8)
    xy, xz, yz = central_slices(vol)
    np.testing.assert_array_equal(xy, vol[2])
    np.testing.assert_array_equal(xz, vol[:, 3, :])
    np.testing.assert_array_equal(yz, vol[:, :, 4])


def test_interpolation_pair_is_least_similar():
    affinity = pd.DataFrame([[1, 0.5, 0.2], [0.5, 1, 0.7], [0.2, 0.7, 1]], index=list("abc"), columns=list("abc"))
    assert ev.interpolation_pair(["a", "b", "c"], affinity) == ("a", "c")


def test_history_components_pair_train_and_val():
    history = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "seconds", "train_recon", "val_recon",
                                    "train_kl"])
    assert history_components(history) == {"loss": {"train": "train_loss", "val": "val_loss"},
                                           "recon": {"train": "train_recon", "val": "val_recon"},
                                           "kl": {"train": "train_kl"}}


def _cli_args(config: dict, tmp: Path, split_dir: Path, affinity: Path, out: Path) -> list[str]:
    return ["evaluate", "--config", json.dumps(config), "--embeddings", str(tmp / "embeddings.csv"),
            "--split-dir", str(split_dir), "--affinity", str(affinity), "--model", str(tmp / "model.pt"),
            "--history", str(write_history(tmp / "history.csv")),
            "--frames", str(write_frames(tmp / "frames.json", validate_config(config))), "--output-dir", str(out)]


def test_cli_with_a_saved_model(tmp_path):
    """The ``cryovae evaluate`` verb end to end with a real (untrained) model file."""
    from cryovae.cli import main
    from cryovae.model import AffinityVAE, save_model

    config = make_config().model_dump()
    table, split_dir, affinity = perfect_data(tmp_path, 3, seed=8)  # 12 particles: the PCA route
    table.to_csv(tmp_path / "embeddings.csv", index=False)
    model = AffinityVAE((BOX, BOX, BOX), [4], 6, hidden=16, pixel_size_angstrom=10.0)
    save_model(tmp_path / "model.pt", model, CLASSES, config)
    assert main(_cli_args(config, tmp_path, split_dir, affinity, tmp_path / "out")) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (m["accuracy"], m["macro_f1"], m["unseen_auroc"]) == (1.0, 1.0, 1.0)
    assert m["pose_error_median_deg"] == pytest.approx(0.0, abs=1e-4)
    assert m["confusion_matrix"] == [[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]]
    assert matplotlib.image.imread(tmp_path / "out" / "reconstructions.png").shape[0] > 150

    save_model(tmp_path / "model.pt", AffinityVAE((BOX, BOX, BOX), [4], 5, hidden=16), CLASSES, config)
    assert main(_cli_args(config, tmp_path, split_dir, affinity, tmp_path / "bad")) == 2
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_metrics_table_lists_every_value_of_the_json(perfect):
    """metrics.html (the report's table) holds each metrics.json value under its dotted name."""
    import html as html_lib

    metrics = json.loads((perfect["out"] / "metrics.json").read_text())
    text = (perfect["out"] / "metrics.html").read_text()
    cells = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", text)
    table = {html_lib.unescape(k): html_lib.unescape(v) for k, v in cells}
    assert table["accuracy"] == str(metrics["accuracy"])
    assert table["per_class_accuracy.alpha"] == str(metrics["per_class_accuracy"]["alpha"])
    assert table["symmetry.beta"] == "C2"
    assert table["confusion_matrix"] == json.dumps(metrics["confusion_matrix"])
    flat = {}

    def walk(prefix, value):   # nested keys joined by dots, at any depth (unseen_placement.{class}.{field})
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", metrics)
    assert table["unseen_placement.delta.affinity_nearest_rank_in_latent"] == str(
        metrics["unseen_placement"]["delta"]["affinity_nearest_rank_in_latent"])
    assert sorted(table) == sorted(flat)
    assert all(table[k] == "n/a" for k, v in flat.items() if v is None)


def test_embed_2d_keeps_separated_clusters_apart_and_is_seeded():
    """UMAP on exact neighbours: three far-apart clusters in 8-D stay three groups in 2-D,
    and the same seed gives the same coordinates."""
    from cryovae.plots import embed_2d

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    latents = rng.normal(size=(120, 8)) + 20.0 * np.eye(8)[labels]
    coords, method = embed_2d(latents, seed=3)
    assert method == "UMAP" and coords.shape == (120, 2)
    centres = np.stack([coords[labels == c].mean(0) for c in range(3)])
    nearest = np.argmin(((coords[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).all()
    np.testing.assert_array_equal(embed_2d(latents, seed=3)[0], coords)


def test_frame_free_error_ignores_a_common_frame_rotation_and_offset():
    """Poses off by one frame rotation G (and origins by R_i t) for every particle have zero
    frame-free error; one particle turned by a further 40° has 40°, the others stay at zero."""
    rng = np.random.default_rng(3)
    true = random_rotations(12, rng)
    frame = random_rotations(1, rng)[0]
    pred = true @ frame.T
    turn = relion_euler_to_matrix(np.array([0.0, 40.0, 0.0]))
    pred[5] = pred[5] @ turn
    errors = ev.frame_free_rotation_errors(pred, true, np.eye(3)[None])
    assert errors[5] == pytest.approx(40.0, abs=1e-4)
    np.testing.assert_allclose(np.delete(errors, 5), 0.0, atol=1e-4)
    offset = np.array([1.5, -0.5, 2.0])
    delta = np.einsum("nij,j->ni", true, offset)
    delta[2] += [0.0, 3.0, 4.0]
    shifts = ev.frame_free_shift_errors(delta, true)
    assert shifts[2] == pytest.approx(5.0, abs=1e-9)
    np.testing.assert_allclose(np.delete(shifts, 2), 0.0, atol=1e-9)


def test_frame_free_error_is_modulo_the_point_group():
    rng = np.random.default_rng(4)
    true = random_rotations(8, rng)
    group = symmetry_group("C4")
    pred = np.stack([t @ group[i % 4] for i, t in enumerate(true)])  # each off by a symmetry operation
    np.testing.assert_allclose(ev.frame_free_rotation_errors(pred, true, group), 0.0, atol=1e-4)


def test_pose_margin_auroc_and_determined_medians():
    config = validate_config({"structures": {"a": "demo:globule_a", "b": "demo:rod_a"}, "box_size": 16})
    ids = [f"p{i}" for i in range(6)]
    free = pd.DataFrame({"particle_id": ids, "true_class": "a",
                         "rotation_error_deg_frame_free": [2.0, 3.0, 4.0, 90.0, 100.0, 120.0],
                         "shift_error_px_frame_free": 0.5})
    merged = pd.DataFrame({"particle_id": ids, "nearest_class": ["a"] * 3 + ["b"] * 3,
                           "pose_margin": [9.0, 8.0, 7.0, 1.0, 0.5, 0.2], "pose_determined": [1, 1, 1, 0, 0, 0]})
    out = ev.pose_confidence_metrics(merged, free, config)
    assert out["pose_margin_auroc"] == 1.0
    assert out["pose_error_median_deg_determined"] == 3.0 and out["pose_error_median_deg_undetermined"] == 100.0
    assert out["per_class_pose_determined_fraction"] == {"a": 1.0, "b": 0.0}
    assert out["pose_undetermined_classes"] == ["b"] and out["shift_error_median_px"] == 0.5


def test_unseen_placement_ranks_the_affinity_nearest_seen_class_in_latent_space():
    from cryovae.evaluate import unseen_placement

    names = ["a", "b", "c", "u"]
    affinity = pd.DataFrame(np.array([[1, 0, 0, 0.2], [0, 1, 0, 0.9], [0, 0, 1, 0.1], [0.2, 0.9, 0.1, 1.0]]),
                            index=names, columns=names)
    centres = {"a": [1.0, 0, 0], "b": [0, 1.0, 0], "c": [0, 0, 1.0], "u": [0.8, 0.5, 0.0]}
    labels = np.repeat(names, 5)
    latents = np.array([centres[c] for c in labels]) + 0.01 * np.random.default_rng(0).standard_normal((20, 3))
    out = unseen_placement(latents, labels.astype(object), affinity, ["a", "b", "c"], ["u"])
    # u lies nearest a in latent space, second nearest b, which the affinity ranks first
    assert out == {"u": {"nearest_seen_in_latent": "a", "nearest_seen_by_affinity": "b",
                         "affinity_nearest_rank_in_latent": 2}}
    assert unseen_placement(latents, labels.astype(object), affinity, ["a", "b", "c"], []) is None
