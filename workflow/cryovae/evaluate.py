"""Evaluation of one split: metrics.json (and as a table, metrics.html) and the figures of the report.

Inputs are the per-particle table written by ``annotate`` (latents, predicted class,
unknown score, predicted pose), the split's ``particles.star`` (the ground truth, when
simulated), the affinity matrix, the trained model (to decode class means) and the
training history and ``align``'s frames (where each class's symmetry axes lie in its
map).  Rows of the table and the STAR file are matched by particle id.

Metrics that need ground truth are ``null`` in metrics.json when the split has none
(extracted data, class ``unknown``).  Definitions:

- ``accuracy``, ``macro_f1``: over particles whose true class was seen in training; a
  seen particle called ``unknown`` counts as wrong (it is a false negative of its class).
- ``unseen_auroc``: AUROC of ``unknown_score`` separating unseen-class and novel (positive)
  from seen-class particles; novel particles (``cryovaeNovel`` 1 in the STAR: a simulated
  tomogram's decoys) belong to no configured class.
- ``pose_error_*_deg``: geodesic angle between predicted and true
  ``rotation_matrix_particle_from_reference``, minimised over the class's point group
  (``config.alignment.symmetry``, default C1, its axes located in the map by ``align``),
  over seen-class particles with true poses.  ``network_pose_error_median_deg``: the same
  for the network's own poses, when template matching gave the written ones;
  ``pose_network_error_median_deg`` and ``pose_network_within_15deg``: the pose network's
  own pose (its probability-weighted best rotation) of the predicted class alone, when matching started from it
  (``matching.starts: network``).
- ``pose_error_median_deg_frame_free``: the error of orientations relative to the other
  particles of the class, independent of the reference frame: for each particle the frame
  offset G (pred_j G = true_j, modulo the point group) is estimated from the OTHER
  particles of its true class (the candidate pred_j^T true_j g minimising their median
  error), and the particle's error is taken after that G.  ``shift_error_median_px``: the
  same for origins, in pixels (the offset taken in each particle's reference frame).
- ``pose_determined_fraction``, ``per_class_pose_determined_fraction`` (by nearest class,
  all particles), ``pose_error_median_deg_determined``/``_undetermined`` (frame-free),
  ``pose_margin_auroc``: AUROC of ``pose_margin`` separating frame-free errors < 15° from
  > 45°; ``pose_undetermined_classes``: classes with fewer than half their particles
  determined (their maps do not fix an orientation at this pixel size and SNR).
- ``unseen_placement``: per unseen class, the seen class its mean latent is nearest (cosine), the
  seen class the affinity ranks nearest, and the latter's rank in the latent ordering;
- ``affinity_spearman``: Spearman correlation, over the upper triangle, of the cosine
  similarity of class-mean latents against the affinity matrix, for the true classes
  present in the split (at least three, so that there are three pairs).
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cryovae import __version__, plots
from cryovae.affinity import read_affinity_csv
from cryovae.atomic import write_text_atomic
from cryovae.classify import read_frames
from cryovae.errors import InputError
from cryovae.shards import SubtomogramSet

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
FRAME_CANDIDATES = 64  # frame offsets tried per class (seeded subset of the particles' own)
ANGLE_COLUMNS = ("angle_rot", "angle_tilt", "angle_psi")
ORIGIN_COLUMNS = ("origin_x_angstrom", "origin_y_angstrom", "origin_z_angstrom")
TRUE_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
TRUE_ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
REQUIRED_COLUMNS = ("particle_id", "predicted_class", "nearest_class", "unknown_score", *ANGLE_COLUMNS, *ORIGIN_COLUMNS)
INTERPOLATION_STEPS = 8
_LATENT = re.compile(r"^latent_(\d+)$")
_DECIMALS = 6


# ----------------------------------------------------------------------------- inputs


def latent_columns(columns: Sequence[str], path: Path) -> list[str]:
    """The ``latent_0 … latent_{L-1}`` column names in index order; they must be contiguous."""
    found = sorted((int(m.group(1)), c) for c in columns if (m := _LATENT.match(c)))
    if not found:
        raise InputError(f"{path}: no latent_0 … latent_{{L-1}} columns")
    if [i for i, _ in found] != list(range(len(found))):
        raise InputError(f"{path}: latent columns must be latent_0 … latent_{len(found) - 1}, "
                         f"found indices {[i for i, _ in found]}")
    return [c for _, c in found]


def _id_strings(ids: pd.Series) -> pd.Series:
    """Particle ids as strings; integer-typed ids (a parser's guess) print without a decimal point."""
    if pd.api.types.is_float_dtype(ids) and np.all(np.mod(ids.to_numpy(), 1) == 0):
        ids = ids.astype(np.int64)
    return ids.astype(str)


def read_embeddings(path: Path, config) -> tuple[pd.DataFrame, list[str]]:
    """Read the annotate table; return (table with string ``particle_id``, latent column names).

    Checks the required columns, unique ids, finite numbers, and that every predicted
    class is a seen class or ``unknown`` (nearest classes: a seen class).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: embeddings table does not exist")
    table = pd.read_csv(path, dtype={"predicted_class": str, "nearest_class": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}")
    table["particle_id"] = _id_strings(table["particle_id"])
    dup = table["particle_id"].duplicated()
    if dup.any():
        raise InputError(f"{path}: duplicate particle_id {table['particle_id'][dup].iloc[0]!r}")
    latents = latent_columns(table.columns, path)
    numeric = [*latents, "unknown_score", *ANGLE_COLUMNS, *ORIGIN_COLUMNS]
    for col in numeric:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            pid = table["particle_id"][bad].iloc[0]
            raise InputError(f"{path}: particle {pid!r}: column {col} must be a finite number, "
                             f"got {table[col][bad].iloc[0]!r}")
        table[col] = values.astype(np.float64)
    _check_labels(table, "predicted_class", set(config.seen_classes) | {UNKNOWN}, path)
    _check_labels(table, "nearest_class", set(config.seen_classes), path)
    return table, latents


def _check_labels(table: pd.DataFrame, column: str, allowed: set[str], path: Path) -> None:
    bad = ~table[column].isin(allowed)
    if bad.any():
        raise InputError(f"{path}: particle {table['particle_id'][bad].iloc[0]!r}: {column} "
                         f"{table[column][bad].iloc[0]!r} is not one of {sorted(allowed)}")


def read_affinity(path: Path, config) -> pd.DataFrame:
    """Read the affinity CSV (header of class names, then the N×N matrix) as a labelled frame.

    Returns a (k, k) frame indexed by class name on both axes, restricted to and ordered
    by ``config.class_names``; every configured class must be in the file.
    """
    names, matrix = read_affinity_csv(path)
    frame = pd.DataFrame(matrix, index=names, columns=names)
    absent = [c for c in config.class_names if c not in names]
    if absent:
        raise InputError(f"{path}: class(es) {absent} of the config are missing from the header {names}")
    return frame.loc[config.class_names, config.class_names]


def attach_truth(table: pd.DataFrame, particles: pd.DataFrame, table_path: Path, star_path: Path,
                 config) -> pd.DataFrame:
    """Join the ground truth onto ``table`` by particle id (never by position).

    Adds ``true_class`` and, when the STAR file has poses, the ``rln*`` pose columns.
    Both files must hold exactly the same particles; rows come back in STAR order, so
    every output is independent of the table's row order.
    """
    truth = pd.DataFrame({"particle_id": _id_strings(particles["cryovaeParticleId"]),
                          "true_class": particles["cryovaeClassName"].astype(str)})
    novel = (pd.to_numeric(particles["cryovaeNovel"], errors="coerce").fillna(0).to_numpy() > 0
             if "cryovaeNovel" in particles.columns else np.zeros(len(particles), bool))
    truth["novel"] = novel
    for col in (*TRUE_ANGLE_COLUMNS, *TRUE_ORIGIN_COLUMNS):
        if col in particles.columns:
            truth[col] = pd.to_numeric(particles[col], errors="coerce").to_numpy(dtype=np.float64)
    dup = truth["particle_id"].duplicated()
    if dup.any():
        raise InputError(f"{star_path}: duplicate cryovaeParticleId {truth['particle_id'][dup].iloc[0]!r}")
    extra = sorted(set(table["particle_id"]) - set(truth["particle_id"]))
    if extra:
        raise InputError(f"{table_path}: particle {extra[0]!r} (and {len(extra) - 1} more) is not in {star_path}")
    lacking = sorted(set(truth["particle_id"]) - set(table["particle_id"]))
    if lacking:
        raise InputError(f"{table_path}: particle {lacking[0]!r} of {star_path} (and {len(lacking) - 1} more) "
                         "has no row")
    bad = ~truth["true_class"].isin(set(config.class_names) | {UNKNOWN}) & ~truth["novel"]
    if bad.any():
        raise InputError(f"{star_path}: particle {truth['particle_id'][bad].iloc[0]!r}: class "
                         f"{truth['true_class'][bad].iloc[0]!r} is not a configured class or 'unknown'")
    return truth.merge(table, on="particle_id", how="left", validate="one_to_one")


# ----------------------------------------------------------------------------- metrics


def classification_metrics(true_class: np.ndarray, predicted: np.ndarray, nearest: np.ndarray,
                           config) -> dict:
    """Accuracy, macro F1, per-class rates and the confusion matrix; ``None`` where no truth.

    Arrays have shape (n,) of class names.  Only particles whose true class is not
    ``unknown`` count; rows of the confusion matrix are the true classes present (config
    order), columns the seen classes then ``unknown``.
    """
    from sklearn.metrics import accuracy_score, f1_score

    seen, unseen = config.seen_classes, config.unseen
    is_seen, is_unseen = np.isin(true_class, seen), np.isin(true_class, unseen)
    predicted_labels = [*seen, UNKNOWN]
    rows = [c for c in config.class_names if np.any(true_class == c)]
    out: dict = {"predicted_labels": predicted_labels, "classes": rows or None}
    out["confusion_matrix"] = (
        [[int(np.sum((true_class == r) & (predicted == p))) for p in predicted_labels] for r in rows] or None
    )
    present_seen = [c for c in seen if c in rows]
    t, p = true_class[is_seen], predicted[is_seen]
    out["accuracy"] = float(accuracy_score(t, p)) if is_seen.any() else None
    out["macro_f1"] = (float(f1_score(t, p, labels=present_seen, average="macro", zero_division=0))
                       if is_seen.any() else None)
    out["nearest_class_accuracy"] = float(np.mean(nearest[is_seen] == t)) if is_seen.any() else None
    out["seen_unknown_rate"] = float(np.mean(p == UNKNOWN)) if is_seen.any() else None
    out["per_class_accuracy"] = {c: float(np.mean(predicted[true_class == c] == c)) for c in present_seen} or None
    out["unseen_flagged_fraction"] = float(np.mean(predicted[is_unseen] == UNKNOWN)) if is_unseen.any() else None
    out["per_class_unseen_flagged_fraction"] = {
        c: float(np.mean(predicted[true_class == c] == UNKNOWN)) for c in unseen if c in rows
    } or None
    return out


def unseen_auroc(true_class: np.ndarray, unknown_score: np.ndarray, config,
                 novel: np.ndarray | None = None) -> float | None:
    """AUROC of ``unknown_score`` (n,) for unseen or novel (positive: of no configured class, such
    as a simulated tomogram's decoys) vs seen particles; None without both."""
    from sklearn.metrics import roc_auc_score

    is_seen, is_unseen = np.isin(true_class, config.seen_classes), np.isin(true_class, config.unseen)
    if novel is not None:
        is_unseen = is_unseen | np.asarray(novel, bool)
    if not (is_seen.any() and is_unseen.any()):
        return None
    mask = is_seen | is_unseen
    return float(roc_auc_score(is_unseen[mask], unknown_score[mask]))


def threshold_bounds(predicted: np.ndarray, unknown_score: np.ndarray) -> list[float] | None:
    """The interval the unknown threshold must lie in, read off the calls: [highest score of a
    particle given a class, lowest score of a particle called unknown]; None when either set
    is empty or the calls do not follow one threshold."""
    flagged = predicted == UNKNOWN
    if flagged.all() or not flagged.any():
        return None
    lo, hi = float(np.max(unknown_score[~flagged])), float(np.min(unknown_score[flagged]))
    return [lo, hi] if lo <= hi else None


def symmetric_pose_error_deg(pred_angles_deg: np.ndarray, true_angles_deg: np.ndarray,
                             symmetry: str | np.ndarray) -> np.ndarray:
    """Rotation error in degrees, (n,), between RELION angles (n, 3), minimised over the point group.

    ``symmetry``: a point-group name (RELION's standard orientation) or its operators (G, 3, 3)
    in the reference map's frame (``align.symmetry_operators``).
    """
    from cryovae.rotations import relion_euler_to_matrix, symmetric_geodesic_distance_deg, symmetry_group

    group = symmetry_group(symmetry) if isinstance(symmetry, str) else np.asarray(symmetry, dtype=np.float64)
    pred = relion_euler_to_matrix(pred_angles_deg)
    true = relion_euler_to_matrix(true_angles_deg)
    return np.asarray(symmetric_geodesic_distance_deg(pred, true, group), dtype=np.float64)


def pose_errors(merged: pd.DataFrame, config, frames: dict[str, dict] | None = None, prefix: str = "") -> pd.DataFrame:
    """Per-particle pose errors of seen-class particles with a true pose.

    Returns columns ``particle_id``, ``true_class``, ``correct`` (class called right),
    ``rotation_error_deg``, ``shift_error_angstrom`` (Euclidean, rlnOrigin convention);
    empty when the split has no true poses (or no ``prefix`` pose columns: ``network_``
    for the network's own poses).  Point groups come from ``frames`` (``align`` output,
    axes located in each map) or, without it, ``alignment.symmetry`` about RELION's axes.
    """
    from cryovae.align import symmetry_operators

    columns = ["particle_id", "true_class", "correct", "rotation_error_deg", "shift_error_angstrom"]
    angle_cols = [prefix + c for c in ANGLE_COLUMNS]
    origin_cols = [prefix + c for c in ORIGIN_COLUMNS]
    needed = (*TRUE_ANGLE_COLUMNS, *TRUE_ORIGIN_COLUMNS, *angle_cols, *origin_cols)
    if not all(c in merged.columns for c in needed):
        return pd.DataFrame(columns=columns)
    known = np.isfinite(merged[list(TRUE_ANGLE_COLUMNS)].to_numpy(dtype=np.float64)).all(axis=1)
    rows = merged[known & merged["true_class"].isin(config.seen_classes).to_numpy()]
    errors = np.zeros(len(rows))
    for name in rows["true_class"].unique():
        sel = (rows["true_class"] == name).to_numpy()
        group = symmetry_operators(frames[name]) if frames else config.alignment.symmetry.get(name, "C1")
        errors[sel] = symmetric_pose_error_deg(
            rows.loc[sel, angle_cols].to_numpy(dtype=np.float64),
            rows.loc[sel, list(TRUE_ANGLE_COLUMNS)].to_numpy(), group,
        )
    shift = rows[origin_cols].to_numpy(dtype=np.float64) - rows[list(TRUE_ORIGIN_COLUMNS)].to_numpy()
    return pd.DataFrame({
        "particle_id": rows["particle_id"].to_numpy(), "true_class": rows["true_class"].to_numpy(),
        "correct": (rows["predicted_class"] == rows["true_class"]).to_numpy(),
        "rotation_error_deg": errors, "shift_error_angstrom": np.linalg.norm(shift, axis=1),
    })


def pose_metrics(errors: pd.DataFrame) -> dict:
    """Summary of :func:`pose_errors`: medians and means, ``None`` when there are no errors."""
    rot, correct = errors["rotation_error_deg"].to_numpy(float), errors["correct"].to_numpy(bool)
    shift = errors["shift_error_angstrom"].to_numpy(float)
    has = len(rot) > 0
    return {
        "pose_error_median_deg": float(np.median(rot)) if has else None,
        "pose_error_mean_deg": float(np.mean(rot)) if has else None,
        "pose_error_n_particles": int(len(rot)),
        "pose_error_median_deg_correctly_classified": float(np.median(rot[correct])) if correct.any() else None,
        "shift_error_median_angstrom": float(np.median(shift)) if has else None,
        "per_class_pose_error_median_deg": {
            str(c): float(np.median(rot[errors["true_class"].to_numpy() == c])) for c in errors["true_class"].unique()
        } or None,
    }


def frame_free_rotation_errors(pred: np.ndarray, true: np.ndarray, group: np.ndarray, seed: int = 0) -> np.ndarray:
    """Leave-one-out frame-free rotation errors (n,) in degrees of one class.

    pred, true (n, 3, 3) particle-from-reference; group (S, 3, 3) the point group in the map.
    Candidates G = pred_j^T true_j (at most ``FRAME_CANDIDATES``, seeded); particle i's G is
    the candidate not made from i minimising the median over j != i of
    min_g angle(pred_j G, true_j g); its error is min_g angle(pred_i G, true_i g).
    """
    from cryovae.rotations import matrix_to_quaternion

    n = len(pred)
    if n < 2:
        return np.full(n, np.nan)
    source = np.random.default_rng(seed).permutation(n)[:FRAME_CANDIDATES]
    candidates = np.einsum("cji,cjk->cik", pred[source], true[source])  # (C, 3, 3)
    moved = matrix_to_quaternion(pred[None] @ candidates[:, None])  # (C, n, 4)
    targets = matrix_to_quaternion(true[:, None] @ np.asarray(group)[None])  # (n, S, 4)
    dots = np.abs(np.einsum("cna,nsa->cns", moved, targets)).max(2)
    error = np.degrees(2 * np.arccos(np.clip(dots, 0.0, 1.0)))  # (C, n)
    out = np.empty(n)
    for i in range(n):
        others = np.delete(error, i, axis=1)
        spread = np.median(others, axis=1)
        spread[source == i] = np.inf
        out[i] = error[int(np.argmin(spread)), i]
    return out


def frame_free_shift_errors(delta_xyz: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Leave-one-out shift errors (n,) of one class: |Δ_i - R_i t_i|, Δ (n, 3) the predicted minus
    true origin, t_i the component-wise median of R_j^T Δ_j over j != i (the offset in the map)."""
    n = len(delta_xyz)
    if n < 2:
        return np.full(n, np.nan)
    local = np.einsum("nji,nj->ni", true, delta_xyz)
    out = np.empty(n)
    for i in range(n):
        offset = np.median(np.delete(local, i, axis=0), axis=0)
        out[i] = np.linalg.norm(delta_xyz[i] - true[i] @ offset)
    return out


def frame_free_errors(merged: pd.DataFrame, config, frames: dict[str, dict] | None, pixel_size_angstrom: float,
                      seed: int = 0) -> pd.DataFrame:
    """Per-particle frame-free errors of seen-class particles with true poses, grouped by true class:
    ``particle_id``, ``true_class``, ``rotation_error_deg_frame_free``, ``shift_error_px_frame_free``."""
    from cryovae.align import symmetry_operators
    from cryovae.rotations import relion_euler_to_matrix, symmetry_group

    columns = ["particle_id", "true_class", "rotation_error_deg_frame_free", "shift_error_px_frame_free"]
    if not all(c in merged.columns for c in (*TRUE_ANGLE_COLUMNS, *TRUE_ORIGIN_COLUMNS)):
        return pd.DataFrame(columns=columns)
    known = np.isfinite(merged[list(TRUE_ANGLE_COLUMNS)].to_numpy(dtype=np.float64)).all(axis=1)
    rows = merged[known & merged["true_class"].isin(config.seen_classes).to_numpy()]
    parts = []
    for name in rows["true_class"].unique():
        sel = rows[rows["true_class"] == name]
        group = symmetry_operators(frames[name]) if frames else symmetry_group(config.alignment.symmetry.get(name, "C1"))
        pred = relion_euler_to_matrix(sel[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64))
        true = relion_euler_to_matrix(sel[list(TRUE_ANGLE_COLUMNS)].to_numpy(dtype=np.float64))
        delta = (sel[list(ORIGIN_COLUMNS)].to_numpy(dtype=np.float64)
                 - sel[list(TRUE_ORIGIN_COLUMNS)].to_numpy(dtype=np.float64)) / pixel_size_angstrom
        parts.append(pd.DataFrame({
            "particle_id": sel["particle_id"].to_numpy(), "true_class": name,
            "rotation_error_deg_frame_free": frame_free_rotation_errors(pred, true, group, seed),
            "shift_error_px_frame_free": frame_free_shift_errors(delta, true),
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def pose_confidence_metrics(merged: pd.DataFrame, free: pd.DataFrame, config) -> dict:
    """Frame-free pose metrics and how well ``pose_margin`` tells good poses from bad ones."""
    from sklearn.metrics import roc_auc_score

    rot = free["rotation_error_deg_frame_free"].to_numpy(float)
    shift = free["shift_error_px_frame_free"].to_numpy(float)
    out = {
        "pose_error_median_deg_frame_free": float(np.nanmedian(rot)) if np.isfinite(rot).any() else None,
        "shift_error_median_px": float(np.nanmedian(shift)) if np.isfinite(shift).any() else None,
        "per_class_pose_error_median_deg_frame_free": {
            str(c): float(np.nanmedian(g["rotation_error_deg_frame_free"])) for c, g in free.groupby("true_class")
            if np.isfinite(g["rotation_error_deg_frame_free"]).any()
        } or None,
    }
    if "pose_determined" not in merged.columns:
        return out
    determined = merged["pose_determined"].astype(bool).to_numpy()
    nearest = merged["nearest_class"].to_numpy(dtype=object)
    per_class = {c: float(determined[nearest == c].mean()) for c in config.seen_classes if np.any(nearest == c)}
    out["pose_determined_fraction"] = float(determined.mean()) if len(determined) else None
    out["per_class_pose_determined_fraction"] = per_class or None
    out["pose_undetermined_classes"] = [c for c, f in per_class.items() if f < 0.5]
    for c in out["pose_undetermined_classes"]:
        log.warning("evaluate: only %.0f%% of the particles nearest %s have a determined orientation: its map "
                    "does not fix a pose at this pixel size and SNR (their priors are in *_global_search.star)",
                    100 * per_class[c], c)
    if len(free):
        joined = free.merge(merged[["particle_id", "pose_margin", "pose_determined"]], on="particle_id")
        err, margin = joined["rotation_error_deg_frame_free"].to_numpy(float), joined["pose_margin"].to_numpy(float)
        det = joined["pose_determined"].astype(bool).to_numpy()
        ok = np.isfinite(err) & np.isfinite(margin)
        for name, sel in (("determined", ok & det), ("undetermined", ok & ~det)):
            out[f"pose_error_median_deg_{name}"] = float(np.median(err[sel])) if sel.any() else None
        clear = ok & ((err < 15) | (err > 45))
        good = err[clear] < 15
        out["pose_margin_auroc"] = float(roc_auc_score(good, margin[clear])) if 0 < good.sum() < len(good) else None
    return out


def class_mean_latents(latents: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Mean latent (k, L) of each class in ``classes``, from latents (n, L) and labels (n,)."""
    return np.stack([latents[labels == c].mean(axis=0) for c in classes])


def cosine_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity (k, k) between the rows of ``vectors`` (k, L); a zero row gives 0."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float64), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def upper_triangle_spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation of the strict upper triangles of two (k, k) matrices.

    None for fewer than three classes, or when either triangle is constant (undefined).
    """
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(a), k=1)
    x, y = np.asarray(a)[iu], np.asarray(b)[iu]
    if len(a) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def unseen_placement(latents: np.ndarray, true_class: np.ndarray, affinity: pd.DataFrame, seen: Sequence[str],
                     unseen: Sequence[str]) -> dict[str, dict] | None:
    """Where each unseen class lands among the seen ones: per unseen class with particles, the seen
    class whose mean latent is nearest (cosine of class means), the seen class the affinity ranks
    nearest, and that class's rank (1 = nearest) in the latent ordering.  None without both."""
    seen = [c for c in seen if np.any(true_class == c)]
    unseen = [c for c in unseen if np.any(true_class == c)]
    if not seen or not unseen:
        return None
    means = class_mean_latents(latents, true_class, [*seen, *unseen])
    cos = cosine_similarity_matrix(means)[len(seen):, :len(seen)]
    out = {}
    for row, name in enumerate(unseen):
        order = [seen[j] for j in np.argsort(-cos[row])]
        by_affinity = max(seen, key=lambda c: affinity.loc[name, c])
        out[name] = {"nearest_seen_in_latent": order[0], "nearest_seen_by_affinity": by_affinity,
                     "affinity_nearest_rank_in_latent": order.index(by_affinity) + 1}
    return out


# ----------------------------------------------------------------------------- model


def load_trained_model(path: Path, latent_dims: int):
    """The trained VAE of ``model.pt`` on the CPU in evaluation mode; its latent size must be
    ``latent_dims`` (the number of latent columns of the embeddings table)."""
    from cryovae.model import load_model

    model, meta = load_model(Path(path))
    if int(meta["latent_dims"]) != latent_dims:
        raise InputError(f"{path}: the model has {meta['latent_dims']} latent dimensions, "
                         f"the embeddings table {latent_dims}")
    return model


def decode_latents(model, latents: np.ndarray, y=None) -> np.ndarray:
    """Decode latents (n, L) to canonical volumes (n, D, H, W) (2D models: images (n, H, W)) with
    ``model.decode_canonical``;
    ``y`` (n, C): the class input of a model with classes (see ``AffinityVAE.class_condition``)."""
    import torch

    with torch.no_grad():
        z = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
        volumes = model.decode_canonical(z) if y is None else model.decode_canonical(z, torch.as_tensor(y))
    return volumes[:, 0].detach().cpu().numpy().astype(np.float64)


def interpolation_pair(classes: Sequence[str], affinity: pd.DataFrame) -> tuple[str, str]:
    """The two classes (of at least two) with the lowest affinity: the longest walk in shape."""
    sub = affinity.loc[list(classes), list(classes)].to_numpy()
    iu = np.triu_indices(len(classes), k=1)
    best = int(np.argmin(sub[iu]))
    return classes[iu[0][best]], classes[iu[1][best]]


# ----------------------------------------------------------------------------- outputs


def _clean(value):
    """JSON-ready copy: floats rounded, NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), _DECIMALS) if np.isfinite(value) else None
    return value


def write_metrics(metrics: dict, path: Path) -> None:
    """Write ``metrics`` as deterministic JSON (sorted keys, rounded floats), atomically."""
    write_text_atomic(path, json.dumps(_clean(metrics), sort_keys=True, indent=2) + "\n")


def metrics_rows(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(name, value) of every metric as text, nested keys joined by dots, in sorted order.

    Lists (the confusion matrix, class names) stay one JSON value; ``null`` is ``n/a``.
    """
    rows = []
    for key, value in sorted(_clean(metrics).items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(metrics_rows(value, prefix=f"{name}."))
        else:
            rows.append((name, "n/a" if value is None else json.dumps(value) if isinstance(value, list) else str(value)))
    return rows


def write_metrics_table(metrics: dict, path: Path) -> None:
    """The metrics as one HTML table (name, value), which snakemake --report shows inline."""
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>\n" for k, v in metrics_rows(metrics))
    write_text_atomic(path, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>metrics</title></head>"
                      "<body>\n<table>\n<tr><th>metric</th><th>value</th></tr>\n" + cells + "</table>\n</body></html>\n")


def compute_metrics(config, merged: pd.DataFrame, latents: np.ndarray, affinity: pd.DataFrame,
                    errors: pd.DataFrame, split_name: str) -> dict:
    """Every metric of metrics.json from the truth-joined table (n rows) and latents (n, L)."""
    true_class = merged["true_class"].to_numpy(dtype=object)
    predicted = merged["predicted_class"].to_numpy(dtype=object)
    score = merged["unknown_score"].to_numpy(dtype=np.float64)
    metrics = classification_metrics(true_class, predicted, merged["nearest_class"].to_numpy(dtype=object), config)
    novel = merged["novel"].to_numpy(dtype=bool) if "novel" in merged.columns else np.zeros(len(merged), bool)
    metrics["unseen_auroc"] = unseen_auroc(true_class, score, config, novel)
    metrics["n_novel_particles"] = int(novel.sum())
    metrics["novel_flagged_fraction"] = float(np.mean(predicted[novel] == UNKNOWN)) if novel.any() else None
    metrics.update(pose_metrics(errors))
    true_groups = [c for c in config.class_names if np.any(true_class == c)]
    metrics["affinity_spearman"] = (upper_triangle_spearman(
        cosine_similarity_matrix(class_mean_latents(latents, true_class, true_groups)),
        affinity.loc[true_groups, true_groups].to_numpy()) if true_groups else None)
    metrics["unseen_placement"] = unseen_placement(latents, true_class, affinity, config.seen_classes,
                                                   config.unseen)
    predicted_groups = [c for c in config.seen_classes if np.any(predicted == c)]
    metrics["affinity_spearman_predicted_classes"] = (upper_triangle_spearman(
        cosine_similarity_matrix(class_mean_latents(latents, predicted, predicted_groups)),
        affinity.loc[predicted_groups, predicted_groups].to_numpy()) if predicted_groups else None)
    metrics.update({
        "n_particles": int(len(merged)),
        "n_seen_particles": int(np.isin(true_class, config.seen_classes).sum()),
        "n_unseen_particles": int(np.isin(true_class, config.unseen).sum()),
        "has_ground_truth": bool(np.any(true_class != UNKNOWN)),
        "predicted_counts": {c: int(np.sum(predicted == c)) for c in [*config.seen_classes, UNKNOWN]},
        "unknown_threshold_bounds": threshold_bounds(predicted, score),
        "latent_dims": int(latents.shape[1]),
        "seen_classes": list(config.seen_classes),
        "unseen_classes": list(config.unseen),
        "symmetry": {c: config.alignment.symmetry.get(c, "C1") for c in config.class_names},
        "split": split_name,
        "cryovae_version": __version__,
    })
    return metrics


def write_plots(config, merged: pd.DataFrame, latents: np.ndarray, affinity: pd.DataFrame,
                errors: pd.DataFrame, metrics: dict, model, history: pd.DataFrame, output_dir: Path,
                network_errors: pd.DataFrame | None = None) -> None:
    """All seven figures of the evaluation into ``output_dir``."""
    has_truth = metrics["has_ground_truth"]
    labels = merged["true_class" if has_truth else "predicted_class"].to_numpy(dtype=object)
    kind = "true class" if has_truth else "predicted class"
    coords, method = plots.embed_2d(latents, config.seed)
    plots.plot_latent_map(output_dir / "umap.png", coords, method, labels, config.unseen, config.class_names, kind)
    if has_truth:
        plots.plot_confusion(output_dir / "confusion.png", np.array(metrics["confusion_matrix"]),
                             metrics["classes"], metrics["predicted_labels"])
    else:
        names = metrics["predicted_labels"]
        plots.plot_predicted_counts(output_dir / "confusion.png", names, [metrics["predicted_counts"][c] for c in names])
    _plot_affinity(config, labels, latents, affinity, metrics, kind, output_dir / "affinity_vs_latent.png")
    _plot_pose(config, errors, network_errors, output_dir / "pose_error.png")
    _plot_model(labels, latents, affinity, model, config, kind, output_dir)
    plots.plot_training_curves(output_dir / "training_curves.png", history)


def _plot_affinity(config, labels, latents, affinity, metrics, kind, path: Path) -> None:
    groups = [c for c in config.class_names if np.any(labels == c)]
    if len(groups) < 2:
        plots.plot_message(path, "Latent similarity vs affinity",
                           f"Only {len(groups)} {kind} in this split: no class pairs to compare.")
        return
    similarity = cosine_similarity_matrix(class_mean_latents(latents, labels, groups))
    rho = metrics["affinity_spearman" if kind == "true class" else "affinity_spearman_predicted_classes"]
    plots.plot_affinity_vs_latent(path, similarity, affinity.loc[groups, groups].to_numpy(), groups, rho, kind)


def _plot_pose(config, errors: pd.DataFrame, network: pd.DataFrame | None, path: Path) -> None:
    if len(errors) == 0:
        plots.plot_message(path, "Pose error", "No ground-truth poses of seen-class particles in this split.")
        return
    groups = sorted({config.alignment.symmetry.get(c, "C1") for c in errors["true_class"]})
    plots.plot_pose_error(path, errors["rotation_error_deg"].to_numpy(), "point groups: " + ", ".join(groups),
                          None if network is None else network["rotation_error_deg"].to_numpy())


def _plot_pose_confidence(config, merged: pd.DataFrame, free: pd.DataFrame, metrics: dict, path: Path) -> None:
    if "pose_margin" not in merged.columns:
        plots.plot_message(path, "Pose confidence", "No template matching for this split: no pose margins.")
        return
    if len(free):
        joined = free.merge(merged[["particle_id", "pose_margin"]], on="particle_id")
        plots.plot_pose_confidence(path, joined["pose_margin"].to_numpy(float),
                                   joined["rotation_error_deg_frame_free"].to_numpy(float),
                                   config.matching.pose_margin_min, metrics.get("pose_margin_auroc"))
    else:
        plots.plot_pose_confidence(path, merged["pose_margin"].to_numpy(float), None,
                                   config.matching.pose_margin_min, None)


def _plot_model(labels, latents, affinity, model, config, kind, output_dir: Path) -> None:
    groups = [c for c in config.class_names if np.any(labels == c)]
    if not groups:
        for name in ("reconstructions.png", "interpolation.png"):
            plots.plot_message(output_dir / name, "Decoded class means", "No particle was given a class.")
        return
    means = class_mean_latents(latents, labels, groups)
    condition = model.class_condition(groups)
    plots.plot_reconstructions(output_dir / "reconstructions.png", decode_latents(model, means, condition),
                               groups, kind)
    if len(groups) < 2:
        plots.plot_message(output_dir / "interpolation.png", "Latent interpolation",
                           f"Only one {kind} ({groups[0]}) in this split: nothing to interpolate between.")
        return
    start, end = interpolation_pair(groups, affinity)
    weights = np.linspace(0.0, 1.0, INTERPOLATION_STEPS)
    path_z = (1 - weights)[:, None] * means[groups.index(start)] + weights[:, None] * means[groups.index(end)]
    path_y = None   # a model with classes walks its class input along with the latent
    if condition is not None:
        ends = condition[[groups.index(start), groups.index(end)]].numpy()
        path_y = (1 - weights)[:, None] * ends[0] + weights[:, None] * ends[1]
    plots.plot_interpolation(output_dir / "interpolation.png", decode_latents(model, path_z, path_y), weights,
                             start, end)


def read_history(path: Path) -> pd.DataFrame:
    """Training history CSV with an ``epoch`` column and at least one train_/val_ loss column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training history does not exist")
    history = pd.read_csv(path)
    if "epoch" not in history.columns or not plots.history_components(history):
        raise InputError(f"{path}: expected columns epoch and train_*/val_* losses, got {list(history.columns)}")
    return history


def evaluate(config, embeddings: Path, split_dir: Path, affinity: Path, model: Path, history: Path,
             frames: Path, output_dir: Path) -> None:
    """Write ``metrics.json``, its table ``metrics.html`` and the seven evaluation PNGs of one split into ``output_dir``."""
    embeddings, split_dir, output_dir = Path(embeddings), Path(split_dir), Path(output_dir)
    table, latent_cols = read_embeddings(embeddings, config)
    split = SubtomogramSet.open(split_dir)
    merged = attach_truth(table, split.particles, embeddings, split_dir / "particles.star", config)
    affinity_frame = read_affinity(affinity, config)
    history_frame = read_history(history)
    trained = load_trained_model(model, len(latent_cols))
    latents = merged[latent_cols].to_numpy(dtype=np.float64)
    frame_table = read_frames(frames)
    errors = pose_errors(merged, config, frame_table)
    metrics = compute_metrics(config, merged, latents, affinity_frame, errors, split_dir.name)
    free = frame_free_errors(merged, config, frame_table, split.pixel_size_angstrom, config.seed)
    metrics.update(pose_confidence_metrics(merged, free, config))
    _plot_pose_confidence(config, merged, free, metrics, output_dir / "pose_confidence.png")
    network = pose_errors(merged, config, frame_table, prefix="network_")
    if len(network):  # matching gave the poses: how far the network's own poses were from the truth
        metrics["network_pose_error_median_deg"] = float(np.median(network["rotation_error_deg"]))
        metrics["network_shift_error_median_angstrom"] = float(np.median(network["shift_error_angstrom"]))
    proposals = pose_errors(merged, config, frame_table, prefix="posenet_")
    if len(proposals):  # matching started from the pose network: its own pose alone
        metrics["pose_network_error_median_deg"] = float(np.median(proposals["rotation_error_deg"]))
        metrics["pose_network_within_15deg"] = float(np.mean(proposals["rotation_error_deg"] < 15.0))
    write_plots(config, merged, latents, affinity_frame, errors, metrics, trained, history_frame, output_dir,
                network)
    write_metrics(metrics, output_dir / "metrics.json")
    write_metrics_table(metrics, output_dir / "metrics.html")
