"""End-to-end benchmark: run the workflow on a config, time it, and judge its poses with RELION.

    python benchmarks/bench_workflow.py CONFIG [--output-dir DIR] [--cores N] [--relion]
        [--split NAME] [--set section.key=value ...]

Prints the wall time of the whole workflow, a split's metrics (``--split``: test, or an
extracted tomogram such as sim_00, the first tomogram ``tomogram_simulation`` makes), and with
``--relion`` the correlation of ``relion_reconstruct``'s map from each seen class's
predicted poses (priors/{split}/{class}.star, correctly classified particles of that class)
with the class's reference map (../shared/tools/relion-check/relion_cc.py, the first
number: spherical averages removed), beside the same particles reconstructed with their
true poses: the ceiling of this check on the data.  Append the printed block to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import starfile
import yaml

REPO = Path(__file__).resolve().parents[1]
RELION_CC = REPO.parent / "shared" / "tools" / "relion-check" / "relion_cc.py"
METRICS = ("accuracy", "macro_f1", "per_class_accuracy", "unseen_auroc", "seen_unknown_rate", "novel_flagged_fraction",
           "pose_error_median_deg", "pose_error_median_deg_frame_free", "pose_error_mean_deg",
           "network_pose_error_median_deg", "pose_network_error_median_deg", "pose_network_within_15deg",
           "shift_error_median_angstrom", "shift_error_median_px",
           "per_class_pose_error_median_deg", "pose_determined_fraction", "pose_margin_auroc",
           "pose_undetermined_classes", "affinity_spearman", "n_particles")


def run_workflow(config: dict, output_dir: Path, cores: int) -> float:
    """Run the workflow on ``config`` into ``output_dir`` (priors in RELION 3 form); wall seconds."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = output_dir / "bench_config.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output_dir": str(output_dir), "priors": {"format": "relion3"}}, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "--cores", str(cores), "--configfile", str(config_file)],
        cwd=REPO, env=env, check=True,
    )
    return time.perf_counter() - start


POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")


def _relion_cc(blocks: dict, folder: Path, reference: Path, cwd: Path) -> float:
    """relion_cc.py's anisotropic correlation for a STAR written into ``folder``, RELION run in ``cwd``
    (the output folder: image paths are relative to it, as the README tells users to run RELION)."""
    with tempfile.NamedTemporaryFile(suffix=".star", dir=folder, delete=False) as fh:
        path = Path(fh.name)
    starfile.write(blocks, path, overwrite=True)
    try:
        out = subprocess.run([sys.executable, str(RELION_CC), str(path), str(reference), "--cwd", str(cwd)],
                             capture_output=True, text=True, check=True).stdout.split()
    finally:
        path.unlink()
    return float(out[-2])


def split_folder(output_dir: Path, split: str) -> Path:
    """Where a split's particles.star (with the truth) lies: simulated or extracted."""
    simulated = output_dir / "subtomograms" / split
    return simulated if simulated.is_dir() else output_dir / "extracted" / split


def relion_correlations(config: dict, output_dir: Path, split: str = "test") -> dict[str, tuple[float, float]]:
    """Per seen class: relion_cc's anisotropic correlation of the reconstruction from the predicted
    poses of its correctly classified particles of ``split``, and from the same particles' true poses
    (the ceiling of this check on this data)."""
    truth = starfile.read(split_folder(output_dir, split) / "particles.star", always_dict=True)["particles"]
    truth = truth.set_index(truth["cryovaeParticleId"].astype(str))
    results = {}
    for name in [c for c in config["structures"] if c not in config.get("unseen", [])]:
        star = output_dir / "priors" / split / f"{name}.star"
        if not star.is_file():
            continue
        blocks = starfile.read(star, always_dict=True)
        ids = blocks["particles"]["cryovaeParticleId"].astype(str)
        predicted = blocks["particles"][(truth.loc[ids, "cryovaeClassName"].astype(str) == name).to_numpy()].copy()
        true_poses = predicted.copy()
        for column in POSE_COLUMNS:
            true_poses[column] = truth.loc[predicted["cryovaeParticleId"].astype(str), column].to_numpy()
        reference = output_dir / "maps" / f"{name}.mrc"
        results[name] = tuple(_relion_cc({**blocks, "particles": table}, star.parent, reference, output_dir)
                              for table in (predicted, true_poses))
    return results


def override(config: dict, item: str) -> None:
    """Set ``section.key=value`` (the value parsed as YAML) in ``config``, in place."""
    dotted, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--output-dir", type=Path, default=None)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--relion", action="store_true")
    ap.add_argument("--split", default="test", help="the split whose metrics are printed (test, sim_00, ...)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value (YAML), e.g. tomogram_simulation.pick_error_px=3")
    args = ap.parse_args()
    config = yaml.safe_load(args.config.read_text())
    for item in args.set:
        override(config, item)
    output_dir = (args.output_dir or REPO / "benchmarks" / "out" / args.config.stem).resolve()
    seconds = run_workflow(config, output_dir, args.cores)
    metrics = json.loads((output_dir / "evaluation" / args.split / "metrics.json").read_text())
    print(f"\n## Workflow end to end: {args.config} {' '.join(args.set)}, split {args.split} "
          f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, --cores {args.cores}, "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"wall time {seconds:.0f} s; snr {config.get('simulation', {}).get('snr')}")
    for key in METRICS:
        print(f"- {key}: {metrics.get(key)}")
    if args.relion:
        for name, (cc, ceiling) in relion_correlations(config, output_dir, args.split).items():
            print(f"- relion_reconstruct, class {name}: predicted poses {cc:.3f}, true poses {ceiling:.3f}")


if __name__ == "__main__":
    main()
