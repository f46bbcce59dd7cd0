"""Print the Markdown tables of docs/results/fashion_mnist.md from a sweep folder.

    .venv/bin/python scripts/fashion_mnist_table.py runs/fashion_mnist
"""

from __future__ import annotations

import sys
from collections import defaultdict

from aikd.report.summaries import format_mean_std, load_summaries, mean_std

NAMES = {
    "superior": "Baseline (CE)", "aikd": "AI-KD", "aikd_no_adv": "No Adv", "aikd_only_guide": "Only Guide",
    "aikd_only_progressive": "Only Progressive", "kd": "KD (teacher: the CE model)", "tfkd_self": "TF-KD self",
    "tfkd_reg": "TF-KD reg", "cskd": "CS-KD", "pskd": "PS-KD", "dkd": "DKD (teacher: the CE model)",
    "aekt": "AEKT (teacher: the CE model)", "bss": "BSS (teacher: the CE model)", "amkd": "AMKD (teacher: the CE model)",
}


def main(root: str) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in load_summaries(root):
        group = row["run_dir"].split("/")[0]
        groups[group].append(row)
    base_time = mean_std(r["time_per_epoch_s"] for r in groups["superior"])[0]
    print("| Method | Top-1 err % | Top-5 err % | Macro F1 | ECE % | seeds | time / epoch | vs CE |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, name in NAMES.items():
        rows = groups.get(key)
        if not rows:
            continue
        t = mean_std(r["time_per_epoch_s"] for r in rows)[0]
        print(f"| {name} | {format_mean_std(r['top1_err'] for r in rows)} "
              f"| {format_mean_std(r['top5_err'] for r in rows)} | {format_mean_std((r['macro_f1'] for r in rows), 4)} "
              f"| {format_mean_std(r['ece'] for r in rows)} | {len(rows)} | {t:.1f} s | {t / base_time:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
