"""Helper of scripts/gpu_check.sh: probe the machine, run the acceptance checks, judge them, write the report.

  python scripts/gpu_check.py probe --device cuda      # one JSON line on stdout; exit 2 without CUDA, 3 without torch
  python scripts/gpu_check.py aikd --record R.json --device cuda [--sigterm-at E:B] -- train -c CONFIG -o RUN K=V ...
  python scripts/gpu_check.py methods --work WORK --device cuda --configs configs/fmnist_proxy [--set K=V ...]
  python scripts/gpu_check.py precision --work WORK --device cuda --teacher CKPT [--set K=V ...]
  python scripts/gpu_check.py resume --work WORK --name resume|ddp --device cuda --config C [--nproc 2] [--set ...]
  python scripts/gpu_check.py report --work WORK --out OUT [--print] [--setting KEY=VALUE ...]
  python scripts/gpu_check.py verdict --work WORK      # the checks' verdicts; exit 1 when any failed

``aikd`` runs ``aikd.cli.main`` in this process and records, for every training run it makes (each
``Trainer.fit``: a pipeline's phase 1 and phase 2 apart), its folder, training-set size, steps per epoch, AMP and
channels_last as resolved, and torch.cuda.max_memory_allocated / max_memory_reserved over that run, plus any
"torch.compile failed" fallback. The record is written when a run starts and again when it ends (also when
SIGTERM interrupts it), so a killed step still leaves what it had. ``--sigterm-at E:B`` sends this process a real
SIGTERM after batch B of epoch E, so the run stops there through its own signal handling (a mid-epoch checkpoint)
at a step that does not depend on the machine's speed.

The acceptance checks, each writing WORK/checks/NAME.json as it goes:

* ``methods``: one short run of every config in a folder (every registered method and AI-KD's variants), in this
  process, CE first so that the methods with a teacher distil from its checkpoint. It counts the host syncs of
  every training step: on CUDA the warnings of ``torch.cuda.set_sync_debug_mode("warn")``, on a CPU (the dry run)
  a ``TorchDispatchMode`` that counts the ops which sync on a GPU (``aten._local_scalar_dense``: ``.item()`` and
  ``bool()``; ``nonzero`` and the other ops whose output size depends on the data; copies to the host).
* ``precision``: CE and AI-KD with ``train.amp`` off, fp16 (with its GradScaler) and bf16.
* ``resume`` (``--name resume``, one process, stopped by SIGTERM in the middle of epoch 2) and ``ddp`` (``--nproc
  2``, stopped after epoch 1): an uninterrupted run, a repeat of it, and a run stopped then continued with
  ``--resume``; all with ``deterministic=true``.

``verdict`` and ``report`` judge them (functions ``check_*`` below, fed the records and run folders): a method
that crashed, a loss or metric that is not finite, a compiled run that fell back to eager, a resumed run whose
epoch records or summary differ from the uninterrupted run's, an fp16 or bf16 run whose error is far above the
fp32 run's or near chance, each fails. ``report`` reads WORK and OUT/bench.json and writes OUT/gpu_check.json,
OUT/gpu_check.md and OUT/runs.tar.gz (the small files of every run: summaries, metrics, configs, records,
logs). ``report`` and ``verdict`` need neither torch nor aikd and tolerate every missing file, so they can run
after each step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

# The throughput runs (records/STEP.json), in the report's order.
STEP_ORDER = ("ce-eager", "aikd-eager", "online-eager", "ce-compiled", "aikd-compiled", "online-compiled", "bench")
SMALL_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "pipeline.json", "reliability.json")
SKIP_CONFIGS = ("ce_equal_compute",)  # CE again with more epochs: nothing a short run would add
# Low precision fails when its error exceeds the fp32 run's by more than this (points of top-1 error), or comes
# within CHANCE_MARGIN points of chance. Seeds alone move a short run by a few points; a diverged or saturated
# fp16 run lands at chance (90 % on Fashion-MNIST's 10 classes).
PRECISION_TOLERANCE, CHANCE_MARGIN = 10.0, 5.0
# Record keys that measure time or memory: they differ between any two runs and are not compared.
UNCOMPARED_SUFFIXES = ("_s", "_mib")


# ---------------------------------------------------------------------------------------------- probe


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError as err:
        if not args.quiet_missing:
            print(f"gpu_check: {sys.executable} cannot import torch ({err})", file=sys.stderr)
        return 3
    cuda_build = torch.version.cuda or "none"
    wants_cuda = args.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build: {cuda_build}); run this on a "
              f"machine with an NVIDIA GPU, or pass --dry-run for the CPU check of the plumbing", file=sys.stderr)
        return 2
    info: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda_build": cuda_build, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if wants_cuda:
        index = torch.device(args.device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_mib": props.total_memory // 2**20, "gpu_multiprocessors": props.multi_processor_count,
                     "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported(),
                     "gpu_count": torch.cuda.device_count(), "nvidia_smi": _nvidia_smi()})
    print(json.dumps(info))
    return 0


# ---------------------------------------------------------------------------------------------- aikd wrapper


def _save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _sigterm_at(epoch: int, batch: int) -> None:
    """Send this process SIGTERM once the training loop asks whether to stop after batch ``batch`` of epoch
    ``epoch`` (1-based), so the run's own handler stops it there (engine/guards.py StopSignals)."""
    from aikd.engine.guards import StopSignals

    requested = StopSignals.requested
    seen = {"epoch": 1, "last": 0, "sent": False}

    def wrapped(self, number: int | None = None) -> bool:
        if number is not None:
            if number <= seen["last"]:
                seen["epoch"] += 1
            seen["last"] = number
            if not seen["sent"] and seen["epoch"] == epoch and number >= batch:
                seen["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)
        else:  # an epoch's end
            seen["last"] = 0
            seen["epoch"] += 1
        return requested(self, number)

    StopSignals.requested = wrapped


def cmd_aikd(args: argparse.Namespace) -> int:
    import torch

    from aikd import cli
    from aikd.engine import trainer as trainer_module

    record = Path(args.record)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    state: dict[str, Any] = {"argv": args.argv, "fits": [], "compile_warnings": [], "rc": None}

    def save() -> None:
        _save_json(record, state)

    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "torch.compile" in str(message):
            state["compile_warnings"].append(str(message))
            save()
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    if args.sigterm_at:
        epoch, batch = (int(x) for x in args.sigterm_at.split(":"))
        _sigterm_at(epoch, batch)
    fit = trainer_module.Trainer.fit

    def recorded_fit(self, *fit_args, **fit_kwargs):
        p = getattr(self, "parts", None)
        entry: dict[str, Any] = {"out": str(self.out), "done": False}
        try:
            entry.update(_describe(self))
        except Exception as err:  # the Trainer's internals changed: the run goes on, the record says what is missing
            entry["describe_error"] = f"{type(err).__name__}: {err}"
        state["fits"].append(entry)
        save()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            result = fit(self, *fit_args, **fit_kwargs)
            entry["done"] = result is not None
            return result
        finally:
            entry["fit_wall_s"] = time.perf_counter() - start
            if cuda:
                entry["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
                entry["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            failed = getattr(getattr(p, "train_model", None), "failed", None)  # CompiledOrEager's fallback reason
            if failed:
                entry["compile_failed"] = failed
            save()

    trainer_module.Trainer.fit = recorded_fit
    start = time.perf_counter()
    try:
        rc = cli.main(args.argv)
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        state["wall_s"] = time.perf_counter() - start
    state["rc"] = rc
    save()
    return rc


def _describe(trainer: Any) -> dict[str, Any]:
    p = trainer.parts
    return {"method": trainer.cfg.method, "recipe": trainer.recipe, "model": trainer.cfg.model.name,
            "num_train": len(p.data.train), "num_classes": p.data.num_classes,
            "batch_size": trainer.cfg.data.batch_size, "steps_per_epoch": len(p.train_loader),
            "epochs": trainer.cfg.train.epochs, "compile": trainer.cfg.train.compile,
            "amp_dtype": str(p.amp_dtype).replace("torch.", ""), "channels_last": p.channels_last,
            "device": str(p.device)}


# ---------------------------------------------------------------------------------------------- in-process runs


def _fit_in_process(cfg_path: Path, overrides: list[str], out: Path, recipe: str, entry: dict[str, Any],
                    save: Any) -> Any:
    """Train one run here, filling ``entry`` (what ran, its epochs' records and summary, or its error).

    Returns the Trainer (None when it could not be built). A stop by signal (the step's time limit) is
    re-raised: the step ends there instead of going on to the next run.
    """
    from aikd.config import load_config
    from aikd.engine import Trainer
    from aikd.errors import RunInterrupted

    entry.update({"status": "running", "out": str(out)})
    save()
    start, trainer = time.perf_counter(), None
    try:
        cfg = load_config(cfg_path, overrides)
        entry["method"] = cfg.method
        trainer = Trainer(cfg, out, quiet=True, recipe=recipe)
        entry.update(_describe(trainer))
        summary = trainer.fit()
    except RunInterrupted:
        entry.update({"status": "interrupted", "seconds": time.perf_counter() - start})
        save()
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        entry.update({"status": "crashed", "error": f"{type(err).__name__}: {first}"})
        traceback.print_exc()
    else:
        entry["status"] = "ok" if summary is not None else "unfinished"
    entry["seconds"] = time.perf_counter() - start
    entry["epochs_records"] = _jsonl(out / "metrics.jsonl")
    entry["summary"] = {k: v for k, v in (_read_json(out / "summary.json") or {}).items()
                        if isinstance(v, int | float | str | None)}
    save()
    return trainer


def _ordered_configs(folder: Path) -> list[Path]:
    """Every config of ``folder`` but SKIP_CONFIGS, CE first (the others' teacher)."""
    configs = [c for c in sorted(folder.glob("*.yaml")) if c.stem not in SKIP_CONFIGS]
    return sorted(configs, key=lambda c: c.stem != "ce")


def cmd_methods(args: argparse.Namespace) -> int:
    """One short run of every config in args.configs, host syncs counted per training step."""
    import torch

    from aikd.bench.syncs import SyncCounter  # the ops that sync, and CUDA's sync debug mode
    from aikd.engine import trainer as trainer_module
    from aikd.methods import METHODS

    work = Path(args.work)
    path = work / "checks" / "methods.json"
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    state: dict[str, Any] = {"registered": METHODS.names(), "configs": str(args.configs), "runs": []}
    save = lambda: _save_json(path, state)  # noqa: E731
    current: dict[str, Any] = {}
    epoch_fn = trainer_module.train_epoch

    def counted_epoch(run: Any, epoch: int) -> dict[str, Any]:
        counter, before = SyncCounter(cuda), run.state.step
        try:
            with counter:
                return epoch_fn(run, epoch)
        finally:
            current["syncs"] = counter.facts(run.state.step - before)

    trainer_module.train_epoch = counted_epoch
    teacher: Path | None = None
    for cfg_path in _ordered_configs(Path(args.configs)):
        name = cfg_path.stem
        entry: dict[str, Any] = {"config": f"{Path(args.configs).name}/{name}"}
        state["runs"].append(entry)
        overrides = list(args.set) + ([f"teacher.checkpoint={teacher}"] if teacher else [])
        current.clear()
        out = work / "runs" / "methods" / name
        print(f"gpu_check: [methods] {name}", flush=True)
        _fit_in_process(cfg_path, overrides, out, name, entry, save)
        entry["syncs"] = current.get("syncs")
        save()
        if name == "ce" and entry["status"] == "ok":
            teacher = out / "checkpoints" / "last.safetensors"
            state["teacher"] = str(teacher)
        syncs = entry["syncs"] or {}
        print(f"gpu_check: [methods] {name}: {entry['status']}{' - ' + entry['error'] if entry.get('error') else ''}"
              f", host syncs per step {_f(syncs.get('per_step'), '{:.2f}')}", flush=True)
    state["done"] = True
    save()
    return 0


def cmd_precision(args: argparse.Namespace) -> int:
    """CE and AI-KD with train.amp off, fp16 (GradScaler) and bf16."""
    work = Path(args.work)
    path = work / "checks" / "precision.json"
    state: dict[str, Any] = {"runs": []}
    save = lambda: _save_json(path, state)  # noqa: E731
    for config in args.config:
        cfg_path = Path(config)
        for amp in ("off", "fp16", "bf16"):
            entry: dict[str, Any] = {"config": cfg_path.stem, "amp": amp}
            state["runs"].append(entry)
            print(f"gpu_check: [precision] {cfg_path.stem} amp={amp}", flush=True)
            overrides = [*args.set, f"train.amp={amp}", f"teacher.checkpoint={args.teacher}"]
            trainer = _fit_in_process(cfg_path, overrides, work / "runs" / "precision" / f"{cfg_path.stem}-{amp}",
                                      cfg_path.stem, entry, save)
            scaler = getattr(getattr(trainer, "parts", None), "scaler", None)
            if scaler is not None and scaler.is_enabled():
                entry["grad_scale"] = float(scaler.get_scale())
            print(f"gpu_check: [precision] {cfg_path.stem} amp={amp} (autocast {entry.get('amp_dtype')}): "
                  f"{entry['status']}, top-1 error {_f(entry['summary'].get('top1_err'), '{:.2f}')}", flush=True)
    state["done"] = True
    save()
    return 0


# ---------------------------------------------------------------------------------------------- resume


class _Children:
    """The subprocesses of a step, ended (by their id) when the step itself is stopped."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, signum: int, frame: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        raise SystemExit(128 + signum)

    def run(self, command: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: {' '.join(command)}", flush=True)
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
            rc = self.proc.wait()
            self.proc = None
        return rc


def cmd_resume(args: argparse.Namespace) -> int:
    """An uninterrupted run, its repeat, and one stopped then resumed (``--nproc``: with that many processes)."""
    work, name = Path(args.work), args.name
    path = work / "checks" / f"{name}.json"
    runs = {k: work / "runs" / name / k for k in ("straight", "repeat", "stopped")}
    state: dict[str, Any] = {"name": name, "nproc": args.nproc, "runs": {k: str(v) for k, v in runs.items()},
                             "rc": {}, "stop": {}}
    save = lambda: _save_json(path, state)  # noqa: E731
    children = _Children()
    train = ["train", "-q", "-c", args.config, *args.set, "deterministic=true"]
    if args.teacher:
        train.append(f"teacher.checkpoint={args.teacher}")
    nproc = ["--nproc", str(args.nproc)] if args.nproc > 1 else []
    aikd = [sys.executable, "-m", "aikd"]
    logs = work / "logs"
    save()
    for key in ("straight", "repeat"):
        state["rc"][key] = children.run([*aikd, *train, "-o", str(runs[key]), *nproc], logs / f"{name}-{key}.log")
        save()
    if args.nproc > 1:  # the ranks agree on a signal only every 25 steps: stop at an epoch's end instead
        state["stop"]["how"] = "--stop-after 1"
        rc = children.run([*aikd, *train, "-o", str(runs["stopped"]), *nproc, "--stop-after", "1"],
                          logs / f"{name}-stopped.log")
        expected = 0
    else:
        state["stop"]["how"] = f"SIGTERM after batch {args.stop_at.split(':')[1]} of epoch {args.stop_at.split(':')[0]}"
        rc = children.run([sys.executable, str(Path(__file__).resolve()), "aikd", "--record",
                           str(work / "records" / f"{name}-stopped.json"), "--device", args.device,
                           "--sigterm-at", args.stop_at, "--", *train, "-o", str(runs["stopped"])],
                          logs / f"{name}-stopped.log")
        expected = 128 + signal.SIGTERM
    state["stop"].update({"rc": rc, "expected_rc": expected,
                          "epochs_before_resume": len(_jsonl(runs["stopped"] / "metrics.jsonl")),
                          "message": next((line for line in _lines(logs / f"{name}-stopped.log")
                                           if "Stopped by" in line or "stopped after epoch" in line), None)})
    save()
    state["rc"]["resumed"] = children.run([*aikd, *train, "-o", str(runs["stopped"]), *nproc, "--resume"],
                                          logs / f"{name}-resumed.log")
    state["done"] = True
    save()
    return 0


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------- verdicts


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail}


def _not_run(name: str, why: str = "its step did not run") -> dict[str, str]:
    return _check(name, "not run", why)


def nonfinite(records: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The numbers of a run's epoch records and summary that are NaN or infinite ('epoch 2 train.loss')."""
    bad = [f"epoch {r.get('epoch', i + 1)} {k}" for i, r in enumerate(records) for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    return bad + [f"summary {k}" for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]


def _compared(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.endswith(UNCOMPARED_SUFFIXES)}


def compare_runs(a: Path, b: Path) -> list[str]:
    """Where two run folders differ: every epoch's record (metrics.jsonl) and the summary, timing and memory
    keys aside ('epoch 2 train.loss: 0.5312 vs 0.5318'); empty when they agree exactly."""
    diffs: list[str] = []
    ra, rb = _jsonl(a / "metrics.jsonl"), _jsonl(b / "metrics.jsonl")
    if len(ra) != len(rb):
        diffs.append(f"{len(ra)} epoch records vs {len(rb)}")
    for x, y in zip(ra, rb, strict=False):
        x, y = _compared(x), _compared(y)
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                diffs.append(f"epoch {x.get('epoch', '?')} {key}: {x.get(key)} vs {y.get(key)}")
    sa, sb = _read_json(a / "summary.json"), _read_json(b / "summary.json")
    if sa is None or sb is None:
        diffs.append(f"summary.json missing in {a if sa is None else b}")
    else:
        sa, sb = _compared(sa), _compared(sb)
        diffs += [f"summary {k}: {sa.get(k)} vs {sb.get(k)}" for k in sorted(set(sa) | set(sb))
                  if sa.get(k) != sb.get(k)]
    return diffs


def _largest_gap(runs: tuple[Path, Path]) -> float:
    """The largest absolute difference between the two runs' numbers (0 when they agree)."""
    a, b = runs
    pairs = list(zip(_jsonl(a / "metrics.jsonl"), _jsonl(b / "metrics.jsonl"), strict=False))
    pairs.append((_read_json(a / "summary.json") or {}, _read_json(b / "summary.json") or {}))
    gaps = [abs(x[k] - y[k]) for x, y in pairs for k in _compared(x) if isinstance(x.get(k), float)
            and isinstance(y.get(k), float) and math.isfinite(x[k]) and math.isfinite(y[k])]
    return max(gaps, default=0.0)


def check_methods(record: dict[str, Any] | None) -> dict[str, str]:
    """Fails when a method's run crashed or did not finish, a number of it is not finite, or a registered method
    had no run."""
    name = "every method runs"
    if not record:
        return _not_run(name)
    runs = record.get("runs") or []
    problems = []
    for run in runs:
        label = run.get("config", "?")
        if run.get("status") != "ok":
            problems.append(f"{label} {run.get('status', '?')}{': ' + run['error'] if run.get('error') else ''}")
            continue
        bad = nonfinite(run.get("epochs_records") or [], run.get("summary") or {})
        if bad:
            problems.append(f"{label} not finite: {', '.join(bad[:3])}")
    ran = {r.get("method") for r in runs if r.get("status") == "ok"}
    missing = [m for m in record.get("registered") or [] if m not in ran]
    if missing and record.get("done"):
        problems.append(f"no finished run of {', '.join(missing)}")
    if problems:
        return _check(name, "fail", "; ".join(problems))
    if not record.get("done"):
        return _check(name, "fail", f"stopped after {len(runs)} runs")
    syncs = [r["syncs"]["per_step"] for r in runs if (r.get("syncs") or {}).get("per_step") is not None]
    return _check(name, "pass", f"{len(runs)} runs, {len(ran)} methods, finite; host syncs per step "
                                f"{min(syncs, default=0):.2f} to {max(syncs, default=0):.2f}")


def check_compile(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Fails when a run with train.compile fell back to eager (CompiledOrEager's reason, or its warning)."""
    name = "torch.compile does not fall back"
    compiled = [r for r in rows if r.get("compile")]
    if not compiled:
        return _not_run(name, "no compiled run")
    fell = [f"{r['label']}: {r.get('compile_failed') or (r.get('compile_warnings') or ['?'])[0]}"
            for r in compiled if r.get("compile_failed") or r.get("compile_warnings")]
    if fell:
        return _check(name, "fail", "; ".join(fell))
    return _check(name, "pass", f"{len(compiled)} compiled runs, none fell back")


def check_resume(record: dict[str, Any] | None, name: str = "resume") -> dict[str, str]:
    """Fails when the stopped run did not stop as asked, a run failed, a repeat of the uninterrupted run differs
    (deterministic mode is not), or the resumed run's epoch records or summary differ from the uninterrupted's."""
    title = f"{name}: stopped and resumed = uninterrupted"
    if not record:
        return _not_run(title)
    if not record.get("done"):
        return _check(title, "fail", "the step stopped before its last run")
    runs = {k: Path(v) for k, v in record["runs"].items()}
    rc, stop = record.get("rc") or {}, record.get("stop") or {}
    failed = [f"{k} exited {v}" for k, v in rc.items() if v != 0]
    if stop.get("rc") != stop.get("expected_rc"):
        failed.append(f"the stopped run exited {stop.get('rc')}, not {stop.get('expected_rc')} ({stop.get('how')})")
    elif stop.get("epochs_before_resume", 0) >= _epochs(runs["straight"]):
        failed.append("the stopped run finished before it was stopped")
    if failed:
        return _check(title, "fail", "; ".join(failed))
    problems = []
    repeat = compare_runs(runs["straight"], runs["repeat"])
    if repeat:
        problems.append(f"two uninterrupted runs differ with deterministic=true ({len(repeat)} numbers, largest gap "
                        f"{_largest_gap((runs['straight'], runs['repeat'])):.3g}: {repeat[0]})")
    resumed = compare_runs(runs["straight"], runs["stopped"])
    if resumed:
        problems.append(f"the resumed run differs ({len(resumed)} numbers, largest gap "
                        f"{_largest_gap((runs['straight'], runs['stopped'])):.3g}: {resumed[0]})")
    where = f"{stop.get('how')}, {record.get('nproc', 1)} process(es)"
    if problems:
        return _check(title, "fail", f"{where}: " + "; ".join(problems))
    bad = nonfinite(_jsonl(runs["straight"] / "metrics.jsonl"), _read_json(runs["straight"] / "summary.json") or {})
    if bad:
        return _check(title, "fail", f"not finite: {', '.join(bad[:3])}")
    return _check(title, "pass", f"{where}: every epoch record and the summary equal, and a repeat equal too")


def _epochs(run: Path) -> int:
    return len(_jsonl(run / "metrics.jsonl"))


def check_precision(record: dict[str, Any] | None) -> dict[str, str]:
    """Fails when a run crashed or has a non-finite number, or when an fp16 or bf16 run's top-1 error exceeds
    its fp32 run's by PRECISION_TOLERANCE points or comes within CHANCE_MARGIN of chance."""
    name = "fp16 and bf16 do not diverge"
    if not record:
        return _not_run(name)
    problems, notes = [], []
    runs = record.get("runs") or []
    for config in dict.fromkeys(r.get("config") for r in runs):
        mine = {r["amp"]: r for r in runs if r.get("config") == config}
        for amp, run in mine.items():
            if run.get("status") != "ok":
                problems.append(f"{config} {amp} {run.get('status')}{': ' + run['error'] if run.get('error') else ''}")
            elif bad := nonfinite(run.get("epochs_records") or [], run.get("summary") or {}):
                problems.append(f"{config} {amp} not finite: {', '.join(bad[:3])}")
        ref = mine.get("off")
        if not ref or ref.get("status") != "ok":
            continue
        chance = 100.0 * (1 - 1 / (ref.get("num_classes") or 10))
        ref_err = ref["summary"].get("top1_err")
        if ref_err is None or ref_err >= chance - CHANCE_MARGIN:
            problems.append(f"{config} fp32 did not learn (top-1 error {ref_err}, chance {chance:.0f})")
            continue
        for amp in ("fp16", "bf16"):
            run = mine.get(amp)
            if not run or run.get("status") != "ok":
                continue
            err = run["summary"].get("top1_err")
            if err is None or err > ref_err + PRECISION_TOLERANCE or err >= chance - CHANCE_MARGIN:
                problems.append(f"{config} {amp}: top-1 error {err} vs fp32's {ref_err:.2f} (chance {chance:.0f})")
            notes.append(f"{config} {amp} {err:.2f} vs {ref_err:.2f}"
                         f"{'' if run.get('amp_dtype') not in (None, 'None') else ' (autocast off on this device)'}")
    if problems:
        return _check(name, "fail", "; ".join(problems))
    if not record.get("done"):
        return _check(name, "fail", f"stopped after {len(runs)} runs")
    return _check(name, "pass", "; ".join(notes) or "no low-precision run")


def check_steps(steps: list[dict[str, Any]]) -> dict[str, str]:
    """Fails when a step failed, timed out, or was skipped for time (optional steps skipped are only noted)."""
    name = "every step ran"
    bad = [f"{s.get('step')} {s.get('status')}" for s in steps if s.get("status") in ("failed", "timed-out", "skipped")]
    if bad:
        return _check(name, "fail", "; ".join(bad))
    return _check(name, "pass", f"{len(steps)} steps")


def checks(work: Path, rows: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Every verdict of the check, from what WORK holds."""
    rows = _rows(work) if rows is None else rows
    return [check_steps(_jsonl(work / "steps.jsonl")),
            check_methods(_read_json(work / "checks" / "methods.json")),
            check_compile(rows),
            check_precision(_read_json(work / "checks" / "precision.json")),
            check_resume(_read_json(work / "checks" / "resume.json"), "resume"),
            check_resume(_read_json(work / "checks" / "ddp.json"), "ddp")]


def cmd_verdict(args: argparse.Namespace) -> int:
    results = checks(Path(args.work))
    for c in results:
        print(f"gpu_check: {c['status'].upper():7} {c['check']}: {c['detail']}")
    return 1 if any(c["status"] == "fail" for c in results) else 0


# ---------------------------------------------------------------------------------------------- report


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, steps.jsonl); a missing file has none."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return rows


def _run_row(step: str, fit: dict[str, Any], label: str) -> dict[str, Any]:
    run_dir = Path(fit["out"])
    epochs = _jsonl(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json") or {}
    n = fit.get("num_train") or summary.get("num_train")
    row: dict[str, Any] = {
        "step": step, "label": label, "method": fit.get("method"), "recipe": fit.get("recipe"),
        "model": fit.get("model"), "compile": fit.get("compile"), "amp": fit.get("amp_dtype"),
        "channels_last": fit.get("channels_last"), "device": fit.get("device"), "num_train": n,
        "steps_per_epoch": fit.get("steps_per_epoch"), "batch_size": fit.get("batch_size"),
        "epochs_planned": fit.get("epochs"), "epochs_done": len(epochs), "finished": bool(fit.get("done")),
        "epoch_time_s": [e.get("time_s") for e in epochs],
        "images_per_s": [n / e["time_s"] if n and e.get("time_s") else None for e in epochs],
        "peak_allocated_mib": fit.get("peak_allocated_mib"), "peak_reserved_mib": fit.get("peak_reserved_mib"),
        "fit_wall_s": fit.get("fit_wall_s"),
        "top1_err": summary.get("top1_err", epochs[-1].get("test.top1_err") if epochs else None),
        "critic_steps": summary.get("critic_steps"), "compile_failed": fit.get("compile_failed"),
        "run_dir": str(run_dir),
    }
    return row


def _rows(work: Path) -> list[dict[str, Any]]:
    rows = []
    for step in STEP_ORDER:
        record = _read_json(work / "records" / f"{step}.json")
        if not record:
            continue
        fits = record.get("fits") or []
        for i, fit in enumerate(fits):
            which = "phase 1" if i < len(fits) - 1 else "phase 2"
            phase = "" if len(fits) == 1 else f" / {which} ({fit.get('method')})"
            row = _run_row(step, fit, step + phase)
            row["compile_warnings"] = record.get("compile_warnings") or []
            rows.append(row)
    # Time per image against CE's with the same compile setting, and images/s compiled over eager, each on the last
    # (steadiest) epoch that both runs finished.
    for row in rows:
        ref = next((r for r in rows if r["method"] == "ce" and r["compile"] == row["compile"]), None)
        ratio = _same_epoch(ref, row)
        row["time_vs_ce"] = ratio
    eager = {r["step"].split("-")[0]: r for r in rows if r["compile"] is False}
    for row in rows:
        base = eager.get(row["step"].split("-")[0]) if row["compile"] else None
        ratio = _same_epoch(row, base) if base is not None and base["method"] == row["method"] else None
        row["compiled_speedup"] = ratio
    return rows


def _same_epoch(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """a's images/s over b's on the last epoch both have (None where either has none)."""
    if a is None or b is None:
        return None
    pairs = [(x, y) for x, y in zip(a["images_per_s"], b["images_per_s"], strict=False) if x and y]
    return pairs[-1][0] / pairs[-1][1] if pairs else None


def _bench_summary(path: Path) -> dict[str, Any] | None:
    bench = _read_json(path)
    if not isinstance(bench, dict):
        return None
    steps = bench.get("step_costs") or {}
    return {
        "file": str(path), "quick": bench.get("quick"), "wall_s": bench.get("wall_s"),
        "device": (bench.get("machine") or {}).get("device"),
        "aikd_over_ce_time_by_model": bench.get("aikd_over_ce_time_by_model"),
        "rows": [{k: r.get(k) for k in ("model", "method", "ms_per_step", "ratio")} for r in steps.get("rows", [])],
        "pairs": [{k: p.get(k) for k in ("model", "method", "reference", "ratio")} for p in steps.get("pairs", [])],
        "settings": steps.get("settings"), "loader_speedup": bench.get("loader_speedup"),
        "fashion_source": next((r.get("source") for r in bench.get("loaders", []) if r.get("dataset") ==
                                "fashion-mnist"), None),
        "aikd_over_ce_peak_rss": bench.get("aikd_over_ce_peak_rss"),
    }




def _f(value: Any, fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _acceptance_markdown(result: dict[str, Any]) -> list[str]:
    """The verdicts, then each method's short run (host syncs per step) and the precision runs."""
    lines = ["## Acceptance checks", ""]
    lines += _table(["check", "verdict", "detail"], [[c["check"], c["status"].upper(), c["detail"].replace("|", "/")]
                                                     for c in result.get("checks") or []], "lll")
    methods = result.get("methods") or {}
    if methods.get("runs"):
        counter = next((r["syncs"]["counter"] for r in methods["runs"] if r.get("syncs")), "-")
        lines += ["", "## Every method, one short run", "",
                  f"Configs of {methods.get('configs')}, each with the settings above; the methods with a teacher "
                  f"distil from the CE run. Host syncs: counted over the training epoch by {counter}, per "
                  f"optimizer step; sites: where in aikd they are called.", ""]
        table = []
        for r in methods["runs"]:
            s, summary = r.get("syncs") or {}, r.get("summary") or {}
            sites = ", ".join(f"{k} x{v}" for k, v in (s.get("sites") or {}).items())
            table.append([r.get("config", "?"), r.get("method") or "-", r.get("status", "?"),
                          _f(summary.get("top1_err"), "{:.2f}"), _f(r.get("seconds"), "{:.1f}"),
                          _f(s.get("per_step"), "{:.2f}"), sites or "-", r.get("error", "").replace("|", "/")])
        lines += _table(["config", "method", "status", "top-1 err %", "seconds", "syncs/step", "sync sites", "error"],
                        table, "lllrrrll")
    precision = result.get("precision") or {}
    if precision.get("runs"):
        lines += ["", "## Precision", ""]
        lines += _table(["config", "train.amp", "autocast", "status", "top-1 err %", "NLL", "grad scale", "error"],
                        [[r.get("config", "?"), r.get("amp", "?"), str(r.get("amp_dtype", "-")), r.get("status", "?"),
                          _f((r.get("summary") or {}).get("top1_err"), "{:.2f}"),
                          _f((r.get("summary") or {}).get("nll"), "{:.3f}"), _f(r.get("grad_scale"), "{:g}"),
                          r.get("error", "").replace("|", "/")] for r in precision["runs"]], "llllrrrl")
    return [*lines, ""]



def markdown(result: dict[str, Any]) -> str:
    env, settings = result.get("env") or {}, result.get("settings") or {}
    gpu = env.get("gpu")
    where = (f"{gpu} (sm {env.get('gpu_capability')}, {_f(env.get('gpu_memory_mib'))} MiB"
             f"{', ' + env['nvidia_smi'] if env.get('nvidia_smi') else ''})") if gpu else env.get("device", "?")
    lines = [f"# aikd GPU check, {env.get('date', '?')}", "",
             f"Machine: {where}; {env.get('cpu_count')} CPUs; torch {env.get('torch')} (CUDA build "
             f"{env.get('cuda_build')}, cuDNN {env.get('cudnn', '-')}), Python {env.get('python')}.",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", ""]
    lines += _acceptance_markdown(result)
    rows = result.get("runs") or []
    lines += ["## Training throughput and peak GPU memory", "",
              "images/s = training images / the epoch's training time (metrics.jsonl `time_s`: the epoch's steps, "
              "without evaluation); epoch 1 includes cuDNN autotuning and, compiled, torch.compile. `vs CE`: time "
              "per image over CE's with the same compile setting, on the last epoch; `compiled`: images/s over the "
              "same run eager. CL: channels_last. Peak memory: torch.cuda.max_memory_allocated (reserved) over the "
              "run.", ""]
    if rows:
        table = []
        for r in rows:
            ips = r["images_per_s"]
            notes = [n for n in ("" if r["finished"] else f"{r['epochs_done']}/{r['epochs_planned']} epochs",
                                 f"compile fell back: {r['compile_failed']}" if r["compile_failed"] else
                                 "; ".join(r["compile_warnings"][:1])) if n]
            layout = f"{r['amp'] if r['amp'] not in (None, 'None') else 'fp32'}{', CL' if r['channels_last'] else ''}"
            table.append([r["label"], r["method"], "yes" if r["compile"] else "no", layout, _f(r["num_train"]),
                          _f(ips[0] if ips else None), _f(ips[1] if len(ips) > 1 else None),
                          _f(r["time_vs_ce"], "{:.2f}x"), _f(r["compiled_speedup"], "{:.2f}x"),
                          _f(r["peak_allocated_mib"]), _f(r["peak_reserved_mib"]), _f(r["top1_err"], "{:.2f}"),
                          _f(r["critic_steps"], "{}"), "; ".join(notes)])
        lines += _table(["run", "method", "compile", "AMP, layout", "train images", "epoch 1 img/s", "epoch 2 img/s",
                         "vs CE", "compiled", "peak alloc MiB", "peak reserved MiB", "top-1 err %", "critic steps",
                         "notes"], table, "llllrrrrrrrrrl")
    else:
        lines.append("No training run recorded.")
    lines.append("")
    bench = result.get("bench")
    lines += ["## Step costs (`aikd bench`)", ""]
    if bench:
        head = ", ".join(f"{m} {v:.2f}x" for m, v in (bench.get("aikd_over_ce_time_by_model") or {}).items())
        lines += [f"`aikd bench{' --quick' if bench['quick'] else ''} --device {bench.get('device')}` took "
                  f"{_f(bench.get('wall_s'))} s. AI-KD step over CE's: {head}. Loader part (CPU): aikd "
                  f"{_f(bench.get('loader_speedup'), '{:.1f}x')} torchvision + PIL on {bench.get('fashion_source')}; "
                  f"peak RSS (CPU) AI-KD {_f(bench.get('aikd_over_ce_peak_rss'), '{:.2f}x')} CE. "
                  f"Full tables: bench.md.", ""]
        models = list(dict.fromkeys(r["model"] for r in bench["rows"]))
        by = {(r["model"], r["method"]): r for r in bench["rows"]}
        methods = list(dict.fromkeys(r["method"] for r in bench["rows"]))
        table = [[m, *[c for model in models for c in (
            (_f(by[(model, m)]["ms_per_step"], "{:.1f}"), _f(by[(model, m)]["ratio"], "{:.2f}x"))
            if (model, m) in by else ("", ""))]] for m in methods]
        lines += _table(["method", *[c for model in models for c in (f"{model} ms/step", "vs CE")]], table,
                        "l" + "rr" * len(models))
        if bench["pairs"]:
            lines += ["", *_table(["model", "method", "reference", "method / reference"],
                                  [[p["model"], p["method"], p["reference"], _f(p["ratio"], "{:.3f}x")]
                                   for p in bench["pairs"]], "lllr")]
    else:
        lines.append("No bench result (bench.json) yet.")
    lines += ["", "## Steps", ""]
    steps = result.get("steps") or []
    lines += _table(["step", "status", "rc", "seconds", "detail"],
                    [[s.get("step", "?"), s.get("status", "?"), str(s.get("rc", "")), _f(s.get("seconds")),
                      s.get("detail", "")] for s in steps], "llrrl") if steps else ["None ran yet."]
    return "\n".join(lines).rstrip() + "\n"


def _pack_small_files(work: Path, out: Path) -> None:
    """OUT/runs.tar.gz: every run's small files, the records, the checks and the step logs (no checkpoints)."""
    tmp = out / "runs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if "checkpoints" in path.parts or "tensorboard" in path.parts or not path.is_file():
                continue
            if path.name in SMALL_FILES or path.parent.name in ("records", "logs", "checks") \
                    or path.name == "steps.jsonl":
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(out / "runs.tar.gz")


def cmd_report(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(s.split("=", 1) for s in args.setting)
    rows = _rows(work)
    result = {"env": _read_json(work / "env.json"), "settings": settings, "checks": checks(work, rows),
              "methods": _read_json(work / "checks" / "methods.json"),
              "precision": _read_json(work / "checks" / "precision.json"),
              "resume": _read_json(work / "checks" / "resume.json"), "ddp": _read_json(work / "checks" / "ddp.json"),
              "runs": rows, "bench": _bench_summary(out / "bench.json"), "steps": _jsonl(work / "steps.jsonl")}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "gpu_check.md").write_text(text)
    _pack_small_files(work, out)
    if args.print:
        print(text, end="")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    """Append one line to WORK/steps.jsonl (bash cannot write JSON safely)."""
    entry = {"step": args.name, "status": args.status, "rc": args.rc, "seconds": args.seconds, "detail": args.detail}
    with open(Path(args.work) / "steps.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quiet-missing", action="store_true", help="no message when torch is missing (exit 3 says it)")
    p = sub.add_parser("aikd")
    p.add_argument("--record", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sigterm-at", metavar="EPOCH:BATCH", help="send this process SIGTERM after that batch")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("methods")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", required=True, help="a folder of configs: one run of each")
    p.add_argument("--set", action="append", default=[], help="an override for every run, KEY=VALUE")
    p = sub.add_parser("precision")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("resume")
    p.add_argument("--work", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", required=True)
    p.add_argument("--teacher")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--stop-at", default="2:3", metavar="EPOCH:BATCH")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("verdict")
    p.add_argument("--work", required=True)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--setting", action="append", default=[])
    p.add_argument("--print", action="store_true")
    p = sub.add_parser("step")
    p.add_argument("--work", required=True)
    p.add_argument("name")
    p.add_argument("status")
    p.add_argument("rc", type=int)
    p.add_argument("seconds", type=int)
    p.add_argument("detail", nargs="?", default="")
    args = parser.parse_args(argv)
    if args.command == "aikd" and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    commands = {"probe": cmd_probe, "aikd": cmd_aikd, "methods": cmd_methods, "precision": cmd_precision,
                "resume": cmd_resume, "verdict": cmd_verdict, "report": cmd_report, "step": cmd_step}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
