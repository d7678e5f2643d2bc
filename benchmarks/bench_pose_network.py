"""Amortised poses: the pose network alone, and template matching started from its proposals.

    python benchmarks/bench_pose_network.py --output DIR [--samples 100000] [--snr 0.1] [--particles 512]
        [--keeps 4,2,1] [--tops 2] [--threads 2]

Trains the pose network (``cryovae train-pose``'s function, the workflow's code) on the eight
seen SHREC maps (polnet's 10 Å maps, centred as ``bench_match.py`` does; SNR ``--snr``, CTF,
±60° wedge, shifts ±1 px), unless DIR already holds ``pose_network.pt`` from the same settings.
Then on fresh particles (``bench_match.py``'s: seed 0, not the training or validation seeds):

- the network alone: the angle of its best-ranked rotation of the true class and of its own pose
  (``soft_argmax``, what matching writes as ``proposal_rotation`` and starts from), and how often
  one of its k best lies within 15°: the plain k best grid rotations, and the own pose then grid
  rotations at least ``pose_far_deg`` apart (as matching takes them), all modulo the point groups
  (1bxn C4, 2cg9 and 3h84 C2);
- matching with ``matching.starts: grid``, ``network``, and ``network`` without the global search
  (``matching.global_search: false``, "unsearched") at each ``coarse_keep`` of ``--keeps`` and
  ``refine_top`` of ``--tops``: the matcher's set-up (reference banks), wall and CPU time of
  matching (the network's forward pass included), the class of best fit, and the refined pose's
  error at the true class modulo the point group.

Prints one block to append to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from bench_match import BOX, MAPS, SEEN, SYMMETRY, centred
from cryovae.config import validate_config
from cryovae.ctf import ctf_3d
from cryovae.match import CHUNK, Matcher
from cryovae.model.posenet import grid_angles_deg, load_pose_network, soft_argmax
from cryovae.pose_training import train_pose_network
from cryovae.rotations import random_rotations, symmetric_geodesic_distance_deg
from cryovae.simulate import ParticleDraws, simulate_volumes


def settings(args, keep: int = 4, starts: str = "grid", top: int = 2) -> dict:
    """The bench's config; ``starts`` grid, network, or unsearched (network, no global search)."""
    searched = starts != "unsearched"
    features = {} if searched else {"classification": {"features": ["fit"], "unknown_features": ["fit"]}}
    return {"structures": {c: f"demo:{c}" for c in SEEN}, "box_size": BOX, "pixel_size_angstrom": 10.0,
            "seed": 0, "simulation": {"snr": args.snr}, "alignment": {"symmetry": SYMMETRY},
            "pose_network": {"samples": args.samples, "threads": args.threads},
            "matching": {"coarse_keep": keep, "refine_top": top, "starts": "network" if starts != "grid" else "grid",
                         "global_search": searched}, **features}


