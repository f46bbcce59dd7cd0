"""Run folders and phase-1 cache entries under concurrent processes, and aikd sweep --jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aikd.engine.locks import LOCK_NAME, FolderInUse, file_lock, run_folder_lock

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=512",
          "data.test_limit=128", "device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def aikd(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aikd", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.stderr.read() if proc.poll() is not None else f"{path} never appeared"


def test_a_second_training_in_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = aikd("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(out), *DIGITS, "train.epochs=2000")
    wait_for(out / "metrics.jsonl", first)  # the first holds the folder and has finished an epoch
    second = aikd("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(out), *DIGITS, "train.epochs=2000")
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second one tried: lengthen it"
    assert second.returncode == 2, err
    assert f"Output folder '{out}' is in use by process {first.pid} on host {socket.gethostname()}" in err
    assert "Traceback" not in err
    first.send_signal(signal.SIGTERM)  # enough: it stops at the next step with a checkpoint
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice, none interleaved


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = aikd("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(out), *DIGITS, "train.epochs=50")
    wait_for(out / "config.yaml", holder)
    holder.send_signal(signal.SIGKILL)  # no clean-up at all: the lock file stays, naming a dead process
    holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    with run_folder_lock(out):  # the kernel dropped the dead process's flock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (out / LOCK_NAME).read_text() == ""  # released: nobody named as the holder


def test_file_lock_refuses_then_waits(tmp_path):
    path = tmp_path / "x.lock"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                              "from aikd.engine.locks import file_lock\n"
                              f"with file_lock(Path({str(path)!r}), wait=False):\n"
                              "    print('held', flush=True); time.sleep(3)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUse, match=f"process {child.pid} on host"), file_lock(path, wait=False):
        pass
    start = time.time()
    with file_lock(path, wait=True):  # blocks until the child lets go
        assert time.time() - start > 1
    child.wait()


def test_two_pipelines_needing_one_superior_train_it_once(tmp_path):
    cache = tmp_path / "cache"
    common = [*DIGITS, "train.epochs=2", "phase1.train.epochs=150"]
    first = aikd("pipeline", "-c", "configs/fashion_mnist/tfkd_self.yaml", "-o", str(tmp_path / "a"),
                 "--cache", str(cache), *common)
    deadline = time.time() + 120
    while not list(cache.glob("*/metrics.jsonl")) and time.time() < deadline:  # phase 1 is under way
        time.sleep(0.05)
    second = aikd("pipeline", "-c", "configs/fashion_mnist/kd.yaml", "-o", str(tmp_path / "b"),
                  "--cache", str(cache), *common)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    epochs = [json.loads(line)["epoch"] for line in (entry / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 151))  # trained once, by the first
    waited = outs[1][1]
    assert f"is being trained by process {first.pid}" in waited and "waiting for it" in waited
    assert f"reusing the finished run in {entry}" in waited


def test_sweep_with_two_jobs_gives_the_serial_sweeps_results(tmp_path):
    config = tmp_path / "configs" / "ce.yaml"
    config.parent.mkdir()
    data = {"method": "ce", "data": {"name": "digits", "train_limit": 384, "test_limit": 128, "batch_size": 64},
            "model": {"name": "small_cnn"}, "train": {"epochs": 2}, "deterministic": True, "device": "cpu"}
    config.write_text(yaml.safe_dump(data))
    pskd = config.with_name("pskd.yaml")
    pskd.write_text(yaml.safe_dump({**data, "method": "pskd"}))
    tables = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        done = subprocess.run([sys.executable, "-m", "aikd", "sweep", "-q", "-c", str(config), str(pskd), "--seeds",
                               "0", "1", "-o", str(out), "--jobs", str(jobs)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        rows = json.loads((out / "sweep.json").read_text())
        tables[jobs] = [(r["config"], r["seed"], r["top1_err"]) for r in rows]
        report = subprocess.run([sys.executable, "-m", "aikd", "report", str(out)], capture_output=True, text=True)
        tables[f"report{jobs}"] = report.stdout.split("### Training cost")[0]  # wall times differ, results not
    assert tables[1] == tables[2] and len(tables[1]) == 4
    assert "### Paired difference" in tables["report1"] and tables["report1"] == tables["report2"]


def _children(pid: int) -> set[int]:
    """The pids of a process's children (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits for a reaper


def test_sweep_workers_end_when_the_sweep_is_killed_and_the_rerun_resumes_their_runs(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    data = {"data": {"name": "digits", "train_limit": 384, "test_limit": 128, "batch_size": 64},
            "model": {"name": "small_cnn"}, "train": {"epochs": 40}, "deterministic": True, "device": "cpu"}
    for method in ("ce", "pskd"):
        (configs / f"{method}.yaml").write_text(yaml.safe_dump({**data, "method": method}))
    out = tmp_path / "sweep"
    command = ["sweep", "-q", "-c", str(configs / "ce.yaml"), str(configs / "pskd.yaml"), "--seeds", "0", "-o",
               str(out), "--jobs", "2"]
    parent = aikd(*command)
    wait_for(out / "configs/pskd/seed0/student/metrics.jsonl", parent, 300)  # both workers have trained an epoch:
    # The Baseline trains in the phase-1 cache (the CE row is that seed's phase-1 model).
    deadline = time.time() + 300
    while not list(out.glob("superior/*/metrics.jsonl")) and parent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    baseline = next(out.glob("superior/*/metrics.jsonl")).parent
    workers = {pid for pid in _children(parent.pid) if "aikd" in Path(f"/proc/{pid}/cmdline").read_text()
               or "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_text()}
    assert len(workers) >= 2, workers
    parent.send_signal(signal.SIGKILL)  # the parent alone, not its process group
    parent.wait()
    deadline = time.time() + 60
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "sweep workers outlived their sweep"
    done = subprocess.run([sys.executable, "-m", "aikd", "sweep", *command[2:]], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)  # without -q: it says what it resumes
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("resuming the unfinished run") == 2, done.stderr
    assert (out / "configs/ce/seed0/student").resolve() == baseline.resolve()
    for run in (baseline, out / "configs/pskd/seed0/student"):
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 41)), run  # each epoch once: nothing half-written, nothing repeated
