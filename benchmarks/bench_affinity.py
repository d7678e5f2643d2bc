"""Benchmark of the affinity stage: wall time and peak memory, run as the workflow runs it.

For each mode, every class is a `cryovae structure` job followed by a `cryovae descriptor`
job (one process each, at most --jobs classes at a time, like Snakemake with --cores),
then one `cryovae affinity` job.  Peak memory is the largest maximum resident set size of
any of those processes (os.wait4).  A second run measures one ~100k-atom structure (the
real entries tiled side by side) in coarse-grained mode.

    python benchmarks/bench_affinity.py                       # ten SHREC entries, both modes, 2 cores
    python benchmarks/bench_affinity.py --modes all_atom --max-centres 1000

Prints the numbers and the all-atom affinity matrix; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import gemmi
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PDB_DIR = REPO.parent / "shared" / "data" / "shrec2021" / "pdb"
CRYOVAE = [sys.executable, "-m", "cryovae.cli"]


def run_measured(args: list[str]) -> tuple[float, float, float]:
    """Run one command; return (wall s, peak RSS MiB, CPU s user + system). A failure stops the benchmark."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(args)}\n{stderr}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def write_config(structures: dict[str, str], mode: str, max_centres: int | None, work: Path) -> Path:
    config = {"structures": structures, "affinity": {"mode": mode}}
    if max_centres is not None:
        config["affinity"]["max_centres"] = max_centres
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"config_{mode}.json"
    path.write_text(json.dumps(config))
    return path


def run_stage_cli(structures: dict[str, str], mode: str, max_centres: int | None, jobs: int, work: Path) -> dict:
    """The stage as the workflow runs it: one `cryovae` process per job, ``jobs`` classes at a time."""
    config_path = write_config(structures, mode, max_centres, work)
    out = work / mode

    def one_class(name: str) -> list[tuple[float, float, float]]:
        cif, npy = out / "structures" / f"{name}.cif", out / "soap" / f"{name}.npy"
        first = run_measured([*CRYOVAE, "structure", "--config", str(config_path), "--class-name", name,
                              "--output", str(cif)])
        second = run_measured([*CRYOVAE, "descriptor", "--config", str(config_path), "--structure", str(cif),
                               "--output", str(npy)])
        return [first, second]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = [r for result in pool.map(one_class, structures) for r in result]
    csv = out / "affinity.csv"
    runs.append(run_measured([*CRYOVAE, "affinity", "--config", str(config_path), "--descriptors",
                              *[str(out / "soap" / f"{n}.npy") for n in structures], "--csv", str(csv),
                              "--plot", str(out / "affinity.png")]))
    wall = time.perf_counter() - start
    cpu_by_kind = (np.mean([r[2] for r in runs[:-1:2]]), np.mean([r[2] for r in runs[1:-1:2]]), runs[-1][2])
    return {"wall_s": wall, "peak_mib": max(r[1] for r in runs), "cpu_s": sum(r[2] for r in runs),
            "cpu_by_kind": cpu_by_kind, "csv": csv}


def _worker_task(kind: str, config_path: str, name: str, out: str, descriptors: list[str]) -> tuple[int, float, float]:
    """One job inside a pool worker; returns (pid, this worker's peak RSS MiB, its CPU s so far)."""
    from cryovae.affinity import build_affinity, compute_descriptor
    from cryovae.config import load_config
    from cryovae.structures import prepare_structure

    config, out_dir = load_config(config_path), Path(out)
    if kind == "class":
        cif = out_dir / "structures" / f"{name}.cif"
        prepare_structure(config, name, cif)
        compute_descriptor(config, cif, out_dir / "soap" / f"{name}.npy")
    else:
        build_affinity(config, [Path(d) for d in descriptors], out_dir / "affinity.csv", out_dir / "affinity.png")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return os.getpid(), usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def run_stage_inprocess(structures: dict[str, str], mode: str, max_centres: int | None, jobs: int,
                        work: Path) -> dict:
    """The same jobs called as functions in a pool of ``jobs`` fresh worker processes (imports paid once
    per worker, not once per job); the timing includes starting the workers."""
    config_path = str(write_config(structures, mode, max_centres, work))
    out = work / f"{mode}_inprocess"
    descriptors = [str(out / "soap" / f"{n}.npy") for n in structures]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = list(pool.map(_worker_task, ["class"] * len(structures), [config_path] * len(structures),
                                list(structures), [str(out)] * len(structures), [[]] * len(structures)))
        results.append(pool.submit(_worker_task, "build", config_path, "", str(out), descriptors).result())
    wall = time.perf_counter() - start
    cpu_by_pid: dict[int, float] = {}
    for pid, _, cpu in results:
        cpu_by_pid[pid] = max(cpu_by_pid.get(pid, 0.0), cpu)
    return {"wall_s": wall, "peak_mib": max(r[1] for r in results), "cpu_s": sum(cpu_by_pid.values()),
            "csv": out / "affinity.csv"}


