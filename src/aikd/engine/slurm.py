"""Sweeps on a Slurm cluster (``aikd sweep --launcher slurm``): one job per run, phase-1 models first.

Plan: every (config, grid point, seed) of the sweep is planned as its pipeline would run it. Each
phase-1 model (the superior or teacher model that several rows share, or the Baseline row itself)
becomes one task of a phase-1 job array; every other run becomes a task of a student array, one array
per phase-1 task it waits for (``--dependency=afterok:<array>_<index>``). ``array_parallelism``
caps how many tasks of an array run at once (``--array=0-N%P``).

State lives on disk, not in the scheduler: a run is finished when its folder holds a finished run with
the same config (the local sweep's rule), queued while squeue lists its job, and otherwise failed,
cancelled or lost, which ``scontrol show job`` (recent jobs) or the job's log tells apart. Running the
same command again submits exactly the runs that are neither finished nor queued; an unfinished run
resumes from its last checkpoint. Nothing here needs Slurm's accounting (sacct), which many small
clusters do not run: see the README for why aikd does not use submitit. The scheduler's commands, the
record of what was submitted and the status read back from it are :mod:`.slurm_queue`'s.

What a job runs: ``python -m aikd.engine.slurm UNITS.json``; the file lists the array's runs and
``SLURM_ARRAY_TASK_ID`` picks one. With several tasks per job (one per GPU, on one node or several) the
script starts one ``srun --kill-on-bad-exit=1`` task per rank, and each takes its rank from Slurm's task
variables (:mod:`aikd.rendezvous`), as torchrun would set them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from aikd.engine.checkpoint import atomic_write_bytes
from aikd.engine.output import Output
from aikd.engine.pipeline import phase1_finished, student_finished
from aikd.engine.slurm_queue import (
    NO_JOB,
    SLURM_FOLDER,
    Record,
    Submissions,
    queued_jobs,
    submit_script,
)
from aikd.errors import AikdError, ConfigError, RunInterrupted, did_you_mean, exit_code
from aikd.rendezvous import adopt_slurm_ranks, leave_group


@dataclass
class SlurmOptions:
    """The resources of every job of a sweep (``--slurm-config FILE`` and the command-line options).

    Two ways to size a data-parallel job: on one node, ``gpus_per_job`` / ``tasks_per_job`` (ranks of the
    job); on one node or several, ``nodes`` with ``gpus_per_node`` / ``tasks_per_node`` (ranks on each node:
    one per GPU, or ``tasks_per_node`` without GPUs, else 1). A job is sized one way or the other, not both.
    """

    partition: str | None = None
    time: str | None = None  # Slurm's time format: 30, 4:00:00, 1-12:00:00
    cpus_per_task: int = 1  # also each process's torch threads
    gpus_per_job: int = 0  # on one node; one task (rank) per GPU unless tasks_per_job says otherwise
    tasks_per_job: int | None = None  # ranks of a job on one node; None: gpus_per_job, or 1 without GPUs
    nodes: int | None = None  # nodes per job; their ranks meet through env:// (aikd.rendezvous)
    gpus_per_node: int | None = None  # GPUs on each node of a job; one task (rank) per GPU
    tasks_per_node: int | None = None  # ranks on each node; None: gpus_per_node, or 1 without GPUs
    mem: str | None = None  # per node: 16G, 64000M
    array_parallelism: int | None = None  # at most this many tasks of each array at once
    sbatch_args: list[str] = field(default_factory=list)  # anything else: ["--account=lab", "--qos=short"]

    @property
    def per_node(self) -> bool:
        """Whether the job is sized by node (nodes, gpus_per_node, tasks_per_node) rather than on one node."""
        return any(value is not None for value in (self.nodes, self.gpus_per_node, self.tasks_per_node))

    @property
    def node_count(self) -> int:
        return self.nodes or 1

    @property
    def tasks_on_each_node(self) -> int:
        if self.per_node:
            return self.tasks_per_node or self.gpus_per_node or 1
        return self.tasks_per_job or self.gpus_per_job or 1

    @property
    def tasks(self) -> int:
        """Ranks of a job, on all its nodes."""
        return self.node_count * self.tasks_on_each_node

    def check(self) -> SlurmOptions:
        for name in ("cpus_per_task", "gpus_per_job", "tasks_per_job", "nodes", "gpus_per_node", "tasks_per_node",
                     "array_parallelism"):
            value = getattr(self, name)
            least = 0 if name in ("gpus_per_job", "gpus_per_node") else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ConfigError(f"Slurm option '{name}' must be a whole number of at least {least}, got {value!r}.")
        if self.per_node and (self.gpus_per_job or self.tasks_per_job):
            one_node = [n for n in ("gpus_per_job", "tasks_per_job") if getattr(self, n)]
            by_node = [n for n in ("nodes", "gpus_per_node", "tasks_per_node") if getattr(self, n) is not None]
            raise ConfigError(f"Slurm options {' and '.join(one_node)} size a job on one node and "
                              f"{' and '.join(by_node)} size it by node: give one or the other (for several "
                              f"nodes: nodes with gpus_per_node, or tasks_per_node without GPUs).")
        for gpus, tasks in (("gpus_per_job", "tasks_per_job"), ("gpus_per_node", "tasks_per_node")):
            if getattr(self, gpus) and getattr(self, tasks) and getattr(self, tasks) != getattr(self, gpus):
                raise ConfigError(f"Slurm options: {getattr(self, tasks)} tasks for {getattr(self, gpus)} GPUs "
                                  f"({tasks}, {gpus}); a data-parallel job runs one task per GPU.")
        if not isinstance(self.sbatch_args, list) or not all(isinstance(a, str) for a in self.sbatch_args):
            raise ConfigError(f"Slurm option 'sbatch_args' is a list of sbatch arguments, got {self.sbatch_args!r}.")
        return self

    def directives(self) -> list[str]:
        """The ``#SBATCH`` lines of these resources."""
        if self.per_node:
            lines = [f"--nodes={self.node_count}", f"--ntasks-per-node={self.tasks_on_each_node}"]
            gpus = self.gpus_per_node or 0
        else:
            lines, gpus = ["--nodes=1", f"--ntasks={self.tasks}"], self.gpus_per_job
        lines.append(f"--cpus-per-task={self.cpus_per_task}")
        lines += [f"--{flag}={value}" for flag, value in (("partition", self.partition), ("time", self.time),
                                                           ("mem", self.mem)) if value]
        if gpus:
            lines.append(f"--gpus-per-node={gpus}")
        return [*lines, *self.sbatch_args]


