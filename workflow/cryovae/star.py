"""Particle coordinates in and out: RELION 4 and RELION 5 STAR files, and plain CSV.

Everything inside the package uses one **coordinate table** (a DataFrame):

====================================  =========================================================
``tomo_name``                         tomogram name (str)
``x_px``, ``y_px``, ``z_px``          position in tomogram pixels (float), 0-based: the centre
                                      of voxel (z, y, x) of the MRC array is at (x, y, z)
``rot_deg``, ``tilt_deg``, ``psi_deg``  optional RELION Euler angles (see :mod:`cryovae.rotations`)
``origin_x_angstrom`` (y, z)          optional ``rlnOriginX/Y/ZAngst``
``class_number``                      optional ``rlnClassNumber``
any other column                      passed through unchanged (e.g. ``rlnAngleTiltPrior``)
====================================  =========================================================

File formats:

- **RELION 4**: ``rlnTomoName``, ``rlnCoordinateX/Y/Z`` in (unbinned) tomogram pixels, in a
  ``data_particles`` block (or the only block of a coordinates file), optional
  ``data_optics``.
- **RELION 5**: ``data_general`` / ``data_optics`` / ``data_particles``, positions as
  ``rlnCenteredCoordinateX/Y/ZAngst = (pixel - size / 2) * pixel size``, where ``size`` is
  the tomogram's extent in those pixels (``rlnTomoSizeX/Y/Z`` in RELION's tomograms.star;
  here: the tomogram's own shape, passed in) and ``pixel size`` that of the coordinates
  (``rlnTomoTiltSeriesPixelSize``).  ``size / 2`` is a float division, as in RELION 5.
- **CSV**: a header with ``x, y, z`` (pixels; case-insensitive) and optionally ``tomo`` or
  ``tomo_name``.

The coordinate pixels are the pixels of the tomogram the coordinates are used with:
a STAR pixel size that disagrees with the tomogram's is for the caller to resolve
(:func:`star_pixel_size_angstrom` reads it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryovae.atomic import atomic_path
from cryovae.errors import InputError

AXES = ("x", "y", "z")
COORD_COLUMNS = ("x_px", "y_px", "z_px")
ANGLE_COLUMNS = ("rot_deg", "tilt_deg", "psi_deg")
ORIGIN_COLUMNS = ("origin_x_angstrom", "origin_y_angstrom", "origin_z_angstrom")

# standard table column -> RELION label (both versions)
_RELION_NAMES = {
    "tomo_name": "rlnTomoName",
    "rot_deg": "rlnAngleRot",
    "tilt_deg": "rlnAngleTilt",
    "psi_deg": "rlnAnglePsi",
    "origin_x_angstrom": "rlnOriginXAngst",
    "origin_y_angstrom": "rlnOriginYAngst",
    "origin_z_angstrom": "rlnOriginZAngst",
    "class_number": "rlnClassNumber",
}
_R4_COORDS = tuple(f"rlnCoordinate{a.upper()}" for a in AXES)
_R5_COORDS = tuple(f"rlnCenteredCoordinate{a.upper()}Angst" for a in AXES)

ShapeSpec = tuple[int, int, int] | Mapping[str, tuple[int, int, int]]


@dataclass(frozen=True)
class OpticsInfo:
    """What the ``data_optics`` block says.

    ``tilt_series_pixel_size_angstrom`` is the pixel size of the coordinates
    (``rlnTomoTiltSeriesPixelSize``); ``image_pixel_size_angstrom`` that of the subtomograms
    (``rlnImagePixelSize``, default: the same); ``image_size_px`` their box (``rlnImageSize``).
    """

    tilt_series_pixel_size_angstrom: float
    image_pixel_size_angstrom: float | None = None
    image_size_px: int | None = None
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07
    optics_group_name: str = "opticsGroup1"

    def block(self) -> pd.DataFrame:
        """The one-row ``data_optics`` table (optics group 1)."""
        image_px = self.image_pixel_size_angstrom or self.tilt_series_pixel_size_angstrom
        row = {
            "rlnOpticsGroup": 1,
            "rlnOpticsGroupName": self.optics_group_name,
            "rlnSphericalAberration": self.spherical_aberration_mm,
            "rlnVoltage": self.voltage_kv,
            "rlnAmplitudeContrast": self.amplitude_contrast,
            "rlnTomoTiltSeriesPixelSize": self.tilt_series_pixel_size_angstrom,
            "rlnImagePixelSize": image_px,
            "rlnTomoSubtomogramBinning": image_px / self.tilt_series_pixel_size_angstrom,
            "rlnImageDimensionality": 3,
        }
        if self.image_size_px is not None:
            row["rlnImageSize"] = int(self.image_size_px)
        return pd.DataFrame([row])


# ----------------------------------------------------------------------------- reading


def _read_star_blocks(path: Path) -> dict[str, pd.DataFrame]:
    """All blocks of a STAR file as DataFrames (a one-value block becomes one row)."""
    if not path.is_file():
        raise InputError(f"{path}: coordinates file does not exist")
    blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnTomoName"])
    if not blocks:
        raise InputError(f"{path}: no data blocks found (expected a STAR file with particle coordinates)")
    return {name: (blk if isinstance(blk, pd.DataFrame) else pd.DataFrame([blk])) for name, blk in blocks.items()}


def _particle_block(path: Path, blocks: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The block holding coordinates: ``particles`` if present, else the first with coordinates."""
    if "particles" in blocks:
        return blocks["particles"]
    for block in blocks.values():
        if _R4_COORDS[0] in block.columns or _R5_COORDS[0] in block.columns:
            return block
    raise InputError(
        f"{path}: no block has column _{_R4_COORDS[0]} (RELION 4) or _{_R5_COORDS[0]} (RELION 5); "
        f"blocks found: {', '.join('data_' + b for b in blocks)}"
    )


