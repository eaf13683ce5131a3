"""Statistics of a head comparison (scipy): a t-interval of a strategy's mean over seeds, and the paired
t-interval of per-seed differences between two strategies.

Children of one comparison that share a seed share the data split, the initial backbone (and head, for one
shape), the data order and the augmentation draws, so they are paired: the interval on their per-seed
differences removes the seed-to-seed spread that independent intervals carry, and is the right test of
"is A better than B".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t-interval (NaN bounds with fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def defined(self) -> bool:
        return not math.isnan(self.low)

    def excludes_zero(self) -> bool:
        return self.defined and (self.low > 0 or self.high < 0)

    @classmethod
    def of(cls, values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
        n = len(values)
        if n == 0:
            raise ValueError("an interval needs at least one value")
        mean = math.fsum(values) / n
        if n < 2:
            return cls(mean, math.nan, math.nan, n)
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n)


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of ``a[seed] - b[seed]`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: the runs cannot be paired")
    return Interval.of([a[s] - b[s] for s in seeds], confidence)