def read_options(path: str | Path | None, given: dict[str, Any]) -> SlurmOptions:
    """The options of a YAML file (``slurm:`` section or top level), then those given on the command line."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"Slurm config '{path}' cannot be read: {err}") from None
        data = data.get("slurm", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ConfigError(f"Slurm config '{path}' must hold a mapping of options.")
        values.update(data)
    values.update({k: v for k, v in given.items() if v is not None})
    known = [f.name for f in fields(SlurmOptions)]
    for key in values:
        if key not in known:
            raise ConfigError(f"Unknown Slurm option '{key}'{f' in {path}' if path else ''}.{did_you_mean(key, known)}"
                              f" Known: {', '.join(known)}.")
    return SlurmOptions(**values).check()


# ---------------------------------------------------------------------------
# The plan: units of work and their state


@dataclass
class Unit:
    """One job's work: a run of the sweep, or a phase-1 model that other runs wait for."""

    name: str  # how status names it: fmnist_proxy/aikd seed 3, or superior <entry>
    kind: str  # "phase1" or "run"
    run_dir: str  # where its finished run lands (the student, or the phase-1 cache entry)
    config: str
    point: list[list[str]]
    seed: int
    overrides: list[str]
    sweep_dir: str
    cache_dir: str
    phase1_only: bool = False  # train the phase-1 model of this pipeline and stop
    needs: str | None = None  # the phase-1 unit (its run_dir) this run waits for


