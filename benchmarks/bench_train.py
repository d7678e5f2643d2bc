"""Training throughput of the affinity-VAE and the splat renderer's speed.

Measures, each case in a fresh subprocess (so that peak memory is the case's own):

- ``train``: samples/s of full training steps (forward, all loss terms incl. the wedge-masked
  reconstruction, affinity and pose terms, backward, Adam) at the config defaults
  (channels, latent_dims, n_splats) for the CNN and the splat decoder; batches come from
  memory-mapped shards through the training data reader, in a background thread, as in
  ``cryovae train``;
- ``splat``: forward+backward time of the separable renderer at K = 128 and 512, against the
  dense (batch x voxels x K) reference evaluation (run on a smaller batch and scaled per sample);
- ``read``: samples/s of the shard reader alone;
- ``workflow`` (with ``--split-root``, a workflow output folder whose train/val splits, maps and
  affinity exist): the ``train`` rule itself, run by ``snakemake --forcerun train`` for
  ``--epochs`` epochs, as a user's workflow runs it (a fresh process, the rule's threads and
  environment); reports the per-epoch rates of ``history.csv``, the job's wall time and the
  CPU time (user + sys) of everything it ran.

Peak memory: the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

    python benchmarks/bench_train.py --threads 2                 # CPU, 2 threads
    python benchmarks/bench_train.py --device cuda               # CUDA with bf16 autocast
    python benchmarks/bench_train.py --what workflow --split-root /tmp/train-bench/run --epochs 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _write_shards(folder: Path, n: int, box: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' particle fixture
    from synthetic_particles import write_split

    write_split(folder, ["a", "b", "c", "d"], n // 4, box=box, noise_sd=1.0, particles_per_shard=256, seed=0)


def _step_batches(n: int, batch: int, count: int) -> list:
    """``count`` batches of shuffled indices into ``n`` particles, epoch after epoch."""
    from cryovae.train import epoch_batches

    out, epoch = [], 0
    while len(out) < count:
        out += epoch_batches(n, batch, 0, epoch)
        epoch += 1
    return out[:count]


def case_train(args, device: torch.device) -> dict:
    """Samples/s of training steps at the config defaults, with the training loop's device settings,
    precision, optimiser and (pinned, read-ahead) batches."""
    from cryovae.config import validate_config
    from cryovae.model.data import ParticleData
    from cryovae.model.losses import wedge_mask
    from cryovae.model.vae import AffinityVAE
    from cryovae.train import (LossSetup, batch_losses, device_settings, hidden_units, loss_values, make_batch,
                               make_optimizer, mixed_precision)

    training = {"decoder": args.decoder}
    if args.channels:
        training["channels"] = [int(c) for c in args.channels.split(",")]
    if args.n_splats:
        training["n_splats"] = args.n_splats
    cfg = validate_config({"structures": {"a": "demo:a", "b": "demo:b", "c": "demo:c", "d": "demo:d"},
                           "training": training})
    tc = cfg.training
    box = args.box
    n = min(args.batch * (args.steps + args.warmup), max(args.max_particles, 2 * args.batch))
    with tempfile.TemporaryDirectory() as tmp, device_settings(device):
        _write_shards(Path(tmp), n, box)
        data = ParticleData.open(tmp, ["a", "b", "c", "d"])
        torch.manual_seed(0)
        model = AffinityVAE((box,) * 3, tc.channels, tc.latent_dims, tc.decoder, tc.n_splats,
                            hidden_units(tc.channels), 10.0).to(device)
        opt = make_optimizer(model, tc.learning_rate)
        setup = LossSetup(torch.eye(4, device=device), tc.affinity_loss,
                          wedge_mask((box,) * 3, cfg.simulation.tilt_range_deg).to(device), None, tc.pose_weight,
                          tc.beta, tc.gamma)
        gen = torch.Generator().manual_seed(0)
        batches = _step_batches(len(data), args.batch, args.steps + args.warmup)
        start = None
        for i, (idx, vols) in enumerate(zip(batches, data.tensor_batches(batches, device.type == "cuda"))):
            if i == args.warmup:
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
            losses = batch_losses(model, make_batch(data, idx, vols, device), setup, True, gen)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            loss_values(losses)   # the loop's one synchronisation per step
            opt.step()
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n_params = sum(p.numel() for p in model.parameters())
    return {"case": f"train {args.decoder}", "samples_per_s": args.batch * args.steps / seconds,
            "cpu_ms_per_sample": 1e3 * cpu_seconds / (args.batch * args.steps),
            "params": n_params, "batch": args.batch, "box": box, "channels": tc.channels, "particles": n,
            "compute_dtype": str(mixed_precision(device)).removeprefix("torch."),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "n_splats": tc.n_splats if args.decoder == "splat" else None}


def _time(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def case_splat(args, device: torch.device) -> dict:
    """Forward+backward of the separable renderer (and of the dense reference, per sample)."""
    from cryovae.model.splat import render_splats, render_splats_dense

    shape = (args.box,) * 3
    renderer = render_splats_dense if args.dense else render_splats
    batch = args.dense_batch if args.dense else args.batch
    g = torch.Generator().manual_seed(0)
    centres = ((torch.rand(batch, args.k, 3, generator=g) - 0.5) * args.box * 0.8).to(device).requires_grad_(True)
    weights = torch.randn(batch, args.k, generator=g).to(device).requires_grad_(True)
    sigma = (0.6 + torch.rand(batch, args.k, generator=g)).to(device).requires_grad_(True)

    def step():
        renderer(centres, weights, sigma, shape).square().mean().backward()

    seconds = _time(step, device, args.steps)
    return {"case": f"splat {'dense' if args.dense else 'separable'} K={args.k}", "batch": batch,
            "ms_per_batch": 1e3 * seconds, "ms_per_sample": 1e3 * seconds / batch}


def case_read(args, device: torch.device) -> dict:
    """Samples/s of the shard reader on shuffled batches (page cache warm)."""
    from cryovae.model.data import ParticleData
    from cryovae.train import epoch_batches

    n = 4096
    with tempfile.TemporaryDirectory() as tmp:
        _write_shards(Path(tmp), n, args.box)
        data = ParticleData.open(tmp, ["a", "b", "c", "d"])
        batches = epoch_batches(n, args.batch, 0, 0)
        t = time.perf_counter()
        for _ in data.batches(batches):
            pass
        seconds = time.perf_counter() - t
    return {"case": "read shards", "samples_per_s": n / seconds, "batch": args.batch}


def case_workflow(args) -> dict:
    """The train rule through snakemake on an existing split; rates from its history.csv."""
    import os

    import pandas as pd

    from cryovae.shards import read_particles_star

    root = Path(args.split_root).resolve()
    repo = Path(__file__).resolve().parents[1]
    overlay = root / "bench_train_overlay.yaml"   # merged over config.yaml (JSON is YAML)
    overlay.write_text(json.dumps({"output_dir": str(root), "training": {
        "epochs": args.epochs, "threads": args.threads, "device": args.device}}))
    command = ["snakemake", "--cores", str(args.threads), "--forcerun", "train",
               "--configfile", "config.yaml", str(overlay), "--", str(root / "model" / "model.pt")]
    env = dict(os.environ, PYTHONPATH=str(repo / "workflow"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"snakemake failed with status {proc.returncode}")
    history = pd.read_csv(root / "model" / "history.csv")
    n_train = len(read_particles_star(root / "subtomograms" / "train" / "particles.star")[0])
    rates = history["samples_per_s"] if "samples_per_s" in history else n_train / history["seconds"]
    result = {"case": "workflow train rule", "epochs": args.epochs, "n_train": n_train,
              "train_samples_per_s": [round(float(r), 1) for r in rates],
              "train_seconds": [round(float(s), 1) for s in history["seconds"]],
              "job_wall_s": round(wall, 1),
              "job_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
              "samples_per_job_wall_s": round(args.epochs * n_train / wall, 1)}
    if "validation_seconds" in history:
        result["validation_seconds"] = [round(float(s), 1) for s in history["validation_seconds"]]
    if "cpu_seconds" in history:
        result["train_cpu_ms_per_sample"] = [round(1e3 * float(c) / n_train, 2) for c in history["cpu_seconds"]]
    return result


CASES = {"train": case_train, "splat": case_splat, "read": case_read}


def run_case(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = CASES[args.case](args, device)
    result["peak_memory_mib"] = _peak_memory_mib(device)
    result["device"] = args.device
    result["threads"] = args.threads
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decoders", nargs="+", default=["cnn", "splat"], choices=["cnn", "splat"],
                   help="decoders of the train case")
    p.add_argument("--max-particles", type=int, default=4096,
                   help="particles the train case writes; longer runs cycle over them, epoch by epoch")
    p.add_argument("--what", nargs="+", default=["train", "splat", "read"], choices=list(CASES) + ["workflow"])
    p.add_argument("--split-root", help="workflow output folder with simulated train/val splits (case workflow)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the workflow case")
    p.add_argument("--dense-batch", type=int, default=2, help="batch of the dense splat reference")
    p.add_argument("--channels", default="", help="encoder channels, e.g. 8,16,32 (default: the config's)")
    p.add_argument("--n-splats", type=int, default=0, help="Gaussians of the splat decoder (default: the config's)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--decoder", default="cnn", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args)
        return
    common = ["--device", args.device, "--threads", str(args.threads), "--box", str(args.box),
              "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--dense-batch", str(args.dense_batch), "--max-particles", str(args.max_particles)] + (["--channels", args.channels] if args.channels else []) \
        + (["--n-splats", str(args.n_splats)] if args.n_splats else [])
    if "workflow" in args.what:
        if not args.split_root:
            p.error("--what workflow needs --split-root")
        print(json.dumps(case_workflow(args)), flush=True)
    plan = []
    if "train" in args.what:
        plan += [["--case", "train", "--decoder", d] for d in args.decoders]
    if "splat" in args.what:
        plan += [["--case", "splat", "--k", str(k)] + extra for k in (128, 512) for extra in ([], ["--dense"])]
    if "read" in args.what:
        plan.append(["--case", "read"])
    for extra in plan:
        proc = subprocess.run([sys.executable, __file__, *common, *extra], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"case {extra} failed with status {proc.returncode}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        print(json.dumps(json.loads(line[len("RESULT "):])), flush=True)


if __name__ == "__main__":
    main()
