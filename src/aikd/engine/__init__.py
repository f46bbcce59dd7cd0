"""The training loop, optimisation, checkpoints and runtime set-up."""

from aikd.engine.trainer import Trainer, train

__all__ = ["Trainer", "train"]
