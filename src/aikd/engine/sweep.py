"""Seed sweeps (``aikd sweep``): every (config, grid point, seed) through the two-phase pipeline.

Layout: ``OUT/<config folder>/<config name>/seed<k>/student`` for each pair
(``OUT/<config folder>/<config name>/<grid point>/seed<k>/student`` with ``--grid``) and
one phase-1 cache ``OUT/superior/`` shared by all of them, so methods that
need the same superior or teacher model (AI-KD, its ablations, TF-KD self,
KD) train it once per seed. A pair whose run already finished with the same
config is reused, and an unfinished one resumes from its last checkpoint, so
a sweep killed half-way picks up where it stopped when run again.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aikd.engine.checkpoint import atomic_write_bytes
from aikd.engine.output import Output, to_stderr
from aikd.engine.pipeline import PipelinePlan, plan_pipeline, run_pipeline, student_config
from aikd.errors import AikdError
from aikd.fileio import check_output_folder


class GridPoint(tuple):
    """One combination of ``--grid`` values: ((key, value text), ...), in the order the keys were given."""

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self]

    @property
    def name(self) -> str:
        """The point's folder and its tag in report rows: ``aikd.alpha_p=0.1,aikd.temp_g=3`` ('' without a grid)."""
        return ",".join(f"{key}={value}".replace("/", "_") for key, value in self)


def parse_grid(specs: Sequence[str]) -> list[GridPoint]:
    """``["aikd.alpha_p=0.1,0.3", "aikd.w=0,0.1"]`` -> every combination of the values (one empty point without a grid).

    Values are split at commas outside brackets, so a list value stays whole
    (``train.milestones=[0.5,0.75],[0.3,0.6]``).
    """
    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        items = _split_values(values)
        if not eq or not key or not items or any(not v for v in items):
            raise AikdError(f"--grid '{spec}' must look like KEY=V1,V2,..., for example "
                            f"--grid aikd.alpha_p=0.1,0.3,0.5.")
        if key in (k for k, _ in axes):
            raise AikdError(f"--grid names '{key}' twice; give all its values in one --grid {key}=V1,V2,...")
        axes.append((key, items))
    for key, items in axes:
        if len(set(items)) < len(items):
            raise AikdError(f"--grid {key} repeats a value: {','.join(items)}.")
    return [GridPoint(zip([k for k, _ in axes], combo, strict=True))
            for combo in itertools.product(*(items for _, items in axes))]


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return [*values, current.strip()] if text.strip() else []


NO_GRID = GridPoint()


def config_folder(config: str | Path) -> tuple[str, str]:
    """The (folder, name) a config's runs live under in a sweep: those of the file itself, resolved.

    ``-c /a/sub/../x.yaml``, ``-c ../x.yaml`` run from ``/a/sub`` and ``-c x.yaml`` run from ``/a`` name one
    file, so they share one folder (``a/x``), and no spelling of the path (its ``..``) reaches outside ``-o``.
    """
    path = Path(config).resolve()
    parts = (path.parent.name, path.stem)
    if any(part in (".", "..") for part in parts):
        raise AikdError(f"The config '{config}' would place its runs at '{'/'.join(parts)}' inside the sweep "
                        f"folder, outside it; rename the file.")
    return parts


def sweep_dir(out: Path, config: str | Path, seed: int, point: GridPoint = NO_GRID) -> Path:
    folder = out.joinpath(*config_folder(config))
    return (folder / point.name if point else folder) / f"seed{seed}"


