"""Classes, unknowns and poses in the reference frame, on latents whose answer is known."""

import json

import numpy as np
import pandas as pd
import pytest
from cryovae.classify import (
    Classifier,
    ClassModel,
    FitMixture,
    adapt_classifier,
    adapt_model,
    annotate,
    features,
    fit_classifier,
    poses_in_reference_frame,
)
from cryovae.cli import main
from cryovae.config import load_config, stage_config_json, validate_config
from cryovae.errors import InputError
from cryovae.rotations import (
    geodesic_distance_deg,
    random_rotations,
    relion_euler_to_matrix,
)
from cryovae.volumes import rotate_volume

CFG_BOTH = validate_config({"structures": {"a": "demo:x", "b": "demo:y", "c": "demo:z"}, "unseen": ["c"]})
CFG = CFG_BOTH.model_copy(update={"classification": CFG_BOTH.classification.model_copy(
    update={"features": ["latent"], "unknown_features": ["latent"]})})
CENTRES = {"a": [4.0, 0, 0, 0], "b": [0, 4.0, 0, 0], "c": [0, 0, 0, 6.0]}


def _latents(path, classes, n, seed):
    rng = np.random.default_rng(seed)
    names = np.repeat(classes, n)
    latent = np.stack([CENTRES[c] for c in names]) + rng.normal(size=(len(names), 4))
    np.savez(
        path, particle_id=np.array([f"p{i}" for i in range(len(names))]), class_name=names,
        latent_mean=latent.astype(np.float32), latent_logvar=np.zeros_like(latent, np.float32),
        rotation=random_rotations(len(names), rng), origin_angstrom=rng.normal(size=(len(names), 3)),
        recon_error=rng.random(len(names)),
    )
    return path


@pytest.fixture()
def fitted(tmp_path):
    train = _latents(tmp_path / "train.npz", ["a", "b"], 200, 0)
    val = _latents(tmp_path / "val.npz", ["a", "b"], 100, 1)
    fit_classifier(CFG, train, val, tmp_path / "clf.npz")
    return tmp_path


def test_threshold_accepts_the_configured_fraction_of_known_particles(fitted):
    model = Classifier.load(fitted / "clf.npz")
    val = np.load(fitted / "val.npz")
    probs, score = model.predict(val["latent_mean"].astype(float), val["latent_mean"].astype(float))
    assert np.mean(score <= model.threshold) == pytest.approx(0.95, abs=0.01)
    assert np.mean(model.classes.classes[probs.argmax(1)] == val["class_name"]) > 0.97


def test_annotate_flags_unseen_and_keeps_known(fitted):
    test = _latents(fitted / "test.npz", ["a", "b", "c"], 100, 2)
    frames = {c: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0, 0, 0],
                  "symmetry": "C1"} for c in "ab"}
    (fitted / "frames.json").write_text(json.dumps(frames))
    annotate(CFG, test, fitted / "clf.npz", fitted / "frames.json", fitted / "test.csv")
    table = pd.read_csv(fitted / "test.csv")
    truth = np.load(test)["class_name"]
    known = truth != "c"
    assert (table["predicted_class"][~known] == "unknown").mean() > 0.95
    assert (table["predicted_class"][known] == truth[known]).mean() > 0.9
    assert np.allclose(table[["prob_a", "prob_b"]].sum(axis=1), 1, atol=1e-5)
    # with identity frames the written angles are the model's rotations
    angles = table[["angle_rot", "angle_tilt", "angle_psi"]].to_numpy()
    assert geodesic_distance_deg(relion_euler_to_matrix(angles), np.load(test)["rotation"]).max() < 1e-3


def test_classifier_refuses_unseen_classes_in_training(tmp_path):
    bad = _latents(tmp_path / "train.npz", ["a", "c"], 10, 0)
    with pytest.raises(InputError, match="not seen classes"):
        fit_classifier(CFG, bad, bad, tmp_path / "clf.npz")
    assert not (tmp_path / "clf.npz").exists()


