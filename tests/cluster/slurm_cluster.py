"""A throw-away one-node SLURM cluster for tests (Debian slurm-wlm + munge, run as root).

``running_cluster(state_dir)`` starts, as plain foreground processes whose PIDs it keeps:

- ``munged`` as user ``munge`` with its own key and socket in a private folder under /tmp
  (so that a system munged, if any, is left alone),
- ``slurmctld`` and ``slurmd`` as root, with state, spool, logs and config under
  ``state_dir``; one node (this host, its detected CPUs, 80 % of its memory) carrying one
  fake GPU (``gres.conf`` ``File=/dev/null``: ``--gres=gpu:1`` / ``--gpus=1`` are accepted and
  ``CUDA_VISIBLE_DEVICES=0`` is exported to the job), partitions ``main`` (default) and ``gpu``.

It waits until the node is idle, yields a ``SlurmCluster`` and, however the body ends,
cancels every job, stops the daemons it started (by PID, SIGTERM then SIGKILL) and puts
back what it changed under /etc/slurm.

The config must sit at the default path /etc/slurm/slurm.conf (symlinked): the snakemake
SLURM jobstep plugin removes ``SLURM_CONF`` from the environment of the nested ``srun``
that runs each rule, so a config anywhere else makes every rule fail with
"srun: fatal: Could not establish a configuration source".  Hence one such cluster per
machine at a time; ``skip_reason()`` says why none can be started here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETC_SLURM = Path("/etc/slurm")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel", "munge")
# MinJobAge keeps finished jobs visible to squeue; the snakemake SLURM plugin needs it
# >= 3 x slurm-init-seconds-before-status-checks when it polls with squeue.
MIN_JOB_AGE_S = 600
PIDS_FILE = "daemons.pids"  # "name=pid" per daemon this harness started, in state_dir/run
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def _which(program: str) -> str | None:
    """Full path of ``program`` on PATH or in the sbin folders (daemons live there)."""
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def skip_reason() -> str | None:
    """Why no test cluster can be started on this machine, or None when one can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (it starts slurmctld, slurmd and munged)"
    missing = [p for p in DAEMONS + CLIENTS if _which(p) is None]
    if missing:
        return (
            f"SLURM/munge programs not installed: {', '.join(missing)} "
            "(Debian: apt-get install slurm-wlm munge)"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    conf = ETC_SLURM / "slurm.conf"
    if conf.exists() and not conf.is_symlink():
        return f"{conf} is a real SLURM configuration; the test cluster will not replace it"
    if conf.is_symlink() and _controller_answers():
        pids = Path(os.readlink(conf)).parent.parent / "run" / PIDS_FILE
        started = pids.read_text().split() if pids.is_file() else []
        return (
            f"a SLURM controller already answers for {conf} -> {os.readlink(conf)}"
            + (f" (daemons started by this harness: {' '.join(started)})" if started else "")
        )
    return None


def _controller_answers() -> bool:
    """True when ``scontrol ping`` (default config) reaches a live slurmctld."""
    result = subprocess.run(
        [_which("scontrol") or "scontrol", "ping"],
        capture_output=True,
        text=True,
        timeout=20,
        env=client_env(),
        check=False,
    )
    return result.returncode == 0 and " is UP" in result.stdout


def client_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for SLURM clients and snakemake: default config path, sbin on PATH."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_")):
            del env[name]
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":" + SBIN_PATH
    return env


def _free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class _ReplacedLink:
    """A path under /etc/slurm that was replaced by a symlink, and what was there before."""

    path: Path
    previous_target: str | None  # the old symlink's target; None: the path did not exist

    def restore(self) -> None:
        """Remove our symlink and put the previous one back."""
        if self.path.is_symlink():
            self.path.unlink()
        if self.previous_target is not None:
            self.path.symlink_to(self.previous_target)


