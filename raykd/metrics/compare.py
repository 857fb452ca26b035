"""Comparing arms over seeds: the mean of each with its interval, and a method against the
baseline seed by seed.

Seed k of every arm starts from the same initial student weights and sees the same data order and
augmentations, so the runs of one seed are paired: the difference method - baseline is taken per
seed, and its mean gets a Student-t interval over the seeds (n - 1 degrees of freedom). Wins count
the seeds where the method scored strictly higher. The p value is the paired t-test's (two-sided).

>>> d = paired_difference({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.62, 2: 0.6})
>>> round(d.mean, 4), d.wins, d.n
(0.0767, 3, 3)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Interval", "PairedDifference", "mean_interval", "paired_difference"]


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its two-sided ``level`` Student-t interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def points(self) -> str:
        """``+5.9 [+1.2, +10.6] points`` (a difference of fractions, in percentage points)."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}] points"

    def plain(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class PairedDifference(Interval):
    """method - baseline per seed: the mean difference, its interval, wins and the paired t-test p."""

    wins: int = 0
    p_value: float | None = None


def _half_width(values: list[float], level: float) -> float:
    from scipy import stats  # lazy: scipy is heavy

    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n))


def mean_interval(values: list[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) and its Student-t interval (NaN bounds for one value)."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    h = _half_width(list(values), level)
    return Interval(mean=mean, low=mean - h, high=mean + h, n=len(values), level=level)


def paired_difference(method: dict[Any, float], baseline: dict[Any, float], level: float = 0.95) -> PairedDifference:
    """``method - baseline`` over the seeds both have (``{seed: score}`` each)."""
    from scipy import stats  # lazy: scipy is heavy

    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("paired_difference: the method and the baseline share no seed")
    diffs = [method[s] - baseline[s] for s in seeds]
    base = mean_interval(diffs, level)
    p = None
    if len(seeds) >= 2 and statistics.pstdev(diffs) > 0:
        p = float(stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return PairedDifference(mean=base.mean, low=base.low, high=base.high, n=base.n, level=level,
                            wins=sum(d > 0 for d in diffs), p_value=p)
