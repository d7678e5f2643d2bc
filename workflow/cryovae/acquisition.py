"""Per-tomogram acquisition metadata read from the data: tilt angles, defocus, dose, optics.

Readers (all give an :class:`Acquisition`; a malformed file raises InputError naming the
file and line):

- IMOD ``.tlt``: one tilt angle (degrees) per line, blank lines ignored;
- SerialEM ``.mdoc``: global ``Key = value`` lines (``Voltage``, ``PixelSpacing``) and one
  ``[ZValue = k]`` section per image with ``TiltAngle``, ``Defocus`` (SerialEM writes
  underfocus as a negative number; the magnitude is taken), ``ExposureDose`` (e/Å² of that
  image) and, where present, ``PriorRecordDose``.  Images are taken in acquisition order,
  the ZValue order unless ``DateTime`` says otherwise; pre-exposure is the dose of the
  images before (``PriorRecordDose`` when present);
- RELION 5 ``tomograms.star``: ``data_global`` with ``rlnTomoName``, ``rlnVoltage``,
  ``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnTomoTiltSeriesPixelSize`` and
  ``rlnTomoTiltSeriesStarFile`` (relative to the STAR's folder or the working directory),
  a per-tilt STAR with ``rlnTomoNominalStageTiltAngle`` (or ``rlnTomoYTilt``),
  ``rlnDefocusU/V`` (Å) and ``rlnMicrographPreExposure`` (e/Å²).  Without
  ``rlnTomoTiltSeriesStarFile`` the per-tilt table is the block named after the tomogram in
  the same file: the layout of the ``acquisition.star`` extraction writes beside its particles
  (:func:`write_acquisition_star`), so later stages read it with the same reader.

What a file lacks comes from the tomogram's config keys (``voltage_kv``,
``spherical_aberration_mm``, ``amplitude_contrast``, ``defocus_um``) and is otherwise an
error naming the tomogram and the field.  Without a file, ``tilt_range_deg`` stands for a tilt
every :data:`TILT_STEP_DEG` degrees over the range with no dose.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryovae.errors import InputError
from cryovae.star import write_star_blocks

log = logging.getLogger(__name__)

TILT_STEP_DEG = 3.0  # tilt spacing assumed when only a tilt range is given
ACQUISITION_STAR = "acquisition.star"


@dataclass(frozen=True)
class Acquisition:
    """One tilt series' acquisition: per-tilt arrays (n_tilts,) float64 and the microscope.

    ``defocus_um``: underfocus at the tilt axis (positive = underfocus), the mean of
    defocus U and V; ``pre_exposure_e_per_angstrom2``: dose received before each image.
    A field the source lacks is None (see :func:`complete_acquisition`).
    """

    tilt_deg: np.ndarray
    defocus_um: np.ndarray | None = None
    pre_exposure_e_per_angstrom2: np.ndarray | None = None
    voltage_kv: float | None = None
    spherical_aberration_mm: float | None = None
    amplitude_contrast: float | None = None
    pixel_size_angstrom: float | None = None  # the tilt series' pixel size, when the file gives one
    source: str = ""

    @property
    def tilt_range_deg(self) -> tuple[float, float]:
        return float(np.min(self.tilt_deg)), float(np.max(self.tilt_deg))


# ----------------------------------------------------------------------------- readers


def _float(text: str, path: Path, line_no: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{path}, line {line_no}: expected {what} (a number), got {text.strip()!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{path}, line {line_no}: {what} is {text.strip()!r}; expected a finite number")
    return value


def _check_tilts(tilt_deg: np.ndarray, path: Path) -> np.ndarray:
    if len(tilt_deg) == 0:
        raise InputError(f"{path}: no tilt angles")
    bad = np.flatnonzero(np.abs(tilt_deg) > 90.0)
    if len(bad):
        raise InputError(f"{path}: tilt angle {tilt_deg[bad[0]]:g}° (tilt {bad[0] + 1}) outside [-90, 90]")
    return tilt_deg


def read_tlt(path: str | Path) -> Acquisition:
    """An IMOD ``.tlt`` file: tilt angles only."""
    path = Path(path)
    angles = [_float(line, path, k, "a tilt angle in degrees")
              for k, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    return Acquisition(tilt_deg=_check_tilts(np.asarray(angles, dtype=np.float64), path), source=str(path))


_MDOC_SECTION = re.compile(r"\[\s*(\w+)\s*=\s*([^\]]*)\]")


def _mdoc_sections(path: Path) -> tuple[dict[str, tuple[str, int]], list[dict[str, tuple[str, int]]]]:
    """(global key -> (value, line)), and one such mapping per ``[ZValue = k]`` section in file order."""
    header: dict[str, tuple[str, int]] = {}
    sections: list[dict[str, tuple[str, int]]] = []
    current = header
    for k, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        section = _MDOC_SECTION.fullmatch(line)
        if section:
            current = {"ZValue": (section.group(2).strip(), k)} if section.group(1) == "ZValue" else {}
            if section.group(1) == "ZValue":
                sections.append(current)
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise InputError(f"{path}, line {k}: expected 'Key = value' or '[ZValue = n]', got {line!r}")
        current[key.strip()] = (value.strip(), k)
    return header, sections


def _mdoc_value(path: Path, entry: tuple[str, int], what: str) -> float:
    text, line_no = entry
    return _float(text.split()[0] if text.split() else text, path, line_no, what)


def read_mdoc(path: str | Path) -> Acquisition:
    """A SerialEM ``.mdoc`` (see the module docstring)."""
    path = Path(path)
    header, sections = _mdoc_sections(path)
    if not sections:
        raise InputError(f"{path}: no [ZValue = n] sections (expected one per tilt image)")
    for s in sections:
        if "TiltAngle" not in s:
            raise InputError(f"{path}, line {s['ZValue'][1]}: section ZValue = {s['ZValue'][0]} has no TiltAngle")
    if all("DateTime" in s for s in sections):
        order = sorted(range(len(sections)), key=lambda i: pd.to_datetime(sections[i]["DateTime"][0],
                                                                           format="mixed", dayfirst=True))
    else:
        order = list(range(len(sections)))
    tilt = np.array([_mdoc_value(path, s["TiltAngle"], "TiltAngle") for s in sections])
    defocus = None
    if all("Defocus" in s for s in sections):
        defocus = np.abs([_mdoc_value(path, s["Defocus"], "Defocus (µm)") for s in sections])
    pre = None
    if all("PriorRecordDose" in s for s in sections):
        pre = np.array([_mdoc_value(path, s["PriorRecordDose"], "PriorRecordDose") for s in sections])
    elif all("ExposureDose" in s for s in sections):
        dose = np.array([_mdoc_value(path, s["ExposureDose"], "ExposureDose (e/Å²)") for s in sections])
        pre = np.zeros(len(sections))
        pre[order] = np.concatenate([[0.0], np.cumsum(dose[order])[:-1]])
    voltage = _mdoc_value(path, header["Voltage"], "Voltage (kV)") if "Voltage" in header else None
    if voltage is None and all("Voltage" in s for s in sections):
        voltage = _mdoc_value(path, sections[0]["Voltage"], "Voltage (kV)")
    pixel = _mdoc_value(path, header["PixelSpacing"], "PixelSpacing (Å)") if "PixelSpacing" in header else None
    if pixel is None and "PixelSpacing" in sections[0]:
        pixel = _mdoc_value(path, sections[0]["PixelSpacing"], "PixelSpacing (Å)")
    return Acquisition(tilt_deg=_check_tilts(tilt, path), defocus_um=defocus, pre_exposure_e_per_angstrom2=pre,
                       voltage_kv=voltage, pixel_size_angstrom=pixel, source=str(path))


def _star_blocks(path: Path) -> dict[str, pd.DataFrame]:
    blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnTomoName"])
    if not blocks:
        raise InputError(f"{path}: no data blocks found (expected a RELION 5 tomograms STAR file)")
    return {name: (block if isinstance(block, pd.DataFrame) else pd.DataFrame([block]))
            for name, block in blocks.items()}


def _global_row(path: Path, blocks: dict[str, pd.DataFrame], tomogram: str) -> pd.Series:
    if "global" not in blocks or "rlnTomoName" not in blocks["global"].columns:
        raise InputError(f"{path}: expected a data_global block with rlnTomoName (a RELION 5 tomograms.star)")
    table = blocks["global"]
    names = table["rlnTomoName"].astype(str)
    if tomogram in set(names):
        return table[names == tomogram].iloc[0]
    if len(table) == 1:
        log.info("%s describes one tomogram, %r; used for %r", path, names.iloc[0], tomogram)
        return table.iloc[0]
    raise InputError(f"{path}: data_global names tomograms {sorted(names)[:10]} but not {tomogram!r}")


def _tilt_block(path: Path, blocks: dict[str, pd.DataFrame], row: pd.Series) -> tuple[Path, pd.DataFrame]:
    """The per-tilt table of a tomogram: from rlnTomoTiltSeriesStarFile, or the block named after it."""
    name = str(row["rlnTomoName"])
    if "rlnTomoTiltSeriesStarFile" in row.index and isinstance(row["rlnTomoTiltSeriesStarFile"], str):
        target = Path(row["rlnTomoTiltSeriesStarFile"])
        candidates = [target] if target.is_absolute() else [path.parent / target, target]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"{path}: tomogram {name!r}: tilt-series STAR {target} does not exist "
                             f"(looked in {', '.join(str(c) for c in candidates)})")
        tilts = _star_blocks(found)
        return found, tilts.get(name, next(iter(tilts.values())))
    if name not in blocks:
        raise InputError(f"{path}: tomogram {name!r} has no rlnTomoTiltSeriesStarFile and no data_{name} block")
    return path, blocks[name]


def _column(table: pd.DataFrame, names: tuple[str, ...], path: Path) -> np.ndarray | None:
    for name in names:
        if name in table.columns:
            values = pd.to_numeric(table[name], errors="coerce").to_numpy(np.float64)
            if not np.all(np.isfinite(values)):
                bad = int(np.flatnonzero(~np.isfinite(values))[0])
                raise InputError(f"{path}: {name} of tilt {bad + 1} is {table[name].iloc[bad]!r}; expected a number")
            return values
    return None


def read_relion5_tomograms(path: str | Path, tomogram: str) -> Acquisition:
    """One tomogram of a RELION 5 ``tomograms.star`` (or an ``acquisition.star``)."""
    path = Path(path)
    blocks = _star_blocks(path)
    row = _global_row(path, blocks, tomogram)
    tilt_path, tilts = _tilt_block(path, blocks, row)
    tilt = _column(tilts, ("rlnTomoNominalStageTiltAngle", "rlnTomoYTilt"), tilt_path)
    if tilt is None:
        raise InputError(f"{tilt_path}: no rlnTomoNominalStageTiltAngle or rlnTomoYTilt column (tilt angles)")
    u, v = _column(tilts, ("rlnDefocusU",), tilt_path), _column(tilts, ("rlnDefocusV",), tilt_path)
    defocus = None if u is None else (u if v is None else (u + v) / 2.0) / 1e4

    def optic(name: str) -> float | None:
        return float(row[name]) if name in row.index and pd.notna(row[name]) else None

    return Acquisition(
        tilt_deg=_check_tilts(tilt, tilt_path), defocus_um=defocus,
        pre_exposure_e_per_angstrom2=_column(tilts, ("rlnMicrographPreExposure",), tilt_path),
        voltage_kv=optic("rlnVoltage"), spherical_aberration_mm=optic("rlnSphericalAberration"),
        amplitude_contrast=optic("rlnAmplitudeContrast"), pixel_size_angstrom=optic("rlnTomoTiltSeriesPixelSize"),
        source=str(path),
    )


def read_acquisition(path: str | Path, tomogram: str) -> Acquisition:
    """The acquisition of ``tomogram`` from a ``.tlt``, ``.mdoc`` or RELION 5 STAR file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: acquisition file (extraction.tomograms.{tomogram}.acquisition) does not exist")
    suffix = path.suffix.lower()
    if suffix in (".tlt", ".rawtlt"):
        return read_tlt(path)
    if suffix == ".mdoc":
        return read_mdoc(path)
    if suffix == ".star":
        return read_relion5_tomograms(path, tomogram)
    raise InputError(f"{path}: unknown acquisition format {suffix!r}; expected .tlt, .mdoc or a RELION 5 .star")


