"""Training the affinity-VAE: reproducible, checkpointed, resumable after a kill.

``train`` reads a training and a validation split (shards + particles.star) and the
affinity matrix, and writes into ``output_dir``:

- ``model.pt``: the final model (see :mod:`cryovae.model.io`), written once at the end;
- ``history.csv``: one row per epoch (losses and their components on train and val, beta,
  gamma, learning rate; ``seconds`` and ``samples_per_s``: wall time and rate of the
  training pass alone; ``cpu_seconds``: its process CPU time, all threads, which on a shared
  machine says what the wall time cannot; ``validation_seconds``: the validation pass);
- ``loss_curves.png``.

While it runs, ``checkpoint.pt`` (model, optimiser, scheduler, RNG states, position,
history) is written every ``training.checkpoint_every`` epochs and when the process gets
SIGTERM or SIGUSR1 (SLURM's warning before a time limit or preemption): the handler only
sets a flag, the loop writes the checkpoint at the next batch boundary and exits with
status 128 + signal number.  A rerun resumes from it and ends, on the CPU, with weights
bitwise identical to an uninterrupted run's.  ``checkpoint.pt`` is deleted once
``model.pt`` is written.

Reproducibility: the model is initialised from ``torch.manual_seed(seed)``; the epoch's
shuffle comes from ``numpy.random.default_rng([seed, epoch])``; the latent sampling noise
from a CPU ``torch.Generator`` seeded with ``seed`` whose state is checkpointed.

Devices (``training.device``): ``auto`` takes CUDA when present; ``cuda`` without one is an
:class:`InputError`.  On CUDA the layers compute in bf16 under autocast (parameters, optimiser
state and losses stay float32), batches are read into pinned memory in the background and
copied asynchronously, and cuDNN picks its fastest kernels; bitwise reproducibility is a
property of CPU runs only.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryovae.affinity import read_affinity_csv
from cryovae.align import orient_symmetry
from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.devices import choose_device
from cryovae.errors import InputError
from cryovae.model.checkpoint import (
    Running, StopRequest, TrainState, load_checkpoint, save_checkpoint, stop_on_signals,
)
from cryovae.acquisition import split_tilt_range_deg
from cryovae.model.data import CombinedData, ParticleData
from cryovae.model.encoder import rotation_3x3
from cryovae.model.io import save_model
from cryovae.model.losses import CLASSIFIER_COMPONENTS, COMPONENTS, affinity_loss, kl_divergence, pose_loss, reconstruction_error, wedge_mask
from cryovae.model.semisup import class_weights, semisupervised_terms
from cryovae.model.vae import AffinityVAE
from cryovae.rotations import symmetry_group_in_frame
from cryovae.schedules import schedule_value
from cryovae.volumes import rigid_transform


def hidden_units(channels: list[int]) -> int:
    """Width of the fully connected layers: 8 x the last encoder stage's channels (512 for [16, 32, 64])."""
    return max(32, 8 * channels[-1])

CHECKPOINT = "checkpoint.pt"
TIMING_COLUMNS = ("seconds", "samples_per_s", "cpu_seconds", "validation_seconds")   # of history.csv: vary run to run

BatchHook = Callable[[int, int], None]


# ----------------------------------------------------------------------------- devices, determinism


