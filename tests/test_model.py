"""The affinity-VAE: shapes and gradients (2D/3D, both decoders), the pose convention of the
rigid transform, and the save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryovae.model import AffinityVAE, load_model, save_model
from synthetic_particles import render_blobs
from cryovae.model.decoders import CnnDecoder
from cryovae.rotations import random_rotations
from cryovae.volumes import check_rigid_transform, rigid_transform


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
def test_rigid_transform_moves_an_off_centre_blob_to_a_p_plus_d(box):
    """Blob at reference position p (rel. to voxel N//2) lands at A p + d."""
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
        w = out[i] / out[i].sum()
        centroid = np.array([(w * xx).sum(), (w * yy).sum(), (w * zz).sum()])
        np.testing.assert_allclose(centroid, rot[i] @ p + shift[i], atol=0.08)


@pytest.mark.parametrize("spatial", [(12, 16, 14), (16, 16, 16), (15, 16)])
def test_cnn_decoder_poses_volumes_as_scipy_does_about_n_over_2(spatial):
    """The decoder's pose (``posed``) is the rigid transform of the canonical volume about voxel N//2."""
    decoder = CnnDecoder(spatial, [4, 8], latent_dims=2, hidden=8)

    def posed(volumes, rotations, shifts):
        decoder.canonical = lambda z: volumes[:, None]
        return decoder.posed(torch.zeros(len(volumes), 2), rotations, shifts)[:, 0]

    assert check_rigid_transform(posed, shape=spatial, dtype=torch.float32) < 2e-6
    assert check_rigid_transform(posed, shape=spatial) < 1e-12


def test_pure_rotation_fixes_voxel_n_over_2():
    """A pure rotation fixes voxel N//2 (not (N-1)/2)."""
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


def test_the_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    torch.manual_seed(2)
    model = AffinityVAE((8, 8, 8), [4, 8], latent_dims=2, decoder="cnn", hidden=8)
    for folder in ("one", "two"):  # atomic writes go through temporaries of different names
        save_model(tmp_path / folder / "model.pt", model, ["a", "b"], {"seed": 1})
    assert (tmp_path / "one/model.pt").read_bytes() == (tmp_path / "two/model.pt").read_bytes()


def test_load_model_rejects_other_files(tmp_path):
    from cryovae.errors import InputError

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a cryovae model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "absent.pt")
    model = AffinityVAE((8, 8, 8), [4, 8], latent_dims=2, decoder="cnn", hidden=8)
    save_model(tmp_path / "model.pt", model, ["a", "b"], {})
    whole = (tmp_path / "model.pt").read_bytes()
    for keep in (len(whole) // 2, 0):
        (tmp_path / "model.pt").write_bytes(whole[:keep])
        with pytest.raises(InputError, match=f"{tmp_path / 'model.pt'}: the model file cannot be read .*rerun"):
            load_model(tmp_path / "model.pt")


# ----------------------------------------------------------------------------- a trained tiny model


def _train_tiny(root, ndim: int, n_per_class: int, epochs: int, max_angle_deg: float):
    """Train through ``train`` on a synthetic split with true poses in its STAR: model path."""
    from cryovae.config import validate_config
    from synthetic_particles import write_affinity_csv, write_split
    from cryovae.train import train

    names = ["one", "two"]
    kw = dict(ndim=ndim, box=16, noise_sd=0.1, max_angle_deg=max_angle_deg, particles_per_shard=256)
    write_split(root / "train", names, n_per_class, seed=11, **kw)
    write_split(root / "val", names, 16, seed=12, **kw)
    write_affinity_csv(root / "affinity.csv", names, np.eye(2))
    cfg = validate_config({
        "structures": {n: f"demo:{n}" for n in names}, "box_size": 16, "seed": 0,
        "training": {"epochs": epochs, "batch_size": 32, "channels": [8, 16], "latent_dims": 4, "beta": 0.01,
                     "gamma": 1.0, "pose_weight": 1.0, "learning_rate": 3e-3, "checkpoint_every": 1000,
                     "threads": 2, "device": "cpu"},
    })
    train(cfg, root / "train", root / "val", root / "affinity.csv", root / "out")
    return root / "out" / "model.pt"


def _check_equivariance(model_path, ndim: int, test_rotation: np.ndarray, max_angle_deg: float,
                        pose_tol_deg: float, equi_tol_deg: float):
    """Fresh noise-free particles: pose = truth; rotating the input rotates the pose; latent unchanged."""
    from synthetic_particles import class_blobs, make_particles, random_poses
    from cryovae.rotations import geodesic_distance_deg

    model, meta = load_model(model_path)
    rng = np.random.default_rng(99)
    n = 48
    labels = rng.integers(0, 2, n)
    rot, shift = random_poses(n, ndim, 1.0, rng, max_angle_deg)
    blobs = class_blobs(2, ndim, 16, 0)
    x1 = make_particles(blobs, labels, rot, shift, 16, 0.0, rng)
    x2 = make_particles(blobs, labels, test_rotation @ rot, shift, 16, 0.0, rng)
    e1, e2 = (model.encode(torch.tensor(x)[:, None]) for x in (x1, x2))
    r1, r2 = (e["rotation"].double().numpy() for e in (e1, e2))
    assert np.median(geodesic_distance_deg(r1, rot)) < pose_tol_deg
    assert np.median(geodesic_distance_deg(r2, test_rotation @ r1)) < equi_tol_deg
    # origins in RELION's convention: -shift * pixel size
    err_px = np.abs(e1["origin_angstrom"].numpy() + shift * meta["pixel_size_angstrom"])[:, :ndim] / meta["pixel_size_angstrom"]
    assert np.median(err_px) < 0.25
    cos = torch.nn.functional.cosine_similarity
    same_particle = cos(e1["latent_mean"], e2["latent_mean"]).numpy()
    pairwise = cos(e1["latent_mean"][:, None], e1["latent_mean"][None], dim=2).numpy()
    other_class = pairwise[labels[:, None] != labels[None]]
    assert np.median(same_particle) > 0.95 and np.median(other_class) < 0.5


def test_trained_2d_model_is_pose_equivariant_and_shape_invariant(tmp_path):
    model_path = _train_tiny(tmp_path, ndim=2, n_per_class=512, epochs=20, max_angle_deg=180.0)
    turn = np.radians(40.0)
    rz = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    _check_equivariance(model_path, 2, rz, 180.0, pose_tol_deg=10.0, equi_tol_deg=10.0)


@pytest.mark.slow
def test_trained_3d_model_is_pose_equivariant_and_shape_invariant(tmp_path):
    from scipy.spatial.transform import Rotation

    model_path = _train_tiny(tmp_path, ndim=3, n_per_class=256, epochs=20, max_angle_deg=60.0)
    small = Rotation.from_rotvec([0.2, -0.25, 0.15]).as_matrix()     # 21 degrees
    _check_equivariance(model_path, 3, small, 45.0, pose_tol_deg=10.0, equi_tol_deg=10.0)


def test_tensor_batches_match_the_arrays_in_order(tmp_path):
    from cryovae.model.data import ParticleData
    from synthetic_particles import write_split

    write_split(tmp_path, ["a", "b"], 10, box=8, seed=0, particles_per_shard=7)
    data = ParticleData.open(tmp_path, ["a", "b"])
    order = [np.array([3, 15, 0]), np.array([19, 7]), np.array([8])]
    every = np.concatenate([np.load(p) for p in sorted(tmp_path.glob("shard_*.npy"))])   # STAR rows in shard order
    tensors = list(data.tensor_batches(order))
    assert [t.dtype for t in tensors] == [torch.float32] * 3
    for t, a, idx in zip(tensors, data.batches(order), order):
        np.testing.assert_array_equal(t.numpy(), a)
        np.testing.assert_array_equal(a, every[idx])
    assert list(data.tensor_batches([])) == []
