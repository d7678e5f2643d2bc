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
