"""The ``aikd`` command line: one function per sub-command, each registered with its arguments by
:func:`command`, in the order ``aikd --help`` lists them."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aikd.errors import RESUME_RERUN, RESUME_TRAIN, AikdError, RunInterrupted, exit_code
from aikd.fileio import atomic_write_bytes, check_output_file, check_output_folder
from aikd.rendezvous import adopt_slurm_ranks, leave_group
from aikd.shipped import CONFIG_ROOT, resolve_config, shipped_configs

if TYPE_CHECKING:
    from aikd.engine.output import Output

EPILOG_MAIN = """\
examples:
  aikd demo -o runs/demo
  aikd configs fmnist_proxy
  aikd train -c fmnist_proxy/ce -o runs/ce_proxy
  aikd pipeline -c configs/fashion_mnist/aikd.yaml -o runs/aikd seed=1
  aikd train -c configs/fashion_mnist/ce.yaml -o runs/ce train.epochs=2 data.train_limit=2000
  aikd eval -k runs/ce/checkpoints/last.safetensors -o runs/ce/eval.json
  aikd sweep -c configs/fashion_mnist/aikd.yaml configs/fashion_mnist/pskd.yaml --seeds 0 1 2 -o runs/sweep
  aikd report runs/sweep -f md --plots runs/sweep/figures
"""


CONFIG_HELP = "a YAML file, or a shipped config by name (fmnist_proxy/aikd; 'aikd configs' lists them)"


@dataclass(frozen=True)
class Arg:
    """One argument of a command: what ``ArgumentParser.add_argument`` is given."""

    names: tuple[str, ...]
    options: dict[str, Any]


def arg(*names: str, **options: Any) -> Arg:
    return Arg(names, options)


@dataclass(frozen=True)
class Group:
    """Arguments shown under a heading of their own in the command's help."""

    title: str
    description: str
    args: tuple[Arg, ...]


def group(title: str, description: str, *args: Arg) -> Group:
    return Group(title, description, args)


@dataclass(frozen=True)
class Command:
    """A sub-command: its help (ending with a worked example), its arguments and the function that runs it."""

    name: str
    help: str
    description: str
    example: str
    arguments: tuple[Arg | Group, ...]
    overrides: str | None  # the help of its KEY=VALUE config overrides; None: it takes none
    quiet: bool  # it takes -q/--quiet
    run: Callable[[argparse.Namespace], int]

    def add_to(self, sub: Any) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.description,
                           epilog=f"example:\n  {self.example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        for item in self.arguments:
            if isinstance(item, Group):
                section = p.add_argument_group(item.title, item.description)
                for a in item.args:
                    section.add_argument(*a.names, **a.options)
            else:
                p.add_argument(*item.names, **item.options)
        if self.overrides:
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=self.overrides)
        if self.quiet:
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or epoch lines")


_COMMANDS: dict[str, Command] = {}  # filled by @command, in the order of this file: the order of the help


