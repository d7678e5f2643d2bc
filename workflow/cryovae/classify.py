"""Classes and unknowns from latents (and template-matching scores), and the per-particle answer table.

A class model is a Gaussian per seen class with one shared, shrunk covariance
(Ledoit–Wolf) in standardised feature space.  Features are the latent means re-encoded
with the final model and, with ``matching.enabled``, each particle's best global
template-matching score per seen class and its ``fit`` (the full-size matched-filter
correlation at the refined pose of its best class).  Two such models make the
:class:`Classifier`: one over ``classification.features`` gives the class probabilities
(its posteriors), one over ``classification.unknown_features`` the unknown score (the
smallest squared Mahalanobis distance to a class mean).  Both are fitted on the training
split; the unknown threshold is calibrated on the validation split, so that a fraction
``classification.accept_fraction`` of known validation particles is accepted.

Poses written out are the template-matching poses of the nearest class when matching is
enabled (already relative to the reference map), else the network's poses moved into
the reference frame by ``align``'s frames; the network's poses are kept beside them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.covariance import LedoitWolf

from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.errors import InputError
from cryovae.rotations import matrix_to_relion_euler

log = logging.getLogger(__name__)
UNKNOWN = "unknown"


def load_latents(path: Path) -> dict[str, np.ndarray]:
    """An ``embed`` output: particle_id, class_name, latent_mean (n, L), rotation (n, 3, 3), ..."""
    if not Path(path).is_file():
        raise InputError(f"{path}: latent file does not exist")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@dataclass
class ClassModel:
    """Shared-covariance Gaussian classes in standardised latent space."""

    classes: np.ndarray  # (K,) class names
    centre: np.ndarray  # (L,) latent mean of the training set
    scale: np.ndarray  # (L,) latent standard deviation of the training set
    means: np.ndarray  # (K, L) standardised class means
    precision: np.ndarray  # (L, L) inverse shared covariance
    log_prior: np.ndarray  # (K,)
    threshold: float  # unknown score above which a particle is unknown

    @classmethod
    def fit(cls, latents: np.ndarray, labels: np.ndarray) -> "ClassModel":
        classes = np.array(sorted(set(labels.tolist())))
        centre, scale = latents.mean(0), latents.std(0) + 1e-8
        z = (latents - centre) / scale
        means = np.stack([z[labels == c].mean(0) for c in classes])
        within = z - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(within).precision_
        counts = np.array([(labels == c).sum() for c in classes], dtype=float)
        return cls(classes, centre, scale, means, precision, np.log(counts / counts.sum()), np.inf)

    def distances(self, latents: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each latent to each class mean, shape (n, K)."""
        diff = ((latents - self.centre) / self.scale)[:, None, :] - self.means[None]
        return np.einsum("nki,ij,nkj->nk", diff, self.precision, diff)

    def predict(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (n, K), unknown score (n,))."""
        d2 = self.distances(latents)
        logits = -0.5 * d2 + self.log_prior
        logits -= logits.max(1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(1, keepdims=True), d2.min(1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {prefix + k: np.asarray(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, data, prefix: str) -> "ClassModel":
        fields = {name: data[prefix + name] for name in cls.__dataclass_fields__}
        fields["threshold"] = float(fields["threshold"])
        return cls(**fields)


@dataclass
class Classifier:
    """Two Gaussian models of the seen classes: ``classes`` over ``classification.features``
    gives the class probabilities, ``unknown`` over ``classification.unknown_features`` the
    unknown score and its threshold (features that classify well are not always those that
    tell a known particle from an unseen one)."""

    classes: ClassModel
    unknown: ClassModel

    @property
    def threshold(self) -> float:
        return self.unknown.threshold

    def predict(self, x_classes: np.ndarray, x_unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (n, K), unknown score (n,))."""
        probs, _ = self.classes.predict(x_classes)
        _, score = self.unknown.predict(x_unknown)
        return probs, score

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.classes.arrays("class_"), **self.unknown.arrays("unknown_"))

    @classmethod
    def load(cls, path: Path) -> "Classifier":
        if not Path(path).is_file():
            raise InputError(f"{path}: classifier file does not exist")
        with np.load(path, allow_pickle=False) as data:
            try:
                return cls(ClassModel.from_arrays(data, "class_"), ClassModel.from_arrays(data, "unknown_"))
            except KeyError as err:
                raise InputError(f"{path}: not a classifier file of this version (missing {err})") from None


