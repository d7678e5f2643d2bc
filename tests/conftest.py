"""Shared test fixtures: the real data beside the checkout, and a fresh output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "shrec2021"


@pytest.fixture(scope="session")
def shrec_dir() -> Path:
    """``../shared/data/shrec2021`` (real PDB entries and 10 Å maps); skip when it is absent."""
    if not (SHARED_DATA / "pdb").is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA
