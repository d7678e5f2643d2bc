"""Which particles of which classes go into which split and shard: needs only the config.

Kept free of heavy imports (no torch, no numba): the workflow calls :func:`shard_plan`
while it parses, on every node that runs a job.
"""

from __future__ import annotations

import numpy as np

from cryovae.errors import InputError

SPLITS = ("train", "val", "test")


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


def shard_plan(config, split: str) -> list[int]:
    """Particle count of each shard of a split (cheap: needs only the config)."""
    total = len(split_classes(config, split)) * particles_per_class(config, split)
    per = config.simulation.particles_per_shard
    return [min(per, total - start) for start in range(0, total, per)]


def shard_names(config, split: str) -> list[str]:
    """File stems of a split's shards, in shard order (``shard_000``, ``shard_001``, ...)."""
    return [f"shard_{k:03d}" for k in range(len(shard_plan(config, split)))]