def test_frame_change_composes_like_rotating_volumes():
    """A particle made from the canonical volume equals the same particle made from the
    reference with the converted pose (rotation and origin)."""
    rng = np.random.default_rng(5)
    z, y, x = np.mgrid[:24, :24, :24]
    canonical = sum(w * np.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / 6.0)
                    for a, b, c, w in [(12, 12, 12, 1), (16, 12, 12, 0.7), (12, 17, 10, 0.5)])
    r_frame, a_model = random_rotations(2, rng)
    t_angstrom = np.array([10.0, -10.0, 0.0])
    # reference(y) = canonical(R^T (y - t)): rotate by R, then shift by t
    reference = rotate_volume(canonical, r_frame, -t_angstrom, pixel_size_angstrom=10.0)
    origin_model = np.array([[0.0, 10.0, -10.0]])
    particle = rotate_volume(canonical, a_model, origin_model[0], pixel_size_angstrom=10.0)
    frames = {"k": {"rotation_canonical_to_reference": r_frame.tolist(), "translation_angstrom": t_angstrom.tolist()}}
    rot, origin = poses_in_reference_frame(a_model[None], origin_model, np.array(["k"]), frames)
    again = rotate_volume(reference, rot[0], origin[0], pixel_size_angstrom=10.0)
    core = (slice(6, 18),) * 3
    assert np.corrcoef(particle[core].ravel(), again[core].ravel())[0, 1] > 0.98


def _matches(path, latents_path, seed):
    """A ``match`` output for a latent file: class a/b scores that say the truth, a pose per class."""
    data = np.load(latents_path)
    rng = np.random.default_rng(seed)
    names = data["class_name"].astype(str)
    scores = rng.normal(0.2, 0.02, size=(len(names), 2))
    for k, c in enumerate("ab"):
        scores[names == c, k] += 0.1
    np.savez(path, particle_id=data["particle_id"], classes=np.array(["a", "b"]), scores=scores,
             rotation=random_rotations(2 * len(names), rng).reshape(len(names), 2, 3, 3),
             origin_angstrom=rng.normal(size=(len(names), 2, 3)), refined=np.ones((len(names), 2), bool),
             fit=np.where(np.arange(2) == (names == "b")[:, None], 0.5, np.nan) + rng.normal(0, 0.02, (len(names), 1)))
    return path


def test_template_scores_join_the_latents_and_give_the_written_poses(fitted):
    tmp = fitted
    train_m = _matches(tmp / "train_m.npz", tmp / "train.npz", 5)
    val_m = _matches(tmp / "val_m.npz", tmp / "val.npz", 6)
    fit_classifier(CFG_BOTH, tmp / "train.npz", tmp / "val.npz", tmp / "clf2.npz", train_m, val_m)
    both = Classifier.load(tmp / "clf2.npz")
    assert both.classes.means.shape == (2, 4 + 2 + 1)  # 4 latents, 2 scores, the fit
    assert both.unknown.means.shape == (2, 4 + 2 + 1)  # by default the unknown score sees the same
    test = _latents(tmp / "test.npz", ["a", "b"], 50, 7)
    test_m = _matches(tmp / "test_m.npz", test, 8)
    frames = {c: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0, 0, 0],
                  "symmetry": "C1"} for c in "ab"}
    (tmp / "frames.json").write_text(json.dumps(frames))
    annotate(CFG_BOTH, test, tmp / "clf2.npz", tmp / "frames.json", tmp / "test.csv", test_m)
    table = pd.read_csv(tmp / "test.csv")
    m = np.load(test_m)
    k = np.where(table["nearest_class"] == "a", 0, 1)
    chosen = m["rotation"][np.arange(len(k)), k]
    angles = table[["angle_rot", "angle_tilt", "angle_psi"]].to_numpy()
    assert geodesic_distance_deg(relion_euler_to_matrix(angles), chosen).max() < 1e-3
    np.testing.assert_allclose(table[["origin_x_angstrom", "origin_y_angstrom", "origin_z_angstrom"]],
                               m["origin_angstrom"][np.arange(len(k)), k], atol=1e-5)
    network = table[["network_angle_rot", "network_angle_tilt", "network_angle_psi"]].to_numpy()
    assert geodesic_distance_deg(relion_euler_to_matrix(network), np.load(test)["rotation"]).max() < 1e-3
    np.testing.assert_allclose(table["template_score_b"], m["scores"][:, 1], atol=1e-6)


