"""The rotation module: RELION Euler convention, 6D, distances, symmetry, grids, RELION as the judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eulerangles import ConversionMeta, convert_eulers, euler2matrix
from eulerangles.utils import get_conversion_metadata
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.transform import Rotation

from cryovae.errors import InputError
from cryovae.rotations import (
    axis_angle_matrix,
    geodesic_distance_deg,
    geodesic_distance_torch,
    local_deltas,
    local_grid,
    matrix_from_6d,
    matrix_from_6d_torch,
    matrix_to_6d,
    matrix_to_relion_euler,
    random_rotations,
    refine_rotations,
    relion_euler_to_matrix,
    so3_grid,
    symmetric_geodesic_distance_deg,
    symmetry_group,
)
from cryovae.volumes import rigid_transform, rotate_volume

SETTINGS = settings(max_examples=60, deadline=None)

angle = st.floats(-180.0, 180.0, allow_nan=False)
tilt_away_from_poles = st.floats(0.5, 179.5, allow_nan=False)
euler_triplets = st.tuples(angle, st.floats(0.0, 180.0, allow_nan=False), angle).map(np.array)
quaternions = arrays(np.float64, 4, elements=st.floats(-1, 1, allow_nan=False)).filter(
    lambda q: np.linalg.norm(q) > 0.1
)


def as_matrix(q: np.ndarray) -> np.ndarray:
    return Rotation.from_quat(q).as_matrix()


# ----------------------------------------------------------------------------- Euler convention


def test_euler_known_answer():
    # rot = 90 alone: Rotation.from_euler gives Rz(90), A is its inverse, so x -> -y.
    a = relion_euler_to_matrix([90.0, 0.0, 0.0])
    np.testing.assert_allclose(a @ [1, 0, 0], [0, -1, 0], atol=1e-12)
    # tilt = 90 alone: A = Ry(-90) maps z -> -x.
    a = relion_euler_to_matrix([0.0, 90.0, 0.0])
    np.testing.assert_allclose(a @ [0, 0, 1], [-1, 0, 0], atol=1e-12)


@SETTINGS
@given(euler_triplets)
def test_euler_matrix_round_trip(angles):
    a = relion_euler_to_matrix(angles)
    back = relion_euler_to_matrix(matrix_to_relion_euler(a))
    np.testing.assert_allclose(back, a, atol=1e-6)  # gimbal lock (tilt ~ 0, 180) costs up to ~1e-7


@SETTINGS
@given(st.tuples(angle, tilt_away_from_poles, angle).map(np.array))
def test_euler_angles_round_trip_away_from_gimbal_lock(angles):
    back = matrix_to_relion_euler(relion_euler_to_matrix(angles))
    diff = (back - angles + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(diff, 0.0, atol=1e-6)
    assert 0.0 <= back[1] <= 180.0


@SETTINGS
@given(st.lists(euler_triplets, min_size=1, max_size=5).map(np.stack))
def test_euler_against_eulerangles_relion_preset(angles):
    meta = get_conversion_metadata("relion")
    theirs = euler2matrix(angles, axes=meta.axes, intrinsic=meta.intrinsic,
                          right_handed_rotation=meta.right_handed_rotation)
    ours = relion_euler_to_matrix(angles)
    theirs = np.reshape(theirs, (-1, 3, 3))  # eulerangles squeezes a single set
    np.testing.assert_allclose(ours, np.transpose(theirs, (0, 2, 1)), atol=1e-9)
    explicit = np.reshape(euler2matrix(angles, axes="zyz", intrinsic=True, right_handed_rotation=True), (-1, 3, 3))
    np.testing.assert_allclose(ours, np.transpose(explicit, (0, 2, 1)), atol=1e-9)


@SETTINGS
@given(euler_triplets)
def test_euler_against_eulerangles_active_conversion(angles):
    # eulerangles' matrix -> zyz angles takes |r13| < 1e-4 for gimbal lock, which also fires
    # for a small tilt or for psi near +-90 and then returns wrong angles: keep clear of it.
    a = relion_euler_to_matrix(angles)
    assume(abs(a[0, 2]) > 1e-3 and abs(a[2, 0]) > 1e-3)
    # eulerangles inverts the matrix when converting a passive (RELION) set of angles to an
    # active convention with the same axes: those angles' matrix must then be A itself.
    active = ConversionMeta(name="active_zyz", axes="zyz", intrinsic=True, right_handed_rotation=True, active=True)
    converted = convert_eulers(angles, source_meta="relion", target_meta=active)
    theirs = euler2matrix(converted, axes="zyz", intrinsic=True, right_handed_rotation=True)
    np.testing.assert_allclose(theirs, a, atol=1e-9)


# ----------------------------------------------------------------------------- 6D


@SETTINGS
@given(quaternions)
def test_6d_round_trip_numpy(q):
    r = as_matrix(q)
    np.testing.assert_allclose(matrix_from_6d(matrix_to_6d(r)), r, atol=1e-12)


@SETTINGS
@given(arrays(np.float64, (4, 6), elements=st.floats(-5, 5, allow_nan=False)))
def test_6d_torch_matches_numpy_and_is_a_rotation(x):
    a1, a2 = x[:, :3], x[:, 3:]
    cos = np.abs(np.sum(a1 * a2, 1)) / (np.linalg.norm(a1, axis=1) * np.linalg.norm(a2, axis=1) + 1e-300)
    if np.any(np.linalg.norm(a1, axis=1) < 0.1) or np.any(np.linalg.norm(a2, axis=1) < 0.1) or np.any(cos > 0.99):
        return  # degenerate inputs: Gram–Schmidt is ill-conditioned there
    ours = matrix_from_6d_torch(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours, matrix_from_6d(x), atol=1e-7)
    np.testing.assert_allclose(ours @ np.transpose(ours, (0, 2, 1)), np.broadcast_to(np.eye(3), (4, 3, 3)), atol=1e-7)
    np.testing.assert_allclose(np.linalg.det(ours), 1.0, atol=1e-7)


def test_6d_torch_is_differentiable():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matrix_from_6d_torch, (x,))
    degenerate = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    matrix_from_6d_torch(degenerate).sum().backward()
    assert torch.isfinite(degenerate.grad).all()


# ----------------------------------------------------------------------------- distances


def test_geodesic_known_answers():
    for deg in (0.0, 1e-4, 30.0, 90.0, 179.0, 180.0):
        r = axis_angle_matrix([1, 2, 3], np.radians(deg))
        assert geodesic_distance_deg(np.eye(3), r) == pytest.approx(deg, abs=1e-9)
        got = geodesic_distance_torch(torch.eye(3, dtype=torch.float64), torch.tensor(r)).item()
        assert np.degrees(got) == pytest.approx(deg, abs=1e-4)


@SETTINGS
@given(quaternions, quaternions)
def test_geodesic_torch_matches_numpy(qa, qb):
    a, b = as_matrix(qa), as_matrix(qb)
    ours = np.degrees(geodesic_distance_torch(torch.tensor(a), torch.tensor(b)).item())
    assert ours == pytest.approx(geodesic_distance_deg(a, b), abs=1e-4)


@pytest.mark.parametrize("deg", [0.0, 180.0])
def test_geodesic_torch_gradient_finite_at_0_and_180(deg):
    a = torch.tensor(random_rotations(1, np.random.default_rng(3))[0], requires_grad=True)
    b = (a.detach() @ torch.tensor(axis_angle_matrix([0, 0, 1], np.radians(deg)))).requires_grad_(True)
    d = geodesic_distance_torch(a, b)
    d.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert np.degrees(d.item()) == pytest.approx(deg, abs=1e-3)


# ----------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize(
    "name,size",
    [("C1", 1), ("C2", 2), ("c7", 7), ("C31", 31), ("D1", 2), ("D2", 4), ("D6", 12), ("T", 12), ("O", 24),
     ("I", 60)],
)
def test_symmetry_group_size_and_closure(name, size):
    g = symmetry_group(name)
    assert g.shape == (size, 3, 3)
    np.testing.assert_allclose(g[0], np.eye(3))
    np.testing.assert_allclose(g @ np.transpose(g, (0, 2, 1)), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    products = (g[:, None] @ g[None]).reshape(-1, 3, 3)
    nearest = np.abs(products[:, None] - g[None]).max(axis=(2, 3)).min(axis=1)
    assert nearest.max() < 1e-9  # every product is an element
    distinct = np.abs(g[:, None] - g[None]).max(axis=(2, 3)) + np.eye(size) * 10
    assert distinct.min() > 1e-3


def _has_element(group, axis, angle_rad):
    r = axis_angle_matrix(axis, angle_rad)
    return np.abs(group - r).max(axis=(1, 2)).min() < 1e-6


def test_symmetry_groups_follow_relion_axes():
    # Generators as written in RELION's src/symmetries.cpp.
    assert _has_element(symmetry_group("C4"), [0, 0, 1], np.pi / 2)
    assert _has_element(symmetry_group("D3"), [1, 0, 0], np.pi)
    t = symmetry_group("T")
    assert _has_element(t, [0, 0, 1], 2 * np.pi / 3)
    assert _has_element(t, [0.0, 0.816496, 0.577350], np.pi)
    o = symmetry_group("O")
    assert _has_element(o, [0.5773502, 0.5773502, 0.5773502], 2 * np.pi / 3)
    for axis in np.eye(3):
        assert _has_element(o, axis, np.pi / 2)
    i = symmetry_group("I")
    for axis in np.eye(3):
        assert _has_element(i, axis, np.pi)
    assert _has_element(i, [0.525731114, 0.0, 0.850650807], 2 * np.pi / 5)
    assert _has_element(i, [0.0, 0.356822076, 0.934172364], 2 * np.pi / 3)
    np.testing.assert_allclose(symmetry_group("I2"), i)


@pytest.mark.parametrize("name", ["C0", "X3", "D", "Oh", "", "Cx"])
def test_symmetry_group_unknown_name(name):
    with pytest.raises(InputError, match="unknown symmetry group"):
        symmetry_group(name)


@SETTINGS
@given(quaternions, st.sampled_from(["C3", "D5", "T", "O", "I"]), st.integers(0, 59))
def test_symmetric_distance_zero_for_symmetry_mates(q, name, k):
    group = symmetry_group(name)
    r = as_matrix(q)
    g = group[k % len(group)]
    assert symmetric_geodesic_distance_deg(r, r @ g, group) == pytest.approx(0.0, abs=1e-6)


def _c4_symmetric_volume(n=24):
    """Gaussian blobs placed C4-symmetrically about z through voxel n//2 (the grid maps onto itself)."""
    c = n // 2
    zz, yy, xx = np.mgrid[:n, :n, :n].astype(float)
    vol = np.zeros((n, n, n))
    for g in symmetry_group("C4"):
        for p, s in (([4.0, 1.0, 2.0], 1.5), ([-1.0, 3.0, -4.0], 1.2), ([2.0, -2.0, 5.0], 1.0)):
            x, y, z = g @ np.array(p)
            vol += np.exp(-((xx - c - x) ** 2 + (yy - c - y) ** 2 + (zz - c - z) ** 2) / (2 * s * s))
    return vol


