"""Memory: peak resident memory of a method's training run, and the per-sample prediction buffer.

Peak RSS is taken in a fresh process per method: a process's high-water mark never goes down, so measuring
two methods in one process would report the larger of the two for both.

That process is ``python -m aikd.bench.rss_child SETTING_JSON METHOD``; it reads its own high-water mark
(VmHWM), not ``ru_maxrss``, which a child inherits from the parent that forked it. The peak includes
torch itself (about 0.5 GiB) and varies by some 20 MiB between identical runs, which is the whole
difference between AI-KD and CE on the small CNN; PreAct ResNet-18 shows the teacher and critic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from aikd.bench.steps import Setting

IMAGENET_1K_SAMPLES = 1_281_167
IMAGENET_1K_CLASSES = 1000


def child_env() -> dict[str, str]:
    """The environment of a measuring child process: one thread, and this very aikd on its path (a worktree's
    src/), not whichever one the interpreter has installed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    source_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    return env


def start_rss_child(s: Setting, method: str) -> subprocess.Popen:
    """Start the fresh process that trains ``method`` briefly and prints its peak RSS.

    It runs on one intra-op thread, so that several of them can run at once without spinning against each
    other; the thread count does not change what training allocates.
    """
    return subprocess.Popen([sys.executable, "-m", "aikd.bench.rss_child", json.dumps(s.to_dict()), method],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def peak_rss_mib(s: Setting, methods: list[str]) -> dict[str, float]:
    """Peak resident memory (MiB) of one fresh process per method, all run at the same time."""
    children = {method: start_rss_child(s, method) for method in methods}
    peaks = {}
    for method, child in children.items():
        out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the peak-memory run of '{method}' failed:\n{err[-2000:]}")
        peaks[method] = int(out.split()[-1]) / 1024
    return peaks


def peak_rss_ratio(s: Setting) -> dict[str, Any]:
    """Peak RSS of AI-KD and CE on the same setting, each in its own process, and their ratio."""
    peaks = peak_rss_mib(s, ["ce", "aikd"])
    return {"model": s.model, "setting": s.to_dict(), "ce_mib": peaks["ce"], "aikd_mib": peaks["aikd"],
            "aikd_over_ce": peaks["aikd"] / peaks["ce"]}


def buffer_bytes_per_sample(classes: int) -> int:
    """Bytes the PS-KD / AI-KD prediction buffer holds per training sample, as the buffer itself reports."""
    from aikd.methods.buffer import PredictionBuffer

    return PredictionBuffer(1, classes).bytes_per_sample


def buffer_footprint(classes_by_model: dict[str, int]) -> dict[str, Any]:
    """Bytes per sample for each benchmarked model's class count, and the buffer's size for all of ImageNet-1k.

    The ImageNet figure is bytes_per_sample x samples: the buffer is one dense row per training sample.
    """
    per_sample = buffer_bytes_per_sample(IMAGENET_1K_CLASSES)
    total = per_sample * IMAGENET_1K_SAMPLES
    return {
        "bytes_per_sample": {model: {"classes": c, "bytes": buffer_bytes_per_sample(c)}
                             for model, c in classes_by_model.items()},
        "imagenet1k": {"samples": IMAGENET_1K_SAMPLES, "classes": IMAGENET_1K_CLASSES,
                       "bytes_per_sample": per_sample, "bytes": total, "gib": total / 2**30},
    }



NODE_RANKS = 8  # ranks per node for the per-node figures: a node of 8 GPUs (a DGX)


def measure_buffer_ranks(rows: int, classes: int) -> dict[str, Any]:
    """The 2-rank gloo job of :mod:`aikd.bench.buffer_ranks` at ``rows x classes``: each rank's measured bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "buffer_ranks.json"
        env = child_env()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "-m", "aikd.bench.buffer_ranks", str(rows), str(classes), str(out)],
                              capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"the 2-rank buffer memory job failed:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def buffer_scaling(rows: int, classes: int = IMAGENET_1K_CLASSES, node_ranks: int = NODE_RANKS) -> dict[str, Any]:
    """The buffer's memory per rank and per node before issue 35 and after, at the ImageNet-1k shape.

    Measured on a real 2-rank gloo job at ``rows x classes`` (float16): what each rank allocates, the peak
    extra resident bytes of rank 0's save and of each rank's resume read, each as a multiple of the buffer
    (before: every rank holds it whole) or of a shard (after). The ImageNet-1k figures are computed from
    those multiples and the shape: a node of ``node_ranks`` ranks holds ``node_ranks`` copies before and one
    after; allocation and the rank-0 save scale with the bytes involved, which the 2-rank job measures.
    """
    measured = measure_buffer_ranks(rows, classes)
    main, ranks = measured["ranks"][0], measured["ranks"]
    whole, shard = main["buffer_bytes"], max(r["shard_bytes"] for r in ranks)
    multiples = {
        "before": {"alloc": main["whole_alloc"] / whole, "save_extra": main["whole_save_extra"] / whole,
                   "resume_extra": max(r["whole_resume_extra"] for r in ranks) / whole},
        "after": {"alloc": max(r["shard_alloc"] / r["shard_bytes"] for r in ranks),
                  "save_extra": main["shard_save_extra"] / shard,
                  "resume_extra": max(r["shard_resume_extra"] / r["shard_bytes"] for r in ranks)},
    }
    full = 2 * IMAGENET_1K_CLASSES * IMAGENET_1K_SAMPLES  # float16
    full_shard = -(-IMAGENET_1K_SAMPLES // node_ranks) * 2 * IMAGENET_1K_CLASSES
    gib = 2**30
    imagenet = {
        "node_ranks": node_ranks, "buffer_gib": full / gib, "shard_gib": full_shard / gib,
        "before": {"per_rank_gib": full / gib, "per_node_gib": node_ranks * full / gib,
                   "save_extra_rank0_gib": multiples["before"]["save_extra"] * full / gib,
                   "resume_extra_per_rank_gib": multiples["before"]["resume_extra"] * full / gib},
        "after": {"per_rank_gib": full_shard / gib, "per_node_gib": node_ranks * full_shard / gib,
                  "save_extra_rank0_gib": multiples["after"]["save_extra"] * full_shard / gib,
                  "resume_extra_per_rank_gib": multiples["after"]["resume_extra"] * full_shard / gib},
    }
    return {"measured": measured, "multiples": multiples, "imagenet1k": imagenet}
