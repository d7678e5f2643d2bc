"""Subtomograms cut out of a tomogram at picked coordinates, written in the shard format.

Coordinates (RELION 4 / RELION 5 STAR or CSV, see :mod:`cryovae.star`) are in pixels of the
tomogram MRC, 0-based: voxel ``data[k, j, i]`` (z, y, x) is centred at (x, y, z) = (i, j, k).

Box geometry (``B`` = ``config.box_size``, ``b`` = ``config.extraction.binning``):

- The box covers ``B * b`` tomogram voxels per axis starting at voxel
  ``s = floor(X - b * (B // 2) - (b - 1) / 2 + 0.5)`` and is block-averaged by ``b``.
  Binned voxel k is the mean of tomogram voxels ``s + b k ... s + b k + b - 1``, centred at
  ``s + b k + (b - 1) / 2`` tomogram pixels.
- So box voxel ``B // 2`` (RELION's centre) is centred at ``C = s + b (B // 2) + (b - 1) / 2``,
  the grid point nearest the picked X: ``|X - C| <= 0.5`` tomogram pixels.  ``X - C`` is
  written per particle as ``cryovaeExtractionShiftX/Y/ZAngst`` (Å); it is 0 for b = 1 and
  integer coordinates, and -0.5 px for b = 2 and integer coordinates.  (A RELION particle
  centred at X in this box would carry ``rlnOrigin = -(X - C)`` in Å.)
- The subtomogram pixel size is the tomogram's times b.  ``extraction.binning: auto`` takes b as
  the integer nearest the workflow's pixel size over the tomogram's (and checks it is exact).

Acquisition metadata (:mod:`cryovae.acquisition`, from the tomogram's ``acquisition`` file or
its ``tilt_range_deg`` and microscope keys) travels with the particles: the optics get
``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``; every particle its
``rlnCenteredCoordinateX/Y/ZAngst`` (RELION 5: (pixel - size/2) x tomogram pixel size),
``rlnDefocusU/V/Angle`` (Å: the defocus at the particle at the tilt nearest 0, from
:func:`cryovae.ctf.defocus_offset_angstrom`), ``cryovaeTiltMinDeg/MaxDeg`` and
``cryovaeInvertContrast``; and ``acquisition.star`` (:func:`cryovae.acquisition.write_acquisition_star`)
holds the per-tilt table, so that matching and export compute each particle's own 3D CTF.
``invert_contrast: true`` multiplies every cut box by -1.

The whole output folder is built in a temporary folder beside it and renamed into place,
so a failed run leaves no ``particles.star`` and no shards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
from tqdm import tqdm

from cryovae.acquisition import ACQUISITION_STAR, Acquisition, tomogram_acquisition, write_acquisition_star
from cryovae.atomic import atomic_dir, atomic_path
from cryovae.ctf import particle_defocus_um
from cryovae.errors import InputError
from cryovae.star import (
    COORD_COLUMNS, centred_coordinates_angstrom, read_coordinates, star_pixel_size_angstrom, write_star_blocks,
)

log = logging.getLogger(__name__)

_PIXEL_RTOL = 1e-3
_SHIFT_COLUMNS = ("cryovaeExtractionShiftXAngst", "cryovaeExtractionShiftYAngst", "cryovaeExtractionShiftZAngst")


# ----------------------------------------------------------------------------- the tomogram


@contextlib.contextmanager
def open_tomogram(path: str | Path) -> Iterator[mrcfile.mrcfile.MrcFile]:
    """Memory-map a tomogram MRC read-only; InputError unless it is a real-valued 3D volume."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tomogram file does not exist")
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except ValueError as err:
        raise InputError(f"{path}: not a readable MRC file ({err})") from None
    try:
        data = mrc.data
        if data is None or data.ndim != 3 or mrc.is_image_stack():
            shape = None if data is None else data.shape
            raise InputError(f"{path}: expected a 3D volume (a tomogram), got an array of shape {shape}")
        if np.iscomplexobj(data):
            raise InputError(f"{path}: MRC mode {int(mrc.header.mode)} is complex; expected real voxel values")
        yield mrc
    finally:
        mrc.close()


