"""Reference density maps: one cubic MRC per class at the configured pixel size and box.

A map is made from the class's cleaned structure with ttsim3d (electrostatic potential
from 5-Gaussian elastic scattering factors, each atom integrated over its voxel,
simulated ``upsampling`` times finer and Fourier-cropped to the target pixel size), or
taken from ``config.maps.files`` and resampled.

Frame: the box centre is voxel N//2 on every axis (RELION's).  A structure map puts the
atoms' centre of mass (atomic weights) at that voxel; a given map keeps its own frame
(the physical point at its box centre N_in//2 lands on voxel N//2).

Values: ttsim3d's scattering potential at 300 kV (positive = protein; only the scale
depends on the voltage).  B-factors follow ttsim3d's ``Simulator``: each atom's
B-factor plus ``config.maps.b_factor``, times 0.25 (cisTEM's convention).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import torch
from scipy import ndimage

from cryovae.atomic import atomic_path
from cryovae.errors import InputError
from cryovae.structures import read_structure
from cryovae.volumes import fourier_resample, lowpass_filter, raised_cosine_lowpass

SIMULATION_VOLTAGE_KV = 300.0
FINEST_PIXEL_ANGSTROM = 2.5  # structures are simulated at this pixel size or coarser
MAX_UPSAMPLED_EDGE = 384  # bounds the memory of the fine simulation (384^3 float32 = 226 MB)
REAL_MRC_MODES = (0, 1, 2, 6, 12)


def make_map(config, class_name: str, structure: Path | None, output: Path) -> None:
    """Write the reference map of ``class_name`` to ``output`` (MRC, float32, voxel size set).

    From ``config.maps.files[class_name]`` when given (resampled to the pixel size and box),
    else from ``structure`` (PDB/mmCIF).  ``config.maps.lowpass_angstrom`` applies to both.
    """
    pixel = config.pixel_size_angstrom
    box = config.box_size
    if class_name in config.maps.files:
        source = Path(config.maps.files[class_name]).expanduser()
        volume_in, pixel_in = read_map(source)
        volume = resample_map(volume_in, pixel_in, pixel, box)
    else:
        if structure is None:
            raise InputError(f"class {class_name!r}: no structure given and no map in maps.files")
        source = Path(structure)
        volume = structure_to_map(source, pixel, box, config.maps.b_factor)
    if config.maps.lowpass_angstrom is not None:
        volume = apply_lowpass(volume, pixel, config.maps.lowpass_angstrom)
    check_map(volume, source)
    write_map(volume, pixel, output)


def _scattering_atoms(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Non-hydrogen atoms of a structure: coords_xyz_angstrom (n, 3), upper-case elements, B-factors (n,)."""
    atoms = read_structure(path)
    keep = ~np.isin(atoms.elements, ["H", "D"])
    if not keep.any():
        raise InputError(f"{path}: the structure has no (non-hydrogen) atoms")
    elements = [str(e).upper() for e in atoms.elements[keep]]
    return atoms.coords_xyz_angstrom[keep], elements, atoms.b_factors_angstrom2[keep]


def centre_of_mass(coords_xyz_angstrom: np.ndarray, elements: list[str]) -> np.ndarray:
    """Centre of mass (x, y, z) in Å, weighted by standard atomic weights."""
    masses = np.array([gemmi.Element(e).weight for e in elements], dtype=np.float64)
    return (coords_xyz_angstrom * masses[:, None]).sum(0) / masses.sum()


