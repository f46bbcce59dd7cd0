"""Print the Markdown tables of docs/results/fashion_mnist.md from a sweep folder.

    .venv/bin/python scripts/fashion_mnist_table.py runs/fashion_mnist
"""

from __future__ import annotations

import sys
from collections import defaultdict

from aikd.report.summaries import format_mean_std, load_summaries

TABLES = {
    "AI-KD and its ablations (paper Table 4)": {
        "superior": "Baseline (CE; AI-KD's superior model)", "aikd_only_guide": "Only Guide",
        "aikd_only_progressive": "Only Progressive", "aikd_no_adv": "No Adv", "aikd": "AI-KD",
    },
    "Self-KD methods compared (paper Table 2 layout)": {
        "superior": "Baseline (CE)", "cskd": "CS-KD", "tfkd_self": "TF-KD self", "tfkd_reg": "TF-KD reg",
        "pskd": "PS-KD", "aikd": "AI-KD",
    },
    "Teacher-student distillation, same teacher (the seed's CE model)": {
        "kd": "KD", "dkd": "DKD", "aekt": "AEKT", "bss": "BSS", "amkd": "AMKD",
    },
}


def main(root: str) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in load_summaries(root):
        groups[row["run_dir"].split("/")[0]].append(row)
    for title, names in TABLES.items():
        print(f"\n### {title}\n")
        print("| Method | Top-1 err % | Top-5 err % | Macro F1 | ECE % | seeds |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, name in names.items():
            rows = groups.get(key)
            if not rows:
                continue
            print(f"| {name} | {format_mean_std(r['top1_err'] for r in rows)} "
                  f"| {format_mean_std(r['top5_err'] for r in rows)} "
                  f"| {format_mean_std((r['macro_f1'] for r in rows), 4)} "
                  f"| {format_mean_std(r['ece'] for r in rows)} | {len(rows)} |")


if __name__ == "__main__":
    main(sys.argv[1])
