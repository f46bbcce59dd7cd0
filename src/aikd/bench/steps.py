"""Training-step cost of every method relative to CE, on the same model, batch and data.

All trainers of one setting are built first and warmed up, then timed in one
interleaved sequence CE, m1, CE, m2, CE, ... so that every method's epoch sits
between two CE epochs. Its ratio is its time over the mean of those two, which
cancels slow drift (thermal, another process starting); the median over rounds
discards the odd outlier.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aikd.config import load_config
from aikd.data.augment import BatchAugment, crop_padding_for
from aikd.data.loaders import DataBundle, Loading
from aikd.data.splits import ArraySplit
from aikd.engine.checkpoint import save_checkpoint
from aikd.engine.model_io import model_meta
from aikd.models import build_model, resolve_stem

# Variants benchmarked beside the registered methods: name -> (method, config overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "aikd_no_adv": ("aikd", ["aikd.adv_weight=0"]),
    # The critic of a CPU-length run (critic_schedule=run_length in configs/fmnist_proxy): 10 steps per student step.
    "aikd_critic10": ("aikd", ["aikd.critic_steps=10"]),
    # The whole AI-KD step compiled (train.compile: the student, the frozen forwards, the critic's K steps and Adam
    # as one region), against eager.
    "aikd_critic10_compiled": ("aikd", ["aikd.critic_steps=10", "train.compile=true"]),
    # Online AI-KD, its superior model switched on from the first step: the EMA's forward and update, or the
    # milestone copy's forward (docs/methods/aikd.md).
    "aikd_online_ema": ("aikd", ["aikd.superior=ema", "aikd.superior_start=0.0"]),
    "aikd_online_milestone": ("aikd", ["aikd.superior=milestone", "aikd.superior_start=0.001"]),
}


# What the critic costs, measured side by side: (method, its reference without what the critic adds).
# AI-KD with the proxy's 10 critic steps against No Adv (the same step without L_A and the critic), AI-KD with one
# critic step against KD (one frozen teacher forward: the floor for a method with a frozen teacher), and the
# compiled AI-KD step against the eager one.
PAIRS: tuple[tuple[str, str], ...] = (("aikd_critic10", "aikd_no_adv"), ("aikd", "kd"),
                                      ("aikd_critic10_compiled", "aikd_critic10"))


@dataclass(frozen=True)
class Setting:
    """One model on data of one shape, and how it is timed.

    Every timing is one epoch of ``steps`` batches of ``batch`` images; each method is timed ``rounds`` times.
    """

    model: str
    channels: int
    size: int
    classes: int
    batch: int = 128
    steps: int = 4
    rounds: int = 3

    @property
    def samples(self) -> int:
        return self.batch * self.steps

    @property
    def label(self) -> str:
        return f"{self.model} ({self.channels}x{self.size}x{self.size}, {self.classes} classes, batch {self.batch})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SMALL_CNN = Setting("small_cnn", 1, 28, 10, steps=4, rounds=5)
# One step of PreAct ResNet-18 at batch 128 takes 4-7 s on 2 CPU cores: one step per timing is long enough,
# and 3 rounds of 12 methods keep it near 8 minutes there.
PREACT_RESNET18 = Setting("preact_resnet18", 3, 32, 100, steps=1, rounds=3)


def benchmarked_methods() -> list[str]:
    """CE (the reference) first, then AI-KD and its ablation, then every other registered method.

    Read from the registry so that a newly added method is benchmarked without editing this file.
    """
    from aikd.methods.base import METHODS

    others = sorted(set(METHODS.names()) - {"ce", "aikd"})
    return ["ce", "aikd", *VARIANTS, *others]


def synthetic_bundle(s: Setting, cfg) -> DataBundle:
    """Random uint8 images held in memory, as Fashion-MNIST or CIFAR are after reading.

    The step cost does not depend on pixel values, and in-memory data keeps file reading out of it.
    """
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.samples, s.channels, s.size, s.size), dtype=torch.uint8, generator=g)
    labels = torch.arange(s.samples) % s.classes
    split = ArraySplit(images, labels, [str(i) for i in range(s.classes)])
    mean, std = (0.5,) * s.channels, (0.25,) * s.channels
    augment = BatchAugment(mean, std, crop_padding_for(s.size), True, True)
    test = split.subset(torch.arange(min(256, s.samples)))
    return DataBundle("synthetic", split, test, s.classes, s.channels, s.size, augment, Loading.of(cfg.data))


def teacher_checkpoint(s: Setting, folder: Path) -> Path:
    """A randomly initialised model of the student's architecture: a teacher forward costs the same."""
    model = build_model(s.model, s.classes, s.channels, s.size)
    meta = model_meta(s.model, resolve_stem("auto", s.size), s.classes, s.channels, s.size,
                      [str(i) for i in range(s.classes)])
    return save_checkpoint(folder / f"teacher-{s.model}.safetensors", model.state_dict(), meta)


