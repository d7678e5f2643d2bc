"""Which torch device a stage runs on: one rule for ``training.device`` and ``matching.device``."""

from __future__ import annotations

import torch

from cryovae.errors import InputError


def choose_device(requested: str, setting: str = "training.device") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without CUDA is an error naming
    ``setting`` (never a silent CPU run)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{setting} is 'cuda' but no CUDA device is available "
                         "(torch.cuda.is_available() is False); use 'auto' or 'cpu' to run on the CPU")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
