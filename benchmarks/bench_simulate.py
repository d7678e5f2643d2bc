"""Simulation throughput (32³ subtomograms) and peak memory over many shards.

    python benchmarks/bench_simulate.py                      # throughput, both ways, CTF off/on
    python benchmarks/bench_simulate.py --memory 100000      # + 100,000 particles in one process

Throughput is measured two ways on the machine's cores: one process with ``--threads``
threads (torch and numba), and ``--workers`` processes of one thread each running
independent shards at once (how the workflow runs shard jobs on a 2-core node).  The
config is the default (±60° wedge, SNR 0.1, normalised, 512 particles per shard) with
the CTF off or on; the first shard of each process (numba compilation) is not timed.

With other jobs on the machine the wall-clock rate understates what 2 free cores give;
``cpu_ms_per_particle`` (user + system CPU time of the simulating processes) and its
projection ``2000 / cpu_ms_per_particle`` (particles/s on 2 cores, shards in parallel)
are reported beside it.

Memory: shards are simulated in sequence in one process, each written to disk and then
deleted; the peak resident set size after each shard shows that memory is bounded by a
shard, not by the number of particles.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

N_CLASSES = 10


def _config(ctf: bool, box: int, particles_per_class: int):
    from cryovae.config import validate_config

    names = [f"c{i}" for i in range(N_CLASSES)]
    return validate_config({
        "structures": {n: f"demo:{n}" for n in names}, "box_size": box, "pixel_size_angstrom": 10.0,
        "simulation": {"ctf": ctf, "particles_per_class": particles_per_class, "particles_per_shard": 512},
    })


def _write_maps(folder: Path, box: int) -> list[Path]:
    """Asymmetric maps of a few Gaussian blobs (content does not change the cost)."""
    rng = np.random.default_rng(0)
    grid = np.indices((box, box, box)).astype(np.float32) - box // 2
    paths = []
    for i in range(N_CLASSES):
        volume = np.zeros((box, box, box), np.float32)
        for centre in rng.uniform(-box / 5, box / 5, (5, 3)):
            volume += np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / 8.0)
        path = folder / f"c{i}.mrc"
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = 10.0
        paths.append(path)
    return paths


def _set_threads(threads: int) -> None:
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def _run_shards(args: tuple) -> tuple[float, int, float]:
    """Simulate ``shards`` (after one untimed warm-up shard); returns (seconds, particles, CPU seconds)."""
    ctf, box, threads, shards, maps, folder = args
    _set_threads(threads)
    from cryovae.simulate import simulate_shard
    from cryovae.splits import shard_plan

    config = _config(ctf, box, particles_per_class=2000)
    plan = shard_plan(config, "train")
    out = Path(folder)
    simulate_shard(config, "train", shards[0], maps, out / f"w{shards[0]}.npy", out / f"w{shards[0]}.star")
    start, cpu, count = time.perf_counter(), _cpu_seconds(), 0
    for k in shards[1:]:
        simulate_shard(config, "train", k, maps, out / f"s{k}.npy", out / f"s{k}.star")
        (out / f"s{k}.npy").unlink()
        count += plan[k]
    return time.perf_counter() - start, count, _cpu_seconds() - cpu


def throughput(ctf: bool, box: int, threads: int, workers: int, shards_per_worker: int, maps, folder) -> dict:
    if workers == 1:
        wall, count, cpu = _run_shards((ctf, box, threads, list(range(shards_per_worker + 1)), maps, folder))
    else:
        jobs = [(ctf, box, 1, list(range(w * (shards_per_worker + 1), (w + 1) * (shards_per_worker + 1))),
                 maps, folder) for w in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_run_shards, jobs)
        wall = max(r[0] for r in results)
        count = sum(r[1] for r in results)
        cpu = sum(r[2] for r in results)
    cpu_ms = 1e3 * cpu / count
    return {"ctf": ctf, "box": box, "processes": workers, "threads_each": threads if workers == 1 else 1,
            "particles": count, "seconds": round(wall, 2), "particles_per_s": round(count / wall),
            "cpu_ms_per_particle": round(cpu_ms, 3),
            "projected_per_s_on_2_free_cores": round(2000 / cpu_ms)}


def memory(total: int, box: int, maps, folder) -> dict:
    """Simulate ``total`` particles shard by shard in this process; peak RSS after each shard."""
    from cryovae.simulate import simulate_shard
    from cryovae.splits import shard_plan

    config = _config(False, box, particles_per_class=-(-total // N_CLASSES))
    plan = shard_plan(config, "train")
    out = Path(folder)
    peaks, done, start = [], 0, time.perf_counter()
    for k, n in enumerate(plan):
        simulate_shard(config, "train", k, maps, out / "m.npy", out / "m.star")
        (out / "m.npy").unlink()
        done += n
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB
    marks = sorted({0, 1, 9, len(plan) // 2, len(plan) - 1})
    return {"particles": done, "shards": len(plan), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib_after_shard": {str(i + 1): round(peaks[i]) for i in marks},
            "shard_file_mib": round(512 * box**3 * 4 / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4, help="timed shards (of 512) per process (0: skip throughput)")
    parser.add_argument("--memory", type=int, default=0, help="particles for the memory run (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        maps = _write_maps(Path(tmp), args.box)
        for ctf in (False, True) if args.shards > 0 else ():
            print(json.dumps(throughput(ctf, args.box, args.threads, 1, args.shards, maps, tmp)), flush=True)
            print(json.dumps(throughput(ctf, args.box, 1, args.workers, args.shards, maps, tmp)), flush=True)
        if args.memory:
            _set_threads(args.threads)
            print(json.dumps(memory(args.memory, args.box, maps, tmp)), flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