def build_trainer(s: Setting, name: str, teacher: Path, folder: Path, epochs: int, device: str = "cpu",
                  overrides: Sequence[str] = ()):
    """A Trainer of method (or variant) ``name`` on the synthetic data of ``s``, on ``device``, with config
    ``overrides`` after the variant's own.

    ``epochs`` only sizes the learning-rate schedule and the methods' epoch-dependent weights; it must cover
    every epoch the caller runs so those stay in their intended range.
    """
    from aikd.engine import Trainer

    method, extra = VARIANTS.get(name, (name, []))
    cfg = load_config(None, [f"method={method}", f"model.name={s.model}", f"data.batch_size={s.batch}",
                             f"train.epochs={epochs}", f"teacher.checkpoint={teacher}", f"device={device}", *extra,
                             *overrides])
    return Trainer(cfg, folder / name, quiet=True, data=synthetic_bundle(s, cfg))


def step_seconds(trainer, epoch: int) -> float:
    """Wall time of one training epoch (every step plus the method's epoch hooks) per step.

    Per step rather than per epoch, in case a method's batch sampler makes a different number of batches.
    On a GPU the clock stops after the epoch's end, which waits for the device (its loss sums are read).
    """
    start = time.perf_counter()
    trainer.train_epoch(epoch)
    return (time.perf_counter() - start) / len(trainer.train_loader)


def interleaved_times(trainers: dict[str, Any], rounds: int) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step times of epochs in the order CE, m1, CE, m2, ..., CE, repeated ``rounds`` times.

    Returns (CE times in order, each other method's times by round). Round r's time of the i-th method
    other than CE (both counted from 0) was taken between CE times r * (number of those methods) + i and
    the one after it.
    """
    others = [name for name in trainers if name != "ce"]
    ce_epoch = 1  # epoch 0 of every trainer is its warm-up
    ce_times = [step_seconds(trainers["ce"], ce_epoch)]
    times: dict[str, list[float]] = {name: [] for name in others}
    for r in range(1, rounds + 1):
        for name in others:
            times[name].append(step_seconds(trainers[name], r))
            ce_epoch += 1
            ce_times.append(step_seconds(trainers["ce"], ce_epoch))
    return ce_times, times


def bracketed_ratios(ce_times: list[float], times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each method time over the mean of the two CE times around it (the order of :func:`interleaved_times`)."""
    ratios: dict[str, list[float]] = {}
    for i, (name, seconds) in enumerate(times.items()):
        before = [r * len(times) + i for r in range(len(seconds))]  # CE time just before each of them
        ratios[name] = [t / statistics.mean(ce_times[b:b + 2]) for t, b in zip(seconds, before, strict=True)]
    return ratios


def step_costs(s: Setting, methods: list[str], device: str = "cpu") -> list[dict[str, Any]]:
    """One row per method (CE first, ratio 1): ms per step, CE's ms per step and the median ratio."""
    if methods[0] != "ce":
        raise ValueError("the first benchmarked method must be 'ce', the reference")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher = teacher_checkpoint(s, folder)
        epochs = {name: 1 + s.rounds for name in methods}
        epochs["ce"] = 2 + s.rounds * (len(methods) - 1)  # CE runs once between every two method epochs
        trainers = {name: build_trainer(s, name, teacher, folder, epochs[name], device) for name in methods}
        for trainer in trainers.values():
            trainer.train_epoch(0)  # warm-up: first-touch allocations, lazy initialisation
        ce_times, times = interleaved_times(trainers, s.rounds)
    ce_ms = 1000 * statistics.median(ce_times)
    rows = [{"model": s.model, "method": "ce", "ms_per_step": ce_ms, "ce_ms_per_step": ce_ms, "ratio": 1.0,
             "ratios": [1.0] * s.rounds}]
    for name, ratios in bracketed_ratios(ce_times, times).items():
        rows.append({"model": s.model, "method": name, "ms_per_step": 1000 * statistics.median(times[name]),
                     "ce_ms_per_step": ce_ms, "ratio": statistics.median(ratios), "ratios": ratios})
    return rows


def pair_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each of :data:`PAIRS` timed on a model: its time over its reference's, the median over rounds of the
    per-round ratio of their CE-bracketed ratios (each method's epochs of one round sit close together in time)."""
    out = []
    by_key = {(r["model"], r["method"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for method, reference in PAIRS:
            a, b = by_key.get((model, method)), by_key.get((model, reference))
            if a is None or b is None:
                continue
            per_round = [x / y for x, y in zip(a["ratios"], b["ratios"], strict=True)]
            out.append({"model": model, "method": method, "reference": reference,
                        "ratio": statistics.median(per_round), "ratios": per_round})
    return out


def train_briefly(s: Setting, name: str, epochs: int = 2) -> None:
    """Train ``epochs`` epochs of ``name`` on the synthetic data of ``s`` (the work whose peak memory is taken)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trainer = build_trainer(s, name, teacher_checkpoint(s, folder), folder, epochs)
        for epoch in range(epochs):
            trainer.train_epoch(epoch)
