"""Checkpoints of a training run, and the signals that ask for one.

A checkpoint holds the model, optimiser and scheduler state dicts, every RNG state (torch,
CUDA, the latent-noise generator, numpy, python), the position (epoch, next batch), the
running loss sums of the epoch in progress and the history so far: only tensors, dicts,
lists, strings and numbers, so ``torch.load(..., weights_only=True)`` reads it.  Together
with the deterministic per-epoch shuffle this makes a resumed run bitwise identical to an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryovae.model.io import read_record, save_record
from cryovae.model.losses import CLASSIFIER_COMPONENTS, COMPONENTS

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


@dataclass
class StopRequest:
    """Set by the signal handler; read by the loop at batch boundaries."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[None]:
    """Route SIGTERM/SIGUSR1 to ``request`` (main thread only); restore the old handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Running:
    """Sample-weighted sums of the loss components over part of an epoch."""

    sums: dict[str, float] = field(
        default_factory=lambda: {k: 0.0 for k in ("total",) + COMPONENTS + CLASSIFIER_COMPONENTS})
    count: int = 0

    def add(self, losses: dict[str, float], n: int) -> None:
        """Add a batch of ``n`` particles with mean losses ``losses`` (floats: see ``train.loss_values``)."""
        for k in self.sums:
            self.sums[k] += losses[k] * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model, optimiser and scheduler."""

    epoch: int = 0                    # epoch in progress (or next to start)
    batch: int = 0                    # next batch of that epoch
    running: Running = field(default_factory=Running)
    seconds: float = 0.0              # training-pass wall time of the epoch so far (no validation, no checkpoint)
    cpu_seconds: float = 0.0          # and its process CPU time
    history: list[dict] = field(default_factory=list)


def _rng_states(noise: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "noise": noise.get_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def _restore_rng_states(states: dict, noise: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    noise.set_state(states["noise"])
    np_s = states["numpy"]
    np.random.set_state(("MT19937", np_s["key"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"], np_s["gauss"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def save_checkpoint(path: Path, model, optimizer, scheduler, noise: torch.Generator, state: TrainState,
                    fingerprint: dict) -> None:
    """Write ``checkpoint.pt`` atomically (plain types and tensors only)."""
    record = {
        "format": "cryovae-checkpoint",
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_states(noise),
        "epoch": state.epoch,
        "batch": state.batch,
        "running": {"sums": dict(state.running.sums), "count": state.running.count},
        "seconds": state.seconds,
        "cpu_seconds": state.cpu_seconds,
        "history": list(state.history),
    }
    save_record(record, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, noise: torch.Generator,
                    fingerprint: dict) -> TrainState | None:
    """Restore a checkpoint of the same run into the given objects; None (and a message) otherwise."""
    if not path.is_file():
        return None
    record = read_record(
        path, "training checkpoint",
        f"set it aside (mv {path} {path}.corrupt) and rerun: training restarts from the first epoch",
    )
    if not isinstance(record, dict) or record.get("format") != "cryovae-checkpoint" or record.get("fingerprint") != fingerprint:
        tqdm.write(f"cryovae train: {path} belongs to a different configuration or data; starting afresh",
                   file=sys.stderr)
        return None
    model.load_state_dict(record["model"])
    optimizer.load_state_dict(record["optimizer"])
    scheduler.load_state_dict(record["scheduler"])
    _restore_rng_states(record["rng"], noise)
    running = Running(dict(record["running"]["sums"]), int(record["running"]["count"]))
    tqdm.write(f"cryovae train: resuming from {path} at epoch {record['epoch'] + 1}, batch {record['batch']}",
               file=sys.stderr)
    return TrainState(record["epoch"], record["batch"], running, seconds=float(record["seconds"]),
                      cpu_seconds=float(record.get("cpu_seconds", 0.0)),   # absent from older checkpoints
                      history=list(record["history"]))