def trained_network(args) -> Path:
    """DIR/pose_network.pt, trained here unless it exists with the same settings."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, stamp = out / "pose_network.pt", out / "settings.json"
    wanted = json.dumps(settings(args)["pose_network"] | {"snr": args.snr}, sort_keys=True)
    if model.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return model
    paths = []
    for c in SEEN:
        path = out / "maps" / f"{c}.mrc"
        path.parent.mkdir(exist_ok=True)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(centred(mrcfile.read(MAPS / f"{c}.mrc")))
            mrc.voxel_size = 10.0
        paths.append(path)
    start = time.perf_counter()
    train_pose_network(validate_config(settings(args)), paths, model, out / "pose_network_history.csv")
    print(f"- training: {args.samples:,} particles in {time.perf_counter() - start:.0f} s "
          f"({args.samples / (time.perf_counter() - start):.0f} particles/s)")
    stamp.write_text(wanted)
    return model


def particles(args):
    maps = np.stack([centred(mrcfile.read(MAPS / f"{c}.mrc")) for c in SEEN])
    rng = np.random.default_rng(0)
    n = args.particles
    draws = ParticleDraws(rng.integers(0, len(SEEN), n), random_rotations(n, rng), rng.uniform(-1, 1, (n, 3)),
                          rng.uniform(2.0, 5.0, n))
    volumes = simulate_volumes(validate_config(settings(args)), maps, draws.class_index, draws, np.random.default_rng(0))
    return maps, draws, volumes


def errors_deg(rotations: np.ndarray, draws: ParticleDraws, groups: list[np.ndarray]) -> np.ndarray:
    return np.array([symmetric_geodesic_distance_deg(r, t, groups[k])
                     for r, t, k in zip(rotations, draws.rotation, draws.class_index)])


def network_alone(matcher: Matcher, draws: ParticleDraws, volumes: np.ndarray, keeps: list[int]) -> None:
    start = time.perf_counter()
    logits, probability = matcher.proposer.predict(volumes)
    seconds = time.perf_counter() - start
    n, rows = len(volumes), np.arange(len(volumes))
    groups = [matcher.symmetry[c] for c in SEEN]
    own = logits.numpy()[rows, draws.class_index]
    best = errors_deg(matcher.proposal_grid[own.argmax(1)], draws, groups)
    pose = np.empty((n, 3, 3))
    for cls in range(len(SEEN)):
        mine = draws.class_index == cls
        pose[mine] = soft_argmax(own[mine], matcher.proposal_quats[SEEN[cls]], matcher.proposal_radius)
    refined = errors_deg(pose, draws, groups)
    print(f"- network alone ({n} particles, forward pass {seconds:.2f} s = {n / seconds:.0f} particles/s): "
          f"best-ranked rotation of the true class median {np.median(best):.1f}°, within 15° {(best < 15).mean():.3f}; "
          f"own pose (soft_argmax, {matcher.proposal_radius:g}°) median {np.median(refined):.1f}°, "
          f"within 15° {(refined < 15).mean():.3f}; "
          f"class accuracy {(probability.argmax(1).numpy() == draws.class_index).mean():.3f}")
    angles = np.empty((n, len(matcher.proposal_grid)))
    for cls in range(len(SEEN)):
        mine = draws.class_index == cls
        angles[mine] = grid_angles_deg(matcher.proposal_grid, draws.rotation[mine], [groups[cls]],
                                       np.zeros(mine.sum(), dtype=int))
    ranked = np.argsort(-own, axis=1)
    for k in (1, 4, 16, 64):
        hit = (np.take_along_axis(angles, ranked[:, :k], 1) < 15).any(1)
        print(f"  - plain top {k} grid rotations (no suppression): one within 15° for {hit.mean():.3f}")
    for keep in sorted(set(keeps) | {8, 16}):
        matcher.keep = keep
        hit = np.zeros(n, dtype=bool)
        for cls in range(len(SEEN)):
            mine = draws.class_index == cls
            if mine.any():
                starts = matcher.proposal_grid[matcher.peaks(SEEN[cls], own[mine], network=True)]
                starts[:, 0] = pose[mine]
                near = [errors_deg(starts[:, j], _subset(draws, mine), groups) < 15 for j in range(keep)]
                hit[mine] = np.any(near, axis=0)
        print(f"  - one of the {keep} starts (>= {matcher.far_deg:g}° apart) within 15°: {hit.mean():.3f}")


def _subset(draws: ParticleDraws, rows: np.ndarray) -> ParticleDraws:
    return ParticleDraws(draws.class_index[rows], draws.rotation[rows], draws.shift_xyz_px[rows], draws.defocus_um[rows])


def timed_match(matcher: Matcher, draws: ParticleDraws, volumes: np.ndarray) -> tuple[float, float, dict]:
    start, cpu = time.perf_counter(), time.process_time()
    blocks = []
    for first in range(0, len(volumes), CHUNK):
        rows = slice(first, min(len(volumes), first + CHUNK))
        ctf = ctf_3d(torch.as_tensor(draws.defocus_um[rows]), BOX, 10.0, 300.0, 2.7, 0.07)
        blocks.append(matcher.match(volumes[rows], ctf))
    result = {k: np.concatenate([b[k] for b in blocks]) for k in ("fit", "rotation")}
    return time.perf_counter() - start, time.process_time() - cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder for the trained network (reused when present)")
    ap.add_argument("--samples", type=int, default=100_000, help="pose_network.samples")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--particles", type=int, default=512)
    ap.add_argument("--keeps", default="4,2,1", help="matching.coarse_keep values to compare")
    ap.add_argument("--tops", default="2", help="matching.refine_top values to compare")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keeps = [int(k) for k in args.keeps.split(",")]
    tops = [int(k) for k in args.tops.split(",")]
    print(f"\n## Pose network ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f})")
    network = load_pose_network(trained_network(args))
    maps, draws, volumes = particles(args)
    refs = dict(zip(SEEN, maps))
    rows = np.arange(len(volumes))
    print("\n(unsearched: network starts, no global search or class screen; the network names the refined classes)")
    print("\n| starts | coarse_keep | refine_top | matcher set-up | matching wall | CPU | particles/s "
          "| class (best fit) | median | within 10° | beyond 15° |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    matcher = None
    for starts, keep, top in itertools.product(("grid", "network", "unsearched"), keeps, tops):
        begun = time.perf_counter()
        matcher = Matcher(validate_config(settings(args, keep, starts, top)), refs, (-60.0, 60.0),
                          proposer=None if starts == "grid" else network)
        built = time.perf_counter() - begun
        wall, cpu, result = timed_match(matcher, draws, volumes)
        groups = [matcher.symmetry[c] for c in SEEN]
        err = errors_deg(result["rotation"][rows, draws.class_index], draws, groups)
        accuracy = (np.nan_to_num(result["fit"], nan=-np.inf).argmax(1) == draws.class_index).mean()
        print(f"| {starts} | {keep} | {top} | {built:.1f} s | {wall:.1f} s | {cpu:.1f} s | {len(volumes) / wall:.0f} | "
              f"{accuracy:.3f} | {np.median(err):.2f}° | {(err < 10).mean():.3f} | {(err > 15).mean():.3f} |", flush=True)
    network_alone(matcher, draws, volumes, keeps)


if __name__ == "__main__":
    main()
