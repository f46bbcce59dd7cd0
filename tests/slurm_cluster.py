"""A real single-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd, no accounting.

Everything lives under one state folder (made with mkdtemp and opened to 0755: munged refuses a socket
below a 0700 folder such as pytest's tmp_path). Free ports picked at start, no cgroups (proctrack/linuxproc,
task/none), the node named localhost. :meth:`SlurmCluster.stop` ends every daemon it started, by pid.
tests/slurm_nodes.py builds its two-node cluster on this class: only the nodes' lines and how slurmd starts
differ.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")


def available() -> str | None:
    """None when the cluster can start here, else why not (a missing program, not root)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd " \
               f"slurm-client munge"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One controller and one node on localhost, with 2 CPUs (the machine's cores, at most)."""

    prefix = "aikd-slurm-"

    def __init__(self, cpus: int | None = None) -> None:
        self.state = Path(tempfile.mkdtemp(prefix=self.prefix))
        os.chmod(self.state, 0o755)
        self.cpus = cpus or min(2, os.cpu_count() or 1)
        self.conf = self.state / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- configuration

    def node_lines(self) -> list[str]:
        """Where the controller and the nodes are, and the partition over them."""
        s = self.state
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
        return ["SlurmctldHost=localhost", f"SlurmdSpoolDir={s}/spool", f"SlurmdPidFile={s}/slurmd.pid",
                f"SlurmdLogFile={s}/log/slurmd.log",
                f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"]

    def _write_files(self) -> None:
        s = self.state
        for folder in ("munge", "spool", "ctld", "log"):
            (s / folder).mkdir(exist_ok=True)
            os.chmod(s / folder, 0o755)
        key = s / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self.conf.write_text("\n".join([
            "ClusterName=aikdtest", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={s}/munge/munge.sock",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", f"StateSaveLocation={s}/ctld",
            f"SlurmctldPidFile={s}/slurmctld.pid", f"SlurmctldLogFile={s}/log/slurmctld.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerParameters=sched_interval=1",
            "MpiDefault=none", "ReturnToService=2", "KillWait=5", "MinJobAge=300", "MailProg=/bin/true",
            *self.node_lines(), ""]))

    # -- life cycle

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Start every daemon and wait until every node is idle; a failed start stops what it started."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SlurmCluster:
        self._write_files()
        s = self.state
        subprocess.run([program("munged"), "-S", f"{s}/munge/munge.sock", f"--key-file={s}/munge/munge.key",
                        f"--log-file={s}/log/munged.log", f"--pid-file={s}/munge/munged.pid",
                        f"--seed-file={s}/munge/munged.seed"], check=True, env=self.env)
        self.pids["munged"] = self._read_pid(s / "munge" / "munged.pid")
        subprocess.run([program("slurmctld"), "-i"], check=True, env=self.env)
        self.pids["slurmctld"] = self._read_pid(s / "slurmctld.pid")
        self.start_nodes()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.split() and set(state.stdout.split()) == {"idle"}:
                return self
            time.sleep(0.3)
        logs = "".join(f"{p.name}: {p.read_text(errors='replace')[-600:]}" for p in sorted((s / "log").glob("*")))
        raise RuntimeError(f"the test cluster's nodes did not become idle:\n{logs}")

    def start_nodes(self) -> None:
        subprocess.run([program("slurmd"), "-N", "localhost"], check=True, env=self.env)
        self.pids["slurmd"] = self._read_pid(self.state / "slurmd.pid")

    @staticmethod
    def _read_pid(path: Path, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):  # not there yet, or created but empty
                return int(path.read_text().split()[0])
            time.sleep(0.05)
        raise RuntimeError(f"no pid file {path}")

    def stop(self) -> None:
        """scontrol shutdown (controller and nodes), wait for them, then munged; by pid, SIGKILL as a last resort."""
        if "slurmctld" in self.pids:
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        daemons = [name for name in self.pids if name != "munged"]
        for name in [*daemons, "munged"]:
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            if name == "munged":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 20.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5.0)
        shutil.rmtree(self.state, ignore_errors=True)

    # -- helpers for the tests

    def queue(self) -> list[str]:
        """Job ids in the queue (pending or running)."""
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return out.stdout.split()


def _free_port() -> int:
    """A TCP port nothing listens on now: two test sessions (or CI beside a developer) never share a cluster."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    return False
