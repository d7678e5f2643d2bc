"""Generated glyph sets: rendering, seeded distortions within their ranges, the pose convention, shape affinity."""

import numpy as np
import pytest
import torch

from cryovae.glyphs import (
    SUITS, affine_image, canonical_glyphs, font_path, glyph_dataset, render_glyph,
    rotation_matrix_2d, shape_affinity,
)
from cryovae.errors import InputError
from cryovae.model.transform import embed_rotation_2d, rotation_from_angle_vector
from cryovae.rotations import relion_euler_to_matrix
from cryovae.volumes import rigid_transform, rotate_volume


def test_glyphs_come_from_matplotlibs_dejavu_sans_bright_on_zero_and_centred_on_pixel_n_over_2():
    assert font_path().name == "DejaVuSans.ttf"
    glyphs = canonical_glyphs("suits", size=48, render_size=64)
    assert glyphs.shape == (4, 48, 48) and glyphs.dtype == np.float32
    assert glyphs.min() == 0.0 and glyphs.max() == pytest.approx(1.0)
    for glyph in glyphs:
        rows, cols = np.nonzero(glyph > 0.5)
        # the ink box is centred on pixel 24 (to the supersampling step) and spans half the 64-px render
        assert abs((rows.min() + rows.max()) / 2 - 24) <= 1 and abs((cols.min() + cols.max()) / 2 - 24) <= 1
        assert max(np.ptp(rows), np.ptp(cols)) <= 33
        assert glyph[0].max() == 0 and glyph[:, 0].max() == 0  # nothing reaches the edge
    # the centre crop keeps pixel render//2 on pixel size//2: a 64-px glyph cropped is the 48-px one
    full = render_glyph("alphanumeric", "Q", render_size=64, size=64)
    assert np.array_equal(full[8:56, 8:56], render_glyph("alphanumeric", "Q", render_size=64, size=48))


def test_unknown_glyphs_and_bad_ranges_are_input_errors():
    with pytest.raises(InputError, match=r"not glyphs: \['Q'\]"):
        canonical_glyphs("suits", ["hearts", "Q"])
    with pytest.raises(InputError, match="rotation_deg"):
        glyph_dataset("suits", 2, rotation_deg=(5, -5))
    with pytest.raises(InputError, match="size <= render_size"):
        render_glyph("suits", "hearts", render_size=32, size=48)


def test_same_seed_same_bytes_other_seed_other_images():
    kwargs = dict(kind="alphanumeric", per_class=3, classes=["A", "7"], rotation_deg=(-60, 60), translation=0.1,
                  shear_deg=15, scale=(1.0, 1.3), noise_sd=0.2)
    a, b = glyph_dataset(**kwargs, seed=3), glyph_dataset(**kwargs, seed=3)
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.psi_deg, b.psi_deg)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.shift_px, b.shift_px)
    other = glyph_dataset(**kwargs, seed=4)
    assert not np.allclose(other.psi_deg, a.psi_deg) and np.abs(other.images - a.images).max() > 0.1


def test_distortions_stay_in_their_ranges_and_fill_them():
    data = glyph_dataset("suits", 100, rotation_deg=(-60, 20), translation=0.1, shear_deg=15, scale=(1.0, 1.3),
                         seed=0)
    assert np.bincount(data.labels).tolist() == [100] * 4 and data.class_names == list(SUITS)
    theta = -data.psi_deg  # psi is minus the drawn rotation
    assert theta.min() >= -60 and theta.max() <= 20 and theta.min() < -55 and theta.max() > 15
    assert np.abs(data.shift_px).max() <= 4.8 and np.abs(data.shift_px).max() > 4.5  # 0.1 of the 48-px edge
    assert np.abs(data.shear_deg).max() <= 15 and np.abs(data.shear_deg).max() > 14
    assert data.scale.min() >= 1.0 and data.scale.max() <= 1.3 and np.ptp(data.scale) > 0.27
    # a larger scale gives a larger glyph: ink area grows as scale² (shear keeps the area)
    area = (data.images > 0.5).sum(axis=(1, 2)) / (data.canonical[data.labels] > 0.5).sum(axis=(1, 2))
    small = np.abs(data.shift_px).max(axis=1) < 2  # away from the edge, nothing clipped
    ratio = area[small] / data.scale[small] ** 2
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)


