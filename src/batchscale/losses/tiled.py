r"""Memory-linear batch softmax: the loss of :func:`batch_softmax_loss`, computed over tiles
of the similarity matrix so that no (m, m + h) matrix is ever held.

Forward: the per-anchor log-sum-exp of each direction, from sweeps over tiles
(:mod:`~batchscale.losses.tiled_plain` for plain logits, one sweep;
:mod:`~batchscale.losses.tiled_weince` for WEINCE, two sweeps in strips).

Backward: one sweep over (row block, column block) tiles recomputes each tile's similarities
and pushes dl/ds_ij = (softmax_ij - 1[j = i]) * dg/ds_ij of both directions into the
embeddings with two matmuls, so memory is O(B * tile). One direction alone, when autograd
wants the gradient, runs one sweep that computes it instead
(:mod:`~batchscale.losses.tiled_rows`; a->q as the answers' rows against the queries).
The logits, their derivative and the false-negative masks come from the same policy and
:func:`candidate_mask` as the dense path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import tile_plan
from .batch_softmax import ContrastiveBatch, Directions
from .logits import Coefficients, LogitPolicy, Shortfall, mixed_logits, slope_product_
from .softmax import weighted_anchor_mean
from .tile_plan import DEFAULT_TILE, DirectionState, MaybeDirection, TilePlan
from .tiled_plain import plain_forward, shared_backward, shared_shift
from .tiled_rows import rows_loss_with_gradient
from .tiled_weince import weince_forward
from .weince_tail import WeinceLambda

__all__ = ["DEFAULT_TILE", "tiled_batch_softmax_loss"]


def _grad_of_logits(sims: Tensor, coef: Coefficients, shortfall: Shortfall | None,
                    mask: Tensor | None, lse: Tensor, grad: Tensor,
                    diag: tuple[Tensor, Tensor] | None, anchors: Tensor | None,
                    fold: bool) -> Tensor:
    """dL/dg = grad * (softmax - onehot(positive)) of a block; ``lse`` and ``grad`` broadcast
    along the anchors' dimension, ``anchors`` indexes them at the ``diag`` entries.

    With grad >= 0 (``fold``: a loss being minimised) grad * e^{g - lse} = e^{g - lse + log
    grad}: the scaling rides on the bias of the logits instead of a pass of its own."""
    bias = grad.log() - lse if fold else -lse
    g = tile_plan.masked_(mixed_logits(sims, coef, shortfall, bias), mask).exp_()
    if not fold:
        g.mul_(grad)
    if diag is not None and anchors is not None:
        g[diag[0], diag[1]] -= grad.reshape(-1)[anchors]
    return g


def _direction_grad(sims: Tensor, shortfall: Shortfall | None, state: DirectionState,
                    anchors: slice, dim: int, mask: Tensor | None, grad: Tensor,
                    diag: tuple[Tensor, Tensor, Tensor] | None,
                    fold: bool) -> tuple[Tensor, Coefficients]:
    """dL/dg of one direction over a block whose anchors ``anchors`` lie along ``dim`` (0:
    rows, L0; 1: columns, L1), and the anchors' logit coefficients; ``fold``: the anchors'
    grad >= 0 (:func:`_grad_of_logits`)."""

    def along(x: Tensor) -> Tensor:
        return x[anchors, None] if dim == 0 else x[None, anchors]

    coef = state.coef.part(anchors, dim)
    g = _grad_of_logits(sims, coef, shortfall, mask, along(state.lse), along(grad),
                        None if diag is None else diag[1:],
                        None if diag is None else diag[1 + dim], fold)
    return g, coef


class _TiledSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, candidates: Tensor, temperature: Tensor, plan: TilePlan,
                rows: MaybeDirection, cols: MaybeDirection) -> tuple[Tensor, Tensor]:
        m = q.shape[0]
        losses = [q.new_zeros(m) if d is None else d.lse - d.positive for d in (rows, cols)]
        ctx.save_for_backward(q, candidates, temperature)
        ctx.plan, ctx.directions = plan, (rows, cols)
        return losses[0], losses[1]

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor, grad_cols: Tensor
                 ) -> tuple[Tensor | None, ...]:
        with torch.autocast(grad_rows.device.type, enabled=False):
            return _TiledSoftmaxCrossEntropy._backward(ctx, grad_rows, grad_cols)

    @staticmethod
    def _backward(ctx: Any, grad_rows: Tensor, grad_cols: Tensor
                  ) -> tuple[Tensor | None, ...]:
        q, candidates, temperature = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        rows, cols = ctx.directions
        # One direction alone computes its gradient in its forward (tiled_rows).
        assert rows is not None and cols is not None
        need_tau = ctx.needs_input_grad[2]
        if plan.shift is not None:
            grad_q, grad_c, tau_term = shared_backward(q, candidates, plan, rows, cols,
                                                       grad_rows, grad_cols, need_tau)
            grad_tau = -tau_term / temperature**2 if need_tau else None
            return grad_q, grad_c, grad_tau, None, None, None
        m, n = q.shape[0], candidates.shape[0]
        grad_q, grad_c = torch.zeros_like(q), torch.zeros_like(candidates)
        tau_term = q.new_zeros(())          # sum of dL/dg * tau_weight * s
        # Each block's sign test, read once before the loop (no host sync inside it).
        fold_rows = tile_plan.nonnegative_blocks(grad_rows, plan.tile)
        fold_cols = tile_plan.nonnegative_blocks(grad_cols, plan.tile)

        for r in tile_plan.blocks(m, plan.tile):
            for c in tile_plan.blocks(n, plan.tile):
                sims = q[r] @ candidates[c].T
                diag = tile_plan.diagonal(r, c, sims.device)
                # log(1 - s) and 1 / (1 - s), once for both directions
                shortfall = plan.policy.shortfall(sims, slope=True)
                g, coef = _direction_grad(sims, shortfall, rows, r, 0, plan.row_mask(r, c),
                                          grad_rows, diag, fold_rows[r.start // plan.tile])
                if need_tau:
                    tau_term = tau_term + tile_plan.tau_sum(g, sims, coef, dim=1)
                grad_sims = slope_product_(g, coef, shortfall)
                if c.start < m:             # L1's candidates: the first m (no hard negatives)
                    answers = slice(c.start, min(c.stop, m))
                    size = answers.stop - answers.start
                    sub = sims[:, :size]
                    part = None if shortfall is None else Shortfall(
                        shortfall.log[:, :size],
                        None if shortfall.inverse is None else shortfall.inverse[:, :size])
                    g, coef = _direction_grad(sub, part, cols, answers, 1,
                                              plan.col_mask(answers, r), grad_cols, diag,
                                              fold_cols[answers.start // plan.tile])
                    if need_tau:
                        tau_term = tau_term + tile_plan.tau_sum(g, sub, coef, dim=0)
                    slope_product_(g, coef, part, out=grad_sims[:, :size])
                grad_q[r] += grad_sims @ candidates[c]
                grad_c[c] += grad_sims.T @ q[r]
        grad_tau = -tau_term / temperature**2 if need_tau else None
        return grad_q, grad_c, grad_tau, None, None, None


def tiled_batch_softmax_loss(batch: ContrastiveBatch, temperature: float | Tensor,
                             directions: Directions, policy: LogitPolicy,
                             tile: int = DEFAULT_TILE) -> tuple[Tensor, list[WeinceLambda]]:
    """The same value and gradients as :func:`batch_softmax_loss`, in O(B * tile) memory."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tiled_batch_softmax_loss: `tile` must be a positive int, got {tile!r}")
    # The sweeps work in the embeddings' dtype: under autocast (a trainer in bf16) their
    # matmuls would return bf16 tiles beside float32 running sums.
    with torch.autocast(batch.q.device.type, enabled=False):
        return _tiled_loss(batch, temperature, directions, policy, tile)


