"""One ``aikd bench`` run: every measurement of a plan, side by side, as one JSON-ready dict."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aikd.bench.inputs import (
    compare_end_to_end,
    compare_loaders,
    fashion_mnist_files,
    worker_counts,
    write_cifar100_files,
)
from aikd.bench.memory import buffer_footprint, buffer_scaling, peak_rss_ratio
from aikd.bench.report import machine
from aikd.bench.steps import (
    PREACT_RESNET18,
    SMALL_CNN,
    VARIANTS,
    Setting,
    benchmarked_methods,
    pair_ratios,
    step_costs,
)
from aikd.bench.syncs import method_syncs
from aikd.data.readers import FASHION_MNIST_ROOT


@dataclass(frozen=True)
class BenchPlan:
    """What one run measures and for how long; tests pass tiny plans."""

    settings: tuple[Setting, ...]  # step costs: one model and data shape each
    methods: tuple[str, ...] | None  # None: every registered method and variant; CE must come first
    loader_batches: int  # torchvision batches timed per worker count (aikd: as many, and at least 0.5 s)
    cifar_train_images: int  # images in the CIFAR-100 training pickle written for the loader comparison
    end_to_end_steps: int  # timed training steps with each loader
    memory_setting: Setting  # the run whose peak RSS is compared, AI-KD against CE
    quick: bool = False
    buffer_rows: int = 200_000  # rows of the 1000-class buffer whose memory a 2-rank gloo job measures
    fashion_source: Path | None = Path(FASHION_MNIST_ROOT)  # real Fashion-MNIST; None or absent: random IDX files
    workers: tuple[int, ...] | None = None  # DataLoader worker counts to try; None: 0, 1, 2, ... up to the CPUs
    device: str = "cpu"  # where the step costs are timed (the loader and memory parts run on the CPU)


# Small CNN only; CE, AI-KD (one and 10 critic steps), its ablation and its online variants, and the two closest
# relatives (PS-KD shares the prediction buffer, KD the teacher forward); shorter timings: about 40 s on 2 CPU cores.
QUICK_PLAN = BenchPlan(settings=(Setting("small_cnn", 1, 28, 10, steps=2, rounds=4),),
                       methods=("ce", "aikd", "aikd_critic10", "aikd_no_adv", "aikd_online_ema",
                                "aikd_online_milestone", "pskd", "kd"),
                       loader_batches=20, cifar_train_images=10_000, end_to_end_steps=10,
                       memory_setting=Setting("small_cnn", 1, 28, 10, steps=2), quick=True, buffer_rows=20_000)
# Both models: about 10 minutes on 2 CPU cores, most of it PreAct ResNet-18.
FULL_PLAN = BenchPlan(settings=(SMALL_CNN, PREACT_RESNET18), methods=None, loader_batches=60,
                      cifar_train_images=10_000, end_to_end_steps=30,
                      memory_setting=Setting("preact_resnet18", 3, 32, 100, steps=1))


def _to_stderr(message: str) -> None:
    print(f"aikd bench: {message}", file=sys.stderr, flush=True)


def input_pipeline(plan: BenchPlan, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Loader comparison on Fashion-MNIST and CIFAR-100 files, then end-to-end training on Fashion-MNIST."""
    workers = list(plan.workers if plan.workers is not None else worker_counts())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fashion = fashion_mnist_files(root, plan.fashion_source)
        write_cifar100_files(root, plan.cifar_train_images)
        cifar = f"{plan.cifar_train_images:,} random images written in CIFAR-100's python layout"
        loaders = []
        for name, source in (("fashion-mnist", fashion), ("cifar100", cifar)):
            log(f"loaders: {name}, torchvision at {workers} workers")
            loaders.append(compare_loaders(name, root, source, plan.loader_batches, workers))
        log("end to end: small_cnn CE training fed by each loader")
        e2e = compare_end_to_end("fashion-mnist", root, plan.end_to_end_steps, loaders[0]["torchvision_workers"])
    return loaders, e2e


def headline(rows: list[dict[str, Any]], settings: tuple[Setting, ...]) -> dict[str, Any]:
    """AI-KD's step cost over CE's on each model; the headline one is the last (largest) model's."""
    by_model = {r["model"]: r["ratio"] for r in rows if r["method"] == "aikd"}
    last = settings[-1].model
    return {"aikd_over_ce_time": by_model[last], "aikd_over_ce_time_model": last,
            "aikd_over_ce_time_by_model": by_model}


def host_syncs(methods: list[str], device: str) -> dict[str, float | None]:
    """Each method's host syncs per training step (src/aikd/bench/syncs.py); None for a compiled variant, whose
    step is the eager one's (counting it would only add its compile time)."""
    return {name: None if "train.compile=true" in VARIANTS.get(name, ("", []))[1]
            else method_syncs(name, device=device)["per_step"] for name in methods}


def run_bench(plan: BenchPlan = FULL_PLAN, log: Callable[[str], None] = _to_stderr) -> dict[str, Any]:
    """Everything ``aikd bench`` measures, in one process (memory in fresh child processes)."""
    start, host = time.perf_counter(), machine(plan.device)  # the load average before this run adds its own
    methods = list(plan.methods or benchmarked_methods())
    if "aikd" not in methods:
        raise ValueError("the benchmark's headline is AI-KD over CE: include 'aikd' in the methods")
    rows: list[dict[str, Any]] = []
    for s in plan.settings:
        log(f"step costs: {s.label}, {len(methods)} methods x {s.rounds} rounds")
        rows += step_costs(s, methods, plan.device)
    log(f"host syncs per step: {len(methods)} methods")
    syncs = host_syncs(methods, plan.device)
    for row in rows:
        row["syncs_per_step"] = syncs[row["method"]]
    loaders, e2e = input_pipeline(plan, log)
    log(f"memory: peak RSS of CE and AI-KD on {plan.memory_setting.model}, each in a fresh process")
    memory = {"peak_rss": peak_rss_ratio(plan.memory_setting),
              "buffer": buffer_footprint({s.model: s.classes for s in plan.settings})}
    log(f"memory: the prediction buffer sharded over 2 gloo ranks, {plan.buffer_rows:,} x 1000, saved and resumed")
    try:
        memory["buffer_ranks"] = buffer_scaling(plan.buffer_rows)
    except RuntimeError as err:  # no /proc to read the high-water mark from, or no gloo: said in the report
        memory["buffer_ranks"] = {"unmeasured": str(err)}
    return {
        "machine": host, "quick": plan.quick,
        **headline(rows, plan.settings),
        "loader_speedup": min(r["loader_speedup"] for r in loaders),
        "aikd_over_ce_peak_rss": memory["peak_rss"]["aikd_over_ce"],
        "buffer_imagenet1k_gib": memory["buffer"]["imagenet1k"]["gib"],
        "buffer_imagenet1k_per_node_gib": memory["buffer_ranks"].get("imagenet1k", {}).get("after", {}).get(
            "per_node_gib"),
        "step_costs": {"settings": [s.to_dict() for s in plan.settings], "methods": methods, "rows": rows,
                       "pairs": pair_ratios(rows)},
        "loaders": loaders, "end_to_end": e2e, "memory": memory,
        "wall_s": time.perf_counter() - start,
    }
