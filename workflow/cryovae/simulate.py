"""Simulated subtomograms with known poses, one shard per job, plus their ground-truth STAR.

Splits: ``train`` and ``val`` hold the seen classes, ``test`` every class (unseen ones
included).  Per class, train has ``particles_per_class`` particles, val
``round(val_fraction × that)`` and test ``round(test_fraction × that)`` (at least 1).
The split's class sequence (each class repeated, shuffled with a seed of the split) is
cut into shards of ``particles_per_shard``; each shard draws its particles from its own
seed, ``SeedSequence([seed, split index, shard])``, so shards are independent jobs and
the same config gives the same bytes.

Each particle, in order:

1. pose: A = rotation_matrix_particle_from_reference, uniform on SO(3); shift d uniform
   in ±max_shift_px per axis.  The class map (box centre N//2) is resampled as
   ``particle(x) = map(c + A^T (x - c - d))``: reference content at c + p lands at
   c + A p + d, so the STAR holds RELION angles of A and ``rlnOriginX/Y/ZAngst = -d ×
   pixel size``.  Sampling is trilinear from the map oversampled twice by Fourier
   padding (band-limited, so the interpolation blur is small).
2. CTF (optional): the isotropic 3D model of :mod:`cryovae.ctf`, defocus uniform in
   ``defocus_range_um``.
3. missing wedge (optional): Fourier components outside the tilt range about Y are zero.
4. noise (optional): white Gaussian noise, passed through the same wedge (a tomogram has
   no data there), scaled so that SNR = var(signal) / var(noise) over the box equals
   ``snr`` exactly for every particle, where the signal is the particle after steps 1–3.
5. band-pass (optional) of signal + noise, then per-particle normalisation (optional):
   zero mean, unit variance.  ``cryovaeSnr`` is the SNR before the band-pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numba
import numpy as np
import pandas as pd
import torch

from cryovae.atomic import atomic_path
from cryovae.ctf import bandpass_filter, ctf_3d, missing_wedge_mask, rfft_weights
from cryovae.errors import InputError
from cryovae.rotations import matrix_to_relion_euler, random_rotations
from cryovae.shards import write_particles_star

SPLITS = ("train", "val", "test")
MAX_BATCH_VOXELS = 2**22  # particles are rendered in batches of at most this many voxels
OVERSAMPLED_MAX_BOX = 96  # maps of larger boxes are sampled without oversampling (memory)


# ----------------------------------------------------------------------------- the plan


def split_classes(config, split: str) -> list[str]:
    """Classes of a split: the seen ones for train/val, all for test."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return list(config.class_names) if split == "test" else list(config.seen_classes)


def particles_per_class(config, split: str) -> int:
    """Particles of each class in a split (at least 1)."""
    sim = config.simulation
    base = sim.particles_per_class
    factor = {"train": 1.0, "val": sim.val_fraction, "test": sim.test_fraction}[split]
    return max(1, round(factor * base))


def class_sequence(config, split: str) -> np.ndarray:
    """Index (into ``config.class_names``) of every particle of a split, in particle order."""
    names = list(config.class_names)
    indices = np.array([names.index(c) for c in split_classes(config, split)], dtype=np.int64)
    sequence = np.repeat(indices, particles_per_class(config, split))
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, SPLITS.index(split)]))
    return rng.permutation(sequence)


def shard_plan(config, split: str) -> list[int]:
    """Particle count of each shard of a split (cheap: needs only the config)."""
    total = len(split_classes(config, split)) * particles_per_class(config, split)
    per = config.simulation.particles_per_shard
    return [min(per, total - start) for start in range(0, total, per)]


def shard_seed(config, split: str, shard: int) -> np.random.SeedSequence:
    """The seed of one shard; spawned children seed the pose draws and the noise."""
    return np.random.SeedSequence([config.seed, SPLITS.index(split), shard + 1])


# ----------------------------------------------------------------------------- draws


