"""``aikd bench`` on tiny plans: the JSON it promises, numbers that make sense, files really read, the report."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import aikd
from aikd.bench import BenchPlan, Setting, markdown_report, run_bench
from aikd.bench.inputs import (
    aikd_bundle,
    fashion_mnist_files,
    images_per_second,
    torchvision_dataset,
    write_cifar100_files,
    write_idx,
)
from aikd.bench.memory import buffer_footprint
from aikd.bench.steps import benchmarked_methods, bracketed_ratios
from aikd.cli import build_parser, main
from aikd.methods.base import METHODS

TINY = Setting("small_cnn", 1, 28, 10, batch=16, steps=1, rounds=2)
TINY_PLAN = BenchPlan(settings=(TINY,), methods=("ce", "aikd", "pskd"), loader_batches=2, cifar_train_images=300,
                      end_to_end_steps=2, memory_setting=TINY, fashion_source=None, workers=(0,), buffer_rows=20_000)
HEADLINE_RATIOS = ("aikd_over_ce_time", "loader_speedup", "aikd_over_ce_peak_rss")


@pytest.fixture(scope="module")
def result(one_thread):
    return run_bench(TINY_PLAN, log=lambda message: None)


def positive_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_json_has_the_headline_ratios_as_positive_finite_numbers(result):
    decoded = json.loads(json.dumps(result))  # JSON-ready: survives a round trip unchanged
    assert decoded == result
    for key in HEADLINE_RATIOS:
        assert positive_finite(result[key]), key
    assert result["aikd_over_ce_time_model"] == "small_cnn"
    assert result["machine"]["cpu_count"] == os.cpu_count()


def test_every_method_gets_a_step_cost_ratio(result):
    rows = result["step_costs"]["rows"]
    assert [r["method"] for r in rows] == ["ce", "aikd", "pskd"]
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert len(r["ratios"]) == TINY.rounds
        assert all(positive_finite(x) for x in (r["ratio"], r["ms_per_step"], r["ce_ms_per_step"], *r["ratios"]))
    aikd_row = next(r for r in rows if r["method"] == "aikd")
    assert result["aikd_over_ce_time"] == aikd_row["ratio"]
    assert [r["syncs_per_step"] for r in rows] == [0, 0, 0]  # counted, and none (tests/test_host_syncs.py)
    assert "| host syncs / step |" in markdown_report(result)


def test_loader_comparison_read_the_files_it_wrote(result):
    fashion, cifar = result["loaders"]
    assert cifar["dataset"] == "cifar100" and cifar["shape"] == "3x32x32"
    assert cifar["train_images"] == {"aikd": TINY_PLAN.cifar_train_images, "torchvision": TINY_PLAN.cifar_train_images}
    assert fashion["dataset"] == "fashion-mnist" and fashion["shape"] == "1x28x28"
    assert fashion["train_images"]["aikd"] == fashion["train_images"]["torchvision"] == 10_000  # random IDX files
    for r in (fashion, cifar):
        assert r["torchvision_workers"] == 0 and list(r["torchvision_images_per_s_by_workers"]) == ["0"]
        assert r["loader_speedup"] == pytest.approx(r["aikd_images_per_s"] / r["torchvision_images_per_s"])
    assert result["loader_speedup"] == min(fashion["loader_speedup"], cifar["loader_speedup"])
    e2e = result["end_to_end"]
    assert positive_finite(e2e["aikd_images_per_s"]) and positive_finite(e2e["torchvision_images_per_s"])


def test_peak_memory_comes_from_two_fresh_processes(result):
    rss = result["memory"]["peak_rss"]
    assert 50 < rss["ce_mib"] < 20_000 and 50 < rss["aikd_mib"] < 20_000  # a whole Python + torch process
    assert rss["aikd_over_ce"] == pytest.approx(rss["aikd_mib"] / rss["ce_mib"])


def test_a_child_reports_its_own_peak_not_its_parents():
    """ru_maxrss would report at least the forking parent's size; the child must read its own high-water mark."""
    ballast = torch.ones(1024**3, dtype=torch.uint8)  # 1 GiB, touched, in this (parent) process
    env = {**os.environ, "PYTHONPATH": str(Path(aikd.__file__).resolve().parents[1])}
    child = "from aikd.bench.rss_child import peak_rss_kib; print(peak_rss_kib())"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=True)
    parent_kib = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                          if line.startswith("VmRSS:")))
    assert int(done.stdout) < parent_kib - 512 * 1024
    del ballast


def test_the_sharded_buffer_is_one_copy_per_node_and_saves_with_at_most_one_shard_extra(result):
    """Measured on a real 2-rank gloo job: each rank allocates its shard alone, rank 0's save adds about one shard
    (its own is written in place, one other rank's is received at a time), a resume about one shard (the file's
    pages); before, every rank held the whole buffer and rank 0's save added three copies of it."""
    scaling = result["memory"]["buffer_ranks"]
    ranks = scaling["measured"]["ranks"]
    assert [r["shard_bytes"] for r in ranks] == [10_000 * 2000, 10_000 * 2000]  # 20 000 rows x 1000 float16
    before, after = scaling["multiples"]["before"], scaling["multiples"]["after"]
    assert after["alloc"] < 1.1 and after["save_extra"] < 1.25 and after["resume_extra"] < 1.25
    assert before["save_extra"] > 2.5 and before["resume_extra"] > 1.5  # the clone + bytes + copy it replaced
    imagenet = scaling["imagenet1k"]
    assert imagenet["after"]["per_node_gib"] == pytest.approx(imagenet["buffer_gib"], rel=1e-5)
    assert imagenet["before"]["per_node_gib"] == pytest.approx(8 * imagenet["buffer_gib"])
    assert "per node (8 ranks)" in markdown_report(result)


