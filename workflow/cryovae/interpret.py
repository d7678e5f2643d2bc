"""What the latent dimensions mean: disentanglement, sparse class rules and symbolic class models.

Inputs: the training split's latents (``embed`` output: the models are fitted there), one
split's annotate table (its latents, judged there), that split's ``particles.star`` (the
known factors), the affinity matrix and the trained model (for decoded traversals).
3D models only (the decoded traversals are volumes).

- **Disentanglement** (on the judged split): the mutual information (nats) between each
  latent dimension and each known factor that varies in the split: the class (true class
  where the STAR file has one, else the predicted class; with more than two classes also
  each class's one-vs-rest indicator ``is_{class}``), the true pose angles, shift,
  defocus, SNR and position in the tomogram; and, for structural similarity, the
  |Spearman| of each dimension with the class's first two principal coordinates of the
  affinity matrix (classical MDS of 1 − affinity).
  Latents are cut into ``mi_bins`` equal-width bins, continuous factors into ``mi_bins``
  quantile bins; MI and entropies are Miller–Madow corrected.  The score is the **mutual
  information gap** (MIG, Chen et al. 2018): per factor, (largest − second largest MI over
  dimensions) / factor entropy, in [0, 1], 1 when exactly one dimension carries the
  factor.  MIG is chosen because it needs no fitted predictor (DCI and SAP depend on a
  regressor's capacity and on a train/test split of the judged data), treats the discrete
  class and continuous factors alike, and rewards what the sparse and symbolic models
  rely on: one factor, one axis.
- **Black box**: the project's classifier (Gaussian classes, shared shrunk covariance,
  :class:`cryovae.classify.ClassModel`) on the latents alone, fitted on the training
  split, judged on the split's seen-class particles.
- **Sparse**: per seen class a one-vs-rest L1 logistic regression path on standardised
  latents; dimensions ranked by the order they enter the path.  With the first k
  dimensions of each class, a logistic model per class (fitted on train) and the argmax
  over classes give the accuracy as a function of k; the rules at k = ``max_dims`` are kept.
- **Symbolic**: per seen class, symbolic regression (:mod:`cryovae.symbolic`) of its
  one-vs-rest indicator from its ``max_dims`` sparse dimensions; the Pareto front of
  expressions (length vs fit) and the one of minimum description length, whose argmax
  over classes is the symbolic classifier.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cryovae import __version__, plots
from cryovae.classify import ClassModel, load_latents
from cryovae.errors import InputError
from cryovae.evaluate import (UNKNOWN, attach_truth, decode_latents, load_trained_model, read_affinity,
                              read_embeddings, write_metrics)
from cryovae.shards import SubtomogramSet
from cryovae.symbolic import fit_symbolic

log = logging.getLogger(__name__)

# factor name -> STAR columns that may hold it (the first present is used)
CONTINUOUS_FACTORS = {
    "angle_rot_deg": ("rlnAngleRot",), "angle_tilt_deg": ("rlnAngleTilt",), "angle_psi_deg": ("rlnAnglePsi",),
    "shift_x_angstrom": ("rlnOriginXAngst",), "shift_y_angstrom": ("rlnOriginYAngst",),
    "shift_z_angstrom": ("rlnOriginZAngst",), "defocus_angstrom": ("rlnDefocusU",), "snr": ("cryovaeSnr",),
    "position_x": ("rlnCoordinateX", "rlnCenteredCoordinateXAngst"),
    "position_y": ("rlnCoordinateY", "rlnCenteredCoordinateYAngst"),
    "position_z": ("rlnCoordinateZ", "rlnCenteredCoordinateZAngst"),
}
MIG_WHY = ("MIG needs no fitted predictor (DCI and SAP depend on a regressor's capacity and a split of the "
           "judged data), treats the discrete class and continuous factors alike, and is 1 only when a single "
           "dimension carries a factor: what sparse and symbolic rules rely on.")


# ----------------------------------------------------------------------------- disentanglement


def discretise(values: np.ndarray, bins: int, quantile: bool) -> np.ndarray:
    """Bin indices (n,) of values (n,): equal-width bins, or quantile bins (ties share a bin)."""
    values = np.asarray(values, dtype=np.float64)
    if quantile:
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    else:
        edges = np.histogram_bin_edges(values, bins=bins)[1:-1]
    return np.digitize(values, edges)


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI (nats) of two code arrays (n,), Miller–Madow corrected: the plug-in estimate less its
    bias (ka − 1)(kb − 1)/(2n) for ka, kb occupied codes, clipped at 0 (the plug-in estimate
    of independent factors is that bias, large for few particles and many bins)."""
    from sklearn.metrics import mutual_info_score

    ka, kb = len(np.unique(a)), len(np.unique(b))
    return max(0.0, float(mutual_info_score(a, b)) - (ka - 1) * (kb - 1) / (2 * len(a)))


