"""Pose proposals in one forward pass: a CNN that classifies a particle's orientation over an
SO(3) grid, one distribution per seen class.

The affinity-VAE's regressed 6D pose memorised its small training set (median error ~100° on
new particles, benchmarks/RESULTS.md); classifying over a grid gives a distribution, whose
best-ranked rotations are starting points for template matching's local search.  The network
reads a particle (standardised: zero mean, unit variance) and returns, for every seen class,
logits over the rotations of :func:`cryovae.rotations.so3_grid` (``step_deg``) and one class
logit.  It is trained (:mod:`cryovae.pose_training`) on particles simulated on the fly, so it
never sees the same particle twice, against a soft target: a Gaussian of the angle from each
grid rotation to the particle's true rotation, modulo the class's point group (every mate of
a symmetric particle is equally right).

Rotations are particle-from-reference in RELION's convention, as everywhere in cryovae, and
relative to the reference maps the network was trained from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cryovae import __version__
from cryovae.errors import InputError
from cryovae.model.encoder import reduced_size
from cryovae.rotations import matrix_to_quaternion, quaternion_to_matrix, so3_grid

FORMAT = "cryovae-pose-network"
FORMAT_VERSION = 1


class PoseNetwork(nn.Module):
    """(n, 1, B, B, B) -> pose logits (n, C, G) over ``so3_grid(step_deg)`` and class logits (n, C).

    Stride-2 3x3x3 convolutions with batch normalisation and SiLU (one per entry of
    ``channels``), a hidden layer, and one linear head for the C x G pose logits and the C
    class logits.
    """

    def __init__(self, box_size: int, classes: list[str], step_deg: float, channels: list[int], hidden: int):
        super().__init__()
        self.config = {"box_size": int(box_size), "classes": list(classes), "step_deg": float(step_deg),
                       "channels": [int(c) for c in channels], "hidden": int(hidden)}
        self.classes = list(classes)
        self.register_buffer("grid", torch.as_tensor(so3_grid(step_deg), dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm3d(c_out), nn.SiLU()]
            c_in = c_out
        edge = reduced_size(int(box_size), len(channels))
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * edge**3, hidden), nn.SiLU())
        self.n_grid = len(self.grid)
        self.head = nn.Linear(hidden, len(classes) * (self.n_grid + 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # channels-last 3D convolutions: a quarter faster on the CPU (oneDNN), the same values to 1e-5
        x = x.to(memory_format=torch.channels_last_3d)  # restrides even one channel, as contiguous() would not
        out = self.head(self.features(x)).float().view(len(x), len(self.classes), self.n_grid + 1)
        return out[..., :-1], out[..., -1]

    @torch.no_grad()
    def predict(self, volumes: np.ndarray | torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose logits (n, C, G) and class probabilities (n, C), float32 on the CPU, of particles
        (n, B, B, B), each standardised first; in eval mode."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        poses, classes = [], []
        for start in range(0, len(volumes), batch):
            x = standardise(torch.as_tensor(volumes[start : start + batch], dtype=torch.float32)).to(device)
            pose, cls = self(x[:, None])
            poses.append(pose.float().cpu())
            classes.append(torch.softmax(cls.float(), dim=1).cpu())
        self.train(was_training)
        return torch.cat(poses), torch.cat(classes)


def standardise(volumes: torch.Tensor) -> torch.Tensor:
    """Each volume (n, *spatial) to zero mean and unit variance (a constant volume to zeros)."""
    flat = volumes.flatten(1)
    mean, sd = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
    return ((flat - mean) / sd.clamp(min=1e-8)).view_as(volumes)


def grid_angles_deg(grid: np.ndarray, rotations: np.ndarray, groups: list[np.ndarray], class_index: np.ndarray) -> np.ndarray:
    """Angle (n, G) from each particle's rotation (n, 3, 3) to every grid rotation (G, 3, 3),
    modulo the particle's point group (``groups[class_index[i]]``, (S, 3, 3) in its map's frame)."""
    grid_quats = matrix_to_quaternion(grid)
    out = np.empty((len(rotations), len(grid)))
    for i, (rotation, k) in enumerate(zip(rotations, class_index)):
        mates = matrix_to_quaternion(rotation[None] @ groups[k])
        dots = np.abs(mates @ grid_quats.T).max(0)
        out[i] = np.degrees(2 * np.arccos(np.clip(dots, 0.0, 1.0)))
    return out


def grid_neighbourhoods(quats: np.ndarray, radius_deg: float, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`soft_argmax` averages around each grid rotation b, for ``quats`` (S, G, 4) (the
    grid turned by each element of the point group, identity first): index (G, K) of the grid
    rotations within ``radius_deg`` of b modulo the group (-1 pads the rows), and mate (G, K, 4)
    the quaternion of each one's mate nearest b, signed to lie on b's side."""
    n_sym, n_grid = quats.shape[:2]
    cos_radius = np.cos(np.radians(radius_deg) / 2)
    flat = quats.reshape(-1, 4).T
    rows, cols, turned = [], [], []
    for first in range(0, n_grid, block):
        dots = (quats[0, first:first + block] @ flat).reshape(-1, n_sym, n_grid)   # (b, S, G)
        r, c = np.nonzero(np.abs(dots).max(1) >= cos_radius)                       # by row, then column
        pair = dots[r, :, c]                                                        # (pairs, S)
        mate = np.abs(pair).argmax(1)                                               # nearest b
        rows.append(r + first)
        cols.append(c)
        turned.append(quats[mate, c] * np.sign(pair[np.arange(len(r)), mate])[:, None])
    rows, cols, turned = np.concatenate(rows), np.concatenate(cols), np.concatenate(turned)
    counts = np.bincount(rows, minlength=n_grid)
    place = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)   # rank within its row
    index = np.full((n_grid, counts.max()), -1, dtype=np.int64)
    mate = np.zeros((n_grid, counts.max(), 4))
    index[rows, place], mate[rows, place] = cols, turned
    return index, mate