def _require(path: Path, table: pd.DataFrame, columns, what: str) -> None:
    for col in columns:
        if col not in table.columns:
            raise InputError(f"{path}: missing column {col} ({what})")


def _numeric(path: Path, table: pd.DataFrame, col: str, row_label: str = "row", first: int = 1) -> np.ndarray:
    """A column as float64; InputError naming the row (or CSV line) of a non-number or NaN."""
    values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise InputError(
            f"{path}: column {col}, {row_label} {bad[0] + first}: expected a finite number, "
            f"got {table[col].iloc[bad[0]]!r}"
        )
    return values


def _shape_for(path: Path, shape: ShapeSpec | None, tomo: str) -> np.ndarray:
    if shape is None:
        raise InputError(f"{path}: RELION 5 centred coordinates need the tomogram shape to convert to pixels")
    if isinstance(shape, Mapping):
        if tomo not in shape:
            raise InputError(f"{path}: no tomogram shape given for rlnTomoName {tomo!r}")
        shape = shape[tomo]
    return np.asarray(shape, dtype=np.float64)


def _relion_to_table(path: Path, block: pd.DataFrame, shape: ShapeSpec | None, pixel_size: float | None,
                     default_tomo: str) -> pd.DataFrame:
    """RELION 4 or 5 particle block -> coordinate table."""
    out = pd.DataFrame(index=range(len(block)))
    has_names = "rlnTomoName" in block.columns
    out["tomo_name"] = block["rlnTomoName"].astype(str).to_numpy() if has_names else default_tomo
    if _R5_COORDS[0] in block.columns:
        _require(path, block, _R5_COORDS, "RELION 5 centred coordinates in Å")
        if pixel_size is None:
            raise InputError(f"{path}: RELION 5 centred coordinates need a pixel size to convert to pixels")
        angst = np.stack([_numeric(path, block, c) for c in _R5_COORDS], axis=1)
        sizes = np.stack([_shape_for(path, shape, t) for t in out["tomo_name"]]) if len(block) else np.zeros((0, 3))
        pixels = angst / pixel_size + sizes / 2.0
    else:
        _require(path, block, _R4_COORDS, "RELION 4 coordinates in pixels")
        pixels = np.stack([_numeric(path, block, c) for c in _R4_COORDS], axis=1)
    consumed = set(_R4_COORDS) | set(_R5_COORDS)  # one representation of the position is kept
    for k, col in enumerate(COORD_COLUMNS):
        out[col] = pixels[:, k]
    for ours, theirs in _RELION_NAMES.items():
        if theirs in block.columns and ours != "tomo_name":
            out[ours] = _numeric(path, block, theirs)
        consumed.add(theirs)
    if "class_number" in out.columns:
        out["class_number"] = out["class_number"].astype(int)
    for col in block.columns:
        if col not in consumed:
            out[col] = block[col].to_numpy()
    return out