def _check_extent(path: Path, centred_xyz_angstrom: np.ndarray, pixel: float, box: int) -> None:
    """InputError if an atom leaves the box (one voxel margin); a warning if it leaves the inscribed sphere."""
    reach = np.abs(centred_xyz_angstrom).max()
    half_angstrom = (box // 2 - 1) * pixel
    if reach > half_angstrom:
        raise InputError(
            f"{path}: atoms reach {reach:.0f} Å from the centre of mass along an axis, but a box of "
            f"{box} × {pixel:g} Å holds ±{half_angstrom:.0f} Å: increase box_size or pixel_size_angstrom"
        )
    radius = np.linalg.norm(centred_xyz_angstrom, axis=1).max()
    if radius > half_angstrom:
        warnings.warn(
            f"{path}: atoms reach {radius:.0f} Å from the centre of mass, beyond the sphere of "
            f"{half_angstrom:.0f} Å inscribed in the box: rotated particles will lose the corners",
            stacklevel=3,
        )


def _upsampling(pixel: float, box: int) -> int:
    """Integer factor of the fine simulation: pixel/factor <= ~2.5 Å, factor * box <= 384."""
    return max(1, min(math.ceil(pixel / FINEST_PIXEL_ANGSTROM), MAX_UPSAMPLED_EDGE // box))


def structure_to_map(path: Path, pixel_size_angstrom: float, box: int, b_factor: float = 0.0) -> np.ndarray:
    """ttsim3d potential of a structure, centre of mass at voxel N//2: (box, box, box) float32 (z, y, x)."""
    from ttsim3d.scattering_potential import SCATTERING_PARAMS_A
    from ttsim3d.simulate3d import simulate3d

    coords, elements, b_factors = _scattering_atoms(path)
    unknown = sorted(set(elements) - set(SCATTERING_PARAMS_A))
    if unknown:
        raise InputError(f"{path}: no scattering factors for element(s) {', '.join(unknown)}")
    centred = coords - centre_of_mass(coords, elements)
    _check_extent(path, centred, pixel_size_angstrom, box)
    b_scaled = 0.25 * (b_factors + b_factor)  # ttsim3d Simulator.get_scale_atom_b_factors
    upsampling = _upsampling(pixel_size_angstrom, box)
    fine = simulate3d(
        atom_positions_zyx=torch.tensor(centred[:, ::-1].copy(), dtype=torch.float32),
        atom_ids=elements,
        atom_b_factors=torch.tensor(b_scaled, dtype=torch.float32),
        beam_energy_kev=SIMULATION_VOLTAGE_KV,
        sim_pixel_spacing=pixel_size_angstrom / upsampling,
        sim_volume_shape=(box * upsampling,) * 3,
        requested_upsampling=1,  # ttsim3d's own crop mis-handles the rfft x axis; crop here
        apply_dose_weighting=False,
        apply_dqe=False,
        device="cpu",
    )
    return fourier_resample(fine.to(torch.float64), box).to(torch.float32).numpy()


def read_map(path: Path) -> tuple[np.ndarray, float]:
    """A 3D real-valued MRC: (volume_zyx float32, isotropic voxel size in Å)."""
    if not path.is_file():
        raise InputError(f"{path}: map file does not exist")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            mode = int(mrc.header.mode)
            data = None if mrc.data is None else np.asarray(mrc.data)
            voxel = mrc.voxel_size
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: cannot read the MRC file ({err})") from None
    if mode not in REAL_MRC_MODES or data is None:
        raise InputError(f"{path}: MRC mode {mode}; expected a real-valued map (mode 0, 1, 2, 6 or 12)")
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{path}: expected a 3D volume, got shape {data.shape}")
    sizes = (float(voxel.x), float(voxel.y), float(voxel.z))
    if min(sizes) <= 0 or max(sizes) - min(sizes) > 1e-3 * max(sizes):
        raise InputError(f"{path}: expected an isotropic voxel size > 0 in the header, got {sizes} Å")
    return data.astype(np.float32), sizes[0]


def resample_map(volume_zyx: np.ndarray, pixel_in: float, pixel_out: float, box: int) -> np.ndarray:
    """Resample a map to ``pixel_out`` in a (box, box, box) grid, box centre to box centre.

    Voxel N_in//2 of each axis maps onto voxel box//2; values stay intensive, so the
    integral (sum × voxel volume) is kept for content inside both boxes.  When
    downsampling, the input is low-passed to the output Nyquist first (no aliasing).
    Cubic B-spline interpolation, zero outside the input.  Returns float32 (z, y, x).
    """
    data = np.asarray(volume_zyx, dtype=np.float64)
    ratio = pixel_out / pixel_in
    if ratio > 1.0:  # raised-cosine edge from 0.8 to 1.0 × the output Nyquist: zero from there on
        nyquist = 0.5 / ratio
        transmission = raised_cosine_lowpass(data.shape, 0.9 * nyquist, 0.2 * nyquist).numpy()
        data = np.fft.irfftn(np.fft.rfftn(data) * transmission, s=data.shape, axes=(0, 1, 2))
    axes = [data.shape[a] // 2 + (np.arange(box) - box // 2) * ratio for a in range(3)]
    grid = np.meshgrid(*axes, indexing="ij")
    out = ndimage.map_coordinates(data, grid, order=3, mode="grid-constant", cval=0.0, prefilter=True)
    return out.astype(np.float32)


def apply_lowpass(volume_zyx: np.ndarray, pixel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    """Low-pass a cubic map to ``resolution_angstrom`` (raised-cosine edge); float32."""
    box = volume_zyx.shape[0]
    transfer = lowpass_filter(box, pixel_size_angstrom, resolution_angstrom)
    spectrum = torch.fft.rfftn(torch.as_tensor(volume_zyx, dtype=torch.float32))
    return torch.fft.irfftn(spectrum * transfer, s=volume_zyx.shape).numpy().astype(np.float32)


def check_map(volume_zyx: np.ndarray, source: Path) -> None:
    """InputError naming ``source`` if the map is non-finite or empty."""
    if not np.all(np.isfinite(volume_zyx)):
        raise InputError(f"{source}: the map has non-finite values")
    if not np.any(volume_zyx):
        raise InputError(f"{source}: the map is empty (all zero) in the {volume_zyx.shape[0]}³ box")


MRC_LABEL = "written by cryovae"


def write_map(volume_zyx: np.ndarray, pixel_size_angstrom: float, output: Path) -> None:
    """Write an MRC (mode 2) with the voxel size in the header, atomically.

    The header's one label is fixed (mrcfile's default stamps the creation time), so the
    same volume gives the same bytes.
    """
    with atomic_path(output) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume_zyx, dtype=np.float32))
            mrc.voxel_size = pixel_size_angstrom
            mrc.header.label[0] = MRC_LABEL.ljust(80).encode("ascii")
            mrc.header.nlabl = 1
