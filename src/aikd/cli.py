"""The ``aikd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aikd.errors import AikdError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

EPILOG_MAIN = """\
examples:
  aikd demo -o runs/demo
  aikd pipeline -c configs/fashion_mnist/aikd.yaml -o runs/aikd seed=1
  aikd train -c configs/fashion_mnist/ce.yaml -o runs/ce train.epochs=2 data.train_limit=2000
  aikd eval -k runs/ce/checkpoints/last.safetensors -o runs/ce/eval.json
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or epoch lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aikd",
        description="Train and compare image classifiers with self-knowledge distillation (AI-KD).",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train one model with one method from a YAML config",
        description="Train one model with the method, data and recipe of a YAML config. "
                    "KEY=VALUE overrides change any config key (dotted).",
        epilog="example:\n  aikd train -c configs/fashion_mnist/ce.yaml -o runs/ce "
               "train.epochs=2 data.train_limit=2000 seed=1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    p.add_argument("-o", "--out", required=True, help="output folder of the run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in OUT")
    _add_common(p)

    p = sub.add_parser(
        "eval", help="evaluate a saved model on its test split",
        description="Evaluate a checkpoint on the test split of the dataset it was trained on. "
                    "KEY=VALUE overrides adjust the saved config (for example data.root).",
        epilog="example:\n  aikd eval -k runs/ce/checkpoints/last.safetensors -o eval.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", "--checkpoint", required=True, help="a .safetensors checkpoint")
    p.add_argument("-o", "--out", help="write the metrics to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _add_common(p)

    p = sub.add_parser(
        "pipeline", help="two phases: train the superior model with CE, then the student against it",
        description="Phase 1 trains the superior (teacher) model with CE and the student's recipe; phase 2 "
                    "trains the student with the config's method against it. A finished phase-1 model with "
                    "the same settings is reused. Overrides apply to both phases; prefix one with phase1. or "
                    "phase2. to target a single phase. teacher.checkpoint=PATH skips phase 1.",
        epilog="example:\n  aikd pipeline -c configs/fashion_mnist/aikd.yaml -o runs/aikd seed=1 "
               "phase1.train.epochs=20",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="YAML config of the student's run")
    p.add_argument("-o", "--out", required=True, help="output folder (student/ and superior/ inside)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--cache", help="folder of phase-1 models to share between pipelines (default OUT/superior)")
    p.add_argument("--overwrite", action="store_true", help="replace a student run in OUT made with another config")
    _add_common(p)

    p = sub.add_parser(
        "demo", help="the main job: AI-KD on the embedded Fashion-MNIST",
        description="Run the AI-KD pipeline on Fashion-MNIST (Debian's dataset-fashion-mnist) with the demo "
                    "recipe: the CE baseline (phase 1), then the AI-KD student (phase 2), and print both.",
        epilog="example:\n  aikd demo -o runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _add_common(p)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from aikd.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before the heavy imports
    from aikd.engine import train

    summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    print(json.dumps(_headline(summary)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from aikd.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.overrides, quiet=args.quiet)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from aikd.engine.pipeline import run_pipeline

    result = run_pipeline(args.config, args.overrides, args.out, cache_dir=args.cache, quiet=args.quiet,
                          overwrite=args.overwrite, log=_logger(args.quiet))
    print(json.dumps({"superior": result["superior"] and _headline(result["superior"]),
                      "student": _headline(result["student"])}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aikd.engine.pipeline import run_pipeline
    from aikd.report.tables import markdown_table

    config = REPO_CONFIGS / "fashion_mnist" / "aikd.yaml"
    result = run_pipeline(config, args.overrides, args.out, quiet=args.quiet, overwrite=True, log=_logger(args.quiet))
    rows = [("Baseline (phase 1, CE)", result["superior"]), ("AI-KD (phase 2)", result["student"])]
    print(markdown_table(rows))
    return 0


def _logger(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def _headline(summary: dict) -> dict:
    keys = ("method", "model", "dataset", "seed", "epochs", "top1_err", "top5_err", "macro_f1",
            "ece", "nll")
    return {k: summary[k] for k in keys}


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "pipeline": cmd_pipeline, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AikdError as err:
        print(f"aikd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aikd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