def check_configs(configs: Sequence[str | Path], seeds: Sequence[int], overrides: Sequence[str],
                  grid: Sequence[GridPoint] = (NO_GRID,)) -> None:
    """Validate every config and grid point with the overrides before anything trains, so a typo (or a value out
    of range) costs seconds, not hours."""
    if not configs or not seeds:
        raise AikdError("A sweep needs at least one config (-c) and one seed (--seeds).")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise AikdError(f"--seeds repeats {', '.join(map(str, repeated))}: give each seed once.")
    for config, point in itertools.product(configs, grid):
        where = f"{config} with --grid {' '.join(point.overrides)}" if point else str(config)
        student_config(config, [*overrides, *point.overrides, f"seed={seeds[0]}"], source=where)
    clash = {}
    for config in configs:
        key = config_folder(config)
        if key in clash and Path(clash[key]).resolve() == Path(config).resolve():
            raise AikdError(f"-c names the config '{Path(config).resolve()}' twice ('{clash[key]}' and "
                            f"'{config}'): give each config once.")
        if key in clash:
            raise AikdError(f"Configs '{clash[key]}' and '{config}' would share the output folder "
                            f"{'/'.join(key)}; rename one.")
        clash[key] = config


@dataclass(frozen=True)
class SweepTask:
    """One (config, grid point, seed) of a sweep: its pipeline's arguments."""

    number: int  # its place in the serial order (seeds outermost)
    config: str
    point: GridPoint
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path
    cache_dir: Path
    overwrite: bool = False  # replace a student run of another config in run_dir (aikd sweep --overwrite)

    @property
    def pipeline_overrides(self) -> list[str]:
        return [*self.overrides, *self.point.overrides, f"seed={self.seed}"]

    def plan(self) -> PipelinePlan:
        return plan_pipeline(self.config, self.pipeline_overrides, self.run_dir, cache_dir=self.cache_dir,
                             variant=self.point.name or None)

    def run(self, output: Output, phase1_only: bool = False) -> dict[str, Any]:
        result = run_pipeline(self.config, self.pipeline_overrides, self.run_dir, cache_dir=self.cache_dir,
                              output=output, variant=self.point.name or None, phase1_only=phase1_only,
                              overwrite=self.overwrite)
        trained = result.get("student") or result["superior"]  # phase1_only: the phase-1 model alone
        run_dir = result["superior"]["run_dir"] if "student" not in result else str(self.run_dir / "student")
        return {"config": self.config, "grid": dict(self.point), "seed": self.seed, "run_dir": run_dir,
                "top1_err": trained["top1_err"]}


def sweep_tasks(configs: Sequence[str | Path], seeds: Sequence[int], out_dir: str | Path,
                overrides: Sequence[str] = (), *, grid: Sequence[str] = (),
                cache_dir: str | Path | None = None, overwrite: bool = False) -> list[SweepTask]:
    """Every (config, grid point, seed) of a sweep, seeds outermost, checked (configs and folders) before any run.

    ``overwrite`` replaces each student run made with another config (refused otherwise)."""
    points = parse_grid(grid)
    check_configs(configs, seeds, overrides, points)
    out = Path(out_dir)
    check_output_folder(out, "sweep folder")
    if cache_dir:
        check_output_folder(cache_dir, "phase-1 cache folder")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "superior"
    return [SweepTask(n, str(config), point, seed, tuple(overrides), sweep_dir(out, config, seed, point), cache,
                      overwrite)
            for n, (seed, config, point) in enumerate(itertools.product(seeds, configs, points))]