def command(name: str, *, help: str, description: str, example: str, arguments: tuple[Arg | Group, ...] = (),
            overrides: str | None = None, quiet: bool = True) -> Callable[[Callable[[argparse.Namespace], int]],
                                                                            Callable[[argparse.Namespace], int]]:
    """Register the decorated function as the sub-command ``name``: adding a command is writing one function."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in _COMMANDS:
            raise ValueError(f"aikd {name} is registered twice")
        _COMMANDS[name] = Command(name, help, description, example, tuple(arguments), overrides, quiet, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aikd",
        description="Train and compare image classifiers with self-knowledge distillation (AI-KD).",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in _COMMANDS.values():
        cmd.add_to(sub)
    return parser


@command(
    "train",
    help="train one model with one method from a YAML config",
    description="Train one model with the method, data and recipe of a YAML config. "
                "KEY=VALUE overrides change any config key (dotted).",
    example="aikd train -c configs/fashion_mnist/ce.yaml -o runs/ce "
            "train.epochs=2 data.train_limit=2000 seed=1",
    arguments=(
        arg("-c", "--config", required=True, help=CONFIG_HELP),
        arg("-o", "--out", required=True, help="output folder of the run"),
        arg("--resume", nargs="?", const="last", metavar="auto|PATH",
            help="continue the run in OUT: from checkpoints/last.safetensors; 'auto': from the newest valid "
                 "checkpoint there, or start fresh if there is none (for preemptible jobs); or from PATH"),
        arg("--overwrite", action="store_true", help="replace a finished run in OUT"),
        arg("--stop-after", type=int, metavar="EPOCH",
            help="end after this epoch with a checkpoint and no summary, to split a long run over "
                 "several jobs (each next one with --resume)"),
        arg("--nproc", type=int, metavar="N",
            help="data-parallel training in N processes on this machine (one per GPU; gloo on CPU): "
                 "a shortcut for 'torchrun --nproc-per-node N -m aikd train ...'"),
    ),
    overrides="config overrides",
)
def cmd_train(args: argparse.Namespace) -> int:
    from aikd.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before the heavy imports
    check_output_folder(args.out, "run folder", ("checkpoints",))
    if args.nproc is not None:
        return _relaunch_with_torchrun(args.nproc, args.argv)
    from aikd.config import recipe_name
    from aikd.engine import train

    summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, output=_output(args),
                    recipe=recipe_name(args.config, cfg.model.name, cfg.method), stop_after=args.stop_after)
    if _is_main_process():
        print(json.dumps(_headline(summary)) if summary else
              f"aikd: stopped after epoch {args.stop_after} as asked; continue with the same command plus --resume")
    return 0


def _relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """``aikd train --nproc N ...`` becomes ``torchrun --nproc-per-node N -m aikd train ...`` (same process id,
    so a scheduler's signals reach torchrun, which passes them on to every rank)."""
    from aikd.distributed import launched_as_rank

    if nproc < 1:
        raise AikdError(f"--nproc {nproc}: give the number of processes, 1 or more.")
    rest = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                  or (i > 0 and argv[i - 1] == "--nproc"))]
    if launched_as_rank():
        raise AikdError("--nproc starts torchrun itself; under torchrun (or as one of several tasks of srun), "
                        "leave it out.")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "aikd", *rest]
    print(f"aikd: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


@command(
    "eval",
    help="evaluate a saved model on its test split",
    description="Evaluate a checkpoint on the test split of the dataset it was trained on. "
                "KEY=VALUE overrides adjust the saved config (for example data.root).",
    example="aikd eval -k runs/ce/checkpoints/last.safetensors -o eval.json",
    arguments=(
        arg("-k", "--checkpoint", required=True, help="a .safetensors checkpoint"),
        arg("-o", "--out", help="write the metrics to this JSON file"),
        arg("--calibrate", action="store_true",
            help="fit temperature scaling on the run's held-out training images (data.holdout) and "
                 "report ECE and NLL after it"),
        arg("--plot", help="with --calibrate: write the reliability diagram to this PNG "
                 "(default: next to -o, else none)"),
    ),
    overrides="config overrides",
)
def cmd_eval(args: argparse.Namespace) -> int:
    from aikd.evaluation import evaluate_checkpoint

    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out and args.calibrate else None)
    if args.plot and not args.calibrate:
        raise AikdError("--plot draws the reliability diagram of --calibrate; add --calibrate.")
    for path, what in ((args.out, "evaluation file"), (plot, "reliability diagram")):
        if path:
            check_output_file(path, what)  # before the evaluation, not after it
    result = evaluate_checkpoint(args.checkpoint, args.overrides, quiet=args.quiet, calibrate=args.calibrate,
                                 plot=plot)
    text = json.dumps(result, indent=2)
    if args.out:
        atomic_write_bytes(Path(args.out), (text + "\n").encode())
    print(text)
    return 0


SLURM_OPTIONS = ("partition", "time", "cpus_per_task", "gpus_per_job", "tasks_per_job", "nodes", "gpus_per_node",
                 "tasks_per_node", "mem", "array_parallelism")


