"""Where a rank learns its place (aikd.rendezvous): Slurm's task variables, host lists, address checks.

The environments below are those the two-node test cluster gave (tests/slurm_nodes.py, Slurm 22.05):
a task of ``srun`` in a ``-N 2 --ntasks-per-node=1`` job, and that job's batch script. The same mapping
runs on the real cluster in tests/test_slurm_nodes.py.
"""

from __future__ import annotations

import pytest

from aikd.errors import AikdError, ConfigError
from aikd.rendezvous import (
    adopt_slurm_ranks,
    check_addresses,
    collective_timeout_s,
    first_host,
    ranks_from_slurm,
    tasks_per_node,
)

BATCH_STEP = {"SLURM_JOB_ID": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
              "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
SRUN_TASK = {**BATCH_STEP, "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
             "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def test_a_task_of_srun_across_two_nodes_gets_torchruns_variables():
    ranks = ranks_from_slurm(SRUN_TASK)
    assert {k: v for k, v in ranks.items() if k != "MASTER_PORT"} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "n1"}
    assert 20000 <= int(ranks["MASTER_PORT"]) < 40000
    assert ranks_from_slurm({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_NODEID": "0"})["MASTER_PORT"] == \
        ranks["MASTER_PORT"]  # every rank of the step meets at the same port
    assert ranks_from_slurm({**SRUN_TASK, "SLURM_JOB_ID": "3"})["MASTER_PORT"] != ranks["MASTER_PORT"]


def test_the_batch_script_of_a_multi_task_job_is_one_process_not_rank_zero():
    assert ranks_from_slurm(BATCH_STEP) == {}  # SLURM_NTASKS=2 and SLURM_PROCID=0, but no step of srun
    env = dict(BATCH_STEP)
    assert adopt_slurm_ranks(env) == {} and env == BATCH_STEP


def test_torchruns_own_variables_win_and_a_one_task_step_is_no_distributed_run():
    assert ranks_from_slurm({**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "4"}) == {}
    assert ranks_from_slurm({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    env = dict(SRUN_TASK)
    adopt_slurm_ranks(env)
    assert env["RANK"] == "1" and env["SLURM_PROCID"] == "1"


def test_a_step_on_one_node_meets_on_loopback_with_every_rank_local():
    one_node = {**SRUN_TASK, "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "gpu07",
                "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_LOCALID": "3",
                "SLURM_PROCID": "3", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}
    ranks = ranks_from_slurm(one_node)
    assert (ranks["MASTER_ADDR"], ranks["LOCAL_WORLD_SIZE"], ranks["LOCAL_RANK"]) == ("127.0.0.1", "4", "3")
    other_task = ranks_from_slurm({**one_node, "SLURM_ARRAY_TASK_ID": "4"})
    assert other_task["MASTER_PORT"] != ranks["MASTER_PORT"]  # two arrays' tasks on one node do not collide


@pytest.mark.parametrize(("nodelist", "first"), [
    ("n[1-2]", "n1"), ("node7", "node7"), ("gpu[007-009,012],cpu1", "gpu007"), ("a,b", "a"),
    ("rack[1-2]-node[01-04]", "rack1-node01"), ("dgx[3,5]", "dgx3"),
])
def test_the_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node_are_read_in_node_order():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("1(x2)") == [1, 1]
    with pytest.raises(AikdError, match="tasks per node 'x' cannot be read"):
        tasks_per_node("x")
    uneven = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "0"}
    assert ranks_from_slurm(uneven)["LOCAL_WORLD_SIZE"] == "2"


ACROSS = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "1"}


def test_a_master_address_that_does_not_resolve_is_named_at_once():
    with pytest.raises(AikdError, match=r"MASTER_ADDR 'no-such-node\.invalid' does not resolve.*set MASTER_ADDR"):
        check_addresses("gloo", {**ACROSS, "MASTER_ADDR": "no-such-node.invalid", "GLOO_SOCKET_IFNAME": "eth0"})


def test_a_loopback_master_address_is_refused_across_nodes_but_fine_on_one():
    with pytest.raises(AikdError, match=r"MASTER_ADDR=127\.0\.0\.1 is a loopback address.*spans several nodes"):
        check_addresses("nccl", {**ACROSS, "MASTER_ADDR": "127.0.0.1"})
    check_addresses("gloo", {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})


def test_gloo_across_nodes_refuses_a_host_name_on_loopback_unless_the_interface_is_named(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "localhost")  # a host whose name maps to 127.0.x.x
    env = {**ACROSS, "MASTER_ADDR": "10.200.0.11"}  # an address literal: resolved, never contacted
    with pytest.raises(AikdError, match=r"'localhost' resolves to 127\.0\.0\.1.*Set GLOO_SOCKET_IFNAME"):
        check_addresses("gloo", env)
    check_addresses("gloo", {**env, "GLOO_SOCKET_IFNAME": "eth0"})
    check_addresses("nccl", env)  # NCCL picks a non-loopback interface by itself


def test_the_collective_timeout_has_a_default_and_refuses_nonsense():
    assert collective_timeout_s({}) == 600
    assert collective_timeout_s({"AIKD_DIST_TIMEOUT": "30"}) == 30
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match=f"AIKD_DIST_TIMEOUT='{bad}'"):
            collective_timeout_s({"AIKD_DIST_TIMEOUT": bad})
