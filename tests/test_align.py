"""The rotational search finds a known frame change between two volumes."""

import numpy as np
import pytest
import torch

from cryovae.align import _rotated, search_rotation
from cryovae.rotations import geodesic_distance_deg, random_rotations
from cryovae.volumes import check_rigid_transform, rotate_volume


def _asymmetric_volume(n=32):
    z, y, x = np.mgrid[:n, :n, :n]
    blobs = [(16, 16, 16, 4, 1), (22, 16, 16, 2.5, 0.8), (16, 23, 16, 2, 0.6), (13, 13, 21, 2, 0.7), (19, 11, 12, 1.5, 0.5)]
    return sum(w * np.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / (2 * s * s)) for a, b, c, s, w in blobs)


@pytest.mark.parametrize("seed", [0, 1])
def test_search_recovers_rotation_and_offset(seed):
    reference = _asymmetric_volume().astype(np.float32)
    r_true = random_rotations(1, np.random.default_rng(seed))[0]
    shift_voxels = np.array([-1.0, 2.0, 0.0])
    # canonical(x) = reference(R (x - d)): the reference rotated by R^T and shifted by d
    canonical = rotate_volume(reference, r_true.T, -shift_voxels * 10.0, pixel_size_angstrom=10.0)
    rotation, offset, score = search_rotation(canonical, reference, 15.0, 3)
    assert geodesic_distance_deg(rotation, r_true) < 6.0
    assert np.abs(offset - (-r_true @ shift_voxels)).max() <= 1.0
    assert score > 0.98


def test_search_rotates_volumes_about_n_over_2():
    """The search's (and orient_symmetry's) rotated copies agree with scipy's rigid transform about N//2."""
    def rotated(volumes, rotations, _shifts):
        return torch.cat([_rotated(v, r[None].numpy()) for v, r in zip(volumes, rotations)])

    assert check_rigid_transform(rotated, with_shift=False, dtype=torch.float32) < 2e-6


def test_in_plane_search_finds_the_rotation_and_shift_of_an_image():
    from cryovae.align import search_rotation_2d
    from cryovae.glyphs import render_glyph
    from cryovae.volumes import rotate_volume

    glyph = render_glyph("alphanumeric", "F", 64, 48).astype(np.float64)
    theta = np.radians(37.0)
    turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # the reference is the canonical image turned by 37 deg and moved by (+2, -3) pixels
    reference = rotate_volume(glyph, turn, -np.array([2.0, -3.0]))
    rotation, offset, score = search_rotation_2d(glyph, reference)
    assert np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0])) == pytest.approx(37.0, abs=0.3)
    np.testing.assert_allclose(offset, [2.0, -3.0, 0.0], atol=0.51)
    assert score > 0.95
