"""Multi-node data-parallel training on a real two-node Slurm cluster (tests/slurm_nodes.py).

Each node has its own network, hostname and mount namespace, so the ranks meet over the bridge the fixture
made, as on two machines. A job here is what a user writes by hand (``sbatch`` a script that runs
``srun --kill-on-bad-exit=1 aikd train ...``) or what ``aikd sweep --launcher slurm --nodes 2`` writes. The
reference is a 2-process run on one node (``aikd train --nproc 2``): across nodes every epoch's record must
be the same. Times are printed (run with -s to see them); the bound on a killed rank is docs/distributed.md's.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_nodes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
AIKD = [sys.executable, "-m", "aikd"]
# Long enough for a kill or a signal to land mid-run (33 steps an epoch, the ranks agree on a stop at step 25).
TRAIN = ["-c", "fmnist_proxy/pskd", "train.epochs=5", "data.train_limit=1200", "data.test_limit=200",
         "data.batch_size=32", "data.num_workers=0"]
TINY = ["train.epochs=2", "data.train_limit=300", "data.test_limit=200", "data.num_workers=0"]
KILL_WAIT_S = 5  # the test cluster's KillWait (tests/slurm_cluster.py)
KILLED_RANK_BOUND_S = KILL_WAIT_S + 10  # docs/distributed.md: KillWait plus a few seconds


@pytest.fixture(scope="module")
def nodes():
    reason = slurm_nodes.available()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    cluster = slurm_nodes.TwoNodeCluster().start()
    print(f"\ntwo-node cluster up in {time.monotonic() - started:.1f} s")
    yield cluster
    started = time.monotonic()
    cluster.stop()
    print(f"\ntwo-node cluster down in {time.monotonic() - started:.1f} s")


def _run(nodes, *args: str) -> subprocess.CompletedProcess:
    env = {**nodes.env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*AIKD, *args], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def reference(nodes, tmp_path_factory) -> Path:
    """TRAIN as 2 processes on this machine: what the two-node runs must equal, record for record."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(nodes, "train", *TRAIN, "-o", str(out), "-q", "--nproc", "2")
    return out