def test_symmetry_multiplies_on_the_right_for_volumes():
    ref = _c4_symmetric_volume()
    g = symmetry_group("C4")[1]
    np.testing.assert_allclose(rotate_volume(ref, g), ref, atol=1e-5)  # symmetric (blob tails cut at the edge)
    a = relion_euler_to_matrix([40.0, 70.0, -25.0])
    particle = rotate_volume(ref, a)
    np.testing.assert_allclose(rotate_volume(ref, a @ g), particle, atol=1e-6)  # R and R g: same particle
    assert np.abs(rotate_volume(ref, g @ a) - particle).max() > 0.1  # g R is a different particle


# ----------------------------------------------------------------------------- grids


def test_so3_grid_size_and_coverage():
    grid = so3_grid(15.0)
    assert len(grid) == int(np.ceil(8 * np.pi**2 / np.radians(15.0) ** 3)) == 4401
    np.testing.assert_allclose(np.linalg.det(grid), 1.0, atol=1e-12)
    probes = random_rotations(500, np.random.default_rng(2))
    # nearest grid point for each probe: the largest trace of probe^T grid
    traces = np.einsum("pji,gjk->pgik", probes, grid).trace(axis1=2, axis2=3)
    nearest_deg = np.degrees(np.arccos(np.clip((traces.max(1) - 1) / 2, -1, 1)))
    assert nearest_deg.max() < 15.0
    assert 4.0 < np.median(nearest_deg) < 10.0
    # neighbours are not much closer than the step either (roughly uniform)
    sub = grid[::10]
    tr = np.einsum("pji,gjk->pgik", sub, grid).trace(axis1=2, axis2=3)
    tr[np.arange(len(sub)), np.arange(len(sub)) * 10] = -1
    nn = np.degrees(np.arccos(np.clip((tr.max(1) - 1) / 2, -1, 1)))
    assert np.median(nn) > 6.0


