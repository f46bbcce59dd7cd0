"""The Markdown report of a benchmark result, ready to paste into a README's Performance section."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from aikd.report.render import pipe_table


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers depend on: CPU, core count, torch version and threads, device, and how busy it was.

    The load average at the start tells a reader whether other work shared the CPUs: with two cores, one
    other busy process slows multi-threaded steps several times over.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": _device_name(device), "load_average_1min": load}


def _device_name(device: str) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: the step costs' device as a reader needs it."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def machine_line(m: dict[str, Any]) -> str:
    load = "" if m["load_average_1min"] is None else f", load average {m['load_average_1min']:.2f} at start"
    return (f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
            f"device {m['device']}{load}")


def step_cost_lines(steps: dict[str, Any]) -> list[str]:
    lines = ["### Training step cost relative to CE", "",
             "Same model, batch and data for every method; each method is timed between two CE epochs and "
             "its ratio to their mean is the median over the rounds.", ""]
    for setting in steps["settings"]:
        rows = [[r["method"], f"{r['ms_per_step']:.0f}", f"{r['ce_ms_per_step']:.0f}", f"{r['ratio']:.2f}x",
                 _syncs(r.get("syncs_per_step"))] for r in steps["rows"] if r["model"] == setting["model"]]
        label = (f"{setting['model']}, {setting['channels']}x{setting['size']}x{setting['size']}, "
                 f"{setting['classes']} classes, batch {setting['batch']}, "
                 f"{setting['steps']} steps per timing, {setting['rounds']} rounds")
        lines += [f"**{label}**", "", *pipe_table(["method", "ms / step", "CE ms / step", "vs CE",
                                                   "host syncs / step"], rows, "lrrrr"), ""]
    lines += ["Host syncs per step: where a GPU would make the host wait inside a training step (`.item()`, "
              "`nonzero`, a copy to the host), counted by src/aikd/bench/syncs.py on small_cnn, batch 8; on a "
              "CPU BSS and AMKD read one value per attack step, which they skip on any other device.", ""]
    pairs = steps.get("pairs") or []
    if pairs:
        lines += ["### What the critic costs", "",
                  "Each method over its reference, timed in the same run (median over rounds of the ratio of their "
                  "ratios to CE).", "",
                  *pipe_table(["model", "method", "reference", "method / reference"],
                              [[p["model"], p["method"], p["reference"], f"{p['ratio']:.3f}x"] for p in pairs], "lllr"),
                  ""]
    return lines


def _syncs(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def loader_lines(loaders: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in loaders:
        others = ", ".join(f"{w}: {v:,.0f}" for w, v in r["torchvision_images_per_s_by_workers"].items())
        rows.append([f"{r['dataset']} ({r['format']}, {r['shape']})", f"{r['train_images']['aikd']:,}",
                     f"{r['aikd_images_per_s']:,.0f}", f"{r['torchvision_images_per_s']:,.0f}",
                     f"{r['torchvision_workers']} ({others})", f"{r['loader_speedup']:.1f}x"])
    return ["### Input pipeline: augmented, normalized training images/s", "",
            "aikd: `load_data` + training loader + `to_device` (crop, flip and normalization as batched tensor "
            "ops). torchvision: its dataset class on the same files, PIL RandomCrop + RandomHorizontalFlip + "
            "ToTensor + Normalize per image, DataLoader at its best worker count (start-up not timed).", "",
            *pipe_table(["data (files, shape)", "images", "aikd img/s", "torchvision img/s",
                     "best workers (img/s by workers)", "aikd / torchvision"], rows, "lrrrlr"), ""]


def end_to_end_lines(e2e: dict[str, Any]) -> list[str]:
    rows = [["aikd", f"{e2e['aikd_images_per_s']:,.0f}"],
            [f"torchvision ({e2e['torchvision_workers']} workers)", f"{e2e['torchvision_images_per_s']:,.0f}"]]
    return ["### End to end: CE training images/s with each loader", "",
            f"{e2e['model']} on {e2e['dataset']}, batch {e2e['batch']}, {e2e['steps']} timed steps of forward, "
            f"backward and SGD step; aikd / torchvision = {e2e['speedup']:.2f}x.", "",
            *pipe_table(["loader", "images/s"], rows, "lr"), ""]


def memory_lines(memory: dict[str, Any]) -> list[str]:
    rss, buffer = memory["peak_rss"], memory["buffer"]
    imagenet = buffer["imagenet1k"]
    per_model = "; ".join(f"{model} ({b['classes']} classes): {b['bytes']} B"
                          for model, b in buffer["bytes_per_sample"].items())
    return ["### Memory", "",
            f"Peak resident memory of a fresh process training two short epochs of {rss['model']} "
            f"(batch {rss['setting']['batch']}):", "",
            *pipe_table(["CE MiB", "AI-KD MiB", "AI-KD / CE"],
                        [[f"{rss['ce_mib']:.0f}", f"{rss['aikd_mib']:.0f}", f"{rss['aikd_over_ce']:.2f}x"]], "rrr"), "",
            f"Prediction buffer (PS-KD, AI-KD): 2 x classes bytes per sample (float16 logits, a NaN row for a sample "
            f"not seen yet): {per_model}. For ImageNet-1k ({imagenet['samples']:,} samples x "
            f"{imagenet['classes']} classes, {imagenet['bytes_per_sample']} B each): {imagenet['bytes']:,} B "
            f"= {imagenet['gib']:.2f} GiB.", "", *buffer_ranks_lines(memory["buffer_ranks"])]


def buffer_ranks_lines(scaling: dict[str, Any]) -> list[str]:
    """The buffer's memory per rank and per node at the ImageNet-1k shape, before issue 35 and after."""
    if "unmeasured" in scaling:
        return [f"The buffer's memory over the ranks was not measured: {scaling['unmeasured']}", ""]
    measured, multiples, imagenet = scaling["measured"], scaling["multiples"], scaling["imagenet1k"]
    ranks = imagenet["node_ranks"]
    rows = [[when, f"{imagenet[when]['per_rank_gib']:.2f}", f"{imagenet[when]['per_node_gib']:.2f}",
             f"{imagenet[when]['save_extra_rank0_gib']:.2f} ({multiples[when]['save_extra']:.2f}x)",
             f"{imagenet[when]['resume_extra_per_rank_gib']:.2f} ({multiples[when]['resume_extra']:.2f}x)"]
            for when in ("before", "after")]
    return [f"The buffer over the ranks of a data-parallel run, at the ImageNet-1k shape on a node of {ranks} ranks "
            f"(GiB; before issue 35 every rank held the whole buffer, after it one shard each). The multiples are "
            f"measured on a real 2-rank gloo job at {measured['rows']:,} x {measured['classes']} float16 (peak extra "
            f"resident bytes of rank 0's save and of each rank's resume read, over the buffer before and over one "
            f"shard after); the GiB are those multiples times the ImageNet-1k buffer (before) or its 1/{ranks} "
            f"shard (after):", "",
            *pipe_table(["", "per rank", f"per node ({ranks} ranks)", "rank 0's save, extra", "a resume, extra"],
                        rows, "lrrrr"), ""]


def markdown_report(result: dict[str, Any]) -> str:
    """The whole result as Markdown: the machine first, then step costs, loaders, end to end, memory."""
    lines = [machine_line(result["machine"]), "",
             f"Headline: AI-KD step {result['aikd_over_ce_time']:.2f}x CE ({result['aikd_over_ce_time_model']}); "
             f"loader {result['loader_speedup']:.1f}x torchvision + PIL (slowest of the datasets); "
             f"peak memory {result['aikd_over_ce_peak_rss']:.2f}x CE. "
             f"`aikd bench{' --quick' if result['quick'] else ''}` took {result['wall_s']:.0f} s.", "",
             *step_cost_lines(result["step_costs"]), *loader_lines(result["loaders"]),
             *end_to_end_lines(result["end_to_end"]), *memory_lines(result["memory"])]
    return "\n".join(lines).rstrip() + "\n"
