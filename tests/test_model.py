"""The affinity-VAE: shapes and gradients (2D/3D, both decoders), the pose convention of the
rigid transform, and the save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cryovae.model import AffinityVAE, load_model, save_model
from cryovae.model.synthetic import render_blobs
from cryovae.model.transform import normalised_affine, rigid_transform
from cryovae.rotations import random_rotations, rotate_volume


@pytest.mark.parametrize("decoder", ["cnn", "splat"])
@pytest.mark.parametrize("spatial", [(16, 16, 16), (12, 12, 12), (20, 20)])
def test_shapes_and_gradients(decoder, spatial):
    torch.manual_seed(0)
    model = AffinityVAE(spatial, [4, 8, 8], latent_dims=3, decoder=decoder, n_splats=7, hidden=16,
                        pixel_size_angstrom=5.0)
    x = torch.randn((5, 1) + spatial)
    out = model(x, generator=torch.Generator().manual_seed(0))
    d = len(spatial)
    assert out["reconstruction"].shape == x.shape
    assert out["latent_mean"].shape == out["latent_logvar"].shape == out["z"].shape == (5, 3)
    assert out["rotation"].shape == (5, d, d) and out["shift_voxels"].shape == (5, d)
    eye = torch.eye(d).expand(5, d, d)
    torch.testing.assert_close(out["rotation"] @ out["rotation"].transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert torch.allclose(torch.linalg.det(out["rotation"]), torch.ones(5), atol=1e-5)
    loss = (out["reconstruction"] - x).pow(2).mean() + out["latent_logvar"].pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the pose receives gradient through the reconstruction alone
    model.zero_grad()
    out = model(x, sample=False)
    out["reconstruction"].pow(2).mean().backward()
    assert model.encoder.head.weight.grad[2 * 3:].abs().sum() > 0
    enc = model.encode(x)
    assert enc["rotation"].shape == (5, 3, 3) and enc["origin_angstrom"].shape == (5, 3)
    torch.testing.assert_close(enc["origin_angstrom"][:, :d], -5.0 * out["shift_voxels"].detach())
    assert model.decode_canonical(enc["latent_mean"]).shape == x.shape


def _blob(box: int, centre_xyz: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    return render_blobs(np.asarray(centre_xyz, float)[None], box, sigma).astype(np.float32)


@pytest.mark.parametrize("box", [16, 15])
def test_rigid_transform_matches_scipy_on_an_off_centre_blob(box):
    """Blob at reference position p (rel. to voxel N//2) lands at A p + d; agrees with scipy."""
    rng = np.random.default_rng(box)
    rot = random_rotations(3, rng)
    shift = rng.uniform(-1.5, 1.5, (3, 3))
    p = np.array([3.0, -2.0, 1.5])
    ref = _blob(box, p)
    out = rigid_transform(
        torch.tensor(ref)[None, None].expand(3, 1, -1, -1, -1),
        torch.tensor(rot, dtype=torch.float32), torch.tensor(shift, dtype=torch.float32),
    )[:, 0].numpy()
    axes = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(axes, axes, axes, indexing="ij")
    for i in range(3):
        expected = rotate_volume(ref, rot[i], origin_xyz_angstrom=-shift[i] * 4.0, pixel_size_angstrom=4.0, order=1)
        np.testing.assert_allclose(out[i], expected, atol=2e-5)
        w = out[i] / out[i].sum()
        centroid = np.array([(w * xx).sum(), (w * yy).sum(), (w * zz).sum()])
        np.testing.assert_allclose(centroid, rot[i] @ p + shift[i], atol=0.08)


def test_rigid_transform_2d_matches_scipy():
    box, theta = 20, 0.9
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shift = np.array([1.25, -0.5])
    p = np.array([3.0, -2.0])
    img = _blob(box, p)
    out = rigid_transform(torch.tensor(img)[None, None], torch.tensor(rot, dtype=torch.float32)[None],
                          torch.tensor(shift, dtype=torch.float32)[None])[0, 0].numpy()
    # scipy in (y, x) index order: input index = c + P R^T P (o - c - d)
    c = np.array([box // 2, box // 2], float)
    m = rot.T[::-1, ::-1]
    expected = ndimage.affine_transform(img, m, offset=c - m @ (c + shift[::-1]), order=1, mode="grid-constant")
    np.testing.assert_allclose(out, expected, atol=2e-5)
    yy, xx = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
    w = out / out.sum()
    np.testing.assert_allclose([(w * xx).sum(), (w * yy).sum()], rot @ p + shift, atol=0.08)


def test_identity_pose_is_the_identity_and_centre_is_n_over_2():
    """theta of the identity is the identity; a pure rotation fixes voxel N//2 (not (N-1)/2)."""
    theta = normalised_affine(torch.eye(3)[None], torch.zeros(1, 3), (16, 16, 16))
    torch.testing.assert_close(theta[0], torch.eye(3, 4))
    box = 16
    vol = np.zeros((box,) * 3, np.float32)
    vol[box // 2, box // 2, box // 2] = 1.0
    rot = torch.tensor(random_rotations(1, np.random.default_rng(1)), dtype=torch.float32)
    out = rigid_transform(torch.tensor(vol)[None, None], rot, torch.zeros(1, 3))[0, 0]
    assert float(out[box // 2, box // 2, box // 2]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("decoder", ["cnn", "splat"])
def test_save_load_round_trip(tmp_path, decoder):
    torch.manual_seed(1)
    model = AffinityVAE((8, 8, 8), [4, 8], latent_dims=2, decoder=decoder, n_splats=5, hidden=8,
                        pixel_size_angstrom=7.5)
    save_model(tmp_path / "model.pt", model, ["a", "b"], {"seed": 3, "nested": {"x": [1, 2]}})
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["class_names"] == ["a", "b"] and raw["box_size"] == 8 and raw["decoder"] == decoder
    loaded, meta = load_model(tmp_path / "model.pt")
    assert meta["config"] == {"seed": 3, "nested": {"x": [1, 2]}} and meta["pixel_size_angstrom"] == 7.5
    x = torch.randn(3, 1, 8, 8, 8)
    a, b = model.eval().encode(x), loaded.encode(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.testing.assert_close(model.decode_canonical(a["latent_mean"]), loaded.decode_canonical(a["latent_mean"]))


def test_load_model_rejects_other_files(tmp_path):
    from cryovae.errors import InputError

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a cryovae model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "absent.pt")
