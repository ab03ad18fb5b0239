"""The statistics of the report, each a small function over plain numbers.

The unit of replication is the seed: a study has a handful of them (often 3), so every
interval here is a Student-t interval over seeds (or a min-max range for discrete
quantities), never a percentile bootstrap (with 3 values a percentile bootstrap covers
the true mean about 75% of the time, not 95%; see tests/test_study_stats.py).

* :func:`t_interval`: mean and 95% Student-t interval over seeds (n < 2: no interval);
* :func:`paired_difference`: mean paired difference a - b with its 95% t interval, the
  paired t test and the exact sign-flip permutation test;
* :func:`median_range`: median and [min, max] of a discrete quantity (examples or steps to
  a target), which a t interval could push outside the feasible range;
* :func:`holm`: Holm-adjusted p values (statsmodels), None passing through;
* :func:`seed_trend`: per-seed least-squares slope (and quadratic curvature) of a value on
  log2(batch size), then the mean over seeds with a t interval and tests;
* :func:`trend_difference`: the loss x batch-size interaction as the paired difference of
  per-seed slopes;
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

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


# -- paired differences -------------------------------------------------------------------
EXACT_MAX_N = 20  # 2^20 sign flips; above this the sign-flip p is a Monte Carlo estimate
MONTE_CARLO_FLIPS = 99_999


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the differences a - b over n pairs with its 95% t interval and two p values.

    ``p_t``: two-sided paired t test (scipy.stats.ttest_rel); ``p_exact``: two-sided exact
    sign-flip permutation test of the mean difference. ``lo``, ``hi``, ``p_t`` and
    ``p_exact`` are None for n < 2. ``p_t`` is also None when all differences are 0 (t is
    0/0).
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    p_t: float | None
    p_exact: float | None

    @property
    def has_ci(self) -> bool:
        return self.lo is not None and self.hi is not None


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided exact sign-flip permutation p of the mean of ``differences``.

    Under H0 (no difference) each difference is as likely to have either sign, so the null
    distribution of the mean is that of the 2^n means with every pattern of signs; p is the
    fraction of them at least as far from 0 as the observed mean (scipy.stats.
    permutation_test, ``permutation_type="samples"`` with one sample, which enumerates all
    2^n flips). The smallest possible p is 2 / 2^n: **with n = 3 seeds p >= 0.25** whatever
    the data, so this test cannot reach 0.05 with fewer than 6 pairs; it is reported beside
    the t test as the assumption-free check, not as the decision. For n > 20 the 2^n flips
    are replaced by 99,999 random ones (seeded), an estimate rather than the exact p.
    """
    d = np.asarray(differences, dtype=float)
    if len(d) == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    exact = len(d) <= EXACT_MAX_N
    res = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", vectorized=True, axis=-1,
        n_resamples=np.inf if exact else MONTE_CARLO_FLIPS, alternative="two-sided",
        rng=np.random.default_rng(0))
    return float(min(res.pvalue, 1.0))


def paired_difference(a: Sequence[float | None],
                      b: Sequence[float | None]) -> PairedDifference | None:
    """a - b paired by position (e.g. by seed): mean, 95% t interval, p_t, p_exact.

    Pairs where either value is missing or not finite are left out; None if no pair is
    left. See :func:`sign_flip_p` for the exact test (with n = 3 its p is at least 0.25).
    """
    d = np.asarray([x - y for x, y in zip(a, b, strict=True)
                    if x is not None and y is not None and math.isfinite(x)
                    and math.isfinite(y)], dtype=float)
    if len(d) == 0:
        return None
    if len(d) < 2:
        return PairedDifference(float(d[0]), None, None, 1, None, None)
    ci = t_interval(d)
    assert ci is not None
    if np.all(d == d[0]):  # zero variance: t = +-inf (p = 0) or 0/0 (undefined)
        p_t = None if d[0] == 0 else 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_t = float(stats.ttest_1samp(d, 0.0).pvalue)  # = ttest_rel(a, b)
    return PairedDifference(ci.mean, ci.lo, ci.hi, ci.n, p_t, sign_flip_p(d))


# -- discrete quantities ------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Median with the observed [min, max] of n values."""

    median: float
    lo: float
    hi: float
    n: int


def median_range(values: Sequence[float | None]) -> Spread | None:
    """Median and [min, max] of the finite values (None if there are none).

    For discrete, bounded quantities such as examples or steps to a target: the summary
    never leaves the range of what was measured (a t interval over 3 seeds can go below
    the first evaluation point, or below 0). With an even count the median is the midpoint
    of the two middle values (numpy.median).
    """
    x = _finite(values)
    if len(x) == 0:
        return None
    return Spread(float(np.median(x)), float(x.min()), float(x.max()), len(x))


