"""Volume maths, once: rigid transforms, Fourier crop/pad, shifts, filters, weights, correlation peaks.

Conventions (DESIGN.md, :mod:`cryovae.rotations`): volumes are (z, y, x) arrays (2D images
(y, x)); rotations ``A`` = rotation_matrix_particle_from_reference act on (x, y[, z]) column
vectors about the box centre, voxel ``N//2`` on every axis (RELION's, not (N - 1)/2).  A
pose (A, d), d the content's displacement in voxels (x, y[, z]), makes the particle

    particle(q) = reference(c + A^T (q - c - d)),        c = N//2 per axis,

so reference content at c + p lands at c + A p + d, and the particle's
``rlnOriginX/Y/ZAngst`` is -d × pixel size.  :func:`rotate_volume` (scipy) and
:func:`rigid_transform` (torch, batched, differentiable) both do this;
:func:`check_rigid_transform` compares any implementation with scipy's about N//2.

Spectra are ``torch.fft.rfftn`` layouts of the last three axes, (D, H, W//2+1), frequency
index 0 first (no fftshift); frequencies are in cycles per pixel unless a name says
``per_angstrom`` or ``px`` (Fourier pixels, cycles per box).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch_fourier_rescale.fourier_rescale_3d import fourier_rescale_rfft_3d
from torch_fourier_shift import fourier_shift_dft_3d

# ----------------------------------------------------------------------------- rigid transforms


def rotate_volume(
    volume_zyx: np.ndarray,
    rotation_matrix_particle_from_reference: np.ndarray,
    origin_xyz_angstrom=None,
    pixel_size_angstrom: float = 1.0,
    order: int = 1,
) -> np.ndarray:
    """The particle made from a reference by a rotation and a RELION origin (scipy); 3D (D, H, W) or 2D (H, W).

    With c the centre (voxel N//2 per axis), A the rotation ((3, 3), or (2, 2) on (x, y) for an
    image) and d = -origin / pixel size (voxels, (x, y[, z])):

        particle(x) = reference(c + A^T (x - c - d))

    ``scipy.ndimage.affine_transform`` works on (z, y, x) indices, so A^T is permuted to
    P A^T P with P the axis reversal.  Outside the input counts as 0 (``grid-constant``, as
    :func:`rigid_transform`'s zero padding).  ``order``: spline order (1 = trilinear).
    """
    vol = np.asarray(volume_zyx)
    a = np.asarray(rotation_matrix_particle_from_reference, np.float64)
    origin = np.zeros(vol.ndim) if origin_xyz_angstrom is None else np.asarray(origin_xyz_angstrom, np.float64)
    d_zyx = -origin[::-1] / pixel_size_angstrom
    c = np.array([s // 2 for s in vol.shape], dtype=np.float64)
    m = a.T[::-1, ::-1]
    offset = c - m @ (c + d_zyx)
    return ndimage.affine_transform(vol, m, offset=offset, order=order, mode="grid-constant", cval=0.0)


def _grid_affine(rotation: torch.Tensor, shift_voxels: torch.Tensor, spatial: tuple[int, ...]):
    """The ``grid_sample`` coordinate (align_corners=False) that samples c + A^T (q - c - d) for
    output index q (x, y[, z]): g = (q - c) @ (A s) + offset, returned as (c (d,), A s (n, d, d),
    offset (n, d)).

    As a row vector the sampled index is (q - c) @ A + c - d @ A.  ``grid_sample``'s last
    axis is (x, y[, z]) and addresses index i of an axis of size N by g = (2 i + 1) / N - 1,
    so g = ((q - c) @ A) * s + (c - d @ A) * s + s / 2 - 1 with s = 2 / N.
    """
    dtype, device = rotation.dtype, rotation.device
    sizes_xyz = spatial[::-1]
    scale = 2.0 / torch.tensor(sizes_xyz, dtype=dtype, device=device)
    centre = torch.tensor([s // 2 for s in sizes_xyz], dtype=dtype, device=device)
    shift = centre - (shift_voxels.unsqueeze(1) @ rotation).squeeze(1)  # (n, d)
    return centre, rotation * scale, shift * scale + scale / 2 - 1.0


def _sampling_grid(rotation: torch.Tensor, shift_voxels: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``grid_sample`` grid (n, *spatial, d) of :func:`_grid_affine` at every output voxel;
    (q - c) @ A s is a sum of one term per axis, added by broadcasting."""
    n, ndim = rotation.shape[0], rotation.shape[-1]
    _, a_scaled, offset = _grid_affine(rotation, shift_voxels, spatial)
    grid = offset.view((n,) + (1,) * ndim + (ndim,))
    for axis, size in enumerate(spatial[::-1]):  # axis 0 is x, the last array axis
        ticks = torch.arange(size, dtype=rotation.dtype, device=rotation.device) - (size // 2)
        view = [n] + [1] * ndim + [ndim]
        view[ndim - axis] = size
        grid = grid + (ticks[None, :, None] * a_scaled[:, None, axis, :]).view(view)
    return grid


def ball_points(box: int, radius: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxels of a (box³) volume within ``radius`` (default box/2) of voxel box//2: their
    indices (m, 3) as (x, y, z) and their offsets (m,) in the flattened (z, y, x) volume.
    Centred on the same voxel, the ball is also the frequencies up to Nyquist of an fftshifted
    spectrum."""
    radius = box / 2 if radius is None else radius
    z, y, x = torch.meshgrid(*[torch.arange(box)] * 3, indexing="ij")
    xyz = torch.stack([x, y, z], -1).reshape(-1, 3)
    keep = ((xyz - box // 2).double() ** 2).sum(1) <= radius**2
    return xyz[keep], torch.nonzero(keep).squeeze(1)


def _transform_inputs(volumes: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor | None):
    """What :func:`rigid_transform` and :func:`sample_rigid` sample from: (volumes as (n, channels,
    *spatial), rotation (n, d, d), shift (n, d), spatial), float32 (float64 for float64 input)."""
    ndim = rotation.shape[-1]
    dtype = torch.float64 if volumes.dtype == torch.float64 else torch.float32
    spatial = tuple(volumes.shape[-ndim:])
    n = volumes.shape[0]
    rot = rotation.to(dtype=dtype, device=volumes.device)
    shift = torch.zeros(n, ndim, dtype=dtype, device=volumes.device) if shift_voxels is None \
        else shift_voxels.to(dtype=dtype, device=volumes.device)
    return volumes.to(dtype).reshape((n, -1) + spatial), rot, shift, spatial


def _trilinear(flat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_rigid(volumes: torch.Tensor, rotation: torch.Tensor, points_xyz: torch.Tensor,
                 shift_voxels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rigid_transform` evaluated at output voxels ``points_xyz`` (m, d) only (indices
    x, y[, z], e.g. :func:`ball_points`): (n, ..., m).  The same trilinear values, for the
    cost of m voxels instead of the whole box."""
    flat, rot, shift, spatial = _transform_inputs(volumes, rotation, shift_voxels)
    centre, a_scaled, offset = _grid_affine(rot, shift, spatial)
    points = points_xyz.to(dtype=rot.dtype, device=volumes.device) - centre
    grid = torch.matmul(points, a_scaled) + offset[:, None]  # (n, m, d)
    out = _trilinear(flat, grid.view((len(flat),) + (1,) * (len(spatial) - 1) + grid.shape[1:]))
    return out.reshape(volumes.shape[: volumes.ndim - len(spatial)] + (len(points_xyz),))


def rigid_transform(
    volumes: torch.Tensor, rotation: torch.Tensor, shift_voxels: torch.Tensor | None = None
) -> torch.Tensor:
    """Batched, differentiable :func:`rotate_volume` (trilinear/bilinear, zeros outside) with ``grid_sample``.

    volumes: (n, ..., *spatial), spatial the last d axes (d = 3 for (3, 3) rotations, 2 for
    (2, 2)), any axes between them channels; rotation: (n, d, d) particle from reference on
    (x, y[, z]); shift_voxels: (n, d) content displacement d in voxels (x, y[, z]), or None.
    Returns the volumes' shape, float32 (float64 for float64 input: never a half-precision
    grid).  Differentiable with respect to all three inputs.
    """
    flat, rot, shift, spatial = _transform_inputs(volumes, rotation, shift_voxels)
    return _trilinear(flat, _sampling_grid(rot, shift, spatial)).reshape(volumes.shape)


def rigid_transform_within(volumes: torch.Tensor, rotation: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """:func:`rigid_transform` of (n, B, B, B) volumes evaluated only at ``points`` (their (x, y, z)
    indices and flat offsets, e.g. :func:`ball_points` of the content's :func:`support_radius`),
    zeros elsewhere: the same volumes when the content lies within those voxels, for their cost."""
    xyz, offsets = points
    out = torch.zeros(volumes.shape[0], volumes[0].numel(), dtype=torch.float32, device=volumes.device)
    out[:, offsets.to(volumes.device)] = sample_rigid(volumes, rotation, xyz).to(out.dtype)
    return out.reshape(volumes.shape)


def support_radius(volume: torch.Tensor, tolerance: float) -> float:
    """The smallest radius about voxel box//2 of a (B, B, B) volume outside which lies at most
    ``tolerance`` of its energy (sum of squares), plus 2 voxels for trilinear interpolation:
    a rotated copy is zero (to that tolerance) beyond it.  Content that fills the box (a noisy
    or offset background) gives the box's half-diagonal, all of it."""
    box = volume.shape[-1]
    z, y, x = torch.meshgrid(*[torch.arange(box, dtype=torch.float64)] * 3, indexing="ij")
    radius = (((torch.stack([x, y, z], -1) - box // 2) ** 2).sum(-1)).sqrt().reshape(-1)
    energy = volume.double().reshape(-1).cpu() ** 2
    order = torch.argsort(radius, descending=True)
    outside = torch.cumsum(energy[order], 0) <= tolerance * energy.sum()  # outermost voxels, energy within tolerance
    beyond = int(outside.sum())  # radius[order] descends: the first voxel kept is the farthest
    return (float(radius[order][beyond]) if beyond < len(order) else 0.0) + 2.0


def energy_support(rows: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Indices (sorted) of the fewest columns of ``rows`` (m, D) holding all but ``tolerance``
    of its energy (sum of squares over the rows)."""
    energy = (rows.double() ** 2).sum(0)
    order = torch.argsort(energy, descending=True)
    keep = int((torch.cumsum(energy[order], 0) < (1.0 - tolerance) * energy.sum()).sum()) + 1
    return torch.sort(order[: min(keep, len(order))]).values


def _test_volume(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Three Gaussian blobs of different widths and heights, off the centre: no symmetry to hide an error."""
    grids = np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij")
    out = np.zeros(shape)
    for height, width in ((1.0, 1.5), (0.7, 2.2), (-0.5, 1.2)):
        centre = rng.uniform(-0.2, 0.2, len(shape)) * np.array(shape)
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        out += height * np.exp(-r2 / (2 * width**2))
    return out


def check_rigid_transform(transform, shape: tuple[int, ...] = (12, 15, 16), n: int = 3, with_shift: bool = True,
                          dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """Largest deviation of ``transform`` from scipy's rigid transform about voxel N//2 (:func:`rotate_volume`,
    order 1), relative to the largest input value; every user of a rigid transform can call it.

    ``transform(volumes (n, *shape), rotation (n, d, d), shift_voxels (n, d))`` -> (n, *shape)
    (torch, ``dtype``), d = len(shape) (3 for volumes (z, y, x), 2 for images (y, x));
    rotations are random, shifts in [-2, 2] voxels (zero without ``with_shift``).  The
    default shape has odd and even, unequal edges, so that a wrong centre or an axis
    swap shows.  A correct trilinear transform gives rounding error (~1e-7 in float32).
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    ndim = len(shape)
    if ndim == 3:
        rotations = Rotation.random(n, random_state=seed).as_matrix()
    else:
        angles = rng.uniform(0, 2 * np.pi, n)
        rotations = np.stack([[np.cos(angles), -np.sin(angles)], [np.sin(angles), np.cos(angles)]]).transpose(2, 0, 1)
    shifts = rng.uniform(-2, 2, (n, ndim)) if with_shift else np.zeros((n, ndim))
    volumes = np.stack([_test_volume(tuple(shape), rng) for _ in range(n)])
    expected = np.stack([rotate_volume(v, a, -s, 1.0, order=1) for v, a, s in zip(volumes, rotations, shifts)])
    out = transform(torch.tensor(volumes, dtype=dtype), torch.tensor(rotations, dtype=dtype),
                    torch.tensor(shifts, dtype=dtype))
    out = out.detach().cpu().double().numpy()
    if out.shape != expected.shape:
        raise ValueError(f"the transform returned shape {out.shape}, expected {expected.shape}")
    return float(np.abs(out - expected).max() / np.abs(volumes).max())


def rotational_average(volume: np.ndarray) -> np.ndarray:
    """The average of a volume over every rotation about voxel N//2: its mean in each
    one-voxel shell, placed at the shell's mean radius and interpolated linearly in the radius
    back onto the grid; same shape."""
    volume = np.asarray(volume, dtype=np.float64)
    radius = np.sqrt(sum((g - s // 2) ** 2 for g, s in zip(np.indices(volume.shape), volume.shape)))
    shell = np.rint(radius).astype(np.int64).ravel()
    counts = np.bincount(shell)
    filled = counts > 0
    profile = np.bincount(shell, weights=volume.ravel())[filled] / counts[filled]
    shell_radius = np.bincount(shell, weights=radius.ravel())[filled] / counts[filled]
    return np.interp(radius, shell_radius, profile)


def windowed_correlation_peak(cc: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correlation_peak` among the displacements within ``radius`` voxels of 0 (circular
    cross-correlations (n, D, H, W), displacement 0 at index 0); the rest count as the minimum."""
    shape = cc.shape[1:]
    signed = [torch.fft.fftfreq(size, 1.0 / size, device=cc.device) for size in shape]
    dz, dy, dx = torch.meshgrid(*signed, indexing="ij")
    inside = dz**2 + dy**2 + dx**2 <= radius**2
    floor = cc.reshape(len(cc), -1).min(1).values.view(-1, 1, 1, 1)
    return correlation_peak(torch.where(inside, cc, floor))


def standardise_volumes(volumes: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, voxels) with zero mean and unit norm per row: dot products are correlations."""
    flat = volumes.reshape(len(volumes), -1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-12)


# ----------------------------------------------------------------------------- Fourier grids and weights


def rfft_frequencies(shape) -> tuple[torch.Tensor, ...]:
    """Frequencies (cycles/pixel) per axis of an rfftn grid, each broadcastable to (D, H, W//2+1), float64.

    ``shape``: the real-space shape (D, H, W) (or (H, W)), or a cubic box edge.  Returned in
    array order (kz, ky, kx); the last axis is the half (rfft) axis.
    """
    shape = (int(shape),) * 3 if np.isscalar(shape) else tuple(int(s) for s in shape)
    freqs = [torch.fft.fftfreq(s, dtype=torch.float64) for s in shape[:-1]]
    freqs.append(torch.fft.rfftfreq(shape[-1], dtype=torch.float64))
    out = []
    for axis, f in enumerate(freqs):
        view = [1] * len(shape)
        view[axis] = -1
        out.append(f.view(view))
    return tuple(out)


def frequency_magnitude(shape) -> torch.Tensor:
    """|k| in cycles/pixel on the rfftn grid of ``shape`` (or a cubic box edge), float64."""
    return torch.sqrt(sum(k**2 for k in rfft_frequencies(shape)))


def friedel_half(points_xyz: torch.Tensor, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of frequencies on an fftshifted grid (``points_xyz`` (m, 3), frequency 0 at voxel box//2)
    one of each pair ±k: their indices into the points and their weights (2; 1 for a point that
    is its own mate or whose mate is not among the points).  A sum of an even quantity
    (f(k) = f(-k)) over the points is the weighted sum over these, for half the terms."""
    k = points_xyz.long() - box // 2
    span = 2 * box + 1

    def key(q: torch.Tensor) -> torch.Tensor:
        return ((q[:, 2] + box) * span + (q[:, 1] + box)) * span + (q[:, 0] + box)

    keys, mates = key(k), key(-k)
    paired = torch.isin(mates, keys) & (keys != mates)
    keep = ~paired | (keys < mates)
    return torch.nonzero(keep).squeeze(1), torch.where(paired, 2.0, 1.0)[keep]


def rfft_weights(shape, dc_weight: float = 1.0) -> torch.Tensor:
    """Multiplicity of each rfftn coefficient in the full spectrum: (D, H, W//2+1) float64.

    Columns 1 .. (W-1)//2 of the half axis stand for themselves and their Hermitian mates
    (weight 2); column 0 and, for even W, column W/2 are their own mates (weight 1).  So
    ``sum(w * |rfftn(x)|^2) = N * sum(x^2)`` (N voxels; ``norm="ortho"``: = sum(x^2), Parseval).
    ``dc_weight`` is the weight of the DC term: 0 leaves the mean out, so that
    ``sum(w * |F|^2) / N^2`` is the variance of the volume.  ``shape`` may be a cubic box edge.
    """
    shape = (int(shape),) * 3 if np.isscalar(shape) else tuple(int(s) for s in shape)
    width = shape[-1]
    w = torch.full(tuple(shape[:-1]) + (width // 2 + 1,), 2.0, dtype=torch.float64)
    w[..., 0] = 1.0
    if width % 2 == 0:
        w[..., -1] = 1.0
    w[(0,) * len(shape)] = dc_weight
    return w


# ----------------------------------------------------------------------------- Fourier crop/pad and shift


def _zero_nyquist(spectrum: torch.Tensor, box: int) -> torch.Tensor:
    """Zero the Nyquist planes of rfftn spectra (..., box, box, box//2+1) of an even box (they have no mate)."""
    if box % 2 == 0:
        spectrum = spectrum.clone()
        spectrum[..., box // 2, :, :] = 0
        spectrum[..., :, box // 2, :] = 0
        spectrum[..., :, :, box // 2] = 0
    return spectrum


def fourier_crop(spectrum: torch.Tensor, size: int, keep_nyquist: bool = False) -> torch.Tensor:
    """rfftn spectra of cubic boxes (..., B, B, B//2+1) -> (..., size, size, size//2+1): crop (size < B) or pad.

    Frequencies common to both boxes are kept (``torch_fourier_rescale``'s crop/pad, index 0
    staying index 0, so voxel B//2 lands on voxel size//2 when B = k × size).  The Nyquist
    planes of the smaller box have no Hermitian mate there: they are zeroed, unless
    ``keep_nyquist`` (a crop then keeps the big box's -size/2 planes, as a plain slice of the
    spectrum would; the template matcher's coarse search scores slightly better with them,
    benchmarks/bench_match.py).  Scaled by (size / B)^3, so that the inverse rfftn keeps
    real-space values (the mean) unchanged.
    """
    box = spectrum.shape[-2]
    if keep_nyquist:
        resized = _rescale_spectrum(spectrum, box, size)
    elif size < box:
        resized = _zero_nyquist(_rescale_spectrum(spectrum, box, size), size)
    else:
        resized = _rescale_spectrum(_zero_nyquist(spectrum, box), box, size)
    return resized * (size / box) ** 3


def _rescale_spectrum(spectrum: torch.Tensor, box: int, size: int) -> torch.Tensor:
    """``fourier_rescale_rfft_3d`` on the unshifted layout (it expects fftshift on the two full axes)."""
    if size == box:
        return spectrum
    shifted = torch.fft.fftshift(spectrum, dim=(-3, -2))
    resized = fourier_rescale_rfft_3d(shifted, image_shape=(box,) * 3, target_shape=(size,) * 3)
    return torch.fft.ifftshift(resized, dim=(-3, -2))


def fourier_resample(volume_zyx: torch.Tensor, size: int) -> torch.Tensor:
    """A cubic (..., B, B, B) volume resampled to (..., size, size, size) by :func:`fourier_crop`; float64 maths,
    the input's dtype out."""
    spectrum = torch.fft.rfftn(volume_zyx.to(torch.float64), dim=(-3, -2, -1))
    out = torch.fft.irfftn(fourier_crop(spectrum, size), s=(size,) * 3, dim=(-3, -2, -1))
    return out.to(volume_zyx.dtype)


def phase_shift(spectrum: torch.Tensor, shift_xyz: torch.Tensor) -> torch.Tensor:
    """Move the content of rfftn spectra of cubic boxes (n, B, B, B//2+1) by ``shift_xyz`` (n, 3) voxels
    (circularly; ``torch_fourier_shift``, which takes shifts in (z, y, x) order)."""
    box = spectrum.shape[-2]
    shifts_zyx = shift_xyz.to(torch.float32 if spectrum.dtype == torch.complex64 else torch.float64).flip(-1)
    return fourier_shift_dft_3d(spectrum, (box,) * 3, shifts_zyx, rfft=True, fftshifted=False)


# ----------------------------------------------------------------------------- filters


def _raised_cosine(x: torch.Tensor) -> torch.Tensor:
    """0 for x <= 0, 1 for x >= 1, a half cosine between."""
    return 0.5 - 0.5 * torch.cos(math.pi * x.clamp(0.0, 1.0))


def raised_cosine_lowpass(shape, cutoff_cycles_per_px: float, edge_cycles_per_px: float) -> torch.Tensor:
    """Transmission on the rfftn grid of ``shape`` (any shape, or a cubic box edge), float64: 1 below
    ``cutoff - edge/2``, 0 above ``cutoff + edge/2``, a half cosine between (0.5 at the cutoff)."""
    k = frequency_magnitude(shape)
    return _raised_cosine((cutoff_cycles_per_px + edge_cycles_per_px / 2 - k) / edge_cycles_per_px)


def lowpass_filter(
    box: int, pixel_size_angstrom: float, resolution_angstrom: float, edge_px: float = 2.0
) -> torch.Tensor:
    """Low-pass of a cubic box to ``resolution_angstrom``, raised-cosine edge ``edge_px`` Fourier pixels wide
    (half transmission at k_c = pixel size / resolution); (box, box, box//2+1) float32."""
    cutoff = pixel_size_angstrom / resolution_angstrom
    return raised_cosine_lowpass(box, cutoff, edge_px / box).to(torch.float32)


def bandpass_filter(
    box: int, pixel_size_angstrom: float, low_angstrom: float, high_angstrom: float, edge_px: float = 2.0
) -> torch.Tensor:
    """Band-pass keeping resolutions between ``low_angstrom`` (coarse) and ``high_angstrom`` (fine).

    Raised-cosine edges ``edge_px`` Fourier pixels wide; the DC term is removed.  Shape
    (box, box, box//2+1), float32.
    """
    if not low_angstrom > high_angstrom > 0:
        raise ValueError(f"band-pass expects low > high > 0 Å, got [{low_angstrom}, {high_angstrom}]")
    edge = edge_px / box
    highpass = 1.0 - raised_cosine_lowpass(box, pixel_size_angstrom / low_angstrom, edge)
    highpass[0, 0, 0] = 0.0
    return (raised_cosine_lowpass(box, pixel_size_angstrom / high_angstrom, edge) * highpass).to(torch.float32)


# ----------------------------------------------------------------------------- cross-correlation


def cross_correlation(a_spectrum: torch.Tensor, b_spectrum: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Circular cross-correlation cc[t] = sum_x a(x) b(x - t) from rfftn spectra; (n, *shape) real,
    displacement t = 0 at index 0: its peak is where ``b`` must move to lie on ``a``."""
    return torch.fft.irfftn(a_spectrum * b_spectrum.conj(), s=tuple(shape), dim=(-3, -2, -1))


def nearby_cross_correlation(product: torch.Tensor, box: int, reach: int) -> torch.Tensor:
    """The circular cross-correlation of two (box³) volumes whose product spectrum ``product``
    (n, S, S, S//2+1) (a · conj(b), :func:`cross_correlation`) is known on a smaller box S <= box,
    the rest taken as zero, at the displacements within ``reach`` full-size voxels per axis only:
    (n, W, W, W) real, W = 2 reach + 1, index ``reach`` on each axis displacement 0.

    The values of ``irfftn(fourier_crop(product, box))`` at those voxels (the small box's Nyquist
    planes zeroed), by three small inverse DFTs along the axes instead of a box³ FFT: for
    S = 16, box = 32 and reach 4, about a tenth of the arithmetic."""
    size = product.shape[-2]
    real = torch.float64 if product.dtype == torch.complex128 else torch.float32
    t = torch.arange(-reach, reach + 1, dtype=real, device=product.device)

    def phases(k: torch.Tensor) -> torch.Tensor:  # (W, K): exp(2πi t k / box)
        return torch.polar(torch.ones(len(t), len(k), dtype=real, device=t.device), 2 * math.pi * t[:, None] * k / box)

    signed = torch.fft.fftfreq(size, 1.0 / size, dtype=real, device=t.device)
    half = torch.arange(size // 2 + 1, dtype=real, device=t.device)
    doubled = torch.where(half == 0, 1.0, 2.0).to(real)  # the rfft axis holds each ±kx pair once
    spectrum = _zero_nyquist(product, size) * doubled
    along_x = spectrum @ phases(half).T.to(product.dtype)  # (n, z, y, W)
    along_y = torch.einsum("nzyc,by->nzbc", along_x, phases(signed).to(product.dtype))
    along_z = torch.einsum("nzbc,az->nabc", along_y, phases(signed).to(product.dtype))
    return along_z.real / size**3


def _unravel_zyx(flat: torch.Tensor, shape) -> torch.Tensor:
    """(n,) flat indices into a (D, H, W) volume -> (n, 3) indices (z, y, x).  By integer
    arithmetic: ``torch.unravel_index`` costs ~0.25 s at its first call in a process."""
    _, height, width = shape
    return torch.stack([flat // (height * width), (flat // width) % height, flat % width], 1)


def window_peak(cc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The peak of cross-correlations at displacements -r..r per axis (n, W, W, W), W = 2 r + 1
    (:func:`nearby_cross_correlation`): displacement (n, 3) voxels (x, y, z), sub-voxel by a
    parabola through the peak and its neighbours on each axis (none at the window's edge), and
    the value at the peak voxel (n,)."""
    n, size = cc.shape[0], cc.shape[-1]
    zyx = _unravel_zyx(cc.reshape(n, -1).argmax(1), cc.shape[1:])
    rows = torch.arange(n, device=cc.device)
    peak = cc[rows, zyx[:, 0], zyx[:, 1], zyx[:, 2]]
    displacement = []
    for axis in range(3):
        lo, hi = zyx.clone(), zyx.clone()
        lo[:, axis] = (lo[:, axis] - 1).clamp(min=0)
        hi[:, axis] = (hi[:, axis] + 1).clamp(max=size - 1)
        fm, fp = cc[rows, lo[:, 0], lo[:, 1], lo[:, 2]], cc[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        curvature = fm - 2 * peak + fp
        inner = (zyx[:, axis] > 0) & (zyx[:, axis] < size - 1) & (curvature < 0)
        offset = torch.where(inner, 0.5 * (fm - fp) / curvature.clamp(max=-1e-12), 0.0)
        displacement.append(zyx[:, axis] - size // 2 + offset.clamp(-0.5, 0.5))
    return torch.stack(displacement[::-1], 1), peak


def correlation_peak(cc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The peak of circular cross-correlations (n, D, H, W) (displacement 0 at index 0).

    Returns the displacement (n, 3) in voxels (x, y, z), signed (in [-N/2, N/2) per axis),
    sub-voxel by a parabola through the peak and its two neighbours on each axis (wrapping
    round; at most half a voxel), and the correlation at the peak voxel (n,).
    """
    n, shape = cc.shape[0], cc.shape[1:]
    flat = cc.reshape(n, -1).argmax(1)
    zyx = _unravel_zyx(flat, shape)
    rows = torch.arange(n, device=cc.device)
    peak = cc[rows, zyx[:, 0], zyx[:, 1], zyx[:, 2]]
    displacement = []
    for axis, size in enumerate(shape):
        lo, hi = zyx.clone(), zyx.clone()
        lo[:, axis] = (lo[:, axis] - 1) % size
        hi[:, axis] = (hi[:, axis] + 1) % size
        fm = cc[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
        fp = cc[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        curvature = fm - 2 * peak + fp
        offset = torch.where(curvature < 0, 0.5 * (fm - fp) / curvature.clamp(max=-1e-12), 0.0)
        signed = (zyx[:, axis] + size // 2) % size - size // 2
        displacement.append(signed + offset.clamp(-0.5, 0.5))
    return torch.stack(displacement[::-1], 1), peak
