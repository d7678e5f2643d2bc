"""Interpretable models of the latent space, on synthetic latents whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import special_ortho_group

from cryovae import interpret as it
from cryovae.symbolic import fit_symbolic
from test_evaluate import BOX, CLASSES, SEEN, embeddings_table, make_config, write_affinity, write_split


def test_mutual_information_gap_of_a_known_vector():
    assert it.mutual_information_gap(np.array([0.3, 0.9, 0.1]), 1.2) == pytest.approx(0.5)
    assert it.mutual_information_gap(np.array([0.4, 0.4]), 1.0) == 0.0


def test_mig_is_one_when_each_dimension_is_one_factor_and_lower_after_a_rotation():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=(5000, 4))
    factors = {f"f{k}": values[:, k] for k in range(4)}
    aligned = it.disentanglement(values.astype(float), factors, {}, bins=20)
    assert all(m > 0.98 for m in aligned["mig"].values())
    assert aligned["dimension_of_factor"] == {f"f{k}": k for k in range(4)}
    rotated = values.astype(float) @ special_ortho_group.rvs(4, random_state=1)
    mixed = it.disentanglement(rotated, factors, {}, bins=20)
    assert mixed["mig_mean"] < 0.5 * aligned["mig_mean"]


def test_affinity_coordinates_of_points_on_a_line_are_the_points():
    x = np.array([0.0, 1.0, 3.0, 4.5])
    affinity = 1.0 - np.abs(x[:, None] - x[None]) / 5.0
    coords = it.affinity_coordinates(affinity, k=2)
    assert np.abs(coords[:, 0]) == pytest.approx(np.abs(x - x.mean()) / 5.0, abs=1e-9)
    assert coords[:, 1] == pytest.approx(0.0, abs=1e-6)


def test_affinity_correlation_finds_the_dimension_that_orders_classes_by_similarity():
    x = {"a": 0.0, "b": 1.0, "c": 3.0}
    affinity = pd.DataFrame([[1 - abs(x[i] - x[j]) / 4 for j in x] for i in x], index=list(x), columns=list(x))
    labels = np.repeat(list(x), 30)
    rng = np.random.default_rng(4)
    latents = np.stack([rng.standard_normal(90), np.array([x[c] for c in labels]) ** 2], axis=1)
    rho = it.affinity_correlations(latents, labels, affinity)["affinity_pc1"]
    assert rho[1] == pytest.approx(1.0, abs=1e-9)  # x² orders the classes as x does: the coordinate
    assert rho[0] < 0.35


def test_known_factors_skip_what_does_not_vary():
    labels = np.array(["a", "b"] * 50)
    particles = pd.DataFrame({"rlnAngleRot": np.linspace(0, 360, 100), "cryovaeSnr": np.full(100, 0.5),
                              "rlnDefocusU": np.linspace(2e4, 5e4, 100)})
    factors, skipped = it.known_factors(labels, particles, bins=10)
    assert set(factors) == {"class", "angle_rot_deg", "defocus_angstrom"}
    assert factors["class"].tolist() == [0, 1] * 50
    assert np.bincount(factors["defocus_angstrom"]).tolist() == [10] * 10
    assert skipped["snr"] == "constant or not finite in this split"
    assert skipped["angle_tilt_deg"] == "not in the STAR file"


def test_sparse_rules_pick_the_two_dimensions_the_class_depends_on():
    rng = np.random.default_rng(2)
    z_train, z_eval = rng.standard_normal((2000, 6)), rng.standard_normal((2000, 6))
    label = lambda z: np.where(z[:, 1] - z[:, 4] > 0, "a", "b")  # noqa: E731
    sparse = it.sparse_models(z_train, label(z_train), z_eval, label(z_eval), ["a", "b"], 2, seed=0)
    for c in ("a", "b"):
        assert set(sparse["ranking"][c][:2]) == {1, 4}
    curve = {p["dims_per_class"]: p["accuracy"] for p in sparse["accuracy_by_dims"]}
    assert curve[2] > 0.98
    assert curve[1] == pytest.approx(0.75, abs=0.04)  # one of the two dims alone: P = 3/4
    assert sparse["kept"]["dims_per_class"] == 2 and sparse["kept"]["n_parameters"] == 6


def test_quadratic_rules_find_a_class_surrounded_by_others_where_linear_rules_cannot():
    """Class 'in' sits at the centre of dims 2 and 5 with 'out' all around it: no half-space holds it,
    a band on each of the two dimensions (their squares) does."""
    rng = np.random.default_rng(5)
    z_train, z_eval = rng.standard_normal((3000, 6)), rng.standard_normal((3000, 6))
    label = lambda z: np.where(z[:, 2] ** 2 + z[:, 5] ** 2 < 1.4, "in", "out")  # noqa: E731
    args = (z_train, label(z_train), z_eval, label(z_eval), ["in", "out"], 2)
    linear, quadratic = it.sparse_models(*args, seed=0), it.sparse_models(*args, seed=0, terms="quadratic")
    assert set(quadratic["ranking"]["in"][:2]) == {2, 5}
    assert quadratic["kept"]["accuracy"] > 0.97
    assert linear["kept"]["accuracy"] < 0.65  # about the share of the larger class
    rule = quadratic["kept"]["rules"]["in"]
    assert np.all(np.asarray(rule["square_coefficients"]) < 0) and rule["intercept"] > 0
    assert quadratic["kept"]["n_parameters"] == 2 * (2 * 2 + 1)


def test_symbolic_regression_recovers_the_sign_of_a_difference():
    rng = np.random.default_rng(3)
    x, x_eval = rng.standard_normal((500, 3)), rng.standard_normal((2000, 3))
    y = (x[:, 0] - x[:, 2] > 0).astype(float)
    fit = fit_symbolic(x, y, ["z0", "z1", "z2"], seed=0, generations=30, population=300, max_length=15)
    chosen = fit.chosen
    assert "z0" in chosen.text and "z2" in chosen.text and "z1" not in chosen.text
    assert np.mean((chosen.evaluate(fit.regressor, x_eval) > 0.5) == (x_eval[:, 0] > x_eval[:, 2])) > 0.98
    lengths = [e.length for e in fit.front]
    assert lengths == sorted(lengths) and chosen.length <= 15
    again = fit_symbolic(x, y, ["z0", "z1", "z2"], seed=0, generations=30, population=300, max_length=15)
    assert [e.text for e in again.front] == [e.text for e in fit.front]


# ----------------------------------------------------------------------------- the verb


def _latents(rng, classes, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k (config order) sits at +4 on latent dim k, noise 0.5 elsewhere: 6 dims."""
    labels = np.repeat(classes, per_class)
    z = 0.5 * rng.standard_normal((len(labels), 6))
    for k, c in enumerate(CLASSES):
        z[labels == c, k] += 4.0
    return z, labels


