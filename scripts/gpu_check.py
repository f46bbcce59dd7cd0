"""Helper of scripts/gpu_check.sh: probe the machine, wrap aikd runs to record peak GPU memory, write the report.

  python scripts/gpu_check.py probe --device cuda      # one JSON line on stdout; exit 2 without CUDA, 3 without torch
  python scripts/gpu_check.py aikd --record R.json --device cuda -- train -c CONFIG -o RUN KEY=VALUE ...
  python scripts/gpu_check.py report --work WORK --out OUT [--print] [--setting KEY=VALUE ...]

``aikd`` runs ``aikd.cli.main`` in this process and records, for every training run it makes (each
``Trainer.fit``: a pipeline's phase 1 and phase 2 apart), its folder, training-set size, steps per epoch, AMP and
channels_last as resolved, and torch.cuda.max_memory_allocated / max_memory_reserved over that run, plus any
"torch.compile failed" fallback warning. The record is written when a run starts and again when it ends (also when
SIGTERM interrupts it), so a killed step still leaves what it had.

``report`` reads WORK (records, run folders, steps.jsonl) and OUT/bench.json and writes OUT/gpu_check.json,
OUT/gpu_check.md and OUT/runs.tar.gz (the small files of every run: summaries, metrics, configs, records, logs).
It needs neither torch nor aikd and tolerates every missing file, so it can run after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

STEP_ORDER = ("ce-eager", "aikd-eager", "online-eager", "ce-compiled", "aikd-compiled", "online-compiled", "bench")
SMALL_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "pipeline.json", "reliability.json")


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
                     "nvidia_smi": _nvidia_smi()})
    print(json.dumps(info))
    return 0


# ---------------------------------------------------------------------------------------------- aikd wrapper


def cmd_aikd(args: argparse.Namespace) -> int:
    import torch

    from aikd import cli
    from aikd.engine import trainer as trainer_module

    record = Path(args.record)
    record.parent.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    state: dict[str, Any] = {"argv": args.argv, "fits": [], "compile_warnings": [], "rc": None}

    def save() -> None:
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(record)

    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "torch.compile" in str(message):
            state["compile_warnings"].append(str(message))
            save()
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    fit = trainer_module.Trainer.fit

    def describe(trainer) -> dict[str, Any]:
        p = trainer.parts
        return {"method": trainer.cfg.method, "recipe": trainer.recipe, "model": trainer.cfg.model.name,
                "num_train": len(p.data.train), "batch_size": trainer.cfg.data.batch_size,
                "steps_per_epoch": len(p.train_loader), "epochs": trainer.cfg.train.epochs,
                "compile": trainer.cfg.train.compile, "amp_dtype": str(p.amp_dtype).replace("torch.", ""),
                "channels_last": p.channels_last, "device": str(p.device)}

    def recorded_fit(self, *fit_args, **fit_kwargs):
        p = getattr(self, "parts", None)
        entry: dict[str, Any] = {"out": str(self.out), "done": False}
        try:
            entry.update(describe(self))
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


def markdown(result: dict[str, Any]) -> str:
    env, settings = result.get("env") or {}, result.get("settings") or {}
    gpu = env.get("gpu")
    where = (f"{gpu} (sm {env.get('gpu_capability')}, {_f(env.get('gpu_memory_mib'))} MiB"
             f"{', ' + env['nvidia_smi'] if env.get('nvidia_smi') else ''})") if gpu else env.get("device", "?")
    lines = [f"# aikd GPU check, {env.get('date', '?')}", "",
             f"Machine: {where}; {env.get('cpu_count')} CPUs; torch {env.get('torch')} (CUDA build "
             f"{env.get('cuda_build')}, cuDNN {env.get('cudnn', '-')}), Python {env.get('python')}.",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", ""]
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
    """OUT/runs.tar.gz: every run's small files, the records and the step logs (no checkpoints)."""
    tmp = out / "runs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if "checkpoints" in path.parts or "tensorboard" in path.parts or not path.is_file():
                continue
            if path.name in SMALL_FILES or path.parent.name in ("records", "logs") or path.name == "steps.jsonl":
                tar.add(path, arcname=str(path.relative_to(work)))
    tmp.replace(out / "runs.tar.gz")


def cmd_report(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(s.split("=", 1) for s in args.setting)
    result = {"env": _read_json(work / "env.json"), "settings": settings, "runs": _rows(work),
              "bench": _bench_summary(out / "bench.json"), "steps": _jsonl(work / "steps.jsonl")}
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
    p.add_argument("argv", nargs=argparse.REMAINDER)
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
    return {"probe": cmd_probe, "aikd": cmd_aikd, "report": cmd_report, "step": cmd_step}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
