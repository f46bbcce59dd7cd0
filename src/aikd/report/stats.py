"""Statistics over seeds: each cell's mean ± std, and paired comparisons, the statistic a reviewer asks for.

Runs of two methods with the same seed share the data order, the subset and
(for two-phase methods) the superior model's seed, so their difference on one
seed cancels much of the seed-to-seed noise. The comparison is therefore made
on per-seed differences d_s = method_s - baseline_s, with a Student t interval

    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)

over the n seeds both have. An interval that excludes 0 is a difference the
seeds support at the 95 % level; one that contains 0 is not evidence of none.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count."""
    values = list(values)
    if not values:
        raise ValueError("no values to average")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


@dataclass(frozen=True)
class PairedDifference:
    """mean(method - baseline) over the shared seeds, with its two-sided confidence interval."""

    mean: float
    low: float  # nan when fewer than two seeds are shared
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 2) -> str:
        """``-0.52 [-0.90, -0.14]*``: the star marks an interval that excludes 0."""
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n=1)"
        star = "*" if self.excludes_zero else ""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{star}"


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy's)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference | None:
    """The paired difference over the seeds present in both mappings (seed -> value); None if there are none."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    mean, n = statistics.fmean(diffs), len(diffs)
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)
