"""A real, throw-away SLURM cluster on this one host, for the tests of slurm/.

munged, slurmctld and one slurmd per emulated node (c1..cN, all sharing this host's CPUs) run in
the foreground as children of the test process, with their configuration, state and logs in one
folder. Clients find the cluster through SLURM_CONF, so nothing under /etc/slurm is touched.
Needs root and Debian's munge, slurmctld, slurmd and slurm-client packages (.ci/run installs them).

The node names do not resolve; every node's NodeAddr is 127.0.0.1, which is what the templates
use as the rendezvous host.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = "munge slurmctld slurmd slurm-client"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
CONTROLLER_PORT = 16817
FIRST_NODE_PORT = 16900
# How long a requeued job waits before it may start again, and how long credentials live.
CREDENTIAL_SECONDS = 10
MUNGE_SOCKET_DIR = Path("/run/munge")


class ClusterError(RuntimeError):
    pass


class LocalSlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, gpus_per_node: int = 0):
        self.root = Path(root)
        self.nodes = [f"c{i}" for i in range(1, nodes + 1)]
        self.gpus_per_node = gpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.daemons: list[tuple[str, subprocess.Popen]] = []

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, ...) needs to reach this cluster; jobs inherit it."""
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ start and stop
    def start(self, ready_timeout: float = 60) -> LocalSlurmCluster:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            raise ClusterError(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install {PACKAGES}")
        if os.geteuid() != 0:
            raise ClusterError("a local SLURM cluster needs root (slurmd runs jobs as their submitting user)")
        for folder in ("etc", "log", "run", "state", *(f"spool/{n}" for n in self.nodes)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._wait_for(lambda: "is UP" in self.client("scontrol", "ping", check=False).stdout, 20, "slurmctld ping")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._nodes_idle, ready_timeout, "every node idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, then end every daemon this object started (newest first), whatever
        failed before or fails on the way."""
        try:
            self._cancel_all_jobs()
        finally:
            self._end_daemons()

    def _cancel_all_jobs(self, timeout: float = 60) -> None:
        if not any(name == "slurmctld" and p.poll() is None for name, p in self.daemons):
            return
        deadline = time.monotonic() + timeout
        try:
            self.client("scancel", "--full", "--user", "root", check=False, timeout=30)
            while self.client("squeue", "-h", check=False, timeout=30).stdout.strip():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.25)
        except subprocess.TimeoutExpired:
            pass  # a controller that does not answer: ending the daemons is all that is left to do

    def _end_daemons(self, grace: float = 20) -> None:
        for _name, process in reversed(self.daemons):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for _name, process in reversed(self.daemons):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass  # unkillable (stuck in the kernel); nothing more to do from here
        self.daemons.clear()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.stdout", "ab")  # noqa: SIM115 - the daemon owns it until it exits
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        self.daemons.append((name, process))
        time.sleep(0.2)
        if process.poll() is not None:
            raise ClusterError(f"{name} exited at once with code {process.returncode}:\n{self.logs()}")
        return process

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # a munged already serves this host; it is not ours to stop
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c"], check=True)
        self._spawn("munged", ["runuser", "-u", "munge", "--", "munged", "--foreground", "--force"])
        self._wait_for(self._munge_works, 10, "a munge credential round trip")

    @staticmethod
    def _munge_works() -> bool:
        encode = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if encode.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True, timeout=10).returncode == 0

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2 // len(self.nodes)
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            "ClusterName=fmdist-tests",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={CONTROLLER_PORT}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=cred_expire={CREDENTIAL_SECONDS}",
            "MpiDefault=none",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for the whole test module
            "JobRequeue=1",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.log_dir / 'jobcomp.txt'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "MailProg=/bin/true",
        ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
        for index, node in enumerate(self.nodes):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={FIRST_NODE_PORT + index} "
                f"CPUs={cpus} RealMemory={memory_mb}{gres} State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        # a second partition, to see that jobs submitted by a job land where it was sent
        lines.append("PartitionName=second Nodes=ALL Default=NO MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        if self.gpus_per_node:
            # GPU GRES must name device files; clones of /dev/null stand in for them.
            devices = self.root / "fake-gpus"
            devices.mkdir(exist_ok=True)
            for i in range(self.gpus_per_node):
                if not (devices / f"gpu{i}").exists():
                    os.mknod(devices / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
            last = self.gpus_per_node - 1
            (self.conf.parent / "gres.conf").write_text(f"Name=gpu File={devices}/gpu[0-{last}]\n")

    def _nodes_idle(self) -> bool:
        states = self.client("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        idle = {line.split()[0] for line in states if line.strip() and line.split()[1] in ("idle", "mix", "alloc")}
        return idle == set(self.nodes)

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for name, process in self.daemons:
                if process.poll() is not None:
                    raise ClusterError(f"{name} exited with code {process.returncode}:\n{self.logs()}")
            time.sleep(0.25)
        raise ClusterError(f"waited {timeout:.0f} s for {what}:\n{self.logs()}")

    def logs(self, lines: int = 25) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients
    def client(self, *command: str, check: bool = True, env: dict | None = None, cwd=None, timeout: float = 60):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**(env or os.environ), **self.env}
        )
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict; finished jobs stay visible for MinJobAge (an hour here)."""
        result = self.client("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for record in result.stdout.strip().splitlines()[:1]:
            for match in re.finditer(r"(\w+)=(\S*)", record):
                fields.setdefault(match.group(1), match.group(2))
        if "JobState" not in fields:
            raise ClusterError(f"slurmctld knows no job {job_id}: {result.stderr.strip() or result.stdout.strip()}")
        return fields

    def wait_until_gone(self, job_ids: list[str], timeout: float) -> None:
        """Until none of these jobs (or array elements) is pending or running."""

        def gone() -> bool:
            return not self.client("squeue", "-h", "-j", ",".join(job_ids), check=False).stdout.strip()

        try:
            self._wait_for(gone, timeout, f"jobs {job_ids} to end")
        except ClusterError:
            self.client("scancel", *job_ids, check=False)
            raise
