"""Workflow outputs recomputed by a second route (NumPy and SciPy only), for the end-to-end tests.

The workflow's own code computes the affinity and the metrics; these recompute them from
the files it wrote (descriptors, the per-particle table, the split's ground truth), so a
test compares two routes instead of checking bounds that hold by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation


def affinity_from_descriptors(out: Path, names: list[str]) -> np.ndarray:
    """Cosine similarity of the feature-wise z-scored SOAP descriptors in ``out/affinity/soap``."""
    x = np.stack([np.load(out / "affinity" / "soap" / f"{name}.npy") for name in names]).astype(np.float64)
    spread = x.std(axis=0)
    z = (x - x.mean(axis=0))[:, spread > 1e-9 * np.abs(x).max()] / spread[spread > 1e-9 * np.abs(x).max()]
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z @ z.T


def _relion_rotations(table: pd.DataFrame, columns: list[str]) -> Rotation:
    """RELION's particle-from-reference rotation of each row (ZYZ angles in degrees, inverted)."""
    return Rotation.from_euler("ZYZ", table[columns].to_numpy(np.float64), degrees=True).inv()


def seen_class_results(out: Path, split: str, seen: list[str], prefix: str = "") -> pd.DataFrame:
    """Per seen-class particle of a simulated split: called right, and the rotation error (degrees, C1).

    ``prefix`` "network_" scores the network's own poses instead of the written ones.
    """
    emb = pd.read_csv(out / "embeddings" / f"{split}.csv", dtype={"particle_id": str})
    truth = starfile.read(out / "subtomograms" / split / "particles.star", always_dict=True,
                          parse_as_string=["cryovaeParticleId"])["particles"]
    table = truth.merge(emb, left_on="cryovaeParticleId", right_on="particle_id", validate="one_to_one")
    table = table[table["cryovaeClassName"].isin(seen)]
    predicted = _relion_rotations(table, [f"{prefix}angle_{a}" for a in ("rot", "tilt", "psi")])
    true = _relion_rotations(table, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    return pd.DataFrame({"right": (table["predicted_class"] == table["cryovaeClassName"]).to_numpy(),
                         "error_deg": np.degrees((predicted * true.inv()).magnitude())})
