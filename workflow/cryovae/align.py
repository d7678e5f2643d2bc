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
    axis_angle_matrix, local_deltas, refine_rotations, so3_grid, symmetry_group, symmetry_group_in_frame,
)
from cryovae.volumes import (
    correlation_peak, cross_correlation, fourier_resample, rigid_transform, standardise_volumes,
)

log = logging.getLogger(__name__)


def _standardise(volumes: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit norm per volume; (n, D, H, W)."""
    return standardise_volumes(volumes).reshape(volumes.shape)


def _rotated(volume: torch.Tensor, rotations: np.ndarray) -> torch.Tensor:
    """(D, H, W) and (n, 3, 3) -> the n rotated copies (n, D, H, W) (:func:`cryovae.volumes.rigid_transform`)."""
    mats = torch.as_tensor(rotations, dtype=volume.dtype)
    return rigid_transform(volume.expand(len(mats), *volume.shape), mats)


def score_rotations(
    canonical: torch.Tensor, reference: torch.Tensor, rotations: np.ndarray, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Best correlation and offset for each rotation of ``canonical`` against ``reference``.

    canonical, reference: (D, H, W); rotations: (n, 3, 3).  Returns scores (n,) and the
    offsets (n, 3) in voxels, (x, y, z), sub-voxel, that move the rotated canonical onto the reference.
    """
    ref_ft = torch.fft.rfftn(_standardise(reference[None])[0])
    shape = reference.shape
    scores, offsets = [], []
    for start in range(0, len(rotations), chunk):
        rotated = _standardise(_rotated(canonical, rotations[start : start + chunk]))
        cc = cross_correlation(ref_ft, torch.fft.rfftn(rotated, dim=(1, 2, 3)), shape)
        offset, best = correlation_peak(cc)
        scores.append(best.numpy())
        offsets.append(offset.numpy().astype(np.float64))
    return np.concatenate(scores), np.concatenate(offsets)


def search_rotation(
    canonical: np.ndarray, reference: np.ndarray, coarse_step_deg: float, fine_steps: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Coarse-to-fine search: (rotation (3, 3), offset (3,) voxels (x, y, z), correlation).

    A global grid of ``coarse_step_deg`` (on 2x-binned volumes from 24 voxels up), its 4 best
    rescored at full size, then ``fine_steps`` local grids of halving steps
    (:func:`cryovae.rotations.refine_rotations`).
    """
    can = torch.as_tensor(np.ascontiguousarray(canonical), dtype=torch.float32)
    ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32)
    # the global search runs on 2x-binned volumes (8x fewer voxels); refinement at full size
    grid = so3_grid(coarse_step_deg)
    binned = [torch.nn.functional.avg_pool3d(v[None, None], 2)[0, 0] for v in (can, ref)]
    coarse, _ = score_rotations(*binned, grid) if min(can.shape) >= 24 else score_rotations(can, ref, grid)
    candidates = grid[np.argsort(coarse)[-4:]]
    scores, _ = score_rotations(can, ref, candidates)
    deltas = local_deltas(coarse_step_deg / 2.0 ** np.arange(1, fine_steps + 1), 2)
    rotation = refine_rotations(
        lambda rots, k: score_rotations(can, ref, rots[0] @ deltas[k])[0][None], candidates[[scores.argmax()]], deltas
    )[0]
    scores, offsets = score_rotations(can, ref, rotation[None])
    return rotation, offsets[0], float(scores[0])


def search_rotation_2d(canonical: np.ndarray, reference: np.ndarray, step_deg: float = 1.0,
                       fine_step_deg: float = 0.1) -> tuple[np.ndarray, np.ndarray, float]:
    """In-plane search of a 2D image against a reference: (rotation (3, 3) about z, offset (3,)
    pixels (x, y, 0), correlation), with ``reference(y) ≈ canonical(R^T (y - t))``.

    Every angle of a ``step_deg`` grid over the circle, then a ``fine_step_deg`` grid within ± one
    step of the best; each angle's best offset from a circular FFT cross-correlation (whole pixels).
    """
    can = torch.as_tensor(np.ascontiguousarray(canonical), dtype=torch.float32)
    ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32)
    ref_ft = torch.fft.rfft2(standardise_volumes(ref[None]).reshape(ref.shape))

    def scores(angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = torch.as_tensor(np.radians(angles_deg), dtype=torch.float32)
        c, s_ = torch.cos(theta), torch.sin(theta)
        mats = torch.stack([torch.stack([c, -s_], -1), torch.stack([s_, c], -1)], -2)
        turned = standardise_volumes(rigid_transform(can.expand(len(mats), *can.shape), mats))
        cc = torch.fft.irfft2(ref_ft * torch.fft.rfft2(turned.reshape(-1, *can.shape)).conj(), s=can.shape)
        best, flat = cc.reshape(len(mats), -1).max(1)
        yx = np.stack(np.unravel_index(flat.numpy(), can.shape), 1)
        yx = (yx + np.array(can.shape) // 2) % np.array(can.shape) - np.array(can.shape) // 2   # signed
        return best.numpy(), yx[:, ::-1].astype(np.float64)

    coarse = np.arange(0.0, 360.0, step_deg)
    first, _ = scores(coarse)
    fine = coarse[first.argmax()] + np.arange(-step_deg, step_deg + fine_step_deg / 2, fine_step_deg)
    best, offsets = scores(fine)
    k = int(best.argmax())
    theta = np.radians(fine[k])
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    return rotation, np.array([offsets[k, 0], offsets[k, 1], 0.0]), float(best[k])


def _principal_frames(reference: np.ndarray, step_deg: float = 5.0) -> np.ndarray:
    """Frames whose z is a principal axis of the map's positive density, spun about z: (3 * 360/step, 3, 3).

    A symmetry axis of a map is a principal axis of its inertia, so these frames contain
    the orientation of any Cn or Dn group up to the grid step.
    """
    density = np.clip(reference - reference.mean(), 0.0, None).astype(np.float64)
    zyx = np.indices(reference.shape).reshape(3, -1).T - np.array(reference.shape) // 2
    xyz, weight = zyx[:, ::-1].astype(np.float64), density.reshape(-1)
    xyz = xyz - (xyz * weight[:, None]).sum(0) / weight.sum()
    _, axes = np.linalg.eigh((xyz * weight[:, None]).T @ xyz)
    frames = []
    for i in range(3):
        z, x = axes[:, i], axes[:, (i + 1) % 3]
        base = np.stack([x, np.cross(z, x), z], 1)
        frames += [base @ axis_angle_matrix(np.array([0.0, 0.0, 1.0]), a) for a in np.radians(np.arange(0, 360, step_deg))]
    return np.array(frames)


def orient_symmetry(reference: np.ndarray, group: str) -> tuple[np.ndarray, float]:
    """Where a point group sits in a map: (O (3, 3), mean self-correlation under the group).

    ``rotations.symmetry_group`` gives the group in RELION's standard orientation (main axis
    z); in the map it is ``O G O^T``.  O maximises the correlation of the map with itself
    rotated by each non-identity element: principal-axis frames and a 20 deg grid (on the map
    Fourier-cropped to half its box when the box is at least 24: the grid's frames are 20 deg
    apart, far coarser than the cropped map's detail), then local grids of 5, 2.5 and 1.25 deg
    at full size (:func:`cryovae.rotations.refine_rotations`).
    """
    ops = torch.as_tensor(symmetry_group(group)[1:], dtype=torch.float32)
    if not len(ops):
        return np.eye(3), 1.0
    ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32)
    box = ref.shape[0]
    cubic = ref.ndim == 3 and all(size == box for size in ref.shape) and box >= 24
    coarse = fourier_resample(ref, box // 2 + (box // 2) % 2) if cubic else ref

    def score(volume: torch.Tensor, frames: np.ndarray) -> np.ndarray:
        target, out = standardise_volumes(volume[None])[0], []
        for start in range(0, len(frames), 128):
            f = torch.as_tensor(frames[start : start + 128], dtype=torch.float32)
            mats = (f[:, None] @ ops[None] @ f[:, None].transpose(-1, -2)).reshape(-1, 3, 3)
            rotated = standardise_volumes(_rotated(volume, mats.numpy()))
            out.append((rotated @ target).reshape(len(f), len(ops)).mean(1))
        return torch.cat(out).numpy()

    frames = np.concatenate([_principal_frames(reference), so3_grid(20.0)])
    deltas = local_deltas((5.0, 2.5, 1.25), 1)
    start = frames[[score(coarse, frames).argmax()]]
    best = refine_rotations(lambda rots, k: score(ref, rots[0] @ deltas[k])[None], start, deltas)
    return best[0], float(score(ref, best)[0])


def symmetry_operators(frame: dict) -> np.ndarray:
    """A ``frames.json`` entry's point group in the reference map's frame: (G, 3, 3)."""
    return symmetry_group_in_frame(frame.get("symmetry", "C1"), frame.get("symmetry_axes", np.eye(3)))


def _class_means(latents: dict[str, np.ndarray], classes: list[str], path: Path) -> np.ndarray:
    names = latents["class_name"].astype(str)
    missing = [c for c in classes if not (names == c).any()]
    if missing:
        raise InputError(f"{path}: no particles of classes {missing} to align")
    return np.stack([latents["latent_mean"][names == c].mean(0) for c in classes])


def class_averages_2d(latents: dict[str, np.ndarray], split_dir: Path, classes: list[str],
                      pixel_size_angstrom: float) -> np.ndarray:
    """Each class's images brought into the model's canonical frame by their own predicted poses
    and averaged: (k, H, W).  For images this is sharper than the decoded class mean (the
    average of many consistent poses, as a class average is), so the frame is found from it."""
    from cryovae.model.data import ParticleData

    data = ParticleData.open(split_dir, classes, require_known=False)
    if not np.array_equal(data.source.particles["cryovaeParticleId"].astype(str).to_numpy(),
                          latents["particle_id"].astype(str)):
        raise InputError(f"{split_dir}: particles differ from the latent file's (embed the same split)")
    names = latents["class_name"].astype(str)
    rotation = torch.as_tensor(latents["rotation"][:, :2, :2], dtype=torch.float32)
    shift = torch.as_tensor(-latents["origin_angstrom"][:, :2] / pixel_size_angstrom, dtype=torch.float32)
    back_rotation = rotation.transpose(1, 2)   # canonical = T(R^T, -R^T d)(image)
    back_shift = -(back_rotation @ shift[:, :, None])[..., 0]
    out = []
    for name in classes:
        rows = np.nonzero(names == name)[0]
        images = torch.as_tensor(data.read(rows), dtype=torch.float32)
        out.append(rigid_transform(images, back_rotation[rows], back_shift[rows]).mean(0).numpy())
    return np.stack(out)


def align_frames(config: Config, model: Path, latents: Path, maps: list[Path], output: Path,
                 split_dir: Path | None = None) -> None:
    """Write ``frames.json``: per seen class the canonical-to-reference rotation, offset, and the
    assumed point group with its axes in the reference map (``symmetry_axes``: the O of
    :func:`orient_symmetry`).  A 2D model's frame is found from the class averages of the images
    in ``split_dir`` (the split ``latents`` encodes; see :func:`class_averages_2d`)."""
    from cryovae.model import load_model

    classes = config.seen_classes
    by_name = {Path(p).stem: Path(p) for p in maps}
    net, _ = load_model(model, device="cpu")
    if len(net.spatial_shape) == 2 and not maps:
        log.warning("align: no reference images (the user's own images): poses stay in the model's frame")
        frames = {name: {"rotation_canonical_to_reference": np.eye(3).tolist(), "translation_angstrom": [0.0] * 3,
                         "symmetry": "C1", "symmetry_axes": np.eye(3).tolist(), "correlation": None}
                  for name in classes}
        write_text_atomic(output, json.dumps(frames, indent=2, sort_keys=True) + "\n")
        return
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise InputError(f"no reference map given for classes {missing}")
    encoded = load_latents(latents)
    means = torch.as_tensor(_class_means(encoded, classes, latents), dtype=torch.float32)
    if len(net.spatial_shape) == 2:
        if split_dir is None:
            raise InputError("align: a 2D model's frame comes from the class averages of its training images; "
                             "give --split-dir (the split the latents encode)")
        canonical = class_averages_2d(encoded, Path(split_dir), classes, net.pixel_size_angstrom)
    else:
        with torch.no_grad():
            canonical = net.decode_canonical(means, net.class_condition(classes))[:, 0].float().numpy()
    frames = {}
    for name, volume in zip(classes, canonical):
        reference = mrcfile.read(by_name[name]).astype(np.float32)
        if reference.shape != volume.shape:
            raise InputError(f"{by_name[name]}: map shape {reference.shape}, model box {volume.shape}")
        if volume.ndim == 2:   # an image: in-plane search; of the point groups only Cn (about z) is in-plane
            rotation, offset, score = search_rotation_2d(volume, reference)
            group, axes, self_cc = config.alignment.symmetry.get(name, "C1"), np.eye(3), 1.0
            if not group.startswith("C"):
                raise InputError(f"alignment.symmetry: {name} is {group}; an image's symmetry is an in-plane "
                                 "rotation group Cn")
        else:
            rotation, offset, score = search_rotation(
                volume, reference, config.alignment.coarse_step_deg, config.alignment.fine_steps
            )
            group = config.alignment.symmetry.get(name, "C1")
            axes, self_cc = orient_symmetry(reference, group)
        frames[name] = {
            "rotation_canonical_to_reference": np.round(rotation, 8).tolist(),
            "translation_angstrom": np.round(offset * net.pixel_size_angstrom, 6).tolist(),
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


def point_group_in_map(config: Config, cls: str, reference: np.ndarray) -> np.ndarray:
    """The class's point group (``alignment.symmetry``) in its map's frame, the axes located in
    ``reference`` by :func:`orient_symmetry`: (G, 3, 3), the identity alone for C1."""
    name = config.alignment.symmetry.get(cls, "C1")
    if name.upper() == "C1":
        return np.eye(3)[None]
    axes, _ = orient_symmetry(reference, name)
    return symmetry_group_in_frame(name, axes)
