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

Real tomograms are not simulated particles: their template scores and fit sit elsewhere
(lower SNR, other CTF), so a model fitted on simulated particles calls nearly all of them
unknown.  With ``classification.adapt: em`` each extracted split gets its own classifier
(:func:`adapt_classifier`): both models are refitted by EM on the split's unlabelled
particles, anchored to the simulated fit by ``classification.adapt_prior_counts``
pseudo-counts, with an unknown Gaussian beside the seen classes; the threshold is then
the ``accept_fraction`` χ² quantile of the adapted classes (:func:`adapt_model`).  With
``classification.unknown_model: fit_mixture`` the unknowns of such a split come instead from
:class:`FitMixture`: the posterior that a particle is unknown given its template fit and its
nearest class.  In a tomogram the noise is one level for all, so a small complex fits its
template about as poorly as a particle of no class fits any; a threshold on the fit alone
then calls the small classes unknown, while within one nearest class the two are apart.

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
from scipy.stats import chi2, norm
from sklearn.covariance import LedoitWolf

from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.errors import InputError
from cryovae.rotations import matrix_to_relion_euler

log = logging.getLogger(__name__)
UNKNOWN = "unknown"


MODEL_KEYS = ("classifier_class_names",)  # arrays of an embed output that are the model's, not per particle