def test_local_grid():
    centre = relion_euler_to_matrix([10.0, 50.0, 80.0])
    grid = local_grid(centre, 2.0, 2)
    assert grid.shape == (125, 3, 3)
    np.testing.assert_allclose(grid[62], centre, atol=1e-12)
    d = geodesic_distance_deg(centre, grid)
    assert d.max() == pytest.approx(2.0 * 2 * np.sqrt(3), rel=1e-9)
    assert np.sort(d)[1] == pytest.approx(2.0, rel=1e-9)


def test_refine_rotations_converges_to_the_best_rotation_from_nearby_starts():
    rng = np.random.default_rng(8)
    targets = random_rotations(6, rng)
    axes = rng.normal(size=(6, 3))
    kick = Rotation.from_rotvec(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.radians(12.0)).as_matrix()
    starts = targets @ kick
    deltas = local_deltas((8.0, 4.0, 2.0, 1.0), 1)
    levels = []

    def score(rotations, level):  # candidates are rotations[i] @ deltas[level][j]
        levels.append(level)
        return -geodesic_distance_deg(rotations[:, None] @ deltas[level][None], targets[:, None])

    out = refine_rotations(score, starts, deltas)
    assert levels == [0, 1, 2, 3]
    np.testing.assert_allclose(geodesic_distance_deg(starts, targets), 12.0)
    assert geodesic_distance_deg(out, targets).max() < 1.0  # within the last step
    np.testing.assert_allclose(out @ out.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (6, 3, 3)), atol=1e-12)


