"""The calibration files a run writes: reliability.json and reliability.png (paper Figures 4-5).

They belong with the calibration metrics, not the report, because the trainer and ``aikd eval`` write
them for every run; the report only reads and pools them. matplotlib runs on its file-only Agg backend,
so they work on machines without a display.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from aikd.fileio import atomic_write_bytes
from aikd.metrics.calibration import ReliabilityBins


def pyplot():
    """matplotlib.pyplot on its file-only Agg backend (every figure of aikd is drawn through it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(curves: Mapping[str, ReliabilityBins], path: str | Path, title: str = "") -> Path:
    """Accuracy against mean confidence per bin, one line per curve, with the identity line.

    A curve under the diagonal is over-confident. Empty bins are skipped, and
    the legend carries each curve's ECE so the figure reads on its own.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=1, label="identity")
    for name, bins in curves.items():
        pairs = [(c, a) for c, a in zip(bins.mean_confidence(), bins.accuracy(), strict=True) if c is not None]
        conf, acc = zip(*pairs, strict=True) if pairs else ((), ())
        ax.plot(conf, acc, marker="o", markersize=3, linewidth=1.5, label=f"{name} (ECE {bins.ece():.2f}%)")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    return save_figure(fig, path)


def write_reliability(bins: Mapping[str, ReliabilityBins], temperature: float, title: str, png: str | Path,
                      json_path: str | Path | None = None) -> Path:
    """The one writer of calibration files: a reliability diagram before and after temperature scaling,
    and (``json_path``) the bins as JSON, which reports pool over seeds. Used at a run's end and by aikd eval."""
    if json_path is not None:
        payload = {"temperature": temperature, **{k: b.to_dict() for k, b in bins.items()}}
        atomic_write_bytes(Path(json_path), json.dumps(payload).encode())
    return reliability_diagram({"before TS": bins["raw"], f"after TS (T={temperature:.2f})": bins["ts"]}, png, title)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to exactly ``path`` (its folder made; PNG unless the suffix names another format),
    atomically and with the umask's mode, and close it."""
    from aikd.fileio import atomic_write_with

    path = Path(path)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
