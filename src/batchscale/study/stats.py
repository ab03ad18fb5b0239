"""The statistics of the report, each a small function over plain numbers.

* :func:`t_interval`: mean and 95% Student-t interval over seeds (n < 2: no interval);
* :func:`bootstrap_interval`: mean and 95% percentile bootstrap interval of paired
  differences (scipy.stats.bootstrap with a seeded generator; n < 2: none; all equal: the
  value itself);
* :func:`trend`: least-squares slope of y against log2(batch size) with its 95% t interval
  (scipy.stats.linregress; fewer than 3 points or one batch size: none);
* :func:`first_reach`: examples and seconds at the first evaluation point at or above a
  threshold (no interpolation between points: the figure is a point that was measured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def has_ci(self) -> bool:
        return self.lo is not None and self.hi is not None


def _finite(values: Sequence[float]) -> np.ndarray:
    """The values that are numbers (a failed or missing measurement is left out)."""
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def _without_ci(x: np.ndarray) -> Interval | None:
    """No value: None; one: its value with no interval (shown as n/a)."""
    return None if len(x) == 0 else Interval(float(x[0]), None, None, 1)


def t_interval(values: Sequence[float]) -> Interval | None:
    """Mean +- t_{0.975, n-1} * s / sqrt(n) (None for no values)."""
    x = _finite(values)
    if len(x) < 2:
        return _without_ci(x)
    n, mean = len(x), float(x.mean())
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def bootstrap_interval(values: Sequence[float], *, resamples: int = 9999,
                       seed: int = 0) -> Interval | None:
    """Mean and percentile bootstrap interval of ``values`` (paired differences)."""
    x = _finite(values)
    if len(x) < 2:
        return _without_ci(x)
    n, mean = len(x), float(x.mean())
    if np.all(x == x[0]):
        return Interval(mean, mean, mean, n)
    res = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n)


@dataclass(frozen=True)
class Trend:
    slope: float
    lo: float | None
    hi: float | None
    intercept: float
    r: float
    p: float
    n: int


def trend(batch_sizes: Sequence[int], values: Sequence[float]) -> Trend | None:
    """y = a + b log2(B): b with its 95% interval b +- t_{0.975, n-2} * stderr(b)."""
    pairs = [(math.log2(b), v) for b, v in zip(batch_sizes, values, strict=True)
             if v is not None and math.isfinite(v)]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2:
        return None
    x, y = np.array(pairs, dtype=float).T
    fit = stats.linregress(x, y)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 2) * fit.stderr)
    slope = float(fit.slope)
    lo, hi = (slope - half, slope + half) if math.isfinite(half) else (None, None)
    return Trend(slope, lo, hi, float(fit.intercept), float(fit.rvalue), float(fit.pvalue),
                 len(x))


def first_reach(examples: Sequence[int], seconds: Sequence[float],
                dev: Sequence[float | None],
                threshold: float) -> tuple[int, float] | None:
    """(examples, seconds) of the first point with dev >= threshold; None if none."""
    for e, s, d in zip(examples, seconds, dev, strict=True):
        if d is not None and d >= threshold:
            return int(e), float(s)
    return None
