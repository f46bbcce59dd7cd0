"""Print the Markdown tables of docs/results/fashion_mnist.md from a sweep folder.

    .venv/bin/python scripts/fashion_mnist_table.py runs/fashion_mnist
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aikd.report.stats import mean_std

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


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every summary.json under ``root``, each with its ``run_dir`` (relative to ``root``)."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        summary["run_dir"] = str(path.parent.relative_to(root))
        rows.append(summary)
    return rows


def format_mean_std(values: Iterable[float], digits: int = 2) -> str:
    mean, std, _ = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


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
