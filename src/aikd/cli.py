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
        "demo", help="the main job on the embedded Fashion-MNIST",
        description="Train the CE baseline on Fashion-MNIST (Debian's dataset-fashion-mnist) with "
                    "the demo recipe and print its test metrics.",
        epilog="example:\n  aikd demo -o runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _add_common(p)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from aikd.config import load_config
    from aikd.engine import train

    cfg = load_config(args.config, args.overrides)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from aikd.config import load_config
    from aikd.engine import train
    from aikd.report.tables import markdown_table

    config = REPO_CONFIGS / "fashion_mnist" / "ce.yaml"
    cfg = load_config(config, args.overrides)
    summary = train(cfg, Path(args.out) / "baseline", overwrite=True, quiet=args.quiet)
    print(markdown_table([("Baseline (CE)", summary)]))
    return 0


def _headline(summary: dict) -> dict:
    keys = ("method", "model", "dataset", "seed", "epochs", "top1_err", "top5_err", "macro_f1",
            "ece", "nll")
    return {k: summary[k] for k in keys}


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}


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