def mixed_precision(device: torch.device) -> torch.dtype:
    """The compute dtype of the model's layers on ``device``: bf16 on CUDA (float32's exponent
    range, so no gradient scaling is needed), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to ``dtype`` (default: :func:`mixed_precision` of ``device``); nothing for float32.
    Parameters, gradients and the loss stay float32."""
    dtype = mixed_precision(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def device_settings(device: torch.device) -> Iterator[None]:
    """For the duration: on the CPU deterministic kernels (a resumed run is bitwise identical),
    without filling new tensors with NaN, which only unmasks reads of uninitialised memory and
    costs a pass over every allocation; on CUDA the fastest kernels (cuDNN autotuning, TF32
    matmuls), since atomics in grid_sample's backward make CUDA runs non-bitwise anyway."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                det.fill_uninitialized_memory, torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    else:
        torch.use_deterministic_algorithms(True)
        det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        det.fill_uninitialized_memory = previous[2]
        torch.backends.cudnn.benchmark = previous[3]
        torch.set_float32_matmul_precision(previous[4])


# ----------------------------------------------------------------------------- losses on a batch


@dataclass
class LossSetup:
    """What the loss needs besides the batch (tensors on the training device)."""

    affinity: torch.Tensor                 # (C, C)
    affinity_kind: str
    fourier_mask: torch.Tensor | None      # (D, H, W//2+1) bool, or None
    symmetry_ops: torch.Tensor | None      # (C, G, 3, 3) identity-padded, or None (all C1)
    pose_weight: float
    beta: float = 1.0
    gamma: float = 1.0
    compute_dtype: torch.dtype | None = None   # autocast dtype; None: the device's (see mixed_precision)
    classifier: "ClassifierSetup | None" = None   # a model with classes (ss-rVAE)


@dataclass
class ClassifierSetup:
    """The semi-supervised terms' settings (see :mod:`cryovae.model.semisup`)."""

    class_names: list[str]          # the classifier's classes: the labelled training split's, affinity order
    label_of_row: torch.Tensor      # (C_affinity,) int64: classifier index of each affinity row, -1 if none
    weights: torch.Tensor           # (n_classes,) cross-entropy weights
    weight: float                   # alpha
    top_k: int
    augment_rotation_deg: float = 0.0
    augment_shift_px: float = 0.0


class MatchFiles(NamedTuple):
    """The template-matching outputs of the splits trained on (training.shape_frame: matched)."""

    train: Path | None = None
    val: Path | None = None
    unlabelled: list[Path] | None = None


@dataclass
class Batch:
    """One batch on the device: volumes (n, 1, *spatial); class rows (n,); true poses or None."""

    volumes: torch.Tensor
    class_index: torch.Tensor
    true_rotation: torch.Tensor | None
    true_shift_voxels: torch.Tensor | None
    pose_known: torch.Tensor | None = None     # (n,) bool: rows with a true pose (None: all of them)
    source_index: torch.Tensor | None = None   # (n,) part of CombinedData each row is from (its wedge)
    frame_rotation: torch.Tensor | None = None      # (n, 3, 3): the pose a matched model reads each row in
    frame_shift_voxels: torch.Tensor | None = None  # (n, 3)

    @property
    def frame(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.frame_rotation is None else (self.frame_rotation, self.frame_shift_voxels)


def row_masks(setup: LossSetup, batch: Batch) -> torch.Tensor | None:
    """The Fourier mask of the loss: one (D, H, W') for all rows, or each row's ((n, D, H, W'))
    when the parts of the data have masks of their own ((K, D, H, W') stacked)."""
    mask = setup.fourier_mask
    if mask is None or mask.dim() == 3:
        return mask
    if mask.shape[0] == 1:
        return mask[0]
    return mask[batch.source_index]


def batch_losses(model: AffinityVAE, batch: Batch, setup: LossSetup, sample: bool,
                 generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Loss components and ``total`` (scalars, float32) of one batch."""
    mask = row_masks(setup, batch)
    zero = torch.zeros((), device=batch.volumes.device)
    with autocast(batch.volumes.device, setup.compute_dtype):
        if setup.classifier is None:
            out = model(batch.volumes, generator=generator, sample=sample, frame=batch.frame)
            terms = {"recon": reconstruction_error(out["reconstruction"], batch.volumes, mask).mean(),
                     "classifier": zero, "class_kl": zero}
        else:
            labels = setup.classifier.label_of_row[batch.class_index.clamp(min=0)]
            labels = torch.where(batch.class_index >= 0, labels, -1)
            out, terms = semisupervised_terms(model, batch.volumes, labels, mask, setup.classifier.weights,
                                              setup.classifier.top_k, generator, sample, batch.frame)
    losses = {
        "recon": terms["recon"],
        "kl": kl_divergence(out["latent_mean"].float(), out["latent_logvar"].float()),
        "affinity": affinity_loss(out["latent_mean"].float(), batch.class_index, setup.affinity, setup.affinity_kind),
        "pose": _pose_term(out, batch, setup) if setup.pose_weight > 0 and batch.true_rotation is not None else zero,
        "classifier": terms["classifier"],
        "class_kl": terms["class_kl"],
    }
    alpha = 0.0 if setup.classifier is None else setup.classifier.weight
    losses["total"] = (losses["recon"] + setup.beta * (losses["kl"] + losses["class_kl"])
                       + setup.gamma * losses["affinity"] + setup.pose_weight * losses["pose"]
                       + alpha * losses["classifier"])
    return losses


def _pose_term(out: dict, batch: Batch, setup: LossSetup) -> torch.Tensor:
    """The supervised pose loss over the rows with a true pose (zero when none has one)."""
    rows = slice(None) if batch.pose_known is None else batch.pose_known
    if batch.pose_known is not None and not bool(batch.pose_known.any()):
        return torch.zeros((), device=batch.volumes.device)
    ndim = out["shift_voxels"].shape[1]
    ops = None if setup.symmetry_ops is None else setup.symmetry_ops[batch.class_index[rows].clamp(min=0)]
    return pose_loss(rotation_3x3(out["rotation"][rows].float()), out["shift_voxels"][rows].float(),
                     batch.true_rotation[rows], batch.true_shift_voxels[rows][:, :ndim], ops)


def make_batch(data: ParticleData, indices: np.ndarray, volumes: np.ndarray | torch.Tensor,
               device: torch.device) -> Batch:
    """Move a batch to ``device``; volumes get a channel axis.  To CUDA every part goes through
    pinned memory and is copied asynchronously (a copy from pageable memory waits for the GPU)."""
    cuda = device.type == "cuda"

    def move(array):
        tensor = torch.as_tensor(array)
        if cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=cuda)

    rot = shift = known = frame_rot = frame_shift = None
    if data.has_poses:
        rot, shift = move(data.true_rotation[indices]), move(data.true_shift_voxels[indices])
        known = data.pose_known[indices]
        known = None if known.all() else move(known)
    if data.has_frames:
        frame_rot, frame_shift = move(data.frame_rotation[indices]), move(data.frame_shift_voxels[indices])
    return Batch(move(volumes).unsqueeze(1), move(data.class_index[indices]), rot, shift, known,
                 move(data.source_index[indices]), frame_rot, frame_shift)


def augment_batch(batch: Batch, rotation_deg: float, shift_px: float, generator: torch.Generator) -> Batch:
    """2D images turned in-plane by uniform random angles in ±``rotation_deg`` and shifted by up
    to ``shift_px`` per axis (draws from ``generator``, a CPU generator); true poses move along
    (R <- A R, t <- A t + s: the image is the canonical one in pose (A R, A t + s))."""
    n = batch.volumes.shape[0]
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(rotation_deg)
    shift = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * shift_px
    c, s_ = torch.cos(angle), torch.sin(angle)
    turn = torch.stack([torch.stack([c, -s_], -1), torch.stack([s_, c], -1)], -2).float().to(batch.volumes.device)
    shift = shift.float().to(batch.volumes.device)
    volumes = rigid_transform(batch.volumes, turn, shift)
    rot, moved = batch.true_rotation, batch.true_shift_voxels
    if rot is not None:
        rot = rot.clone()
        rot[:, :2, :2] = turn @ rot[:, :2, :2]
        moved = moved.clone()
        moved[:, :2] = (turn @ moved[:, :2, None])[..., 0] + shift
    return Batch(volumes, batch.class_index, rot, moved, batch.pose_known, batch.source_index)


def loss_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss components as Python floats, in one device synchronisation."""
    keys = list(losses)
    return dict(zip(keys, torch.stack([losses[k].detach().float() for k in keys]).tolist()))


def symmetry_table(
    class_names: list[str], symmetry: dict[str, str], maps: list[Path] | None = None
) -> torch.Tensor | None:
    """(C, G, 3, 3) point group of each class, in its reference map's frame, padded with
    identities; None when all are C1.  A symmetric class needs its map (``{class}.mrc`` in
    ``maps``): the group's axes are located in it (:func:`cryovae.align.orient_symmetry`).
    """
    by_name = {Path(p).stem: Path(p) for p in maps or []}
    groups = []
    for name in class_names:
        group = symmetry.get(name, "C1")
        if group == "C1":
            groups.append(np.eye(3)[None])
            continue
        if name not in by_name:
            raise InputError(f"class {name} is {group}: its reference map is needed to locate the symmetry axes")
        reference = mrcfile.read(by_name[name]).astype(np.float32)
        # an image's group turns about z, the axis normal to it; a map's axes are located in it
        axes = np.eye(3) if reference.ndim == 2 else orient_symmetry(reference, group)[0]
        groups.append(symmetry_group_in_frame(group, axes))
    size = max(len(g) for g in groups)
    if size == 1:
        return None
    table = np.tile(np.eye(3), (len(groups), size, 1, 1))
    for i, g in enumerate(groups):
        table[i, : len(g)] = g
    return torch.tensor(table, dtype=torch.float32)


# ----------------------------------------------------------------------------- epochs


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Index arrays of an epoch's batches (a seeded permutation); a last batch of one is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= 2]


def mixed_epoch_batches(class_index: np.ndarray, batch_size: int, labelled_fraction: float, seed: int,
                        epoch: int) -> list[np.ndarray]:
    """An epoch of batches that each hold ``labelled_fraction`` of labelled rows (class >= 0).

    The epoch is one pass over the larger of the two parts at its share of the batch; the other
    part is cycled through seeded permutations, so a few labelled particles beside many unlabelled
    ones still weigh in every step (drawn at their share of the data, a batch would hold only a
    handful), and a few unlabelled ones beside many labelled do not shorten the epoch.  Without
    unlabelled rows it is :func:`epoch_batches`.
    """
    labelled, unlabelled = np.nonzero(class_index >= 0)[0], np.nonzero(class_index < 0)[0]
    if not len(unlabelled) or not len(labelled):
        return epoch_batches(len(class_index), batch_size, seed, epoch)
    rng = np.random.default_rng([seed, epoch, 1])
    n_lab = min(max(1, round(batch_size * labelled_fraction)), batch_size - 1)
    n_unl = batch_size - n_lab
    steps = max(-(-len(unlabelled) // n_unl), -(-len(labelled) // n_lab))

    def cycled(rows: np.ndarray, per_step: int) -> np.ndarray:
        return np.concatenate([rng.permutation(rows) for _ in range(-(-steps * per_step // len(rows)))])

    lab, unl = cycled(labelled, n_lab), cycled(unlabelled, n_unl)
    return [np.concatenate([lab[k * n_lab:(k + 1) * n_lab], unl[k * n_unl:(k + 1) * n_unl]]) for k in range(steps)]


@torch.no_grad()
def evaluate(model: AffinityVAE, data: ParticleData, setup: LossSetup, batch_size: int, device: torch.device) -> dict:
    """Mean loss components on a split with the latent means (no sampling)."""
    model.eval()
    running = Running()
    batches = epoch_batches(len(data), batch_size, 0, 0, shuffle=False)
    right = counted = 0
    for idx, vols in zip(batches, data.tensor_batches(batches, pin_memory=device.type == "cuda")):
        batch = make_batch(data, idx, vols, device)
        running.add(loss_values(batch_losses(model, batch, setup, False, None)), len(idx))
        if setup.classifier is not None:
            labels = setup.classifier.label_of_row[batch.class_index.clamp(min=0)]
            known = (batch.class_index >= 0) & (labels >= 0)
            with autocast(device, setup.compute_dtype):
                predicted = model.class_probabilities(batch.volumes, batch.frame).argmax(dim=1)
            right += int((predicted[known] == labels[known]).sum())
            counted += int(known.sum())
    means = running.means()
    if setup.classifier is not None:
        means["accuracy"] = right / max(counted, 1)
    return means


# ----------------------------------------------------------------------------- outputs


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def plot_history(path: Path, history: list[dict]) -> None:
    """loss_curves.png: total loss and each component, train and val, against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(history)
    keys = ("loss",) + tuple(k for k in COMPONENTS + CLASSIFIER_COMPONENTS if f"train_{k}" in table)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for split in ("train", "val"):
            ax.plot(table["epoch"], table[f"{split}_{key}"], marker=".", label=split)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """The pieces of one training run."""

    config: Config
    model: AffinityVAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    noise: torch.Generator
    device: torch.device
    train_data: ParticleData | CombinedData
    val_data: ParticleData
    setup: LossSetup
    checkpoint: Path
    fingerprint: dict


def _open_data(train_dir: Path, val_dir: Path, class_names: list[str]) -> tuple[ParticleData, ParticleData]:
    train_data = ParticleData.open(train_dir, class_names)
    val_data = ParticleData.open(val_dir, class_names)
    if val_data.spatial_shape != train_data.spatial_shape:
        raise InputError(f"{val_dir}: particle shape {val_data.spatial_shape} differs from the training "
                         f"split's {train_data.spatial_shape}")
    if not math.isclose(val_data.pixel_size_angstrom, train_data.pixel_size_angstrom, rel_tol=1e-4):
        raise InputError(f"{val_dir}: pixel size {val_data.pixel_size_angstrom} Å differs from the training "
                         f"split's {train_data.pixel_size_angstrom} Å")
    return train_data, val_data


def make_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.Adam:
    """Adam with its fused kernel: one pass over each parameter per step instead of one per
    operation (CPU and CUDA; elementwise, so as deterministic as the default)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)


def open_unlabelled(folders: list[Path], class_names: list[str], like: ParticleData) -> list[ParticleData]:
    """The unlabelled splits, stripped of any class and pose they carry, checked against ``like``."""
    parts = []
    for folder in folders:
        part = ParticleData.open(folder, class_names, require_known=False).without_labels()
        if not math.isclose(part.pixel_size_angstrom, like.pixel_size_angstrom, rel_tol=1e-4):
            raise InputError(f"{folder}: pixel size {part.pixel_size_angstrom} Å differs from the training "
                             f"split's {like.pixel_size_angstrom} Å")
        parts.append(part)
    return parts


def with_matched_frames(labelled: ParticleData, val: ParticleData, unlabelled: list[ParticleData],
                        train_match: Path | None, val_match: Path | None,
                        unlabelled_matches: list[Path] | None) -> tuple[ParticleData, ParticleData, list[ParticleData]]:
    """The splits with their matched frames (training.shape_frame: matched): each split's
    template-matching output gives every particle's best-fit pose."""
    unlabelled_matches = list(unlabelled_matches or [])
    if train_match is None or val_match is None or len(unlabelled_matches) != len(unlabelled):
        raise InputError("training.shape_frame is matched: give the template-matching output of the training and "
                         "validation splits (--train-match, --val-match) and of every unlabelled split "
                         f"(--unlabelled-matches: {len(unlabelled)} expected, {len(unlabelled_matches)} given)")
    return (labelled.with_frames(train_match), val.with_frames(val_match),
            [part.with_frames(m) for part, m in zip(unlabelled, unlabelled_matches)])


def loss_masks(config: Config, data: ParticleData | CombinedData) -> torch.Tensor | None:
    """The missing-wedge masks of the loss, one per part of ``data`` stacked (K, D, H, W'): the
    simulation's tilt range for simulated particles, each extracted split's own otherwise; None
    without wedge masking (2D, no tilt range, or training.wedge_masked_loss false)."""
    parts = data.parts if isinstance(data, CombinedData) else [data]
    if not config.training.wedge_masked_loss or len(data.spatial_shape) != 3:
        return None
    ranges = [split_tilt_range_deg(part.source.particles) or config.simulation.tilt_range_deg for part in parts]
    if any(r is None for r in ranges):
        return None
    return torch.stack([wedge_mask(data.spatial_shape, r) for r in ranges])


def classifier_setup(config: Config, class_names: list[str], train_data: ParticleData) -> ClassifierSetup | None:
    """The classifier's classes (those the labelled training split has, in affinity order) and its terms."""
    ss = config.training.semi_supervised
    if not ss.classifier:
        return None
    if len(train_data.spatial_shape) == 3 and (ss.augment_rotation_deg or ss.augment_shift_px):
        raise InputError("training.semi_supervised.augment_rotation_deg / augment_shift_px are for 2D images: "
                         "a rotated subtomogram would carry its missing wedge with it")
    present = sorted(set(train_data.class_index[train_data.class_index >= 0].tolist()))
    if len(present) < 2:
        raise InputError(f"{train_data.source.folder}: the classifier head needs labelled particles of at least "
                         f"two classes, found {[class_names[i] for i in present]}")
    label_of_row = np.full(len(class_names), -1, dtype=np.int64)
    label_of_row[present] = np.arange(len(present))
    labels = label_of_row[np.maximum(train_data.class_index, 0)]
    labels[train_data.class_index < 0] = -1
    return ClassifierSetup(class_names=[class_names[i] for i in present],
                           label_of_row=torch.tensor(label_of_row), weights=class_weights(labels, len(present)),
                           weight=ss.classifier_weight, top_k=ss.decoded_classes,
                           augment_rotation_deg=ss.augment_rotation_deg, augment_shift_px=ss.augment_shift_px)


def classifier_input(setting: str, spatial_shape: tuple[int, ...]) -> str:
    """training.semi_supervised.classifier_input resolved: auto is canonical for images, trunk for
    subtomograms (the network's own 3D poses are far off, about 100° median even on simulated
    particles, so particles put back by them are not upright)."""
    if setting != "auto":
        return setting
    return "canonical" if len(spatial_shape) == 2 else "trunk"


def _match_names(matches: MatchFiles | None) -> list[str]:
    matches = matches or MatchFiles()
    return [str(m) for m in (matches.train, matches.val, *(matches.unlabelled or []))]


def build_run(config: Config, train_dir: Path, val_dir: Path, affinity: Path, output_dir: Path,
              maps: list[Path] | None = None, unlabelled_dirs: list[Path] | None = None,
              matches: MatchFiles | None = None) -> Run:
    """Read the data and affinity, build model, optimiser and scheduler (seeded)."""
    tc = config.training
    device = choose_device(tc.device)
    class_names, matrix = read_affinity_csv(affinity)
    labelled, val_data = _open_data(Path(train_dir), Path(val_dir), class_names)
    unlabelled = open_unlabelled([Path(d) for d in unlabelled_dirs or []], class_names, labelled)
    if tc.shape_frame == "matched":
        labelled, val_data, unlabelled = with_matched_frames(labelled, val_data, unlabelled,
                                                             *(matches or MatchFiles()))
    train_data = CombinedData([labelled, *unlabelled]) if unlabelled else labelled
    spatial = train_data.spatial_shape
    classifier = classifier_setup(config, class_names, labelled)
    torch.manual_seed(config.seed)
    model = AffinityVAE(spatial, tc.channels, tc.latent_dims, tc.decoder, tc.n_splats, hidden_units(tc.channels),
                        train_data.pixel_size_angstrom,
                        n_classes=0 if classifier is None else len(classifier.class_names),
                        classifier_input=classifier_input(tc.semi_supervised.classifier_input, spatial),
                        shape_frame=tc.shape_frame).to(device)
    optimizer = make_optimizer(model, tc.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tc.epochs, eta_min=0.05 * tc.learning_rate)
    noise = torch.Generator().manual_seed(config.seed)
    masks = loss_masks(config, train_data)
    seen_symmetry = {c: g for c, g in config.alignment.symmetry.items() if c not in config.unseen}
    sym = symmetry_table(class_names, seen_symmetry, maps)
    if classifier is not None:
        classifier.label_of_row = classifier.label_of_row.to(device)
        model.classifier_class_names = list(classifier.class_names)
    setup = LossSetup(
        affinity=torch.tensor(matrix, dtype=torch.float32, device=device),
        affinity_kind=tc.affinity_loss,
        fourier_mask=None if masks is None else masks.to(device),
        symmetry_ops=None if sym is None else sym.to(device),
        pose_weight=tc.pose_weight,
        classifier=classifier,
    )
    fingerprint = {"config": config.model_dump(mode="json"), "n_train": len(train_data), "n_val": len(val_data),
                   "class_names": class_names, "spatial_shape": list(spatial),
                   "unlabelled": [str(d) for d in unlabelled_dirs or []],
                   "matches": _match_names(matches) if tc.shape_frame == "matched" else []}
    return Run(config, model, optimizer, scheduler, noise, device, train_data, val_data, setup,
               Path(output_dir) / CHECKPOINT, fingerprint)


def _train_epoch(run: Run, state: TrainState, stop: StopRequest, hook: BatchHook | None) -> None:
    """Finish the epoch ``state.epoch`` from batch ``state.batch``; checkpoint and exit on a stop request."""
    tc = run.config.training
    if run.setup.classifier is not None:
        batches = mixed_epoch_batches(run.train_data.class_index, tc.batch_size,
                                      tc.semi_supervised.labelled_fraction, run.config.seed, state.epoch)
    else:
        batches = epoch_batches(len(run.train_data), tc.batch_size, run.config.seed, state.epoch)
    todo = batches[state.batch :]
    run.model.train()
    bar = tqdm(total=len(batches), initial=state.batch, desc=f"epoch {state.epoch + 1}/{tc.epochs}",
               leave=False, mininterval=1.0, file=sys.stderr)
    started, cpu_started = time.perf_counter(), time.process_time()
    volumes = run.train_data.tensor_batches(todo, pin_memory=run.device.type == "cuda")
    cs = run.setup.classifier
    augment = cs is not None and (cs.augment_rotation_deg > 0 or cs.augment_shift_px > 0)
    for idx, vols in zip(todo, volumes):
        batch = make_batch(run.train_data, idx, vols, run.device)
        if augment:
            batch = augment_batch(batch, cs.augment_rotation_deg, cs.augment_shift_px, run.noise)
        losses = batch_losses(run.model, batch, run.setup, True, run.noise)
        run.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        values = loss_values(losses)   # the step's one synchronisation, after the work is queued
        if not math.isfinite(values["total"]):
            parts = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            raise FloatingPointError(f"non-finite training loss at epoch {state.epoch + 1}, batch {state.batch + 1} "
                                     f"({parts}); lower training.learning_rate or check the input particles")
        run.optimizer.step()
        state.running.add(values, len(idx))
        state.batch += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in state.running.means().items()}, refresh=False)
        if hook is not None:
            hook(state.epoch, state.batch)
        if stop.signum is not None:
            state.seconds += time.perf_counter() - started
            state.cpu_seconds += time.process_time() - cpu_started
            bar.close()
            save_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler, run.noise, state, run.fingerprint)
            name = signal.Signals(stop.signum).name
            tqdm.write(f"cryovae train: {name} received; checkpoint written to {run.checkpoint} at epoch "
                       f"{state.epoch + 1}, batch {state.batch}; rerun to resume", file=sys.stderr)
            raise SystemExit(128 + stop.signum)
    state.seconds += time.perf_counter() - started
    state.cpu_seconds += time.process_time() - cpu_started
    bar.close()


def _finish_epoch(run: Run, state: TrainState) -> None:
    """Validate, append the history row, step the scheduler, move to the next epoch."""
    tc = run.config.training
    started = time.perf_counter()
    val = evaluate(run.model, run.val_data, run.setup, tc.batch_size, run.device)
    validation_seconds = time.perf_counter() - started
    tr = state.running.means()
    rate = state.running.count / max(state.seconds, 1e-9)
    row = {"epoch": state.epoch + 1, "train_loss": tr["total"], "val_loss": val["total"], "seconds": state.seconds,
           "samples_per_s": rate, "cpu_seconds": state.cpu_seconds, "validation_seconds": validation_seconds}
    components = COMPONENTS + (CLASSIFIER_COMPONENTS if run.setup.classifier is not None else ())
    row.update({f"train_{k}": tr[k] for k in components})
    row.update({f"val_{k}": val[k] for k in components})
    if "accuracy" in val:
        row["val_accuracy"] = val["accuracy"]
    row.update({"beta": run.setup.beta, "gamma": run.setup.gamma,
                "learning_rate": run.optimizer.param_groups[0]["lr"]})
    state.history.append(row)
    tqdm.write(
        f"cryovae train: epoch {row['epoch']}/{tc.epochs}  train {row['train_loss']:.5g}  val {row['val_loss']:.5g}  "
        f"(recon {val['recon']:.4g}, kl {val['kl']:.4g}, affinity {val['affinity']:.4g}, pose {val['pose']:.4g}"
        + (f", classifier {val['classifier']:.4g}, accuracy {val['accuracy']:.3f}" if "accuracy" in val else "")
        + ")  "
        f"training {rate:.0f} samples/s ({state.seconds:.1f} s), validation {validation_seconds:.1f} s",
        file=sys.stderr,
    )
    with warnings.catch_warnings():
        # after resuming at the very end of an epoch no optimiser step precedes this one; the
        # restored scheduler state is right, so PyTorch's order warning does not apply
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.scheduler.step()
    state.epoch, state.batch, state.running, state.seconds, state.cpu_seconds = state.epoch + 1, 0, Running(), 0.0, 0.0


def _log_setup(run: Run) -> None:
    """One line saying where and how the run computes (device, dtype, threads, data sizes)."""
    dtype = run.setup.compute_dtype or mixed_precision(run.device)
    where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    tqdm.write(f"cryovae train: device {run.device} ({where}), compute dtype {str(dtype).removeprefix('torch.')}, "
               f"{torch.get_num_threads()} CPU threads, {len(run.train_data)} training and {len(run.val_data)} "
               f"validation particles, batch {run.config.training.batch_size}", file=sys.stderr)


def run_training(config: Config, train_dir: Path, val_dir: Path, affinity: Path, output_dir: Path,
                 batch_hook: BatchHook | None = None, maps: list[Path] | None = None,
                 unlabelled_dirs: list[Path] | None = None, matches: MatchFiles | None = None) -> None:
    """:func:`train` with an optional ``batch_hook(epoch, batches_done)`` called after every batch."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tc = config.training
    torch.set_num_threads(tc.threads)
    run = build_run(config, train_dir, val_dir, affinity, output_dir, maps, unlabelled_dirs, matches)
    state = load_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler, run.noise,
                            run.fingerprint) or TrainState()
    _log_setup(run)
    stop = StopRequest()
    with device_settings(run.device), stop_on_signals(stop):
        while state.epoch < tc.epochs:
            run.setup.beta = schedule_value(tc.beta, tc.beta_schedule, state.epoch)
            run.setup.gamma = schedule_value(tc.gamma, tc.gamma_schedule, state.epoch)
            _train_epoch(run, state, stop, batch_hook)
            _finish_epoch(run, state)
            if state.epoch % tc.checkpoint_every == 0 and state.epoch < tc.epochs:
                started = time.perf_counter()
                save_checkpoint(run.checkpoint, run.model, run.optimizer, run.scheduler, run.noise, state,
                                run.fingerprint)
                tqdm.write(f"cryovae train: checkpoint written in {time.perf_counter() - started:.2f} s",
                           file=sys.stderr)
    extra = {"epochs_trained": state.epoch, "final_val_loss": state.history[-1]["val_loss"],
             "seed": config.seed}
    if run.setup.classifier is not None:
        extra["classifier_class_names"] = list(run.setup.classifier.class_names)
    save_model(output_dir / "model.pt", run.model, run.fingerprint["class_names"], run.fingerprint["config"], extra)
    write_history(output_dir / "history.csv", state.history)
    plot_history(output_dir / "loss_curves.png", state.history)
    run.checkpoint.unlink(missing_ok=True)


def train(config: Config, train_dir: Path, val_dir: Path, affinity: Path, output_dir: Path,
          maps: list[Path] | None = None, unlabelled_dirs: list[Path] | None = None,
          train_match: Path | None = None, val_match: Path | None = None,
          unlabelled_matches: list[Path] | None = None) -> None:
    """Train the affinity-VAE on ``train_dir``, validate on ``val_dir``; write model.pt, history.csv,
    loss_curves.png into ``output_dir``.  Resumes from ``output_dir/checkpoint.pt`` when present.
    ``maps``: the seen classes' reference maps, where symmetric classes' axes are located.
    ``unlabelled_dirs``: splits trained on without their labels (training.semi_supervised).
    ``train_match``, ``val_match``, ``unlabelled_matches``: the splits' template-matching outputs,
    which give the frames of training.shape_frame: matched (unused otherwise).
    """
    run_training(config, train_dir, val_dir, affinity, output_dir, maps=maps, unlabelled_dirs=unlabelled_dirs,
                 matches=MatchFiles(train_match, val_match, unlabelled_matches))