def soft_argmax(logits: np.ndarray, quats: np.ndarray, radius_deg: float,
                neighbourhoods: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Rotations (n, 3, 3) between the grid's: the mean, weighted by the network's probabilities
    (softmax of ``logits`` (n, G)), of the grid rotations within ``radius_deg`` of each particle's
    best-ranked one, every rotation first turned to its point-group mate nearest that one.
    ``quats`` (S, G, 4): the grid turned by each element of the class's point group (identity
    first); ``neighbourhoods``: their :func:`grid_neighbourhoods` at ``radius_deg``, made here
    if not given.  On SHREC particles at SNR 0.1 a 40° radius takes the 20° grid's median error
    from 14.1° to 8.7° (benchmarks/RESULTS.md)."""
    index, mate = grid_neighbourhoods(quats, radius_deg) if neighbourhoods is None else neighbourhoods
    logits = np.asarray(logits, dtype=np.float64)
    best = logits.argmax(1)
    near = index[best]                                       # (n, K)
    values = np.take_along_axis(logits, np.maximum(near, 0), 1)
    weights = np.where(near >= 0, np.exp(values - logits.max(1, keepdims=True)), 0.0)
    return quaternion_to_matrix(np.einsum("nk,nkq->nq", weights, mate[best]))


def soft_targets(angles_deg: np.ndarray, sigma_deg: float) -> torch.Tensor:
    """Target distributions (n, G) over the grid: exp(-angle² / 2σ²), normalised per particle."""
    weights = np.exp(-0.5 * (angles_deg / sigma_deg) ** 2)
    return torch.as_tensor(weights / weights.sum(1, keepdims=True), dtype=torch.float32)


def pose_network_record(net: PoseNetwork, groups: list[np.ndarray], config: dict, history: list[dict]) -> dict[str, Any]:
    """The dict written to ``pose_network.pt`` (plain types and CPU tensors)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "hyperparameters": dict(net.config), "point_groups": [torch.as_tensor(g) for g in groups],
        "config": config, "history": history,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
    }


def load_pose_network(path: str | Path, device: torch.device | str = "cpu") -> PoseNetwork:
    """A :class:`PoseNetwork` from ``pose_network.pt`` (:mod:`cryovae.pose_training`), in eval mode."""
    from cryovae.model.io import read_record

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pose network file does not exist")
    record = read_record(path, "pose network file", "delete it and rerun the workflow, which trains it again")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a cryovae pose network file (format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: pose network format version {record.get('format_version')}, "
                         f"this cryovae reads {FORMAT_VERSION}")
    net = PoseNetwork(**record["hyperparameters"])
    net.load_state_dict(record["state_dict"])
    return net.to(device).eval()