@command(
    "sweep",
    help="run configs x seeds through the pipeline, resuming where a previous sweep stopped",
    description="Run every (config, seed) pair with 'aikd pipeline' into OUT/<folder>/<config>/seed<k>, "
                "sharing one phase-1 cache (OUT/superior) so a superior or teacher model is trained "
                "once per seed. Finished pairs are reused and unfinished ones resumed, so running "
                "the same command again continues a stopped sweep. Overrides apply to every run.",
    example="aikd sweep -c configs/fashion_mnist/aikd.yaml configs/fashion_mnist/pskd.yaml "
            "--seeds 0 1 2 -o runs/sweep data.holdout=0.1",
    arguments=(
        arg("-c", "--config", nargs="+", help=f"{CONFIG_HELP}; several"),
        arg("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)"),
        arg("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
            help="run every combination of these values (repeat --grid for more keys), each in its own "
                 "folder OUT/<folder>/<config>/<KEY=V,...>/seed<k> and as its own row in 'aikd report'"),
        arg("-o", "--out", help="output folder of the sweep"),
        arg("--cache", help="folder of phase-1 models (default OUT/superior): share them with another sweep"),
        arg("--jobs", type=int, default=1, metavar="N",
            help="run N pipelines at once, each in its own process with its share of the CPU threads, or "
                 "one GPU each when there are GPUs (default 1); the results are a serial sweep's"),
        arg("--overwrite", action="store_true",
            help="replace a run in OUT made with another config (otherwise refused; an unfinished run of "
                 "the same config continues where it stopped)"),
        arg("--status", metavar="OUT", help="show every run of the Slurm sweep in OUT: its state, job and log"),
        group("Slurm",
              "--launcher slurm submits one job per run (phase-1 models first, the runs that need them waiting "
              "on them); the same command again submits only the runs that are neither finished nor queued",
              arg("--launcher", choices=("local", "slurm"), default="local",
                  help="local: run here (default); slurm: submit to the cluster with sbatch"),
              arg("--wait", action="store_true", help="with slurm: return once every job has ended"),
              arg("--slurm-config", metavar="FILE",
                  help="YAML of the options below (top level or a slurm: section); the options override it"),
              arg("--partition"),
              arg("--time", help="time limit per job, in Slurm's format (4:00:00)"),
              arg("--cpus-per-task", type=int, metavar="N", help="CPUs (and torch threads) per task (default 1)"),
              arg("--gpus-per-job", type=int, metavar="N",
                  help="GPUs per job, on one node; the job runs one data-parallel task per GPU"),
              arg("--tasks-per-job", type=int, metavar="N",
                  help="data-parallel tasks (ranks) per job without GPUs (gloo), for example to test DDP"),
              arg("--nodes", type=int, metavar="N",
                  help="nodes per job: one data-parallel run across N nodes (with --gpus-per-node, or "
                       "--tasks-per-node without GPUs; instead of --gpus-per-job / --tasks-per-job)"),
              arg("--gpus-per-node", type=int, metavar="G", help="GPUs on each node of a job; one task per GPU"),
              arg("--tasks-per-node", type=int, metavar="T",
                  help="data-parallel tasks (ranks) on each node of a job (default: --gpus-per-node, or 1)"),
              arg("--mem", help="memory per node (16G)"),
              arg("--array-parallelism", type=int, metavar="N", help="at most N tasks of each job array at once"),
        ),
    ),
    overrides="config overrides for every run",
)
def cmd_sweep(args: argparse.Namespace) -> int:
    from aikd.engine.sweep import run_sweep

    if args.status:
        from aikd.engine.slurm_queue import format_status, sweep_status

        print(format_status(sweep_status(Path(args.status))))
        return 0
    if not args.config or not args.out:
        raise AikdError("aikd sweep needs -c CONFIG... and -o OUT (or --status OUT).")
    if args.launcher == "slurm":
        if args.overwrite:
            raise AikdError("--overwrite applies to --launcher local only: remove the runs to replace, then "
                            "submit again.")
        return _slurm_sweep(args)
    given = [f"--{k.replace('_', '-')}" for k in (*SLURM_OPTIONS, "slurm_config") if getattr(args, k) is not None]
    if given or args.wait:
        raise AikdError(f"{' '.join(given or ['--wait'])} applies to --launcher slurm only.")
    done = run_sweep(args.config, args.seeds, args.out, args.overrides, grid=args.grid, cache_dir=args.cache,
                     jobs=args.jobs, output=_output(args), overwrite=args.overwrite)
    print(f"aikd sweep: {len(done)} runs finished in {args.out}; tables: aikd report {args.out}")
    return 0