def _numbers(run: Path) -> tuple[dict, list[dict]]:
    """A run's summary and per-epoch records without the wall-clock times."""
    summary = json.loads((run / "summary.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ({k: v for k, v in summary.items() if "time" not in k},
            [{k: v for k, v in e.items() if "time" not in k} for e in epochs])


def _train_job(folder: Path, run: Path) -> Path:
    """The batch script a user writes for a two-node run: one srun task per rank, the job failing with any."""
    command = shlex.join([*AIKD, "train", *TRAIN, "-o", str(run), "--resume", "auto"])
    script = folder / "train.sh"
    script.write_text("\n".join([
        "#!/bin/bash", "#SBATCH --nodes=2 --ntasks-per-node=1", f"#SBATCH --output={folder}/%j.log",
        "set -euo pipefail", f"cd {REPO}", "export OMP_NUM_THREADS=1", f"srun --kill-on-bad-exit=1 {command}", ""]))
    return script


def _submit(nodes, script: Path) -> str:
    done = subprocess.run(["sbatch", "--parsable", str(script)], env=nodes.env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().split(";")[0]


def _wait(nodes, job: str, timeout: float = 600) -> tuple[str, str, float]:
    """Poll until the job leaves the queue: its state, exit code and the time it took from this call."""
    started = time.monotonic()
    while nodes.queue().count(job) and time.monotonic() - started < timeout:
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    shown = subprocess.run(["scontrol", "show", "job", job], env=nodes.env, capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    return fields.get("JobState", "?"), fields.get("ExitCode", "?"), elapsed


def _wait_for_text(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"'{text}' never appeared in {path}")


def _rank_pid(job: str, rank: int) -> int:
    """The process of rank ``rank`` of our job (a child of our cluster's slurmd), found by its environment."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"aikd" in command and f"SLURM_JOB_ID={job}".encode() in environ and \
                f"SLURM_PROCID={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} of job {job}")


def test_a_batch_script_is_one_process_and_each_srun_task_a_rank(nodes, tmp_path):
    probe = "import json, os, socket; from aikd.rendezvous import ranks_from_slurm; " \
            "print(json.dumps([socket.gethostname(), ranks_from_slurm(os.environ)]))"
    script = tmp_path / "probe.sh"
    script.write_text("\n".join(["#!/bin/bash", "#SBATCH --nodes=2 --ntasks-per-node=1",
                                 f"#SBATCH --output={tmp_path}/probe.log", "set -euo pipefail",
                                 f"{shlex.join([sys.executable, '-c', probe])} > {tmp_path}/batch.json",
                                 f"srun --kill-on-bad-exit=1 {shlex.join([sys.executable, '-c', probe])}", ""]))
    state, _, _ = _wait(nodes, _submit(nodes, script))
    assert state == "COMPLETED", (tmp_path / "probe.log").read_text()
    host, batch = json.loads((tmp_path / "batch.json").read_text())
    assert (host, batch) == ("n1", {})  # SLURM_NTASKS=2 there, but no srun step: a plain aikd train is one process
    tasks = sorted(json.loads(line) for line in (tmp_path / "probe.log").read_text().splitlines())
    assert [(h, r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["LOCAL_WORLD_SIZE"], r["MASTER_ADDR"])
            for h, r in tasks] == [("n1", "0", "2", "0", "1", "n1"), ("n2", "1", "2", "0", "1", "n1")]


def test_two_nodes_train_every_epoch_like_two_processes_on_one(nodes, reference, tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    state, code, _ = _wait(nodes, _submit(nodes, _train_job(tmp_path, run)))
    print(f"\ntwo-node run: {time.monotonic() - started:.1f} s")
    log = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert (state, code) == ("COMPLETED", "0:0"), log[-3000:]
    assert "x 2 processes" in log
    assert _numbers(run) == _numbers(reference)


def test_a_killed_rank_fails_the_job_at_once_and_the_rerun_resumes(nodes, reference, tmp_path):
    run = tmp_path / "run"
    script = _train_job(tmp_path, run)
    job = _submit(nodes, script)
    _wait_for_text(tmp_path / f"{job}.log", "epoch 1/5")
    os.kill(_rank_pid(job, 1), signal.SIGKILL)  # rank 1, on node n2
    state, code, elapsed = _wait(nodes, job)
    print(f"\nkilled rank 1: the job left the queue {elapsed:.2f} s later, {state} {code}")
    log = (tmp_path / f"{job}.log").read_text()
    assert state == "FAILED" and code != "0:0", (state, code)
    assert "task 1: Killed" in log, log[-3000:]  # srun names the rank that died
    assert elapsed <= KILLED_RANK_BOUND_S
    assert not (run / "summary.json").exists()
    rerun = _submit(nodes, script)
    state, code, _ = _wait(nodes, rerun)
    log = (tmp_path / f"{rerun}.log").read_text()
    assert (state, code) == ("COMPLETED", "0:0"), log[-3000:]
    assert "resuming from" in log
    assert [e["epoch"] for e in _numbers(run)[1]] == [1, 2, 3, 4, 5]  # each epoch once
    assert _numbers(run) == _numbers(reference)  # replayed from the last checkpoint, exactly


def test_scancel_term_stops_both_nodes_at_one_step_and_the_rerun_resumes_exactly(nodes, reference, tmp_path):
    run = tmp_path / "run"
    script = _train_job(tmp_path, run)
    job = _submit(nodes, script)
    _wait_for_text(tmp_path / f"{job}.log", "epoch 1/5")
    subprocess.run(["scancel", "--signal=TERM", job], env=nodes.env, check=True)
    state, code, elapsed = _wait(nodes, job)
    print(f"\nscancel --signal=TERM: the job ended {elapsed:.2f} s later, {state} {code}")
    log = (tmp_path / f"{job}.log").read_text()
    stops = [line for line in log.splitlines() if line.startswith("aikd: Stopped by SIGTERM")]
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]  # both ranks, at the same step
    assert (state, code) == ("FAILED", "143:0")  # 128 + SIGTERM: stopped with a checkpoint, not finished
    assert not (run / "summary.json").exists() and (run / "checkpoints" / "last.safetensors").is_file()
    rerun = _submit(nodes, script)
    state, code, _ = _wait(nodes, rerun)
    assert (state, code) == ("COMPLETED", "0:0"), (tmp_path / f"{rerun}.log").read_text()[-3000:]
    _assert_resumed_like(run, reference)


def _assert_resumed_like(run: Path, reference: Path) -> None:
    """The resumed run ends as the uninterrupted one, every epoch's record and the summary exactly, each epoch
    logged once: a stop at an epoch's end or inside one (each rank resumes its own random streams, loss sums
    and BatchNorm running statistics)."""
    (summary, epochs), (want_summary, want_epochs) = _numbers(run), _numbers(reference)
    assert [e["epoch"] for e in epochs] == [e["epoch"] for e in want_epochs]  # each epoch once
    assert epochs == want_epochs
    assert summary == want_summary


@pytest.mark.timeout(1800)  # 8 runs of 2 processes each; on a loaded 2-core machine each takes 20-60 s
def test_a_sweep_on_two_nodes_reports_the_table_of_local_two_process_runs(nodes, tmp_path):
    configs, seeds = ("ce", "pskd"), ("0", "1")
    started = time.monotonic()
    done = _run(nodes, "sweep", "-c", *(f"fmnist_proxy/{c}" for c in configs), "--seeds", *seeds,
                "-o", str(tmp_path / "slurm"), "-q", *TINY, "--launcher", "slurm", "--nodes", "2", "--wait")
    print(f"\nsweep of 4 runs on two nodes: {time.monotonic() - started:.1f} s")
    assert done.stdout.strip().endswith("4 finished"), done.stdout
    script = next((tmp_path / "slurm" / "slurm" / "jobs").glob("*.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "set -euo pipefail" in script and "srun --kill-on-bad-exit=1 " in script
    logs = "".join(p.read_text() for p in (tmp_path / "slurm" / "slurm" / "logs").glob("*.log"))
    assert logs.count("x 2 processes") == 4
    for config in configs:
        for seed in seeds:
            student = tmp_path / "local" / "fmnist_proxy" / config / f"seed{seed}" / "student"
            _run(nodes, "train", "-c", f"fmnist_proxy/{config}", *TINY, f"seed={seed}", "-o", str(student), "-q",
                 "--nproc", "2")
            assert _numbers(tmp_path / "slurm" / "fmnist_proxy" / config / f"seed{seed}" / "student") == \
                _numbers(student), (config, seed)
    tables = [_untimed(_run(nodes, "report", str(tmp_path / where)).stdout) for where in ("slurm", "local")]
    assert tables[0] == tables[1] and "PS-KD" in tables[0] and "Baseline" in tables[0]


def _untimed(report: str) -> str:
    """``aikd report``'s tables without the one of wall times (measured, so never the same twice)."""
    return report.split("### Training cost")[0]
