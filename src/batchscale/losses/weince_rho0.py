r"""WEINCE's rho0 for the queries (L0) before their exact sweep, from a bfloat16 product.

rho0 is the q-quantile over the batch's anchors of rho_i = max(1 - max_j s_ij, eps), the
shortfall of each query's largest negative similarity. It is the one batch-level quantity
of the L0 lambdas: with it known, each strip of whole rows holds everything its anchors'
lambdas need, and a single sweep gives the loss and its gradient
(:mod:`~batchscale.losses.tiled_rows`). Finding it costs a sweep over the whole matrix, so
that sweep runs in bfloat16 (2.3-3x faster than float32 on CPUs with AVX512-BF16, measured)
and stays exact:

* each row's max negative from the bfloat16 product lies within a rigorous bound e_i of the
  true one: inputs rounded to bfloat16 move s_ij by at most
  ||q_i - q~_i|| ||c_j|| + ||q~_i|| ||c_j - c~_j||, the float32 accumulation by at most
  gamma_d ||q~_i|| ||c~_j||, and the bfloat16 result by at most 2^-8 |s~_ij|;
* order statistics are monotone, so rho0 lies between the q-quantiles of the lower and of
  the upper bounds of rho; only the rows whose interval meets that window can be rho0 or
  change its rank, and only they are computed exactly (198 of 16,384 rows, 443 of 32,768
  on random cosines here).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..hardware import cpu_has_native_bfloat16
from .candidates import keep_negatives_
from .tile_plan import TilePlan, blocks, strip_height, strip_sims
from .weince_tail import AnchorPool, WeinceConfig, rho_from_max

_LOW = torch.bfloat16
_UNIT = 2.0**-8                  # bfloat16 rounding, relative (2^-9 to nearest, doubled)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether a bfloat16 matmul beats the float32 one here (else the sweep runs exact)."""
    if device.type == "cuda":
        # cuBLAS may round split-K partial sums to bfloat16 unless told not to, and the
        # bounds assume float32 sums
        return (torch.cuda.is_bf16_supported()
                and not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    return device.type == "cpu" and cpu_has_native_bfloat16()


def _norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Row norms computed in ``dtype``, float64, rounded up by far more than their error."""
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype).to(torch.float64) * (1 + 1e-3)


def _mask_negatives_(sims: Tensor, rows: Tensor, answer_ids: Tensor | None) -> Tensor:
    """Keep each row's negatives: its positive (column = row index) and the candidates that
    share its positive's false-negative id (text or group) go to -inf.

    The rows are an index tensor (the refinement recomputes scattered rows), so the false
    negatives come from the ids here rather than from ``candidate_mask``, which takes slices;
    the same-id mask covers the positive too."""
    positives = (torch.arange(rows.numel(), device=sims.device), rows)
    same = (None if answer_ids is None
            else answer_ids[None, : sims.shape[1]] == answer_ids[rows][:, None])
    return keep_negatives_(sims, positives, same)


def _negative_strips(q: Tensor, candidates: Tensor, rows: Tensor, answer_ids: Tensor | None,
                     tile: int) -> Iterator[tuple[slice, Tensor]]:
    """Strips of whole rows of q @ candidates.T (``q`` holds rows ``rows`` of the batch) with
    everything but each row's negatives at -inf."""
    height = strip_height(candidates.shape[0], tile)
    buffer = q.new_empty((min(height, rows.numel()), candidates.shape[0]))
    for r in blocks(rows.numel(), height):
        yield r, _mask_negatives_(strip_sims(q[r], candidates, buffer), rows[r], answer_ids)


def _max_negatives(q: Tensor, candidates: Tensor, rows: Tensor, answer_ids: Tensor | None,
                   tile: int) -> Tensor:
    """max_j s_ij over each row's negatives, float64."""
    out = q.new_empty(rows.numel(), dtype=torch.float64)
    for r, sims in _negative_strips(q, candidates, rows, answer_ids, tile):
        out[r] = sims.amax(dim=1).to(torch.float64)
    return out


# Columns per block of the two-level row max: an int16 amax over 128 columns runs at memory
# speed, where a max with its index takes ~8x as long (measured on a 1,024 x 16,384 strip).
_BLOCK = 128
_INT16_MIN = torch.iinfo(torch.int16).min


def _top_two(sims: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's largest value of a bfloat16 strip, its column, and the largest value of the
    other columns (bfloat16, long, bfloat16).

    On the bit patterns as int16, which order the non-negative values like the values and put
    every negative one below them: a max per block of columns, then the winning block's own
    max. Rows whose two largest values are not both non-negative take the float path."""
    rows, cols = sims.shape
    bits = sims.view(torch.int16)
    whole = cols - cols % _BLOCK
    block_max = [bits[:, :whole].view(rows, -1, _BLOCK).amax(dim=2)]
    if whole < cols:
        block_max.append(bits[:, whole:].amax(dim=1, keepdim=True))
    blocks = torch.cat(block_max, dim=1) if len(block_max) > 1 else block_max[0]
    top, block = blocks.max(dim=1)
    every = torch.arange(rows, device=sims.device)
    blocks[every, block] = _INT16_MIN
    columns = block[:, None] * _BLOCK + torch.arange(_BLOCK, device=sims.device)
    inside = columns < cols
    inner = bits.gather(1, columns.clamp_max_(cols - 1)).masked_fill_(~inside, _INT16_MIN)
    column = columns[every, inner.argmax(dim=1)]
    inner[every, column - block * _BLOCK] = _INT16_MIN
    second = torch.maximum(blocks.amax(dim=1), inner.amax(dim=1))
    negative = second < 0             # on the bit patterns (top's too): -0.0 and the fill
    first = top.view(torch.bfloat16).clone()
    second = second.view(torch.bfloat16)
    if bool(negative.any()):
        strip = sims[negative]
        first[negative], column[negative] = strip.max(dim=1)
        strip[torch.arange(strip.shape[0], device=sims.device), column[negative]] = \
            float("-inf")
        second[negative] = strip.amax(dim=1)
    return first, column, second


def _max_negative_bounds(q: Tensor, candidates: Tensor, answer_ids: Tensor | None, tile: int
                         ) -> tuple[Tensor, Tensor]:
    """(lower, upper) bounds of each query's max negative similarity, float64.

    In bfloat16, each row's two largest negatives: the largest one's column, recomputed
    exactly, bounds the max from below, and the max of the other columns is at most the
    second one plus its error bound (mostly below the first: the bounds then coincide)."""
    m = q.shape[0]
    rows = torch.arange(m, device=q.device)
    if not (q.dtype in (torch.float32, torch.float64) and fast_bfloat16(q.device)):
        exact = _max_negatives(q, candidates, rows, answer_ids, tile)
        return exact, exact
    q_low, c_low = q.to(_LOW), candidates.to(_LOW)
    first = q.new_empty(m, dtype=torch.float64)
    second = torch.empty_like(first)
    column = torch.empty(m, dtype=torch.long, device=q.device)
    for r, sims in _negative_strips(q_low, c_low, rows, answer_ids, tile):
        top, column[r], runner_up = _top_two(sims)
        first[r], second[r] = top.to(torch.float64), runner_up.to(torch.float64)
    q_norm, c_norm = _norms(q_low, q.dtype), _norms(c_low, q.dtype)
    # (a mixed-dtype sub runs 4x slower than a conversion and a sub)
    dq = _norms(q - q_low.to(q.dtype), q.dtype)
    dc = _norms(candidates - c_low.to(q.dtype), q.dtype)
    # |s_ij - s~_ij| <= rounding + 2^-8 |s~_ij|, where the float32 sums' share alone also
    # covers a dot product recomputed in q's dtype
    summing = (q.shape[1] + 2) * 2.0**-23 * q_norm * c_norm.max() + 1e-30
    rounding = dq * _norms(candidates, q.dtype).max() + q_norm * dc.max() + summing
    exact = (q * candidates[column]).sum(dim=1).to(torch.float64)
    lower = exact - summing
    upper = torch.maximum(exact + summing, second + _UNIT * second.abs() + rounding)
    none = first == float("-inf")                   # no negative at all
    return lower.masked_fill_(none, float("-inf")), upper.masked_fill_(none, float("-inf"))


def row_rho0(q: Tensor, candidates: Tensor, plan: TilePlan, k: Tensor, cfg: WeinceConfig,
             gather_anchors: AnchorPool | None) -> Tensor:
    """rho0 of the queries, exactly as :func:`~batchscale.losses.weince_tail.reference_rho`
    would give it from every row's exact max negative (0-dim, float64)."""
    counted = plan.is_anchor & (k > 0)        # the anchors rho0 is taken over

    def every_counted(x: Tensor) -> Tensor:
        """The counted rows of ``x``, this rank's or (gathered) every rank's."""
        return x[counted] if gather_anchors is None else gather_anchors(x[counted])

    lower, upper = _max_negative_bounds(q, candidates, plan.answer_ids, plan.tile)
    # rho falls as the max negative grows: its lower bound comes from the upper one
    rho_lo, rho_hi = rho_from_max(upper, k, cfg), rho_from_max(lower, k, cfg)
    all_lo, all_hi = every_counted(rho_lo), every_counted(rho_hi)
    count = all_lo.numel()
    if count == 0:
        return torch.ones((), device=q.device, dtype=torch.float64)
    rank = round(cfg.quantile * (count - 1))
    # rho0 lies in [window_lo, window_hi]; rows wholly below it take the first ranks, rows
    # wholly above it the last: rho0 is the (rank - below)-th of the rest, exactly computed.
    window_lo = torch.sort(all_lo).values[rank]
    window_hi = torch.sort(all_hi).values[rank]
    below = int((all_hi < window_lo).sum())

    def undecided(lo: Tensor, hi: Tensor) -> Tensor:
        """Rows whose rho interval [lo, hi] meets the window: they may be rho0."""
        return ~(hi < window_lo) & ~(lo > window_hi)

    # rows whose bounds coincide (the exact sweep) are known already
    refine = counted & undecided(rho_lo, rho_hi) & (rho_lo != rho_hi)
    exact = rho_lo.clone()
    index = refine.nonzero().squeeze(1)
    if index.numel():
        top = _max_negatives(q[index], candidates, index, plan.answer_ids, plan.tile)
        exact[index] = rho_from_max(top, k[index], cfg)
    rest = every_counted(exact)[undecided(all_lo, all_hi)]
    return torch.sort(rest).values[rank - below]
