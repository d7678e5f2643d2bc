"""The workflow on a real one-node SLURM cluster, through the user's profile.

The cluster (munge, slurmctld, slurmd; partitions main and gpu; one fake GPU) is started
by tests/cluster/slurm_cluster.py and stopped after the module, whatever happens. The
run is the one a user types, ``snakemake --profile profiles/slurm``, plus the test
cluster's overrides (tests/cluster/profile: squeue polling, no account, fast polling).

Needs root and Debian's slurm-wlm and munge; skips without them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cluster.slurm_cluster import SlurmCluster, client_env, slurm_cluster  # noqa: F401
from recompute import affinity_from_descriptors, seen_class_results

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
USER_PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = REPO / "tests" / "cluster" / "profile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
RUN_TIMEOUT_S = 900
SIM_SPLITS = ("train", "val", "test")
# Every SLURM rule of `rule all` and all its DAG levels, but not every split: the test
# split's evaluation and priors need structures, maps, affinity, the simulated splits,
# training, embedding, classifier, alignment, annotation and export; the other splits'
# copies of the last steps would only queue on the 2 test CPUs.
TARGETS = ("affinity/affinity.csv", "evaluation/test/metrics.json", "priors/test.star")


@dataclass(frozen=True)
class SlurmJob:
    """One line of ``squeue -t all``: a SLURM job of this run."""

    job_id: int
    partition: str
    state: str
    comment: str  # the plugin's "rule_<rule or group name>[_wildcards_...]"


@dataclass(frozen=True)
class ClusterRun:
    output_dir: Path
    slurm_log_dir: Path  # the plugin's SLURM logs: <rule or group>/<wildcards>/<job id>.log
    wall_s: float
    jobs: list[SlurmJob]

    def slurm_log(self, job: SlurmJob) -> str:
        """A SLURM job's log (the test profile keeps every one); empty when there is none."""
        logs = list(self.slurm_log_dir.rglob(f"{job.job_id}.log"))
        return logs[0].read_text(errors="replace") if logs else ""

    def rules_run_by(self, job: SlurmJob) -> set[str]:
        """Rules that the snakemake inside a SLURM job finished ("Finished jobid: N (Rule: NAME)";
        a rule's ``message:`` replaces the "localrule NAME:" header in the log)."""
        return set(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", self.slurm_log(job), flags=re.MULTILINE))


def _stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM snakemake's process group (it cancels its SLURM jobs), SIGKILL after 60 s."""
    with_group = os.getpgid(proc.pid)
    os.killpg(with_group, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        proc.wait()


def _run_snakemake(cluster: SlurmCluster, work: Path) -> subprocess.CompletedProcess:
    """The tiny config through the user profile + test overrides; output under ``work``."""
    venv_bin = str(Path(sys.executable).parent)  # `cryovae` and `snakemake` of this interpreter
    env = client_env()
    env["PATH"] = f"{venv_bin}:{env['PATH']}"
    cmd = [
        f"{venv_bin}/snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--profile", str(USER_PROFILE),
        "--profile", str(TEST_PROFILE),
        "--configfile", str(TINY),
        "--config", f"output_dir={work / 'out'}",
        "--slurm-logdir", str(work / "slurm_logs"),
        *(str(work / "out" / target) for target in TARGETS),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except BaseException:
        _stop_process_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def _slurm_jobs(cluster: SlurmCluster) -> list[SlurmJob]:
    """The jobs snakemake submitted (comment rule_...), finished ones included: MinJobAge
    keeps them in squeue for 10 minutes."""
    lines = cluster.run("squeue", "-h", "-t", "all", "-o", "%i|%P|%T|%k").splitlines()
    jobs = []
    for line in lines:
        job_id, partition, state, comment = line.split("|", 3)
        if comment.startswith("rule_"):
            jobs.append(SlurmJob(int(job_id), partition, state, comment.strip()))
    return sorted(jobs, key=lambda j: j.job_id)


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster: SlurmCluster, tmp_path_factory) -> ClusterRun:  # noqa: F811
    cores = yaml.safe_load((TEST_PROFILE / "config.yaml").read_text())["cores"]
    if slurm_cluster.cpus < cores:
        pytest.skip(f"the test profile asks for up to {cores} CPUs a job; this node has {slurm_cluster.cpus}")
    work = tmp_path_factory.mktemp("slurm_run")
    start = time.monotonic()
    result = _run_snakemake(slurm_cluster, work)
    wall_s = time.monotonic() - start
    jobs = _slurm_jobs(slurm_cluster)
    if result.returncode != 0:
        pytest.fail(
            f"snakemake on SLURM exited {result.returncode} after {wall_s:.0f} s\n"
            f"{result.stdout[-6000:]}\n--- SLURM jobs\n"
            + "\n".join(map(str, jobs))
            + "\n--- daemon logs\n"
            + slurm_cluster.log_tail()
        )
    print(f"workflow on SLURM: {wall_s:.1f} s, {len(jobs)} SLURM jobs")
    return ClusterRun(work / "out", work / "slurm_logs", wall_s, jobs)


def _jobs_of(run: ClusterRun, rule: str) -> list[SlurmJob]:
    """This run's SLURM jobs of one rule alone: the plugin's comment is rule_<rule>[_wildcards_..]."""
    return [
        j for j in run.jobs if j.comment == f"rule_{rule}" or j.comment.startswith(f"rule_{rule}_wildcards_")
    ]


def _group_jobs(run: ClusterRun, group: str) -> dict[int, set[str]]:
    """SLURM job id -> rules it ran, for the jobs of one group (comment rule_<group>_<rules>,
    shortened with "..." when long; the rules come from the job's log)."""
    prefix = f"rule_{group}_"
    return {
        j.job_id: run.rules_run_by(j)
        for j in run.jobs
        if j.comment.startswith(prefix) and not j.comment.startswith(f"{prefix}wildcards_")
    }


def _user_profile() -> dict:
    return yaml.safe_load((USER_PROFILE / "config.yaml").read_text())


def test_gpu_partition_jobs_get_the_fake_gpu(slurm_cluster: SlurmCluster):  # noqa: F811
    """The harness itself: a --gpus=1 step sees device 0; a main-partition step none."""
    show_device = ("sh", "-c", "echo ${CUDA_VISIBLE_DEVICES:-unset}")
    gpu = slurm_cluster.run("srun", "-p", "gpu", "--gpus=1", "--mem=100", *show_device)
    assert gpu.strip() == "0"
    cpu = slurm_cluster.run("srun", "-p", "main", "--mem=100", *show_device)
    assert cpu.strip() == "unset"


def test_every_slurm_job_completed(cluster_run):
    assert cluster_run.jobs, "no SLURM job was submitted"
    failed = [j for j in cluster_run.jobs if j.state != "COMPLETED"]
    assert not failed, "\n".join(f"{j}\n{cluster_run.slurm_log(j)[-3000:]}" for j in failed)


def test_training_ran_on_the_gpu_partition_with_a_gpu(cluster_run):
    train = _jobs_of(cluster_run, "train")
    assert [(j.partition, j.state) for j in train] == [("gpu", "COMPLETED")]
    others = [j for j in cluster_run.jobs if j not in train]
    assert others and {j.partition for j in others} == {"main"}
    log = (cluster_run.output_dir / "logs" / "train.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in log.splitlines(), log[:2000]


def test_grouped_rules_ran_inside_group_jobs(cluster_run):
    profile_groups = _user_profile().get("groups") or {}
    alone = {rule: _jobs_of(cluster_run, rule) for rule in profile_groups}
    assert not any(alone.values()), alone
    for rule, group in profile_groups.items():
        assert any(rule in rules for rules in _group_jobs(cluster_run, group).values()), (rule, group)


def test_simulation_shards_are_bundled_by_group_components(cluster_run):
    n_shards = sum(
        len(list((cluster_run.output_dir / "subtomograms" / split).glob("shard_*.star")))
        for split in SIM_SPLITS
    )
    per_job = int(_user_profile()["group-components"]["simulation"])
    simulation = _group_jobs(cluster_run, "simulation")
    assert n_shards > len(SIM_SPLITS) and simulation
    assert not _jobs_of(cluster_run, "simulate")
    # with gather in the group a split (its shards + gather) is one component; else a shard
    gather_grouped = all("gather" in rules for rules in simulation.values())
    n_components = len(SIM_SPLITS) if gather_grouped else n_shards
    assert len(simulation) == math.ceil(n_components / per_job)


def test_affinity_is_that_of_the_descriptors(cluster_run):
    table = pd.read_csv(cluster_run.output_dir / "affinity" / "affinity.csv")
    names = list(yaml.safe_load(TINY.read_text())["structures"])
    assert list(table.columns) == names
    np.testing.assert_allclose(table.to_numpy(dtype=float), affinity_from_descriptors(cluster_run.output_dir, names),
                               atol=1e-6)


def test_metrics_agree_with_the_particle_table(cluster_run):
    """accuracy and pose errors of the cluster's run, recomputed from its embeddings and ground truth."""
    metrics = json.loads((cluster_run.output_dir / "evaluation/test/metrics.json").read_text())
    config = yaml.safe_load(TINY.read_text())
    seen = [c for c in config["structures"] if c not in config["unseen"]]
    results = seen_class_results(cluster_run.output_dir, "test", seen)
    assert metrics["accuracy"] == pytest.approx(results["right"].mean(), abs=1e-6)
    assert metrics["pose_error_median_deg"] == pytest.approx(np.median(results["error_deg"]), abs=1e-3)
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_particles"]