# ----------------------------------------------------------------------------- completing it


def tilts_from_range(tilt_range_deg: tuple[float, float]) -> np.ndarray:
    """Tilts every :data:`TILT_STEP_DEG` over [min, max], both ends included: (n,) float64."""
    lo, hi = float(tilt_range_deg[0]), float(tilt_range_deg[1])
    n = max(2, round((hi - lo) / TILT_STEP_DEG) + 1)
    return np.linspace(lo, hi, n)


def complete_acquisition(acq: Acquisition, spec, tomogram: str) -> Acquisition:
    """``acq`` with what it lacks filled from the tomogram's config (``spec``, a TomogramInput).

    InputError naming the tomogram and the field when neither gives it; no dose means no
    dose weighting (pre-exposure 0).
    """
    n = len(acq.tilt_deg)
    where = f"extraction.tomograms.{tomogram}"

    def pick(value, key: str, field: str):
        if value is not None:
            return value
        if getattr(spec, key) is not None:
            return getattr(spec, key)
        raise InputError(f"tomogram {tomogram!r}: {acq.source or 'no acquisition file'} gives no {field}; "
                         f"set {where}.{key}")

    defocus = acq.defocus_um
    if defocus is None:
        defocus = np.full(n, float(pick(None, "defocus_um", "defocus")))
    pre = acq.pre_exposure_e_per_angstrom2
    if pre is None:
        log.info("tomogram %r: no per-tilt dose in %s; no dose weighting", tomogram, acq.source or "the config")
        pre = np.zeros(n)
    for name, values in (("defocus", defocus), ("pre-exposure", pre)):
        if len(values) != n:
            raise InputError(f"tomogram {tomogram!r}: {len(values)} {name} values for {n} tilts in {acq.source}")
    return replace(
        acq, defocus_um=np.asarray(defocus, np.float64), pre_exposure_e_per_angstrom2=np.asarray(pre, np.float64),
        voltage_kv=float(pick(acq.voltage_kv, "voltage_kv", "voltage")),
        spherical_aberration_mm=float(pick(acq.spherical_aberration_mm, "spherical_aberration_mm",
                                           "spherical aberration")),
        amplitude_contrast=float(pick(acq.amplitude_contrast, "amplitude_contrast", "amplitude contrast")),
    )


