"""The statistics of the batch-size study (study/stats.py, study/critical.py).

Every reference is independent of the code under test: a formula written here, a closed
form, scipy, or a simulation with a known truth (fixed generators).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import optimize, stats

from batchscale.study.critical import (
    CriticalBatch,
    Hyperbola,
    critical_batch,
    doubling_gain,
    fit_hyperbola,
    hyperbola_curve,
    steps_to_target,
)
from batchscale.study.stats import (
    PairedDifference,
    Spread,
    holm,
    median_range,
    paired_difference,
    seed_trend,
    sign_flip_p,
    t_interval,
    trend_difference,
)

S_MIN, E_MIN = 1000.0, 64_000.0  # B_crit = 64
BATCHES = 4.0 ** np.arange(8)  # 1 .. 16,384: both sides of B_crit


def _steps(b, s_min=S_MIN, e_min=E_MIN):
    return s_min + e_min / np.asarray(b, dtype=float)


# -- critical batch size --------------------------------------------------------------------
def test_hyperbola_is_exact_without_noise_and_satisfies_eq_2_11():
    b = 2.0 ** np.arange(3, 11)
    h = fit_hyperbola(b, _steps(b))
    assert h.s_min == pytest.approx(S_MIN, rel=1e-9)
    assert h.e_min == pytest.approx(E_MIN, rel=1e-9)
    assert h.b_crit == pytest.approx(E_MIN / S_MIN, rel=1e-9)
    assert h.points == tuple(zip(b.tolist(), _steps(b).tolist(), strict=True))
    # McCandlish et al. eq. 2.11 on the fitted frontier, E = B S.
    for (s, e), bb in zip(hyperbola_curve(h, [3, 50, 700, 9000]), [3, 50, 700, 9000],
                          strict=True):
        assert e == pytest.approx(bb * s, rel=1e-12)
        assert (s / S_MIN - 1) * (e / E_MIN - 1) == pytest.approx(1.0, rel=1e-8)


def test_hyperbola_recovers_parameters_under_5pct_noise():
    rng = np.random.default_rng(7)
    noisy = _steps(BATCHES) * np.exp(0.05 * rng.standard_normal(len(BATCHES)))
    h = fit_hyperbola(BATCHES, noisy)
    assert h.s_min == pytest.approx(S_MIN, rel=0.05)
    assert h.e_min == pytest.approx(E_MIN, rel=0.05)
    # Same objective solved independently: curve_fit of log S on (log S_min, log E_min).
    ref, _ = optimize.curve_fit(lambda bb, ls, le: np.log(np.exp(ls) + np.exp(le) / bb),
                                BATCHES, np.log(noisy), p0=[math.log(500), math.log(1e4)])
    assert (h.s_min, h.e_min) == pytest.approx(tuple(np.exp(ref)), rel=1e-5)
    # Not a lucky draw: over 200 data sets the typical error is well inside 5%.
    err = []
    for _ in range(200):
        s = _steps(BATCHES) * np.exp(0.05 * rng.standard_normal(len(BATCHES)))
        f = fit_hyperbola(BATCHES, s)
        err.append((f.s_min / S_MIN - 1, f.e_min / E_MIN - 1))
    err = np.abs(np.array(err))
    assert np.all(np.median(err, axis=0) < 0.03)
    assert np.all(np.percentile(err, 90, axis=0) < 0.06)


def test_hyperbola_stays_positive_and_rejects_one_batch_size():
    # Perfect scaling (S = 1e5 / B) with noise: the linear fit's intercept may be negative;
    # the fitted S_min stays positive and B_crit lands beyond the largest batch measured.
    b = 2.0 ** np.arange(3, 11)
    s = 1e5 / b * np.exp(0.05 * np.random.default_rng(1).standard_normal(len(b)))
    h = fit_hyperbola(b, s)
    assert h.s_min > 0 and h.e_min > 0 and h.b_crit > b.max()
    with pytest.raises(ValueError, match="2 distinct batch sizes"):
        fit_hyperbola([64, 64, 64], [10.0, 11.0, 12.0])
    with pytest.raises(ValueError, match="positive"):
        fit_hyperbola([8, 16], [10.0, 0.0])


def _study(rng, seeds=3, spread=0.15, noise=0.05):
    """seed -> {B: steps}: each seed its own S_min, E_min (log-normal about the truth)."""
    out = {}
    for seed in range(seeds):
        s_min = S_MIN * math.exp(spread * rng.standard_normal())
        e_min = E_MIN * math.exp(spread * rng.standard_normal())
        s = _steps(BATCHES, s_min, e_min) * np.exp(noise * rng.standard_normal(len(BATCHES)))
        out[seed] = dict(zip(BATCHES.astype(int).tolist(), s.tolist(), strict=True))
    return out


def test_critical_batch_over_three_seeds():
    per_seed = _study(np.random.default_rng(3))
    per_seed[2][16384] = None  # a run that never reached the target is left out
    per_seed[5] = {64: 1500.0}  # one batch size: no per-seed fit, but in the pooled fit
    cb = critical_batch(per_seed)
    assert isinstance(cb, CriticalBatch) and cb.n == 3 and set(cb.per_seed) == {0, 1, 2}
    assert cb.b_crit.lo < E_MIN / S_MIN < cb.b_crit.hi
    assert cb.s_min.lo < S_MIN < cb.s_min.hi and cb.e_min.lo < E_MIN < cb.e_min.hi
    # Geometric mean and the t interval of the mean log, exponentiated.
    for name in ("s_min", "e_min", "b_crit"):
        logs = np.log([getattr(h, name) for h in cb.per_seed.values()])
        lo, hi = stats.t.interval(0.95, 2, loc=logs.mean(), scale=stats.sem(logs))
        iv = getattr(cb, name)
        assert (iv.mean, iv.lo, iv.hi, iv.n) == pytest.approx(
            (math.exp(logs.mean()), math.exp(lo), math.exp(hi), 3), rel=1e-12)
    assert cb.b_crit.mean == pytest.approx(cb.e_min.mean / cb.s_min.mean, rel=1e-12)
    assert len(cb.per_seed[2].points) == len(BATCHES) - 1
    pts = [(b, s) for d in per_seed.values() for b, s in d.items() if s is not None]
    assert len(cb.pooled.points) == len(pts)
    b, s = zip(*pts, strict=True)
    assert cb.pooled.b_crit == pytest.approx(fit_hyperbola(b, s).b_crit, rel=1e-12)
    # With 3 batch sizes required, a seed with only 2 is dropped.
    two = {0: {8: 9000.0, 64: 2000.0}, **{k: v for k, v in per_seed.items() if k < 2}}
    assert critical_batch(two, min_batch_sizes=3).n == 2
    assert critical_batch({0: {8: 9000.0}}).b_crit is None


def test_critical_batch_interval_covers_the_truth_about_95pct():
    rng = np.random.default_rng(11)
    hits = [critical_batch(_study(rng)).b_crit for _ in range(200)]
    cover = np.mean([iv.lo <= E_MIN / S_MIN <= iv.hi for iv in hits])
    assert 0.90 <= cover <= 0.99


def test_doubling_gain_closed_form():
    h = Hyperbola(S_MIN, E_MIN, E_MIN / S_MIN)
    bc = E_MIN / S_MIN
    for b in (1, 8, 64, 512, 65536):
        assert doubling_gain(h, b) == pytest.approx(0.5 * bc / (b + bc), rel=1e-12)
    assert doubling_gain(h, 1) > 0.49 and doubling_gain(h, 64) == pytest.approx(0.25)
    assert doubling_gain(h, 65536) < 0.001


def test_steps_to_target_first_point_no_interpolation():
    curve = [{"steps": 10, "examples": 320, "dev": 0.5},
             {"steps": 20, "examples": 640, "dev": None},
             {"steps": 30, "examples": 960, "dev": 0.79},
             {"steps": 40, "examples": 1280, "dev": 0.81},
             {"steps": 50, "examples": 1600, "dev": 0.90}]
    assert steps_to_target(curve, 0.8) == (40, 1280)
    assert steps_to_target(curve, 0.5) == (10, 320)
    assert steps_to_target(curve, 0.95) is None


# -- intervals: coverage with 3 seeds --------------------------------------------------------
def test_t_intervals_cover_95pct_and_percentile_bootstrap_does_not():
    rng = np.random.default_rng(2024)
    sets, n, mu = 2000, 3, 1.5
    x = mu + 0.7 * rng.standard_normal((sets, n))
    cover_t = np.mean([(iv := t_interval(row)).lo <= mu <= iv.hi for row in x])
    # Paired runs sharing a seed effect: a = seed + noise, b = seed + delta + noise.
    delta = -0.4
    seed_effect = 2.0 * rng.standard_normal((sets, n))
    a = seed_effect + 0.3 * rng.standard_normal((sets, n))
    b = seed_effect + delta + 0.3 * rng.standard_normal((sets, n))
    diffs = [paired_difference(ra, rb) for ra, rb in zip(a, b, strict=True)]
    cover_paired = np.mean([d.lo <= -delta <= d.hi for d in diffs])
    # The old method: percentile bootstrap of the 3 values (scipy, batched over the rows).
    boot = stats.bootstrap((x,), np.mean, axis=-1, vectorized=True, n_resamples=999,
                           method="percentile", confidence_level=0.95,
                           rng=np.random.default_rng(0)).confidence_interval
    cover_boot = np.mean((boot.low <= mu) & (mu <= boot.high))
    assert 0.93 <= cover_t <= 0.97
    assert 0.93 <= cover_paired <= 0.97
    assert cover_boot < 0.85  # about 0.74 with n = 3


# -- paired differences and tests -------------------------------------------------------------
def _brute_force_sign_flip(d):
    d = np.asarray(d, dtype=float)
    obs = abs(d.mean())
    flips = [abs(np.mean(np.array(s) * d)) for s in itertools.product((-1, 1), repeat=len(d))]
    return np.mean([f >= obs - 1e-12 * max(1.0, obs) for f in flips])


def test_paired_difference_against_scipy_and_brute_force():
    rng = np.random.default_rng(5)
    for n in (2, 3, 4, 5, 7, 9):
        a = rng.normal(0.6, 1.0, n)
        b = a - rng.normal(0.3, 0.5, n)
        pd = paired_difference(a.tolist(), b.tolist())
        assert isinstance(pd, PairedDifference) and pd.n == n
        d = a - b
        lo, hi = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
        assert (pd.mean, pd.lo, pd.hi) == pytest.approx((d.mean(), lo, hi), rel=1e-12)
        assert pd.p_t == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
        assert pd.p_exact == pytest.approx(_brute_force_sign_flip(d), abs=1e-12)
    # Ties in |flipped mean| count as at least as extreme.
    assert sign_flip_p([1.0, -1.0, 2.0, 2.0]) == pytest.approx(
        _brute_force_sign_flip([1.0, -1.0, 2.0, 2.0]))
    # With 3 seeds the smallest possible exact p is 2 / 2^3 = 0.25.
    assert paired_difference([5.0, 6.0, 7.0], [1.0, 1.0, 1.0]).p_exact == 0.25
    one = paired_difference([1.0, None, 3.0], [0.5, 2.0, float("nan")])
    assert (one.mean, one.lo, one.hi, one.n, one.p_t, one.p_exact) == (0.5, None, None, 1,
                                                                        None, None)
    assert paired_difference([], []) is None
    zero = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (zero.mean, zero.lo, zero.hi, zero.p_t, zero.p_exact) == (0, 0, 0, None, 1.0)


def test_holm_by_hand():
    p = [0.01, 0.04, None, 0.03, 0.2]
    # Sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 4*0.01, 3*0.03, max(2*0.04, 0.09), max(0.2, ..).
    assert holm(p) == pytest.approx([0.04, 0.09, None, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([None, None]) == [None, None] and holm([]) == []
    with pytest.raises(ValueError):
        holm([0.1, 1.5])


def test_median_range_stays_in_the_feasible_range():
    assert median_range([5000, 1000, 3000]) == Spread(3000, 1000, 5000, 3)
    assert median_range([4, 1, 2, None, float("nan"), 8]) == Spread(3.0, 1, 8, 4)
    assert median_range([None]) is None
    skewed = [1000, 1000, 9000]
    t = t_interval(skewed)
    assert t.lo < 0  # the t interval leaves the feasible range ...
    m = median_range(skewed)
    assert 1000 <= m.lo <= m.median <= m.hi <= 9000  # ... the median and range do not


# -- trends in log2(batch size), seeds as the unit ---------------------------------------------
def _points(rng, seeds, batches, slope, curvature=0.0, noise=0.01):
    pts = []
    for s in seeds:
        a, b = rng.normal(0.8, 0.05), slope + rng.normal(0, 0.005)
        for bs in batches:
            x = math.log2(bs) - 5
            pts.append((s, bs, a + b * x + curvature * x * x + noise * rng.standard_normal()))
    return pts


def test_seed_trend_against_per_seed_polyfit():
    rng = np.random.default_rng(8)
    pts = _points(rng, range(4), [8, 16, 32, 64, 128], slope=0.02)
    pts.append((9, 64, 0.7))  # one batch size only: no slope for seed 9
    pts.append((0, 256, None))  # missing value left out
    tr = seed_trend(pts)
    slopes, curv = [], []
    for s in range(4):
        x = np.log2([p[1] for p in pts if p[0] == s and p[2] is not None])
        y = np.array([p[2] for p in pts if p[0] == s and p[2] is not None])
        slopes.append(np.polyfit(x, y, 1)[0])
        curv.append(np.polyfit(x, y, 2)[0])
    assert tr.slopes == pytest.approx(dict(enumerate(slopes)), rel=1e-9)
    assert tr.curvatures == pytest.approx(dict(enumerate(curv)), rel=1e-6, abs=1e-12)
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(slopes), scale=stats.sem(slopes))
    assert (tr.slope.mean, tr.slope.lo, tr.slope.hi, tr.slope.n) == pytest.approx(
        (np.mean(slopes), lo, hi, 4), rel=1e-9)
    assert tr.slope.p_t == pytest.approx(stats.ttest_1samp(slopes, 0).pvalue, rel=1e-9)
    assert tr.slope.p_t < 0.05 and tr.slope.p_exact == pytest.approx(2 / 16)
    # Two batch sizes give a slope but no curvature.
    flat = seed_trend([(0, 8, 0.1), (0, 16, 0.2), (1, 8, 0.15), (1, 16, 0.3)])
    assert flat.slope.mean == pytest.approx(0.125) and flat.curvature is None
    assert seed_trend([(0, 8, 0.1), (1, 16, 0.2)]) is None


def test_seed_trend_curvature_detects_a_planted_quadratic():
    batches = [8, 16, 32, 64, 128, 256]
    rng = np.random.default_rng(4)
    bent = seed_trend(_points(rng, range(5), batches, slope=0.01, curvature=-0.01))
    straight = seed_trend(_points(rng, range(5), batches, slope=0.01))
    assert bent.curvature.n == 5
    assert bent.curvature.hi < 0 and bent.curvature.p_t < 0.01
    assert bent.curvature.mean == pytest.approx(-0.01, abs=0.003)
    assert straight.curvature.lo < 0 < straight.curvature.hi
    assert straight.curvature.p_t > 0.05


def test_trend_difference_is_the_paired_difference_of_seed_slopes():
    rng = np.random.default_rng(9)
    batches = [8, 32, 128, 512]
    a = _points(rng, [0, 1, 2, 3], batches, slope=0.03)
    b = _points(rng, [1, 2, 3, 4], batches, slope=0.01)
    d = trend_difference(a, b)
    ref = []
    for s in (1, 2, 3):  # seeds in both
        fit = [np.polyfit(np.log2([p[1] for p in pts if p[0] == s]),
                          [p[2] for p in pts if p[0] == s], 1)[0] for pts in (a, b)]
        ref.append(fit[0] - fit[1])
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(ref), scale=stats.sem(ref))
    assert (d.mean, d.lo, d.hi, d.n) == pytest.approx((np.mean(ref), lo, hi, 3), rel=1e-9)
    assert d.mean == pytest.approx(0.02, abs=0.01)
    assert trend_difference(a, _points(rng, [7], batches, slope=0.0)) is None
