"""A real two-node Slurm cluster on one machine, each node in its own network, hostname and mount namespace.

The recipe of ../shared/SLURM.md ("Two nodes on one machine"): a bridge in the root namespace with a private
/24 that no interface here uses yet (the controller at .1), and per node a network namespace joined to it by
a veth pair (node K at .1K), in which slurmd runs under ``unshare --uts --mount`` with its own hostname and a
hosts file bind-mounted over /etc/hosts (private to the node: the machine's file is untouched). munged and
slurmctld run in the root namespace (tests/slurm_cluster.py's files and life cycle). Traffic goes only to the
addresses made here. :meth:`TwoNodeCluster.stop` stops every daemon by pid, then removes the namespaces, the
veths and the bridge; :func:`available` says why the cluster cannot start where it cannot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess

import slurm_cluster
from slurm_cluster import SlurmCluster, program, wait_gone

NODES = ("n1", "n2")


def available() -> str | None:
    """None when the two-node cluster can start here, else why not."""
    reason = slurm_cluster.available()
    if reason:
        return reason
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (iproute2, util-linux): the nodes need network namespaces"
    probe = f"aikdprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be made here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.200.X.0/24 that no interface of this machine has an address in (another test session's, say)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for x in range(0, 256):
        net = ipaddress.ip_network(f"10.200.{x}.0/24")
        if f"10.200.{x}." not in used:
            return net
    raise RuntimeError("no free 10.200.X.0/24 for the test cluster's bridge")


class TwoNodeCluster(SlurmCluster):
    """A controller in the root namespace and nodes n1, n2 (one CPU each), each in its own namespaces."""

    prefix = "aikd-slurm2-"

    def __init__(self) -> None:
        super().__init__(cpus=1)
        tag = secrets.token_hex(3)
        self.bridge = f"aikdbr{tag}"
        self.netns = {node: f"aikd-{node}-{tag}" for node in NODES}
        self.veths = {node: f"aikd{node}{tag}" for node in NODES}
        self.subnet = _free_subnet()
        base = self.subnet.network_address
        self.ctl_addr = str(base + 1)
        self.addr = {node: str(base + 10 + k) for k, node in enumerate(NODES, start=1)}
        self.ctl_host = socket.gethostname()
        self.made: list[tuple[str, ...]] = []  # the ip commands that undo what start made, in reverse order

    def node_lines(self) -> list[str]:
        s = self.state
        return [f"SlurmctldHost={self.ctl_host}({self.ctl_addr})", f"SlurmdSpoolDir={s}/spool/%n",
                f"SlurmdPidFile={s}/slurmd-%n.pid", f"SlurmdLogFile={s}/log/slurmd-%n.log",
                *(f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs=1 State=UNKNOWN" for n in NODES),
                f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP"]

    def _ip(self, *args: str, undo: tuple[str, ...] | None = None) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
        if undo:
            self.made.append(undo)

    def _network(self) -> None:
        prefix = self.subnet.prefixlen
        self._ip("link", "add", self.bridge, "type", "bridge", undo=("link", "del", self.bridge))
        self._ip("addr", "add", f"{self.ctl_addr}/{prefix}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for node in NODES:
            ns, veth = self.netns[node], self.veths[node]
            self._ip("netns", "add", ns, undo=("netns", "del", ns))
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                     undo=("link", "del", veth))
            self._ip("link", "set", veth, "master", self.bridge)
            self._ip("link", "set", veth, "up")
            self._ip("-n", ns, "addr", "add", f"{self.addr[node]}/{prefix}", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def start_nodes(self) -> None:
        hosts = self.state / "hosts"
        hosts.write_text("\n".join(["127.0.0.1 localhost", f"{self.ctl_addr} {self.ctl_host}",
                                    *(f"{self.addr[n]} {n}" for n in NODES), ""]))
        for node in NODES:
            (self.state / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._network()
        for node in NODES:
            inside = f"mount --bind {hosts} /etc/hosts && hostname {node} && " \
                     f"exec {program('slurmd')} -D -N {node} -f {self.conf}"
            log = open(self.state / "log" / f"slurmd-{node}.out", "wb")  # noqa: SIM115 (the daemon's, kept open)
            # nsenter, not 'ip netns exec': that one mounts a fresh /sys, hiding the cgroup mounts slurmd reads.
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts",
                                     "--mount", "sh", "-c", inside], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            log.close()
            self.pids[f"slurmd-{node}"] = proc.pid  # nsenter, unshare and sh exec: this pid becomes slurmd's

    def stop(self) -> None:
        """The daemons by pid (tests/slurm_cluster.py), then what is left in the namespaces, then the network."""
        try:
            super().stop()
        finally:
            for ns in self.netns.values():
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                for pid in map(int, pids):  # a job's process left behind in a node: ours, started by our slurmd
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                    wait_gone(pid, 5.0)
            for undo in reversed(self.made):
                subprocess.run(["ip", *undo], capture_output=True)
            self.made = []