def load_matches(path: Path, particle_id: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    """A ``match`` output checked against the latents' particle order and the seen classes."""
    if not Path(path).is_file():
        raise InputError(f"{path}: template-matching file does not exist")
    with np.load(path, allow_pickle=False) as data:
        match = {k: data[k] for k in data.files}
    if list(match["classes"].astype(str)) != list(classes):
        raise InputError(f"{path}: matched classes {list(match['classes'])}, expected {list(classes)}")
    if not np.array_equal(match["particle_id"].astype(str), particle_id.astype(str)):
        raise InputError(f"{path}: particles differ from the latent file's (re-run match and embed on one split)")
    return match


def features(
    names: list[str], data: dict[str, np.ndarray], match: dict[str, np.ndarray] | None
) -> np.ndarray:
    """Classifier features ``names`` (of latent, template, fit) side by side: (n, F) float64."""
    parts = []
    for name in names:
        if name == "latent":
            parts.append(data["latent_mean"].astype(np.float64))
        elif match is None:
            raise InputError(f"classification.features lists {name!r} but no template-matching file was given")
        elif name == "template":
            parts.append(match["scores"].astype(np.float64))
        else:  # "fit": how well the best refined class explains the particle
            parts.append(np.nanmax(match["fit"].astype(np.float64), axis=1, keepdims=True))
    return np.concatenate(parts, axis=1)


def _known_labels(data: dict[str, np.ndarray], config: Config, path: Path) -> np.ndarray:
    labels = data["class_name"].astype(str)
    bad = sorted(set(labels.tolist()) - set(config.seen_classes))
    if bad:
        raise InputError(f"{path}: classes {bad} are not seen classes {config.seen_classes}")
    return labels


def _split_features(
    config: Config, latents: Path, match: Path | None
) -> tuple[dict, dict | None, np.ndarray, np.ndarray]:
    """(latents, matches, class features, unknown features) of one split."""
    data = load_latents(latents)
    matches = None if match is None else load_matches(match, data["particle_id"], config.seen_classes)
    cc = config.classification
    return data, matches, features(cc.features, data, matches), features(cc.unknown_features, data, matches)


def fit_classifier(
    config: Config, train: Path, val: Path, output: Path, train_match: Path | None = None, val_match: Path | None = None
) -> None:
    """Fit :class:`Classifier` on the training split; calibrate its unknown threshold on validation."""
    tr, _, train_x, train_u = _split_features(config, train, train_match)
    va, _, val_x, val_u = _split_features(config, val, val_match)
    labels = _known_labels(tr, config, train)
    model = Classifier(ClassModel.fit(train_x, labels), ClassModel.fit(train_u, labels))
    val_labels = _known_labels(va, config, val)
    probs, score = model.predict(val_x, val_u)
    model.unknown.threshold = float(np.quantile(score, config.classification.accept_fraction))
    accuracy = float((model.classes.classes[probs.argmax(1)] == val_labels).mean())
    log.info(
        "classifier: %d classes, validation accuracy %.3f, unknown threshold %.3f (accepts %.0f%% of validation)",
        len(model.classes.classes), accuracy, model.threshold, 100 * config.classification.accept_fraction,
    )
    model.save(output)


def read_frames(path: Path) -> dict[str, dict]:
    """``align`` output: class -> rotation_canonical_to_reference (3x3), translation_angstrom, symmetry."""
    if not Path(path).is_file():
        raise InputError(f"{path}: frames file does not exist")
    return json.loads(Path(path).read_text())


def poses_in_reference_frame(
    rotation_model: np.ndarray, origin_angstrom: np.ndarray, classes: np.ndarray, frames: dict[str, dict]
) -> tuple[np.ndarray, np.ndarray]:
    """Model-frame poses -> poses relative to each particle's class reference map.

    With ``R`` the rotation that takes the canonical frame onto the reference map and
    ``t`` (Å) the reference's offset (``ref(y) = canonical(R^T (y - t))``), a particle
    ``canonical(A^T (x - d))`` is ``ref(B^T (x - d + B t))`` with ``B = A R^T``: the
    rotation is ``B``, the content moves by ``-B t`` and so the RELION origin by ``+B t``.

    rotation_model (n, 3, 3), origin_angstrom (n, 3), classes (n,) -> (n, 3, 3), (n, 3).
    """
    rot = np.empty_like(rotation_model)
    origin = np.empty_like(origin_angstrom)
    for name in np.unique(classes):
        sel = classes == name
        frame = frames[str(name)]
        r = np.asarray(frame["rotation_canonical_to_reference"], dtype=np.float64)
        t = np.asarray(frame["translation_angstrom"], dtype=np.float64)
        rot[sel] = rotation_model[sel] @ r.T
        origin[sel] = origin_angstrom[sel] + rot[sel] @ t
    return rot, origin


def _pose_columns(prefix: str, rotation: np.ndarray, origin: np.ndarray) -> dict[str, np.ndarray]:
    angles = matrix_to_relion_euler(rotation)
    table = {f"{prefix}angle_{name}": angles[:, i] for i, name in enumerate(("rot", "tilt", "psi"))}
    return table | {f"{prefix}origin_{ax}_angstrom": origin[:, i] for i, ax in enumerate("xyz")}


POSE_CONFIDENCE = ("pose_margin", "pose_spread_deg", "pose_sigma_deg", "pose_determined")


def _confidence_columns(matches: dict[str, np.ndarray], rows: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
    """The matcher's pose confidence at each particle's nearest class (``match`` files that have it)."""
    return {name: matches[name][rows, k] for name in POSE_CONFIDENCE if name in matches}


def annotate(
    config: Config, latents: Path, classifier: Path, frames: Path, output: Path, match: Path | None = None
) -> None:
    """Write the per-particle CSV: latent, pose in the reference frame, class, probabilities, unknown score.

    With a ``match`` file the pose columns are the template-matching pose of the nearest
    class and ``network_angle_*``/``network_origin_*`` hold the network's pose in the same frame;
    ``pose_margin``, ``pose_spread_deg``, ``pose_sigma_deg`` and ``pose_determined`` are the
    matcher's confidence in that pose (:mod:`cryovae.match`).
    """
    data, matches, x, x_unknown = _split_features(config, latents, match)
    model = Classifier.load(classifier)
    probs, score = model.predict(x, x_unknown)
    nearest = model.classes.classes[probs.argmax(1)]
    predicted = np.where(score > model.threshold, UNKNOWN, nearest)
    network_rot, network_origin = poses_in_reference_frame(
        data["rotation"].astype(np.float64), data["origin_angstrom"].astype(np.float64), nearest, read_frames(frames)
    )
    table = {"particle_id": data["particle_id"].astype(str)}
    for i in range(data["latent_mean"].shape[1]):
        table[f"latent_{i}"] = data["latent_mean"][:, i]
    if matches is None:
        table |= _pose_columns("", network_rot, network_origin)
    else:
        column = {c: j for j, c in enumerate(config.seen_classes)}
        k = np.array([column[c] for c in nearest], dtype=np.int64)
        rows = np.arange(len(nearest))
        table |= _pose_columns("", matches["rotation"][rows, k], matches["origin_angstrom"][rows, k])
        table |= _pose_columns("network_", network_rot, network_origin)
        table |= {f"template_score_{c}": matches["scores"][:, j] for j, c in enumerate(config.seen_classes)}
        table |= _confidence_columns(matches, rows, k)
    table |= {"predicted_class": predicted, "nearest_class": nearest}
    table |= {f"prob_{c}": probs[:, k] for k, c in enumerate(model.classes.classes)}
    table |= {"unknown_score": score, "confidence": probs.max(1), "recon_error": data["recon_error"]}
    with atomic_path(output) as tmp:
        pd.DataFrame(table).to_csv(tmp, index=False, float_format="%.6f")
    log.info("annotate: %d particles, %d called unknown", len(predicted), int((predicted == UNKNOWN).sum()))