def tomogram_acquisition(spec, tomogram: str) -> Acquisition:
    """A configured tomogram's complete acquisition: its file (``spec.acquisition``) or its
    ``tilt_range_deg``, completed from its config keys."""
    if spec.acquisition is not None:
        acq = read_acquisition(spec.acquisition, tomogram)
    elif spec.tilt_range_deg is not None:
        acq = Acquisition(tilt_deg=tilts_from_range(spec.tilt_range_deg), source="tilt_range_deg")
    else:
        raise InputError(f"tomogram {tomogram!r}: set extraction.tomograms.{tomogram}.acquisition (a .tlt, .mdoc "
                         "or RELION 5 tomograms.star) or its tilt_range_deg")
    return complete_acquisition(acq, spec, tomogram)


# ----------------------------------------------------------------------------- the split's copy


def write_acquisition_star(acquisitions: dict[str, Acquisition], path: str | Path) -> None:
    """Write complete acquisitions as a RELION 5 tomograms.star layout: data_global + data_<tomogram>."""
    rows, blocks = [], {}
    for name, acq in acquisitions.items():
        rows.append({"rlnTomoName": name, "rlnVoltage": acq.voltage_kv,
                     "rlnSphericalAberration": acq.spherical_aberration_mm,
                     "rlnAmplitudeContrast": acq.amplitude_contrast,
                     "rlnTomoTiltSeriesPixelSize": acq.pixel_size_angstrom or 0.0})
        defocus_angstrom = np.asarray(acq.defocus_um) * 1e4
        blocks[name] = pd.DataFrame({
            "rlnTomoNominalStageTiltAngle": acq.tilt_deg, "rlnDefocusU": defocus_angstrom,
            "rlnDefocusV": defocus_angstrom, "rlnMicrographPreExposure": acq.pre_exposure_e_per_angstrom2,
        })
    write_star_blocks({"global": pd.DataFrame(rows), **blocks}, path)