def entropy(codes: np.ndarray) -> float:
    """Entropy (nats) of codes (n,), Miller–Madow corrected (+ (k − 1)/(2n))."""
    counts = np.unique(codes, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() + (len(counts) - 1) / (2 * len(codes)))


def mutual_information_matrix(latents: np.ndarray, factors: dict[str, np.ndarray], bins: int) -> dict:
    """MI (nats) of each latent dim with each factor, and each factor's entropy.

    latents (n, L); factors: name -> (n,) bin or class codes.  Returns
    {"mi": {name: (L,)}, "entropy": {name: float}}.
    """
    codes = [discretise(latents[:, j], bins, quantile=False) for j in range(latents.shape[1])]
    mi = {name: np.array([mutual_information(v, c) for c in codes]) for name, v in factors.items()}
    return {"mi": mi, "entropy": {name: entropy(v) for name, v in factors.items()}}


def mutual_information_gap(mi: np.ndarray, entropy: float) -> float:
    """(largest − second largest of mi (L,)) / entropy; 0 for a constant factor."""
    if entropy <= 0:
        return 0.0
    top = np.sort(mi)[::-1]
    second = top[1] if len(top) > 1 else 0.0
    return float((top[0] - second) / entropy)


def affinity_coordinates(affinity: np.ndarray, k: int = 2) -> np.ndarray:
    """First k principal coordinates (classes, k) of the dissimilarity 1 − affinity (classical MDS)."""
    d2 = (1.0 - np.asarray(affinity, dtype=np.float64)) ** 2
    n = len(d2)
    centring = np.eye(n) - np.ones((n, n)) / n
    values, vectors = np.linalg.eigh(-0.5 * centring @ d2 @ centring)
    order = np.argsort(values)[::-1][:k]
    coords = vectors[:, order] * np.sqrt(np.clip(values[order], 0, None))
    return coords * np.where(coords[np.abs(coords).argmax(0), range(coords.shape[1])] < 0, -1, 1)


