"""Training the pose network (:mod:`cryovae.model.posenet`) on particles simulated on the fly.

Each step simulates a fresh batch from the seen classes' reference maps with the simulation
section's settings (:class:`cryovae.simulate.ParticleSimulator`: SNR, missing wedge, CTF and
defocus range, shifts), so no particle is seen twice and the network cannot memorise poses.
With ``pose_network.snr_range`` each particle's SNR is drawn from that range instead (the
validation set's too), so the network also meets particles as noisy as a tomogram's.
The loss is the cross entropy of the true class's pose logits against a Gaussian of the angle
to the true rotation modulo the point group (:func:`cryovae.model.posenet.soft_targets`), plus
the cross entropy of the class logits.  A fixed validation set (its own seed) is scored every
tenth of training: the median angle of the best-ranked rotation and the fraction of particles
with one of the k best within 15° (k = 1, 4, 16), modulo the point group.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cryovae.align import point_group_in_map
from cryovae.atomic import atomic_path
from cryovae.config import Config
from cryovae.devices import choose_device
from cryovae.errors import InputError
from cryovae.match import read_references
from cryovae.model.io import save_record
from cryovae.model.posenet import PoseNetwork, grid_angles_deg, pose_network_record, soft_targets, standardise
from cryovae.simulate import ParticleSimulator, class_snr, random_draws

log = logging.getLogger(__name__)
SEED_STREAM = 7301  # this stage's entry in the seed sequence, apart from the splits' simulation
TOP_K = (1, 4, 16)
NEAR_DEG = 15.0   # a proposal this close to the truth starts a local search that finds it


def simulated_batch(simulator: ParticleSimulator, config: Config, n_classes: int, n: int,
                    rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """n fresh particles of uniformly drawn classes: volumes (n, 1, B, B, B), class index (n,),
    rotation (n, 3, 3) particle-from-reference."""
    class_index = rng.integers(0, n_classes, n)
    draws = random_draws(config, class_index, rng)
    snr = particle_snr(simulator, config, class_index, rng)
    volumes = standardise(torch.as_tensor(simulator.volumes(class_index, draws, rng, snr)))[:, None]
    return volumes, class_index, draws.rotation


def particle_snr(simulator: ParticleSimulator, config: Config, class_index: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray | None:
    """With ``pose_network.snr_range`` [low, high], each particle's SNR (n,): log-uniform in the
    range, times its class's share of ``simulation.snr`` (:func:`cryovae.simulate.class_snr`);
    None otherwise (the simulator's own SNR)."""
    bounds = config.pose_network.snr_range
    if bounds is None:
        return None
    if simulator.snr is None:
        raise InputError("pose_network.snr_range needs noise: set simulation.snr")
    relative = simulator.snr[class_index] / float(config.simulation.snr)
    return relative * np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), len(class_index)))


def validation_metrics(net: PoseNetwork, volumes: torch.Tensor, class_index: np.ndarray,
                       angles_deg: np.ndarray) -> dict[str, float]:
    """Median angle (°) of the best-ranked rotation of the true class, the fraction with one of
    the k best within :data:`NEAR_DEG` for k in :data:`TOP_K`, and the class accuracy."""
    pose, probability = net.predict(volumes[:, 0])
    own = pose[torch.arange(len(class_index)), torch.as_tensor(class_index)]
    ranked = own.topk(max(TOP_K), dim=1).indices.numpy()
    ranked_angles = np.take_along_axis(angles_deg, ranked, 1)
    out = {"val_median_deg": float(np.median(ranked_angles[:, 0]))}
    for k in TOP_K:
        out[f"val_top{k}_within_{NEAR_DEG:g}"] = float((ranked_angles[:, :k].min(1) < NEAR_DEG).mean())
    out["val_class_accuracy"] = float((probability.argmax(1).numpy() == class_index).mean())
    return out


def write_history(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def train_pose_network(config: Config, maps: list[Path], output: Path, history: Path) -> None:
    """Train the pose network from the seen classes' maps; write ``output`` (pose_network.pt)
    and ``history`` (CSV: samples, seconds, loss and the validation figures)."""
    pc = config.pose_network
    torch.set_num_threads(pc.threads)
    device = choose_device(pc.device, "pose_network.device")
    refs = read_references(config, maps)
    classes = list(refs)
    class_maps = np.stack([refs[c] for c in classes])
    groups = [point_group_in_map(config, c, refs[c]) for c in classes]
    simulator = ParticleSimulator(config, class_maps, class_snr(config, classes, class_maps))
    train_seed, val_seed, torch_seed = np.random.SeedSequence([config.seed, SEED_STREAM]).spawn(3)
    torch.manual_seed(int(torch_seed.generate_state(1)[0]))
    net = PoseNetwork(config.box_size, classes, pc.step_deg, list(pc.channels), pc.hidden).to(device)
    grid = net.grid.cpu().double().numpy()
    val_x, val_class, val_rot = simulated_batch(simulator, config, len(classes), pc.validation_particles,
                                                np.random.default_rng(val_seed))
    val_angles = grid_angles_deg(grid, val_rot, groups, val_class)
    rng = np.random.default_rng(train_seed)
    steps = math.ceil(pc.samples / pc.batch_size)
    optimiser = torch.optim.AdamW(net.parameters(), lr=pc.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=pc.learning_rate / 10)
    checkpoints = set(np.linspace(0, steps, 11).round().astype(int)[1:].tolist())
    rows, started, seen = [], time.perf_counter(), 0
    log.info("pose network: %d classes, %d-rotation grid, %d steps of %d simulated particles on %s",
             len(classes), net.n_grid, steps, pc.batch_size, device)
    for step in tqdm(range(1, steps + 1), desc="pose network", unit="step", mininterval=2.0):
        x, cls, rot = simulated_batch(simulator, config, len(classes), pc.batch_size, rng)
        loss = training_step(net, optimiser, x.to(device), cls, soft_targets(grid_angles_deg(grid, rot, groups, cls),
                                                                             pc.sigma_deg))
        schedule.step()
        seen += len(x)
        if step in checkpoints:
            row = {"samples": seen, "seconds": round(time.perf_counter() - started, 2), "loss": round(loss, 5),
                   **{k: round(v, 5) for k, v in validation_metrics(net, val_x, val_class, val_angles).items()}}
            rows.append(row)
            log.info("pose network: %s", ", ".join(f"{k} {v}" for k, v in row.items()))
    save_record(pose_network_record(net, groups, config.model_dump(mode="json"), rows), output)
    write_history(history, rows)


def training_step(net: PoseNetwork, optimiser: torch.optim.Optimizer, x: torch.Tensor, class_index: np.ndarray,
                  targets: torch.Tensor) -> float:
    """One step on a batch: pose cross entropy at the true class + class cross entropy; the loss."""
    device = x.device
    index = torch.as_tensor(class_index, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pose, cls = net(x)
    own = pose[torch.arange(len(x), device=device), index]
    loss = -(targets.to(device) * torch.log_softmax(own, dim=1)).sum(1).mean() + F.cross_entropy(cls, index)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())
