"""Generated 2D test sets: card suits and alphanumeric glyphs, randomly distorted, with their true poses.

The card suits (clubs ♣, spades ♠, hearts ♥, diamonds ♦) are the data set of the ss-rVAE
paper (Ziatdinov, Kalinin et al. 2024); the alphanumeric glyphs (A-Z, 0-9) that of the
affinity-VAE paper.  Both are rendered here from DejaVu Sans, the font matplotlib ships
(``mpl-data/fonts/ttf/DejaVuSans.ttf``), so a fresh machine needs no system fonts.

How the images are made follows the ss-rVAE example notebook (pyroVED, ``examples/ssrVAE.ipynb``):
there each card image is resized to 64×64 (``cv2.resize``), inverted to a bright glyph on a
zero background (``1 - card / card.max()``), centre-cropped to 48×48 and then given one random
affine distortion per sample (``kornia.augmentation.RandomAffine(angle, translate=t,
shear=[-s, s, -s, s], scale=z)``: rotation uniform in ±angle degrees, shear uniform in ±s
degrees along x and along y, one isotropic scale uniform in z, translation uniform in ±t × the
edge along each axis).  Its labelled set: ±4°, shear 15°, scale (1, 1.3), no translation, 200
per class, seed 0; unlabelled: ±60°, shear 15°, scale (1, 1.3), translation 0.1, 3000 per class,
seed 1; validation as unlabelled, 1000 per class, seed 2.  Here likewise: rendered at
``render_size`` (64), values in [0, 1], centre-cropped to ``size`` (48) about pixel N//2, then
distorted on the ``size`` grid with the same four draws (bilinear, zeros outside, as kornia).
Where this differs: the glyphs are rendered from a font rather than read from scanned
symbols; the rotation range is any [min, max] rather than ±angle; transforms are about pixel
N//2 (RELION's centre, :mod:`cryovae.volumes`), not (N - 1)/2; optional Gaussian noise.

Pose convention (that of :mod:`cryovae.volumes`): with L = R(θ) · scale · Shear on (x, y) (x
the column index, y the row index) and d the translation in pixels (x, y),

    image(q) = canonical(c + L⁻¹ (q - c - d)),        c = N//2 per axis,

so the glyph is sheared and scaled in its own frame, then rotated by R(θ) = [[cos θ, -sin θ],
[sin θ, cos θ]] and moved by d.  The recorded pose is that rotation and shift: RELION psi = -θ
(``relion_euler_to_matrix([0, 0, psi])`` is R(θ) about z) and ``rlnOriginX/YAngst = -d × pixel
size``; with no shear and scale 1, rotating the canonical glyph by the pose gives the image.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cryovae.errors import InputError

SUITS = {"clubs": "\u2663", "spades": "\u2660", "hearts": "\u2665", "diamonds": "\u2666"}
ALPHANUMERIC = {c: c for c in string.ascii_uppercase + string.digits}
KINDS = {"suits": SUITS, "alphanumeric": ALPHANUMERIC}

GLYPH_FRACTION = 0.5
"""The largest glyph of a kind spans this fraction of ``render_size`` (its longer ink side)."""
SUPERSAMPLE = 4
"""Glyphs are drawn at this many times the render size and averaged down (anti-aliasing, and
centring to 1/SUPERSAMPLE of a pixel)."""
_REFERENCE_FONT_PX = 100


@dataclass
class GlyphDataset:
    """A generated set: images (n, size, size) float32 in (y, x) order; labels (n,) int64 rows of
    ``class_names``; psi_deg (n,) RELION psi of the true in-plane pose; shift_px (n, 2) content
    displacement d in pixels (x, y); canonical (C, size, size) float32, the undistorted glyph of
    each class; shear_deg (n, 2) (along x, along y) and scale (n,), the nuisance distortions."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    psi_deg: np.ndarray
    shift_px: np.ndarray
    canonical: np.ndarray
    shear_deg: np.ndarray
    scale: np.ndarray


@functools.cache
def font_path() -> Path:
    """DejaVu Sans as matplotlib ships it (no system fonts needed)."""
    from matplotlib import font_manager

    return Path(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"),
                                      fallback_to_default=False))


def glyph_class_names(kind: str, classes: list[str] | None = None) -> list[str]:
    """The classes of a kind in the order given (None: all, in the kind's order); errors name the bad one."""
    if kind not in KINDS:
        raise InputError(f"images.kind: {kind!r} is not a generated kind; expected one of {sorted(KINDS)}")
    if classes is None:
        return list(KINDS[kind])
    unknown = [c for c in classes if c not in KINDS[kind]]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 1:
        raise InputError(f"images.classes: expected distinct glyphs of kind {kind!r} ({', '.join(KINDS[kind])}), "
                         f"got {classes}" + (f"; not glyphs: {unknown}" if unknown else ""))
    return list(classes)