def _read_csv(path: Path, default_tomo: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=None, engine="python", comment="#", skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{path}: cannot read as CSV with a header x, y, z: {err}") from None
    lower = {str(c).strip().lower(): c for c in table.columns}
    out = pd.DataFrame(index=range(len(table)))
    tomo_col = lower.get("tomo_name", lower.get("tomo"))
    out["tomo_name"] = table[tomo_col].astype(str).to_numpy() if tomo_col else default_tomo
    for axis, col in zip(AXES, COORD_COLUMNS):
        if axis not in lower:
            raise InputError(f"{path}: missing column {axis} (expected a CSV header with x, y, z in pixels)")
        out[col] = _numeric(path, table, lower[axis], row_label="data line", first=1)
    return out


def _load(path: Path) -> tuple[str, pd.DataFrame | None]:
    """(format, particle block or None for CSV), from the file's content."""
    if not path.is_file():
        raise InputError(f"{path}: coordinates file does not exist")
    with open(path, errors="replace") as fh:
        for line in fh:
            text = line.strip()
            if text and not text.startswith("#"):
                break
        else:
            raise InputError(f"{path}: the coordinates file is empty")
    if not (text.startswith("data_") or path.suffix.lower() == ".star"):
        return "csv", None
    block = _particle_block(path, _read_star_blocks(path))
    return ("relion5" if _R5_COORDS[0] in block.columns else "relion4"), block


def coordinates_format(path: str | Path) -> str:
    """``"relion4"``, ``"relion5"`` or ``"csv"``, from the file's content."""
    return _load(Path(path))[0]


def read_coordinates(
    path: str | Path,
    tomogram_shape_xyz: ShapeSpec | None = None,
    pixel_size_angstrom: float | None = None,
    default_tomo_name: str = "",
) -> pd.DataFrame:
    """Read RELION 4, RELION 5 or CSV coordinates (detected) into the coordinate table.

    tomogram_shape_xyz: (nx, ny, nz) pixels, or tomo name -> shape; pixel_size_angstrom: the
    pixel size of the coordinates.  Both are only used (and then required) for RELION 5.
    ``default_tomo_name`` fills ``tomo_name`` when the file has no tomogram column.
    Errors (:class:`InputError`) name the file and the missing column or bad row.
    """
    path = Path(path)
    fmt, block = _load(path)
    if fmt == "csv":
        return _read_csv(path, default_tomo_name)
    return _relion_to_table(path, block, tomogram_shape_xyz, pixel_size_angstrom, default_tomo_name)


def count_coordinates(path: str | Path, tomogram: str) -> int:
    """Picks of ``tomogram`` in a coordinates file: the rows naming it, or every row where the
    file names no such tomogram (as extraction reads it); nothing is checked beyond the format."""
    path = Path(path)
    fmt, block = _load(path)
    table, column = (_read_csv(path, tomogram), "tomo_name") if fmt == "csv" else (block, "rlnTomoName")
    if column in table.columns:
        named = int((table[column].astype(str) == tomogram).sum())
        if named:
            return named
    return len(table)


def star_pixel_size_angstrom(path: str | Path) -> float | None:
    """The pixel size of a STAR file's coordinates, or None when it does not say (or for CSV).

    Taken from ``rlnTomoTiltSeriesPixelSize`` (optics, then particles), else
    ``rlnImagePixelSize / rlnTomoSubtomogramBinning``.  Several different values: InputError.
    """
    path = Path(path)
    if _load(path)[0] == "csv":
        return None
    blocks = _read_star_blocks(path)
    for name in ("optics", "particles"):
        block = blocks.get(name)
        if block is None:
            continue
        if "rlnTomoTiltSeriesPixelSize" in block.columns:
            values = _numeric(path, block, "rlnTomoTiltSeriesPixelSize")
        elif "rlnImagePixelSize" in block.columns and "rlnTomoSubtomogramBinning" in block.columns:
            values = _numeric(path, block, "rlnImagePixelSize") / _numeric(path, block, "rlnTomoSubtomogramBinning")
        else:
            continue
        if len(values) == 0:
            continue
        if np.ptp(values) > 1e-6 * values.max():
            raise InputError(f"{path}: data_{name} lists several pixel sizes {sorted(set(values))}; expected one")
        return float(values[0])
    return None


# ----------------------------------------------------------------------------- writing


def _check_table(df: pd.DataFrame) -> None:
    for col in ("tomo_name",) + COORD_COLUMNS:
        if col not in df.columns:
            raise ValueError(f"coordinate table lacks column {col!r}")
    clash = [c for c in df.columns if c in set(_RELION_NAMES.values()) | set(_R4_COORDS) | set(_R5_COORDS)]
    if clash:
        raise ValueError(f"coordinate table has RELION columns {clash} that the standard columns would write")


def _relion_block(df: pd.DataFrame, coords: dict[str, np.ndarray]) -> pd.DataFrame:
    """Particles block: tomo name, the given coordinate columns, known columns renamed, extras as-is."""
    out = pd.DataFrame({"rlnTomoName": df["tomo_name"].astype(str).to_numpy()})
    for label, values in coords.items():
        out[label] = values
    for ours, theirs in _RELION_NAMES.items():
        if ours in df.columns and ours != "tomo_name":
            out[theirs] = df[ours].to_numpy()
    out["rlnOpticsGroup"] = 1
    standard = set(_RELION_NAMES) | set(COORD_COLUMNS)
    for col in df.columns:
        if col not in standard and col != "rlnOpticsGroup":
            out[col] = df[col].to_numpy()
    return out


def write_star_blocks(blocks: Mapping[str, pd.DataFrame | dict], path: str | Path) -> None:
    """Write STAR data blocks (name -> table, or name -> dict for a one-value block), atomically.

    The same as ``starfile.write`` (floats as ``%.6f``) without its timestamp line, so the
    same input gives the same bytes.
    """
    text = starfile.to_string(dict(blocks), float_format="%.6f")
    if text.startswith("#"):  # starfile's first line is a comment with the time of writing
        text = text.partition("\n")[2]
    text = "# written by cryovae\n\n" + text.lstrip("\n")
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_relion4_particles(df: pd.DataFrame, path: str | Path, optics: OpticsInfo) -> None:
    """Write a coordinate table as a RELION 4 particles file (optics + particles), atomically.

    Coordinates go out as ``rlnCoordinateX/Y/Z`` (pixels, as in the table).
    """
    _check_table(df)
    coords = {label: df[col].to_numpy(dtype=np.float64) for label, col in zip(_R4_COORDS, COORD_COLUMNS)}
    write_star_blocks({"optics": optics.block(), "particles": _relion_block(df, coords)}, path)


def centred_coordinates_angstrom(coords_xyz_px: np.ndarray, shape_xyz, pixel_size_angstrom: float) -> np.ndarray:
    """RELION 5's centred coordinates (n, 3) Å: (pixel - size / 2) x pixel size; ``shape_xyz`` (3,) or (n, 3)."""
    return (np.asarray(coords_xyz_px, dtype=np.float64) - np.asarray(shape_xyz, dtype=np.float64) / 2.0) \
        * pixel_size_angstrom


def write_relion5_particles(df: pd.DataFrame, path: str | Path, optics: OpticsInfo,
                            tomogram_shape_xyz: ShapeSpec) -> None:
    """Write a coordinate table as a RELION 5 particles file (general, optics, particles), atomically.

    Coordinates go out as ``rlnCenteredCoordinateX/Y/ZAngst = (pixel - size / 2) *
    optics.tilt_series_pixel_size_angstrom``, with size from ``tomogram_shape_xyz``
    ((nx, ny, nz), or tomo name -> shape).
    """
    _check_table(df)
    pixels = df[list(COORD_COLUMNS)].to_numpy(dtype=np.float64)
    sizes = np.stack([_shape_for(Path(path), tomogram_shape_xyz, t) for t in df["tomo_name"].astype(str)]) \
        if len(df) else np.zeros((0, 3))
    angst = centred_coordinates_angstrom(pixels, sizes, optics.tilt_series_pixel_size_angstrom)
    coords = {label: angst[:, k] for k, label in enumerate(_R5_COORDS)}
    blocks = {
        "general": {"rlnTomoSubTomosAre2DStacks": 0},
        "optics": optics.block(),
        "particles": _relion_block(df, coords),
    }
    write_star_blocks(blocks, path)


def write_csv_coordinates(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``x, y, z`` (pixels) and ``tomo_name`` as CSV, atomically."""
    _check_table(df)
    table = pd.DataFrame({"tomo_name": df["tomo_name"].astype(str)})
    for axis, col in zip(AXES, COORD_COLUMNS):
        table[axis] = df[col].to_numpy(dtype=np.float64)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
