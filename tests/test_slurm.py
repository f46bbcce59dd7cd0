"""aikd sweep --launcher slurm: the plan and options here, the jobs on a real single-node Slurm cluster.

The cluster (tests/slurm_cluster.py: Debian's munged, slurmctld, slurmd) starts once for the module and
stops by pid at its end; the cluster tests skip where those packages are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from aikd.config import file_sha256
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.slurm import launch_lines, plan_units, read_options
from aikd.engine.sweep import sweep_tasks
from aikd.errors import ConfigError
from aikd.run_files import teacher_path
from aikd.shipped import CONFIG_ROOT

TINY = ["train.epochs=2", "data.train_limit=300", "data.test_limit=200", "data.num_workers=0"]
PROXY = CONFIG_ROOT / "fmnist_proxy"
AIKD = [sys.executable, "-m", "aikd"]


# ---------------------------------------------------------------------------
# Without a cluster


def test_options_come_from_a_yaml_section_and_the_command_line_wins(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("slurm:\n  partition: gpu\n  time: '4:00:00'\n  gpus_per_job: 4\n  array_parallelism: 8\n"
                    "  sbatch_args: ['--account=lab']\n")
    options = read_options(path, {"partition": "short", "mem": None})
    assert (options.partition, options.time, options.gpus_per_job, options.tasks) == ("short", "4:00:00", 4, 4)
    assert options.directives() == ["--nodes=1", "--ntasks=4", "--cpus-per-task=1", "--partition=short",
                                    "--time=4:00:00", "--gpus-per-node=4", "--account=lab"]


@pytest.mark.parametrize(("given", "message"), [
    ({"partiton": "gpu"}, r"Unknown Slurm option 'partiton'.*Did you mean 'partition'"),
    ({"cpus_per_task": 0}, r"'cpus_per_task' must be a whole number of at least 1, got 0"),
    ({"gpus_per_job": 2, "tasks_per_job": 3}, r"3 tasks for 2 GPUs"),
    ({"array_parallelism": "4"}, r"'array_parallelism' must be a whole number"),
])
def test_bad_options_are_named(given, message):
    with pytest.raises(ConfigError, match=message):
        read_options(None, given)


def test_options_by_node_size_a_multi_node_job():
    options = read_options(None, {"nodes": 2, "gpus_per_node": 4, "time": "1:00:00"})
    assert options.tasks == 8
    assert options.directives() == ["--nodes=2", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=1:00:00",
                                    "--gpus-per-node=4"]
    cpu = read_options(None, {"nodes": 3, "tasks_per_node": 2})
    assert (cpu.tasks, cpu.directives()[:2]) == (6, ["--nodes=3", "--ntasks-per-node=2"])
    assert read_options(None, {"nodes": 2}).tasks == 2  # one rank per node without GPUs or tasks_per_node


def test_options_by_node_come_from_the_yaml_file_too(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text("slurm:\n  nodes: 2\n  gpus_per_node: 8\n")
    assert read_options(path, {"nodes": 4}).tasks == 32  # the command line wins


@pytest.mark.parametrize(("given", "message"), [
    ({"nodes": 2, "gpus_per_job": 4}, r"gpus_per_job size a job on one node and nodes size it by node"),
    ({"tasks_per_job": 2, "tasks_per_node": 2}, r"tasks_per_job size a job on one node and tasks_per_node"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, r"2 tasks for 4 GPUs \(tasks_per_node, gpus_per_node\)"),
    ({"nodes": 0}, r"'nodes' must be a whole number of at least 1, got 0"),
])
def test_conflicting_or_bad_node_options_are_refused(given, message):
    with pytest.raises(ConfigError, match=message):
        read_options(None, given)


def test_a_job_of_several_ranks_fails_as_a_whole_when_one_rank_fails():
    assert launch_lines(1, "python -m aikd.engine.slurm x.json") == ["exec python -m aikd.engine.slurm x.json"]
    assert launch_lines(4, "python -m aikd.engine.slurm x.json")[-1] == \
        "srun --kill-on-bad-exit=1 python -m aikd.engine.slurm x.json"


def test_node_options_belong_to_the_slurm_launcher():
    done = subprocess.run([*AIKD, "sweep", "-c", "fmnist_proxy/ce", "-o", "x", "--nodes", "2"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--nodes applies to --launcher slurm only" in done.stderr


def test_each_phase1_model_is_one_unit_and_the_runs_that_need_it_wait_for_it(tmp_path):
    configs = [PROXY / "ce.yaml", PROXY / "aikd_no_adv.yaml", PROXY / "aikd_only_guide.yaml", PROXY / "pskd.yaml"]
    units, finished = plan_units(sweep_tasks(configs, [0, 1], tmp_path, TINY))
    phase1 = [u for u in units if u.kind == "phase1"]
    runs = [u for u in units if u.kind == "run"]
    assert [u.name for u in phase1] == ["fmnist_proxy/ce seed 0 (phase-1 model)",
                                       "fmnist_proxy/ce seed 1 (phase-1 model)"]
    assert all(not u.phase1_only for u in phase1)  # the Baseline row trains its phase-1 model itself
    assert len(runs) == 6 and not any(finished.values())
    for unit in runs:
        wanted = next(p.run_dir for p in phase1 if p.seed == unit.seed)
        assert unit.needs == (None if "pskd" in unit.name else wanted), unit.name
    units, _ = plan_units(sweep_tasks([PROXY / "aikd_no_adv.yaml"], [0], tmp_path / "no_ce", TINY))
    assert [(u.kind, u.phase1_only) for u in units] == [("phase1", True), ("run", False)]  # no Baseline row


# ---------------------------------------------------------------------------
# On a real cluster


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_cluster.available()
    if reason:
        pytest.skip(reason)
    running = slurm_cluster.SlurmCluster().start()
    yield running
    running.stop()


def _aikd(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*AIKD, *args], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _numbers(run: Path) -> tuple[dict, list[dict]]:
    """A run's summary and per-epoch records without the wall-clock times."""
    summary = json.loads((run / "summary.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    teacher = teacher_path(summary, run)
    if teacher is not None:  # the teacher file also holds its wall-clock history: its hash is its own, the weights not
        assert summary["teacher_sha256"] == file_sha256(teacher)
        summary["teacher_weights"] = {k: v.tolist() for k, v in load_checkpoint(teacher).model.items()}
    untimed = {k: v for k, v in summary.items() if "time" not in k and k not in ("teacher", "teacher_sha256")}
    return untimed, [{k: v for k, v in e.items() if "time" not in k} for e in epochs]


def _sweep_args(out: Path) -> list[str]:
    return ["sweep", "-c", "fmnist_proxy/ce", "fmnist_proxy/aikd_no_adv", "--seeds", "0", "1", "-o", str(out), "-q",
            *TINY]


@pytest.mark.slow
def test_a_slurm_sweep_ends_with_the_local_sweeps_results(cluster, tmp_path):
    _aikd(cluster, *_sweep_args(tmp_path / "local"))
    done = _aikd(cluster, *_sweep_args(tmp_path / "slurm"), "--launcher", "slurm", "--wait", "--array-parallelism", "2")
    assert done.stdout.strip().endswith("4 finished")
    jobs = json.loads((tmp_path / "slurm" / "slurm" / "jobs.json").read_text())
    phase1 = {name: r for name, r in jobs.items() if r["kind"] == "phase1"}
    assert len(jobs) == 4 and len(phase1) == 2  # each phase-1 model trained once, by its own job
    script = next((tmp_path / "slurm" / "slurm" / "jobs").glob("phase1-*.sh")).read_text()
    assert "#SBATCH --array=0-1%2" in script
    students = next(p for p in (tmp_path / "slurm" / "slurm" / "jobs").glob("runs-*.sh")).read_text()
    assert "#SBATCH --dependency=afterok:" in students
    for seed in (0, 1):
        for name in ("ce", "aikd_no_adv"):
            local = tmp_path / "local" / "fmnist_proxy" / name / f"seed{seed}" / "student"
            remote = tmp_path / "slurm" / "fmnist_proxy" / name / f"seed{seed}" / "student"
            assert _numbers(remote) == _numbers(local), (name, seed)
    rows = json.loads((tmp_path / "slurm" / "sweep.json").read_text())
    assert [r["top1_err"] for r in rows] == [r["top1_err"] for r in
                                             json.loads((tmp_path / "local" / "sweep.json").read_text())]
    again = _aikd(cluster, *_sweep_args(tmp_path / "slurm"), "--launcher", "slurm")
    assert "4 of 4 runs finished, 0 queued, 0 submitted" in again.stderr


@pytest.mark.slow
def test_the_rerun_resubmits_a_cancelled_job_and_only_it(cluster, tmp_path):
    out = tmp_path / "sweep"
    _aikd(cluster, *_sweep_args(out), "--launcher", "slurm")
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    victim = "fmnist_proxy/aikd_no_adv seed 1"
    subprocess.run(["scancel", jobs[victim]["job"]], env=cluster.env, check=True)
    deadline = time.monotonic() + 600
    while cluster.queue() and time.monotonic() < deadline:
        time.sleep(2)
    status = _aikd(cluster, "sweep", "--status", str(out)).stdout
    states = {line.split("  ")[0].strip(): line for line in status.splitlines()[1:-1]}
    assert "cancelled" in states[victim] and sum("finished" in s for s in states.values()) == 3, status
    rerun = _aikd(cluster, *_sweep_args(out), "--launcher", "slurm", "--wait")
    assert "3 of 4 runs finished, 0 queued, 1 submitted (0 phase-1 models)" in rerun.stderr
    after = json.loads((out / "slurm" / "jobs.json").read_text())
    assert [n for n in jobs if after[n]["job"] != jobs[n]["job"]] == [victim]
    assert rerun.stdout.strip().endswith("4 finished")


@pytest.mark.slow
def test_a_two_task_job_trains_with_gloo_like_two_ranks_of_torchrun(cluster, tmp_path):
    args = ["-c", "fmnist_proxy/pskd", *TINY]
    _aikd(cluster, "sweep", *args[:2], "--seeds", "0", "-o", str(tmp_path / "slurm"), *args[2:], "-q",
          "--launcher", "slurm", "--tasks-per-job", "2", "--wait")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aikd",
                "train", *args, "-o", str(tmp_path / "torchrun"), "-q"]
    done = subprocess.run(torchrun, env={**cluster.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = next((tmp_path / "slurm" / "slurm" / "logs").glob("*.log")).read_text()
    assert "x 2 processes" in log, log[-2000:]
    slurm_run = tmp_path / "slurm" / "fmnist_proxy" / "pskd" / "seed0" / "student"
    assert _numbers(slurm_run) == _numbers(tmp_path / "torchrun")
    single = tmp_path / "one"
    _aikd(cluster, "train", *args, "-o", str(single), "-q")
    assert _numbers(single)[1] != _numbers(slurm_run)[1]  # two ranks train otherwise than one (the test can fail)


def test_status_of_a_folder_without_a_slurm_sweep_says_so(tmp_path):
    done = subprocess.run([*AIKD, "sweep", "--status", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ})
    assert done.returncode == 2 and "holds no Slurm sweep" in done.stderr


@pytest.mark.slow
def test_a_run_finished_here_is_not_submitted_and_status_still_lists_it(cluster, tmp_path):
    out = tmp_path / "sweep"
    _aikd(cluster, "sweep", "-c", "fmnist_proxy/pskd", "--seeds", "0", "-o", str(out), "-q", *TINY)  # locally
    done = _aikd(cluster, "sweep", "-c", "fmnist_proxy/pskd", "fmnist_proxy/cskd", "--seeds", "0", "-o", str(out),
                 "-q", *TINY, "--launcher", "slurm", "--wait")
    assert "1 of 2 runs finished, 0 queued, 1 submitted" in done.stderr
    rows = {line.split("  ")[0]: line.split() for line in done.stdout.splitlines()[1:-1]}
    assert rows["fmnist_proxy/pskd seed 0"][-3:] == ["finished", "-", "-"]  # state, no job, no log
    assert rows["fmnist_proxy/cskd seed 0"][-3] == "finished"
