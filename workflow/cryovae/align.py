"""Aligning the model's canonical frame to each class's reference map.

The model's poses are relative to its own canonical frame.  For every seen class the
canonical volume of the class-mean latent is decoded and a rotational search (a global
grid, then local grids of halving steps; the best translation of each rotation from an
FFT cross-correlation) finds the rotation ``R`` and offset ``t`` with
``reference(y) ≈ canonical(R^T (y - t))``.  ``classify.poses_in_reference_frame`` turns
model poses into poses relative to the map a user averages against.

A class's point group (``alignment.symmetry``) is given in RELION's standard orientation;
:func:`orient_symmetry` finds where its axes lie in the reference map, so that
symmetry-aware pose errors compare poses of the map a user actually has.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryovae.atomic import write_text_atomic
from cryovae.classify import load_latents
from cryovae.config import Config
from cryovae.errors import InputError
from cryovae.rotations import (
    local_grid, orient_symmetry, rotate_volumes_torch, so3_grid, standardise_volumes, symmetry_group_in_frame,
)

log = logging.getLogger(__name__)


def _standardise(volumes: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit norm per volume; (n, D, H, W)."""
    return standardise_volumes(volumes).reshape(volumes.shape)


def score_rotations(
    canonical: torch.Tensor, reference: torch.Tensor, rotations: np.ndarray, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Best correlation and offset for each rotation of ``canonical`` against ``reference``.

    canonical, reference: (D, H, W); rotations: (n, 3, 3).  Returns scores (n,) and the
    offsets (n, 3) in voxels, (x, y, z), that move the rotated canonical onto the reference.
    """
    ref_ft = torch.fft.rfftn(_standardise(reference[None])[0])
    shape = reference.shape
    scores, offsets = [], []
    for start in range(0, len(rotations), chunk):
        mats = torch.as_tensor(rotations[start : start + chunk], dtype=canonical.dtype)
        rotated = _standardise(rotate_volumes_torch(canonical.expand(len(mats), *shape), mats))
        cc = torch.fft.irfftn(ref_ft * torch.fft.rfftn(rotated, dim=(1, 2, 3)).conj(), s=shape, dim=(1, 2, 3))
        best, where = cc.reshape(len(mats), -1).max(1)
        zyx = np.stack(np.unravel_index(where.numpy(), shape), -1)
        zyx = np.where(zyx > np.array(shape) // 2, zyx - np.array(shape), zyx)  # wrap to signed shifts
        scores.append(best.numpy())
        offsets.append(zyx[:, ::-1].astype(np.float64))
    return np.concatenate(scores), np.concatenate(offsets)


def search_rotation(
    canonical: np.ndarray, reference: np.ndarray, coarse_step_deg: float, fine_steps: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Coarse-to-fine search: (rotation (3, 3), offset (3,) voxels (x, y, z), correlation)."""
    can = torch.as_tensor(np.ascontiguousarray(canonical), dtype=torch.float32)
    ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32)
    # the global search runs on 2x-binned volumes (8x fewer voxels); refinement at full size
    grid = so3_grid(coarse_step_deg)
    binned = [torch.nn.functional.avg_pool3d(v[None, None], 2)[0, 0] for v in (can, ref)]
    coarse, _ = score_rotations(*binned, grid) if min(can.shape) >= 24 else score_rotations(can, ref, grid)
    candidates = grid[np.argsort(coarse)[-4:]]
    scores, offsets = score_rotations(can, ref, candidates)
    best = int(scores.argmax())
    rotation, offset, score = candidates[best], offsets[best], float(scores[best])
    step = coarse_step_deg
    for _ in range(fine_steps):
        step /= 2
        grid = local_grid(rotation, step, 2)
        scores, offsets = score_rotations(can, ref, grid)
        best = int(scores.argmax())
        if scores[best] > score:
            rotation, offset, score = grid[best], offsets[best], float(scores[best])
    return rotation, offset, score


def symmetry_operators(frame: dict) -> np.ndarray:
    """A ``frames.json`` entry's point group in the reference map's frame: (G, 3, 3)."""
    return symmetry_group_in_frame(frame.get("symmetry", "C1"), frame.get("symmetry_axes", np.eye(3)))


def _class_means(latents: dict[str, np.ndarray], classes: list[str], path: Path) -> np.ndarray:
    names = latents["class_name"].astype(str)
    missing = [c for c in classes if not (names == c).any()]
    if missing:
        raise InputError(f"{path}: no particles of classes {missing} to align")
    return np.stack([latents["latent_mean"][names == c].mean(0) for c in classes])


def align_frames(config: Config, model: Path, latents: Path, maps: list[Path], output: Path) -> None:
    """Write ``frames.json``: per seen class the canonical-to-reference rotation, offset, and the
    assumed point group with its axes in the reference map (``symmetry_axes``: the O of
    :func:`orient_symmetry`)."""
    from cryovae.model import load_model

    classes = config.seen_classes
    by_name = {Path(p).stem: Path(p) for p in maps}
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise InputError(f"no reference map given for classes {missing}")
    net, _ = load_model(model, device="cpu")
    means = torch.as_tensor(_class_means(load_latents(latents), classes, latents), dtype=torch.float32)
    with torch.no_grad():
        canonical = net.decode_canonical(means)[:, 0].float().numpy()
    frames = {}
    for name, volume in zip(classes, canonical):
        reference = mrcfile.read(by_name[name]).astype(np.float32)
        if reference.shape != volume.shape:
            raise InputError(f"{by_name[name]}: map shape {reference.shape}, model box {volume.shape}")
        rotation, offset, score = search_rotation(
            volume, reference, config.alignment.coarse_step_deg, config.alignment.fine_steps
        )
        group = config.alignment.symmetry.get(name, "C1")
        axes, self_cc = orient_symmetry(reference, group)
        frames[name] = {
            "rotation_canonical_to_reference": np.round(rotation, 8).tolist(),
            "translation_angstrom": np.round(offset * config.pixel_size_angstrom, 6).tolist(),
            "symmetry": group,
            "symmetry_axes": np.round(axes, 8).tolist(),
            "symmetry_correlation": round(self_cc, 6),
            "correlation": round(score, 6),
        }
        log.info("align %s: correlation %.3f, symmetry %s (map self-correlation under it %.3f)",
                 name, score, group, self_cc)
        if self_cc < 0.8:
            log.warning("align %s: the map correlates only %.3f with itself under %s; is the symmetry right?",
                        name, self_cc, group)
    write_text_atomic(output, json.dumps(frames, indent=2, sort_keys=True) + "\n")
