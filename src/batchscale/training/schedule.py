"""Learning rate: scaling with the batch size, warmup then linear decay."""

from __future__ import annotations

import math
from typing import Literal

LrScaling = Literal["none", "linear", "sqrt"]


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int,
              scaling: LrScaling) -> float:
    """``lr`` for ``batch_size``: unchanged, times B/ref (Goyal et al. 2017), or times
    sqrt(B/ref) (Krizhevsky 2014; the usual rule for Adam)."""
    ratio = batch_size / reference_batch_size
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * ratio
    if scaling == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"lr_scaling must be none, linear or sqrt, got {scaling!r}")


def warmup_steps(total_steps: int, warmup: float) -> int:
    return math.ceil(warmup * total_steps)


def warmup_linear(step: int, total_steps: int, warmup: int) -> float:
    """The lr multiplier at ``step``: 0 -> 1 over ``warmup`` steps, then 1 -> 0 at the end
    (sentence-transformers' and transformers' ``WarmupLinear``)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def log_points(total_examples: int, points: int, batch_size: int,
               align: list[int] | None = None) -> list[int]:
    """Example counts of a log-spaced evaluation schedule: the targets
    ``geomspace(1, total_examples, points)``, each rounded up to a multiple of the largest
    batch size of ``align`` not above it (of ``batch_size`` without one), then to a whole
    step of ``batch_size``, without repeats.

    The targets do not depend on the run, so the runs of a sweep (``align``: its batch
    sizes) are measured at the same example counts wherever their steps allow: exactly so
    when the batch sizes divide each other and the budget (powers of two, say)."""
    if total_examples < 1 or points < 2 or batch_size < 1:
        raise ValueError(f"log_points needs total_examples >= 1, points >= 2, batch_size >= 1; "
                         f"got {total_examples}, {points}, {batch_size}")
    out: list[int] = []
    for k in range(points):
        target = total_examples ** (k / (points - 1))
        quantum = max([b for b in align or [] if b <= target] or [batch_size])
        target = math.ceil(target / quantum - 1e-9) * quantum
        at = min(total_examples, math.ceil(target / batch_size) * batch_size)
        if not out or at > out[-1]:
            out.append(at)
    return out


#: The next evaluation point of a schedule that has ended.
NEVER = 2**62


def next_point(done: int, *, every: int | None = None,
               schedule: list[int] | None = None) -> int:
    """The example count of the next evaluation point after ``done`` examples: the next
    multiple of ``every`` (linear) or the next count of ``schedule`` (log; past its end, never).
    """
    if schedule is not None:
        return next((x for x in schedule if x > done), NEVER)
    if every is None or every < 1:
        raise ValueError(f"next_point: every must be >= 1, got {every}")
    return (done // every + 1) * every