def test_match_file_of_other_particles_is_refused(fitted):
    other = _latents(fitted / "other.npz", ["a", "b"], 30, 9)
    m = _matches(fitted / "other_m.npz", other, 10)
    with pytest.raises(InputError, match="particles differ"):
        fit_classifier(CFG_BOTH, fitted / "train.npz", fitted / "val.npz", fitted / "clf3.npz", m, m)
    with pytest.raises(InputError, match="no template-matching file"):
        fit_classifier(CFG_BOTH, fitted / "train.npz", fitted / "val.npz", fitted / "clf3.npz")


def test_template_features_need_matching():
    with pytest.raises(InputError, match="matching.enabled is false"):
        validate_config({"structures": {"a": "demo:x", "b": "demo:y"}, "matching": {"enabled": False},
                         "classification": {"features": ["latent", "fit"]}})
    with pytest.raises(InputError, match="matching.enabled is false"):  # the default unknown score needs matching
        validate_config({"structures": {"a": "demo:x", "b": "demo:y"}, "matching": {"enabled": False},
                         "classification": {"features": ["latent"]}})
    cfg = validate_config({"structures": {"a": "demo:x", "b": "demo:y"}, "matching": {"enabled": False},
                           "classification": {"features": ["latent"], "unknown_features": ["latent"]}})
    assert cfg.classification.features == ["latent"]


# --- adaptation to an unlabelled split --------------------------------------------------
SOURCE_MEANS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])


def _shifted_target(rng, n_seen=150, n_novel=150):
    """Target features (n, 2): the source classes scaled by 1.5, moved by (2, -3), noisier by 1.3,
    plus a cluster of novel particles; (features, class index with -1 for novel, true means)."""
    means = 1.5 * SOURCE_MEANS + np.array([2.0, -3.0])
    index = np.repeat(np.arange(3), n_seen)
    seen = means[index] + 1.3 * rng.normal(size=(len(index), 2))
    novel = np.array([12.0, 12.0]) + 2.0 * rng.normal(size=(n_novel, 2))
    return np.concatenate([seen, novel]), np.concatenate([index, np.full(n_novel, -1)]), means


def _source_model(rng):
    index = np.repeat(np.arange(3), 200)
    return ClassModel.fit(SOURCE_MEANS[index] + rng.normal(size=(600, 2)), np.array(list("abc"))[index])


def test_em_recovers_shifted_class_means():
    rng = np.random.default_rng(0)
    model = _source_model(rng)
    x, truth, means = _shifted_target(rng)
    adapted, p_unknown = adapt_model(model, x, prior_counts=5.0, unknown_fraction=0.25, accept_fraction=0.95)
    recovered = adapted.means * adapted.scale + adapted.centre
    np.testing.assert_allclose(recovered, means, atol=0.3)
    assert np.abs(model.means * model.scale + model.centre - means).max() > 2  # the source was far off
    probs, _ = adapted.predict(x)
    seen = truth >= 0
    assert np.mean(probs.argmax(1)[seen] == truth[seen]) > 0.97
    assert np.mean(model.predict(x)[0].argmax(1)[seen] == truth[seen]) < 0.8  # and classified badly
    assert p_unknown[~seen].min() > 0.99 and np.median(p_unknown[seen]) < 0.01