def _tiled_loss(batch: ContrastiveBatch, temperature: float | Tensor, directions: Directions,
                policy: LogitPolicy, tile: int) -> tuple[Tensor, list[WeinceLambda]]:
    m = batch.m
    tau = temperature if isinstance(temperature, Tensor) else torch.tensor(
        float(temperature), dtype=batch.q.dtype, device=batch.q.device)
    tau = tau.to(batch.q.dtype).reshape(())
    is_anchor = (torch.ones(m, dtype=torch.bool, device=batch.q.device)
                 if batch.anchor_weight is None else batch.anchor_weight.to(torch.bool))
    shift = None
    if policy.tail is None:
        shift = shared_shift(batch.q.detach(), batch.candidates.detach(),
                             policy.coefficients(None, tau.detach()),
                             batch.answer_ids is not None or batch.query_ids is not None)
    if directions != "both" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (batch.q, batch.candidates, tau)):
        if directions == "a->q":
            # L1 is L0 of the answers against the queries (L1 has no hard negatives).
            batch = ContrastiveBatch(batch.candidates[:m], batch.q, batch.anchor_weight,
                                     batch.query_ids, None)
        plan = TilePlan(policy, True, False, batch.answer_ids, None, is_anchor, tile, shift)
        return rows_loss_with_gradient(batch, tau, plan)
    plan = TilePlan(policy, directions in ("both", "q->a"), directions in ("both", "a->q"),
                    batch.answer_ids, batch.query_ids, is_anchor, tile, shift)
    forward = plain_forward if policy.tail is None else weince_forward
    with torch.no_grad():
        rows, cols = forward(batch.q.detach(), batch.candidates.detach(), tau.detach(), plan)
    loss_rows, loss_cols = _TiledSoftmaxCrossEntropy.apply(batch.q, batch.candidates, tau,
                                                          plan, rows, cols)
    losses = []
    if rows is not None:
        losses.append(weighted_anchor_mean(loss_rows, batch.anchor_weight, m))
    if cols is not None:
        losses.append(weighted_anchor_mean(loss_cols, batch.anchor_weight, m))
    total = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return total, [d.state for d in (rows, cols) if d is not None and d.state is not None]
