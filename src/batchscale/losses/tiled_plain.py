r"""The tiled forward of plain logits g = s / tau (InfoNCE, BSC), and the shared-shift
backward.

The general path keeps an online log-sum-exp per row and per column (running max M and sum
Z, rescaled as M grows; Milakov & Gimelshein, "Online normalizer calculation for softmax",
2018):

    M' = max(M, max_j g_ij),   Z' = Z e^{M - M'} + sum_j e^{g_ij - M'},   l_i = log Z + M - g_ii

Plain logits need no running max when they are bounded: every logit lies in [-sigma, sigma]
with sigma = max ||q|| max ||c|| / tau (1 / tau for cosines), so while e^{-2 sigma} is a
normal float, exp(g - sigma) loses nothing on any entry, and one exp per tile serves both
directions (the row and the column sums of the same block), in the forward and in the
backward. Masks (ids) or a wider range (float32 and tau < 0.025 for cosines) take the online
path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .logits import Coefficients, mixed_logits
from .tile_plan import (
    DirectionState,
    MaybeDirection,
    TilePlan,
    blocks,
    diagonal,
    finish_direction,
    masked_,
    online_logsumexp_,
    running_stats,
)

# The widest logit range 2 sigma whose exp(-2 sigma) stays a normal float (min normal e^-87.3
# in float32, e^-708 in float64).
SHARED_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def shared_shift(q: Tensor, candidates: Tensor, coef: Coefficients,
                 masked: bool) -> Tensor | None:
    """sigma >= max |g| over the batch for plain logits without masks, or None."""
    limit = SHARED_RANGE.get(q.dtype)
    if limit is None or coef.mix is not None or masked or q.shape[0] == 0:
        return None
    bound = (coef.scale.abs() * q.norm(dim=1).max() * candidates.norm(dim=1).max()
             ).to(torch.float64)
    # 1e-3 of slack for the rounding of the norms and of the matmul.
    sigma = bound * (1.0 + 1e-3)
    return sigma.to(q.dtype) if 2.0 * float(sigma) <= limit else None


def shared_exp(sims: Tensor, coef: Coefficients, shift: Tensor) -> Tensor:
    """exp(g - sigma) of a block, a fresh buffer."""
    return mixed_logits(sims, coef, None, -shift).exp_()


def shared_forward(q: Tensor, candidates: Tensor, coef: Coefficients, plan: TilePlan,
                   shift: Tensor) -> tuple[MaybeDirection, MaybeDirection]:
    m, n = q.shape[0], candidates.shape[0]
    row_sum, row_pos = q.new_zeros(m), q.new_zeros(m)
    col_sum = q.new_zeros(m)
    width = n if plan.rows else m
    for r in blocks(m, plan.tile):
        for c in blocks(width, plan.tile):
            sims = q[r] @ candidates[c].T
            diag = diagonal(r, c, sims.device)
            if diag is not None:
                row_pos[diag[0]] = sims[diag[1], diag[2]] * coef.scale
            weights = shared_exp(sims, coef, shift)
            if plan.rows:
                row_sum[r] += weights.sum(dim=1)
            if plan.cols and c.start < m:
                answers = slice(c.start, min(c.stop, m))
                col_sum[answers] += weights[:, : answers.stop - answers.start].sum(dim=0)

    def direction(total: Tensor) -> DirectionState:
        return DirectionState(total.log() + shift, row_pos, coef, None)

    return (direction(row_sum) if plan.rows else None,
            direction(col_sum) if plan.cols else None)


def plain_forward(q: Tensor, candidates: Tensor, tau: Tensor, plan: TilePlan
                  ) -> tuple[MaybeDirection, MaybeDirection]:
    m, n = q.shape[0], candidates.shape[0]
    coef = plan.policy.coefficients(None, tau)
    if plan.shift is not None:
        return shared_forward(q, candidates, coef, plan, plan.shift)
    rows, cols = running_stats(m, q), running_stats(m, q)
    for r in blocks(m, plan.tile):
        for c in blocks(n, plan.tile):
            sims = q[r] @ candidates[c].T
            diag = diagonal(r, c, sims.device)
            if plan.rows:
                logits = masked_(mixed_logits(sims, coef, None), plan.row_mask(r, c))
                if diag is not None:
                    rows[2][diag[0]] = logits[diag[1], diag[2]]
                online_logsumexp_(rows[0][r], rows[1][r], logits, dim=1)
            if plan.cols and c.start < m:
                answers = slice(c.start, min(c.stop, m))
                sub = sims[:, : answers.stop - answers.start]
                logits = masked_(mixed_logits(sub, coef, None), plan.col_mask(answers, r))
                if diag is not None:
                    cols[2][diag[0]] = logits[diag[1], diag[2]]
                online_logsumexp_(cols[0][answers], cols[1][answers], logits, dim=0)
    return (finish_direction(rows, coef, None) if plan.rows else None,
            finish_direction(cols, coef, None) if plan.cols else None)


def shared_backward(q: Tensor, candidates: Tensor, plan: TilePlan, rows: DirectionState,
                    cols: DirectionState, grad_rows: Tensor, grad_cols: Tensor, need_tau: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of the shared-shift plain path over both directions: dL/dg_ij =
    w_ij (r_i + c_j) minus the positives' grad on the diagonal, with w = exp(g - sigma) once
    per tile and the per-anchor factors r_i = grad_i e^{sigma - lse_i} (rows), c_j likewise
    (columns)."""
    assert plan.shift is not None
    shift = plan.shift
    m, n = q.shape[0], candidates.shape[0]
    coef = rows.coef
    row_factor = grad_rows * torch.exp(shift - rows.lse)
    col_factor = grad_cols * torch.exp(shift - cols.lse)
    diag_grad = grad_rows + grad_cols
    grad_q, grad_c = torch.zeros_like(q), torch.zeros_like(candidates)
    tau_term = q.new_zeros(())
    for r in blocks(m, plan.tile):
        for c in blocks(n, plan.tile):
            sims = q[r] @ candidates[c].T
            weights = shared_exp(sims, coef, shift)
            grad_logits = torch.mul(weights, row_factor[r, None])
            size = max(0, min(c.stop, m) - c.start)    # L1's candidates: the first m
            if size:
                grad_logits[:, :size].addcmul_(weights[:, :size],
                                               col_factor[None, c.start:c.start + size])
            diag = diagonal(r, c, sims.device)
            if diag is not None:
                grad_logits[diag[1], diag[2]] -= diag_grad[diag[0]]
            if need_tau:
                tau_term = tau_term + (grad_logits * sims).sum()
            grad_sims = grad_logits.mul_(coef.scale)
            grad_q[r] += grad_sims @ candidates[c]
            grad_c[c] += grad_sims.T @ q[r]
    return grad_q, grad_c, tau_term