def test_em_prior_counts_anchor_the_means_to_the_source():
    rng = np.random.default_rng(1)
    model = _source_model(rng)
    x, _, _ = _shifted_target(rng, n_seen=10, n_novel=10)
    anchored, _ = adapt_model(model, x, prior_counts=1e6, unknown_fraction=0.25, accept_fraction=0.95)
    np.testing.assert_allclose(anchored.means, model.means, atol=1e-3)


def test_recalibrated_threshold_keeps_the_stated_fraction_of_target_seen_particles():
    rng = np.random.default_rng(2)
    model = _source_model(rng)
    x, truth, _ = _shifted_target(rng, n_seen=400, n_novel=200)
    seen = truth >= 0
    _, before = model.predict(x)
    model.threshold = float(np.quantile(model.predict(SOURCE_MEANS[np.repeat(np.arange(3), 100)]
                                                      + rng.normal(size=(300, 2)))[1], 0.9))
    assert np.mean(before[seen] <= model.threshold) < 0.5  # the simulated threshold rejects most of them
    for accept in (0.8, 0.95):
        adapted, _ = adapt_model(model, x, prior_counts=5.0, unknown_fraction=0.25, accept_fraction=accept)
        _, score = adapted.predict(x)
        assert np.mean(score[seen] <= adapted.threshold) == pytest.approx(accept, abs=0.03)
        assert np.mean(score[~seen] > adapted.threshold) > 0.99


def test_adapt_verb_round_trip(fitted):
    """cryovae adapt: em writes a classifier that annotates a shifted split right; none keeps the base."""
    rng = np.random.default_rng(3)
    names = np.repeat(["a", "b", "c"], 100)
    shift = np.array([2.0, -2.0, 1.0, 0.0])
    latent = np.stack([CENTRES[c] for c in names]) + shift + 1.2 * rng.normal(size=(300, 4))
    split = fitted / "tomo.npz"
    np.savez(split, particle_id=np.array([f"t{i}" for i in range(300)]), class_name=names,
             latent_mean=latent.astype(np.float32), latent_logvar=np.zeros_like(latent, np.float32),
             rotation=random_rotations(300, rng), origin_angstrom=np.zeros((300, 3)), recon_error=np.zeros(300))
    config = CFG.model_dump(mode="json")
    for adapt in ("em", "none"):
        config["classification"]["adapt"] = adapt
        assert main(["adapt", "--config", json.dumps(config), "--classifier", str(fitted / "clf.npz"),
                     "--latents", str(split), "--output", str(fitted / f"clf_{adapt}.npz")]) == 0
    base, em, none = (Classifier.load(fitted / f) for f in ("clf.npz", "clf_em.npz", "clf_none.npz"))
    for a, b in ((base.classes, none.classes), (base.unknown, none.unknown)):
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays("").values(), b.arrays("").values()))
    recovered = em.classes.means * em.classes.scale + em.classes.centre
    np.testing.assert_allclose(recovered, np.array([CENTRES["a"], CENTRES["b"]]) + shift, atol=0.4)
    x = latent.astype(np.float64)
    for model, expected in ((base, False), (em, True)):
        probs, score = model.predict(x, x)
        called = np.where(score > model.threshold, "unknown", model.classes.classes[probs.argmax(1)])
        known = names != "c"
        good = np.mean(called[known] == names[known]) > 0.85 and np.mean(called[~known] == "unknown") > 0.9
        assert good == expected


def test_scale_free_features_ignore_a_common_factor_of_the_scores():
    rng = np.random.default_rng(4)
    scores = rng.uniform(0.1, 0.5, size=(20, 3))
    names = ["template_relative", "margin"]
    x = features(names, {}, {"scores": scores})
    np.testing.assert_allclose(features(names, {}, {"scores": 0.2 * scores}), x, rtol=1e-12)
    assert np.allclose(x[:, :3].max(1), 1.0)
    top2 = np.sort(scores, 1)[:, -2:]
    np.testing.assert_allclose(x[:, 3], (top2[:, 1] - top2[:, 0]) / top2[:, 1])


