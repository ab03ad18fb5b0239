"""What every tiled sweep shares: the blocks of a tile grid, strips of whole rows, where the
diagonal (the positives) falls in a tile, the false-negative masks of a tile, the online
log-sum-exp and the per-direction results the backward needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch_softmax import candidate_mask
from .logits import Coefficients, LogitPolicy
from .weince_tail import WeinceLambda

DEFAULT_TILE = 1024


def blocks(total: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, total)) for start in range(0, total, tile)]


def nonnegative_blocks(values: Tensor, tile: int) -> list[bool]:
    """Whether each block of ``values`` that :func:`blocks` cuts holds no negative entry, in
    one host read for all of them: read inside a tile loop, each block's answer would wait
    for the device to finish the tiles before it."""
    ok = values.reshape(-1) >= 0
    ok = torch.cat([ok, ok.new_ones(-ok.numel() % tile)])
    return ok.reshape(-1, tile).all(dim=1).tolist()


def diagonal(rows: slice, cols: slice, device: torch.device
             ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(global index, row offset, column offset) of the entries i == j inside a tile."""
    lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
    if lo >= hi:
        return None
    idx = torch.arange(lo, hi, device=device)
    return idx, idx - rows.start, idx - cols.start


# A strip holds at most this many similarities (64 MB in float32): whole rows, and enough of
# them that the strip's matmuls run near the speed of square tiles (timings by strip height:
# benchmarks/README.md).
STRIP_ENTRIES = 1 << 24


def strip_height(width: int, tile: int) -> int:
    """Rows of a strip of whole rows ``width`` wide: ``tile``, or fewer to hold at most
    STRIP_ENTRIES."""
    return max(1, min(tile, STRIP_ENTRIES // max(width, 1)))


# Column width of the matmuls that fill a strip.
_STRIP_MM_COLUMNS = 2048


def strip_sims(anchors: Tensor, candidates: Tensor, buffer: Tensor) -> Tensor:
    """anchors @ candidates.T, written into the leading rows of a reused strip buffer a block
    of columns at a time: a reused buffer avoids first-touch page faults, and blocks of
    columns avoid MKL's slow split of one thin product (timings: benchmarks/README.md)."""
    out = buffer[: anchors.shape[0]]
    for cols in blocks(candidates.shape[0], _STRIP_MM_COLUMNS):
        torch.mm(anchors, candidates[cols].T, out=out[:, cols])
    return out


def negatives_per_anchor(ids: Tensor | None, anchors: int, candidates: int,
                         device: torch.device) -> Tensor:
    """K_i: candidates of anchor i minus its positive and the candidates sharing its id (text
    or group; the positive's is ``ids[i]``), as :func:`~batchscale.losses.candidates.
    negative_counts` counts the dense mask; 0 when its whole batch is its group. Sizes
    WEINCE's tail, never a divisor."""
    if ids is None:
        return torch.full((anchors,), candidates - 1, dtype=torch.long, device=device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return candidates - counts[inverse[:anchors]]


def masked_(block: Tensor, mask: Tensor | None) -> Tensor:
    """``block`` with the entries outside ``mask`` at -inf, in place."""
    return block if mask is None else block.masked_fill_(~mask, float("-inf"))


def online_logsumexp_(run_max: Tensor, run_sum: Tensor, logits: Tensor, dim: int) -> None:
    """Fold a block's logits into the running (max, sum) of each anchor, in place; the
    anchors lie along ``1 - dim`` and ``dim`` is reduced."""
    new_max = torch.maximum(run_max, logits.amax(dim=dim))
    # An anchor whose candidates so far are all masked has max -inf: shift by 0 instead.
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    weights = logits.sub_(shift.unsqueeze(dim)).exp_()
    run_sum.mul_(torch.exp(run_max - shift)).add_(weights.sum(dim))
    run_max.copy_(new_max)


def tau_sum(grad_logits: Tensor, sims: Tensor, coef: Coefficients, dim: int) -> Tensor:
    """sum_ij dL/dg_ij * tau_weight * s_ij, tau_weight per anchor (anchors along 1 - dim)."""
    per_anchor = (grad_logits * sims).sum(dim)
    if coef.tau_weight is not None:
        per_anchor = per_anchor * coef.tau_weight.reshape(-1)
    return per_anchor.sum()


@dataclass(frozen=True)
class TilePlan:
    """What the sweeps need besides the embeddings and the temperature."""

    policy: LogitPolicy
    rows: bool                       # L0: queries against all candidates
    cols: bool                       # L1: answers (first m candidates) against queries
    answer_ids: Tensor | None
    query_ids: Tensor | None
    is_anchor: Tensor                # (m,) bool
    tile: int
    shift: Tensor | None = None      # sigma of the shared-shift plain path (see the docstring)

    def row_mask(self, rows: slice, cols: slice) -> Tensor | None:
        """L0's candidates: queries ``rows`` against candidates ``cols``."""
        return candidate_mask(self.answer_ids, rows, cols)

    def col_mask(self, answers: slice, rows: slice) -> Tensor | None:
        """L1's candidates, transposed to the (queries, answers) layout of a tile."""
        mask = candidate_mask(self.query_ids, answers, rows)
        return None if mask is None else mask.T


@dataclass
class DirectionState:
    """One direction's anchors after the forward: what its loss and backward need."""

    lse: Tensor                      # (m,) log-sum-exp of each anchor's logits
    positive: Tensor                 # (m,) each anchor's positive logit
    coef: Coefficients               # the logits' per-anchor constants
    state: WeinceLambda | None


MaybeDirection = DirectionState | None       # None: the direction is not computed


def running_stats(m: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return like.new_full((m,), float("-inf")), like.new_zeros(m), like.new_zeros(m)


def finish_direction(stats: tuple[Tensor, Tensor, Tensor], coef: Coefficients,
                     state: WeinceLambda | None) -> DirectionState:
    run_max, run_sum, positive = stats
    return DirectionState(run_sum.log() + run_max, positive, coef, state)
