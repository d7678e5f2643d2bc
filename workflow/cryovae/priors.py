"""Pose priors for subtomogram averaging: RELION 5, 4 or 3 particle STAR files.

Every particle gets its predicted ``rlnAngleRot/Tilt/Psi`` (relative to its class's
reference map), ``rlnOriginX/Y/ZAngst``, the priors ``rlnAngleTiltPrior`` and
``rlnAnglePsiPrior`` (the same angles: local searches start there), ``rlnClassNumber``
(1-based in config order; 0 for unknown), ``cryovaeClassName`` and ``cryovaeConfidence``.

Particles extracted from tomograms keep their ``rlnTomoName`` and coordinates exactly.
Simulated particles have no tomogram: each is its own exported subtomogram
(``{output_dir}/export/{split}``), named in ``rlnImageName`` relative to ``output_dir``
(RELION opens images relative to the folder it runs in: run it from ``output_dir``, for
the split's file and the per-class files alike) and, for RELION 4/5, written as a
particle at the centre of that subtomogram, with its 3D CTF model (``rlnCtfImage``,
:mod:`cryovae.export`).  The particles' ``rlnDefocusU/V/Angle`` are carried over when the
split has them.
One file per predicted class goes to ``priors/{split}/{class}.star``.

With template matching, every particle also carries the matcher's pose confidence:
``cryovaePoseMargin`` (noise standard deviations), ``cryovaePoseSigmaDeg`` (a suggested
``--sigma_ang``) and ``cryovaePoseDetermined`` (1 or 0).  Particles whose orientation the
data do not determine are written again, without angle priors, to
``priors/{split}_global_search.star``: refine those with a global angular search rather than
a local one around a pose that is a guess.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryovae.atomic import atomic_dir
from cryovae.config import Config
from cryovae.errors import InputError
from cryovae.shards import STRING_COLUMNS, SubtomogramSet
from cryovae.star import OpticsInfo, write_relion4_particles, write_relion5_particles

log = logging.getLogger(__name__)
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")  # the particles' own, when they have them
IMAGE_COLUMNS = ("rlnImageName", "rlnCtfImage")  # files of the exported subtomograms
CONFIDENCE_COLUMNS = {  # annotate column -> STAR column (the matcher's pose confidence)
    "pose_margin": ("cryovaePoseMargin", float), "pose_sigma_deg": ("cryovaePoseSigmaDeg", float),
    "pose_determined": ("cryovaePoseDetermined", int),
}
PRIOR_ANGLE_COLUMNS = ("rlnAngleTiltPrior", "rlnAnglePsiPrior")


def global_search_path(output: Path) -> Path:
    """``priors/{split}_global_search.star`` beside ``priors/{split}.star``."""
    output = Path(output)
    return output.with_name(f"{output.stem}_global_search.star")


def _read_embeddings(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise InputError(f"{path}: embeddings file does not exist")
    return pd.read_csv(path, dtype={"particle_id": str, "predicted_class": str})


def _joined(embeddings: pd.DataFrame, particles: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Embeddings in the split's STAR order, with the STAR's columns beside them."""
    table = particles.merge(embeddings, left_on="cryovaeParticleId", right_on="particle_id", how="left")
    missing = table["particle_id"].isna()
    if missing.any():
        raise InputError(f"{path}: no row for particle {table['cryovaeParticleId'][missing].iloc[0]!r}")
    return table


def _export_images(config: Config, split: str, ids: pd.Series) -> pd.DataFrame:
    """``rlnImageName`` (and ``rlnCtfImage`` where exported) of each particle, relative to ``config.output_dir``."""
    export_dir = Path(config.output_dir) / "export" / split
    export_star = export_dir / "particles.star"
    if not export_star.is_file():
        raise InputError(f"{export_star}: exported subtomograms of split {split!r} are missing")
    exported = starfile.read(export_star, always_dict=True,
                             parse_as_string=[*STRING_COLUMNS, *IMAGE_COLUMNS])["particles"]
    exported = exported.set_index(exported["cryovaeParticleId"].astype(str))
    missing = [p for p in ids if p not in exported.index]
    if missing:
        raise InputError(f"{export_star}: particle {missing[0]!r} was not exported")
    rel = os.path.relpath(export_dir, config.output_dir)
    columns = [c for c in IMAGE_COLUMNS if c in exported.columns]
    return pd.DataFrame({c: [f"{rel}/{exported.at[p, c]}" for p in ids] for c in columns}, index=ids.index)


def _prior_columns(config: Config, table: pd.DataFrame) -> pd.DataFrame:
    """The standard coordinate-table columns (see :mod:`cryovae.star`) that every format carries."""
    numbers = {name: i + 1 for i, name in enumerate(config.class_names)}
    return pd.DataFrame({
        "rot_deg": table["angle_rot"],
        "tilt_deg": table["angle_tilt"],
        "psi_deg": table["angle_psi"],
        "rlnAngleTiltPrior": table["angle_tilt"],
        "rlnAnglePsiPrior": table["angle_psi"],
        "origin_x_angstrom": table["origin_x_angstrom"],
        "origin_y_angstrom": table["origin_y_angstrom"],
        "origin_z_angstrom": table["origin_z_angstrom"],
        "class_number": [numbers.get(c, 0) for c in table["predicted_class"]],
        "cryovaeClassName": table["predicted_class"],
        "cryovaeConfidence": table["confidence"],
        "cryovaeUnknownScore": table["unknown_score"],
        "cryovaeParticleId": table["cryovaeParticleId"],
        **{star: table[column].astype(dtype) for column, (star, dtype) in CONFIDENCE_COLUMNS.items()
           if column in table.columns},
        **{col: table[col] for col in CTF_COLUMNS if col in table.columns},
    })