# --- unknowns from the fit within each nearest class -------------------------------------
def _tomogram_fits(rng, n_seen=120, n_unknown=120):
    """Fits as in a tomogram: a large complex (0.20), a small one (0.10) fitting almost as poorly
    as particles of no class (0.07), which land nearest to either; (fit, nearest, is_unknown)."""
    nearest = np.concatenate([np.zeros(n_seen, int), np.ones(n_seen, int), rng.integers(0, 2, n_unknown)])
    fit = np.concatenate([rng.normal(0.20, 0.012, n_seen), rng.normal(0.10, 0.008, n_seen),
                          rng.normal(0.07, 0.008, n_unknown)])
    return fit, nearest, np.arange(len(fit)) >= 2 * n_seen


def test_fit_mixture_keeps_the_small_class_that_a_fit_threshold_calls_unknown():
    rng = np.random.default_rng(11)
    fit, nearest, unknown = _tomogram_fits(rng)
    mixture = FitMixture.fit(fit, nearest, 2, prior_counts=5.0, unknown_fraction=0.25, threshold=0.5)
    np.testing.assert_allclose(mixture.means, [0.20, 0.10], atol=0.004)
    np.testing.assert_allclose([mixture.unknown_mean, mixture.unknown_sd], [0.07, 0.008], atol=0.003)
    called = mixture.posterior(fit, nearest) > mixture.threshold
    small = (nearest == 1) & ~unknown
    assert called[small].mean() < 0.15 and called[unknown].mean() > 0.85 and called[nearest == 0][:120].mean() < 0.01
    # a threshold on the fit alone that keeps 95 % of the large class's particles calls the small class unknown
    global_cut = np.quantile(fit[(nearest == 0) & ~unknown], 0.05) - 2 * 0.012
    assert np.mean(fit[small] < global_cut) > 0.9


def test_fit_mixture_round_trips_and_needs_the_fits(tmp_path):
    rng = np.random.default_rng(12)
    fit, nearest, _ = _tomogram_fits(rng, 30, 30)
    base = _source_model(rng)
    model = Classifier(base, base, FitMixture.fit(fit, nearest, 3, 5.0, 0.25, 0.7))  # class 2 has no particle
    model.save(tmp_path / "clf.npz")
    loaded = Classifier.load(tmp_path / "clf.npz")
    assert loaded.threshold == 0.7
    for name, value in model.mixture.arrays("").items():
        np.testing.assert_array_equal(loaded.mixture.arrays("")[name], value)
    x = SOURCE_MEANS[np.repeat(np.arange(3), 5)]
    with pytest.raises(InputError, match="template fit"):
        loaded.predict(x, x)
    probs, score = loaded.predict(x, x, np.full(len(x), 0.2))
    np.testing.assert_allclose(score, model.mixture.posterior(np.full(len(x), 0.2), probs.argmax(1)))


def test_adapt_with_fit_mixture_writes_the_posterior_of_unknown(fitted):
    rng = np.random.default_rng(13)
    names = np.repeat(["a", "b", "c"], 60)
    latent = np.stack([CENTRES[c] for c in names]) + rng.normal(size=(180, 4))
    split = fitted / "tomo.npz"
    np.savez(split, particle_id=np.array([f"t{i}" for i in range(180)]), class_name=names,
             latent_mean=latent.astype(np.float32), latent_logvar=np.zeros_like(latent, np.float32),
             rotation=random_rotations(180, rng), origin_angstrom=np.zeros((180, 3)), recon_error=np.zeros(180))
    fit_by_class = {"a": 0.20, "b": 0.10, "c": 0.07}  # c: of no seen class, and fits poorly
    fit = np.array([fit_by_class[c] for c in names]) + rng.normal(0, 0.008, 180)
    match = fitted / "tomo_m.npz"
    np.savez(match, particle_id=np.array([f"t{i}" for i in range(180)]), classes=np.array(["a", "b"]),
             scores=rng.normal(0.2, 0.01, (180, 2)), fit=np.stack([fit, np.full(180, np.nan)], 1))
    config = CFG.model_copy(update={"classification": CFG.classification.model_copy(
        update={"unknown_model": "fit_mixture"})})
    adapt_classifier(config, fitted / "clf.npz", split, fitted / "clf_t.npz", match)
    model = Classifier.load(fitted / "clf_t.npz")
    assert model.mixture is not None and model.threshold == 0.5
    nearest = model.classes.predict(latent.astype(np.float64))[0].argmax(1)
    np.testing.assert_allclose(model.mixture.posterior(fit, nearest),
                               model.predict(latent.astype(np.float64), latent.astype(np.float64), fit)[1])
    called = model.predict(latent.astype(np.float64), latent.astype(np.float64), fit)[1] > model.threshold
    assert called[names == "c"].mean() > 0.85 and called[names != "c"].mean() < 0.1
    with pytest.raises(InputError, match="give --match"):
        adapt_classifier(config, fitted / "clf.npz", split, fitted / "clf_x.npz")