@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_buffer_holds_two_bytes_per_class_plus_a_flag(classes):
    footprint = buffer_footprint({"model": classes})
    assert footprint["bytes_per_sample"]["model"] == {"classes": classes, "bytes": 2 * classes}


def test_imagenet_projection_is_bytes_per_sample_times_samples():
    imagenet = buffer_footprint({})["imagenet1k"]
    assert imagenet["samples"] == 1_281_167 and imagenet["classes"] == 1000
    assert imagenet["bytes"] == 2_562_334_000  # 2 * 1000 * 1 281 167
    assert imagenet["gib"] == pytest.approx(2_562_334_000 / 1024**3)


def section(text: str, heading: str) -> list[str]:
    """The lines of the Markdown section whose heading starts with ``heading``."""
    start = text.index(f"### {heading}")
    end = text.find("\n### ", start + 1)
    return text[start:end if end >= 0 else None].splitlines()


def test_markdown_names_the_machine_and_has_one_row_per_method(result):
    text = markdown_report(result)
    assert text.startswith("Machine: ") and f"{os.cpu_count()} CPUs" in text.splitlines()[0]
    assert f"torch {torch.__version__}" in text.splitlines()[0]
    steps = section(text, "Training step cost")
    for method in result["step_costs"]["methods"]:
        assert sum(line.startswith(f"| {method} |") for line in steps) == 1, method
    assert sum(line.startswith("| fashion-mnist") or line.startswith("| cifar100") for line in
               section(text, "Input pipeline")) == 2
    assert len([line for line in section(text, "End to end") if line.startswith("| ")]) == 2 + 2
    assert "2,562,334,000 B" in text


def test_bracketed_ratios_divide_by_the_two_neighbouring_ce_times():
    # Order: CE 1, a 3, CE 3, b 8, CE 5 | a 6, CE 1, b 9, CE 2
    ratios = bracketed_ratios([1, 3, 5, 1, 2], {"a": [3, 6], "b": [8, 9]})
    assert ratios == {"a": [3 / 2, 6 / 3], "b": [8 / 4, 9 / 1.5]}


def test_every_registered_method_is_benchmarked_with_ce_first():
    methods = benchmarked_methods()
    assert methods[:3] == ["ce", "aikd", "aikd_no_adv"]
    assert set(METHODS.names()) <= set(methods) and len(methods) == len(set(methods))


def test_images_per_second_leaves_the_first_batch_out():
    def batches():
        time.sleep(0.5)  # a DataLoader starting its workers
        yield torch.zeros(10), torch.zeros(10)
        while True:
            yield torch.zeros(10), torch.zeros(10)

    assert images_per_second(batches(), 100) > 10 * 100 / 0.5


def test_cifar_pickles_read_the_same_by_aikd_and_torchvision(tmp_path):
    folder = write_cifar100_files(tmp_path, train_images=120, test_images=20)
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    bundle = aikd_bundle("cifar100", tmp_path, 32)
    theirs = torchvision_dataset("cifar100", tmp_path)
    assert len(bundle.train) == len(theirs) == 120 and len(bundle.test) == 20
    assert np.array_equal(bundle.train.images.permute(0, 2, 3, 1).numpy(), theirs.data)  # torchvision: HWC
    assert bundle.train.labels.tolist() == theirs.targets == [i % 100 for i in range(120)]
    assert bundle.train.classes == theirs.classes == [f"fine_{i}" for i in range(100)]


def test_fashion_mnist_files_read_the_same_by_aikd_and_torchvision(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), np.arange(30, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        write_idx(source / f"{prefix}-images-idx3-ubyte", images)
        write_idx(source / f"{prefix}-labels-idx1-ubyte", labels)
    for path in source.iterdir():  # Debian ships them gzipped
        path.with_suffix(".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert fashion_mnist_files(tmp_path / "bench", source) == f"Fashion-MNIST from {source}"
    bundle = aikd_bundle("fashion-mnist", tmp_path / "bench", 16)
    theirs = torchvision_dataset("fashion-mnist", tmp_path / "bench")
    assert np.array_equal(bundle.train.images[:, 0].numpy(), images)
    assert np.array_equal(theirs.data.numpy(), images) and theirs.targets.tolist() == labels.tolist()


def test_cli_accepts_quick_and_out():
    args = build_parser().parse_args(["bench", "--quick", "-o", "b.json"])
    assert args.command == "bench" and args.quick and args.out == "b.json"
    assert not build_parser().parse_args(["bench"]).quick


def test_cli_writes_json_and_markdown_beside_it(result, tmp_path, monkeypatch, capsys):
    import aikd.bench

    monkeypatch.setattr(aikd.bench, "run_bench", lambda plan: result)
    assert main(["bench", "--quick", "-o", str(tmp_path / "out" / "b.json")]) == 0
    assert json.loads((tmp_path / "out" / "b.json").read_text()) == result
    assert (tmp_path / "out" / "b.md").read_text() == markdown_report(result) == capsys.readouterr().out


@pytest.mark.slow
def test_quick_bench_runs_from_the_command_line(tmp_path):
    """The whole quick run; its wall time (about 35 s on 2 idle cores) is not asserted: other work may share them."""
    env = {**os.environ, "PYTHONPATH": str(Path(aikd.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "aikd", "bench", "--quick", "-o", str(tmp_path / "b.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "b.json").read_text())
    assert all(positive_finite(saved[key]) for key in HEADLINE_RATIOS)
    assert (tmp_path / "b.md").read_text() == done.stdout
    assert [r["method"] for r in saved["step_costs"]["rows"]][:2] == ["ce", "aikd"]


def test_bench_on_cuda_without_a_gpu_is_refused_by_name(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from aikd.cli import main

    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "device=cuda" in capsys.readouterr().err