def test_noise_sd_is_relative_to_each_images_signal_sd():
    kwargs = dict(kind="suits", per_class=5, rotation_deg=(-30, 30), seed=11)
    clean, noisy = glyph_dataset(**kwargs), glyph_dataset(**kwargs, noise_sd=0.5)
    assert np.array_equal(clean.psi_deg, noisy.psi_deg)  # the same draws, then noise
    ratio = (noisy.images - clean.images).std(axis=(1, 2)) / clean.images.std(axis=(1, 2))
    assert np.allclose(ratio, 0.5, atol=0.03)


def test_rotating_the_canonical_glyph_by_the_recorded_pose_gives_the_image():
    """RELION psi and origin, as written to particles.star, reproduce the image through the project's
    rigid transforms (scipy and the model's torch one), with no shear and scale 1."""
    data = glyph_dataset("alphanumeric", 4, ["F", "R", "7"], rotation_deg=(-180, 180), translation=0.1, seed=5)
    matrices = relion_euler_to_matrix(np.stack([np.zeros(12), np.zeros(12), data.psi_deg], 1))
    assert np.allclose(matrices[:, 2], [0, 0, 1]) and np.allclose(matrices[:, :, 2], [0, 0, 1])  # about z
    a_xy = matrices[:, :2, :2]
    origin_angstrom = -data.shift_px * 1.0
    for i in range(12):
        made = rotate_volume(data.canonical[data.labels[i]], a_xy[i], origin_angstrom[i], 1.0, order=1)
        assert np.abs(made - data.images[i]).max() < 1e-5
    torch_made = rigid_transform(torch.from_numpy(data.canonical[data.labels]).double(), torch.from_numpy(a_xy),
                                 torch.from_numpy(-origin_angstrom / 1.0))
    assert np.abs(torch_made.numpy() - data.images).max() < 1e-5
    # the model's in-plane rotation of angle phi is psi = -phi: its (cos, sin) pair gives the same matrix
    phi = np.deg2rad(-data.psi_deg)
    model = embed_rotation_2d(rotation_from_angle_vector(torch.tensor(np.stack([np.cos(phi), np.sin(phi)], 1))))
    assert np.allclose(model.numpy(), matrices, atol=1e-12)


def test_content_moves_as_the_pose_says_without_any_transform_code():
    """The centre of mass of a glyph at c + p lands at c + A p + d (A from psi, d the shift): checked on
    the images alone, so a sign error in both the generator and the transform could not hide."""
    data = glyph_dataset("alphanumeric", 6, ["L"], rotation_deg=(-170, 170), translation=0.08, seed=2)
    yy, xx = np.mgrid[:48, :48]

    def centre_xy(image):
        return np.array([(image * xx).sum(), (image * yy).sum()]) / image.sum()

    p = centre_xy(data.canonical[0]) - 24
    assert np.linalg.norm(p) > 2  # 'L' is lopsided: its centre of mass is off the box centre
    for i in range(6):
        a = relion_euler_to_matrix([0.0, 0.0, data.psi_deg[i]])[:2, :2]
        assert np.allclose(centre_xy(data.images[i]), 24 + a @ p + data.shift_px[i], atol=0.15)


def test_shape_affinity_is_symmetric_with_unit_diagonal_in_the_soap_range():
    matrix = shape_affinity(canonical_glyphs("suits"))
    assert matrix.shape == (4, 4) and np.array_equal(matrix, matrix.T)
    assert np.array_equal(np.diag(matrix), np.ones(4)) and matrix.min() == -1.0 and matrix.max() <= 1.0
    raw = shape_affinity(canonical_glyphs("suits"), spread=False)
    off = ~np.eye(4, dtype=bool)
    assert np.array_equal(np.argsort(raw[off]), np.argsort(matrix[off]))  # the spread keeps the order
    assert 0.5 < raw[off].min() < raw[off].max() < 0.99


def test_a_rotated_moved_glyph_keeps_its_affinity_row_and_o_is_nearer_zero_than_x():
    glyphs = canonical_glyphs("alphanumeric", ["O", "0", "X", "K"])
    raw = shape_affinity(glyphs, spread=False)
    turned = glyphs.copy()
    turned[3] = affine_image(glyphs[3], rotation_matrix_2d(143.3), (1.4, -2.3), order=3)
    turned[0] = affine_image(glyphs[0], rotation_matrix_2d(-61.7), (-0.6, 1.1), order=3)
    again = shape_affinity(turned, spread=False)
    assert np.abs(again - raw).max() < 0.02
    assert raw[0, 1] > raw[0, 2] + 0.1  # 'O' vs '0' against 'O' vs 'X'
