"""Fourier-space transfer functions of subtomograms: the CTF and the missing wedge.

Filters come in the ``torch.fft.rfftn`` layout of a cubic box of edge ``box`` (z, y, x
order): shape (box, box, box // 2 + 1), frequency index 0 first (no fftshift), on the grids
of :mod:`cryovae.volumes` (which also holds the low-pass and band-pass filters).  They are
computed with NumPy; the functions that return tensors import torch when called, so that
the simulation, which needs only the arrays, starts without it.
Frequencies are in cycles per pixel (``fftfreq``) unless a name says ``per_angstrom``.

CTF model (a 3D, isotropic simplification for subtomograms): the 2D phase-contrast CTF
evaluated at the 3D spatial frequency ``|k|``,

    CTF(k) = sin(gamma(k) + atan(A / sqrt(1 - A^2))),
    gamma(k) = pi * lambda * dz * k^2 - (pi / 2) * Cs * lambda^3 * k^4,

with ``dz`` > 0 underfocus, ``lambda`` the relativistic electron wavelength, ``Cs`` the
spherical aberration and ``A`` the amplitude contrast.  This is torch-ctf's sign
(``calculate_ctf_1d``, which the tests hold it to): positive at low frequency, so a white particle (protein bright, as
RELION expects particles) stays white.  It ignores the
defocus gradient across tilts and the per-tilt dose; a real subtomogram's CTF is a sum
over the tilt series, :func:`per_tilt_ctf_3d` (and :class:`ParticleCtfs`, which extracted
particles get from their split's acquisition.star).

Tilt geometry (the one definition; the tomogram simulator, the acquisition metadata and
the wedge all use it): a tilt ``theta`` about Y images the specimen along the beam
direction ``b = (-sin theta, 0, cos theta)`` (x, y, z in the tomogram), and the image x axis
is ``(cos theta, 0, sin theta)``: :func:`tilt_rotations_xyz` maps tomogram coordinates to
(image x, y, height along the beam).  The beam travels towards +height and the focal plane
lies downstream of the specimen, so a point ``h`` Å further along the beam than the tilt axis
is ``h`` Å *less* underfocused (:func:`defocus_offset_angstrom` = ``-h``): at a positive tilt
the +x side of the specimen is the more underfocused one, as IMOD and Warp define it.

Missing wedge: tilt ``theta`` samples the central Fourier plane normal to ``b``, which holds
the (kx, kz) direction ``(cos theta, sin theta)``; a single-axis tilt series over [min, max]
samples the (kx, kz) directions whose angle ``atan2(kz, kx)`` (folded into (-90, 90]) lies in
that range.  Everything else (a double wedge about kz) is zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import constants

if TYPE_CHECKING:
    import torch


def _rfft_frequencies(box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kz, ky, kx) in cycles/pixel, broadcastable to (box, box, box//2+1), float64."""
    full, half = np.fft.fftfreq(box), np.fft.rfftfreq(box)
    return full[:, None, None], full[None, :, None], half[None, None, :]


