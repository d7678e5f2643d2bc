"""The subtomogram set on disk: shards a model streams, and one STAR file of ground truth.

A split folder (``{output_dir}/subtomograms/{split}/``) holds

- ``shard_{k:03d}.npy``: float32 array (float16 for simulated shards with
  ``simulation.storage_dtype: float16``; read back as float32) of shape (n_k, D, H, W) in
  (z, y, x) order, opened memory-mapped, never one file per particle;
- ``particles.star``: one row per particle, in shard order, with

  ============================  ==========================================================
  ``cryovaeParticleId``         unique id within the split (string)
  ``cryovaeShard``              shard file name (``shard_003.npy``)
  ``cryovaeIndex``              row within the shard
  ``cryovaeClassName``          class name, or ``unknown`` for extracted particles
  ``rlnClassNumber``            1-based index of the class in config order (0: unknown)
  ``rlnAngleRot/Tilt/Psi``      true pose, RELION convention (simulated data only)
  ``rlnOriginX/Y/ZAngst``       true shift, RELION convention (simulated data only)
  ``cryovaeSnr``                SNR the particle was simulated at (simulated data only)
  ``rlnTomoName``,              extracted data only: the tomogram and the picked position
  ``rlnCoordinateX/Y/Z``        in unbinned tomogram pixels
  ============================  ==========================================================

plus a ``data_optics`` block with ``rlnImagePixelSize`` and ``rlnImageSize``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryovae.errors import InputError

REQUIRED_COLUMNS = ("cryovaeParticleId", "cryovaeShard", "cryovaeIndex", "cryovaeClassName", "rlnClassNumber")
STRING_COLUMNS = ("cryovaeParticleId", "cryovaeClassName", "rlnTomoName", "rlnImageName")
POSE_COLUMNS = (
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst",
)


def read_particles_star(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a split's ``particles.star``: (particles, optics); errors name the file and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: particles STAR file does not exist")
    blocks = starfile.read(path, always_dict=True, parse_as_string=list(STRING_COLUMNS))
    if "particles" not in blocks:
        raise InputError(f"{path}: expected a data_particles block, found {sorted(blocks)}")
    particles = blocks["particles"]
    for col in REQUIRED_COLUMNS:
        if col not in particles.columns:
            raise InputError(f"{path}: missing column _{col} in data_particles")
    optics = blocks.get("optics", pd.DataFrame())
    return particles, optics


@dataclass
class SubtomogramSet:
    """A split on disk: ``len(s)`` particles, ``s.volumes(idx)`` -> (n, D, H, W) float32."""

    folder: Path
    particles: pd.DataFrame
    optics: pd.DataFrame
    _shards: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> "SubtomogramSet":
        folder = Path(folder)
        particles, optics = read_particles_star(folder / "particles.star")
        return cls(folder, particles.reset_index(drop=True), optics)

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def pixel_size_angstrom(self) -> float:
        return float(self.optics["rlnImagePixelSize"].iloc[0])

    def shard(self, name: str) -> np.ndarray:
        """The memory-mapped array of one shard."""
        if name not in self._shards:
            path = self.folder / name
            if not path.is_file():
                raise InputError(f"{path}: shard named in particles.star does not exist")
            try:
                self._shards[name] = np.load(path, mmap_mode="r")
            except (ValueError, EOFError, OSError) as err:
                raise InputError(
                    f"{path}: shard cannot be read (truncated or corrupt: {err or type(err).__name__}); "
                    f"delete it and rerun the workflow, which makes it again (a simulated shard is "
                    f"simulated again; an extracted one needs its extraction folder deleted)"
                ) from err
        return self._shards[name]

    @functools.cached_property
    def shard_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard file name, row within it) of every particle, in STAR order: (n,) str, (n,) int64."""
        table = self.particles
        return table["cryovaeShard"].astype(str).to_numpy(), table["cryovaeIndex"].to_numpy().astype(np.int64)

    def volumes(self, indices: np.ndarray) -> np.ndarray:
        """Particles at row ``indices`` of the STAR table, shape (n, D, H, W), float32.

        Read shard by shard, in row order within a shard (sequential memory-mapped reads).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            raise InputError(f"{self.folder}: no particles requested")
        names, rows = (column[indices] for column in self.shard_rows)
        out = None
        for name in pd.unique(names):
            where = np.nonzero(names == name)[0]
            order = where[np.argsort(rows[where], kind="stable")]
            block = self.shard(str(name))[rows[order]]
            if out is None:
                out = np.empty((len(indices),) + block.shape[1:], dtype=np.float32)
            out[order] = block
        return out

    def has_poses(self) -> bool:
        return all(c in self.particles.columns for c in POSE_COLUMNS)


def write_particles_star(particles: pd.DataFrame, optics: pd.DataFrame, path: str | Path) -> None:
    """Write a split's STAR (optics + particles blocks) atomically; same tables, same bytes."""
    from cryovae.star import write_star_blocks

    write_star_blocks({"optics": optics, "particles": particles}, path)


def gather_star(config, inputs: list[Path], output: Path) -> None:
    """Concatenate per-shard STAR files (in the order given) into one ``particles.star``.

    All inputs must share one optics block; particle ids must be unique.
    """
    tables, optics = [], None
    for path in sorted(inputs, key=lambda p: p.name):
        particles, opt = read_particles_star(path)
        if optics is None:
            optics = opt
        elif not opt.equals(optics):
            raise InputError(f"{path}: optics block differs from that of the other shards")
        tables.append(particles)
    merged = pd.concat(tables, ignore_index=True)
    dup = merged["cryovaeParticleId"].duplicated()
    if dup.any():
        raise InputError(f"{output}: duplicate particle id {merged['cryovaeParticleId'][dup].iloc[0]!r}")
    write_particles_star(merged, optics, output)