def run_sweep(configs: Sequence[str | Path], seeds: Sequence[int], out_dir: str | Path,
              overrides: Sequence[str] = (), *, grid: Sequence[str] = (), cache_dir: str | Path | None = None,
              jobs: int = 1, output: Output | None = None, quiet: bool | None = None,
              log: Callable[[str], None] | None = None, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every (config, grid point, seed), seeds outermost (a first complete table comes early).

    ``grid`` holds ``KEY=V1,V2,...`` specs (``--grid``); each combination of their values
    is one more set of overrides, run into its own folder and tagged in the run's recipe
    (``aikd[aikd.alpha_p=0.1]``) so that ``aikd report`` shows it as its own row.
    ``cache_dir`` holds the phase-1 models (default ``OUT/superior``): another sweep's cache
    lends its models to this one. ``jobs`` > 1 runs that many pipelines at once, each in its
    own process (:func:`run_parallel`); the folders and results are those of a serial sweep.
    ``overwrite`` replaces a student run made with another config (``--overwrite``; refused otherwise).
    ``output`` says where the runs' words go; ``quiet`` and ``log`` replace its settings of the same names.
    """
    output = (output or Output()).with_(quiet=quiet, log=log)
    if jobs < 1:
        raise AikdError(f"--jobs must be at least 1, got {jobs}.")
    tasks = sweep_tasks(configs, seeds, out_dir, overrides, grid=grid, cache_dir=cache_dir, overwrite=overwrite)
    out = Path(out_dir)
    done: list[dict[str, Any]] = []

    def finished(task: SweepTask, row: dict[str, Any]) -> None:
        done.append({**row, "number": task.number})
        done.sort(key=lambda r: r["number"])
        rows = [{k: v for k, v in r.items() if k != "number"} for r in done]
        atomic_write_bytes(out / "sweep.json", json.dumps(rows, indent=2).encode())

    if jobs == 1:
        for task in tasks:
            output.log(f"aikd sweep: [{task.number + 1}/{len(tasks)}] {_describe(task)} -> {task.run_dir}")
            finished(task, task.run(output))
    else:
        run_parallel(tasks, jobs, output.log, finished)
    return [{k: v for k, v in r.items() if k != "number"} for r in done]


def _describe(task: SweepTask) -> str:
    return f"{task.config}{f' [{task.point.name}]' if task.point else ''} seed {task.seed}"


def run_parallel(tasks: Sequence[SweepTask], jobs: int, log: Callable[[str], None], finished) -> None:
    """Run the tasks ``jobs`` at a time, in the serial order, each in a fresh process.

    Each process gets its share of the CPU threads (cpu count // jobs), or one GPU of the
    machine's (round robin over CUDA_VISIBLE_DEVICES) when there are GPUs. Two pipelines that
    need the same phase-1 model train it once (the cache entry is locked; the second waits
    and reuses it). The first failure stops the sweep once the running tasks end; finished
    tasks are kept, so running the same command again continues it.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    spawn = multiprocessing.get_context("spawn")
    slots = spawn.Queue()
    for slot in range(jobs):
        slots.put(slot)
    pending, running, error = list(tasks), {}, None
    with ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_worker_init,
                             initargs=(slots, threads, gpus, os.getpid())) as pool:
        while pending or running:
            while pending and len(running) < jobs and error is None:
                task = pending.pop(0)
                log(f"aikd sweep: [{task.number + 1}/{len(tasks)}] {_describe(task)} -> {task.run_dir} (started)")
                running[pool.submit(_run_in_worker, task)] = task
            if not running:
                break
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ready:
                task = running.pop(future)
                try:
                    finished(task, future.result())
                    log(f"aikd sweep: [{task.number + 1}/{len(tasks)}] {_describe(task)} finished")
                except AikdError as err:
                    error = error or err
    if error is not None:
        raise error


# A worker's pipeline messages (phase 1, reuse, waiting for a cache entry) go to its stderr; no bars or epoch
# lines from several runs at once.
WORKER_OUTPUT = Output(quiet=True, log=to_stderr)


def _run_in_worker(task: SweepTask) -> dict[str, Any]:
    """A task in a worker; a worker whose sweep has died leaves once its run has saved (no idle orphan)."""
    try:
        return task.run(WORKER_OUTPUT)
    finally:
        if _PARENT_PID is not None and os.getppid() != _PARENT_PID:
            os._exit(1)


_PARENT_PID: int | None = None  # the sweep's pid, in a worker


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the sweep's process dies, however it dies (kill -9 included).

    On Linux the kernel sends it (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread watches the
    parent's pid. SIGTERM reaches a training run as a stop after the current step with a checkpoint,
    so the rerun of the sweep resumes it; an idle worker just ends.
    """
    global _PARENT_PID
    _PARENT_PID = parent
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="aikd-sweep-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_init(slots, threads: int, gpus: int, parent: int) -> None:
    """One sweep worker: its share of the CPU threads, or its own GPU; it dies with the sweep."""
    _die_with_parent(parent)
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