def known_factors(labels: np.ndarray, particles: pd.DataFrame, bins: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(factor name -> codes (n,), skipped factor -> why) for the split's particles (rows aligned)."""
    factors, skipped = {}, {}
    classes = sorted(set(labels.tolist()))
    factors["class"] = np.searchsorted(classes, labels)
    if len(classes) > 2:
        factors |= {f"is_{c}": (labels == c).astype(np.int64) for c in classes}
    for name, columns in CONTINUOUS_FACTORS.items():
        column = next((c for c in columns if c in particles.columns), None)
        values = None if column is None else pd.to_numeric(particles[column], errors="coerce").to_numpy(float)
        if values is None:
            skipped[name] = "not in the STAR file"
        elif not np.isfinite(values).all() or np.ptp(values) == 0:
            skipped[name] = "constant or not finite in this split"
        else:
            factors[name] = discretise(values, bins, quantile=True)
    return factors, skipped


def affinity_correlations(latents: np.ndarray, labels: np.ndarray, affinity: pd.DataFrame) -> dict | None:
    """|Spearman| of each latent dim (n, L) with each particle's class coordinate on the first two
    principal coordinates of the affinity matrix; None without three classes all in the matrix.

    A correlation, not MI: any one-to-one function of the class has the class's MI, so MI
    cannot tell whether a dimension orders the classes by structural similarity."""
    from scipy.stats import spearmanr

    classes = sorted(set(labels.tolist()))
    if len(classes) < 3 or any(c not in affinity.index for c in classes):
        return None
    coords = affinity_coordinates(affinity.loc[classes, classes].to_numpy())[np.searchsorted(classes, labels)]
    return {f"affinity_pc{i + 1}": np.array([abs(spearmanr(latents[:, j], coords[:, i]).statistic)
                                             for j in range(latents.shape[1])]) for i in range(coords.shape[1])}


def disentanglement(latents: np.ndarray, factors: dict[str, np.ndarray], skipped: dict[str, str], bins: int) -> dict:
    """The disentanglement section of the JSON: MI, normalised MI and MIG per factor."""
    result = mutual_information_matrix(latents, factors, bins)
    mig = {name: mutual_information_gap(result["mi"][name], result["entropy"][name]) for name in factors}
    normalised = {n: result["mi"][n] / result["entropy"][n] if result["entropy"][n] > 0 else 0 * result["mi"][n]
                  for n in factors}
    return {
        "score": "MIG (mutual information gap)", "why": MIG_WHY, "bins": bins, "factors": list(factors),
        "skipped_factors": skipped, "mutual_information_nats": result["mi"], "factor_entropy_nats": result["entropy"],
        "normalised_mutual_information": normalised, "mig": mig,
        "mig_mean": float(np.mean(list(mig.values()))), "mig_class": mig.get("class"),
        "mig_class_indicators_mean": (float(np.mean([v for n, v in mig.items() if n.startswith("is_")]))
                                      if any(n.startswith("is_") for n in mig) else None),
        "dimension_of_factor": {n: int(np.argmax(result["mi"][n])) for n in factors},
    }


# ----------------------------------------------------------------------------- class models


def _l1(c: float, seed: int):
    """One-vs-rest L1 logistic regression (the keyword for L1 changed in scikit-learn 1.8)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    kind = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=c, solver="liblinear", random_state=seed, max_iter=1000, **kind)


def rule_features(z: np.ndarray, terms: str) -> np.ndarray:
    """What a class rule reads from its dimensions z (n, k): z (``linear``), or z and z² (``quadratic``:
    the rule's region is then an axis-aligned quadric, e.g. a band or box around the class centre)."""
    return z if terms == "linear" else np.concatenate([z, z * z], axis=1)


def l1_ranking(z: np.ndarray, is_class: np.ndarray, seed: int, terms: str = "linear", steps: int = 30) -> list[int]:
    """Dimensions of z (n, L) in the order they enter the L1 path of is_class (n,) bool; with quadratic
    terms a dimension enters with the first of its two terms (z_j or z_j²)."""
    from sklearn.svm import l1_min_c

    features, n_dims = rule_features(z, terms), z.shape[1]
    cs = l1_min_c(features, is_class, loss="log") * np.logspace(0, 3, steps)
    entry = np.full(features.shape[1], np.inf)
    for i, c in enumerate(cs):
        coef = _l1(c, seed).fit(features, is_class).coef_[0]
        entry[(coef != 0) & np.isinf(entry)] = i
    entry = entry.reshape(-1, n_dims).min(0)
    weight = np.abs(coef).reshape(-1, n_dims).max(0)
    return sorted(range(n_dims), key=lambda j: (entry[j], -weight[j]))


def _class_scores(z_train, y_train, z_eval, dims: dict[str, list[int]], classes, terms: str
                  ) -> tuple[np.ndarray, dict]:
    """Per-class logistic scores (n_eval, K) on each class's ``dims``, and the rules (coefficients)."""
    from sklearn.linear_model import LogisticRegression

    scores, rules = np.zeros((len(z_eval), len(classes))), {}
    for k, c in enumerate(classes):
        d = dims[c]
        model = LogisticRegression(max_iter=1000).fit(rule_features(z_train[:, d], terms), y_train == c)
        scores[:, k] = model.decision_function(rule_features(z_eval[:, d], terms))
        coef = model.coef_[0]
        rules[c] = {"dims": d, "coefficients": coef[: len(d)], "intercept": float(model.intercept_[0])}
        if terms == "quadratic":
            rules[c]["square_coefficients"] = coef[len(d):]
    return scores, rules


def sparse_models(z_train, y_train, z_eval, y_eval, classes, max_dims: int, seed: int, terms: str = "linear"
                  ) -> dict:
    """The sparse section: L1 ranking per class, accuracy against dims per class, rules at max_dims."""
    ranking = {c: l1_ranking(z_train, y_train == c, seed, terms) for c in classes}
    curve, kept = [], {}
    for k in range(1, z_train.shape[1] + 1):
        scores, rules = _class_scores(z_train, y_train, z_eval, {c: ranking[c][:k] for c in classes}, classes, terms)
        accuracy = float(np.mean(np.asarray(classes)[scores.argmax(1)] == y_eval))
        curve.append({"dims_per_class": k, "accuracy": accuracy})
        if k == min(max_dims, z_train.shape[1]):
            kept = {"dims_per_class": k, "accuracy": accuracy, "rules": rules,
                    "n_parameters": int(sum(len(r["coefficients"]) + len(r.get("square_coefficients", ())) + 1
                                            for r in rules.values()))}
    reads = "its dimensions" if terms == "linear" else "its dimensions and their squares"
    return {"model": f"one-vs-rest logistic regression per class on {reads}, the first k of its L1 path "
                     "(standardised latents), argmax over classes", "terms": terms, "ranking": ranking,
            "accuracy_by_dims": curve, "kept": kept}


def symbolic_models(z_train, y_train, z_eval, y_eval, classes, dims: dict[str, list[int]], options, seed: int
                    ) -> dict:
    """The symbolic section (JSON): per class, its one-vs-rest indicator ≈ f(its dims)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(z_train))[: options.symbolic_max_particles])
    scores, per_class = np.zeros((len(z_eval), len(classes))), {}
    for k, c in enumerate(classes):
        names = [f"z{j}" for j in dims[c]]
        fit = fit_symbolic(z_train[rows][:, dims[c]], (y_train[rows] == c).astype(float), names, seed + k,
                           options.symbolic_generations, options.symbolic_population, options.symbolic_max_length)
        truth = y_eval == c
        front = [{"expression": e.text, "length": e.length, "train_mse": e.train_mse,
                  "one_vs_rest_accuracy": float(np.mean((e.evaluate(fit.regressor, z_eval[:, dims[c]]) > 0.5) == truth))}
                 for e in fit.front]
        scores[:, k] = fit.chosen.evaluate(fit.regressor, z_eval[:, dims[c]])
        per_class[c] = {"dims": dims[c], "expression": fit.chosen.text, "length": fit.chosen.length, "front": front}
    accuracy = float(np.mean(np.asarray(classes)[scores.argmax(1)] == y_eval))
    section = {"engine": "pyoperon (Operon), objectives r2 and length; chosen: minimum description length",
               "variables": "z{j}: latent dimension j standardised with the training split's mean and std",
               "fitted_particles": int(len(rows)), "classes": per_class, "accuracy": accuracy,
               "total_length": int(sum(p["length"] for p in per_class.values()))}
    return section


def black_box(train_latents, y_train, eval_latents, y_eval) -> dict:
    """The project's Gaussian classifier on the latents alone: accuracy on the judged split."""
    model = ClassModel.fit(train_latents, y_train)
    probs, _ = model.predict(eval_latents)
    k, n = model.means.shape
    return {"model": "cryovae.classify.ClassModel (one Gaussian per seen class, shared Ledoit-Wolf covariance) "
                     "on the latent means alone", "accuracy": float(np.mean(model.classes[probs.argmax(1)] == y_eval)),
            "n_parameters": int(k * n + n * (n + 1) // 2 + k + 2 * n)}


# ----------------------------------------------------------------------------- traversals


def traversal_volumes(model, means: np.ndarray, scale: np.ndarray, steps_sd: np.ndarray,
                      classes: list[str] | None = None) -> np.ndarray:
    """Decoded canonical volumes (K, L, S, D, H, W): class means (K, L) moved along each dimension
    by steps_sd (S,) times that dimension's standard deviation scale (L,).  A model with classes
    decodes each class's traversal under that class (``classes``, K names)."""
    k, n = means.shape
    z = np.repeat(means[:, None, None, :], n, axis=1).repeat(len(steps_sd), axis=2)
    for j in range(n):
        z[:, j, :, j] += steps_sd[None, :] * scale[j]
    condition = None if classes is None else model.class_condition(classes)
    y = None if condition is None else np.repeat(condition.numpy(), n * len(steps_sd), axis=0)
    volumes = decode_latents(model, z.reshape(-1, n), y)
    return volumes.reshape(k, n, len(steps_sd), *volumes.shape[1:])


# ----------------------------------------------------------------------------- the stage


def _labels(merged: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Class of every particle: the truth when the split has it, else the predicted class."""
    truth = merged["true_class"].to_numpy(dtype=object)
    if np.all(truth != UNKNOWN):
        return truth.astype(str), "true_class"
    return merged["predicted_class"].to_numpy(dtype=object).astype(str), "predicted_class"


def _train_set(train_latents: Path, config) -> tuple[np.ndarray, np.ndarray]:
    data = load_latents(train_latents)
    labels = data["class_name"].astype(str)
    bad = sorted(set(labels.tolist()) - set(config.seen_classes))
    if bad:
        raise InputError(f"{train_latents}: classes {bad} are not seen classes {config.seen_classes}")
    return data["latent_mean"].astype(np.float64), labels


def expressions_text(section: dict) -> str:
    """The symbolic models as text: per class the chosen expression, then its Pareto front."""
    lines = [f"# {section['engine']}", f"# {section['variables']}", f"# accuracy (argmax over classes): "
             f"{section['accuracy']:.4f}", ""]
    for c, entry in section["classes"].items():
        lines.append(f"{c} = {entry['expression']}    (length {entry['length']}, dims {entry['dims']})")
        lines += [f"  front: length {p['length']:3d}  train MSE {p['train_mse']:.4f}  one-vs-rest accuracy "
                  f"{p['one_vs_rest_accuracy']:.4f}  {p['expression']}" for p in entry["front"]]
        lines.append("")
    return "\n".join(lines)


def interpret(config, embeddings: Path, split_dir: Path, train_latents: Path, affinity: Path, model: Path,
              output_dir: Path) -> None:
    """Write interpretation.json, expressions.txt and the five figures of one split into ``output_dir``."""
    from cryovae.atomic import write_text_atomic

    options, output_dir = config.interpretation, Path(output_dir)
    table, latent_cols = read_embeddings(Path(embeddings), config)
    split = SubtomogramSet.open(Path(split_dir))
    merged = attach_truth(table, split.particles, Path(embeddings), Path(split_dir) / "particles.star", config)
    labels, label_kind = _labels(merged)
    latents = merged[latent_cols].to_numpy(dtype=np.float64)
    affinity_frame = read_affinity(affinity, config)
    train_z, train_y = _train_set(Path(train_latents), config)
    if train_z.shape[1] != latents.shape[1]:
        raise InputError(f"{train_latents}: {train_z.shape[1]} latent dimensions, {embeddings} {latents.shape[1]}")
    factors, skipped = known_factors(labels, split.particles, options.mi_bins)
    seen = np.isin(labels, config.seen_classes)
    if not seen.any():
        raise InputError(f"{embeddings}: no particle of a seen class to judge the class models on")
    classes = sorted(set(train_y.tolist()))
    centre, scale = train_z.mean(0), train_z.std(0) + 1e-8
    zt, ze, ye = (train_z - centre) / scale, (latents[seen] - centre) / scale, labels[seen]
    reference = black_box(train_z, train_y, latents[seen], ye)
    sparse = sparse_models(zt, train_y, ze, ye, classes, options.max_dims, config.seed, options.rule_terms)
    dims = {c: sparse["ranking"][c][: options.max_dims] for c in classes}
    symbolic = symbolic_models(zt, train_y, ze, ye, classes, dims, options, config.seed)
    for section in (sparse["kept"], symbolic):
        section["fraction_of_black_box"] = section["accuracy"] / reference["accuracy"] if reference["accuracy"] else None
    result = {
        "split": Path(split_dir).name, "labels": label_kind, "n_particles": int(len(labels)),
        "n_judged_particles": int(seen.sum()), "latent_dims": int(latents.shape[1]), "classes": classes,
        "fitted_on": "training split latents (embeddings/latent/train.npz)",
        "standardisation": {"latent_mean": centre, "latent_std": scale},
        "judged_on": f"this split's particles of seen classes ({label_kind})",
        "disentanglement": disentanglement(latents, factors, skipped, options.mi_bins)
        | {"affinity_abs_spearman": affinity_correlations(latents, labels, affinity_frame)},
        "black_box": reference, "sparse": sparse, "symbolic": symbolic, "cryovae_version": __version__,
        "traversal_steps_sd": np.linspace(-options.traversal_range_sd, options.traversal_range_sd,
                                          options.traversal_steps),
    }
    _write_figures(config, result, labels, latents, load_trained_model(model, latents.shape[1]), output_dir)
    write_text_atomic(output_dir / "expressions.txt", expressions_text(symbolic))
    write_metrics(result, output_dir / "interpretation.json")
    log.info("interpret %s: black box %.3f, sparse (%d dims) %.3f, symbolic %.3f, MIG(class) %.3f",
             result["split"], reference["accuracy"], sparse["kept"]["dims_per_class"], sparse["kept"]["accuracy"],
             symbolic["accuracy"], result["disentanglement"]["mig_class"])


def _write_figures(config, result: dict, labels, latents, model, output_dir: Path) -> None:
    options = config.interpretation
    plots.plot_disentanglement(output_dir / "disentanglement.png", result["disentanglement"])
    plots.plot_sparse_accuracy(output_dir / "sparse.png", result["sparse"], result["black_box"]["accuracy"],
                               result["symbolic"]["accuracy"], options.max_dims)
    plots.plot_symbolic_fronts(output_dir / "symbolic.png", result["symbolic"])
    groups = [c for c in config.class_names if np.any(labels == c)]
    means = np.stack([latents[labels == c].mean(0) for c in groups])
    steps_sd = result["traversal_steps_sd"]
    volumes = traversal_volumes(model, means, latents.std(0), steps_sd, groups)
    if volumes.ndim == 5:   # images (K, L, S, H, W): the image is both figures' picture
        plots.plot_traversals(output_dir / "traversal_slices.png", volumes, groups, steps_sd, "image")
        plots.plot_traversals(output_dir / "traversal_projections.png", volumes, groups, steps_sd, "image")
        return
    plots.plot_traversals(output_dir / "traversal_slices.png", volumes[..., volumes.shape[3] // 2, :, :],
                          groups, steps_sd, "central xy slice")
    plots.plot_traversals(output_dir / "traversal_projections.png", volumes.sum(axis=3), groups, steps_sd,
                          "projection along z")
