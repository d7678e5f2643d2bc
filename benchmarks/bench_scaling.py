"""How the whole workflow scales with the number of particles: wall time, CPU, memory, jobs.

    python benchmarks/bench_scaling.py [--config config.yaml] [--sizes 150 900] \
        [--project 10000 100000 1000000] [--cores 2] [--work-dir /tmp/cryovae-scaling]

Runs the workflow (``snakemake --cores N``, every job a new process, as users run it) on
the config at two values of ``simulation.particles_per_class`` and reads the last line of
every job's log (``cryovae.cli.resource_summary``: wall, CPU and peak memory of that job).
Per rule it fits cost = a + b × particles through the two runs and projects it, with the
whole run's wall time, to the ``--project`` particle counts; the job counts and SLURM
submissions at those counts are not projected but read from the DAG snakemake builds for
them (``snakemake --dag``), grouped as ``profiles/slurm/config.yaml`` groups them.  The
matching jobs' peak memory is projected along the particles of their largest part, which stop
growing at ``matching.particles_per_job``; every other rule's along the run's particles.
Prints one block to append to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from cryovae.cli import RESOURCE_LINE
from cryovae.config import validate_config
from cryovae.splits import SPLITS, shard_plan

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
LOCAL_RULES = {"all"}  # rules snakemake runs on the submitting node
PART_LINE = re.compile(r"part \d+ of \d+, (\d+) particles")  # a match part's log (cryovae.match.match_split)


def particle_count(config: dict) -> int:
    cfg = validate_config(config, "(scaling config)")
    return sum(sum(shard_plan(cfg, split)) for split in SPLITS)


def per_class_for(config: dict, particles: int) -> int:
    """``particles_per_class`` that gives about ``particles`` in all three splits (linear in it)."""
    unit = particle_count({**config, "simulation": {**config.get("simulation", {}), "particles_per_class": 1000}})
    return max(1, round(particles * 1000 / unit))


def with_size(config: dict, per_class: int, output_dir: Path) -> dict:
    simulation = {**config.get("simulation", {}), "particles_per_class": per_class}
    return {**config, "simulation": simulation, "output_dir": str(output_dir)}


def write_config(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scaling_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}:{os.environ['PATH']}"}
    return subprocess.run([str(SNAKEMAKE), *args], cwd=REPO, env=env, check=True, text=True,
                          capture_output=capture)


def run(config_file: Path, cores: int) -> dict:
    """Run the workflow; its wall time and the CPU time of every process it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    snakemake("--cores", str(cores), "--configfile", str(config_file), capture=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def job_costs(output_dir: Path) -> dict[str, dict]:
    """Per rule: jobs, summed wall and CPU seconds, largest peak memory, from the job logs."""
    rules: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "wall_s": 0.0, "cpu_s": 0.0, "peak_mib": 0.0})
    for log in sorted((output_dir / "logs").rglob("*.log")):
        lines = [m for m in map(RESOURCE_LINE.search, log.read_text().splitlines()) if m]
        if not lines:
            raise RuntimeError(f"{log}: no resource line (did the job finish?)")
        cost = lines[-1]
        rule = log.relative_to(output_dir / "logs").parts[0].removesuffix(".log")
        entry = rules[rule]
        entry["jobs"] += 1
        entry["wall_s"] += float(cost["wall_s"])
        entry["cpu_s"] += float(cost["cpu_s"])
        entry["peak_mib"] = max(entry["peak_mib"], float(cost["peak_mib"]))
        sizes = [int(m[1]) for m in map(PART_LINE.search, log.read_text().splitlines()) if m]
        if sizes:  # a match part: its peak grows with the particles of the part, not of the run
            entry["job_particles"] = max(entry.get("job_particles", 0), sizes[-1])
    return dict(rules)