def header_pixel_size_angstrom(mrc: mrcfile.mrcfile.MrcFile, path: Path) -> float | None:
    """The MRC header's voxel size in Å, None when it is unset (0); InputError if anisotropic."""
    size = np.array([mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z], dtype=np.float64)
    if np.all(size <= 0):
        return None
    if np.ptp(size) > _PIXEL_RTOL * size.max():
        raise InputError(f"{path}: anisotropic voxel size {tuple(size)} Å in the header; expected a cubic voxel")
    return float(size[0])


def resolve_pixel_size_angstrom(config_px: float | None, header_px: float | None, star_px: float | None,
                                trust: str, tomogram_path: Path, star_path: Path, key: str) -> float:
    """The tomogram pixel size: the config's (or else the MRC header's), checked against the STAR's.

    They must agree within 0.1 % unless ``trust`` ("star" or "mrc") names the one to use.
    """
    mrc_px = config_px if config_px is not None else header_px
    if config_px is not None and header_px is not None and abs(config_px - header_px) > _PIXEL_RTOL * config_px:
        log.warning("%s: header voxel size %g Å, config %g Å: using the config's",
                    tomogram_path, header_px, config_px)
    mrc_what = f"extraction.tomograms.{key}.pixel_size_angstrom" if config_px is not None else f"{tomogram_path} header"
    if mrc_px is None and star_px is None:
        raise InputError(
            f"{tomogram_path}: no pixel size (header voxel size is 0 and {star_path} gives none); "
            f"set extraction.tomograms.{key}.pixel_size_angstrom"
        )
    if mrc_px is None or star_px is None:
        return float(mrc_px if mrc_px is not None else star_px)
    if abs(mrc_px - star_px) <= _PIXEL_RTOL * max(mrc_px, star_px):
        return float(mrc_px)
    if trust == "error":
        raise InputError(
            f"{star_path}: pixel size {star_px:g} Å disagrees with {mrc_px:g} Å from {mrc_what}; "
            "set extraction.trust_pixel_size to 'star' or 'mrc' to choose one"
        )
    chosen = star_px if trust == "star" else mrc_px
    log.warning("%s: STAR pixel size %g Å, tomogram %g Å: using %g Å (trust_pixel_size=%s)",
                key, star_px, mrc_px, chosen, trust)
    return float(chosen)


def check_workflow_pixel_size(tomogram_px: float, binning: int, workflow_px: float, tomogram_path: Path,
                             key: str) -> None:
    """InputError unless the tomogram's pixel size times ``binning`` is the workflow's
    ``pixel_size_angstrom`` (the maps' and the model's), saying what to set."""
    extracted = tomogram_px * binning
    if math.isclose(extracted, workflow_px, rel_tol=1e-3):
        return
    factor = workflow_px / tomogram_px
    if round(factor) >= 1 and math.isclose(factor, round(factor), rel_tol=1e-3):
        fix = f"set extraction.binning: {round(factor)} (bins {tomogram_px:g} Å to {workflow_px:g} Å)"
    else:
        fix = (f"{workflow_px:g} / {tomogram_px:g} is not an integer binning: set pixel_size_angstrom to an integer "
               f"multiple of {tomogram_px:g} Å (and extraction.binning to that multiple), or resample the tomogram")
    raise InputError(
        f"{tomogram_path} (extraction.tomograms.{key}): pixel size {tomogram_px:g} Å x extraction.binning "
        f"{binning} = {extracted:g} Å, but the workflow's maps and model are at pixel_size_angstrom "
        f"{workflow_px:g} Å; {fix}"
    )


