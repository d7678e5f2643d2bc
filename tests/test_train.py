"""Training: outputs, reproducibility, resume after SIGTERM/SIGUSR1 (bitwise on the CPU), learning."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from cryovae.config import validate_config
from cryovae.errors import InputError
from cryovae.model import load_model
from synthetic_particles import write_affinity_csv, write_split
from cryovae.train import TIMING_COLUMNS, build_run, evaluate, run_training, train

NAMES = ["alpha", "beta", "gamma"]
TIMINGS = list(TIMING_COLUMNS)
AFFINITY = np.array([[1.0, 0.6, 0.1], [0.6, 1.0, 0.3], [0.1, 0.3, 1.0]])


def _config(**training):
    base = {"epochs": 4, "batch_size": 8, "channels": [4, 8], "latent_dims": 4, "checkpoint_every": 3,
            "threads": 1, "device": "cpu"}
    base.update(training)
    return validate_config({"structures": {n: f"demo:{n}" for n in NAMES}, "box_size": 8, "seed": 5,
                            "training": base})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class split of 8^3 blobs: 36 training and 12 validation particles."""
    root = tmp_path_factory.mktemp("tiny")
    write_split(root / "train", NAMES, 12, box=8, seed=1, particles_per_shard=10)
    write_split(root / "val", NAMES, 4, box=8, seed=2, particles_per_shard=10)
    write_affinity_csv(root / "affinity.csv", NAMES, AFFINITY)
    return root


def _run(cfg, tiny, out, hook=None):
    run_training(cfg, tiny / "train", tiny / "val", tiny / "affinity.csv", out, batch_hook=hook)


def _state(out):
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def _interrupt_at(epoch: int, batch: int, signum: int):
    def hook(e, b):
        if (e, b) == (epoch, batch):
            os.kill(os.getpid(), signum)
    return hook


@pytest.mark.parametrize("signum, at", [(signal.SIGTERM, (1, 2)), (signal.SIGUSR1, (0, 5))])
def test_resume_after_signal_is_bitwise_identical(tiny, tmp_path, signum, at):
    cfg = _config()
    _run(cfg, tiny, tmp_path / "straight")

    out = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as exc:
        _run(cfg, tiny, out, hook=_interrupt_at(*at, signum))
    assert exc.value.code == 128 + signum
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # handlers restored

    _run(cfg, tiny, out)
    assert not (out / "checkpoint.pt").exists()
    a, b = _state(tmp_path / "straight"), _state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = (pd.read_csv(p / "history.csv").drop(columns=TIMINGS) for p in (tmp_path / "straight", out))
    pd.testing.assert_frame_equal(ha, hb)