def projected_peak(rule: dict, before: dict, x0: int, x1: int, n: int, per_job: int) -> float:
    """A rule's largest job peak (MiB) at ``n`` particles: linear in the run's particles, or for
    matching linear in the particles of its largest part, which grows with the run until it
    reaches ``matching.particles_per_job`` and then stays there."""
    y0 = before.get("peak_mib", rule["peak_mib"])
    if "job_particles" not in rule or "job_particles" not in before or rule["job_particles"] == before["job_particles"]:
        return line_through(x0, y0, x1, rule["peak_mib"], n)
    size = min(rule["job_particles"] * n / x1, per_job)
    return line_through(before["job_particles"], y0, rule["job_particles"], rule["peak_mib"], size)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def line_through(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# ------------------------------------------------------------------ jobs and SLURM submissions
NODE = re.compile(r'^\s*(\d+)\[label = "([^"\\]+)')
EDGE = re.compile(r"^\s*(\d+) -> (\d+)")


def dag(config_file: Path) -> tuple[dict[int, str], list[tuple[int, int]]]:
    """Every job of a fresh run (id -> rule) and the dependencies between them."""
    text = snakemake("--dag", "--forceall", "--configfile", str(config_file), capture=True).stdout
    jobs = {int(m[1]): m[2] for m in map(NODE.match, text.splitlines()) if m}
    edges = [(int(m[1]), int(m[2])) for m in map(EDGE.match, text.splitlines()) if m]
    return jobs, edges


def rule_groups() -> tuple[dict[str, str], dict[str, int]]:
    """rule -> group (declared by the rules, then by the profile) and each group's components."""
    groups = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule, group in re.findall(r'^rule (\w+):(?:\n(?!rule ).*)*?\n    group:\n        "(\w+)"',
                                      smk.read_text(), flags=re.M):
            groups[rule] = group
    profile = yaml.safe_load(PROFILE.read_text())
    groups.update(profile.get("groups", {}))
    return groups, {k: int(v) for k, v in profile.get("group-components", {}).items()}


def slurm_submissions(jobs: dict[int, str], edges: list[tuple[int, int]]) -> int:
    """sbatch calls the profile makes: one per ungrouped job; per group, its connected
    components (jobs of the group linked by dependencies), group-components of them at a time."""
    groups, per_submission = rule_groups()
    parent = {j: j for j in jobs}

    def find(j: int) -> int:
        while parent[j] != j:
            parent[j] = parent[parent[j]]
            j = parent[j]
        return j

    for a, b in edges:
        if groups.get(jobs[a]) is not None and groups.get(jobs[a]) == groups.get(jobs[b]):
            parent[find(a)] = find(b)
    components: dict[str, set[int]] = defaultdict(set)
    submissions = 0
    for j, rule in jobs.items():
        if rule in LOCAL_RULES:
            continue
        if rule in groups:
            components[groups[rule]].add(find(j))
        else:
            submissions += 1
    return submissions + sum(math.ceil(len(c) / per_submission.get(g, 1)) for g, c in components.items())


# ------------------------------------------------------------------ report
def measure(config: dict, sizes: list[int], work_dir: Path, cores: int) -> list[dict]:
    runs = []
    for per_class in sizes:
        out = work_dir / f"ppc_{per_class}"
        cfg = with_size(config, per_class, out)
        config_file = write_config(cfg, work_dir / f"config_{per_class}")
        print(f"running {particle_count(cfg)} particles (particles_per_class {per_class}) into {out}", flush=True)
        load = os.getloadavg()[0]
        totals = run(config_file, cores)
        runs.append({"particles": particle_count(cfg), "per_class": per_class, "load_before": load,
                     "load_after": os.getloadavg()[0], **totals, "rules": job_costs(out),
                     "disk_bytes": disk_bytes(out)})
    return runs


def report(config: dict, runs: list[dict], project: list[int], work_dir: Path, cores: int) -> None:
    small, large = runs
    x0, x1 = small["particles"], large["particles"]
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, `--cores {cores}`; {time.strftime('%Y-%m-%d')}")
    for r in runs:
        print(f"- {r['particles']:,} particles: wall {r['wall_s'] / 60:.1f} min, CPU {r['cpu_s'] / 60:.1f} min "
              f"(every process), disk {r['disk_bytes'] / 2**30:.2f} GiB, load {r['load_before']:.1f} -> {r['load_after']:.1f}")
    print(f"\nPer rule, measured at {x0:,} / {x1:,} particles (jobs; summed CPU s; largest peak MiB):\n")
    print("| rule | jobs | CPU s | peak MiB | CPU s per 1k particles (slope) |")
    print("|---|---|---|---|---|")
    for rule in sorted(large["rules"], key=lambda k: -large["rules"][k]["cpu_s"]):
        a, b = small["rules"].get(rule, {}), large["rules"][rule]
        slope = (b["cpu_s"] - a.get("cpu_s", 0.0)) / (x1 - x0) * 1000
        print(f"| {rule} | {a.get('jobs', 0)} / {b['jobs']} | {a.get('cpu_s', 0):.1f} / {b['cpu_s']:.1f} | "
              f"{a.get('peak_mib', 0):.0f} / {b['peak_mib']:.0f} | {slope:.2f} |")
    print("\n| particles | wall (min) | CPU (min) | largest job peak (MiB) | disk (GiB) | snakemake jobs | match jobs | SLURM submissions |")
    print("|---|---|---|---|---|---|---|---|")
    for n in project:
        cfg = with_size(config, per_class_for(config, n), work_dir / "dag")
        jobs, edges = dag(write_config(cfg, work_dir / "config_dag"))
        n_jobs = sum(1 for r in jobs.values() if r not in LOCAL_RULES)
        wall = line_through(x0, small["wall_s"], x1, large["wall_s"], n) / 60
        cpu = line_through(x0, small["cpu_s"], x1, large["cpu_s"], n) / 60
        per_job = validate_config(cfg, "(scaling config)").matching.particles_per_job
        peak = max(projected_peak(v, small["rules"].get(k, {}), x0, x1, n, per_job) for k, v in large["rules"].items())
        disk = line_through(x0, small["disk_bytes"], x1, large["disk_bytes"], n) / 2**30
        tag = " (interpolated)" if n <= x1 else " (projected)"
        match_jobs = sum(1 for r in jobs.values() if r == "match")
        print(f"| {particle_count(cfg):,} | {wall:.1f}{tag} | {cpu:.1f}{tag} | {peak:.0f}{tag} | {disk:.1f}{tag} | "
              f"{n_jobs} | {match_jobs} | {slurm_submissions(jobs, edges)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml", help="workflow config to scale")
    parser.add_argument("--sizes", type=int, nargs=2, default=[150, 900],
                        help="the two simulation.particles_per_class values to run")
    parser.add_argument("--project", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="particle counts (all splits) to project to")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/cryovae-scaling"),
                        help="folder for the runs' outputs and configs")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    runs = measure(config, sorted(args.sizes), args.work_dir, args.cores)
    report(config, runs, args.project, args.work_dir, args.cores)


if __name__ == "__main__":
    main()
