"""Encode every particle of a split with the final model (latent means, no sampling).

The output ``.npz`` (written atomically) holds, one row per particle in STAR order:

- ``particle_id`` (n,) str: cryovaeParticleId;
- ``class_name`` (n,) str: cryovaeClassName (the truth for simulated data, "unknown" for extracted);
- ``latent_mean``, ``latent_logvar`` (n, L) float32;
- ``rotation`` (n, 3, 3) float64: particle-from-canonical in RELION's convention (the
  model's canonical frame; ``align`` relates it to each class's reference map);
- ``origin_angstrom`` (n, 3) float64: rlnOriginX/Y/ZAngst of the predicted shift;
- ``recon_error`` (n,) float32: per-particle reconstruction error of the mean latent in the
  predicted pose (a model of training.shape_frame matched: in the matched pose it read the
  particle in), the training reconstruction loss (wedge-masked when the config says so: by
  the split's own tilt range for extracted particles, the simulation's otherwise);
- a model with a classifier head (training.semi_supervised.classifier) adds
  ``class_probabilities`` (n, C) float32, q(y|x), over ``classifier_class_names`` (C,) str.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryovae.acquisition import split_tilt_range_deg
from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.devices import choose_device
from cryovae.errors import InputError
from cryovae.model.data import ParticleData
from cryovae.model.encoder import rotation_3x3
from cryovae.model.io import load_model
from cryovae.model.losses import reconstruction_error, wedge_mask
from cryovae.train import autocast


def _check_compatible(data: ParticleData, meta: dict, model_path: Path, split_dir: Path) -> None:
    if list(data.spatial_shape) != list(meta["spatial_shape"]):
        raise InputError(f"{split_dir}: particle shape {data.spatial_shape} differs from the model's "
                         f"{tuple(meta['spatial_shape'])} ({model_path})")
    if not math.isclose(data.pixel_size_angstrom, meta["pixel_size_angstrom"], rel_tol=1e-4):
        raise InputError(f"{split_dir}: pixel size {data.pixel_size_angstrom} Å differs from the model's "
                         f"{meta['pixel_size_angstrom']} Å ({model_path})")


@torch.no_grad()
def encode_split(config: Config, model_path: Path, split_dir: Path, match: Path | None = None) -> dict[str, np.ndarray]:
    """The arrays of :func:`embed` for one split (see the module docstring); ``match``: the
    split's template-matching output, whose poses a model of shape_frame 'matched' reads in."""
    device = choose_device(config.training.device)
    model, meta = load_model(model_path, device)
    data = ParticleData.open(split_dir, meta["class_names"], require_known=False)
    _check_compatible(data, meta, Path(model_path), Path(split_dir))
    if model.shape_frame == "matched":
        if match is None:
            raise InputError(f"{model_path} reads particles in their template-matched pose "
                             "(training.shape_frame: matched): give the split's match output (--match)")
        data = data.with_frames(match)
    tilt = split_tilt_range_deg(data.source.particles) or config.simulation.tilt_range_deg  # extracted: its own
    use_wedge = config.training.wedge_masked_loss and tilt is not None and len(data.spatial_shape) == 3
    mask = wedge_mask(data.spatial_shape, tilt).to(device) if use_wedge else None
    batches = [np.arange(i, min(i + config.training.batch_size, len(data)))
               for i in range(0, len(data), config.training.batch_size)]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("latent_mean", "latent_logvar", "rotation", "shift",
                                                          "recon_error", "class_probabilities")}
    for rows, vols in zip(batches, tqdm(data.batches(batches), total=len(batches), desc="embed", mininterval=1.0)):
        x = torch.from_numpy(vols).unsqueeze(1).to(device)
        frame = None
        if data.has_frames:
            frame = (torch.from_numpy(data.frame_rotation[rows]), torch.from_numpy(data.frame_shift_voxels[rows]))
        with autocast(device):
            out = model(x, sample=False, frame=frame)
        parts["latent_mean"].append(out["latent_mean"].float().cpu().numpy())
        parts["latent_logvar"].append(out["latent_logvar"].float().cpu().numpy())
        parts["rotation"].append(rotation_3x3(out["rotation"].double()).cpu().numpy())
        parts["shift"].append(out["shift_voxels"].double().cpu().numpy())
        parts["recon_error"].append(reconstruction_error(out["reconstruction"], x, mask).cpu().numpy())
        if "class_logits" in out:
            parts["class_probabilities"].append(torch.softmax(out["class_logits"].float(), 1).cpu().numpy())
    shift = np.concatenate(parts["shift"])
    shift_xyz = np.zeros((len(shift), 3))
    shift_xyz[:, : shift.shape[1]] = shift
    table = data.source.particles
    network = {}
    if parts["class_probabilities"]:
        network = {"class_probabilities": np.concatenate(parts["class_probabilities"]).astype(np.float32),
                   "classifier_class_names": np.array(meta["classifier_class_names"], dtype=str)}
    return {
        "particle_id": table["cryovaeParticleId"].astype(str).to_numpy().astype(str),
        "class_name": table["cryovaeClassName"].astype(str).to_numpy().astype(str),
        "latent_mean": np.concatenate(parts["latent_mean"]).astype(np.float32),
        "latent_logvar": np.concatenate(parts["latent_logvar"]).astype(np.float32),
        "rotation": np.concatenate(parts["rotation"]).astype(np.float64),
        "origin_angstrom": -shift_xyz * meta["pixel_size_angstrom"],
        "recon_error": np.concatenate(parts["recon_error"]).astype(np.float32),
        **network,
    }


def embed(config: Config, model: Path, split_dir: Path, output: Path, match: Path | None = None) -> None:
    """Encode every particle of ``split_dir`` with ``model``; write the ``.npz`` at ``output``
    (``match``: the split's template-matching output, for a model of shape_frame 'matched')."""
    torch.set_num_threads(config.training.threads)
    arrays = encode_split(config, Path(model), Path(split_dir), None if match is None else Path(match))
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