def _inputs(tmp: Path) -> dict[str, Path]:
    from cryovae.model import AffinityVAE, save_model

    rng = np.random.default_rng(5)
    z_train, y_train = _latents(rng, SEEN, 60)
    np.savez(tmp / "train.npz", particle_id=np.arange(len(y_train)).astype(str), class_name=y_train,
             latent_mean=z_train.astype(np.float32))
    z, labels = _latents(rng, CLASSES, 40)
    ids = [f"p{i:04d}" for i in range(len(labels))]
    angles, origins = rng.uniform(0, 180, (len(ids), 3)), rng.uniform(-5, 5, (len(ids), 3))
    split = write_split(tmp / "test", ids, list(labels), angles, origins)
    predicted = [c if c in SEEN else "unknown" for c in labels]
    embeddings_table(ids, z, predicted, angles, origins, np.zeros(len(ids))).to_csv(tmp / "test.csv", index=False)
    affinity = write_affinity(tmp / "affinity.csv", CLASSES, np.array(
        [[1, 0.8, 0.3, 0.2], [0.8, 1, 0.4, 0.1], [0.3, 0.4, 1, 0.6], [0.2, 0.1, 0.6, 1]]))
    save_model(tmp / "model.pt", AffinityVAE((BOX, BOX, BOX), [4], 6, hidden=16, pixel_size_angstrom=10.0),
               CLASSES, {})
    return {"embeddings": tmp / "test.csv", "split-dir": split, "train-latents": tmp / "train.npz",
            "affinity": affinity, "model": tmp / "model.pt"}


def _run(config: dict, inputs: dict[str, Path], out: Path) -> int:
    from cryovae.cli import main

    args = ["interpret", "--config", json.dumps(config), "--output-dir", str(out)]
    for key, path in inputs.items():
        args += [f"--{key}", str(path)]
    return main(args)


def test_cli_interpret_on_a_tiny_model(tmp_path):
    config = make_config(interpretation={"symbolic_generations": 10, "symbolic_population": 100,
                                         "traversal_steps": 3}).model_dump()
    inputs = _inputs(tmp_path)
    assert _run(config, inputs, tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "interpretation.json").read_text())
    assert (result["labels"], result["n_particles"], result["n_judged_particles"]) == ("true_class", 160, 120)
    assert result["black_box"]["accuracy"] == 1.0
    assert {c: result["sparse"]["ranking"][c][0] for c in SEEN} == {"alpha": 0, "beta": 1, "gamma": 2}
    assert result["sparse"]["accuracy_by_dims"][0]["accuracy"] == 1.0
    assert result["symbolic"]["accuracy"] >= 0.95
    for c in SEEN:
        assert f"z{CLASSES.index(c)}" in result["symbolic"]["classes"][c]["expression"]
    dis = result["disentanglement"]
    assert {"class", "is_alpha", "angle_rot_deg", "shift_x_angstrom"} <= set(dis["factors"])
    assert dis["dimension_of_factor"]["class"] in range(4)
    text = (tmp_path / "out" / "expressions.txt").read_text()
    assert all(f"{c} = {result['symbolic']['classes'][c]['expression']}" in text for c in SEEN)

    assert _run(config, inputs, tmp_path / "again") == 0  # same config, same bytes
    assert (tmp_path / "again" / "interpretation.json").read_bytes() == \
        (tmp_path / "out" / "interpretation.json").read_bytes()


def test_cli_interpret_names_a_train_file_of_another_latent_size(tmp_path):
    config = make_config().model_dump()
    inputs = _inputs(tmp_path)
    np.savez(tmp_path / "train5.npz", particle_id=np.array(["a", "b"]), class_name=np.array(["alpha", "beta"]),
             latent_mean=np.zeros((2, 5), dtype=np.float32))
    assert _run(config, inputs | {"train-latents": tmp_path / "train5.npz"}, tmp_path / "bad") == 2
    assert not (tmp_path / "bad" / "interpretation.json").exists()
