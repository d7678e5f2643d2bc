"""A split's match file, written whole or joined from the parts its matching jobs wrote.

The workflow matches a split in :func:`cryovae.splits.match_parts` parts (``cryovae match
--part K --parts N``, one job each, so that a cluster spreads a large split and no job holds a
whole split's volumes) and joins them (``cryovae match-join``).  A part file has the match
file's format; joining concatenates the per-particle arrays in part order.  No torch here: the
join is a small job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cryovae.atomic import atomic_path
from cryovae.errors import InputError

log = logging.getLogger(__name__)
PER_FILE = ("classes", "class_self_margin", "subset_per_class")  # the same in every part; the rest is per particle


def write_match_file(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a match file (or part) atomically."""
    with atomic_path(output, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def contrast_warnings(scores: np.ndarray, scores_min: np.ndarray, tomograms: np.ndarray) -> list[str]:
    """Tomograms whose particles correlate negatively with the references: one warning each.

    ``scores``/``scores_min`` (n, C): the most positive / most negative global-search correlation
    per class (:meth:`cryovae.match.Matcher.match`); ``tomograms`` (n,).  A particle's signed best
    score is its most negative one where that is larger in magnitude than its most positive; a
    tomogram whose median signed best score is below 0 (most of its particles match a reference
    better in negative) gets a warning (logged, and returned) saying to set invert_contrast.
    """
    best, worst = scores.max(1), scores_min.min(1)
    signed = np.where(np.abs(worst) > np.abs(best), worst, best)
    names = np.asarray(tomograms).astype(str)
    messages = []
    for name in pd.unique(names):
        rows = names == name
        median = float(np.median(signed[rows]))
        if median < 0:
            messages.append(
                f"tomogram {name!r}: its particles correlate negatively with the references (median signed best "
                f"score {median:.3f}; most positive {best[rows].max():.3f}, most negative {worst[rows].min():.3f}): "
                f"the protein is dark; set invert_contrast: true in extraction.tomograms.{name}"
            )
    for message in messages:
        log.warning(message)
    return messages


def check_contrast(arrays: dict[str, np.ndarray]) -> list[str]:
    """:func:`contrast_warnings` of a whole split's match arrays (none for particles without a tomogram)."""
    if "tomogram_name" not in arrays or len(arrays["particle_id"]) == 0:
        return []
    if np.isnan(arrays["scores"]).all():
        log.info("match: no global-search scores (matching.global_search: false), so the contrast is not checked")
        return []
    return contrast_warnings(arrays["scores"], arrays["scores_min"], arrays["tomogram_name"])


def _read_part(path: Path) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise InputError(f"{path}: match part does not exist")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays, NaN equal to NaN (the self-margins of a match without the global search)."""
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def join_match_parts(config, parts: list[Path], output: Path) -> None:
    """Join match parts (in the order given, part 0 first) into one match file; the contrast
    check runs on the whole split.  Parts of different matches (classes, self-margins, subset),
    or holding a particle twice, are an InputError."""
    if not parts:
        raise InputError("match-join: no parts given")
    arrays = [_read_part(p) for p in parts]
    first = arrays[0]
    for path, part in zip(parts[1:], arrays[1:]):
        if set(part) != set(first) or any(not _same(part[k], first[k]) for k in PER_FILE):
            raise InputError(f"{path}: this part comes from another match than {parts[0]} (its classes, maps "
                             "or subset differ); re-run every part")
    joined = {k: first[k] if k in PER_FILE else np.concatenate([a[k] for a in arrays]) for k in first}
    ids = joined["particle_id"].astype(str)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"match-join: particle {str(unique[np.argmax(counts > 1)])!r} is in more than one part")
    check_contrast(joined)
    write_match_file(output, joined)
    log.info("match-join: %d particles from %d parts -> %s", len(ids), len(parts), output)