def load_latents(path: Path) -> dict[str, np.ndarray]:
    """An ``embed`` output: particle_id, class_name, latent_mean (n, L), rotation (n, 3, 3), ..."""
    if not Path(path).is_file():
        raise InputError(f"{path}: latent file does not exist")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class _SavedFields:
    """Dataclass fields (one of them the float ``threshold``) to and from npz arrays under a prefix."""

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {prefix + k: np.asarray(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, data, prefix: str):
        fields = {name: data[prefix + name] for name in cls.__dataclass_fields__}
        fields["threshold"] = float(fields["threshold"])
        return cls(**fields)


@dataclass
class ClassModel(_SavedFields):
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


FIT_SD_FLOOR = 1e-3  # smallest standard deviation of a fit Gaussian (fits are correlations, ~0.1)


@dataclass
class FitMixture(_SavedFields):
    """P(unknown | fit, nearest class k): per seen class a Gaussian of its particles' fits, beside
    one Gaussian of unknown particles' fits shared by all classes, and per class the prior that a
    particle nearest to it is unknown.  Fitted on one split's own particles (:meth:`fit`)."""

    means: np.ndarray  # (K,) fit mean of each seen class
    sds: np.ndarray  # (K,)
    unknown_mean: np.ndarray  # () fit mean of unknown particles
    unknown_sd: np.ndarray  # ()
    unknown_prior: np.ndarray  # (K,) P(unknown | nearest class)
    threshold: float  # posterior of unknown above which a particle is unknown

    def posterior(self, fit: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """P(unknown) (n,) of particles with fits ``fit`` (n,) and nearest class indices ``nearest`` (n,)."""
        prior = self.unknown_prior[nearest]
        seen = np.log1p(-prior) + norm.logpdf(fit, self.means[nearest], self.sds[nearest])
        unknown = np.log(prior) + norm.logpdf(fit, self.unknown_mean, self.unknown_sd)
        return 1.0 / (1.0 + np.exp(np.clip(seen - unknown, -700, 700)))

    @classmethod
    def fit(cls, fit: np.ndarray, nearest: np.ndarray, n_classes: int, prior_counts: float,
            unknown_fraction: float, threshold: float) -> "FitMixture":
        """EM on fits ``fit`` (n,) of particles nearest to classes ``nearest`` (n,) in 0..n_classes-1.

        EM starts with the ``unknown_fraction`` of lowest fits unknown.  Each class's mean is
        its particles' own (the fits of a small and a large complex differ several-fold, so no
        shared anchor fits both); its variance carries ``prior_counts`` pseudo-observations of
        the classes' pooled within-class variance, and its unknown prior ``prior_counts``
        pseudo-counts of ``unknown_fraction``."""
        if len(fit) < 2 or not np.all(np.isfinite(fit)):
            raise InputError(f"unknown_model fit_mixture: {len(fit)} particle(s) with finite fits; EM needs two")
        p_unknown = (fit <= np.quantile(fit, unknown_fraction)).astype(np.float64)
        model, previous = None, None
        for _ in range(EM_MAX_ITERATIONS):
            model = cls._m_step(fit, nearest, n_classes, p_unknown, prior_counts, unknown_fraction, threshold)
            p_unknown = model.posterior(fit, nearest)
            if previous is not None and np.abs(p_unknown - previous).max() < EM_TOLERANCE:
                break
            previous = p_unknown
        return model

    @classmethod
    def _m_step(cls, fit, nearest, n_classes, p_unknown, counts, unknown_fraction, threshold) -> "FitMixture":
        seen = 1.0 - p_unknown
        weight = np.bincount(nearest, seen, n_classes)
        has = weight > 1e-9
        pool_mean = (seen @ fit) / max(seen.sum(), 1e-12)
        means = np.where(has, np.bincount(nearest, seen * fit, n_classes) / np.where(has, weight, 1.0), pool_mean)
        scatter = np.bincount(nearest, seen * (fit - means[nearest]) ** 2, n_classes)
        within = scatter.sum() / max(weight.sum(), 1e-12)  # the classes' pooled within-class variance
        sds = np.sqrt((counts * within + scatter) / (counts + weight).clip(1e-12)).clip(FIT_SD_FLOOR)
        mass = max(p_unknown.sum(), 1e-12)
        unknown_mean = (p_unknown @ fit) / mass
        unknown_sd = max(np.sqrt((p_unknown @ (fit - unknown_mean) ** 2) / mass), FIT_SD_FLOOR)
        total = np.bincount(nearest, minlength=n_classes)
        prior = (np.bincount(nearest, p_unknown, n_classes) + counts * unknown_fraction) / (total + counts)
        return cls(means, sds, np.asarray(unknown_mean), np.asarray(unknown_sd),
                   prior.clip(1e-6, 1 - 1e-6), threshold)


@dataclass
class Classifier:
    """Two Gaussian models of the seen classes: ``classes`` over ``classification.features``
    gives the class probabilities, ``unknown`` over ``classification.unknown_features`` the
    unknown score and its threshold (features that classify well are not always those that
    tell a known particle from an unseen one).  An adapted split's classifier may hold a
    :class:`FitMixture` instead for its unknowns: the score is then P(unknown)."""

    classes: ClassModel
    unknown: ClassModel
    mixture: FitMixture | None = None

    @property
    def threshold(self) -> float:
        return self.unknown.threshold if self.mixture is None else self.mixture.threshold

    def predict(self, x_classes: np.ndarray, x_unknown: np.ndarray, fit: np.ndarray | None = None,
                nearest: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (n, K), unknown score (n,)); ``fit`` (n,): each particle's template fit,
        which a classifier with a :class:`FitMixture` needs; ``nearest`` (n,): the index of each
        particle's named class where not the most probable one (:func:`nearest_index`)."""
        probs, _ = self.classes.predict(x_classes)
        if self.mixture is None:
            _, score = self.unknown.predict(x_unknown)
            return probs, score
        if fit is None:
            raise InputError("this classifier's unknowns come from the template fit: give the match file")
        return probs, self.mixture.posterior(fit, probs.argmax(1) if nearest is None else nearest)

    def save(self, path: Path) -> None:
        mixture = {} if self.mixture is None else self.mixture.arrays("mixture_")
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.classes.arrays("class_"), **self.unknown.arrays("unknown_"), **mixture)

    @classmethod
    def load(cls, path: Path) -> "Classifier":
        if not Path(path).is_file():
            raise InputError(f"{path}: classifier file does not exist")
        with np.load(path, allow_pickle=False) as data:
            try:
                mixture = FitMixture.from_arrays(data, "mixture_") if "mixture_means" in data.files else None
                return cls(ClassModel.from_arrays(data, "class_"), ClassModel.from_arrays(data, "unknown_"), mixture)
            except KeyError as err:
                raise InputError(f"{path}: not a classifier file of this version (missing {err})") from None


def _match_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a ``match`` output."""
    if not Path(path).is_file():
        raise InputError(f"{path}: template-matching file does not exist")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _check_particles(match: dict[str, np.ndarray], particle_id: np.ndarray, path: Path, whose: str) -> None:
    if not np.array_equal(match["particle_id"].astype(str), np.asarray(particle_id).astype(str)):
        raise InputError(f"{path}: particles differ from {whose} (re-run match and embed on one split)")


def read_match_file(path: Path, particle_id: np.ndarray, whose: str = "the latent file's") -> dict[str, np.ndarray]:
    """A ``match`` output's arrays, checked to hold the particles ``particle_id`` in that order
    (``whose``: where that order comes from, for the error)."""
    match = _match_arrays(path)
    _check_particles(match, particle_id, path, whose)
    return match


def matched_rows(data: dict[str, np.ndarray], match: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """The latents ``data`` of the particles that the match arrays ``match`` (read from ``path``) hold:
    all of them, or, for a file that matched a per-class subset (``cryovae match --per-class``),
    those, in its order."""
    if int(match.get("subset_per_class", 0)) == 0:
        return data
    ids = match["particle_id"].astype(str)
    n = len(data["particle_id"])
    rows = pd.Index(data["particle_id"].astype(str)).get_indexer(ids)
    if (rows < 0).any():
        raise InputError(f"{path}: particle {str(ids[np.argmax(rows < 0)])!r} is not in the latent file "
                         "(re-run match and embed on one split)")
    log.info("%s: the class model reads the %d of %d particles that were matched (matching.train_per_class)",
             path, len(rows), n)
    return {k: v if k in MODEL_KEYS else v[rows] for k, v in data.items()}


def load_matches(path: Path, data: dict[str, np.ndarray], classes: list[str]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the latents ``data`` of the particles a ``match`` output holds (:func:`matched_rows`), that
    output), checked against the latents' particle order and the seen classes."""
    match = _match_arrays(path)
    data = matched_rows(data, match, path)
    _check_particles(match, data["particle_id"], path, "the latent file's")
    if list(match["classes"].astype(str)) != list(classes):
        raise InputError(f"{path}: matched classes {list(match['classes'])}, expected {list(classes)}")
    return data, match


def features(
    names: list[str], data: dict[str, np.ndarray], match: dict[str, np.ndarray] | None
) -> np.ndarray:
    """Classifier features ``names`` (of latent, network, template, fit, ...) side by side: (n, F) float64.

    network: the log of the classifier head's probabilities (ss-rVAE), floored at 1e-6."""
    parts = []
    for name in names:
        if name == "latent":
            parts.append(data["latent_mean"].astype(np.float64))
        elif name == "network":
            if "class_probabilities" not in data:
                raise InputError("classification.features lists 'network' but the latent file has no class "
                                 "probabilities (train with training.semi_supervised.classifier: true)")
            parts.append(np.log(np.maximum(data["class_probabilities"].astype(np.float64), 1e-6)))
        elif match is None:
            raise InputError(f"classification.features lists {name!r} but no template-matching file was given")
        elif name == "template":
            parts.append(match["scores"].astype(np.float64))
        elif name == "fit":  # how well the best refined class explains the particle
            parts.append(np.nanmax(match["fit"].astype(np.float64), axis=1, keepdims=True))
        elif name.startswith("screen"):
            if "screen" not in match:
                raise InputError(f"classification.features lists {name!r} but the template-matching file has no "
                                 "class screen (re-run match)")
            screen = match["screen"].astype(np.float64)
            parts.append(screen if name == "screen" else _scale_free("template_relative", screen))
        else:
            parts.append(_scale_free(name, match["scores"].astype(np.float64)))
    return np.concatenate(parts, axis=1)


def nearest_index(config: Config, classes: ClassModel, x: np.ndarray,
                  matches: dict[str, np.ndarray] | None) -> np.ndarray:
    """Index (n,) of the class each particle is named (``classification.nearest_class``): the most
    probable under ``classes`` over its features ``x``, or the refined class of best template fit."""
    if config.classification.nearest_class == "model":
        return classes.predict(x)[0].argmax(1)
    if matches is None:
        raise InputError("classification.nearest_class best_fit reads the template fits: give the match file")
    fits = np.where(np.isnan(matches["fit"]), -np.inf, matches["fit"].astype(np.float64))
    return fits.argmax(1)


def _scale_free(name: str, scores: np.ndarray) -> np.ndarray:
    """Template scores (n, K) in a form that a common factor (the particle's SNR) leaves alone.

    template_relative: each score over the particle's best, (n, K); margin: best minus
    second best, over the best, (n, 1).  A best score at or below zero (a particle like no
    class) gives the values of a particle with a tiny positive best.
    """
    best = np.maximum(scores.max(1, keepdims=True), 1e-6)
    if name == "template_relative":
        return scores / best
    top2 = np.sort(scores, axis=1)[:, -2:]
    return ((top2[:, 1] - top2[:, 0]) / best[:, 0])[:, None]


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
    data, matches = load_latents(latents), None
    if match is not None:
        data, matches = load_matches(match, data, config.seen_classes)
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


# --- adaptation to an unlabelled split ---------------------------------------------------
EM_MAX_ITERATIONS = 200
EM_TOLERANCE = 1e-7  # change in mean log-likelihood per particle that ends EM
RIDGE = 1e-6  # added to covariance diagonals (standardised units) so that they stay invertible


def _log_density(z: np.ndarray, means: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log N(z | mean_k, covariance) (n, K), squared Mahalanobis distances (n, K)); z (n, F), means (K, F)."""
    precision = np.linalg.inv(covariance)
    _, logdet = np.linalg.slogdet(covariance)
    diff = z[:, None, :] - means[None]
    d2 = np.einsum("nki,ij,nkj->nk", diff, precision, diff)
    return -0.5 * (d2 + logdet + z.shape[1] * np.log(2 * np.pi)), d2


@dataclass
class _Mixture:
    """Seen-class Gaussians (shared covariance) plus one broad unknown Gaussian, in standardised units."""

    means: np.ndarray  # (K, F)
    covariance: np.ndarray  # (F, F), shared by the seen classes
    log_weight: np.ndarray  # (K + 1,): seen classes, then unknown
    unknown_mean: np.ndarray  # (F,)
    unknown_covariance: np.ndarray  # (F, F)

    def responsibilities(self, z: np.ndarray) -> tuple[np.ndarray, float]:
        """(posterior of each component (n, K + 1), mean log-likelihood per particle)."""
        seen, _ = _log_density(z, self.means, self.covariance)
        unknown, _ = _log_density(z, self.unknown_mean[None], self.unknown_covariance)
        joint = np.concatenate([seen, unknown], axis=1) + self.log_weight
        top = joint.max(1, keepdims=True)
        log_total = top[:, 0] + np.log(np.exp(joint - top).sum(1))
        return np.exp(joint - log_total[:, None]), float(log_total.mean())


def _m_step(z: np.ndarray, resp: np.ndarray, prior: _Mixture, counts: float) -> _Mixture:
    """MAP update under conjugate priors centred on ``prior`` with ``counts`` pseudo-counts.

    Each class mean: (counts * prior mean + sum r z) / (counts + sum r); the shared covariance
    with counts * F pseudo-observations per class of the prior covariance; the weights with
    counts * (K + 1) * prior weight Dirichlet pseudo-counts.  The unknown Gaussian is the
    split's own spread and does not move.  z (n, F), resp (n, K + 1).
    """
    k, f = prior.means.shape
    seen = resp[:, :k]
    n_k = seen.sum(0)
    means = (counts * prior.means + seen.T @ z) / (counts + n_k)[:, None]
    scatter = np.zeros((f, f))
    for j in range(k):
        diff = z - means[j]
        scatter += (seen[:, j, None] * diff).T @ diff
    prior_obs = counts * f * k
    covariance = (prior_obs * prior.covariance + scatter) / (prior_obs + n_k.sum()) + RIDGE * np.eye(f)
    pseudo = counts * (k + 1) * np.exp(prior.log_weight)
    weight = resp.sum(0) + pseudo
    unknown_mean, unknown_covariance = _unknown_update(z, resp[:, k], prior, counts * f)
    return _Mixture(means, covariance, np.log(weight / weight.sum()), unknown_mean, unknown_covariance)


def _unknown_update(z: np.ndarray, r: np.ndarray, prior: _Mixture, counts: float) -> tuple[np.ndarray, np.ndarray]:
    """MAP mean (F,) and covariance (F, F) of the unknown Gaussian, ``counts`` pseudo-observations of
    the split's own mean and spread (so that it can neither vanish nor collapse onto few particles)."""
    n = r.sum()
    mean = (counts * prior.unknown_mean + r @ z) / (counts + n)
    diff = z - mean
    scatter = (r[:, None] * diff).T @ diff
    covariance = (counts * prior.unknown_covariance + scatter) / (counts + n) + RIDGE * np.eye(z.shape[1])
    return mean, covariance


def adapt_model(
    model: ClassModel, x: np.ndarray, prior_counts: float, unknown_fraction: float, accept_fraction: float
) -> tuple[ClassModel, np.ndarray]:
    """Refit ``model`` on the unlabelled features ``x`` (n, F) by EM; (adapted model, P(unknown) (n,)).

    The mixture is the model's seen classes plus an unknown Gaussian anchored to the mean
    and covariance of ``x`` itself.  EM starts from responsibilities that need no agreement
    of scales between the simulated and the real particles: the model's class posteriors
    (relative evidence), with the ``unknown_fraction`` of particles of highest unknown score
    (a rank) taken as unknown.  The threshold of the adapted model is the ``accept_fraction``
    quantile of the squared Mahalanobis distance of its own seen classes (χ² with F degrees
    of freedom): a fraction ``accept_fraction`` of the particles the fitted Gaussians describe
    are accepted, whatever the scale of the features on this split.
    """
    z = (x - model.centre) / model.scale
    k, f = model.means.shape
    if len(z) < 2:
        raise InputError(f"adapt: {len(z)} particle(s); EM needs at least two")
    probs, score = model.predict(x)
    unknown = (score > np.quantile(score, 1 - unknown_fraction)).astype(np.float64)
    resp = np.concatenate([probs * (1 - unknown)[:, None], unknown[:, None]], axis=1)
    spread = np.cov(z, rowvar=False).reshape(f, f) + RIDGE * np.eye(f)
    log_weight = np.append(model.log_prior + np.log1p(-unknown_fraction), np.log(unknown_fraction))
    prior = _Mixture(model.means, np.linalg.inv(model.precision), log_weight, z.mean(0), spread)
    mixture, previous = _m_step(z, resp, prior, prior_counts), -np.inf
    for _ in range(EM_MAX_ITERATIONS):
        resp, loglik = mixture.responsibilities(z)
        mixture = _m_step(z, resp, prior, prior_counts)
        if loglik - previous < EM_TOLERANCE:
            break
        previous = loglik
    resp, _ = mixture.responsibilities(z)
    seen_log_weight = mixture.log_weight[:k] - np.log(np.exp(mixture.log_weight[:k]).sum())
    adapted = ClassModel(model.classes, model.centre, model.scale, mixture.means,
                         np.linalg.inv(mixture.covariance), seen_log_weight, np.inf)
    adapted.threshold = float(chi2.ppf(accept_fraction, f))
    return adapted, resp[:, k]


def adapt_classifier(config: Config, classifier: Path, latents: Path, output: Path, match: Path | None = None) -> None:
    """Write the classifier of one unlabelled split: ``classification.adapt`` none copies the
    simulated one, em refits both of its models on the split (:func:`adapt_model`)."""
    cc = config.classification
    model = Classifier.load(classifier)
    if cc.adapt == "em":
        _, matches, x, x_unknown = _split_features(config, latents, match)
        before = model.predict(x, x_unknown)
        classes, _ = adapt_model(model.classes, x, cc.adapt_prior_counts, cc.adapt_unknown_fraction,
                                 cc.accept_fraction)
        unknown, p_unknown = adapt_model(model.unknown, x_unknown, cc.adapt_prior_counts,
                                         cc.adapt_unknown_fraction, cc.accept_fraction)
        fit = fit_column(matches, latents) if cc.unknown_model == "fit_mixture" else None
        nearest = nearest_index(config, classes, x, matches)
        model = Classifier(classes, unknown, None if fit is None else _fit_mixture(config, classes, nearest, fit))
        after = model.predict(x, x_unknown, fit, nearest)
        changed = float((before[0].argmax(1) != after[0].argmax(1)).mean())
        log.info("adapt %s: %d particles, EM weight of unknown %.3f, threshold %.3f, called unknown %.3f, "
                 "nearest class changed for %.3f", latents, len(x), float(p_unknown.mean()), model.threshold,
                 float((after[1] > model.threshold).mean()), changed)
    else:
        log.info("adapt %s: classification.adapt is none, the simulated classifier is kept", latents)
    model.save(output)


def _fits(model: Classifier, matches: dict[str, np.ndarray] | None, latents: Path) -> np.ndarray | None:
    """Each particle's template fit (n,) where ``model`` reads it (a :class:`FitMixture`), else None."""
    return None if model.mixture is None else fit_column(matches, latents)


def fit_column(matches: dict[str, np.ndarray] | None, latents: Path) -> np.ndarray:
    """Each particle's template fit (n,): the ``fit`` feature of the split's match arrays."""
    if matches is None:
        raise InputError(f"{latents}: this classifier's unknowns come from the template fit: give --match")
    return features(["fit"], {}, matches)[:, 0]


def _fit_mixture(config: Config, classes: ClassModel, nearest: np.ndarray, fit: np.ndarray) -> FitMixture:
    """The :class:`FitMixture` of an adapted split from its particles' named classes ``nearest`` and fits ``fit``."""
    cc = config.classification
    return FitMixture.fit(fit, nearest, len(classes.classes), cc.adapt_prior_counts, cc.adapt_unknown_fraction,
                          cc.unknown_posterior)


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
    class and ``network_angle_*``/``network_origin_*`` hold the network's pose in the same frame
    (``posenet_angle_*``: the pose network's own pose, when matching started from it);
    ``pose_margin``, ``pose_spread_deg``, ``pose_sigma_deg`` and ``pose_determined`` are the
    matcher's confidence in that pose (:mod:`cryovae.match`).
    """
    data, matches, x, x_unknown = _split_features(config, latents, match)
    model = Classifier.load(classifier)
    index = nearest_index(config, model.classes, x, matches)
    probs, score = model.predict(x, x_unknown, _fits(model, matches, latents), index)
    nearest = model.classes.classes[index]
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
        if not np.isnan(matches["scores"]).all():   # NaN without the global search (matching.global_search: false)
            table |= {f"template_score_{c}": matches["scores"][:, j] for j, c in enumerate(config.seen_classes)}
        table |= _confidence_columns(matches, rows, k)
        if "proposal_rotation" in matches:   # the pose network's own pose (matching.starts: network), no shift
            table |= _pose_columns("posenet_", matches["proposal_rotation"][rows, k], np.zeros((len(rows), 3)))
    table |= {"predicted_class": predicted, "nearest_class": nearest}
    table |= {f"prob_{c}": probs[:, k] for k, c in enumerate(model.classes.classes)}
    table |= {"unknown_score": score, "confidence": probs.max(1), "recon_error": data["recon_error"]}
    with atomic_path(output) as tmp:
        pd.DataFrame(table).to_csv(tmp, index=False, float_format="%.6f")
    log.info("annotate: %d particles, %d called unknown", len(predicted), int((predicted == UNKNOWN).sum()))
