"""The critical batch size: the steps/examples trade-off of McCandlish et al. (2018).

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), eq. 2.11: the steps S and examples E = B S needed to reach a fixed
target lie on the hyperbola

    (S / S_min - 1) (E / E_min - 1) = 1,    equivalently    S(B) = S_min + E_min / B,

with S_min the steps needed at an infinite batch, E_min the examples needed at a batch of
one, and the critical batch size B_crit = E_min / S_min: below B_crit doubling B nearly
halves the steps, above it it saves little (see :func:`doubling_gain`).

* :func:`steps_to_target`: (steps, examples) at the first evaluation point that reaches a
  target (no interpolation between points);
* :func:`fit_hyperbola`: S_min, E_min from (B, S) points, least squares on log S with both
  parameters positive;
* :func:`critical_batch`: the fit per seed, geometric means over seeds with 95% t
  intervals on the log scale, and the pooled fit;
* :func:`hyperbola_curve`, :func:`doubling_gain`: the frontier for plotting, and what a
  doubling of B buys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from .stats import Interval, t_interval


@dataclass(frozen=True)
class Hyperbola:
    """S(B) = s_min + e_min / B, fitted to ``points`` ((batch size, steps) pairs)."""

    s_min: float
    e_min: float
    b_crit: float
    points: tuple[tuple[float, float], ...] = ()

    def steps(self, batch_size: float) -> float:
        """Steps to the target at batch size B: S_min + E_min / B."""
        return self.s_min + self.e_min / batch_size

    def examples(self, batch_size: float) -> float:
        """Examples to the target at batch size B: B S(B) = B S_min + E_min."""
        return batch_size * self.s_min + self.e_min


def _points(batch_sizes: Sequence[float], steps: Sequence[float]
            ) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"batch_sizes and steps must be 1-D of one length, "
                         f"got {b.shape} and {s.shape}")
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(s))):
        raise ValueError("batch_sizes and steps must be finite")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("batch_sizes and steps must be positive")
    if len(np.unique(b)) < 2:
        raise ValueError(f"fitting S(B) = S_min + E_min / B needs at least 2 distinct batch "
                         f"sizes, got {sorted(set(b.tolist()))}")
    return b, s


def fit_hyperbola(batch_sizes: Sequence[float], steps: Sequence[float]) -> Hyperbola:
    """Fit S(B) = S_min + E_min / B to the points (B_i, S_i).

    Least squares on log S (the errors of a steps count are relative: a run at a small
    batch takes many more steps and scatters as much in proportion), over log S_min and
    log E_min so that both stay positive (scipy.optimize.least_squares). It starts from the
    exact linear least squares of S on 1/B (clipped to positive values), so noiseless
    points are recovered to rounding. Raises ValueError for fewer than 2 distinct batch
    sizes, or for non-positive or non-finite values.

    Where the data show no floor (steps falling as fast as 1/B: perfect scaling over the
    range) S_min goes towards 0 and B_crit grows past the largest batch measured; where
    they show no 1/B part, E_min goes towards 0. Both are then bounds of the range
    measured, not estimates; the fit keeps them positive (>= 1e-12 of the data's scale).
    """
    b, s = _points(batch_sizes, steps)
    # Linear start: S = a + c / B.
    design = np.column_stack([np.ones_like(b), 1.0 / b])
    a, c = np.linalg.lstsq(design, s, rcond=None)[0]
    floor_s = 1e-12 * float(s.max())
    floor_e = 1e-12 * float((s * b).max())
    a = max(float(a), 1e-6 * float(s.min()))
    c = max(float(c), 1e-6 * float((s * b).min()))
    log_s = np.log(s)

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.logaddexp(theta[0], theta[1] - np.log(b)) - log_s

    lower = [math.log(floor_s), math.log(floor_e)]
    x0 = np.clip([math.log(a), math.log(c)], np.add(lower, 1e-9), np.inf)
    res = optimize.least_squares(residuals, x0, bounds=(lower, [np.inf, np.inf]),
                                 method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14,
                                 max_nfev=10_000)
    s_min, e_min = (float(v) for v in np.exp(res.x))
    return Hyperbola(s_min, e_min, e_min / s_min,
                     tuple((float(x), float(y)) for x, y in zip(b, s, strict=True)))


@dataclass(frozen=True)
class CriticalBatch:
    """S_min, E_min and B_crit over seeds, with the per-seed and pooled fits.

    ``s_min``, ``e_min``, ``b_crit``: geometric mean over the seeds fitted (``mean``) with
    the 95% t interval of the mean of the logs, exponentiated (``lo``, ``hi``; positive;
    None with one seed); None when no seed could be fitted. ``n``: the seeds fitted.
    ``per_seed``: each seed's fit. ``pooled``: one fit to every seed's points together
    (None with fewer than 2 distinct batch sizes overall); it weights seeds by their number
    of points and has no interval.
    """

    s_min: Interval | None
    e_min: Interval | None
    b_crit: Interval | None
    n: int
    per_seed: dict[int, Hyperbola] = field(default_factory=dict)
    pooled: Hyperbola | None = None


def _geometric(values: Sequence[float]) -> Interval | None:
    iv = t_interval([math.log(v) for v in values])
    if iv is None:
        return None
    return Interval(math.exp(iv.mean), None if iv.lo is None else math.exp(iv.lo),
                    None if iv.hi is None else math.exp(iv.hi), iv.n)


def _reached(steps_by_batch: Mapping[int, float | None]) -> list[tuple[float, float]]:
    return [(float(b), float(s)) for b, s in sorted(steps_by_batch.items())
            if s is not None and math.isfinite(s) and s > 0]


def critical_batch(per_seed: Mapping[int, Mapping[int, float | None]], *,
                   min_batch_sizes: int = 2) -> CriticalBatch:
    """The critical batch size over seeds.

    ``per_seed``: seed -> {batch size: steps to the target}; None (or a missing batch size)
    means the run never reached the target. Each seed with at least ``min_batch_sizes``
    (>= 2; 3 or more gives a fit that is not just a line through two points) batch sizes
    that reached the target is fitted with :func:`fit_hyperbola`. S_min, E_min and B_crit
    are positive and multiplicative, so they are summarised on the log scale: geometric
    mean over seeds and the Student-t 95% interval of the mean log, exponentiated (it stays
    positive; the seed is the unit, n = seeds fitted). No percentile bootstrap: with a
    handful of seeds it covers far less than 95%. The geometric mean of B_crit equals the
    ratio of those of E_min and S_min.
    """
    if min_batch_sizes < 2:
        raise ValueError("min_batch_sizes must be >= 2 (a hyperbola has 2 parameters)")
    fits: dict[int, Hyperbola] = {}
    pooled_points: list[tuple[float, float]] = []
    for seed, by_batch in sorted(per_seed.items()):
        pts = _reached(by_batch)
        pooled_points += pts
        if len({b for b, _ in pts}) >= min_batch_sizes:
            b, s = zip(*pts, strict=True)
            fits[int(seed)] = fit_hyperbola(b, s)
    pooled = None
    if len({b for b, _ in pooled_points}) >= 2:
        b, s = zip(*pooled_points, strict=True)
        pooled = fit_hyperbola(b, s)
    hs = list(fits.values())
    return CriticalBatch(_geometric([h.s_min for h in hs]), _geometric([h.e_min for h in hs]),
                         _geometric([h.b_crit for h in hs]), len(hs), fits, pooled)


def steps_to_target(curve: Sequence[Mapping[str, float | None]],
                    target: float) -> tuple[int, int] | None:
    """(steps, examples) at the first evaluation point with dev >= target; None if none.

    ``curve``: evaluation points in training order, each with keys ``steps``, ``examples``
    and ``dev`` (None: not evaluated). No interpolation between points:
    the figure is a point that was measured.
    """
    for p in curve:
        d = p.get("dev")
        if d is not None and math.isfinite(d) and d >= target:
            return int(p["steps"]), int(p["examples"])
    return None


def hyperbola_curve(h: Hyperbola, batch_sizes: Sequence[float]) -> list[tuple[float, float]]:
    """(S, E) on the fitted frontier at each batch size, for plotting E against S."""
    return [(h.steps(b), h.examples(b)) for b in batch_sizes]


def doubling_gain(h: Hyperbola, b: float) -> float:
    """Fraction of steps saved by doubling B at b: 1 - S(2b) / S(b).

    Equals (1/2) B_crit / (b + B_crit): about 1/2 (perfect scaling) for b << B_crit, 1/4 at
    b = B_crit, about 0 (no gain from a bigger batch) for b >> B_crit.
    """
    if b <= 0:
        raise ValueError(f"batch size must be positive, got {b}")
    return 1.0 - h.steps(2 * b) / h.steps(b)
