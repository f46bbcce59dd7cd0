"""Where a rank of a distributed run learns its place: torchrun's variables, or Slurm's for a task of srun.

A distributed run joins its process group through torch's ``env://`` rendezvous: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process. torchrun sets them. Under Slurm, ``srun`` starts
one task per rank on every node of the job (no torchrun agent in between, so ``srun --kill-on-bad-exit``
sees each rank's exit and a scancel's signal reaches the trainer itself), and :func:`ranks_from_slurm`
derives the same variables from the task's: RANK from SLURM_PROCID, WORLD_SIZE from SLURM_STEP_NUM_TASKS,
LOCAL_RANK from SLURM_LOCALID, MASTER_ADDR from the first node of the step, MASTER_PORT from the job id.

Only a task of an srun step counts as a rank. A job's batch script (and an salloc shell) has SLURM_NTASKS
and SLURM_PROCID=0 as well, but no SLURM_STEP_* variables (measured on Slurm 22.05 with the two-node test
cluster, tests/slurm_nodes.py): a plain ``aikd train`` there is one process, not rank 0 of several.
torchrun's own variables, where present, win.

:func:`check_addresses` turns the names into addresses before the group is joined, so that a name that
does not resolve, or one that resolves to a loopback address in a run across nodes, stops the run at once
with an error that says what to set, instead of gloo's silent fallback to 127.0.0.1 and a wait for a peer
that never comes. Kept free of torch so that the command line can read a rank before the heavy imports.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from collections.abc import Mapping, MutableMapping

from aikd.errors import AikdError, ConfigError

TIMEOUT_VARIABLE = "AIKD_DIST_TIMEOUT"  # seconds a collective (or the rendezvous) waits for the other ranks
DEFAULT_TIMEOUT_S = 600


def ranks_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task of an srun step of several tasks, on one node or several; {} otherwise."""
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    tasks = int(env["SLURM_STEP_NUM_TASKS"])
    if tasks <= 1:
        return {}
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(tasks)))
    node = int(env.get("SLURM_NODEID", "0"))
    local_world = per_node[node] if node < len(per_node) else tasks
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    one_node = int(env.get("SLURM_STEP_NUM_NODES", "1")) <= 1
    job = int(env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0")))
    task = int(env.get("SLURM_ARRAY_TASK_ID", "0"))
    step = int(env.get("SLURM_STEP_ID", "0"))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(local_world),
            "MASTER_ADDR": "127.0.0.1" if one_node else first_host(nodes),
            "MASTER_PORT": str(20000 + (job * 97 + task + step * 7919) % 20000)}


def adopt_slurm_ranks(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set torchrun's variables from Slurm's in ``env`` (the process's environment) where srun started it."""
    env = os.environ if env is None else env
    ranks = ranks_from_slurm(env)
    env.update(ranks)
    return ranks


def leave_group(together: bool) -> None:
    """A rank started by torchrun or srun leaves its process group while Python still runs, so that no rank
    exits with gloo's threads alive.

    A process that exits with the group still joined lets the C++ runtime destroy gloo's threads at exit, which
    aborts the rank now and then ("terminate called without an active exception", SIGABRT: seen on 2-rank CPU
    runs under load). ``together``: every rank is known to reach this point (the command succeeded, or the
    ranks agreed on a stop), so they first meet at a barrier and none tears its connections down while a peer
    still talks on them. After a failure a peer may be gone: no barrier, which could wait for it forever.

    Only a process that built a run can have joined one; the others never imported torch.distributed, and
    this does not import it for them (nor torch).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``n[1-2]`` -> n1, ``gpu[007-009,012],cpu1`` -> gpu007,
    ``rack[1-2]-node[01-04]`` -> rack1-node01 (zero padding kept)."""
    head = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not head:
        raise AikdError(f"Slurm's node list '{nodelist}' names no host; set MASTER_ADDR to the first node's "
                        f"address.")
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", head.group(0))


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's tasks per node (``2(x3),1`` -> [2, 2, 2, 1]), the nodes in the order of SLURM_NODEID."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not found:
            raise AikdError(f"Slurm's tasks per node '{spec}' cannot be read.")
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts


def collective_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """How long a rank waits in the rendezvous or a collective for the others: AIKD_DIST_TIMEOUT seconds
    (default 600). A rank that hangs without exiting (a stuck file system, a stopped process, a lost node)
    fails the others after this long; a rank that exits is noticed by srun -K or torchrun at once."""
    value = (os.environ if env is None else env).get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE}={value!r}: give the seconds a rank waits for the others, a number "
                          f"above 0 (default {DEFAULT_TIMEOUT_S}).")
    return seconds


def spans_nodes(env: Mapping[str, str]) -> bool:
    """Whether the run's ranks sit on more than one node (fewer ranks here than in the run)."""
    world = int(env.get("WORLD_SIZE", "1"))
    return int(env.get("LOCAL_WORLD_SIZE", world)) < world


def check_addresses(backend: str, env: Mapping[str, str] | None = None) -> None:
    """Check that MASTER_ADDR resolves to an address, and refuse what would make the rendezvous hang.

    A run across nodes needs a master address the other nodes reach, so not a loopback one; with gloo it also
    needs this host's name to resolve to an address the others reach, since gloo listens there (and falls
    back to 127.0.0.1, silently, where it does not) unless GLOO_SOCKET_IFNAME names the interface.
    """
    env = os.environ if env is None else env
    host = env.get("MASTER_ADDR")
    if not host:
        return  # not an env:// rendezvous (torchrun's c10d agent keeps its own)
    across = spans_nodes(env)
    address = resolve(host, "MASTER_ADDR", "the address of the node of rank 0")
    if across and is_loopback(address):
        raise AikdError(f"MASTER_ADDR={host} is a loopback address ({address}), but this run spans several nodes "
                        f"({env.get('WORLD_SIZE')} ranks, {env.get('LOCAL_WORLD_SIZE')} here): set MASTER_ADDR "
                        f"to the address of rank 0's node that the other nodes reach.")
    if across and backend == "gloo" and not env.get("GLOO_SOCKET_IFNAME"):
        name = socket.gethostname()
        own = resolve(name, "this host's name", "the network interface the nodes share",
                      fix="set GLOO_SOCKET_IFNAME to the network interface the nodes share (eth0, ib0)")
        if is_loopback(own):
            raise AikdError(f"This host's name '{name}' resolves to {own}, a loopback address, and gloo would listen "
                            f"there: the other nodes could not reach this rank. Set GLOO_SOCKET_IFNAME to the "
                            f"network interface the nodes share (eth0, ib0), or map '{name}' to that interface's "
                            f"address in /etc/hosts.")


def resolve(host: str, what: str, meaning: str, fix: str | None = None) -> str:
    """``host``'s first address (IPv4 first), or an error naming ``what`` could not be resolved."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        advice = fix or f"set {what} to {meaning}"
        raise AikdError(f"{what} '{host}' does not resolve to an address ({err}); {advice}. A distributed run "
                        f"cannot meet without it.") from None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    return str(found[0][4][0])


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
