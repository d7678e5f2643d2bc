"""Training data: a split's particles with their labels, read in shard-grouped chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from cryovae.errors import InputError
from cryovae.rotations import relion_euler_to_matrix
from cryovae.shards import SubtomogramSet

UNKNOWN = "unknown"
T = TypeVar("T")


@dataclass
class ParticleData:
    """A split ready for training: volumes by index, class rows of the affinity matrix, true poses.

    class_index (n,) int64: row of each particle's class in ``class_names`` (-1: unknown);
    true_rotation (n, 3, 3) float32 particle-from-reference and true_shift_voxels (n, 3)
    float32 (x, y, z; content centre minus voxel N//2 = -rlnOrigin / pixel size), or None
    when the STAR file has no poses.  frame_rotation / frame_shift_voxels: the same for the
    pose a ``matched`` model reads each particle in (:meth:`with_frames`), or None.
    """

    source: SubtomogramSet
    spatial_shape: tuple[int, ...]
    class_index: np.ndarray
    true_rotation: np.ndarray | None
    true_shift_voxels: np.ndarray | None
    frame_rotation: np.ndarray | None = None
    frame_shift_voxels: np.ndarray | None = None

    @classmethod
    def open(cls, folder: str | Path, class_names: list[str], require_known: bool = True) -> "ParticleData":
        """Open a split folder; with ``require_known`` every class must be in ``class_names``."""
        source = SubtomogramSet.open(folder)
        if "rlnImagePixelSize" not in source.optics.columns:
            raise InputError(f"{source.folder / 'particles.star'}: data_optics lacks _rlnImagePixelSize")
        if len(source) == 0:
            raise InputError(f"{source.folder / 'particles.star'}: no particles")
        spatial = _check_shards(source, *source.shard_rows)
        class_index = _class_index(source, class_names, require_known)
        rotation, shift = _true_poses(source)
        return cls(source, spatial, class_index, rotation, shift)

    def __len__(self) -> int:
        return len(self.class_index)

    @property
    def pixel_size_angstrom(self) -> float:
        return self.source.pixel_size_angstrom

    @property
    def has_poses(self) -> bool:
        return self.true_rotation is not None

    @property
    def pose_known(self) -> np.ndarray:
        """(n,) bool: whether each row has a true pose (all or none, for one split)."""
        return np.full(len(self), self.has_poses)

    @property
    def source_index(self) -> np.ndarray:
        """(n,) the part each row comes from: one split, one part (see :class:`CombinedData`)."""
        return np.zeros(len(self), dtype=np.int64)

    @property
    def has_frames(self) -> bool:
        return self.frame_rotation is not None

    def without_labels(self) -> "ParticleData":
        """The same particles unlabelled: class -1 and no true poses (what training may not see)."""
        return replace(self, class_index=np.full(len(self), -1, dtype=np.int64), true_rotation=None,
                       true_shift_voxels=None)

    def with_frames(self, match: str | Path) -> "ParticleData":
        """The same particles with their frames: each one's best-fit pose in ``match``, the
        template-matching output of this split (:func:`cryovae.match.best_fit_frames`)."""
        from cryovae.match import best_fit_frames

        ids = self.source.particles["cryovaeParticleId"].to_numpy()
        rotation, shift = best_fit_frames(Path(match), ids, self.pixel_size_angstrom)
        return replace(self, frame_rotation=rotation, frame_shift_voxels=shift)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Volumes at STAR rows ``indices``, (n, *spatial) float32 (see ``SubtomogramSet.volumes``)."""
        if not len(indices):
            return np.empty((0,) + self.spatial_shape, dtype=np.float32)
        return self.source.volumes(indices)

    def batches(self, batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Volumes of each index array in ``batches``, the next one read in a background thread."""
        return _read_ahead(self.read, batches)

    def tensor_batches(self, batches: list[np.ndarray], pin_memory: bool = False) -> Iterator[torch.Tensor]:
        """As :meth:`batches`, as CPU tensors; with ``pin_memory`` in page-locked memory (copied
        there in the background thread too), which a GPU copies from asynchronously."""
        def read(indices: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(self.read(indices))
            return tensor.pin_memory() if pin_memory else tensor

        return _read_ahead(read, batches)


@dataclass
class CombinedData:
    """Several splits trained on as one (a labelled split and unlabelled ones): ParticleData's
    interface, rows in the order of ``parts``.

    source_index (n,) says which part each row comes from (its own missing wedge, for one);
    pose_known (n,) whether the row has a true pose: rows without one get the identity and no
    shift in true_rotation / true_shift_voxels, which the pose loss leaves out.
    """

    parts: list[ParticleData]

    def __post_init__(self) -> None:
        first = self.parts[0]
        for part in self.parts[1:]:
            if part.spatial_shape != first.spatial_shape:
                raise InputError(f"{part.source.folder}: particle shape {part.spatial_shape} differs from "
                                 f"{first.source.folder}'s {first.spatial_shape}")
        sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.spatial_shape = first.spatial_shape
        self.source_index = np.repeat(np.arange(len(self.parts)), sizes)
        self.class_index = np.concatenate([p.class_index for p in self.parts])
        self.pose_known = np.concatenate([np.full(len(p), p.has_poses) for p in self.parts])
        if self.has_poses:
            eye, zero = np.eye(3, dtype=np.float32), np.zeros(3, dtype=np.float32)
            self.true_rotation = np.concatenate([p.true_rotation if p.has_poses else np.tile(eye, (len(p), 1, 1))
                                                 for p in self.parts])
            self.true_shift_voxels = np.concatenate([p.true_shift_voxels if p.has_poses
                                                     else np.tile(zero, (len(p), 1)) for p in self.parts])
        else:
            self.true_rotation = self.true_shift_voxels = None
        self.frame_rotation = self.frame_shift_voxels = None
        if any(p.has_frames for p in self.parts):
            lacking = [str(p.source.folder) for p in self.parts if not p.has_frames]
            if lacking:
                raise InputError(f"{', '.join(lacking)}: no matched frames given (every split trained on needs its "
                                 "template-matching output when training.shape_frame is matched)")
            self.frame_rotation = np.concatenate([p.frame_rotation for p in self.parts])
            self.frame_shift_voxels = np.concatenate([p.frame_shift_voxels for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    has_frames = ParticleData.has_frames

    @property
    def pixel_size_angstrom(self) -> float:
        return self.parts[0].pixel_size_angstrom

    @property
    def has_poses(self) -> bool:
        return any(p.has_poses for p in self.parts)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Volumes at rows ``indices`` (any order, any parts), (n, *spatial) float32."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices),) + self.spatial_shape, dtype=np.float32)
        which = self.source_index[indices]
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k].read(indices[sel] - self.offsets[k])
        return out

    batches = ParticleData.batches
    tensor_batches = ParticleData.tensor_batches


def _read_ahead(read: Callable[[np.ndarray], T], batches: list[np.ndarray]) -> Iterator[T]:
    """``read(b)`` for each b in ``batches``, in order, the next one computed in a background thread."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for nxt in batches[1:]:
            current = pending.result()
            pending = pool.submit(read, nxt)
            yield current
        yield pending.result()


def _check_shards(source: SubtomogramSet, shard_names: np.ndarray, rows: np.ndarray) -> tuple[int, ...]:
    """Every named shard exists, has one spatial shape, and holds the rows the STAR names."""
    spatial = None
    for name in pd.unique(shard_names):
        arr = source.shard(str(name))
        if arr.ndim not in (3, 4):
            raise InputError(f"{source.folder / name}: expected (n, H, W) or (n, D, H, W), got shape {arr.shape}")
        if spatial is None:
            spatial = tuple(int(s) for s in arr.shape[1:])
        elif tuple(arr.shape[1:]) != spatial:
            raise InputError(f"{source.folder / name}: particle shape {arr.shape[1:]} differs from {spatial}")
        mine = rows[shard_names == name]
        if mine.min() < 0 or mine.max() >= arr.shape[0]:
            pid = source.particles["cryovaeParticleId"][(shard_names == name) & ((rows < 0) | (rows >= arr.shape[0]))]
            raise InputError(
                f"{source.folder / 'particles.star'}: particle {pid.iloc[0]!r}: index outside {name} "
                f"({arr.shape[0]} particles)"
            )
    return spatial


def _class_index(source: SubtomogramSet, class_names: list[str], require_known: bool) -> np.ndarray:
    """Row of each particle's cryovaeClassName in ``class_names``; -1 for unknown ones."""
    lookup = {name: i for i, name in enumerate(class_names)}
    names = source.particles["cryovaeClassName"].astype(str).to_numpy()
    index = np.array([lookup.get(n, -1) for n in names], dtype=np.int64)
    stray = (index < 0) & (names != UNKNOWN)
    if require_known and stray.any():
        first = int(np.nonzero(stray)[0][0])
        raise InputError(
            f"{source.folder / 'particles.star'}: particle {source.particles['cryovaeParticleId'].iloc[first]!r} "
            f"has class {names[first]!r}, which is not in the affinity matrix {class_names}"
        )
    return index


def _true_poses(source: SubtomogramSet) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(n, 3, 3) particle-from-reference and (n, 3) shifts in voxels from the STAR, or (None, None)."""
    if not source.has_poses():
        return None, None
    table = source.particles
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)
    origins = table[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(dtype=np.float64)
    if not (np.isfinite(angles).all() and np.isfinite(origins).all()):
        row = int(np.nonzero(~(np.isfinite(angles).all(1) & np.isfinite(origins).all(1)))[0][0])
        raise InputError(
            f"{source.folder / 'particles.star'}: particle {table['cryovaeParticleId'].iloc[row]!r}: "
            "angles or origins are not finite numbers"
        )
    rotation = relion_euler_to_matrix(angles).astype(np.float32)
    shift = (-origins / source.pixel_size_angstrom).astype(np.float32)
    return rotation, shift