def _slurm_sweep(args: argparse.Namespace) -> int:
    from aikd.engine.slurm import read_options, submit_sweep, write_results
    from aikd.engine.slurm_queue import format_status, wait_for
    from aikd.engine.sweep import sweep_tasks

    if args.jobs != 1:
        raise AikdError("--jobs runs pipelines side by side on this machine; with --launcher slurm use "
                        "--array-parallelism.")
    options = read_options(args.slurm_config, {k: getattr(args, k) for k in SLURM_OPTIONS})
    out = Path(args.out).resolve()  # jobs and status find it from any folder
    tasks = sweep_tasks(args.config, args.seeds, out, args.overrides, grid=args.grid,
                        cache_dir=Path(args.cache).resolve() if args.cache else None)
    submit_sweep(tasks, out, options, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.wait:
        rows = wait_for(out)
        print(format_status(rows))
        if not all(r["state"] == "finished" for r in rows):
            return 1
        write_results(tasks, out)
    return 0


@command(
    "report",
    help="the paper's tables (2, 3, 4) from the run summaries under a folder",
    description="Collect every summary.json under DIR into the paper's tables: Table 2 (Top-1 error "
                "and macro F1), Table 3 (Top-5 error, ECE, ECE after temperature scaling) and Table 4 "
                "(AI-KD ablation); mean ± std over seeds, best bold, second underlined. Then every method's "
                "paired difference to the Baseline over the same seeds: mean and 95% Student t interval, "
                "starred (and bold) where the interval excludes 0.",
    example="aikd report runs/sweep -f latex -o tables.tex --plots runs/sweep/figures",
    arguments=(
        arg("dir", nargs="+", help="folders holding finished runs (searched recursively; several make one "
                 "report)"),
        arg("-f", "--format", choices=("md", "csv", "latex"), default="md", help="output format"),
        arg("-o", "--out", help="write the tables to this file instead of printing them"),
        arg("--plots", help="also write, per dataset and model, a reliability diagram, learning curves "
                 "(test error and ECE against epoch, mean over seeds with a band), a forest plot "
                 "of the paired differences to the Baseline and a map of every method's paired "
                 "error against its ECE, sized by cost, into this folder"),
    ),
    quiet=False,
)
def cmd_report(args: argparse.Namespace) -> int:
    from aikd.report.figures import forest_figures, learning_curve_figures, reliability_figures, tradeoff_figures
    from aikd.report.paper import paper_tables
    from aikd.report.render import render
    from aikd.report.runs import collect_runs

    if args.out:
        check_output_file(args.out, "report file", example=f"tables.{'tex' if args.format == 'latex' else args.format}")
    if args.plots:
        check_output_folder(args.plots, "figure folder")
    runs, duplicates = collect_runs(*args.dir)
    text = render(paper_tables(runs), args.format)
    if duplicates:
        print(f"aikd report: {duplicates} runs repeat a (recipe, dataset, model, seed) already counted "
              f"and were left out", file=sys.stderr)
    if args.out:
        atomic_write_bytes(Path(args.out), text.encode())
    else:
        print(text)
    if args.plots:
        for path in [*reliability_figures(runs, args.plots), *learning_curve_figures(runs, args.plots),
                     *forest_figures(runs, args.plots), *tradeoff_figures(runs, args.plots)]:
            print(f"aikd report: wrote {path}", file=sys.stderr)
    return 0


@command(
    "tsne",
    help="t-SNE map of penultimate features of chosen classes, one panel per model",
    description="Embed the penultimate features of the same test images of the chosen classes for each "
                "checkpoint with scikit-learn's t-SNE, and draw them side by side in one PNG "
                "(the paper's Figure 6: student vs superior model).",
    example="aikd tsne -k runs/aikd/student/checkpoints/last.safetensors "
            "runs/aikd/superior/*/checkpoints/last.safetensors --names AI-KD Superior "
            "--classes 0 1 2 3 4 -o tsne.png",
    arguments=(
        arg("-k", "--checkpoints", nargs="+", required=True, help=".safetensors checkpoints"),
        arg("--names", nargs="+", help="panel titles, one per checkpoint"),
        arg("--classes", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="class indices"),
        arg("--per-class", type=int, default=200, help="test images per class (default 200)"),
        arg("-o", "--out", default="tsne.png", help="output PNG (default tsne.png)"),
    ),
    overrides="overrides of the saved configs",
)
def cmd_tsne(args: argparse.Namespace) -> int:
    from aikd.evaluation import tsne_panels
    from aikd.report.tsne import tsne_plot

    check_output_file(args.out, "t-SNE figure", example="tsne.png")  # before the features and the embedding
    panels, class_names = tsne_panels(args.checkpoints, args.names, args.classes, args.per_class, args.overrides)
    path = tsne_plot(panels, args.classes, class_names, args.out)
    print(f"aikd tsne: wrote {path}")
    return 0


@command(
    "pipeline",
    help="two phases: train the superior model with CE, then the student against it",
    description="Phase 1 trains the superior (teacher) model with CE and the student's recipe; phase 2 "
                "trains the student with the config's method against it. A finished phase-1 model with "
                "the same settings is reused. Overrides apply to both phases; prefix one with phase1. or "
                "phase2. to target a single phase. teacher.checkpoint=PATH skips phase 1.",
    example="aikd pipeline -c configs/fashion_mnist/aikd.yaml -o runs/aikd seed=1 "
            "phase1.train.epochs=20",
    arguments=(
        arg("-c", "--config", required=True, help=f"{CONFIG_HELP}: the student's run"),
        arg("-o", "--out", required=True, help="output folder (student/ and superior/ inside)"),
        arg("--cache", help="folder of phase-1 models to share between pipelines (default OUT/superior)"),
        arg("--overwrite", action="store_true", help="replace a student run in OUT made with another config"),
    ),
    overrides="config overrides",
)
def cmd_pipeline(args: argparse.Namespace) -> int:
    from aikd.engine.pipeline import run_pipeline

    result = run_pipeline(args.config, args.overrides, args.out, cache_dir=args.cache, output=_output(args),
                          overwrite=args.overwrite)
    if _is_main_process():
        print(json.dumps({"superior": result["superior"] and _headline(result["superior"]),
                          "student": _headline(result["student"])}))
    return 0


@command(
    "check-data",
    help="decode every image file a config's run would use, before training",
    description="Read the config's dataset as a run would (its subset, validation and test images) and "
                "decode every image file: a missing, unreadable or truncated file is listed with the reason. "
                "Exits with 1 when any file is bad. For array datasets (IDX files, CIFAR pickles) reading "
                "them already checks every byte that matters. data.skip_bad_files=true makes a run leave "
                "bad files out instead of stopping.",
    example="aikd check-data -c configs/cub200/aikd_resnet18.yaml data.root=/data/CUB_200_2011",
    arguments=(
        arg("-c", "--config", required=True, help=f"{CONFIG_HELP}: the run to check"),
    ),
    overrides="config overrides",
)
def cmd_check_data(args: argparse.Namespace) -> int:
    from aikd.config import load_config
    from aikd.data import load_data
    from aikd.data.check import find_bad_files
    from aikd.data.splits import FileSplit

    cfg = load_config(args.config, args.overrides)
    cfg.data.skip_bad_files = False  # the point is to see them
    data = load_data(cfg.data)
    splits = [("training", data.train), (data.eval_split, data.test)]
    if data.holdout is not None:
        splits.insert(1, ("holdout", data.holdout))
    if not isinstance(data.train, FileSplit):
        sizes = ", ".join(f"{len(split)} {name}" for name, split in splits)
        print(f"aikd: {cfg.data.name}: {sizes} images read and checked (array files: nothing to decode).")
        return 0
    bad = []
    for name, split in splits:
        found = find_bad_files(split)
        bad += [(name, path, problem) for path, problem in found]
        print(f"aikd: {name} split: {len(split)} files decoded, {len(found)} bad", file=sys.stderr, flush=True)
    for name, path, problem in bad:
        print(f"{path}\t{name}\t{problem}")
    if bad:
        print(f"aikd: {len(bad)} bad image files (listed above, tab-separated: file, split, reason); run with "
              f"data.skip_bad_files=true to leave them out, or replace them.", file=sys.stderr)
        return 1
    print(f"aikd: {cfg.data.name}: every image file decodes.", file=sys.stderr)
    return 0


@command(
    "export",
    help="a trained model as a plain state dict for its architecture and as ONNX",
    description="Write OUT/model.safetensors (the weights under the names of the architecture's own library: "
                "timm, torchvision or aikd), OUT/model.onnx (normalized images in, logits out, any batch size) "
                "and OUT/export.json (classes, input size and normalization, how to load each file).",
    example="aikd export -k runs/aikd/student/checkpoints/last.safetensors -o exported",
    arguments=(
        arg("-k", "--checkpoint", required=True, help="a .safetensors checkpoint written by aikd"),
        arg("-o", "--out", required=True, help="output folder"),
        arg("--no-onnx", action="store_true", help="write the state dict only"),
    ),
)
def cmd_export(args: argparse.Namespace) -> int:
    from aikd.export import export_checkpoint

    record = export_checkpoint(args.checkpoint, args.out, onnx=not args.no_onnx)
    print(json.dumps(record, indent=2))
    return 0


@command(
    "demo",
    help="the main job: AI-KD on the embedded Fashion-MNIST",
    description="Run the AI-KD pipeline on Fashion-MNIST (Debian's dataset-fashion-mnist) in the proxy regime "
                "(configs/fmnist_proxy: CE fits its training data and is over-confident, as in the paper): "
                "the CE baseline (phase 1), then the AI-KD student (phase 2); print both and their difference.",
    example="aikd demo -o runs/demo",
    arguments=(
        arg("-o", "--out", default="runs/demo", help="output folder (default runs/demo)"),
        arg("--overwrite", action="store_true",
            help="replace a finished run of another config in OUT (otherwise refused; an unfinished demo "
                 "of the same config continues where it stopped)"),
    ),
    overrides="config overrides",
)
def cmd_demo(args: argparse.Namespace) -> int:
    from aikd.engine.pipeline import run_pipeline
    from aikd.report.render import markdown_table

    config = CONFIG_ROOT / "fmnist_proxy" / "aikd.yaml"
    # A finished run of another config in OUT is refused, not replaced (--overwrite replaces it); an unfinished
    # demo continues where it stopped.
    result = run_pipeline(config, args.overrides, args.out, output=_output(args), overwrite=args.overwrite)
    rows = [("Baseline (phase 1, CE)", result["superior"]), ("AI-KD (phase 2)", result["student"])]
    print(markdown_table(rows))
    print()
    print(demo_difference(result["superior"], result["student"]))
    cost = demo_cost(result["superior"], result["student"])
    if cost:
        print(cost)
    return 0


def demo_cost(baseline: dict, student: dict) -> str | None:
    """What the two phases cost on this machine: their training times, and AI-KD's from nothing over one CE run."""
    phase1, phase2 = baseline.get("train_time_s"), student.get("train_time_s")
    if not phase1 or phase2 is None:
        return None
    return (f"Training time on this machine: Baseline {phase1:.0f} s, AI-KD student {phase2:.0f} s; two-phase "
            f"AI-KD from nothing costs {(phase1 + phase2) / phase1:.2f}x one CE run (a reused phase-1 model "
            f"counts with its original time).")


def demo_difference(baseline: dict, student: dict) -> str:
    """AI-KD minus Baseline on the demo's metrics, for one seed, and where the paired result over seeds is."""
    parts = [f"Top-1 error {student['top1_err'] - baseline['top1_err']:+.2f} points",
             f"ECE {student['ece'] - baseline['ece']:+.2f} points", f"NLL {student['nll'] - baseline['nll']:+.4f}"]
    if baseline.get("ece_ts") is not None and student.get("ece_ts") is not None:
        parts.append(f"ECE after temperature scaling {student['ece_ts'] - baseline['ece_ts']:+.2f} points")
    return (f"AI-KD - Baseline, seed {student['seed']}: {', '.join(parts)} (negative is better). One seed is one "
            f"draw: the paired comparison over 10-14 seeds and 6-10 draws of the training images, with 95% "
            f"intervals, is in docs/results/fmnist_proxy.md.")


@command(
    "configs",
    help="list the configs that ship with aikd (usable by name with -c)",
    description="List the shipped configs, one per paper setting, with their method, model and dataset. "
                "Any of them runs by name, wherever aikd is installed: aikd train -c NAME -o OUT. "
                "--show prints one config's YAML, to copy and edit.",
    example="aikd configs cifar100   # or: aikd configs --show fmnist_proxy/aikd",
    arguments=(
        arg("filter", nargs="?", default="", help="only names containing this text"),
        arg("--show", metavar="NAME", help="print this config's YAML"),
    ),
    quiet=False,
)
def cmd_configs(args: argparse.Namespace) -> int:
    import yaml

    from aikd.config import RunConfig

    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return 0
    names = [n for n in shipped_configs() if args.filter in n]
    if not names:
        raise AikdError(f"No shipped config name contains '{args.filter}'; 'aikd configs' lists all of them.")
    rows, default = [], RunConfig()
    for name in names:  # what each file says, else the default it runs with
        data = yaml.safe_load((CONFIG_ROOT / f"{name}.yaml").read_text()) or {}
        rows.append((name, str(data.get("method", default.method)),
                     str((data.get("model") or {}).get("name", default.model.name)),
                     str((data.get("data") or {}).get("name", default.data.name))))
    from aikd.text import aligned

    print("\n".join(aligned([("name", "method", "model", "dataset"), *rows])))
    return 0


@command(
    "bench",
    help="measure every method's step cost relative to CE, the input pipeline and memory",
    description="Side-by-side benchmarks on this machine, printed as Markdown (the machine on the "
                "first line): (1) every method's training-step time over CE's on the same model, batch "
                "and data, each timed between two CE epochs, median over rounds; (2) augmented, "
                "normalized training images/s of aikd's data path against torchvision datasets + PIL "
                "transforms + DataLoader at its best worker count, on the same Fashion-MNIST IDX and "
                "CIFAR-100 pickle files, alone and feeding the same CE training steps; (3) peak resident "
                "memory of AI-KD over CE in fresh processes, and the prediction buffer's bytes per sample "
                "with its size for ImageNet-1k, and its memory per rank and per node there before and after "
                "sharding (measured on a real 2-rank gloo job at a smaller shape: allocation, rank 0's save, "
                "a resume). The full run takes about 10 minutes on 2 CPU cores.",
    example="aikd bench --quick -o bench.json   # also writes bench.md",
    arguments=(
        arg("--quick", action="store_true",
            help="the small CNN only, with CE, AI-KD, AI-KD without the adversarial loss, online AI-KD "
                 "(EMA and milestone), PS-KD and KD, shorter timings (about 40 s on 2 CPU cores)"),
        arg("-o", "--out", metavar="OUT.json",
            help="write the results as JSON to OUT.json and the Markdown report beside it (OUT.md)"),
        arg("--device", default="cpu", metavar="DEVICE",
            help="where the step costs are timed: cpu (default), cuda, auto; with AMP and channels_last "
                 "as training uses them there (the loader and memory parts always run on the CPU)"),
    ),
    quiet=False,
)
def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aikd.bench import FULL_PLAN, QUICK_PLAN, markdown_report, run_bench
    from aikd.engine.runtime import pick_device

    out = Path(args.out) if args.out else None
    if out is not None:  # before the minutes of timing, not after
        if out.suffix == ".md":
            raise AikdError(f"-o {out}: give the JSON file's name (OUT.json); the Markdown report goes beside it.")
        for path, what, example in ((out, "bench results", "bench.json"),
                                    (out.with_suffix(".md"), "bench report", "bench.md")):
            check_output_file(path, what, example=example)
    device = str(pick_device(args.device))  # refuses cuda on a machine without one, by name
    result = run_bench(replace(QUICK_PLAN if args.quick else FULL_PLAN, device=device))
    report = markdown_report(result)
    print(report, end="")
    if out is not None:
        atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
        atomic_write_bytes(out.with_suffix(".md"), report.encode())
        print(f"aikd bench: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def _output(args: argparse.Namespace) -> Output:
    """Progress messages on stderr, nothing with --quiet; one voice in a distributed run (rank 0)."""
    from aikd.engine.output import Output

    return Output.on_stderr(args.quiet).for_rank(_is_main_process())


def _is_main_process() -> bool:
    """Rank 0 under torchrun or srun (read from the environment: works before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def _headline(summary: dict) -> dict:
    keys = ("method", "model", "dataset", "seed", "epochs", "top1_err", "top5_err", "macro_f1",
            "ece", "nll")
    return {k: summary[k] for k in keys}


def _is_override(text: str) -> bool:
    """KEY=VALUE with a dotted config key, and not a file that happens to hold '='."""
    return re.match(r"^[A-Za-z_][\w.]*=", text) is not None and not Path(text).is_file()


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse the command line with KEY=VALUE overrides allowed anywhere after the command, options included
    (``aikd train -c C -o OUT --quiet data.train_limit=5``); argparse alone takes them only before the first
    option that follows them."""
    args, extra = parser.parse_known_args(argv)
    configs = getattr(args, "config", None)
    if isinstance(configs, list):  # sweep's -c takes several files: an override right after them is not one
        extra = [c for c in configs if _is_override(c)] + extra
        args.config = [c for c in configs if not _is_override(c)]
    late = [a for a in extra if _is_override(a)]
    unknown = [a for a in extra if a not in late]
    if late and not hasattr(args, "overrides"):
        unknown += late
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:  # in the order they were typed: a later override of the same key wins
        given = [*(args.overrides or []), *late]
        positions = [i for i, a in enumerate(argv) if a in given]
        args.overrides = [argv[i] for i in positions]
    return args


def _resolve_configs(args: argparse.Namespace) -> None:
    """``-c NAME`` of a shipped config becomes its file, so runs record a real path (an existing path wins)."""
    config = getattr(args, "config", None)
    if isinstance(config, list):
        args.config = [str(resolve_config(c)) for c in config]
    elif config is not None:
        args.config = str(resolve_config(config))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(build_parser(), argv)
    args.argv = argv
    adopt_slurm_ranks()  # a task of srun is a rank, known before any output is made
    code, together = 1, False
    try:
        _resolve_configs(args)
        code = _COMMANDS[args.command].run(args)
        together = code == 0
        return code
    except AikdError as err:  # a stopped run (exit 128 + N) or a message naming the problem (exit 2)
        # The ranks of a stopped run agreed on the step to stop at, so all of them reach the barrier: none exits
        # while rank 0 still writes the checkpoint (which srun --kill-on-bad-exit would cut short).
        together = isinstance(err, RunInterrupted)
        return exit_code(err)
    except BrokenPipeError:  # the reader left early (aikd configs | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a write that failed during the run (the paths were checked before it started)
        if err.filename is None and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        advice = RESUME_TRAIN if args.command == "train" else RESUME_RERUN
        where = f"'{err.filename}'" if err.filename else "a file being written"
        cause = "no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
            (err.strerror or type(err).__name__).lower()
        print(f"aikd: error: {cause}: {where}. Fix that, then run {advice}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aikd: interrupted", file=sys.stderr)
        return 130
    finally:
        leave_group(together)


if __name__ == "__main__":
    sys.exit(main())