def plan_units(tasks: Sequence[Any]) -> tuple[list[Unit], dict[str, bool]]:
    """Units for the sweep's tasks (phase-1 models first), and which of them have finished already."""
    phase1: dict[str, Unit] = {}
    runs: list[Unit] = []
    finished: dict[str, bool] = {}
    plans = [(task, task.plan()) for task in tasks]
    for task, plan in plans:  # a Baseline row that is a phase-1 model trains it as its own unit
        if plan.shared_entry is not None and str(plan.shared_entry) not in phase1:
            unit = _unit(task, "phase1", plan.shared_entry, f"{_label(task)} (phase-1 model)")
            phase1[unit.run_dir], finished[unit.run_dir] = unit, phase1_finished(plan)
    for task, plan in plans:
        entry = plan.superior_dir
        if entry is not None and str(entry) not in phase1:
            unit = _unit(task, "phase1", entry, f"phase-1 model of {_label(task)}", phase1_only=True)
            phase1[unit.run_dir], finished[unit.run_dir] = unit, phase1_finished(plan)
        if plan.shared_entry is not None:
            continue  # the phase-1 unit is this run
        unit = _unit(task, "run", task.run_dir / "student", _label(task))
        unit.needs = str(entry) if entry is not None else None
        runs.append(unit)
        finished[unit.run_dir] = student_finished(plan, task.run_dir)
    return [*phase1.values(), *runs], finished


def _label(task: Any) -> str:
    config = Path(task.config)
    return f"{config.parent.name}/{config.stem}{f' [{task.point.name}]' if task.point else ''} seed {task.seed}"


def _unit(task: Any, kind: str, run_dir: Path, name: str, phase1_only: bool = False) -> Unit:
    return Unit(name, kind, str(run_dir), task.config, [list(p) for p in task.point], task.seed,
                list(task.overrides), str(task.run_dir), str(task.cache_dir), phase1_only)


# ---------------------------------------------------------------------------
# Submission


def submit_sweep(tasks: Sequence[Any], out: Path, options: SlurmOptions, log=print) -> dict[str, str]:
    """Submit every unit that is neither finished nor queued; return each unit's state before submission."""
    folder = out / SLURM_FOLDER
    for sub in ("logs", "jobs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    units, finished = plan_units(tasks)
    records = Submissions(folder)
    queue = queued_jobs([r.job for r in records.records.values()])
    states = {u.name: _state(u, finished, records, queue) for u in units}
    queued = {u.name for u in units if states[u.name] not in ("finished", "new", "ended")}  # any state squeue lists
    job_of = {u.run_dir: records.records[u.name].job for u in units if u.name in queued}
    todo = [u for u in units if states[u.name] in ("new", "ended")]
    phase1 = [u for u in todo if u.kind == "phase1"]
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # two submissions never share a run list
    if phase1:
        array = _submit_array(folder, f"phase1-{stamp}", phase1, options, None)
        job_of.update({u.run_dir: f"{array}_{i}" for i, u in enumerate(phase1)})
        _remember(records, folder, array, phase1)
    groups: dict[str | None, list[Unit]] = {}
    for unit in (u for u in todo if u.kind == "run"):
        waits = job_of.get(unit.needs) if unit.needs and not finished.get(unit.needs) else None
        groups.setdefault(waits, []).append(unit)
    for n, (waits, group) in enumerate(groups.items()):
        array = _submit_array(folder, f"runs-{stamp}-{n}", group, options, waits)
        _remember(records, folder, array, group)
    for unit in units:  # status lists every run, also those that finished without a job of this sweep
        if unit.name not in records.records:
            records.records[unit.name] = Record(NO_JOB, NO_JOB, unit.kind, unit.run_dir, time.time())
    records.save()
    if not todo and all(states[u.name] == "finished" for u in units):
        write_results(tasks, out)
    submitted = len(todo)
    log(f"aikd sweep: {sum(s == 'finished' for s in states.values())} of {len(units)} runs finished, "
        f"{len(queued)} queued, {submitted} submitted "
        f"({len(phase1)} phase-1 models); aikd sweep --status {out}")
    return states


def write_results(tasks: Sequence[Any], out: Path) -> None:
    """OUT/sweep.json, as a local sweep writes it, once every run has finished."""
    rows = []
    for task in tasks:
        student = task.run_dir / "student"
        summary = json.loads((student / "summary.json").read_text())
        rows.append({"config": task.config, "grid": dict(task.point), "seed": task.seed, "run_dir": str(student),
                     "top1_err": summary["top1_err"]})
    atomic_write_bytes(out / "sweep.json", json.dumps(rows, indent=2).encode())


def _state(unit: Unit, finished: dict[str, bool], records: Submissions, queue: dict[str, str]) -> str:
    if finished[unit.run_dir]:
        return "finished"
    record = records.records.get(unit.name)
    if record is None or record.job == NO_JOB:
        return "new"
    return queue.get(record.job) or "ended"


def _remember(records: Submissions, folder: Path, array: str, units: Sequence[Unit]) -> None:
    now = time.time()
    for i, unit in enumerate(units):
        records.records[unit.name] = Record(f"{array}_{i}", str(folder / "logs" / f"{array}_{i}.log"), unit.kind,
                                            unit.run_dir, now)
    records.save()  # after each array: a failure in the next submission loses no job id


def _submit_array(folder: Path, name: str, units: Sequence[Unit], options: SlurmOptions, waits: str | None) -> str:
    """Write the array's run list and script, submit it; its job id."""
    listing = folder / "jobs" / f"{name}.json"
    atomic_write_bytes(listing, json.dumps([asdict(u) for u in units], indent=2).encode())
    parallel = f"%{options.array_parallelism}" if options.array_parallelism else ""
    directives = [f"--job-name=aikd-{name}", f"--array=0-{len(units) - 1}{parallel}",
                  f"--output={folder / 'logs'}/%A_%a.log", "--open-mode=append", *options.directives()]
    if waits:
        directives += [f"--dependency=afterok:{waits}", "--kill-on-invalid-dep=yes"]
    command = [sys.executable, "-m", "aikd.engine.slurm", str(listing)]
    script = folder / "jobs" / f"{name}.sh"
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             "# written by aikd sweep --launcher slurm; each array task runs one line of the JSON file beside it",
             "set -euo pipefail  # a failed step fails the job (state FAILED, its exit code), never COMPLETED",
             f"cd {shlex.quote(os.getcwd())}", f"export OMP_NUM_THREADS={options.cpus_per_task}",
             *launch_lines(options.tasks, shlex.join(command)), ""]
    atomic_write_bytes(script, "\n".join(lines).encode())
    return submit_script(script)