def _draw(char: str, font_px: int) -> np.ndarray:
    """The ink of one character, cropped to its bounding box: (h, w) uint8 (0 background, 255 ink)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path()), font_px)
    canvas = Image.new("L", (3 * font_px, 3 * font_px), 0)
    ImageDraw.Draw(canvas).text((font_px, font_px), char, font=font, fill=255)
    ink = np.asarray(canvas)
    rows, cols = np.nonzero(ink)
    if not len(rows):
        raise RuntimeError(f"{font_path()} has no ink for {char!r}")
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


@functools.cache
def _font_px(kind: str, render_size: int) -> int:
    """Font size (supersampled pixels) at which the kind's largest glyph spans GLYPH_FRACTION of the render."""
    extent = max(max(_draw(ch, _REFERENCE_FONT_PX).shape) for ch in KINDS[kind].values())
    return max(1, round(_REFERENCE_FONT_PX * GLYPH_FRACTION * render_size * SUPERSAMPLE / extent))


def render_glyph(kind: str, name: str, render_size: int = 64, size: int = 48) -> np.ndarray:
    """One undistorted glyph, (size, size) float32 in [0, 1] (bright ink on 0).

    Drawn at ``render_size`` × SUPERSAMPLE with its ink box centred on pixel N//2 of the
    render, averaged down to ``render_size``, then centre-cropped to ``size`` (pixel
    render_size//2 becomes pixel size//2).
    """
    if not 8 <= size <= render_size:
        raise InputError(f"images: expected 8 <= size <= render_size, got size {size}, render_size {render_size}")
    char = KINDS[kind][name]
    ink = _draw(char, _font_px(kind, render_size)).astype(np.float64) / 255.0
    hi = render_size * SUPERSAMPLE
    centre = (render_size // 2 + 0.5) * SUPERSAMPLE  # continuous coordinate of the centre of pixel N//2
    canvas = np.zeros((hi, hi))
    top, left = (int(round(centre - extent / 2)) for extent in ink.shape)
    if top < 0 or left < 0 or top + ink.shape[0] > hi or left + ink.shape[1] > hi:
        raise RuntimeError(f"glyph {name!r} does not fit a {render_size}-pixel render")
    canvas[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    render = canvas.reshape(render_size, SUPERSAMPLE, render_size, SUPERSAMPLE).mean(axis=(1, 3))
    start = render_size // 2 - size // 2
    return render[start:start + size, start:start + size].astype(np.float32)


def canonical_glyphs(kind: str, classes: list[str] | None = None, size: int = 48,
                     render_size: int = 64) -> np.ndarray:
    """The undistorted glyphs of ``classes`` (None: all of the kind): (C, size, size) float32."""
    return np.stack([render_glyph(kind, name, render_size, size) for name in glyph_class_names(kind, classes)])


# ----------------------------------------------------------------------------- distortions


def shear_matrix(shear_deg_xy: np.ndarray) -> np.ndarray:
    """(n, 2) shear angles (along x, along y) in degrees -> (n, 2, 2) on (x, y): a shear along x
    (x += tan(sx) y) followed by one along y (y += tan(sy) x); determinant 1."""
    tx, ty = np.tan(np.deg2rad(np.asarray(shear_deg_xy, np.float64))).T
    one, zero = np.ones_like(tx), np.zeros_like(tx)
    along_x = np.stack([np.stack([one, tx], -1), np.stack([zero, one], -1)], -2)
    along_y = np.stack([np.stack([one, zero], -1), np.stack([ty, one], -1)], -2)
    return along_y @ along_x


def rotation_matrix_2d(theta_deg: np.ndarray) -> np.ndarray:
    """(n,) angles in degrees -> (n, 2, 2) R(θ) = [[cos, -sin], [sin, cos]] on (x, y)."""
    t = np.deg2rad(np.asarray(theta_deg, np.float64))
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def affine_image(image_yx: np.ndarray, matrix_xy: np.ndarray, shift_xy_px=(0.0, 0.0), order: int = 1) -> np.ndarray:
    """image(q) = source(c + L⁻¹ (q - c - d)) for an invertible (2, 2) L on (x, y), d in pixels (x, y),
    c = N//2 per axis; zeros outside; spline ``order`` (1: bilinear).  For a rotation L this is
    :func:`cryovae.volumes.rotate_volume` with origin -d (the tests check the two agree)."""
    inverse_yx = np.linalg.inv(np.asarray(matrix_xy, np.float64))[::-1, ::-1]
    c = np.array([s // 2 for s in image_yx.shape], dtype=np.float64)
    d_yx = np.asarray(shift_xy_px, np.float64)[::-1]
    offset = c - inverse_yx @ (c + d_yx)
    return ndimage.affine_transform(np.asarray(image_yx, np.float64), inverse_yx, offset=offset, order=order,
                                    mode="grid-constant", cval=0.0)


def _check_range(name: str, low_high, lower: float | None = None) -> tuple[float, float]:
    low, high = (float(v) for v in low_high)
    if not low <= high or (lower is not None and low < lower):
        bound = f" and min >= {lower}" if lower is not None else ""
        raise InputError(f"{name}: expected [min, max] with min <= max{bound}, got {list(low_high)}")
    return low, high


def glyph_dataset(kind: str, per_class: int, classes: list[str] | None = None, size: int = 48,
                  render_size: int = 64, rotation_deg=(-5.0, 5.0), translation: float = 0.0,
                  shear_deg: float = 0.0, scale=(1.0, 1.0), noise_sd: float = 0.0,
                  seed: int | np.random.SeedSequence = 0) -> GlyphDataset:
    """``per_class`` randomly distorted images of every class, in a seeded random order.

    Per image: θ uniform in ``rotation_deg`` (degrees), shear along x and along y each uniform
    in ±``shear_deg`` degrees, one isotropic scale uniform in ``scale``, a shift uniform in
    ±``translation`` × ``size`` pixels per axis (see the module docstring for the transform),
    bilinear; then, with ``noise_sd`` > 0, Gaussian noise of standard deviation ``noise_sd``
    times the standard deviation of that noiseless image.  ``numpy.random.default_rng(seed)``
    draws everything: the same arguments give the same bytes.
    """
    names = glyph_class_names(kind, classes)
    rot_low, rot_high = _check_range("rotation_deg", rotation_deg)
    scale_low, scale_high = _check_range("scale", scale, lower=1e-3)
    if per_class < 1 or translation < 0 or shear_deg < 0 or noise_sd < 0:
        raise InputError(f"glyph_dataset: expected per_class >= 1 and translation, shear_deg, noise_sd >= 0, got "
                         f"{per_class}, {translation}, {shear_deg}, {noise_sd}")
    canonical = canonical_glyphs(kind, names, size, render_size)
    rng = np.random.default_rng(seed)
    n = per_class * len(names)
    labels = rng.permutation(np.repeat(np.arange(len(names), dtype=np.int64), per_class))
    theta_deg = rng.uniform(rot_low, rot_high, n)
    shears = rng.uniform(-shear_deg, shear_deg, (n, 2))
    scales = rng.uniform(scale_low, scale_high, n)
    shift_px = rng.uniform(-translation * size, translation * size, (n, 2))
    noise = rng.standard_normal((n, size, size)) if noise_sd > 0 else None
    linear = rotation_matrix_2d(theta_deg) @ (scales[:, None, None] * shear_matrix(shears))
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        image = affine_image(canonical[labels[i]], linear[i], shift_px[i])
        if noise is not None:
            image = image + noise_sd * image.std() * noise[i]
        images[i] = image
    return GlyphDataset(images, labels, names, -theta_deg, shift_px, canonical, shears, scales)


# ----------------------------------------------------------------------------- shape affinity

AFFINITY_STEP_DEG = 2.0
AFFINITY_BLUR_PX = 1.0
AFFINITY_CHUNK = 8  # glyphs correlated with one rotated glyph at a time (memory: CHUNK x angles x canvas)


def shape_affinity(canonical: np.ndarray, step_deg: float = AFFINITY_STEP_DEG, blur_px: float = AFFINITY_BLUR_PX,
                   spread: bool = True) -> np.ndarray:
    """Rotation- and translation-invariant shape similarity of glyphs: (C, H, W) -> (C, C) float64.

    Each glyph is blurred (Gaussian, ``blur_px``: the measure compares shapes, not pixel
    edges) and zero-padded to a square of edge ceil(√2 · max(H, W)) + 4, so that no rotation
    clips it.  r_ij is the largest Pearson correlation over that canvas between glyph i and
    glyph j rotated by θ (every ``step_deg`` degrees, bicubic) and moved by any shift: the
    circular cross-correlation (FFT) of the zero-mean, unit-norm images at every whole-pixel
    shift, refined to sub-pixel shift and sub-step θ by parabolas through the peak and its
    neighbours.  The rotation centre does not matter, as every shift is tried.  r is computed
    for i < j (glyph j rotated) and r_ji = r_ij (the other way round differs by interpolation
    alone); unit diagonal.  36 glyphs take about half a minute on two cores.

    With ``spread`` (the default) r is mapped linearly onto [-1, 1]: 1 - 2 (1 - r) / (1 - r_min),
    r_min the least similar pair, so identical shapes stay 1 and the least similar pair is -1.
    This is the range and the set-relative reading of :func:`cryovae.affinity.affinity_matrix`
    (SOAP descriptors standardised across the set; two classes are -1 there too): raw r of filled
    glyphs on a padded canvas all lie near 1 (0.8-0.95 for the suits), which would tell the
    affinity loss that every class is nearly the same.  ``spread=False`` returns r itself.
    Order is kept either way: a rotated glyph's row is unchanged, 'O' is nearer '0' than 'X'.
    """
    import torch
    import torch.nn.functional as F

    glyphs = np.asarray(canonical, dtype=np.float64)
    if glyphs.ndim != 3 or len(glyphs) < 1:
        raise InputError(f"shape_affinity: expected (C, H, W) glyphs, got shape {glyphs.shape}")
    edge = int(np.ceil(np.sqrt(2.0) * max(glyphs.shape[1:]))) + 4
    edge += edge % 2
    canvas = np.zeros((len(glyphs), edge, edge))
    top, left = edge // 2 - glyphs.shape[1] // 2, edge // 2 - glyphs.shape[2] // 2
    canvas[:, top:top + glyphs.shape[1], left:left + glyphs.shape[2]] = glyphs
    if blur_px > 0:
        canvas = ndimage.gaussian_filter(canvas, (0, blur_px, blur_px), mode="constant")
    angles = torch.deg2rad(torch.arange(0.0, 360.0, step_deg, dtype=torch.float32))
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)  # (A, 2, 3)
    grid = F.affine_grid(theta, (len(angles), 1, edge, edge), align_corners=False)
    images = torch.from_numpy(canvas.astype(np.float32))
    reference = torch.fft.rfft2(_standardised(images))  # (C, E, E//2+1)
    raw = np.eye(len(glyphs))
    for j in range(1, len(glyphs)):
        rotated = F.grid_sample(images[j].expand(len(angles), 1, edge, edge), grid, mode="bicubic",
                                padding_mode="zeros", align_corners=False)[:, 0]
        spectra = torch.fft.rfft2(_standardised(rotated)).conj()  # (A, E, E//2+1)
        for start in range(0, j, AFFINITY_CHUNK):
            rows = range(start, min(j, start + AFFINITY_CHUNK))
            cc = torch.fft.irfft2(reference[rows.start:rows.stop, None] * spectra[None], s=(edge, edge))
            for i, pair in zip(rows, cc):  # pair: (A, E, E)
                raw[i, j] = raw[j, i] = _refined_best(pair)
    raw = np.clip(raw, -1.0, 1.0)
    if not spread or len(raw) < 2:
        return raw
    floor = raw[~np.eye(len(raw), dtype=bool)].min()
    if floor >= 1.0 - 1e-9:
        return np.ones_like(raw)
    matrix = np.clip(1.0 - 2.0 * (1.0 - raw) / (1.0 - floor), -1.0, 1.0)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def _standardised(images):
    """(n, H, W) tensor -> zero mean, unit norm per image (dot products are Pearson correlations)."""
    flat = images.reshape(len(images), -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    norms = flat.norm(dim=1, keepdim=True)
    if bool((norms <= 1e-12).any()):
        raise InputError(f"shape_affinity: glyph {int((norms[:, 0] <= 1e-12).nonzero()[0, 0])} is a constant image")
    return (flat / norms).reshape(images.shape)


def _refined_best(cc) -> float:
    """The largest value of circular cross-correlations at every angle, cc (A, E, E) (tensor, angles
    periodic), raised by parabolas: along each shift axis through the peak pixel and its (wrapped)
    neighbours, at the best angle and its two neighbours, then along the angle through those three."""
    n_angles, rows, cols = cc.shape
    best = int(cc.reshape(n_angles, -1).amax(dim=1).argmax())
    heights = []
    for k in (best - 1, best, best + 1):
        image = cc[k % n_angles].double().numpy()
        r, c = np.unravel_index(int(image.argmax()), image.shape)
        peak = image[r, c]
        up = _parabola_peak(image[(r - 1) % rows, c], peak, image[(r + 1) % rows, c]) - peak
        across = _parabola_peak(image[r, (c - 1) % cols], peak, image[r, (c + 1) % cols]) - peak
        heights.append(peak + up + across)
    return float(_parabola_peak(*heights))


def _parabola_peak(minus, peak, plus):
    """Height of the parabola through three equally spaced values whose middle one is the largest."""
    curvature = minus - 2.0 * peak + plus
    return peak - (plus - minus) ** 2 / (8.0 * curvature) if curvature < 0 else peak
