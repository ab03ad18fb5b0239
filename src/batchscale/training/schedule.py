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
