"""Simulation through the workflow: subtomograms/s of the `simulate` rules, as a slope.

    python benchmarks/bench_workflow_simulate.py [--small 100] [--large 1000] [--cores 2]
                                                 [--output-dir /tmp/bench-wf-sim] [--config config.yaml]

The config (default: the embedded default, wedge, noise and CTF at 32³) is run twice through
``snakemake --cores N`` with ``simulation.particles_per_class`` set to ``--small`` and then
``--large``, each time asking for the shard files of the three simulated splits only.  The
reference maps are made first, untimed, and shared by both runs (the map rules do not read
the simulation section), and the small run is made once untimed (numba compiles its kernel
into its cache, as the first run of an installation does); each run starts from an empty
``subtomograms/`` folder.  The slope

    (particles_large - particles_small) / (seconds_large - seconds_small)

cancels what does not grow with the particles (snakemake's start, the DAG, the maps).  CPU
time is user + system of snakemake and every job it ran (``RUSAGE_CHILDREN``): the
load-independent figure; ``cpu_ms_per_particle`` is its slope too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from cryovae.config import validate_config  # noqa: E402
from cryovae.splits import SPLITS, shard_names, shard_plan  # noqa: E402


def _write_config(base: dict, output_dir: Path, per_class: int) -> Path:
    data = {**base, "output_dir": str(output_dir)}
    data["simulation"] = {**base.get("simulation", {}), "particles_per_class": per_class}
    path = output_dir / f"bench_{per_class}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _snakemake(config_file: Path, targets: list[str], cores: int) -> tuple[float, float]:
    """Run snakemake on ``targets``: (wall seconds, CPU seconds of it and its jobs)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO / "workflow")}
    # the targets first: --configfile takes every value after it
    cmd = [str(Path(sys.executable).parent / "snakemake"), *targets, "--cores", str(cores), "--quiet", "all",
           "--configfile", str(config_file)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def shard_targets(config_file: Path) -> tuple[list[str], int, int]:
    """The shard files (npy and STAR) of the three simulated splits, their particles, their shards."""
    config = validate_config(yaml.safe_load(config_file.read_text()), str(config_file))
    targets, particles, shards = [], 0, 0
    for split in SPLITS:
        folder = Path(config.output_dir) / "subtomograms" / split
        names = shard_names(config, split)
        targets += [str(folder / f"{name}.{ext}") for name in names for ext in ("npy", "star")]
        particles += sum(shard_plan(config, split))
        shards += len(names)
    return targets, particles, shards


def run_size(base: dict, output_dir: Path, per_class: int, cores: int) -> dict:
    config_file = _write_config(base, output_dir, per_class)
    shutil.rmtree(output_dir / "subtomograms", ignore_errors=True)
    shutil.rmtree(output_dir / "logs" / "simulate", ignore_errors=True)
    targets, particles, shards = shard_targets(config_file)
    load = os.getloadavg()[0]
    wall, cpu = _snakemake(config_file, targets, cores)
    jobs = len(list((output_dir / "logs" / "simulate").glob("*.log")))
    return {"particles_per_class": per_class, "particles": particles, "shards": shards, "simulate_jobs": jobs,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--small", type=int, default=100, help="particles_per_class of the small run")
    parser.add_argument("--large", type=int, default=1000, help="particles_per_class of the large run")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/bench-wf-sim"))
    args = parser.parse_args()
    base = yaml.safe_load(args.config.read_text())
    shutil.rmtree(args.output_dir, ignore_errors=True)
    args.output_dir.mkdir(parents=True)
    maps_config = _write_config(base, args.output_dir, args.small)
    classes = list(base["structures"])
    _snakemake(maps_config, [str(args.output_dir / "maps" / f"{c}.mrc") for c in classes], args.cores)
    run_size(base, args.output_dir, args.small, args.cores)  # warm-up: numba compiles into its cache once
    small = run_size(base, args.output_dir, args.small, args.cores)
    large = run_size(base, args.output_dir, args.large, args.cores)
    extra = large["particles"] - small["particles"]
    result = {
        "small": small, "large": large,
        "slope_particles_per_s": round(extra / (large["wall_s"] - small["wall_s"]), 1),
        "slope_cpu_ms_per_particle": round(1e3 * (large["cpu_s"] - small["cpu_s"]) / extra, 3),
    }
    result["projected_particles_per_s_on_cores"] = round(args.cores * 1e3 / result["slope_cpu_ms_per_particle"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
