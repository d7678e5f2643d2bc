"""Which particles of which classes go into which split and shard: needs only the config.

Kept free of heavy imports (no torch, no numba): the workflow calls :func:`shard_plan`
while it parses, on every node that runs a job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryovae.errors import InputError

SPLITS = ("train", "val", "test")
# Voxels of a shard whose size the config leaves to the work: 1 GiB of float32, 8,192
# particles at 32³ (a few seconds of one core), so that a simulate job's start-up (its
# imports, ~1 s) is a small part of it.
SHARD_VOXELS = 2**28


def split_classes(config, split: str) -> list[str]:
    """Classes of a split: the seen ones for train/val, all for test."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return list(config.class_names) if split == "test" else list(config.seen_classes)


def particles_per_class(config, split: str) -> int:
    """Particles of each class in a split (at least 1)."""
    sim = config.simulation
    base = sim.particles_per_class
    factor = {"train": 1.0, "val": sim.val_fraction, "test": sim.test_fraction}[split]
    return max(1, round(factor * base))


def class_sequence(config, split: str) -> np.ndarray:
    """Index (into ``config.class_names``) of every particle of a split, in particle order."""
    names = list(config.class_names)
    indices = np.array([names.index(c) for c in split_classes(config, split)], dtype=np.int64)
    sequence = np.repeat(indices, particles_per_class(config, split))
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, SPLITS.index(split)]))
    return rng.permutation(sequence)


def max_particles_per_shard(config) -> int:
    """``simulation.particles_per_shard``, or when null as many particles as fill SHARD_VOXELS."""
    per = config.simulation.particles_per_shard
    return per if per is not None else max(1, SHARD_VOXELS // config.box_size**3)


def shard_plan(config, split: str) -> list[int]:
    """Particle count of each shard of a split (cheap: needs only the config).

    As few shards as hold at most :func:`max_particles_per_shard` particles each, of equal
    size (the first ``total % count`` one particle larger), so that the simulate jobs, one per
    shard, take equal time.
    """
    total = len(split_classes(config, split)) * particles_per_class(config, split)
    count = -(-total // max_particles_per_shard(config))
    base, larger = divmod(total, count)
    return [base + 1 if k < larger else base for k in range(count)]


def shard_start(config, split: str, shard: int) -> int:
    """Index of the first particle of ``shard`` in the split's :func:`class_sequence`."""
    return sum(shard_plan(config, split)[:shard])


def shard_names(config, split: str) -> list[str]:
    """File stems of a split's shards, in shard order (``shard_000``, ``shard_001``, ...)."""
    return [f"shard_{k:03d}" for k in range(len(shard_plan(config, split)))]


def match_subset_per_class(config, split: str) -> int | None:
    """The most particles of each class the workflow matches in ``split``: ``matching.train_per_class``
    for the training split, unless training reads every training particle in its matched pose
    (``training.shape_frame: matched``); None (every particle) otherwise."""
    subset = config.matching.train_per_class
    return subset if split == "train" and config.training.shape_frame != "matched" else None


def match_particles(config, split: str) -> int | None:
    """Particles the workflow matches in ``split``, from what is known while it parses: a simulated
    split's count (at most :func:`match_subset_per_class` per class), a simulated tomogram's planned
    particles, the picks of a user's tomogram whose coordinates file exists; None where nothing says."""
    if split in SPLITS:
        per_class = particles_per_class(config, split)
        subset = match_subset_per_class(config, split)
        if subset is not None:
            per_class = min(per_class, subset)
        return per_class * len(split_classes(config, split))
    if split in config.simulated_tomograms:
        ts = config.tomogram_simulation
        return ts.particles_per_class * (len(config.class_names) + len(ts.decoys))
    spec = config.extraction.tomograms.get(split)
    if spec is None or not Path(spec.coordinates).is_file():
        return None
    from cryovae.star import count_coordinates

    return count_coordinates(spec.coordinates, split)


def match_parts(config, split: str) -> int:
    """Matching jobs of a split: as few equal parts as hold at most ``matching.particles_per_job``
    particles each (:func:`match_particles`; one where the count is not known)."""
    count = match_particles(config, split)
    return 1 if not count else -(-count // config.matching.particles_per_job)


def part_rows(rows: np.ndarray, part: int, parts: int) -> np.ndarray:
    """Part ``part`` (0-based) of ``parts`` nearly equal consecutive slices of ``rows``."""
    if not 0 <= part < parts:
        raise InputError(f"match part {part} of {parts}: expected 0 <= part < parts")
    return np.array_split(rows, parts)[part]
