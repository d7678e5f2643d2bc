"""Fourier-space transfer functions of subtomograms: the CTF and the missing wedge.

Filters come in the ``torch.fft.rfftn`` layout of a cubic box of edge ``box`` (z, y, x
order): shape (box, box, box // 2 + 1), frequency index 0 first (no fftshift), on the grids
of :mod:`cryovae.volumes` (which also holds the low-pass and band-pass filters).
Frequencies are in cycles per pixel (``fftfreq``) unless a name says ``per_angstrom``.

CTF model (a 3D, isotropic simplification for subtomograms): the 2D phase-contrast CTF
evaluated at the 3D spatial frequency ``|k|``,

    CTF(k) = sin(gamma(k) + atan(A / sqrt(1 - A^2))),
    gamma(k) = pi * lambda * dz * k^2 - (pi / 2) * Cs * lambda^3 * k^4,

with ``dz`` > 0 underfocus, ``lambda`` the relativistic electron wavelength, ``Cs`` the
spherical aberration and ``A`` the amplitude contrast.  This is torch-ctf's sign
(``calculate_ctf_1d``): positive at low frequency, so a white particle (protein bright, as
RELION expects particles) stays white.  It ignores the
defocus gradient across tilts and the per-tilt dose (a real subtomogram's CTF is a sum
over the tilt series).

Missing wedge: a tilt ``theta`` about Y images the specimen along (sin theta, 0,
cos theta) and samples the central Fourier plane normal to it; a single-axis tilt series
over [min, max] samples the (kx, kz) directions whose angle ``atan2(-kz, kx)`` (folded
into (-90, 90]) lies in that range.  Everything else (a double wedge about kz) is zero.
"""

from __future__ import annotations

import torch
from torch_ctf.ctf_utils import calculate_total_phase_shift

from cryovae.volumes import rfft_frequencies


def integer_k2(box: int) -> torch.Tensor:
    """|k|^2 in Fourier pixels^2 (an integer) on the rfft grid: (box, box, box//2+1) int64."""
    kz, ky, kx = rfft_frequencies(box)
    return torch.round((kz**2 + ky**2 + kx**2) * box**2).long()


def ctf_table(
    defocus_um: torch.Tensor,
    box: int,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
) -> torch.Tensor:
    """The isotropic CTF at every integer |k|^2 (Fourier pixels^2) of the box: (n, 3·(box/2)^2 + 1) float32.

    ``defocus_um``: shape (n,), positive = underfocus.  Index it with :func:`integer_k2`.
    """
    k2_values = torch.arange(3 * (box // 2) ** 2 + 1, dtype=torch.float64)
    k2_per_angstrom2 = k2_values / (box * pixel_size_angstrom) ** 2
    defocus = torch.as_tensor(defocus_um, dtype=torch.float64).view(-1, 1)
    phase = calculate_total_phase_shift(
        defocus_um=defocus,
        voltage_kv=torch.tensor(float(voltage_kv), dtype=torch.float64),
        spherical_aberration_mm=torch.tensor(float(spherical_aberration_mm), dtype=torch.float64),
        phase_shift_degrees=torch.tensor(0.0, dtype=torch.float64),
        amplitude_contrast_fraction=torch.tensor(float(amplitude_contrast), dtype=torch.float64),
        fftfreq_grid_angstrom_squared=k2_per_angstrom2.unsqueeze(0),
    )
    return (-torch.sin(phase)).to(torch.float32)


def ctf_3d(
    defocus_um: torch.Tensor,
    box: int,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
) -> torch.Tensor:
    """Isotropic 3D CTF (see the module docstring) per particle: shape (n, box, box, box//2+1), float32.

    ``defocus_um``: shape (n,), positive = underfocus.  Evaluated once per distinct |k|^2
    (:func:`ctf_table`, torch-ctf's phase) and gathered.
    """
    table = ctf_table(defocus_um, box, pixel_size_angstrom, voltage_kv, spherical_aberration_mm, amplitude_contrast)
    return table.index_select(1, integer_k2(box).reshape(-1)).reshape(-1, box, box, box // 2 + 1)


def missing_wedge_mask(box: int, tilt_range_deg: tuple[float, float]) -> torch.Tensor:
    """Boolean (box, box, box//2+1): True where a tilt series over ``tilt_range_deg`` about Y samples.

    The k = 0 line along ky (kx = kz = 0) is sampled by every tilt and is always True.
    """
    lo, hi = float(tilt_range_deg[0]), float(tilt_range_deg[1])
    kz, _, kx = rfft_frequencies(box)
    angle = torch.rad2deg(torch.atan2(-kz, kx))  # (-180, 180]
    angle = torch.where(angle > 90.0, angle - 180.0, angle)
    angle = torch.where(angle <= -90.0, angle + 180.0, angle)  # folded into (-90, 90]
    sampled = (angle >= lo - 1e-9) & (angle <= hi + 1e-9)
    if lo <= -90.0:  # -90 and 90 are the same direction
        sampled |= angle >= 90.0 - 1e-9
    on_axis = (kz == 0) & (kx == 0)
    return (sampled | on_axis).expand(box, box, box // 2 + 1).contiguous()