def resolve_binning(binning: int | str, tomogram_px: float, workflow_px: float) -> int:
    """``extraction.binning``, with ``auto`` the integer nearest workflow / tomogram pixel size (>= 1);
    :func:`check_workflow_pixel_size` then says whether it is exact."""
    if binning != "auto":
        return int(binning)
    return max(1, round(workflow_px / tomogram_px))


def tomogram_mean(data: np.ndarray, target_voxels: int = 2_000_000) -> float:
    """Mean of a (z, y, x) volume from an evenly strided subsample of about ``target_voxels``."""
    stride = max(1, int(np.ceil((data.size / target_voxels) ** (1.0 / 3.0))))
    sample = np.asarray(data[::stride, ::stride, ::stride], dtype=np.float64)
    return float(sample.mean())


# ----------------------------------------------------------------------------- geometry


def box_starts(coords_xyz_px: np.ndarray, box_size: int, binning: int) -> tuple[np.ndarray, np.ndarray]:
    """First tomogram voxel of each box and the picked-minus-box-centre shift.

    coords_xyz_px: (n, 3) picked (x, y, z) in tomogram pixels.  Returns starts (n, 3) int64
    (x, y, z) and shifts (n, 3) float64 in tomogram pixels (see the module docstring).
    """
    coords = np.asarray(coords_xyz_px, dtype=np.float64)
    half = binning * (box_size // 2) + (binning - 1) / 2.0
    starts = np.floor(coords - half + 0.5).astype(np.int64)
    return starts, coords - (starts + half)


def boxes_inside(starts_xyz: np.ndarray, extent: int, shape_xyz) -> np.ndarray:
    """(n,) bool: the box of ``extent`` voxels from ``starts_xyz`` lies wholly in the tomogram."""
    shape = np.asarray(shape_xyz)
    return np.all((starts_xyz >= 0) & (starts_xyz + extent <= shape), axis=1)


def cut_box(data_zyx: np.ndarray, start_xyz: np.ndarray, extent: int, fill: float,
            out: np.ndarray | None = None) -> np.ndarray:
    """The (extent,)*3 float32 block of ``data_zyx`` from ``start_xyz``; voxels outside get ``fill``.

    ``out``: an optional float32 (extent,)*3 array to write into (returned).
    """
    start = np.asarray(start_xyz[::-1])  # z, y, x
    lo = np.maximum(start, 0)
    hi = np.minimum(start + extent, data_zyx.shape)
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    if out is None:
        out = np.empty((extent,) * 3, dtype=np.float32)
    if np.all(lo == start) and np.all(hi == start + extent):
        out[...] = data_zyx[src]
        return out
    out.fill(fill)
    if np.all(hi > lo):
        out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = data_zyx[src]
    return out


def bin_volume(volume: np.ndarray, binning: int) -> np.ndarray:
    """Block mean by an integer factor: (b n, b n, b n) -> (n, n, n), float32.

    Summed one axis at a time over strided views (much faster than a 6-axis reshape mean).
    """
    if binning == 1:
        return volume
    for axis in range(3):
        index = [slice(None)] * 3
        total = None
        for k in range(binning):
            index[axis] = slice(k, None, binning)
            part = volume[tuple(index)]
            total = part.astype(np.float32, copy=True) if total is None else np.add(total, part, out=total)
        volume = total
    volume *= np.float32(1.0 / binning**3)
    return volume


def _normalise_inplace(volume: np.ndarray) -> bool:
    """Zero mean, unit variance in place (contiguous float32); False (mean removed only) if constant.

    Two passes in float32: a pairwise sum for the mean, a BLAS dot for the variance.
    """
    flat = volume.reshape(-1)
    flat -= flat.sum() / np.float32(flat.size)
    std = float(np.sqrt(np.dot(flat, flat) / flat.size))
    if std == 0.0:
        return False
    flat *= np.float32(1.0 / std)
    return True


def _all_finite(volume: np.ndarray) -> bool:
    """True if no NaN or inf (a NaN or inf makes the sum non-finite, so most boxes cost one sum)."""
    return bool(np.isfinite(volume.sum())) or bool(np.isfinite(volume).all())


# ----------------------------------------------------------------------------- the particles


def select_tomogram(table: pd.DataFrame, tomogram: str, path: Path) -> pd.DataFrame:
    """Rows for ``tomogram``: all rows if the file names one tomogram only, else those named so."""
    names = pd.unique(table["tomo_name"])
    if tomogram in names:
        return table[table["tomo_name"] == tomogram].reset_index(drop=True)
    if len(names) == 1:
        log.info("%s: all particles are in tomogram %r; used for %r", path, names[0], tomogram)
        return table.reset_index(drop=True)
    raise InputError(
        f"{path}: the file holds tomograms {sorted(map(str, names))[:10]} but none named {tomogram!r} "
        "(the key in extraction.tomograms)"
    )


def check_inside_tomogram(coords_xyz_px: np.ndarray, shape_xyz, path: Path, tomogram_path: Path) -> None:
    """InputError naming the first particle whose coordinate lies outside the tomogram altogether."""
    shape = np.asarray(shape_xyz, dtype=np.float64)
    outside = np.any((coords_xyz_px < -0.5) | (coords_xyz_px > shape - 0.5), axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"{path}: particle {i + 1} at (x, y, z) = {tuple(round(float(v), 3) for v in coords_xyz_px[i])} px "
            f"lies outside "
            f"tomogram {tomogram_path} of size (x, y, z) = {tuple(int(s) for s in shape)} px "
            f"({int(outside.sum())} particle(s) outside)"
        )


@dataclass
class _Plan:
    """Which particles are cut, from where, and into which shard."""

    rows: np.ndarray  # (m,) row of the coordinate table
    starts: np.ndarray  # (m, 3) first tomogram voxel, x y z
    shifts_px: np.ndarray  # (m, 3) picked minus box centre, tomogram pixels
    n_outside: int


def _plan(coords: np.ndarray, shape_xyz, box_size: int, binning: int, out_of_bounds: str) -> _Plan:
    starts, shifts = box_starts(coords, box_size, binning)
    inside = boxes_inside(starts, box_size * binning, shape_xyz)
    keep = np.ones(len(coords), bool) if out_of_bounds == "pad" else inside
    rows = np.flatnonzero(keep)
    return _Plan(rows, starts[rows], shifts[rows], int((~inside).sum()))


def _cut_boxes(data, plan: _Plan, indices: range, binning: int, fill: float, normalise: bool,
               where: tuple[Path, Path], out: np.ndarray, progress: tqdm) -> int:
    """Cut the planned boxes ``indices`` into ``out[:len(indices)]`` ((n, B, B, B) float32, reused
    between shards so its pages are touched once); returns how many were constant (not normalisable)."""
    coords_path, tomogram_path = where
    box_size = out.shape[1]
    n_constant = 0
    for j, k in enumerate(indices):
        if binning == 1:
            vol = cut_box(data, plan.starts[k], box_size, fill, out=out[j])
        else:
            vol = out[j]
            vol[...] = bin_volume(cut_box(data, plan.starts[k], box_size * binning, fill), binning)
        if not _all_finite(vol):
            raise InputError(
                f"{tomogram_path}: NaN or infinite values in the box of particle {plan.rows[k] + 1} "
                f"of {coords_path}"
            )
        if normalise:
            n_constant += not _normalise_inplace(vol)
        progress.update()
    return n_constant


# ----------------------------------------------------------------------------- output


def acquisition_columns(acq: Acquisition, centred_xyz_angstrom: np.ndarray, invert_contrast: bool) -> dict:
    """Per-particle acquisition columns (see the module docstring), each (n,)."""
    zero = int(np.argmin(np.abs(acq.tilt_deg)))
    defocus_angstrom = particle_defocus_um(acq.defocus_um, acq.tilt_deg, centred_xyz_angstrom)[:, zero] * 1e4
    lo, hi = acq.tilt_range_deg
    n = len(centred_xyz_angstrom)
    columns = {f"rlnCenteredCoordinate{a}Angst": centred_xyz_angstrom[:, k] for k, a in enumerate("XYZ")}
    columns.update({"rlnDefocusU": defocus_angstrom, "rlnDefocusV": defocus_angstrom, "rlnDefocusAngle": np.zeros(n),
                    "cryovaeTiltMinDeg": np.full(n, lo), "cryovaeTiltMaxDeg": np.full(n, hi),
                    "cryovaeInvertContrast": np.full(n, int(invert_contrast))})
    return columns


def _particles_table(table: pd.DataFrame, plan: _Plan, tomogram: str, per_shard: int,
                     pixel_size_angstrom: float) -> pd.DataFrame:
    rows = table.iloc[plan.rows]
    order = np.arange(len(plan.rows))
    out = pd.DataFrame({
        "cryovaeParticleId": [f"{tomogram}_{i:06d}" for i in plan.rows],
        "cryovaeShard": [f"shard_{k:03d}.npy" for k in order // per_shard],
        "cryovaeIndex": order % per_shard,
        "cryovaeClassName": "unknown",
        "rlnClassNumber": 0,
        "rlnTomoName": rows["tomo_name"].astype(str).to_numpy(),
    })
    for axis, col in zip("XYZ", COORD_COLUMNS):
        out[f"rlnCoordinate{axis}"] = rows[col].to_numpy(dtype=np.float64)
    for k, col in enumerate(_SHIFT_COLUMNS):
        out[col] = plan.shifts_px[:, k] * pixel_size_angstrom
    return out


def _optics_table(pixel_size_angstrom: float, binning: int, box_size: int, acq: Acquisition) -> pd.DataFrame:
    return pd.DataFrame([{
        "rlnOpticsGroup": 1,
        "rlnTomoTiltSeriesPixelSize": pixel_size_angstrom,
        "rlnTomoSubtomogramBinning": binning,
        "rlnImagePixelSize": pixel_size_angstrom * binning,
        "rlnImageSize": box_size,
        "rlnImageDimensionality": 3,
        "rlnVoltage": acq.voltage_kv,
        "rlnSphericalAberration": acq.spherical_aberration_mm,
        "rlnAmplitudeContrast": acq.amplitude_contrast,
    }])


# ----------------------------------------------------------------------------- the stage


@dataclass
class _Job:
    """Everything decided before any box is cut."""

    tomogram: str
    tomo_path: Path
    coords_path: Path
    pixel_size_angstrom: float
    binning: int
    table: pd.DataFrame
    plan: _Plan
    fill: float
    acquisition: Acquisition
    shape_xyz: tuple[int, int, int]
    invert_contrast: bool
    truth: pd.DataFrame | None = None


def read_truth(path: Path, shape_xyz, pixel_size_angstrom: float, tomogram: str) -> pd.DataFrame:
    """A ground-truth STAR as a coordinate table for ``tomogram``: InputError unless it has
    cryovaeClassName and the RELION angles."""
    table = select_tomogram(read_coordinates(path, shape_xyz, pixel_size_angstrom, tomogram), tomogram, path)
    missing = [c for c in ("cryovaeClassName", "rot_deg", "tilt_deg", "psi_deg") if c not in table.columns]
    if missing:
        raise InputError(f"{path}: truth STAR lacks {missing} (expected cryovaeClassName and rlnAngleRot/Tilt/Psi)")
    return table


def truth_columns(picks_xyz_px: np.ndarray, box_centres_xyz_px: np.ndarray, truth: pd.DataFrame,
                  pixel_size_angstrom: float, max_distance_px: float) -> pd.DataFrame:
    """The truth of each pick: the nearest true particle within ``max_distance_px``, else ``unknown``.

    picks and box centres: (n, 3) tomogram pixels.  Returns (n rows) cryovaeClassName,
    rlnClassNumber, cryovaeNovel, rlnAngleRot/Tilt/Psi and rlnOriginX/Y/ZAngst = -(true
    position - box centre) x pixel size (NaN angles and origins for picks with no truth).
    """
    from scipy.spatial import cKDTree

    true_xyz = truth[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)
    distance, nearest = cKDTree(true_xyz).query(picks_xyz_px)
    hit = distance <= max_distance_px
    rows = truth.iloc[np.where(hit, nearest, 0)].reset_index(drop=True)
    out = pd.DataFrame({"cryovaeClassName": np.where(hit, rows["cryovaeClassName"].astype(str), "unknown")})
    number = rows["class_number"].to_numpy(dtype=np.int64) if "class_number" in rows else np.zeros(len(rows), int)
    out["rlnClassNumber"] = np.where(hit, number, 0)
    novel = pd.to_numeric(rows["cryovaeNovel"]).to_numpy(dtype=np.int64) if "cryovaeNovel" in rows \
        else np.zeros(len(rows), int)
    out["cryovaeNovel"] = np.where(hit, novel, 0)
    for col, label in zip(("rot_deg", "tilt_deg", "psi_deg"), ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        out[label] = np.where(hit, rows[col].to_numpy(dtype=np.float64), np.nan)
    origin = -(true_xyz[np.where(hit, nearest, 0)] - box_centres_xyz_px) * pixel_size_angstrom
    for k, axis in enumerate("XYZ"):
        out[f"rlnOrigin{axis}Angst"] = np.where(hit, origin[:, k], np.nan)
    return out


def _prepare(config, tomogram: str, mrc) -> _Job:
    """Pixel size, coordinates, bounds checks and the box plan for one tomogram."""
    ext = config.extraction
    spec = ext.tomograms[tomogram]
    tomo_path, coords_path = Path(spec.tomogram), Path(spec.coordinates)
    shape_xyz = tuple(int(s) for s in mrc.data.shape[::-1])
    pixel = resolve_pixel_size_angstrom(
        spec.pixel_size_angstrom, header_pixel_size_angstrom(mrc, tomo_path),
        star_pixel_size_angstrom(coords_path), ext.trust_pixel_size, tomo_path, coords_path, tomogram,
    )
    binning = resolve_binning(ext.binning, pixel, config.pixel_size_angstrom)
    check_workflow_pixel_size(pixel, binning, config.pixel_size_angstrom, tomo_path, tomogram)
    acquisition = tomogram_acquisition(spec, tomogram)
    table = select_tomogram(read_coordinates(coords_path, shape_xyz, pixel, tomogram), tomogram, coords_path)
    if len(table) == 0:
        raise InputError(f"{coords_path}: no particles for tomogram {tomogram!r}")
    coords = table[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)
    check_inside_tomogram(coords, shape_xyz, coords_path, tomo_path)
    plan = _plan(coords, shape_xyz, config.box_size, binning, ext.out_of_bounds)
    if len(plan.rows) == 0:
        raise InputError(
            f"{coords_path}: all {len(coords)} boxes of {config.box_size * binning} px leave tomogram "
            f"{tomo_path}; set extraction.out_of_bounds: pad to keep them"
        )
    fill = 0.0
    if plan.n_outside and ext.out_of_bounds == "pad":
        fill = tomogram_mean(mrc.data)
        if not np.isfinite(fill):
            raise InputError(f"{tomo_path}: the tomogram contains NaN or infinite values")
    truth = None if spec.truth is None else read_truth(Path(spec.truth), shape_xyz, pixel, tomogram)
    return _Job(tomogram, tomo_path, coords_path, pixel, binning, table, plan, fill, acquisition, shape_xyz,
                spec.invert_contrast, truth)


def _write_output(config, job: _Job, data, output_dir: Path) -> tuple[int, int]:
    """Cut, write the shards and particles.star into ``output_dir`` at once; (shards, constant boxes)."""
    ext, box = config.extraction, config.box_size
    per_shard, n_rows, n_constant = ext.particles_per_shard, len(job.plan.rows), 0
    n_shards = int(np.ceil(n_rows / per_shard))
    particles = _particles_table(job.table, job.plan, job.tomogram, per_shard, job.pixel_size_angstrom)
    centred = centred_coordinates_angstrom(particles[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
                                           .to_numpy(np.float64), job.shape_xyz, job.pixel_size_angstrom)
    for name, values in acquisition_columns(job.acquisition, centred, job.invert_contrast).items():
        particles[name] = values
    if job.truth is not None:
        picks = job.table[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)[job.plan.rows]
        truth = truth_columns(picks, picks - job.plan.shifts_px, job.truth, job.pixel_size_angstrom, box / 4)
        for col in truth.columns:
            particles[col] = truth[col].to_numpy()
    with atomic_dir(output_dir) as tmp, tqdm(total=n_rows, desc=f"extract {job.tomogram}", unit="particle",
                                              disable=None, leave=False) as progress:
        buffer = np.empty((min(per_shard, n_rows), box, box, box), dtype=np.float32)
        for k in range(n_shards):
            indices = range(k * per_shard, min((k + 1) * per_shard, n_rows))
            n_constant += _cut_boxes(data, job.plan, indices, job.binning, job.fill, ext.normalise,
                                     (job.coords_path, job.tomo_path), buffer, progress)
            if job.invert_contrast:
                np.negative(buffer[: len(indices)], out=buffer[: len(indices)])
            with atomic_path(tmp / f"shard_{k:03d}.npy") as shard_tmp:
                np.save(shard_tmp, buffer[: len(indices)])
        # the shards.py layout, written without a timestamp (same config, same bytes)
        optics = _optics_table(job.pixel_size_angstrom, job.binning, box, job.acquisition)
        write_star_blocks({"optics": optics, "particles": particles}, tmp / "particles.star")
        write_acquisition_star({job.tomogram: job.acquisition}, tmp / ACQUISITION_STAR)
    return n_shards, n_constant


def extract_tomogram(config, tomogram: str, output_dir: Path) -> None:
    """Cut ``config.box_size``³ subtomograms of one tomogram into ``output_dir`` (shards + particles.star).

    ``config.extraction.tomograms[tomogram]`` names the MRC and the coordinates file.  Boxes
    that leave the tomogram are padded with the tomogram mean (from a strided subsample) or
    skipped (``extraction.out_of_bounds``); optional binning and per-particle normalisation.
    Bad input (not a 3D real MRC, missing columns, NaNs in a box, coordinates outside the
    tomogram, disagreeing pixel sizes) raises InputError and writes nothing.
    """
    ext = config.extraction
    if tomogram not in ext.tomograms:
        raise InputError(f"extraction.tomograms has no tomogram {tomogram!r}; configured: {sorted(ext.tomograms)}")
    with open_tomogram(ext.tomograms[tomogram].tomogram) as mrc:
        job = _prepare(config, tomogram, mrc)
        n_shards, n_constant = _write_output(config, job, mrc.data, Path(output_dir))
    action = f"padded with {job.fill:.4g}" if ext.out_of_bounds == "pad" else "skipped"
    log.info("%s: %d particles in %d shard(s) of %d px at %.4g Å/px; %d box(es) left the tomogram (%s)",
             tomogram, len(job.plan.rows), n_shards, config.box_size, job.pixel_size_angstrom * job.binning,
             job.plan.n_outside, action)
    if n_constant:
        log.warning("%s: %d constant box(es) could not be normalised (mean removed only)", tomogram, n_constant)