def read_split_acquisitions(split_dir: str | Path) -> dict[str, Acquisition] | None:
    """The acquisitions an extraction wrote beside its particles, by tomogram; None if there is none."""
    path = Path(split_dir) / ACQUISITION_STAR
    if not path.is_file():
        return None
    blocks = _star_blocks(path)
    names = blocks["global"]["rlnTomoName"].astype(str) if "global" in blocks else []
    return {name: read_relion5_tomograms(path, name) for name in names}


def split_tilt_range_deg(particles: pd.DataFrame) -> tuple[float, float] | None:
    """The tilt range extraction wrote with a split's particles (``cryovaeTiltMin/MaxDeg``); None
    without those columns.  Several tomograms: the range they all sample."""
    if "cryovaeTiltMinDeg" not in particles.columns or "cryovaeTiltMaxDeg" not in particles.columns:
        return None
    lo, hi = particles["cryovaeTiltMinDeg"].to_numpy(np.float64), particles["cryovaeTiltMaxDeg"].to_numpy(np.float64)
    if np.ptp(lo) > 0 or np.ptp(hi) > 0:
        log.info("particles come from tilt series with ranges %g..%g to %g..%g; wedge of [%g, %g]",
                 lo.min(), lo.max(), hi.min(), hi.max(), lo.max(), hi.min())
    return float(lo.max()), float(hi.min())
