"""Where a run's numbers go: JSON lines, TensorBoard (when installed), a tracker (MLflow), one line per epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from aikd.engine.output import Output
from aikd.engine.tracking import NO_TRACKER, Tracker


class RunLogger:
    """Appends one JSON object per epoch to metrics.jsonl and mirrors it elsewhere."""

    def __init__(self, out_dir: Path, output: Output | None = None, tensorboard: bool = True,
                 tracker: Tracker = NO_TRACKER) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.quiet = (output or Output()).quiet  # no epoch lines, no banner
        self.tracker = tracker  # the trainer opens and finishes it; the logger hands it each epoch
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    @classmethod
    def silent(cls) -> RunLogger:
        """A logger that writes and prints nothing: the non-zero ranks of a distributed run."""
        logger = cls.__new__(cls)
        logger.path, logger.quiet, logger.writer, logger.tracker = None, True, None, NO_TRACKER
        return logger

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "epoch":
                    self.writer.add_scalar(key.replace(".", "/"), value, record["epoch"])
            self.writer.flush()
        self.tracker.log_epoch(record)
        if not self.quiet:
            print(format_epoch(record), file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_epoch(record: dict[str, Any]) -> str:
    """``epoch 3/15  loss 0.412 (ce 0.412)  train_acc 85.1  top1_err 12.30  lr 0.1  21.4s``."""
    parts = [f"epoch {record['epoch']}/{record['epochs']}"]
    terms = {k.split(".", 1)[1]: v for k, v in record.items() if k.startswith("loss.")}
    if "train.loss" in record:
        detail = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
        parts.append(f"loss {record['train.loss']:.4g}" + (f" ({detail})" if len(terms) > 1 else ""))
    if "train.acc" in record:
        parts.append(f"train_acc {record['train.acc']:.2f}")
    for key in ("test.top1_err", "test.ece"):
        if key in record:
            parts.append(f"{key.split('.')[1]} {record[key]:.2f}")
    parts.append(f"lr {record['lr']:.3g}")
    parts.append(f"{record['time_s']:.1f}s")
    return "  ".join(parts)
