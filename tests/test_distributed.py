"""Data-parallel training with real processes: torchrun, gloo on CPU, two ranks.

The 2-rank runs train on the same global batches as the 1-rank runs (each rank
on half of every batch), so their test metrics agree up to what differs by
design: BatchNorm statistics of each rank's half-batch and each rank's own
augmentation draws. Digits' test split has 359 images, an odd number, so the
distributed evaluation has blocks of different sizes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aikd.data.loaders import BlockBatchSampler, EpochBatchSampler, ShardedBatchSampler
from aikd.engine.checkpoint import load_checkpoint
from aikd.evaluation import evaluate_checkpoint
from aikd.methods import METHODS
from aikd.methods.cskd import ClassPairBatchSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
COMMON = ["data.name=digits", "data.batch_size=64", "train.epochs=4", "device=cpu", "train.eval_every=4"]
DIGITS_TRAIN, DIGITS_TEST = 1438, 359
# Largest gap between a 2-rank and a 1-rank run seen on these settings was 3 test images (0.84 points)
# and 0.03 NLL; the bounds leave room for other CPUs' arithmetic without hiding a broken average
# (a rank that kept its own gradients, or a buffer missing half its entries, moves these by far more).
TOP1_TOLERANCE, NLL_TOLERANCE = 1.5, 0.08


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "aikd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def aikd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aikd", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def untimed_records(out: Path) -> list[dict]:
    """Every epoch's record of metrics.jsonl without its wall-clock times."""
    return [{k: v for k, v in json.loads(line).items() if "time" not in k}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_args(method: str, out: Path, teacher: Path, *extra: str) -> list[str]:
    return ["train", "-q", "-c", str(CONFIGS / f"{method}.yaml"), "-o", str(out), *COMMON,
            f"teacher.checkpoint={teacher}", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    done = aikd("train", "-q", "-c", str(CONFIGS / "ce.yaml"), "-o", str(out), *COMMON, "train.epochs=2")
    assert done.returncode == 0, done.stderr
    return out / "checkpoints" / "last.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher) -> dict[tuple[str, int], Path]:
    """CE, PS-KD and AI-KD, each with 1 process and with 2 (AI-KD through `aikd train --nproc 2`)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("ce", "pskd", "aikd"):
        for ranks in (1, 2):
            folder = root / f"{method}-{ranks}"
            args = train_args(method, folder, teacher)
            if ranks == 1:
                done = aikd(*args)
            elif method == "aikd":
                done = aikd(*args, "--nproc", "2")
            else:
                done = torchrun(*args)
            assert done.returncode == 0, done.stderr[-3000:]
            out[method, ranks] = folder
    return out


@pytest.mark.parametrize("method", ["ce", "pskd", "aikd"])
def test_two_ranks_reach_the_metrics_of_one(runs, method):
    one, two = summary(runs[method, 1]), summary(runs[method, 2])
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert abs(one["top1_err"] - two["top1_err"]) <= TOP1_TOLERANCE, (one["top1_err"], two["top1_err"])
    assert abs(one["nll"] - two["nll"]) <= NLL_TOLERANCE, (one["nll"], two["nll"])
    assert two["top1_err"] < 10  # both really learned (chance is 90)


def test_only_rank_zero_writes(runs):
    folder = runs["ce", 2]
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]  # one record per epoch, not one per rank
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]


def test_distributed_evaluation_counts_every_test_sample_once(runs):
    """The 2-rank run's gathered evaluation equals a single process's evaluation of the same weights."""
    folder = runs["ce", 2]
    gathered = summary(folder)
    alone = evaluate_checkpoint(folder / "checkpoints" / "last.safetensors", quiet=True)
    assert gathered["num_test"] == DIGITS_TEST
    for key in ("top1_err", "top5_err", "nll", "ece", "macro_f1"):
        assert gathered[key] == pytest.approx(alone[key], abs=1e-4), key


def test_buffer_holds_every_training_sample_after_one_distributed_epoch_and_resume_is_exact(
        runs, teacher, tmp_path):
    """AI-KD (buffer, critic, its optimizer) stopped after epoch 1 of 2 ranks, then resumed with 2 ranks."""
    out = tmp_path / "aikd-split"
    first = torchrun(*train_args("aikd", out, teacher), "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoints" / "last.safetensors")
    logits = ckpt.state["method"]["previous.buffer.logits"]
    assert logits.shape == (DIGITS_TRAIN, 10)
    assert bool(logits.isfinite().all())  # an entry in every row: unseen rows would hold NaN
    assert bool((logits.float().abs().sum(dim=1) > 0).all())
    second = torchrun(*train_args("aikd", out, teacher), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, straight = summary(out), summary(runs["aikd", 2])
    for key in ("top1_err", "nll", "ece"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-6), key


def test_batch_size_that_does_not_split_over_the_ranks_is_refused(teacher, tmp_path):
    done = torchrun(*train_args("ce", tmp_path / "odd", teacher), "data.batch_size=63")
    assert done.returncode != 0
    assert "data.batch_size=63" in done.stderr and "multiple of 2" in done.stderr
    assert not (tmp_path / "odd" / "checkpoints").exists()


# ----------------------------------------------------------------------------- samplers, no processes


def test_ranks_split_every_global_batch_without_overlap():
    inner = EpochBatchSampler(103, 16, seed=3)
    shards = [ShardedBatchSampler(EpochBatchSampler(103, 16, seed=3), r, 3) for r in range(3)]
    for s in [inner, *shards]:
        s.set_epoch(2)
    globals_ = list(inner)
    per_rank = [list(s) for s in shards]
    assert all(len(batches) == len(globals_) for batches in per_rank)  # last batch of 7 >= 2 x 3: kept
    for k, batch in enumerate(globals_):
        parts = [batches[k] for batches in per_rank]
        assert list(itertools.chain(*parts)) == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_last_batch_too_small_for_every_rank_is_dropped_on_all_ranks():
    # 100 = 6 x 16 + 4: a last batch of 4 cannot give 3 ranks two samples each.
    shards = [ShardedBatchSampler(EpochBatchSampler(100, 16), r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [6, 6, 6]
    assert [len(list(s)) for s in shards] == [6, 6, 6]
    seen = sorted(i for s in shards for batch in s for i in batch)
    assert len(seen) == 96 and len(set(seen)) == 96


def test_class_pairs_stay_together_on_each_rank():
    labels = torch.arange(60) % 4
    shards = [ShardedBatchSampler(ClassPairBatchSampler(labels, 10, seed=1), r, 2) for r in range(2)]
    whole = list(ClassPairBatchSampler(labels, 10, seed=1))
    for k, batch in enumerate(whole):
        anchors = []
        for s in shards:
            part = list(s)[k]
            half = len(part) // 2
            assert len(part) == 10  # 5 anchors + their 5 partners
            assert (labels[part[:half]] == labels[part[half:]]).all()  # partner i has anchor i's class
            anchors += part[:half]
        assert anchors == batch[: len(batch) // 2]


def test_evaluation_blocks_cover_each_sample_once_in_order():
    for n, world in ((359, 2), (10, 3), (7, 4)):
        blocks = [[i for batch in BlockBatchSampler(n, 4, r, world) for i in batch] for r in range(world)]
        assert list(itertools.chain(*blocks)) == list(range(n))


# ----------------------------------------------------------------------------- every other method (slow)

# DKD and AEKT (beta = 8 with a 2-epoch teacher) swing by tens of points between seeds in runs this
# short on digits, one process or two; AMKD's seed-0 single-process run lands at 7.5 % where seeds 1
# and 2 land at 1.7-1.9 % (2 ranks: 2.2-2.5 %). For these the check is that the 2-rank run finishes
# with finite metrics and one record per epoch.
UNSTABLE_HERE = {"dkd", "aekt", "amkd"}


@pytest.mark.slow
@pytest.mark.parametrize("method", [*sorted(set(METHODS.names()) - {"ce", "pskd", "aikd"}), "aikd_no_adv"])
def test_every_method_trains_data_parallel(method, teacher, tmp_path):
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"{method}-{ranks}"
        args = train_args(method, out, teacher)
        done = aikd(*args) if ranks == 1 else torchrun(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[ranks] = summary(out)
    one, two = runs[1], runs[2]
    assert all(torch.isfinite(torch.tensor(two[k])) for k in ("top1_err", "nll", "ece"))
    assert len((tmp_path / f"{method}-2" / "metrics.jsonl").read_text().splitlines()) == 4
    if method not in UNSTABLE_HERE:
        assert abs(one["top1_err"] - two["top1_err"]) <= 2 * TOP1_TOLERANCE, (one["top1_err"], two["top1_err"])


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_one_mid_epoch_checkpoint_and_resume_matches(teacher, tmp_path):
    """A scheduler's SIGTERM reaches torchrun, which passes it on; both ranks stop at the same batch."""
    import signal
    import time

    args = ["train", "-c", str(CONFIGS / "pskd.yaml"), "data.name=digits", "data.batch_size=8", "train.epochs=6",
            "device=cpu"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert torchrun(*args, "-q", "-o", str(straight)).returncode == 0
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aikd",
               *args, "-o", str(stopped)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while "epoch 1/6" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    assert not (stopped / "summary.json").exists()  # it stopped before the end
    # Mid-epoch (the usual case), or at an epoch's end when the signal reached the ranks after the
    # epoch's last agreement point: how long torchrun takes to pass it on varies with the machine's load.
    position = load_checkpoint(stopped / "checkpoints" / "last.safetensors").state.get("position")
    if position is not None:
        assert position["batch"] % 25 == 0  # the ranks agree every 25 steps
        assert len(position["generators"]) == len(position["rank_sums"]) == len(position["norms"]) == 2
    assert torchrun(*args, "-q", "-o", str(stopped), "--resume").returncode == 0
    # Exact: each rank resumed its own random streams, loss sums and BatchNorm statistics.
    assert untimed_records(stopped) == untimed_records(straight)
    assert {k: v for k, v in summary(stopped).items() if "time" not in k} == \
        {k: v for k, v in summary(straight).items() if "time" not in k}