def tiled_structure(pdb_dir: Path, min_atoms: int, target: Path) -> int:
    """Write real entries side by side (300 Å apart) into one mmCIF until it has ``min_atoms`` atoms."""
    big = gemmi.Structure()
    model = gemmi.Model(1)
    count, k = 0, 0
    sources = sorted(pdb_dir.glob("*.pdb"))
    while count < min_atoms:
        st = gemmi.read_structure(str(sources[k % len(sources)]))
        st.setup_entities()
        st.remove_ligands_and_waters()
        shift = gemmi.Vec3(300.0 * (k % 4), 300.0 * (k // 4), 0.0)
        st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), shift))
        for chain in st[0]:
            chain.name = f"{chain.name}{k}"
            model.add_chain(chain)
            count += chain.count_atom_sites()
        k += 1
    big.add_model(model)
    big.setup_entities()
    big.make_mmcif_document().write_file(str(target))
    return count


def print_matrix(names: list[str], matrix: np.ndarray) -> None:
    print("        " + " ".join(f"{n:>6s}" for n in names))
    for name, row in zip(names, matrix):
        print(f"{name:>7s} " + " ".join(f"{v:6.2f}" for v in row))
    pairs = sorted(((matrix[i, j], names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))),
                   reverse=True)
    print("most similar pairs: " + ", ".join(f"{a}-{b} {v:.2f}" for v, a, b in pairs[:5]))


def report(label: str, result: dict, cores: int, load: float) -> None:
    print(f"{label}: wall {result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s "
          f"(/{cores} cores = {result['cpu_s'] / cores:.1f} s), peak RSS {result['peak_mib']:.0f} MiB, "
          f"load average before {load:.1f}")
    if "cpu_by_kind" in result:
        print("  CPU s per job: structure {:.2f}, descriptor {:.2f} (mean), affinity {:.2f}".format(
            *result["cpu_by_kind"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdb-dir", type=Path, default=DEFAULT_PDB_DIR)
    parser.add_argument("--modes", nargs="+", default=["all_atom", "coarse_grained"])
    parser.add_argument("--routes", nargs="+", default=["cli", "inprocess"], choices=["cli", "inprocess"])
    parser.add_argument("--jobs", type=int, default=2, help="classes processed at a time")
    parser.add_argument("--cores", type=int, default=2, help="pin this process and its children to N cores")
    parser.add_argument("--max-centres", type=int, default=None, help="override affinity.max_centres")
    parser.add_argument("--big-atoms", type=int, default=100_000, help="atoms of the tiled structure; 0: skip")
    args = parser.parse_args()
    if not args.pdb_dir.is_dir():
        raise SystemExit(f"{args.pdb_dir} is not present")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    from cryovae.affinity import read_affinity_csv

    structures = {p.stem: str(p) for p in sorted(args.pdb_dir.glob("*.pdb"))}
    stages = {"cli": run_stage_cli, "inprocess": run_stage_inprocess}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for mode in args.modes:
            for route in args.routes:
                load = os.getloadavg()[0]
                result = stages[route](structures, mode, args.max_centres, args.jobs, work)
                report(f"{mode}, {len(structures)} structures, {route}", result, args.cores, load)
            print_matrix(*read_affinity_csv(result["csv"]))
        if args.big_atoms:
            big = work / "tiled.cif"
            n_atoms = tiled_structure(args.pdb_dir, args.big_atoms, big)
            pair = {"tiled": str(big), "3qm1": structures["3qm1"]}
            for route in args.routes:
                load = os.getloadavg()[0]
                result = stages[route](pair, "coarse_grained", args.max_centres, args.jobs, work / "big")
                report(f"coarse_grained, tiled {n_atoms}-atom structure + 3qm1, {route}", result, args.cores, load)


if __name__ == "__main__":
    main()
