"""Benchmarks (``aikd bench``): every method's epoch cost relative to CE, measured side by side.

Work in progress (issue 8): the step-cost and buffer-size parts are here; the
loader comparison and peak-memory ratio are still to come.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aikd.config import load_config
from aikd.data.augment import BatchAugment, crop_padding_for
from aikd.data.loaders import DataBundle
from aikd.data.splits import ArraySplit
from aikd.engine.checkpoint import save_checkpoint
from aikd.engine.model_io import model_meta
from aikd.methods.buffer import PredictionBuffer
from aikd.models import build_model, resolve_stem


@dataclass(frozen=True)
class Setting:
    """One model on data of one shape."""

    model: str
    channels: int
    size: int
    classes: int
    batch: int
    samples: int


QUICK = [Setting("small_cnn", 1, 28, 10, 128, 1024)]
FULL = [*QUICK, Setting("preact_resnet18", 3, 32, 100, 128, 1024)]
METHODS = ["ce", "aikd", "aikd_no_adv", "pskd", "kd", "tfkd_self", "tfkd_reg", "cskd", "dkd", "aekt", "bss", "amkd"]
VARIANTS = {"aikd_no_adv": ("aikd", ["aikd.adv_weight=0"])}


def synthetic_bundle(s: Setting, cfg) -> DataBundle:
    """Random uint8 images held in memory, like Fashion-MNIST or CIFAR after reading."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.samples, s.channels, s.size, s.size), dtype=torch.uint8, generator=g)
    labels = torch.arange(s.samples) % s.classes
    classes = [str(i) for i in range(s.classes)]
    split = ArraySplit(images, labels, classes)
    mean, std = (0.5,) * s.channels, (0.25,) * s.channels
    augment = BatchAugment(mean, std, crop_padding_for(s.size), True, True)
    return DataBundle("synthetic", split, split.subset(torch.arange(256)), s.classes, s.channels, s.size, augment,
                      cfg.data)


def teacher_checkpoint(s: Setting, folder: Path) -> Path:
    """A randomly initialised model of the student's architecture: the cost of a teacher forward."""
    model = build_model(s.model, s.classes, s.channels, s.size)
    meta = model_meta(s.model, resolve_stem("auto", s.size), s.classes, s.channels, s.size,
                      [str(i) for i in range(s.classes)])
    return save_checkpoint(folder / f"teacher-{s.model}.safetensors", model.state_dict(), meta)


def epoch_seconds(s: Setting, name: str, teacher: Path, folder: Path) -> float:
    """Wall time of one training epoch of ``name`` (after one warm-up epoch) on the synthetic data."""
    from aikd.engine import Trainer

    method, extra = VARIANTS.get(name, (name, []))
    cfg = load_config(None, [f"method={method}", f"model.name={s.model}", f"data.batch_size={s.batch}",
                             "train.epochs=2", f"teacher.checkpoint={teacher}", "device=cpu", *extra])
    trainer = Trainer(cfg, folder / name, quiet=True, data=synthetic_bundle(s, cfg))
    trainer.train_epoch(0)
    start = time.perf_counter()
    trainer.train_epoch(1)
    return time.perf_counter() - start


def step_costs(settings: list[Setting], repeats: int = 1) -> list[dict[str, Any]]:
    """Each method's epoch time over CE's, CE timed right before each method (drift cancels)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for s in settings:
            teacher = teacher_checkpoint(s, folder)
            for name in METHODS[1:]:
                ratios, times = [], []
                for _ in range(repeats):
                    ce = epoch_seconds(s, "ce", teacher, folder)
                    t = epoch_seconds(s, name, teacher, folder)
                    ratios.append(t / ce)
                    times.append((ce, t))
                rows.append({"model": s.model, "method": name, "ratio": statistics.median(ratios),
                             "ce_s": statistics.median(c for c, _ in times),
                             "method_s": statistics.median(t for _, t in times)})
    return rows


def buffer_bytes_per_sample(classes: int) -> int:
    return PredictionBuffer(1, classes).bytes_per_sample


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | s / epoch | CE s / epoch | vs CE |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {r['method_s']:.2f} | {r['ce_s']:.2f} | {r['ratio']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- input pipeline


class _PilDataset(torch.utils.data.Dataset):
    """The textbook pipeline of the methods' official codes: one PIL image per item, transformed alone."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        from PIL import Image

        self.pil = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()) for img in images]
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.pil[i]), int(self.labels[i])


def loader_images_per_second(s: Setting, batches: int = 20, workers: tuple[int, ...] = (0, 2)) -> dict[str, Any]:
    """Augmented, normalized training images/s: aikd's in-memory path against torchvision + PIL."""
    from torchvision import transforms as T

    from aikd.data.loaders import EpochBatchSampler, TensorLoader

    cfg = load_config(None, ["device=cpu"])
    bundle = synthetic_bundle(s, cfg)
    n = batches * s.batch
    loader = TensorLoader(bundle.train, EpochBatchSampler(len(bundle.train), s.batch, 0))
    g = torch.Generator().manual_seed(0)
    start, done = time.perf_counter(), 0
    while done < n:
        for images, _, _ in loader:
            bundle.augment.train(images, g)
            done += len(images)
            if done >= n:
                break
    ours = done / (time.perf_counter() - start)
    transform = T.Compose([T.RandomCrop(s.size, padding=crop_padding_for(s.size)), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize((0.5,) * s.channels, (0.25,) * s.channels)])
    dataset = _PilDataset(bundle.train.images, bundle.train.labels, transform)
    theirs = {}
    for w in workers:
        dl = torch.utils.data.DataLoader(dataset, batch_size=s.batch, shuffle=True, num_workers=w)
        start, done = time.perf_counter(), 0
        while done < n:
            for images, _ in dl:
                done += len(images)
                if done >= n:
                    break
        theirs[w] = done / (time.perf_counter() - start)
    best = max(theirs, key=theirs.get)
    return {"shape": f"{s.channels}x{s.size}x{s.size}", "aikd_images_per_s": ours,
            "torchvision_images_per_s": theirs[best], "torchvision_workers": best,
            "loader_speedup": ours / theirs[best]}


_RSS_CHILD = """
import resource, sys, tempfile
from pathlib import Path
from aikd.bench import FULL, epoch_seconds, teacher_checkpoint
setting = [s for s in FULL if s.model == sys.argv[1]][0]
with tempfile.TemporaryDirectory() as tmp:
    teacher = teacher_checkpoint(setting, Path(tmp))
    epoch_seconds(setting, sys.argv[2], teacher, Path(tmp))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(s: Setting, name: str) -> float:
    """Peak resident memory (MiB) of a fresh process that trains two epochs of ``name``."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, s.model, name], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1]) / 1024  # Linux reports KiB


def run_bench(quick: bool = False) -> dict[str, Any]:
    """Everything ``aikd bench`` measures, as one JSON-ready dict."""
    settings = QUICK if quick else FULL
    steps = step_costs(settings)
    loaders = [loader_images_per_second(s) for s in settings]
    aikd = [r["ratio"] for r in steps if r["method"] == "aikd"]
    rss = {name: peak_rss_mib(settings[-1], name) for name in ("ce", "aikd")}
    return {"machine": _machine(), "step_costs": steps, "loaders": loaders, "peak_rss_mib": rss,
            "aikd_over_ce_peak_rss": rss["aikd"] / rss["ce"],
            "aikd_over_ce_time": aikd[-1], "loader_speedup": min(r["loader_speedup"] for r in loaders),
            "buffer_bytes_per_sample": {s.model: buffer_bytes_per_sample(s.classes) for s in settings}}


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