def test_fit_mixture_needs_matching_and_adaptation():
    for classification, matching in (({"unknown_model": "fit_mixture", "adapt": "none"}, {}),
                                     ({"unknown_model": "fit_mixture", "features": ["latent"],
                                       "unknown_features": ["latent"]}, {"enabled": False})):
        with pytest.raises(InputError, match="fit_mixture"):
            validate_config({"structures": {"a": "demo:x", "b": "demo:y"}, "classification": classification,
                             "matching": matching})


def test_best_fit_names_the_class_of_best_template_fit_where_the_class_model_disagrees(fitted):
    """Latents that say a for every class-a particle, template fits that say b for half of them:
    nearest_class best_fit follows the fits (unrefined classes, NaN, never win), model the latents."""
    test = _latents(fitted / "test.npz", ["a", "b"], 40, 21)
    names = np.load(test)["class_name"].astype(str)
    rng = np.random.default_rng(22)
    fits_say = np.where((names == "a") & (np.arange(len(names)) % 2 == 0), "b", names)
    fit = np.where(np.array(["a", "b"]) == fits_say[:, None], 0.3, 0.1) + rng.normal(0, 0.01, (len(names), 2))
    fit[np.arange(len(names)) % 5 == 1, :] = [np.nan, 0.05]  # only b refined: b however poor
    fits_say[np.arange(len(names)) % 5 == 1] = "b"
    match = fitted / "test_m.npz"
    np.savez(match, particle_id=np.load(test)["particle_id"], classes=np.array(["a", "b"]),
             scores=rng.normal(0.2, 0.01, (len(names), 2)), rotation=np.tile(np.eye(3), (len(names), 2, 1, 1)),
             origin_angstrom=np.zeros((len(names), 2, 3)), refined=~np.isnan(fit), fit=fit)
    frames = {c: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0, 0, 0],
                  "symmetry": "C1"} for c in "ab"}
    (fitted / "frames.json").write_text(json.dumps(frames))
    for rule, expected in (("best_fit", fits_say), ("model", names)):
        config = CFG.model_copy(update={"classification": CFG.classification.model_copy(
            update={"nearest_class": rule})})
        annotate(config, test, fitted / "clf.npz", fitted / "frames.json", fitted / f"{rule}.csv", match)
        table = pd.read_csv(fitted / f"{rule}.csv")
        agree = np.mean(table["nearest_class"].to_numpy(str) == expected)
        assert agree == 1.0 if rule == "best_fit" else agree > 0.95
    # as the annotate rule runs it (its stage config has no matching section), and without the global search
    stage = load_config(stage_config_json(CFG, "classification", "alignment"))
    unsearched = fitted / "test_unsearched.npz"
    np.savez(unsearched, **{**np.load(match), "scores": np.full((len(names), 2), np.nan)})
    for path, columns in ((match, ["template_score_a", "template_score_b"]), (unsearched, [])):
        annotate(stage, test, fitted / "clf.npz", fitted / "frames.json", fitted / "stage.csv", path)
        assert [c for c in pd.read_csv(fitted / "stage.csv").columns if c.startswith("template_score")] == columns