def _blob_volume(shape, centre_xyz, sigma=1.5):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    x, y, z = centre_xyz
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * sigma**2))


# ----------------------------------------------------------------------------- RELION as the judge


def _relion_reconstruct(folder, volumes, mats, origins_angstrom, pixel):
    """relion_reconstruct --3d_rot of subtomograms written with the given poses; (N, N, N) map."""
    import subprocess

    import mrcfile
    import pandas as pd

    from cryovae.star import write_star_blocks

    names = []
    for i, vol in enumerate(volumes):
        names.append(f"p{i:04d}.mrc")
        mrcfile.write(folder / names[-1], vol.astype(np.float32), voxel_size=pixel, overwrite=True)
    angles = matrix_to_relion_euler(mats)
    optics = pd.DataFrame([{
        "rlnOpticsGroup": 1, "rlnOpticsGroupName": "g", "rlnImageDimensionality": 3, "rlnImagePixelSize": pixel,
        "rlnImageSize": volumes.shape[-1], "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
    }])
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
        "rlnAnglePsi": angles[:, 2], "rlnOriginXAngst": origins_angstrom[:, 0],
        "rlnOriginYAngst": origins_angstrom[:, 1], "rlnOriginZAngst": origins_angstrom[:, 2], "rlnOpticsGroup": 1,
    })
    write_star_blocks({"optics": optics, "particles": particles}, folder / "particles.star")
    run = subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "rec.mrc", "--3d_rot"],
                         cwd=folder, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return mrcfile.read(folder / "rec.mrc").astype(np.float64)


def _anisotropic_correlation(a, b):
    """Correlation inside a sphere after removing each map's spherical average (needs the right pose)."""
    n = a.shape[0]
    zz, yy, xx = np.mgrid[:n, :n, :n] - n // 2
    radius = np.sqrt(zz**2 + yy**2 + xx**2)
    shell, mask = radius.round().astype(int), radius <= 0.45 * n

    def anisotropic(v):
        profile = np.bincount(shell.ravel(), v.ravel()) / np.maximum(np.bincount(shell.ravel()), 1)
        return (v - profile[shell])[mask]

    return np.corrcoef(anisotropic(a), anisotropic(b))[0, 1]


@pytest.mark.slow
def test_relion_reconstruct_recovers_reference_from_rotated_volumes(tmp_path):
    import shutil

    if shutil.which("relion_reconstruct") is None:
        pytest.skip("relion_reconstruct (Debian package relion) is not installed")
    n, size, pixel = 100, 24, 10.0
    c = size // 2
    ref = sum(
        _blob_volume((size,) * 3, (c + p[0], c + p[1], c + p[2]), s) * h
        for p, s, h in (((4, 0, 0), 1.5, 1.0), ((0, 3, 0), 1.2, 0.8), ((-2, -2, 4), 1.0, 0.6), ((1, -4, -2), 1.3, 0.7))
    )
    rng = np.random.default_rng(0)
    mats = random_rotations(n, rng)
    origins = rng.uniform(-2, 2, (n, 3)) * pixel
    vols = rigid_transform(torch.tensor(np.repeat(ref[None], n, 0)), torch.tensor(mats),
                           torch.tensor(-origins / pixel)).numpy()
    (tmp_path / "right").mkdir()
    rec = _relion_reconstruct(tmp_path / "right", vols, mats, origins, pixel)
    assert _anisotropic_correlation(rec, ref) > 0.99
    # the scipy route gives the same particles
    np.testing.assert_allclose(rotate_volume(ref, mats[0], origins[0], pixel), vols[0], atol=1e-9)
    # negative control: origins written with the wrong sign
    (tmp_path / "wrong").mkdir()
    assert _anisotropic_correlation(_relion_reconstruct(tmp_path / "wrong", vols, mats, -origins, pixel), ref) < 0.8