@dataclass
class ParticleDraws:
    """Random parameters of the particles of a shard (n particles)."""

    class_index: np.ndarray  # (n,) index into config.class_names
    rotation: np.ndarray  # (n, 3, 3) particle-from-reference, acting on (x, y, z)
    shift_xyz_px: np.ndarray  # (n, 3) content centre offset from voxel N//2, pixels
    defocus_um: np.ndarray  # (n,) underfocus in µm (NaN without CTF)


def draw_particles(config, split: str, shard: int) -> tuple[ParticleDraws, torch.Generator]:
    """Poses, shifts and defoci of a shard, and the torch generator of its noise."""
    plan = shard_plan(config, split)
    if not 0 <= shard < len(plan):
        raise InputError(f"split {split!r} has {len(plan)} shards; shard {shard} does not exist")
    start = shard * config.simulation.particles_per_shard
    classes = class_sequence(config, split)[start : start + plan[shard]]
    pose_seed, noise_seed = shard_seed(config, split, shard).spawn(2)
    rng = np.random.default_rng(pose_seed)
    n, sim = len(classes), config.simulation
    rotation = random_rotations(n, rng)
    shift = rng.uniform(-sim.max_shift_px, sim.max_shift_px, size=(n, 3))
    defocus = rng.uniform(*sim.defocus_range_um, size=n) if sim.ctf else np.full(n, np.nan)
    generator = torch.Generator().manual_seed(int(noise_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return ParticleDraws(classes, rotation, shift, defocus), generator


# ----------------------------------------------------------------------------- maps


def load_class_maps(config, classes: list[str], maps: list[Path]) -> np.ndarray:
    """The maps of ``classes`` (in that order) from ``{class}.mrc`` files: (C, B, B, B) float32."""
    by_name = {Path(p).stem: Path(p) for p in maps}
    box, pixel = config.box_size, config.pixel_size_angstrom
    out = np.empty((len(classes), box, box, box), dtype=np.float32)
    for i, name in enumerate(classes):
        if name not in by_name:
            raise InputError(f"no map for class {name!r} among --maps (expected a file named {name}.mrc)")
        path = by_name[name]
        with mrcfile.open(path, permissive=True) as mrc:
            data, voxel = mrc.data, float(mrc.voxel_size.x)
            if data is None or data.shape != (box, box, box):
                shape = None if data is None else data.shape
                raise InputError(f"{path}: map shape {shape}; expected ({box}, {box}, {box}) (box_size)")
            out[i] = data
        if abs(voxel - pixel) > 1e-3 * pixel:
            raise InputError(f"{path}: voxel size {voxel:g} Å; expected {pixel:g} Å (pixel_size_angstrom)")
        if not np.all(np.isfinite(out[i])) or not np.any(out[i]):
            raise InputError(f"{path}: the map is empty or has non-finite values")
    return out


def oversample_maps(maps_zyx: np.ndarray, factor: int) -> np.ndarray:
    """Fourier-pad (C, N, N, N) maps to (C, fN, fN, fN); voxel N//2 -> fN//2, values kept.

    The Nyquist planes are dropped (they have no unique mate), so the result is the
    band-limited interpolant of the map sampled ``factor`` times finer.
    """
    if factor == 1:
        return np.ascontiguousarray(maps_zyx, dtype=np.float32)
    n = maps_zyx.shape[-1]
    big = factor * n
    spectrum = torch.fft.rfftn(torch.as_tensor(maps_zyx, dtype=torch.float64), dim=(-3, -2, -1))
    padded = torch.zeros(maps_zyx.shape[:-3] + (big, big, big // 2 + 1), dtype=spectrum.dtype)
    half = n // 2
    for z_src, z_dst in ((slice(0, half), slice(0, half)), (slice(n - half + 1, n), slice(big - half + 1, big))):
        for y_src, y_dst in ((slice(0, half), slice(0, half)), (slice(n - half + 1, n), slice(big - half + 1, big))):
            padded[..., z_dst, y_dst, :half] = spectrum[..., z_src, y_src, :half]
    out = torch.fft.irfftn(padded, s=(big, big, big), dim=(-3, -2, -1)) * factor**3
    return out.to(torch.float32).numpy()


@numba.njit(cache=True, inline="always")
def _tap(vol, z, y, x):
    """vol[z, y, x], or 0 outside the volume."""
    size = vol.shape[0]
    if 0 <= z < size and 0 <= y < size and 0 <= x < size:
        return vol[z, y, x]
    return 0.0


@numba.njit(cache=True)
def _trilinear_edge(vol, x, y, z):
    """Trilinear value at (x, y, z) with zero outside the volume (``grid_sample``'s zero padding)."""
    x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
    fx, fy, fz = x - x0, y - y0, z - z0
    c00 = _tap(vol, z0, y0, x0) * (1 - fx) + _tap(vol, z0, y0, x0 + 1) * fx
    c01 = _tap(vol, z0, y0 + 1, x0) * (1 - fx) + _tap(vol, z0, y0 + 1, x0 + 1) * fx
    c10 = _tap(vol, z0 + 1, y0, x0) * (1 - fx) + _tap(vol, z0 + 1, y0, x0 + 1) * fx
    c11 = _tap(vol, z0 + 1, y0 + 1, x0) * (1 - fx) + _tap(vol, z0 + 1, y0 + 1, x0 + 1) * fx
    return (c00 * (1 - fy) + c01 * fy) * (1 - fz) + (c10 * (1 - fy) + c11 * fy) * fz


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _trilinear_particles(maps_fine, class_slot, source_matrix, source_offset, out):
    """Render particles by trilinear sampling, zero outside the map (as ``grid_sample``'s zero padding).

    maps_fine (C, M, M, M) float32; class_slot (n,) int64; source_matrix (n, 3, 3) and
    source_offset (n, 3) float64 map output voxel (x, y, z) to the fine-map index
    q = source_matrix @ x + source_offset (x, y, z order); out (n, N, N, N) float32 (z, y, x).
    """
    n, size = out.shape[0], out.shape[1]
    limit = maps_fine.shape[1] - 1.0
    for p in numba.prange(n):
        vol = maps_fine[class_slot[p]]
        m = source_matrix[p]
        for k in range(size):
            for j in range(size):
                x = m[0, 1] * j + m[0, 2] * k + source_offset[p, 0]
                y = m[1, 1] * j + m[1, 2] * k + source_offset[p, 1]
                z = m[2, 1] * j + m[2, 2] * k + source_offset[p, 2]
                for i in range(size):
                    value = 0.0
                    if 0.0 <= x < limit and 0.0 <= y < limit and 0.0 <= z < limit:
                        x0, y0, z0 = int(x), int(y), int(z)
                        fx, fy, fz = x - x0, y - y0, z - z0
                        c00 = vol[z0, y0, x0] + fx * (vol[z0, y0, x0 + 1] - vol[z0, y0, x0])
                        c01 = vol[z0, y0 + 1, x0] + fx * (vol[z0, y0 + 1, x0 + 1] - vol[z0, y0 + 1, x0])
                        c10 = vol[z0 + 1, y0, x0] + fx * (vol[z0 + 1, y0, x0 + 1] - vol[z0 + 1, y0, x0])
                        c11 = vol[z0 + 1, y0 + 1, x0] + fx * (vol[z0 + 1, y0 + 1, x0 + 1] - vol[z0 + 1, y0 + 1, x0])
                        c0 = c00 + fy * (c01 - c00)
                        value = c0 + fz * (c10 + fy * (c11 - c10) - c0)
                    elif -1.0 < x < limit + 1.0 and -1.0 < y < limit + 1.0 and -1.0 < z < limit + 1.0:
                        value = _trilinear_edge(vol, x, y, z)
                    out[p, k, j, i] = value
                    x += m[0, 0]
                    y += m[1, 0]
                    z += m[2, 0]


def render_particles(
    maps_fine: np.ndarray, factor: int, class_slot: np.ndarray, rotation: np.ndarray, shift_xyz_px: np.ndarray, box: int
) -> np.ndarray:
    """Noise-free particles: (n, box, box, box) float32, ``particle(x) = map(c + A^T (x - c - d))``.

    ``maps_fine``: (C, f·box, …) maps oversampled by ``factor`` (centre f·(box//2));
    ``class_slot`` (n,) indexes them; ``rotation`` (n, 3, 3) is A; ``shift_xyz_px`` (n, 3) is d.
    """
    centre = float(box // 2)
    a_t = np.transpose(np.asarray(rotation, np.float64), (0, 2, 1))
    matrix = factor * a_t
    offset = factor * (centre - np.einsum("nij,nj->ni", a_t, centre + np.asarray(shift_xyz_px, np.float64)))
    out = np.empty((len(class_slot), box, box, box), dtype=np.float32)
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    _trilinear_particles(maps_fine, np.asarray(class_slot, np.int64), np.ascontiguousarray(matrix),
                         np.ascontiguousarray(offset), out)
    return out


# ----------------------------------------------------------------------------- corruption


@dataclass
class FourierModel:
    """The static parts of the Fourier-space steps (built once per shard), rfft layout (B, B, B//2+1).

    ``transfer`` = wedge × band-pass (× 0 at DC when normalising), applied last;
    ``signal_weights`` give var(wedge-filtered volume) from its rfft (Parseval, DC excluded);
    ``total_weights`` give var(transfer × volume).  Weights are interleaved for
    ``view_as_real`` spectra: shape (2 · B · B · (B//2+1),).
    """

    box: int
    transfer: torch.Tensor | None
    signal_weights: torch.Tensor
    total_weights: torch.Tensor

    @classmethod
    def from_config(cls, config) -> "FourierModel":
        sim, box = config.simulation, config.box_size
        transfer = None
        wedge = torch.ones((box, box, box // 2 + 1))
        if sim.tilt_range_deg is not None:
            wedge = missing_wedge_mask(box, sim.tilt_range_deg).float()
            transfer = wedge
        if sim.bandpass_angstrom is not None:
            low, high = sim.bandpass_angstrom
            if not low > high > 0:
                raise InputError(f"simulation.bandpass_angstrom: expected [low, high] with low > high > 0 Å, "
                                 f"got [{low}, {high}]")
            band = bandpass_filter(box, config.pixel_size_angstrom, low, high)
            transfer = band if transfer is None else transfer * band
        if sim.normalise:
            transfer = torch.ones_like(wedge) if transfer is None else transfer.clone()
            transfer[0, 0, 0] = 0.0
        parseval = (rfft_weights(box) / float(box) ** 6).float()
        total = parseval if transfer is None else parseval * transfer**2
        return cls(box, transfer, _interleave(parseval * wedge), _interleave(total))

    @staticmethod
    def needed(config) -> bool:
        """True when any step needs Fourier space (else the particles stay in real space)."""
        sim = config.simulation
        return sim.tilt_range_deg is not None or sim.bandpass_angstrom is not None or sim.ctf


def _interleave(weights: torch.Tensor) -> torch.Tensor:
    """(B, B, B//2+1) weights -> (2·B·B·(B//2+1),), each repeated for the real and imaginary part."""
    return weights.unsqueeze(-1).expand(*weights.shape, 2).reshape(-1).contiguous()


def _weighted_power(spectrum: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k |F_k|^2 per volume: (n,) float64 (a variance, with Parseval weights)."""
    parts = torch.view_as_real(spectrum).reshape(spectrum.shape[0], -1)
    return ((parts * parts) @ weights).double()


def _hermitian_noise(n: int, box: int, generator: torch.Generator) -> torch.Tensor:
    """The rfft of n white Gaussian volumes of unit variance, drawn directly: (n, B, B, B//2+1) complex64.

    Independent complex Gaussians of variance B^3, with the planes kx = 0 and kx = B/2
    made Hermitian (F(-k) = conj F(k)); exactly the law of ``rfftn`` of real white noise.
    """
    half = box // 2 + 1
    parts = torch.randn((n, box, box, half, 2), generator=generator)
    parts.mul_(math.sqrt(box**3 / 2.0))
    spectrum = torch.view_as_complex(parts)
    negative = (-torch.arange(box)) % box
    for col in (0, box // 2):
        plane = spectrum[..., col].contiguous()  # (n, B, B)
        mate = plane[:, negative][:, :, negative].conj()
        spectrum[..., col] = (plane + mate) * (1.0 / math.sqrt(2.0))
    return spectrum


def corrupt_fourier(signal: torch.Tensor, defocus_um: np.ndarray, config, model: FourierModel,
                    generator: torch.Generator) -> torch.Tensor:
    """CTF, wedge, noise at the SNR, band-pass and normalisation, in Fourier space.

    signal (n, B, B, B) float32 -> (n, B, B, B) float32.
    """
    sim, box, n = config.simulation, model.box, signal.shape[0]
    spectrum = torch.fft.rfftn(signal, dim=(-3, -2, -1))
    if sim.ctf:
        spectrum *= ctf_3d(torch.as_tensor(defocus_um), box, config.pixel_size_angstrom, sim.voltage_kv,
                           sim.spherical_aberration_mm, sim.amplitude_contrast)
    if sim.snr is not None:
        var_signal = _weighted_power(spectrum, model.signal_weights)
        _require_signal(var_signal)
        noise = _hermitian_noise(n, box, generator)
        var_noise = _weighted_power(noise, model.signal_weights)
        sigma = torch.sqrt(var_signal / (sim.snr * var_noise)).float()
        spectrum += noise.mul_(sigma.view(-1, 1, 1, 1))
    if model.transfer is not None:
        factor = model.transfer.expand(n, -1, -1, -1)
        if sim.normalise:
            variance = _weighted_power(spectrum, model.total_weights)
            _require_signal(variance)
            factor = factor * torch.rsqrt(variance).float().view(-1, 1, 1, 1)
        spectrum *= factor
    return torch.fft.irfftn(spectrum, s=(box, box, box), dim=(-3, -2, -1))


def corrupt_real(signal: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """Noise at the SNR and normalisation in real space (no CTF, wedge or band-pass): (n, B, B, B)."""
    sim = config.simulation
    out = signal
    if sim.snr is not None:
        var_signal = signal.double().var(dim=(1, 2, 3), unbiased=False)
        _require_signal(var_signal)
        noise = torch.randn(signal.shape, generator=generator)
        var_noise = noise.double().var(dim=(1, 2, 3), unbiased=False)
        sigma = torch.sqrt(var_signal / (sim.snr * var_noise)).float()
        out = signal + sigma.view(-1, 1, 1, 1) * noise
    if sim.normalise:
        mean = out.double().mean(dim=(1, 2, 3))
        std = out.double().std(dim=(1, 2, 3), unbiased=False)
        _require_signal(std)
        out = ((out - mean.float().view(-1, 1, 1, 1)) / std.float().view(-1, 1, 1, 1))
    return out


def _require_signal(variance: torch.Tensor) -> None:
    if not bool(torch.all(variance > 0)):
        bad = int(torch.nonzero(~(variance > 0))[0, 0])
        raise InputError(f"particle {bad} of the batch has no signal in the box (is the map empty?)")


# ----------------------------------------------------------------------------- the shard


def batch_size(box: int) -> int:
    """Particles rendered at once: at most MAX_BATCH_VOXELS voxels."""
    return max(1, MAX_BATCH_VOXELS // box**3)


def simulate_volumes(config, class_maps: np.ndarray, class_slot: np.ndarray, draws: ParticleDraws,
                     generator: torch.Generator) -> np.ndarray:
    """All particles of a shard: (n, B, B, B) float32, rendered in batches (memory ~ the shard)."""
    box = config.box_size
    factor = 2 if box <= OVERSAMPLED_MAX_BOX else 1
    maps_fine = oversample_maps(class_maps, factor)
    model = FourierModel.from_config(config)
    fourier = model.needed(config)
    n = len(class_slot)
    out = np.empty((n, box, box, box), dtype=np.float32)
    step = batch_size(box)
    for start in range(0, n, step):
        sel = slice(start, min(n, start + step))
        clean = render_particles(maps_fine, factor, class_slot[sel], draws.rotation[sel], draws.shift_xyz_px[sel], box)
        signal = torch.from_numpy(clean)
        if fourier:
            result = corrupt_fourier(signal, draws.defocus_um[sel], config, model, generator)
        else:
            result = corrupt_real(signal, config, generator)
        out[sel] = result.numpy()
    if not np.all(np.isfinite(out)):
        raise InputError("simulation produced non-finite values (check the maps and simulation settings)")
    return out


def optics_table(config) -> pd.DataFrame:
    """The data_optics block of simulated subtomograms (one optics group)."""
    sim = config.simulation
    return pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnImagePixelSize": [float(config.pixel_size_angstrom)],
        "rlnImageSize": [int(config.box_size)],
        "rlnImageDimensionality": [3],
        "rlnVoltage": [float(sim.voltage_kv)],
        "rlnSphericalAberration": [float(sim.spherical_aberration_mm)],
        "rlnAmplitudeContrast": [float(sim.amplitude_contrast)],
    })


def particle_table(config, split: str, shard: int, shard_name: str, draws: ParticleDraws) -> pd.DataFrame:
    """The ground truth of a shard's particles, columns of :mod:`cryovae.shards` (+ defocus with CTF)."""
    n = len(draws.class_index)
    names = np.asarray(config.class_names, dtype=object)
    angles = matrix_to_relion_euler(draws.rotation)
    origin = -draws.shift_xyz_px * config.pixel_size_angstrom
    snr = config.simulation.snr
    table = pd.DataFrame({
        "cryovaeParticleId": [f"{split}_{shard:03d}_{i:05d}" for i in range(n)],
        "cryovaeShard": [shard_name] * n,
        "cryovaeIndex": np.arange(n),
        "cryovaeClassName": names[draws.class_index],
        "rlnClassNumber": draws.class_index + 1,
        "rlnAngleRot": angles[:, 0],
        "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
        "rlnOriginZAngst": origin[:, 2],
        "cryovaeSnr": np.full(n, np.inf if snr is None else float(snr)),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    if config.simulation.ctf:
        defocus_angstrom = draws.defocus_um * 1e4
        table["rlnDefocusU"] = defocus_angstrom
        table["rlnDefocusV"] = defocus_angstrom
        table["rlnDefocusAngle"] = 0.0
    return table


def simulate_shard(config, split: str, shard: int, maps: list[Path], output: Path, star: Path) -> None:
    """Simulate shard ``shard`` of ``split``: ``output`` (.npy, (n, B, B, B) float32) and ``star``."""
    classes = split_classes(config, split)
    class_maps = load_class_maps(config, classes, maps)
    draws, generator = draw_particles(config, split, shard)
    slot_of = {config.class_names.index(c): i for i, c in enumerate(classes)}
    class_slot = np.array([slot_of[c] for c in draws.class_index], dtype=np.int64)
    volumes = simulate_volumes(config, class_maps, class_slot, draws, generator)
    output, star = Path(output), Path(star)
    with atomic_path(output) as tmp:
        np.save(tmp, volumes)
    write_particles_star(particle_table(config, split, shard, output.name, draws), optics_table(config), star)
