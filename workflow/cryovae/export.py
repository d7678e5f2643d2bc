"""A subtomogram split as RELION 3.1 reads it: one MRC per particle and a particles STAR.

``relion_reconstruct --i particles.star --o map.mrc --3d_rot`` (run in the output folder)
back-projects the particles with their poses; on simulated data it gives back the class
map, which is how the pose convention of the whole project is checked with RELION itself.

Particles with a CTF (``rlnDefocusU``) or a missing wedge also get RELION's 3D CTF model,
``ctf/{particle id}.mrc`` named in ``rlnCtfImage``: for extracted particles with an
``acquisition.star`` the particle's own per-tilt 3D CTF (:func:`cryovae.ctf.per_tilt_ctf_3d`:
defocus gradient, dose, wedge), else the CTF of :func:`cryovae.ctf.ctf_3d` times the wedge;
on the half-spectrum grid RELION reads (nx = box // 2 + 1, frequency 0 first), so that
``--ctf`` corrects both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryovae.ctf import ctf_3d, missing_wedge_mask
from cryovae.errors import InputError
from cryovae.maps import write_map
from cryovae.star import write_star_blocks
from cryovae.shards import POSE_COLUMNS, SubtomogramSet

OPTICS_REQUIRED = (
    "rlnOpticsGroup", "rlnImageDimensionality", "rlnImagePixelSize", "rlnImageSize",
    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
)
PARTICLES_REQUIRED = ("rlnImageName", *POSE_COLUMNS, "rlnOpticsGroup")
PARTICLES_FIRST = ("rlnImageName", *POSE_COLUMNS, "rlnOpticsGroup", "rlnClassNumber")
EXPORT_CHUNK = 256  # particles read from the shards at a time


def write_relion3_particles_star(particles: pd.DataFrame, optics: dict | pd.DataFrame, path: str | Path) -> None:
    """Write a RELION 3.1 STAR file (data_optics + data_particles) of 3D subtomograms, atomically.

    ``particles`` needs ``rlnImageName``, the three angles, the three ``rlnOrigin?Angst``
    (``rlnOpticsGroup`` defaults to 1); its other columns are kept, after the RELION ones.
    ``optics``: a one-group mapping or a DataFrame; it needs ``rlnImagePixelSize``,
    ``rlnImageSize``, ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``
    (``rlnOpticsGroup`` defaults to 1, ``rlnImageDimensionality`` to 3).
    """
    path = Path(path)
    optics_df = pd.DataFrame([optics]) if isinstance(optics, dict) else optics.copy()
    if "rlnOpticsGroup" not in optics_df.columns:
        optics_df.insert(0, "rlnOpticsGroup", np.arange(1, len(optics_df) + 1))
    if "rlnImageDimensionality" not in optics_df.columns:
        optics_df["rlnImageDimensionality"] = 3
    missing = [c for c in OPTICS_REQUIRED if c not in optics_df.columns]
    if missing:
        raise InputError(f"{path}: optics lack {', '.join(missing)} (relion_reconstruct needs them)")
    table = particles.copy()
    if "rlnOpticsGroup" not in table.columns:
        table["rlnOpticsGroup"] = 1
    missing = [c for c in PARTICLES_REQUIRED if c not in table.columns]
    if missing:
        raise InputError(f"{path}: particles lack {', '.join(missing)}")
    unknown = set(table["rlnOpticsGroup"]) - set(optics_df["rlnOpticsGroup"])
    if unknown:
        raise InputError(f"{path}: particles name optics group(s) {sorted(unknown)} absent from data_optics")
    first = [c for c in PARTICLES_FIRST if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    write_star_blocks({"optics": optics_df, "particles": table}, path)


def optics_for_export(config, optics: pd.DataFrame, box: int, pixel_size_angstrom: float) -> dict:
    """One optics group: the split's own values where present, else the config's microscope."""
    sim = config.simulation
    row = optics.iloc[0].to_dict() if len(optics) else {}
    return {
        "rlnOpticsGroup": 1,
        "rlnOpticsGroupName": str(row.get("rlnOpticsGroupName", "opticsGroup1")),
        "rlnImageDimensionality": 3,
        "rlnImagePixelSize": float(pixel_size_angstrom),
        "rlnImageSize": int(box),
        "rlnVoltage": float(row.get("rlnVoltage", sim.voltage_kv)),
        "rlnSphericalAberration": float(row.get("rlnSphericalAberration", sim.spherical_aberration_mm)),
        "rlnAmplitudeContrast": float(row.get("rlnAmplitudeContrast", sim.amplitude_contrast)),
    }


def ctf_models(acquisition, rows: np.ndarray, box: int, pixel_size_angstrom: float, per_tilt=None) -> np.ndarray:
    """RELION 3D CTF models of ``rows``: (n, box, box, box // 2 + 1) float32, CTF × wedge.

    ``acquisition`` is a split's (tilt range, defocus µm per particle, optics) as template
    matching applies them (:func:`cryovae.match.split_wedge_and_ctf`); either may be None.
    ``per_tilt``: the split's per-particle CTFs (:func:`cryovae.match.split_particle_ctfs`),
    used instead when given.
    """
    if per_tilt is not None:
        source, names, centred = per_tilt
        return source(names[rows], centred[rows]).numpy().astype(np.float32)
    tilt, defocus_um, optics = acquisition
    weights = torch.ones((len(rows), box, box, box // 2 + 1))
    if defocus_um is not None:
        weights = ctf_3d(torch.as_tensor(defocus_um[rows]), box, pixel_size_angstrom, *optics)
    if tilt is not None:
        weights = weights * missing_wedge_mask(box, tuple(tilt))
    return weights.numpy().astype(np.float32)


def export_relion3(config, split_dir: Path, output_dir: Path) -> None:
    """Write a split as ``output_dir/subtomograms/{particle id}.mrc`` + ``output_dir/particles.star``.

    Image names are relative to ``output_dir``, and so are the 3D CTF models
    (``ctf/{particle id}.mrc``, see :func:`ctf_models`).  Without poses (extracted data)
    the angles and origins are 0.
    """
    split_dir, output_dir = Path(split_dir), Path(output_dir)
    data = SubtomogramSet.open(split_dir)
    if len(data) == 0:
        raise InputError(f"{split_dir}/particles.star: no particles to export")
    pixel = data.pixel_size_angstrom
    ids = data.particles["cryovaeParticleId"].astype(str)
    if ids.duplicated().any():
        raise InputError(f"{split_dir}/particles.star: duplicate particle id {ids[ids.duplicated()].iloc[0]!r}")
    names = [f"subtomograms/{pid}.mrc" for pid in ids]
    ctf_names = [f"ctf/{pid}.mrc" for pid in ids]
    from cryovae.match import split_particle_ctfs, split_wedge_and_ctf

    acquisition = split_wedge_and_ctf(config, data)
    per_tilt = split_particle_ctfs(data)
    has_ctf = acquisition[0] is not None or acquisition[1] is not None or per_tilt is not None
    box = None
    for start in tqdm(range(0, len(data), EXPORT_CHUNK), desc=f"export {split_dir.name}", unit="chunk"):
        idx = np.arange(start, min(len(data), start + EXPORT_CHUNK))
        volumes = data.volumes(idx)
        box = volumes.shape[-1]
        models = ctf_models(acquisition, idx, box, pixel, per_tilt) if has_ctf else None
        for k, (i, volume) in enumerate(zip(idx, volumes)):
            write_map(volume, pixel, output_dir / names[i])
            if has_ctf:
                write_map(models[k], pixel, output_dir / ctf_names[i])
    table = data.particles.copy()
    table.insert(0, "rlnImageName", names)
    if has_ctf:
        table.insert(1, "rlnCtfImage", ctf_names)
    if not data.has_poses():
        for col in POSE_COLUMNS:
            table[col] = 0.0
    table["rlnOpticsGroup"] = 1
    optics = optics_for_export(config, data.optics, box, pixel)
    write_relion3_particles_star(table, optics, output_dir / "particles.star")
