"""The Slurm scheduler as a sweep sees it (``aikd sweep --launcher slurm`` and ``--status``).

:mod:`.slurm` plans a sweep's jobs and submits them; this module holds what talks to the scheduler (sbatch,
squeue, scontrol), the record of what was submitted (``OUT/slurm/jobs.json``) and the status of every run
read back from it: from the run folders first, then the queue, then the controller or the job's log.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from aikd.engine.checkpoint import atomic_write_bytes
from aikd.errors import AikdError
from aikd.text import aligned

SLURM_FOLDER = "slurm"  # OUT/slurm: the job scripts, their run lists, logs and the submission record
NO_JOB = "-"  # the record of a run that had finished before the sweep submitted anything for it


def slurm_command(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise AikdError(f"'{command[0]}' is not on PATH: --launcher slurm runs where Slurm's commands are "
                        f"installed (a login node of the cluster).") from None
    if done.returncode != 0:
        raise AikdError(f"{' '.join(command[:2])} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def queued_jobs(ids: Sequence[str]) -> dict[str, str]:
    """State (PENDING, RUNNING, ...) of the given jobs that squeue still lists; array tasks one by one."""
    if not ids:
        return {}
    out = slurm_command("squeue", "-h", "-r", "--me", "-o", "%i %T")  # -j would fail on a job the controller forgot
    wanted = set(ids)
    return {job: state for job, state in (line.split()[:2] for line in out.splitlines() if line.strip())
            if job in wanted}


def ended_state(job: str) -> str | None:
    """How a job that left the queue ended (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), while the controller
    remembers it (MinJobAge), else None."""
    done = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    found = re.search(r"JobState=(\S+)", done.stdout) if done.returncode == 0 else None
    return found.group(1) if found else None


def submit_script(script: Path) -> str:
    return slurm_command("sbatch", "--parsable", str(script)).strip().split(";")[0]


# ---------------------------------------------------------------------------
# What was submitted


@dataclass
class Record:
    """What was submitted for a unit: its job (``<array>_<index>``) and log."""

    job: str
    log: str
    kind: str
    run_dir: str
    submitted: float


class Submissions:
    """``OUT/slurm/jobs.json``: the latest job of every unit, by unit name (written atomically)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "jobs.json"
        self.records: dict[str, Record] = {}
        if self.path.is_file():
            try:
                self.records = {k: Record(**v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, TypeError) as err:
                raise AikdError(f"'{self.path}' is damaged ({err}); move it away to submit every unfinished run "
                                f"again.") from None

    def save(self) -> None:
        text = json.dumps({k: asdict(v) for k, v in self.records.items()}, indent=2)
        atomic_write_bytes(self.path, text.encode())


# ---------------------------------------------------------------------------
# Status


def sweep_status(out: Path) -> list[dict[str, str]]:
    """Every submitted unit: its state (finished, pending, running, failed, cancelled, ...), job and log."""
    folder = out / SLURM_FOLDER
    if not (folder / "jobs.json").is_file():
        raise AikdError(f"'{out}' holds no Slurm sweep (no {folder / 'jobs.json'}); start one with "
                        f"aikd sweep ... -o {out} --launcher slurm.")
    records = Submissions(folder)
    try:
        queue = queued_jobs([r.job for r in records.records.values()])
    except AikdError:  # no scheduler reachable from here: the files still say what finished
        queue = {}
    rows = []
    for name, record in records.records.items():
        if (Path(record.run_dir) / "summary.json").is_file():
            state = "finished"
        elif record.job == NO_JOB:
            state = "not submitted"
        elif record.job in queue:
            state = queue[record.job].lower()
        else:
            state = _ended(record)
        rows.append({"run": name, "state": state, "job": record.job, "log": record.log})
    return rows


def _ended(record: Record) -> str:
    """A job out of the queue whose run has not finished: how it ended, from the controller or its log."""
    state = ended_state(record.job)
    if state is not None and state != "COMPLETED":
        return state.lower()
    log = Path(record.log)
    text = log.read_text(errors="replace")[-20000:] if log.is_file() else ""
    if "CANCELLED" in text:
        return "cancelled"
    if not text:
        return "cancelled before it started" if state is None else "ended without a log"
    last = [line for line in text.splitlines() if line.strip()][-1:]
    return f"failed: {last[0][:120]}" if last else "failed"


def format_status(rows: Sequence[dict[str, str]]) -> str:
    columns = ("run", "state", "job", "log")
    lines = aligned([columns, *([r[k] for k in columns] for r in rows)]) if rows else []
    counts: dict[str, int] = {}
    for row in rows:
        key = row["state"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()) or "no runs submitted")
    return "\n".join(lines)


def wait_for(out: Path, poll_s: float = 5.0) -> list[dict[str, str]]:
    """Block until no job of the sweep is pending or running; the final status."""
    while True:
        rows = sweep_status(out)
        if not queued_jobs([r["job"] for r in rows]):  # no job of the sweep in the queue, in any state
            return sweep_status(out)
        time.sleep(poll_s)
