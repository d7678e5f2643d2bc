"""Tomograms simulated the way real ones are made: a crowded slab, a tilt series, back-projection.

One tomogram ``sim_{k:02d}`` (``tomogram_simulation``, seed ``SeedSequence([seed, 7001, k])``):

1. **Slab.**  ``particles_per_class`` particles of every configured class and of every decoy
   (maps no class names) at random non-overlapping positions (bounding spheres of the density
   above 5 % of its maximum do not intersect; neighbours do reach into each other's boxes) and
   uniform SO(3) poses in a (nz, ny, nx) slab of ``size_xyz_px`` at ``pixel_size_angstrom``.
   Particle i of map ``m`` (box M, centre c = M//2) is ``m(c + A^T (x - c - d))`` written with
   box voxel c at the integer voxel ``floor(T)``, d = T - floor(T): the density's voxel c sits
   at the true position T (tomogram pixels, 0-based, x y z), and A (particle from reference)
   is written as RELION angles in truth.star.  Maps from another program are resampled to the
   pixel size (torch-fourier-rescale) and recentred on their density centre of mass
   (torch-fourier-shift); the workflow's own maps are used as they are.
2. **Tilt series** over ``tilt_range_deg`` in steps of ``tilt_step_deg``, collected
   dose-symmetrically (Hagen: 0, then groups of two tilts on alternating sides), each tilt
   ``dose_per_tilt`` e/Å².  Geometry from :func:`cryovae.ctf.tilt_rotations_xyz`: image u =
   R[0]·(x, y, z) about the tomogram centre (size / 2, RELION 5's centred coordinates).  The
   real-space projector integrates along the beam slice by slice: for slab slice z the image
   column u sees x = (u - R02 z) / R00 (linear interpolation), with path length 1 / R22 per
   slice.  Per tilt, in Fourier space: the 2D CTF (torch-ctf) of each strip of
   ``defocus_strip_px`` image columns at the defocus of the slab's mid-plane under that strip
   (nominal + :func:`cryovae.ctf.defocus_offset_angstrom`), blended linearly between strip
   centres, times the exposure filter exp(-N / 2 Nc(k)) of Grant & Grigorieff (N: the exposure
   before the tilt plus half its own, Nc from torch-fourier-filter).
3. **Noise**: white Gaussian noise per tilt image.  Back-projection is linear, so signal and
   unit noise are reconstructed once each and the noise is scaled so that
   var(signal) / var(noise) over ``box_size`` boxes at the true positions equals ``snr``.
4. **Reconstruction**: R-weighted back-projection (the discrete Ram-Lak filter along u, times
   the tilt step in radians), the adjoint of the projector.  ``dark_contrast`` negates it.

Writes under ``{output_dir}/tomograms/NAME/``: NAME.mrc (pixel size in the header), NAME.tlt
(tilts, ascending), tomograms.star (RELION 5 global table) and NAME.star (per tilt:
rlnTomoNominalStageTiltAngle, rlnDefocusU/V, rlnMicrographPreExposure, ...), picks.star
(RELION 5 centred coordinates of the true positions plus the pick error) and truth.star (true
positions, rlnAngleRot/Tilt/Psi, cryovaeClassName, cryovaeNovel = 1 for decoys).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cryovae.atomic import write_text_atomic
from cryovae.config import SIMULATED_TOMOGRAM_PREFIX
from cryovae.ctf import exposure_weights, particle_defocus_um, tilt_rotations_xyz, wedge_sampled_zyx
from cryovae.errors import InputError
from cryovae.rotations import matrix_to_relion_euler, random_rotations

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NAME_PREFIX = SIMULATED_TOMOGRAM_PREFIX
_SEED_TAG = 7001
_RADIUS_THRESHOLD = 0.05  # of the map maximum: the extent used for non-overlap
_PLACEMENT_TRIES = 2000


# ----------------------------------------------------------------------------- names and paths


def simulated_tomogram_names(config) -> list[str]:
    """sim_00, sim_01, ... (``tomogram_simulation.tomograms`` of them)."""
    return config.simulated_tomograms


def tomogram_folder(config, name: str) -> Path:
    return Path(config.output_dir) / "tomograms" / name


def tomogram_files(config, name: str) -> dict[str, Path]:
    """Every file the simulation of tomogram ``name`` writes, by role."""
    folder = tomogram_folder(config, name)
    return {"tomogram": folder / f"{name}.mrc", "tlt": folder / f"{name}.tlt",
            "tomograms_star": folder / "tomograms.star", "tilt_star": folder / f"{name}.star",
            "picks": folder / "picks.star", "truth": folder / "truth.star"}


def with_simulated_tomograms(config):
    """``config`` with the simulated tomograms added to ``extraction.tomograms`` (their
    picks as coordinates, their truth.star as truth), so they are extracted and evaluated."""
    from cryovae.config import TomogramInput

    names = simulated_tomogram_names(config)
    clash = sorted(set(names) & set(config.extraction.tomograms))
    if clash:
        raise InputError(f"extraction.tomograms names {clash[0]!r}, the name of a simulated tomogram "
                         f"(tomogram_simulation.tomograms makes {names[0]}..{names[-1]}); rename it")
    added = {}
    for name in names:
        files = tomogram_files(config, name)
        # extraction reads the acquisition metadata and the contrast from what was simulated
        added[name] = TomogramInput(tomogram=str(files["tomogram"]), coordinates=str(files["picks"]),
                                    acquisition=str(files["tomograms_star"]), truth=str(files["truth"]),
                                    invert_contrast=config.tomogram_simulation.dark_contrast)
    extraction = config.extraction.model_copy(update={"tomograms": {**config.extraction.tomograms, **added}})
    return config.model_copy(update={"extraction": extraction})


# ----------------------------------------------------------------------------- particle maps


@dataclass
class Species:
    """One kind of particle: a class or a decoy."""

    name: str
    volume_zyx: np.ndarray  # (M, M, M) float32
    class_number: int  # 1-based in config order; 0 for a decoy
    novel: bool
    radius_px: float


def particle_radius_px(volume_zyx: np.ndarray) -> float:
    """Distance from the box centre (N//2) to the farthest voxel above 5 % of the maximum, + 1 px."""
    above = np.argwhere(volume_zyx > _RADIUS_THRESHOLD * float(volume_zyx.max()))
    centre = np.array([s // 2 for s in volume_zyx.shape], dtype=np.float64)
    return float(np.linalg.norm(above - centre, axis=1).max()) + 1.0


def external_map(path: Path, pixel_size_angstrom: float) -> np.ndarray:
    """A map made by another program: at ``pixel_size_angstrom`` (Fourier rescaled when its
    own differs by over 0.1 %), cubic, its density centre of mass moved to voxel N//2."""
    import torch
    from torch_fourier_rescale import fourier_rescale_3d
    from torch_fourier_shift import fourier_shift_image_3d

    from cryovae.maps import check_map, read_map

    volume, pixel_in = read_map(path)
    if len(set(volume.shape)) != 1:
        raise InputError(f"{path}: expected a cubic map, got shape {volume.shape}")
    tensor = torch.as_tensor(volume, dtype=torch.float64)
    if abs(pixel_in - pixel_size_angstrom) > 1e-3 * pixel_size_angstrom:
        tensor, _ = fourier_rescale_3d(tensor, source_spacing=pixel_in, target_spacing=pixel_size_angstrom)
        n = min(tensor.shape)
        tensor = tensor[:n, :n, :n]
        log.info("%s: resampled from %g Å to %g Å per pixel (%d³)", path, pixel_in, pixel_size_angstrom, n)
    weights = tensor.clamp(min=0)
    if float(weights.sum()) <= 0:
        raise InputError(f"{path}: the map has no positive density")
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in tensor.shape), indexing="ij")
    com_zyx = torch.stack([(g * weights).sum() / weights.sum() for g in grids])
    centre_zyx = torch.tensor([s // 2 for s in tensor.shape], dtype=torch.float64)
    shifted = fourier_shift_image_3d(tensor, shifts=centre_zyx - com_zyx).numpy().astype(np.float32)
    check_map(shifted, path)
    return shifted


def load_species(config, class_maps: list[Path]) -> list[Species]:
    """The classes (config order; ``tomogram_simulation.maps`` or the workflow's map named
    {class}.mrc in ``class_maps``), then the decoys."""
    from cryovae.maps import check_map, read_map

    ts, pixel = config.tomogram_simulation, config.pixel_size_angstrom
    by_name = {Path(p).stem: Path(p) for p in class_maps}
    species = []
    for number, name in enumerate(config.class_names, start=1):
        if name in ts.maps:
            volume = external_map(Path(ts.maps[name]), pixel)
        elif name in by_name:
            volume, _ = read_map(by_name[name])
            check_map(volume, by_name[name])
        else:
            raise InputError(f"no map for class {name!r}: give --maps .../{name}.mrc or tomogram_simulation.maps")
        species.append(Species(name, volume, number, False, particle_radius_px(volume)))
    for name, path in ts.decoys.items():
        volume = external_map(Path(path), pixel)
        species.append(Species(name, volume, 0, True, particle_radius_px(volume)))
    return species


# ----------------------------------------------------------------------------- the slab


def place_particles(radii_px: np.ndarray, size_xyz: tuple[int, int, int], margin_xy_px: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Random non-overlapping centres (n, 3), tomogram pixels (x y z), for spheres of ``radii_px`` (n,).

    Centres keep ``max(radius, margin_xy_px)`` from the x and y faces and ``radius`` from the z
    faces (the middle plane where a particle is thicker than the slab).  Largest first; a
    particle that finds no free place in 2000 draws is an InputError.
    """
    size = np.asarray(size_xyz, dtype=np.float64)
    centres = np.zeros((len(radii_px), 3))
    placed: list[int] = []
    for i in np.argsort(-radii_px, kind="stable"):
        r = float(radii_px[i])
        margin = np.array([max(r, margin_xy_px), max(r, margin_xy_px), min(r, size[2] / 2)])
        lo, hi = margin, size - margin
        if np.any(hi < lo):
            raise InputError(f"tomogram_simulation.size_xyz_px {tuple(size_xyz)}: too small for a particle "
                             f"of radius {r:.1f} px with a {margin_xy_px:g} px margin")
        for _ in range(_PLACEMENT_TRIES):
            candidate = rng.uniform(lo, hi)
            if not placed or np.all(np.linalg.norm(centres[placed] - candidate, axis=1) >= radii_px[placed] + r):
                centres[i] = candidate
                placed.append(int(i))
                break
        else:
            raise InputError(f"tomogram_simulation: no room for particle {len(placed) + 1} of {len(radii_px)} "
                             f"(radius {r:.1f} px) in a slab of {tuple(size_xyz)} px; enlarge size_xyz_px or "
                             "lower particles_per_class")
    return centres


def build_slab(species: list[Species], kinds: np.ndarray, positions_xyz: np.ndarray, rotations: np.ndarray,
               size_xyz: tuple[int, int, int], pixel_size_angstrom: float) -> np.ndarray:
    """The specimen (nz, ny, nx) float32: every particle rotated (cubic spline) and added at its position."""
    from cryovae.volumes import rotate_volume

    nx, ny, nz = size_xyz
    slab = np.zeros((nz, ny, nx), dtype=np.float32)
    for kind, position, rotation in zip(kinds, positions_xyz, rotations):
        volume = species[kind].volume_zyx
        anchor = np.floor(position).astype(np.int64)
        d = position - anchor
        particle = rotate_volume(volume, rotation, -d * pixel_size_angstrom, pixel_size_angstrom, order=3)
        _add_box(slab, particle, anchor[::-1] - volume.shape[0] // 2)
    return slab


def _add_box(slab_zyx: np.ndarray, box_zyx: np.ndarray, start_zyx: np.ndarray) -> None:
    """slab[start:start+M] += box, clipped to the slab."""
    lo = np.maximum(start_zyx, 0)
    hi = np.minimum(start_zyx + np.array(box_zyx.shape), slab_zyx.shape)
    if np.any(hi <= lo):
        return
    dst = tuple(slice(a, b) for a, b in zip(lo, hi))
    src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start_zyx))
    slab_zyx[dst] += box_zyx[src]


# ----------------------------------------------------------------------------- the tilt series


def tilt_angles_deg(tilt_range_deg: tuple[float, float], step_deg: float) -> np.ndarray:
    """Tilts from min to max in ``step_deg`` (ascending, including 0 when the range spans it)."""
    lo, hi = tilt_range_deg
    first = math.ceil(lo / step_deg - 1e-9)
    last = math.floor(hi / step_deg + 1e-9)
    return np.arange(first, last + 1, dtype=np.float64) * step_deg


def dose_symmetric_order(tilts_deg: np.ndarray, group: int = 2) -> np.ndarray:
    """Acquisition position (n,) of each tilt in Hagen's dose-symmetric scheme: the tilt nearest
    0 first, then ``group`` tilts on the positive side, ``group`` on the negative, and so on."""
    tilts = np.asarray(tilts_deg, dtype=np.float64)
    start = int(np.argmin(np.abs(tilts)))
    plus, minus = list(range(start + 1, len(tilts))), list(range(start - 1, -1, -1))
    sequence, side = [start], 0
    while plus or minus:
        source = (plus, minus)[side] if (plus, minus)[side] else (minus, plus)[side]
        sequence += [source.pop(0) for _ in range(min(group, len(source)))]
        side = 1 - side
    order = np.empty(len(tilts), dtype=np.int64)
    order[sequence] = np.arange(len(tilts))
    return order


def _normalised(index: torch.Tensor, n: int) -> torch.Tensor:
    """Pixel index -> grid_sample coordinate (align_corners=True)."""
    return 2.0 * index / (n - 1) - 1.0


def project_slab(slab_zyx, tilts_deg: np.ndarray):
    """Real-space projections along each tilt's beam: (n_tilts, ny, nx) float32 tensor.

    ``slab_zyx``: (nz, ny, nx).  Image column u (centred, u = j - nx/2) at slice z (centred,
    z = k - nz/2) sees x = (u - R02 z) / R00, each slice weighted by 1 / R22 (path length).
    """
    import torch
    import torch.nn.functional as F

    slab = torch.as_tensor(slab_zyx, dtype=torch.float32)
    nz, ny, nx = slab.shape
    z = torch.arange(nz, dtype=torch.float64) - nz / 2
    u = torch.arange(nx, dtype=torch.float64) - nx / 2
    grid_y = _normalised(torch.arange(ny, dtype=torch.float64), ny)
    images = torch.empty((len(tilts_deg), ny, nx), dtype=torch.float32)
    for t, rotation in enumerate(tilt_rotations_xyz(tilts_deg)):
        x = (u[None, :] - rotation[0, 2] * z[:, None]) / rotation[0, 0]  # (nz, nx)
        grid = torch.stack(torch.broadcast_tensors(_normalised(x + nx / 2, nx)[:, None, :],
                                                   grid_y[None, :, None]), dim=-1)  # (nz, ny, nx, 2)
        sampled = F.grid_sample(slab[:, None], grid.to(torch.float32), mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        images[t] = sampled[:, 0].sum(dim=0) / float(rotation[2, 2])
    return images


def ramp_filter(images):
    """R-weighting: the discrete Ram-Lak filter along image x (zero-padded to twice the width).

    ``images``: (n, ny, nx) tensor; returns the same shape.
    """
    import torch

    nx = images.shape[-1]
    n_pad = 2 * nx
    offsets = torch.fft.fftfreq(n_pad, dtype=torch.float64) * n_pad  # 0, 1, ..., -1 (integer offsets)
    kernel = torch.where(offsets.remainder(2) == 1, -1.0 / (math.pi * offsets) ** 2, torch.zeros_like(offsets))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real.to(torch.float32)
    spectrum = torch.fft.rfft(images, n=n_pad, dim=-1) * response
    return torch.fft.irfft(spectrum, n=n_pad, dim=-1)[..., :nx]


def backproject(images, tilts_deg: np.ndarray, nz: int, step_deg: float):
    """R-weighted back-projection of (n_tilts, ny, nx) images into (nz, ny, nx) float32 (a tensor).

    Voxel (x, y, z) (centred) sums the filtered images at u = R00 x + R02 z, times the tilt
    step in radians: the adjoint of :func:`project_slab` with the weights of filtered
    back-projection, so a reconstruction has the slab's own scale inside the sampled wedge.
    """
    import torch
    import torch.nn.functional as F

    filtered = ramp_filter(images)
    _, ny, nx = filtered.shape
    x = torch.arange(nx, dtype=torch.float64) - nx / 2
    z = torch.arange(nz, dtype=torch.float64) - nz / 2
    grid_y = _normalised(torch.arange(ny, dtype=torch.float64), ny)
    volume = torch.zeros((nz, ny, nx), dtype=torch.float32)
    for t, rotation in enumerate(tilt_rotations_xyz(tilts_deg)):
        u = rotation[0, 0] * x[None, :] + rotation[0, 2] * z[:, None]  # (nz, nx)
        grid = torch.stack(torch.broadcast_tensors(_normalised(u + nx / 2, nx)[:, None, :],
                                                   grid_y[None, :, None]), dim=-1).reshape(1, nz * ny, nx, 2)
        sampled = F.grid_sample(filtered[t][None, None], grid.to(torch.float32), mode="bilinear",
                                padding_mode="zeros", align_corners=True)
        volume += sampled.reshape(nz, ny, nx)
    return volume * float(np.deg2rad(step_deg))


# ----------------------------------------------------------------------------- CTF and dose


def strip_defocus_um(tilt_deg: float, nx: int, strip_px: int, pixel_size_angstrom: float,
                     nominal_defocus_um: float) -> np.ndarray:
    """Defocus (µm, positive = underfocus) of each strip of image columns at one tilt: (n_strips,).

    The strip's centre column u (centred) images the slab's mid-plane at x = u / R00.
    """
    rotation = tilt_rotations_xyz(tilt_deg)[0]
    n_strips = math.ceil(nx / strip_px)
    u = (np.arange(n_strips) + 0.5) * nx / n_strips - nx / 2
    points = np.stack([u / rotation[0, 0], np.zeros(n_strips), np.zeros(n_strips)], axis=1) * pixel_size_angstrom
    return particle_defocus_um([nominal_defocus_um], [tilt_deg], points)[:, 0]


def exposure_filter(shape_yx: tuple[int, int], pixel_size_angstrom: float, exposure_e_per_angstrom2: float,
                    voltage_kv: float):
    """:func:`cryovae.ctf.exposure_weights` on the rfft2 grid of an image: (ny, nx//2+1) float32 tensor."""
    import torch

    ky = np.fft.fftfreq(shape_yx[0])[:, None]
    kx = np.fft.rfftfreq(shape_yx[1])[None, :]
    weights = exposure_weights([exposure_e_per_angstrom2], np.sqrt(ky**2 + kx**2) / pixel_size_angstrom, voltage_kv)
    return torch.from_numpy(weights[0].astype(np.float32))


def image_transfer(image, tilt_deg: float, exposure: float, config):
    """One projection (ny, nx) through the CTF with its defocus gradient and the exposure filter."""
    import torch
    from torch_ctf import calculate_ctf_2d

    ts, pixel = config.tomogram_simulation, config.pixel_size_angstrom
    ny, nx = image.shape
    spectrum = torch.fft.rfft2(image)
    if exposure > 0:
        spectrum = spectrum * exposure_filter((ny, nx), pixel, exposure, ts.voltage_kv)
    if not ts.ctf:
        return torch.fft.irfft2(spectrum, s=(ny, nx))
    defocus = strip_defocus_um(tilt_deg, nx, ts.defocus_strip_px, pixel, ts.defocus_um)
    ctf = calculate_ctf_2d(defocus=torch.as_tensor(defocus, dtype=torch.float32), astigmatism=0.0,
                           astigmatism_angle=0.0, voltage=ts.voltage_kv, spherical_aberration=ts.spherical_aberration_mm,
                           amplitude_contrast=ts.amplitude_contrast, phase_shift=0.0, pixel_size=pixel,
                           image_shape=(ny, nx), rfft=True, fftshift=False)
    strips = torch.fft.irfft2(spectrum[None] * ctf, s=(ny, nx))  # (n_strips, ny, nx)
    return (strips * _strip_weights(len(defocus), nx)[:, None, :]).sum(dim=0)


def _strip_weights(n_strips: int, nx: int):
    """(n_strips, nx) linear interpolation weights between strip centres (clamped at the ends)."""
    import torch

    position = ((torch.arange(nx, dtype=torch.float64) + 0.5) * n_strips / nx - 0.5).clamp(0, n_strips - 1)
    lower = position.floor().long().clamp(max=n_strips - 1)
    frac = position - lower
    weights = torch.zeros((n_strips, nx), dtype=torch.float64)
    weights[lower, torch.arange(nx)] += 1 - frac
    weights[(lower + 1).clamp(max=n_strips - 1), torch.arange(nx)] += frac
    return weights.to(torch.float32)


# ----------------------------------------------------------------------------- the tomogram


@dataclass
class TiltSeries:
    tilts_deg: np.ndarray  # (n,) ascending
    order: np.ndarray  # (n,) acquisition position
    pre_exposure: np.ndarray  # (n,) e/Å² before each tilt


def tilt_series(config) -> TiltSeries:
    ts = config.tomogram_simulation
    tilts = tilt_angles_deg(ts.tilt_range_deg, ts.tilt_step_deg)
    order = dose_symmetric_order(tilts)
    return TiltSeries(tilts, order, order * ts.dose_per_tilt)


def signal_images(slab_zyx, series: TiltSeries, config):
    """Projections of the slab through CTF and exposure: (n_tilts, ny, nx) tensor."""
    images = project_slab(slab_zyx, series.tilts_deg)
    dose = config.tomogram_simulation.dose_per_tilt
    for t, tilt in enumerate(series.tilts_deg):
        exposure = series.pre_exposure[t] + dose / 2 if dose > 0 else 0.0
        images[t] = image_transfer(images[t], float(tilt), float(exposure), config)
    return images


def box_variance(volume_zyx: np.ndarray, positions_xyz: np.ndarray, box: int) -> float:
    """Mean over particles of the variance in the ``box``³ box at each (rounded) position, clipped."""
    values = []
    for position in positions_xyz:
        start = np.round(position).astype(np.int64)[::-1] - box // 2
        lo, hi = np.maximum(start, 0), np.minimum(start + box, volume_zyx.shape)
        values.append(float(np.var(volume_zyx[tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float64)))
    return float(np.mean(values))


def noise_scale(signal_zyx: np.ndarray, unit_noise_zyx: np.ndarray, positions_xyz: np.ndarray, box: int,
                snr: float) -> float:
    """The factor on the unit-noise reconstruction that makes the box SNR ``snr`` (linearity)."""
    return math.sqrt(box_variance(signal_zyx, positions_xyz, box) / (snr * box_variance(unit_noise_zyx, positions_xyz, box)))


@dataclass
class Simulated:
    """A simulated tomogram and its truth (everything :func:`simulate_tomogram` writes)."""

    tomogram_zyx: np.ndarray
    signal_zyx: np.ndarray  # the noise-free reconstruction (positive contrast)
    noise_zyx: np.ndarray  # the scaled noise reconstruction (positive contrast)
    slab_zyx: np.ndarray
    truth: pd.DataFrame  # tomo_name, x_px, y_px, z_px, rot/tilt/psi_deg, class_number, cryovaeClassName, cryovaeNovel
    picks: pd.DataFrame  # tomo_name, x_px, y_px, z_px
    series: TiltSeries


def tomogram_seed(config, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, _SEED_TAG, index]))


def simulate(config, index: int, species: list[Species]) -> Simulated:
    """Simulate tomogram ``index`` from ``species`` (see the module docstring)."""
    import torch

    ts = config.tomogram_simulation
    name = simulated_tomogram_names(config)[index] if index < ts.tomograms else f"{NAME_PREFIX}{index:02d}"
    rng = tomogram_seed(config, index)
    kinds = np.repeat(np.arange(len(species)), ts.particles_per_class)
    radii = np.array([species[k].radius_px for k in kinds])
    margin = config.box_size / 2 + 3 * ts.pick_error_px
    positions = place_particles(radii, ts.size_xyz_px, margin, rng)
    rotations = random_rotations(len(kinds), rng)
    slab = build_slab(species, kinds, positions, rotations, ts.size_xyz_px, config.pixel_size_angstrom)
    series = tilt_series(config)
    nz = ts.size_xyz_px[2]
    with torch.no_grad():
        signal = backproject(signal_images(slab, series, config), series.tilts_deg, nz, ts.tilt_step_deg).numpy()
        noise = np.zeros_like(signal)
        if ts.snr is not None:
            shape = (len(series.tilts_deg), ts.size_xyz_px[1], ts.size_xyz_px[0])
            unit = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            noise = backproject(unit, series.tilts_deg, nz, ts.tilt_step_deg).numpy()
            noise *= noise_scale(signal, noise, positions, config.box_size, ts.snr)
    tomogram = signal + noise
    if ts.dark_contrast:
        tomogram = -tomogram
    truth, picks = _tables(name, species, kinds, positions, rotations, rng, ts)
    return Simulated(tomogram.astype(np.float32), signal, noise, slab, truth, picks, series)


def _tables(name, species, kinds, positions, rotations, rng, ts) -> tuple[pd.DataFrame, pd.DataFrame]:
    angles = matrix_to_relion_euler(rotations)
    truth = pd.DataFrame({"tomo_name": name, "x_px": positions[:, 0], "y_px": positions[:, 1],
                          "z_px": positions[:, 2], "rot_deg": angles[:, 0], "tilt_deg": angles[:, 1],
                          "psi_deg": angles[:, 2],
                          "class_number": [species[k].class_number for k in kinds],
                          "cryovaeClassName": [species[k].name for k in kinds],
                          "cryovaeNovel": [int(species[k].novel) for k in kinds]})
    if ts.pick_error_distribution == "uniform":
        error = rng.uniform(-ts.pick_error_px, ts.pick_error_px, positions.shape)
    else:
        error = rng.normal(0.0, ts.pick_error_px, positions.shape)
    picked = positions + error
    picks = pd.DataFrame({"tomo_name": name, "x_px": picked[:, 0], "y_px": picked[:, 1], "z_px": picked[:, 2]})
    return truth, picks


# ----------------------------------------------------------------------------- output


def _acquisition_tables(config, name: str, series: TiltSeries, files: dict[str, Path]):
    ts = config.tomogram_simulation
    nx, ny, nz = ts.size_xyz_px
    defocus_angstrom = ts.defocus_um * 1e4
    tilts = pd.DataFrame({
        "rlnTomoNominalStageTiltAngle": series.tilts_deg,
        "rlnTomoNominalTiltAxisAngle": 0.0,
        "rlnMicrographPreExposure": series.pre_exposure,
        "rlnDefocusU": defocus_angstrom, "rlnDefocusV": defocus_angstrom, "rlnDefocusAngle": 0.0,
        "rlnTomoXTilt": 0.0, "rlnTomoYTilt": series.tilts_deg, "rlnTomoZRot": 0.0,
        "rlnTomoXShiftAngst": 0.0, "rlnTomoYShiftAngst": 0.0,
        "cryovaeAcquisitionOrder": series.order,
    })
    general = pd.DataFrame([{
        "rlnTomoName": name, "rlnVoltage": ts.voltage_kv, "rlnSphericalAberration": ts.spherical_aberration_mm,
        "rlnAmplitudeContrast": ts.amplitude_contrast, "rlnMicrographOriginalPixelSize": config.pixel_size_angstrom,
        "rlnTomoHand": 1, "rlnTomoTiltSeriesPixelSize": config.pixel_size_angstrom,
        "rlnTomoTiltSeriesStarFile": str(files["tilt_star"]), "rlnTomoTomogramBinning": 1.0,
        "rlnTomoSizeX": nx, "rlnTomoSizeY": ny, "rlnTomoSizeZ": nz,
        "rlnTomoReconstructedTomogram": str(files["tomogram"]),
        "cryovaeDarkContrast": int(ts.dark_contrast),
    }])
    return general, tilts


def write_tomogram(config, name: str, result: Simulated, output_dir: Path) -> None:
    """Every file of one simulated tomogram into ``output_dir`` (each written atomically)."""
    from cryovae.maps import write_map
    from cryovae.star import OpticsInfo, write_relion5_particles, write_star_blocks

    ts = config.tomogram_simulation
    files = {role: Path(output_dir) / path.name for role, path in tomogram_files(config, name).items()}
    write_map(result.tomogram_zyx, config.pixel_size_angstrom, files["tomogram"])
    write_text_atomic(files["tlt"], "".join(f"{t:.2f}\n" for t in result.series.tilts_deg))
    general, tilts = _acquisition_tables(config, name, result.series, files)
    write_star_blocks({"global": general}, files["tomograms_star"])
    write_star_blocks({name: tilts}, files["tilt_star"])
    optics = OpticsInfo(config.pixel_size_angstrom, config.pixel_size_angstrom, config.box_size, ts.voltage_kv,
                        ts.spherical_aberration_mm, ts.amplitude_contrast)
    shape = tuple(ts.size_xyz_px)
    write_relion5_particles(result.picks, files["picks"], optics, shape)
    write_relion5_particles(result.truth, files["truth"], optics, shape)


def simulate_tomogram(config, index: int, maps: list[Path], output_dir: Path) -> None:
    """The ``simulate-tomogram`` verb: tomogram sim_{index:02d} and its files into ``output_dir``."""
    ts = config.tomogram_simulation
    if not 0 <= index < ts.tomograms:
        raise InputError(f"--index {index}: tomogram_simulation.tomograms is {ts.tomograms}")
    name = simulated_tomogram_names(config)[index]
    species = load_species(config, list(maps))
    result = simulate(config, index, species)
    write_tomogram(config, name, result, Path(output_dir))
    log.info("%s: %d particles (%d kinds) in %s px, %d tilts, snr %s, %s contrast", name, len(result.truth),
             len(species), tuple(ts.size_xyz_px), len(result.series.tilts_deg), ts.snr,
             "dark" if ts.dark_contrast else "bright")


def wedge_filtered(slab_zyx: np.ndarray, tilt_range_deg: tuple[float, float]) -> np.ndarray:
    """The slab with Fourier components outside the tilt range zeroed (what a noise-free
    reconstruction can hold): (nz, ny, nx) float32."""
    spectrum = np.fft.rfftn(np.asarray(slab_zyx, dtype=np.float64))
    spectrum *= wedge_sampled_zyx(slab_zyx.shape, tilt_range_deg)
    return np.fft.irfftn(spectrum, s=slab_zyx.shape, axes=(0, 1, 2)).astype(np.float32)