def test_best_fit_and_screen_features_need_template_matching(fitted):
    with pytest.raises(InputError, match="best_fit"):
        validate_config({"structures": {"a": "demo:x", "b": "demo:y"}, "matching": {"enabled": False},
                         "classification": {"features": ["latent"], "unknown_features": ["latent"],
                                            "nearest_class": "best_fit"}})
    data = np.load(fitted / "val.npz")
    old_match = {"scores": np.zeros((len(data["particle_id"]), 2)), "fit": np.zeros((len(data["particle_id"]), 2))}
    with pytest.raises(InputError, match="no class screen"):
        features(["screen_relative"], dict(data), old_match)
    screen = np.abs(np.random.default_rng(3).normal(size=(len(data["particle_id"]), 2))) + 0.1
    relative = features(["screen_relative"], dict(data), {**old_match, "screen": screen})
    np.testing.assert_allclose(relative.max(1), 1.0)


def _subset_of(path, source, rows, per_class):
    """The rows ``rows`` of match file ``source``, written as ``cryovae match --per-class`` writes them."""
    with np.load(source) as m:
        arrays = {k: m[k] if k == "classes" else m[k][rows] for k in m.files}
    np.savez(path, subset_per_class=np.int64(per_class), **arrays)
    return path


def test_a_match_file_of_a_per_class_subset_fits_the_class_model_on_those_particles(fitted):
    tmp = fitted
    full = _matches(tmp / "train_m.npz", tmp / "train.npz", 5)
    val_m = _matches(tmp / "val_m.npz", tmp / "val.npz", 6)
    rows = np.sort(np.random.default_rng(3).choice(400, 120, replace=False))
    subset = _subset_of(tmp / "train_sub.npz", full, rows, 60)
    fit_classifier(CFG_BOTH, tmp / "train.npz", tmp / "val.npz", tmp / "clf_sub.npz", subset, val_m)
    # the same as a latent file that holds only those particles, with their full match file
    with np.load(tmp / "train.npz") as data:
        np.savez(tmp / "train_rows.npz", **{k: data[k][rows] for k in data.files})
    _subset_of(tmp / "rows_m.npz", full, rows, 0)  # marked "not a subset": must match the latents exactly
    fit_classifier(CFG_BOTH, tmp / "train_rows.npz", tmp / "val.npz", tmp / "clf_rows.npz", tmp / "rows_m.npz", val_m)
    a, b = Classifier.load(tmp / "clf_sub.npz"), Classifier.load(tmp / "clf_rows.npz")
    np.testing.assert_array_equal(a.classes.means, b.classes.means)
    assert a.threshold == b.threshold
    # annotate writes the matched particles only, with their own scores
    frames = {c: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0, 0, 0],
                  "symmetry": "C1"} for c in "ab"}
    (tmp / "frames.json").write_text(json.dumps(frames))
    annotate(CFG_BOTH, tmp / "train.npz", tmp / "clf_sub.npz", tmp / "frames.json", tmp / "train.csv", subset)
    table = pd.read_csv(tmp / "train.csv")
    assert table["particle_id"].tolist() == [f"p{i}" for i in rows]
    np.testing.assert_allclose(table["template_score_a"], np.load(subset)["scores"][:, 0], atol=1e-6)


def test_a_subset_match_file_of_other_particles_is_refused(fitted):
    other = _latents(fitted / "other.npz", ["a", "b"], 300, 9)  # ids p0..p599: p400.. are not in train
    m = _subset_of(fitted / "other_sub.npz", _matches(fitted / "other_m.npz", other, 10), np.arange(350, 450), 50)
    with pytest.raises(InputError, match="'p400' is not in the latent file"):
        fit_classifier(CFG_BOTH, fitted / "train.npz", fitted / "val.npz", fitted / "clf4.npz", m, m)