def _tomogram_shapes(config: Config, names) -> dict[str, tuple[int, int, int]]:
    """(nx, ny, nz) of each named tomogram, read from its MRC header."""
    shapes = {}
    for name in set(names):
        path = config.extraction.tomograms[name].tomogram
        with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            nz, ny, nx = mrc.data.shape
        shapes[name] = (nx, ny, nz)
    return shapes


def _coordinates(config: Config, split: SubtomogramSet, table: pd.DataFrame):
    """(tomo names, x/y/z pixels, tomogram shapes, tilt-series pixel size, image names or None)."""
    if "rlnTomoName" in table.columns:
        xyz = table[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(np.float64)
        optics = split.optics
        tomo_px = (float(optics["rlnTomoTiltSeriesPixelSize"].iloc[0]) if "rlnTomoTiltSeriesPixelSize" in optics
                   else split.pixel_size_angstrom / config.extraction.binning)
        # RELION 3 reads subtomogram files: the extracted particles are exported too
        images = (_export_images(config, split.folder.name, table["cryovaeParticleId"])
                  if config.priors.format == "relion3" else None)
        return table["rlnTomoName"].astype(str), xyz, _tomogram_shapes(config, table["rlnTomoName"]), tomo_px, images
    images = _export_images(config, split.folder.name, table["cryovaeParticleId"])
    box = config.box_size
    names = images["rlnImageName"].map(lambda p: Path(p).stem)
    xyz = np.full((len(table), 3), box / 2)
    return names, xyz, {n: (box, box, box) for n in names}, config.pixel_size_angstrom, images


def _microscope(config: Config, split: SubtomogramSet) -> dict[str, float]:
    """Voltage, Cs and amplitude contrast from the split's optics (extraction writes the
    tomogram's own), else from ``simulation`` (the simulator's values)."""
    optics, sim = split.optics, config.simulation
    columns = {"voltage_kv": ("rlnVoltage", sim.voltage_kv),
               "spherical_aberration_mm": ("rlnSphericalAberration", sim.spherical_aberration_mm),
               "amplitude_contrast": ("rlnAmplitudeContrast", sim.amplitude_contrast)}
    return {key: float(optics[column].iloc[0]) if column in optics else default
            for key, (column, default) in columns.items()}


def write_priors(config: Config, embeddings: Path, split_dir: Path, output: Path) -> None:
    """Write ``output`` (all particles) and ``output``'s stem folder with one file per predicted class."""
    split = SubtomogramSet.open(split_dir)
    table = _joined(_read_embeddings(embeddings), split.particles, embeddings)
    output = Path(output)
    tomo, xyz, shapes, tomo_px, images = _coordinates(config, split, table)
    rows = _prior_columns(config, table)
    rows.insert(0, "tomo_name", tomo.to_numpy())
    for k, axis in enumerate("xyz"):
        rows.insert(1 + k, f"{axis}_px", xyz[:, k])
    if images is not None:
        for column in images.columns:
            rows[column] = images[column].to_numpy()
    optics = OpticsInfo(
        tilt_series_pixel_size_angstrom=tomo_px, image_pixel_size_angstrom=split.pixel_size_angstrom,
        image_size_px=config.box_size, **_microscope(config, split),
    )
    _write(config, rows, output, optics, shapes)
    _write_per_class(config, rows, output.with_suffix(""), optics, shapes)
    undetermined = _undetermined(rows)
    _write(config, undetermined, global_search_path(output), optics, shapes)
    log.info("priors: %d particles written to %s (%s); %d without a determined orientation also to %s",
             len(rows), output, config.priors.format, len(undetermined), global_search_path(output))


def _undetermined(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose pose the matcher did not determine, without angle priors (none without confidence)."""
    if "cryovaePoseDetermined" not in rows.columns:
        return rows.iloc[:0].drop(columns=list(PRIOR_ANGLE_COLUMNS))
    return rows[rows["cryovaePoseDetermined"].to_numpy() == 0].drop(columns=list(PRIOR_ANGLE_COLUMNS))


def _write(config: Config, rows: pd.DataFrame, path: Path, optics: OpticsInfo, shapes) -> None:
    fmt = config.priors.format
    if fmt == "relion5":
        write_relion5_particles(rows, path, optics, shapes)
    elif fmt == "relion4":
        write_relion4_particles(rows, path, optics)
    else:
        _write_relion3(rows, path, optics)


def _write_relion3(rows: pd.DataFrame, path: Path, optics: OpticsInfo) -> None:
    """RELION 3.1 subtomograms: ``rlnImageName`` required (extracted splits are exported first)."""
    from cryovae.export import write_relion3_particles_star

    if "rlnImageName" not in rows.columns:
        raise InputError(f"{path}: relion3 priors need exported subtomograms (rlnImageName)")
    renamed = rows.drop(columns=["tomo_name", "x_px", "y_px", "z_px"]).rename(columns={
        "rot_deg": "rlnAngleRot", "tilt_deg": "rlnAngleTilt", "psi_deg": "rlnAnglePsi",
        "origin_x_angstrom": "rlnOriginXAngst", "origin_y_angstrom": "rlnOriginYAngst",
        "origin_z_angstrom": "rlnOriginZAngst", "class_number": "rlnClassNumber",
    })
    write_relion3_particles_star(renamed, optics.block(), path)


def _write_per_class(config: Config, rows: pd.DataFrame, folder: Path, optics: OpticsInfo, shapes) -> None:
    """One STAR per predicted class (``unknown.star`` too), swapped in as a whole folder."""
    with atomic_dir(folder) as tmp:
        for name, group in rows.groupby("cryovaeClassName", sort=True):
            _write(config, group.copy(), tmp / f"{name}.star", optics, shapes)