def integer_k2(box: int) -> np.ndarray:
    """|k|^2 in Fourier pixels^2 (an integer) on the rfft grid: (box, box, box//2+1) int64."""
    kz, ky, kx = _rfft_frequencies(box)
    return np.round((kz**2 + ky**2 + kx**2) * box**2).astype(np.int64)


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength at an acceleration voltage, in Å."""
    energy = constants.e * voltage_kv * 1e3  # J
    momentum = np.sqrt(2.0 * constants.m_e * energy * (1.0 + energy / (2.0 * constants.m_e * constants.c**2)))
    return constants.h / momentum * 1e10


def ctf_table(
    defocus_um: np.ndarray,
    box: int,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
) -> np.ndarray:
    """The isotropic CTF at every integer |k|^2 (Fourier pixels^2) of the box: (n, 3·(box/2)^2 + 1) float32.

    ``defocus_um``: shape (n,), positive = underfocus.  Index it with :func:`integer_k2`.
    """
    k2 = np.arange(3 * (box // 2) ** 2 + 1, dtype=np.float64)[None, :] / (box * pixel_size_angstrom) ** 2
    wavelength = electron_wavelength_angstrom(voltage_kv)
    defocus = np.asarray(defocus_um, dtype=np.float64).reshape(-1, 1) * 1e4  # Å
    cs = spherical_aberration_mm * 1e7  # Å
    gamma = np.pi * wavelength * defocus * k2 - 0.5 * np.pi * cs * wavelength**3 * k2**2
    contrast = np.arctan(amplitude_contrast / np.sqrt(1.0 - amplitude_contrast**2))
    return np.sin(gamma + contrast).astype(np.float32)


def ctf_3d(
    defocus_um: torch.Tensor,
    box: int,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
) -> torch.Tensor:
    """Isotropic 3D CTF (see the module docstring) per particle: shape (n, box, box, box//2+1), float32.

    ``defocus_um``: shape (n,), positive = underfocus; the result is on its device.  Evaluated
    once per distinct |k|^2 (:func:`ctf_table`) and gathered.
    """
    import torch

    defocus = torch.as_tensor(defocus_um)
    table = ctf_table(defocus.detach().cpu().numpy(), box, pixel_size_angstrom, voltage_kv,
                      spherical_aberration_mm, amplitude_contrast)
    gathered = table[:, integer_k2(box).reshape(-1)].reshape(-1, box, box, box // 2 + 1)
    return torch.from_numpy(gathered).to(defocus.device)


def tilt_rotations_xyz(tilt_deg) -> np.ndarray:
    """Matrices (n, 3, 3), float64, that map tomogram (x, y, z) to (image x, y, height along the beam).

    Rows: image x = (cos t, 0, sin t), y, beam = (-sin t, 0, cos t); see the module docstring.
    """
    theta = np.deg2rad(np.atleast_1d(np.asarray(tilt_deg, dtype=np.float64)))
    c, s = np.cos(theta), np.sin(theta)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1),
                     np.stack([-s, zero, c], -1)], axis=-2)


def defocus_offset_angstrom(coords_xyz_angstrom: np.ndarray, tilt_deg) -> np.ndarray:
    """Extra underfocus (Å) of points at each tilt: shape (n_points, n_tilts).

    ``coords_xyz_angstrom``: (n_points, 3) relative to the tilt axis at the tomogram's centre
    (RELION 5's centred coordinates).  The nominal (tilt-axis) defocus plus this is the
    defocus at the point; positive = more underfocused.
    """
    coords = np.asarray(coords_xyz_angstrom, dtype=np.float64).reshape(-1, 3)
    height = np.einsum("tj,nj->nt", tilt_rotations_xyz(tilt_deg)[:, 2, :], coords)
    return -height


def wedge_sampled(box: int, tilt_range_deg: tuple[float, float]) -> np.ndarray:
    """Boolean (box, box, box//2+1): True where a tilt series over ``tilt_range_deg`` about Y samples.

    The k = 0 line along ky (kx = kz = 0) is sampled by every tilt and is always True.
    """
    return wedge_sampled_zyx((box, box, box), tilt_range_deg)


def wedge_sampled_zyx(shape_zyx: tuple[int, int, int], tilt_range_deg: tuple[float, float]) -> np.ndarray:
    """:func:`wedge_sampled` on the rfft grid of a (nz, ny, nx) volume (a tomogram slab):
    boolean (nz, ny, nx//2+1); square pixels, so the (kx, kz) angle is the same in cycles/pixel."""
    nz, ny, nx = (int(n) for n in shape_zyx)
    lo, hi = float(tilt_range_deg[0]), float(tilt_range_deg[1])
    kz, kx = np.fft.fftfreq(nz)[:, None, None], np.fft.rfftfreq(nx)[None, None, :]
    angle = np.rad2deg(np.arctan2(kz, kx))  # (-180, 180]
    angle = np.where(angle > 90.0, angle - 180.0, angle)
    angle = np.where(angle <= -90.0, angle + 180.0, angle)  # folded into (-90, 90]
    sampled = (angle >= lo - 1e-9) & (angle <= hi + 1e-9)
    if lo <= -90.0:  # -90 and 90 are the same direction
        sampled |= angle >= 90.0 - 1e-9
    on_axis = (kz == 0) & (kx == 0)
    return np.ascontiguousarray(np.broadcast_to(sampled | on_axis, (nz, ny, nx // 2 + 1)))


def missing_wedge_mask(box: int, tilt_range_deg: tuple[float, float]) -> torch.Tensor:
    """:func:`wedge_sampled` as a boolean tensor (box, box, box//2+1)."""
    import torch

    return torch.from_numpy(wedge_sampled(box, tilt_range_deg))


# ----------------------------------------------------------------------------- the per-tilt 3D CTF

DEFOCUS_BIN_ANGSTROM = 250.0  # particles share a per-tilt CTF when their x and z fall in one such bin


def critical_exposure_e_per_angstrom2(k_per_angstrom: np.ndarray, voltage_kv: float) -> np.ndarray:
    """Grant & Grigorieff (2015) critical exposure N_c(k) = 0.245 k^-1.665 + 2.81 e/Å² at 300 kV
    (torch-fourier-filter's), times 0.8 below 250 kV as RELION scales it for 200 kV; float64, same
    shape as ``k_per_angstrom``."""
    import torch
    from torch_fourier_filter.dose_weight import critical_exposure

    k = torch.as_tensor(np.maximum(np.asarray(k_per_angstrom, dtype=np.float64), 1e-9))
    scale = 0.8 if voltage_kv < 250.0 else 1.0
    return scale * critical_exposure(k).numpy()


def exposure_weights(pre_exposure_e_per_angstrom2, k_per_angstrom: np.ndarray, voltage_kv: float) -> np.ndarray:
    """exp(-N / (2 N_c(k))) for each exposure N (n,) at every frequency: (n, *k.shape) float64, 1 at k = 0."""
    k = np.asarray(k_per_angstrom, dtype=np.float64)
    dose = np.asarray(pre_exposure_e_per_angstrom2, dtype=np.float64).reshape((-1,) + (1,) * k.ndim)
    return np.where(k == 0, 1.0, np.exp(-dose / (2.0 * critical_exposure_e_per_angstrom2(k, voltage_kv))))


def dose_weights_2d(pre_exposure_e_per_angstrom2: np.ndarray, box: int, pixel_size_angstrom: float,
                    voltage_kv: float) -> np.ndarray:
    """:func:`exposure_weights` per tilt on the fftshifted rfft grid of a (box, box) image:
    (n_tilts, box, box//2+1) float64 (1 at k = 0)."""
    ky = np.fft.fftshift(np.fft.fftfreq(box))[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    return exposure_weights(pre_exposure_e_per_angstrom2, np.sqrt(ky**2 + kx**2) / pixel_size_angstrom, voltage_kv)


def per_tilt_ctf_3d(
    defocus_um: np.ndarray,
    tilt_deg: np.ndarray,
    pre_exposure_e_per_angstrom2: np.ndarray,
    box: int,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
) -> torch.Tensor:
    """A subtomogram's own 3D CTF: each tilt's 2D CTF inserted as the central slice normal to its beam.

    ``defocus_um``, ``tilt_deg``, ``pre_exposure_e_per_angstrom2``: (n_tilts,), the defocus *at the
    particle* at each tilt (nominal + :func:`defocus_offset_angstrom`), positive = underfocus.
    Each slice is torch-ctf's 2D CTF times the dose weight (:func:`dose_weights_2d`), inserted
    with torch-fourier-slice (trilinear) and divided by the insertion weights: at every voxel
    the weighted mean of the tilts' CTFs near it.  Zero outside the sampled wedge
    (:func:`wedge_sampled` of the tilts' range) and where no slice reaches (beyond the 2D
    images' corners).  Returns (box, box, box//2+1) float32 in the unshifted rfft layout.
    """
    import torch
    from torch_ctf import calculate_ctf_2d
    from torch_fourier_slice import insert_central_slices_rfft_3d

    tilt = np.asarray(tilt_deg, dtype=np.float64).reshape(-1)
    defocus = torch.as_tensor(np.asarray(defocus_um, dtype=np.float64).reshape(-1), dtype=torch.float32)
    slices = calculate_ctf_2d(
        defocus=defocus, astigmatism=0.0, astigmatism_angle=0.0, voltage=voltage_kv,
        spherical_aberration=spherical_aberration_mm, amplitude_contrast=amplitude_contrast, phase_shift=0.0,
        pixel_size=pixel_size_angstrom, image_shape=(box, box), rfft=True, fftshift=True,
    )
    dose = dose_weights_2d(pre_exposure_e_per_angstrom2, box, pixel_size_angstrom, voltage_kv)
    slices = slices * torch.as_tensor(dose, dtype=torch.float32)
    image_from_tomogram = tilt_rotations_xyz(tilt)  # rows: image x, y, beam
    tomogram_from_image = torch.as_tensor(np.ascontiguousarray(image_from_tomogram.transpose(0, 2, 1)),
                                          dtype=torch.float32)
    values, weights = insert_central_slices_rfft_3d(slices.to(torch.complex64), (box,) * 3, tomogram_from_image)
    values, weights = torch.fft.ifftshift(values.real, dim=(0, 1)), torch.fft.ifftshift(weights, dim=(0, 1))
    ctf = torch.where(weights > 1e-6, values / weights.clamp(min=1e-6), torch.zeros_like(values))
    sampled = torch.from_numpy(wedge_sampled(box, (float(tilt.min()), float(tilt.max()))))
    return (ctf * sampled).to(torch.float32)


def particle_defocus_um(defocus_um: np.ndarray, tilt_deg: np.ndarray, coords_xyz_angstrom: np.ndarray) -> np.ndarray:
    """Defocus at each particle at each tilt: the tilt-axis defocus (n_tilts,) plus
    :func:`defocus_offset_angstrom`: (n_particles, n_tilts) µm."""
    offset = defocus_offset_angstrom(coords_xyz_angstrom, tilt_deg)
    return np.asarray(defocus_um, dtype=np.float64)[None, :] + offset / 1e4


def tilt_insertion_weights(tilt_deg: np.ndarray, box: int) -> torch.Tensor:
    """Each tilt's trilinear insertion weight at every voxel: (n_tilts, box, box, box//2+1) float32,
    unshifted rfft layout; the weights :func:`per_tilt_ctf_3d` divides by, one tilt at a time.

    With them a per-tilt 3D CTF is ``sum_t W_t(k) c_t(|k|) / sum_t W_t(k)``, each tilt's CTF
    evaluated at the voxel's own |k| (on its central slice |k| is the 2D frequency): the same
    as inserting the 2D CTFs up to the radial interpolation, at the cost of a gather
    (:func:`weighted_ctf_3d`) instead of an insertion per defocus.
    """
    import torch
    from torch_fourier_slice import insert_central_slices_rfft_3d

    tilt = np.asarray(tilt_deg, dtype=np.float64).reshape(-1)
    ones = torch.ones((1, box, box // 2 + 1), dtype=torch.complex64)
    rotations = torch.as_tensor(np.ascontiguousarray(tilt_rotations_xyz(tilt).transpose(0, 2, 1)), dtype=torch.float32)
    weights = [torch.fft.ifftshift(insert_central_slices_rfft_3d(ones, (box,) * 3, r[None])[1], dim=(0, 1))
               for r in rotations]
    sampled = torch.from_numpy(wedge_sampled(box, (float(tilt.min()), float(tilt.max()))))
    return (torch.stack(weights) * sampled).to(torch.float32)


def weighted_ctf_3d(weights: torch.Tensor, defocus_um: np.ndarray, pre_exposure_e_per_angstrom2: np.ndarray,
                    box: int, pixel_size_angstrom: float, voltage_kv: float, spherical_aberration_mm: float,
                    amplitude_contrast: float) -> torch.Tensor:
    """The per-tilt 3D CTF from :func:`tilt_insertion_weights` (n_tilts, box, box, box//2+1) and the
    defocus at the particle (n_tilts,) µm: (box, box, box//2+1) float32 (see there)."""
    import torch

    k2 = integer_k2(box).reshape(-1)
    table = ctf_table(np.asarray(defocus_um, dtype=np.float64), box, pixel_size_angstrom, voltage_kv,
                      spherical_aberration_mm, amplitude_contrast)  # (T, K)
    k_per_angstrom = np.sqrt(np.arange(table.shape[1])) / (box * pixel_size_angstrom)
    dose = exposure_weights(pre_exposure_e_per_angstrom2, k_per_angstrom, voltage_kv)
    per_voxel = torch.from_numpy((table * dose)[:, k2].astype(np.float32)).reshape(weights.shape)
    total = weights.sum(0)
    return torch.where(total > 1e-6, (weights * per_voxel).sum(0) / total.clamp(min=1e-6), torch.zeros_like(total))


class ParticleCtfs:
    """Per-particle 3D CTFs (:func:`per_tilt_ctf_3d`) of one or more tilt series, cached.

    ``acquisitions``: tomogram -> a complete :class:`cryovae.acquisition.Acquisition`.  Particles
    whose x and z (centred Å) fall in one :data:`DEFOCUS_BIN_ANGSTROM` bin share one CTF,
    computed at the bin's centre (a defocus error of at most about 0.018 µm: a CTF phase error of
    0.03 rad at 20 Å), so a split costs one CTF per distinct (tomogram, bin), however many
    particles share it.  The insertion weights of each
    tomogram's tilts are computed once (:func:`tilt_insertion_weights`); a CTF is then a weighted
    gather (:func:`weighted_ctf_3d`), a few milliseconds at 32³.
    """

    def __init__(self, acquisitions: dict, box: int, pixel_size_angstrom: float,
                 bin_angstrom: float = DEFOCUS_BIN_ANGSTROM):
        self.acquisitions, self.box, self.pixel = acquisitions, box, pixel_size_angstrom
        self.bin = bin_angstrom
        self._cache: dict[tuple[str, int, int], torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def _key(self, tomogram: str, coords_xyz_angstrom: np.ndarray) -> tuple[str, int, int]:
        x, _, z = np.asarray(coords_xyz_angstrom, dtype=np.float64)
        return str(tomogram), int(np.floor(x / self.bin)), int(np.floor(z / self.bin))

    def _compute(self, key: tuple[str, int, int]) -> torch.Tensor:
        acq = self.acquisitions[key[0]]
        centre = np.array([[(key[1] + 0.5) * self.bin, 0.0, (key[2] + 0.5) * self.bin]])
        defocus = particle_defocus_um(acq.defocus_um, acq.tilt_deg, centre)[0]
        if key[0] not in self._weights:
            self._weights[key[0]] = tilt_insertion_weights(acq.tilt_deg, self.box)
        return weighted_ctf_3d(self._weights[key[0]], defocus, acq.pre_exposure_e_per_angstrom2, self.box,
                               self.pixel, acq.voltage_kv, acq.spherical_aberration_mm, acq.amplitude_contrast)

    def __call__(self, tomograms, coords_xyz_angstrom: np.ndarray) -> torch.Tensor:
        """CTFs of n particles (tomogram names (n,), centred coordinates (n, 3) Å): (n, box, box, box//2+1)."""
        import torch

        keys = [self._key(t, c) for t, c in zip(tomograms, np.asarray(coords_xyz_angstrom))]
        for key in dict.fromkeys(keys):
            if key not in self._cache:
                self._cache[key] = self._compute(key)
        return torch.stack([self._cache[k] for k in keys])