@dataclass
class SlurmCluster:
    """A running one-node cluster: where its files are and the daemons it started."""

    state_dir: Path
    munge_dir: Path
    node_name: str
    cpus: int
    real_memory_mb: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    replaced_links: list[_ReplacedLink] = field(default_factory=list)
    created_etc_slurm: bool = False

    @property
    def log_dir(self) -> Path:
        """Daemon logs: slurmctld.log, slurmd.log, munged.log and their stdout/stderr."""
        return self.state_dir / "log"

    def run(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run a SLURM client command (``"squeue", "-h"``) against this cluster; its stdout."""
        result = subprocess.run(
            [_which(args[0]) or args[0], *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=client_env(),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    def log_tail(self, n_lines: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*")):
            lines = log.read_text(errors="replace").splitlines()[-n_lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _write_munge_key(munge_dir: Path, munge_uid: int, munge_gid: int) -> Path:
    """A fresh 1024-bit munge key owned by munge, mode 0600."""
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(128))
    os.chown(key, munge_uid, munge_gid)
    key.chmod(0o600)
    return key


def _slurm_conf(cluster: SlurmCluster, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf text: no accounting DB, no cgroups, one node with one fake GPU."""
    s = cluster.state_dir
    return f"""\
# one-node test cluster written by tests/cluster/slurm_cluster.py
ClusterName=cryovaetest
SlurmctldHost={cluster.node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={cluster.munge_dir / "munge.socket"}
StateSaveLocation={s / "state"}
SlurmdSpoolDir={s / "spool"}
SlurmctldPidFile={s / "run" / "slurmctld.pid"}
SlurmdPidFile={s / "run" / "slurmd.pid"}
SlurmctldLogFile={cluster.log_dir / "slurmctld.log"}
SlurmdLogFile={cluster.log_dir / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups (containers): track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# no slurmdbd: sacct does not work, the snakemake plugin polls with squeue
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge={MIN_JOB_AGE_S}
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
GresTypes=gpu
NodeName={cluster.node_name} NodeAddr=127.0.0.1 CPUs={cluster.cpus} \
RealMemory={cluster.real_memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes={cluster.node_name} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={cluster.node_name} Default=NO MaxTime=INFINITE State=UP
"""


def _detect_node() -> tuple[str, int, int]:
    """(short host name, CPUs, memory in MB the node offers: 80 % of what slurmd sees)."""
    fields = dict(
        item.split("=", 1)
        for item in subprocess.run(
            [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, check=True
        ).stdout.split()
        if "=" in item
    )
    return fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"]) * 8 // 10


def _link_into_etc(cluster: SlurmCluster, name: str) -> None:
    """Symlink ``state_dir/etc/name`` to /etc/slurm/name, remembering what was there."""
    if not ETC_SLURM.exists():
        ETC_SLURM.mkdir(parents=True)
        cluster.created_etc_slurm = True
    target = ETC_SLURM / name
    if target.exists() and not target.is_symlink():
        raise RuntimeError(f"{target} is a real file; refusing to replace it")
    previous = None
    if target.is_symlink():  # a link to a live config is put back; a dangling one is dropped
        previous = os.readlink(target) if target.exists() else None
        target.unlink()
    cluster.replaced_links.append(_ReplacedLink(target, previous))
    target.symlink_to(cluster.state_dir / "etc" / name)


def _spawn(cluster: SlurmCluster, name: str, argv: list[str], user: str | None = None) -> None:
    """Start a daemon in the foreground, in its own session, output to log/<name>.out."""
    out = open(cluster.log_dir / f"{name}.out", "wb")  # noqa: SIM115 (the daemon owns it)
    try:
        cluster.processes[name] = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=client_env(),
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    finally:
        out.close()
    with open(cluster.state_dir / "run" / PIDS_FILE, "a") as pids:
        pids.write(f"{name}={cluster.processes[name].pid}\n")


def _wait_until(predicate, what: str, cluster: SlurmCluster, timeout_s: float) -> None:
    """Poll ``predicate`` every 0.2 s; fail with the daemon logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}\n"
                    + cluster.log_tail()
                )
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"no {what} after {timeout_s:.0f} s\n" + cluster.log_tail())


def _start_munged(cluster: SlurmCluster) -> None:
    """munged as user munge, key and socket in the private munge folder."""
    munge = pwd.getpwnam("munge")
    os.chown(cluster.munge_dir, munge.pw_uid, munge.pw_gid)
    cluster.munge_dir.chmod(0o755)  # clients need execute permission on the socket folder
    key = _write_munge_key(cluster.munge_dir, munge.pw_uid, munge.pw_gid)
    m = cluster.munge_dir
    _spawn(
        cluster,
        "munged",
        [
            _which("munged") or "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={m / 'munge.socket'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        ],
        user="munge",
    )
    _wait_until(
        lambda: (m / "munge.socket").is_socket(), "munge socket", cluster, START_TIMEOUT_S
    )


def _node_ready(cluster: SlurmCluster) -> bool:
    """True when sinfo reports the node idle (or already busy)."""
    result = subprocess.run(
        [_which("sinfo") or "sinfo", "-h", "-N", "-o", "%t"],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=20,
        check=False,
    )
    states = result.stdout.split()
    return result.returncode == 0 and bool(states) and all(
        s.rstrip("*") in ("idle", "mix", "alloc") for s in states
    )


def start_cluster(state_dir: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with everything under ``state_dir``; wait for idle.

    On any failure the daemons already started are stopped before the error propagates.
    """
    node_name, cpus, real_memory_mb = _detect_node()
    cluster = SlurmCluster(
        state_dir=state_dir,
        munge_dir=Path(tempfile.mkdtemp(prefix="cryovae-munge-", dir="/tmp")),
        node_name=node_name,
        cpus=cpus,
        real_memory_mb=real_memory_mb,
    )
    try:
        for sub in ("etc", "run", "log", "state", "spool"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        _start_munged(cluster)
        conf = _slurm_conf(cluster, _free_tcp_port(), _free_tcp_port())
        (state_dir / "etc" / "slurm.conf").write_text(conf)
        (state_dir / "etc" / "gres.conf").write_text(
            f"NodeName={node_name} Name=gpu File=/dev/null\n"
        )
        _link_into_etc(cluster, "slurm.conf")
        _link_into_etc(cluster, "gres.conf")
        _spawn(cluster, "slurmctld", [_which("slurmctld") or "slurmctld", "-D"])
        _spawn(cluster, "slurmd", [_which("slurmd") or "slurmd", "-D"])
        _wait_until(lambda: _node_ready(cluster), "idle node", cluster, START_TIMEOUT_S)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _cancel_all_jobs(cluster: SlurmCluster) -> None:
    """scancel every job of this (private) cluster and wait briefly until none is left."""
    ctld = cluster.processes.get("slurmctld")
    if ctld is None or ctld.poll() is not None:
        return
    # a controller that does not answer any more is stopped below all the same
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        cluster.run("scancel", "--full", f"--user={pwd.getpwuid(os.geteuid()).pw_name}")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and cluster.run("squeue", "-h", "-t", "PD,R,CG").strip():
            time.sleep(0.2)


def _stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel jobs, stop the daemons this harness started (reverse order), undo /etc changes."""
    try:
        _cancel_all_jobs(cluster)
    finally:
        for name in reversed(list(cluster.processes)):
            _stop_process(cluster.processes[name])
        for link in reversed(cluster.replaced_links):
            link.restore()
        cluster.replaced_links.clear()
        if cluster.created_etc_slurm and not any(ETC_SLURM.iterdir()):
            ETC_SLURM.rmdir()
        if cluster.munge_dir.exists():
            log = cluster.munge_dir / "munged.log"
            if log.exists():
                shutil.copy(log, cluster.log_dir / "munged.log")
            shutil.rmtree(cluster.munge_dir)


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a CI timeout, ``kill``) becomes KeyboardInterrupt, so that cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def running_cluster(state_dir: Path) -> Iterator[SlurmCluster]:
    """``start_cluster`` ... ``stop_cluster`` around the body, even when it raises.

    While the cluster runs, SIGTERM to this (main) thread raises KeyboardInterrupt, so
    the daemons are stopped when the test run is terminated too (not when it is SIGKILLed:
    then ``skip_reason`` reports the cluster left running, with its PIDs).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm) if in_main_thread else None
    try:
        cluster = start_cluster(state_dir)
        try:
            yield cluster
        finally:
            stop_cluster(cluster)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster for the tests of one module; skips where none can run."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    """``python tests/cluster/slurm_cluster.py [STATE_DIR]``: a cluster until Ctrl-C / SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("state_dir", nargs="?", type=Path, help="default: a new folder in /tmp")
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"cannot start a test cluster: {reason}")
        return 2
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="cryovae-slurm-"))
    with running_cluster(state_dir) as cluster:
        print(cluster.run("sinfo", "-N", "-o", "%N %P %t %c %m %G"), end="")
        print(f"state and logs in {state_dir}; Ctrl-C stops every daemon", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in cluster.processes.values()):
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