def launch_lines(tasks: int, command: str) -> list[str]:
    """How a job script starts its ranks: one process in place, or one srun task per rank.

    ``srun --kill-on-bad-exit=1``: a rank that exits with an error or dies ends every other rank of the step
    at once, instead of leaving them to wait for it, and the script (``set -e``) then fails the job.
    """
    if tasks <= 1:
        return [f"exec {command}"]
    return [f"srun --kill-on-bad-exit=1 {command}"]


# ---------------------------------------------------------------------------
# Inside a job


def run_unit(listing: Path, index: int) -> int:
    """Run the array task's unit as its pipeline would; 0 when its run finished."""
    from aikd.engine.sweep import GridPoint, SweepTask

    unit = Unit(**json.loads(listing.read_text())[index])
    task = SweepTask(index, unit.config, GridPoint(tuple(p) for p in unit.point), unit.seed, tuple(unit.overrides),
                     Path(unit.sweep_dir), Path(unit.cache_dir))
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "?"))
    print(f"aikd: slurm job {job}_{index}: {unit.name} -> {unit.run_dir}", file=sys.stderr, flush=True)
    # Epoch lines and messages into the job's log; one voice in a job of several tasks.
    output = Output.on_stderr().for_rank(os.environ.get("RANK", "0") == "0")
    task.run(output, phase1_only=unit.phase1_only)
    return 0


def job_main(argv: Sequence[str]) -> int:
    """A job's process: its rank from Slurm's variables, then its array task's run; the CLI's exit codes.

    A rank leaves its process group before it exits, together with the others where they all stopped on the
    same step (the run finished, or they agreed to stop on a signal): none exits while rank 0 still writes the
    checkpoint, which ``srun --kill-on-bad-exit`` would otherwise cut short.
    """
    adopt_slurm_ranks()
    code, together = 1, False
    try:
        code = run_unit(Path(argv[0]), int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
        together = True
    except AikdError as err:
        code, together = exit_code(err), isinstance(err, RunInterrupted)
    finally:
        leave_group(together)
    return code


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
