"""Which columns of a block of similarities are an anchor's negatives: counts of them.

Imports nothing of the loss package, so that the tail fit (:mod:`weince_tail`) and the
core cross-entropy (:mod:`softmax`) can both use it without an import cycle."""

from __future__ import annotations

import torch
from torch import Tensor


def negative_counts(candidate_mask: Tensor | None, rows: int, cols: int,
                    device: torch.device) -> Tensor:
    """K_i, the number of negatives of each anchor (its candidates but the positive); 0 for
    an anchor whose candidates all share its group. Sizes WEINCE's tail, never a divisor."""
    if candidate_mask is None:
        return torch.full((rows,), cols - 1, dtype=torch.long, device=device)
    return candidate_mask.sum(dim=1, dtype=torch.int32).to(torch.long) - 1


def keep_negatives_(sims: Tensor, positives: tuple[Tensor, Tensor] | None,
                    non_candidates: Tensor | None) -> Tensor:
    """``sims`` with everything but each anchor's negatives at -inf, in place: the entries
    at ``positives`` (row offsets, column offsets) and those where ``non_candidates`` is
    True (false negatives: same text or group id as the positive). The one place the tail
    fits and the rho0 sweeps hide what is not a negative; copy ``sims`` first to keep it."""
    if positives is not None:
        sims[positives] = float("-inf")
    if non_candidates is not None:
        sims.masked_fill_(non_candidates, float("-inf"))
    return sims