def test_resume_from_periodic_checkpoint_after_a_kill(tiny, tmp_path):
    """A process killed without warning resumes from the last periodic checkpoint (epoch 3 of 4)."""
    cfg = _config()
    _run(cfg, tiny, tmp_path / "straight")

    out = tmp_path / "killed"

    class Killed(Exception):
        pass

    def hook(e, b):
        if (e, b) == (3, 1):
            raise Killed   # stands in for SIGKILL: no handler runs, no checkpoint is written
    with pytest.raises(Killed):
        _run(cfg, tiny, out, hook=hook)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3
    _run(cfg, tiny, out)
    a, b = _state(tmp_path / "straight"), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_config_is_not_resumed(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        _run(_config(epochs=2), tiny, out, hook=_interrupt_at(0, 1, signal.SIGTERM))
    _run(_config(epochs=2, learning_rate=5e-4), tiny, out)
    assert "different configuration" in capsys.readouterr().err
    _run(_config(epochs=2, learning_rate=5e-4), tiny, tmp_path / "fresh")
    a, b = _state(out), _state(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs(tiny, tmp_path):
    cfg = _config(epochs=2, beta=1.0, beta_schedule={"kind": "ramp", "start": 0.0, "ramp_epochs": 2})
    train(cfg, tiny / "train", tiny / "val", tiny / "affinity.csv", tmp_path)
    hist = pd.read_csv(tmp_path / "history.csv")
    for col in ("epoch", "train_loss", "val_loss", *TIMINGS, "beta", "gamma", "learning_rate",
                "train_recon", "train_kl", "train_affinity", "train_pose", "val_recon", "val_kl",
                "val_affinity", "val_pose"):
        assert col in hist.columns, col
    assert hist["epoch"].tolist() == [1, 2]
    assert hist["beta"].tolist() == [0.0, 0.5]
    assert (hist["seconds"] > 0).all() and (hist["validation_seconds"] > 0).all() and (hist["val_pose"] > 0).all()
    assert (hist["cpu_seconds"] > 0).all()
    from cryovae.plots import history_components

    assert list(history_components(hist)) == ["loss", "recon", "kl", "affinity", "pose"]   # no timing "losses"
    np.testing.assert_allclose(hist["samples_per_s"], 36 / hist["seconds"], rtol=1e-9)  # 36 training particles
    total = hist["val_recon"] + hist["beta"] * hist["val_kl"] + hist["gamma"] * hist["val_affinity"] + hist["val_pose"]
    np.testing.assert_allclose(hist["val_loss"], total, rtol=1e-5)
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "checkpoint.pt").exists()
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["class_names"] == NAMES and meta["spatial_shape"] == [8, 8, 8]
    assert meta["pixel_size_angstrom"] == 10.0 and meta["latent_dims"] == 4 and meta["decoder"] == "splat"
    assert meta["config"]["training"]["epochs"] == 2 and meta["epochs_trained"] == 2


def test_training_lowers_the_validation_loss(tmp_path):
    """Every loss term in play (wedge-masked reconstruction, KL, affinity, pose): val loss drops."""
    names = NAMES[:2]
    kw = dict(box=16, noise_sd=0.05, max_angle_deg=60.0)
    write_split(tmp_path / "train", names, 96, seed=3, **kw)
    write_split(tmp_path / "val", names, 16, seed=4, **kw)
    write_affinity_csv(tmp_path / "affinity.csv", names, np.array([[1.0, 0.0], [0.0, 1.0]]))
    cfg = validate_config({
        "structures": {n: f"demo:{n}" for n in names}, "box_size": 16, "seed": 0,
        "training": {"epochs": 8, "batch_size": 16, "channels": [8, 16], "latent_dims": 4, "beta": 0.01,
                     "gamma": 1.0, "learning_rate": 3e-3, "threads": 2, "device": "cpu"},
    })
    run = build_run(cfg, tmp_path / "train", tmp_path / "val", tmp_path / "affinity.csv", tmp_path / "out")
    run.setup.beta, run.setup.gamma = 0.01, 1.0
    before = evaluate(run.model, run.val_data, run.setup, 16, run.device)
    train(cfg, tmp_path / "train", tmp_path / "val", tmp_path / "affinity.csv", tmp_path / "out")
    after = pd.read_csv(tmp_path / "out" / "history.csv").iloc[-1]
    assert after["val_loss"] < 0.7 * before["total"]
    assert after["val_recon"] < before["recon"] and after["val_pose"] < 0.7 * before["pose"]


def test_bad_inputs_are_reported(tiny, tmp_path):
    write_affinity_csv(tmp_path / "two.csv", NAMES[:2], np.eye(2))
    with pytest.raises(InputError, match="'gamma', which is not in the affinity matrix"):
        train(_config(), tiny / "train", tiny / "val", tmp_path / "two.csv", tmp_path / "out")
    (tmp_path / "ragged.csv").write_text("a,b\n1,0.5\n")
    with pytest.raises(InputError, match="ragged.csv: expected a header of N class names"):
        train(_config(), tiny / "train", tiny / "val", tmp_path / "ragged.csv", tmp_path / "out")
    with pytest.raises(InputError, match="particles STAR file does not exist"):
        train(_config(), tmp_path / "nowhere", tiny / "val", tiny / "affinity.csv", tmp_path / "out")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            train(_config(device="cuda"), tiny / "train", tiny / "val", tiny / "affinity.csv", tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_non_finite_particles_stop_training_with_a_message(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (tiny / "train").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = np.load(bad / "shard_000.npy")
    shard[3, 0, 0, 0] = np.nan
    np.save(bad / "shard_000.npy", shard)
    with pytest.raises(FloatingPointError, match="non-finite training loss at epoch 1"):
        train(_config(), bad, tiny / "val", tiny / "affinity.csv", tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_symmetry_table_locates_the_axes_in_each_map(tmp_path):
    """A C2 class whose 2-fold lies along x in its map: the pose loss gets that 2-fold, not z's."""
    import mrcfile

    from cryovae.train import symmetry_table

    vol = np.zeros((24, 24, 24), np.float32)
    vol[12, 12, 4:20] = 1.0  # a rod along x with two side blobs related by a 2-fold about x
    vol[12, 15, 8], vol[12, 9, 8] = 2.0, 2.0
    with mrcfile.new(tmp_path / "b.mrc") as m:
        m.set_data(vol.astype(np.float32))
    table = symmetry_table(["a", "b"], {"b": "C2"}, [tmp_path / "b.mrc"])
    twofold = table[1, 1].numpy()
    assert np.allclose(table[0, 1].numpy(), np.eye(3))  # C1 padded with identities
    assert abs(np.trace(twofold) + 1) < 1e-3  # a 180° rotation ...
    assert abs(abs(twofold[0, 0]) - 1) < 0.02  # ... about x
    with pytest.raises(InputError, match="reference map is needed"):
        symmetry_table(["a", "b"], {"b": "C2"}, [])


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_corrupt_checkpoint_names_the_file_and_set_aside_restarts(tiny, tmp_path, keep):
    cfg = _config()
    _run(cfg, tiny, tmp_path / "straight")
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        _run(cfg, tiny, out, hook=_interrupt_at(1, 1, signal.SIGTERM))
    _truncate(out / "checkpoint.pt", keep)
    with pytest.raises(InputError) as err:
        _run(cfg, tiny, out)
    message = str(err.value)
    assert f"{out / 'checkpoint.pt'}: the training checkpoint cannot be read" in message
    assert f"mv {out / 'checkpoint.pt'} {out / 'checkpoint.pt'}.corrupt" in message
    (out / "checkpoint.pt").rename(out / "checkpoint.pt.corrupt")  # what the message says to do
    _run(cfg, tiny, out)
    a, b = _state(tmp_path / "straight"), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_shard_names_the_file(tiny, tmp_path):
    import shutil

    split = tmp_path / "train"
    shutil.copytree(tiny / "train", split)
    _truncate(split / "shard_001.npy", 0.7)
    with pytest.raises(InputError, match=r"shard_001.npy: shard cannot be read \(truncated or corrupt.*delete it"):
        run_training(_config(), split, tiny / "val", tiny / "affinity.csv", tmp_path / "out")


# ----------------------------------------------------------------------------- devices and precision


def test_device_choice_never_falls_back_silently(monkeypatch):
    from cryovae.train import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="training.device is 'cuda' but no CUDA device is available"):
        choose_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda")
    assert choose_device("cuda") == torch.device("cuda")


def test_precision_and_kernel_settings_per_device():
    import torch.utils.deterministic as det

    from cryovae.train import autocast, device_settings, mixed_precision

    assert mixed_precision(torch.device("cuda")) is torch.bfloat16
    assert mixed_precision(torch.device("cpu")) is torch.float32
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    before = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
              torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    with device_settings(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() and not det.fill_uninitialized_memory
    with device_settings(torch.device("cuda")):   # only flags: no GPU is touched
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    assert (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
            torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def test_a_bf16_step_computes_layers_in_bf16_and_keeps_float32_state(tiny, tmp_path):
    from cryovae.train import batch_losses, epoch_batches, loss_values, make_batch

    run = build_run(_config(), tiny / "train", tiny / "val", tiny / "affinity.csv", tmp_path)
    run.setup.compute_dtype = torch.bfloat16
    seen = []
    run.model.encoder.features[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    idx = epoch_batches(len(run.train_data), 8, 0, 0)[0]
    batch = make_batch(run.train_data, idx, run.train_data.read(idx), run.device)
    losses = batch_losses(run.model, batch, run.setup, True, run.noise)
    losses["total"].backward()
    run.optimizer.step()
    assert seen == [torch.bfloat16]
    assert all(v.dtype is torch.float32 for v in losses.values())
    assert all(np.isfinite(v) for v in loss_values(losses).values())
    assert all(p.dtype is torch.float32 and p.grad.dtype is torch.float32 for p in run.model.parameters())


def test_bf16_training_runs_and_its_model_loads_on_the_cpu(tiny, tmp_path, monkeypatch, capsys):
    """The CUDA precision path, run on the CPU: it trains (finite, different from float32) and saves float32."""
    import cryovae.train as training

    cfg = _config(epochs=2)
    _run(cfg, tiny, tmp_path / "fp32")
    monkeypatch.setattr(training, "mixed_precision", lambda device: torch.bfloat16)
    _run(cfg, tiny, tmp_path / "bf16")
    assert "compute dtype bfloat16" in capsys.readouterr().err
    hist = pd.read_csv(tmp_path / "bf16" / "history.csv")
    assert np.isfinite(hist.drop(columns=TIMINGS).to_numpy()).all()
    model, _ = load_model(tmp_path / "bf16" / "model.pt", "cpu")
    assert all(p.dtype is torch.float32 for p in model.parameters())
    fp32, bf16 = _state(tmp_path / "fp32"), _state(tmp_path / "bf16")
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)   # autocast was on
    x = torch.from_numpy(np.load(tiny / "train" / "shard_000.npy")[:4]).unsqueeze(1)
    assert torch.isfinite(model.encode(x)["latent_mean"]).all()


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh, tiny and on the CPU: the training rate and the workflow's command reach the summary."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shutil.which("snakemake", path=env["PATH"]) is None:
        pytest.skip("snakemake is not installed")
    proc = subprocess.run(["bash", str(script), "--device", "cpu", "--quick", "--only", "train", "workflow",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = proc.stdout.split("== summary", 1)[1]
    assert "train: train splat batch 8: " in summary and "train cnn batch 8: " in summary  # the default first
    assert "samples/s on cpu (float32)" in summary
    assert "workflow (training.device: cpu): real " in summary
    overlay = (tmp_path / "workflow_overlay.yaml").read_text()
    assert '"training": {"device": "cpu"}' in overlay and str(tmp_path / "workflow") in overlay
    bad = subprocess.run(["bash", str(script), "--device", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--device must be cuda or cpu, got tpu" in bad.stderr