# -- multiple comparisons -----------------------------------------------------------------
def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p values (statsmodels multipletests, method "holm").

    The family is the non-None entries; None (no test) passes through in place.
    """
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    if not idx:
        return out
    p = np.asarray([pvalues[i] for i in idx], dtype=float)
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p values must lie in [0, 1], got {p.tolist()}")
    adjusted = multipletests(p, method="holm")[1]
    for i, q in zip(idx, adjusted, strict=True):
        out[i] = float(q)
    return out


# -- trends in log2(batch size), seeds as the unit ----------------------------------------
@dataclass(frozen=True)
class SeedTrend:
    """A value's trend in log2(B) with seeds as the unit.

    ``slope``: mean over seeds of each seed's least-squares slope of the value on log2(B)
    (change per doubling of B), with its 95% t interval over seeds, ``p_t`` the one-sample
    t test of slope = 0 and ``p_exact`` the sign-flip test (a PairedDifference of the slopes
    against 0); n = seeds with >= 2 batch sizes.
    ``curvature``: the same for the coefficient c of each seed's quadratic fit
    v = a + b x + c x^2, x = log2(B) centred on the seed's mean (c > 0: the gain per doubling
    grows with B; c < 0: it shrinks); n = seeds with >= 3 batch sizes; None if no seed has.
    ``slopes`` and ``curvatures``: the per-seed values.
    """

    slope: PairedDifference
    curvature: PairedDifference | None
    slopes: dict[int, float] = field(default_factory=dict)
    curvatures: dict[int, float] = field(default_factory=dict)


def _by_seed(points: Sequence[tuple[int, int, float | None]]
             ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    grouped: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for seed, batch, value in points:
        if value is None or not math.isfinite(value):
            continue
        if batch <= 0:
            raise ValueError(f"batch size must be positive, got {batch}")
        grouped[int(seed)].append((math.log2(batch), float(value)))
    return {s: tuple(np.array(v, dtype=float).T) for s, v in sorted(grouped.items())}


def _seed_fits(points: Sequence[tuple[int, int, float | None]]
               ) -> tuple[dict[int, float], dict[int, float]]:
    """Per seed: slope of v on log2 B (>= 2 batch sizes) and curvature (>= 3)."""
    slopes: dict[int, float] = {}
    curvatures: dict[int, float] = {}
    for seed, (x, y) in _by_seed(points).items():
        k = len(np.unique(x))
        if k >= 2:
            slopes[seed] = float(stats.linregress(x, y).slope)
        if k >= 3:
            xc = x - x.mean()
            design = np.column_stack([np.ones_like(xc), xc, xc * xc])
            coef = np.linalg.lstsq(design, y, rcond=None)[0]
            curvatures[seed] = float(coef[2])
    return slopes, curvatures


def _against_zero(values: Sequence[float]) -> PairedDifference | None:
    return paired_difference(list(values), [0.0] * len(values))


def seed_trend(points: Sequence[tuple[int, int, float | None]]) -> SeedTrend | None:
    """Trend of a value in log2(batch size), seeds as the unit.

    ``points``: (seed, batch size, value) for every run; a missing or non-finite value is
    left out, repeated (seed, batch) points are fitted as they are. Each seed with >= 2
    batch sizes gives a slope (least squares of value on log2 B) and each with >= 3 a
    curvature (quadratic coefficient on centred log2 B); the seeds' values are then
    summarised by :func:`paired_difference` against 0 (mean, t interval over seeds, p_t,
    p_exact). None if no seed has 2 batch sizes.

    Seeds, not runs, are the unit: runs of one seed share the data order and
    initialisation across batch sizes, so pooling all runs in one regression would
    understate the uncertainty of the slope.
    """
    slopes, curvatures = _seed_fits(points)
    slope = _against_zero(list(slopes.values()))
    if slope is None:
        return None
    return SeedTrend(slope, _against_zero(list(curvatures.values())), slopes, curvatures)


def trend_difference(points_a: Sequence[tuple[int, int, float | None]],
                     points_b: Sequence[tuple[int, int, float | None]]
                     ) -> PairedDifference | None:
    """Interaction loss x batch size: per-seed slope of a minus that of b, paired by seed.

    Only seeds with a slope (>= 2 batch sizes) in both are used; None if there are none.
    The mean is how much more a's value changes per doubling of B than b's.
    """
    sa, _ = _seed_fits(points_a)
    sb, _ = _seed_fits(points_b)
    common = sorted(set(sa) & set(sb))
    return paired_difference([sa[s] for s in common], [sb[s] for s in common])
