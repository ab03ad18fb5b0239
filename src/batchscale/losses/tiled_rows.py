r"""The tiled loss of one direction (q->a: InfoNCE, WEINCE's L0; a->q enters as the answers'
rows against the queries), with its gradient computed in the forward sweep.

A strip of whole rows holds every candidate of its anchors, so each anchor's log-sum-exp,
and with it the softmax, is complete inside the strip:

    dL/dg_ij = w_i (e^{g_ij - lse_i} - 1[j = i]),   w_i = y_i / m

is known in the same sweep and goes straight into dL/dq = G c and dL/dc = G^T q, with
G = dL/dg * dg/ds. That is three matmuls per tile, where a forward sweep and a backward
sweep take four (Liger-Kernel's fused linear cross-entropy does the same for language
models). The loss is a scalar and its gradient is linear in the output's grad, so the
backward only scales the stored gradients. This path runs when autograd will want them; a
forward without grad takes the forward sweeps alone (:mod:`~batchscale.losses.tiled`).

WEINCE's anchors need their lambdas before their logits. Each lambda needs the anchor's own
tail (inside its strip) and the batch's rho0, which a bfloat16 sweep finds exactly first
(:mod:`~batchscale.losses.weince_rho0`); each strip then fits its anchors' tails from its own
similarities (:func:`~batchscale.losses.tiled_weince.weince_strip_constants`). While the
whole matrix fits in one strip it is computed once, every tail fitted from it, and this
sweep reuses it (``known_sims``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .batch_softmax import ContrastiveBatch
from .logits import Coefficients, mixed_logits
from .tile_plan import TilePlan, blocks, diagonal, masked_, strip_height, strip_sims, tau_sum
from .tiled_weince import cat_lambdas, weince_strip_constants
from .weince_tail import WeinceLambda

Gradients = tuple[Tensor | None, Tensor | None, Tensor | None]


class _LossWithGradient(torch.autograd.Function):
    """A scalar loss whose forward also computed its gradients: backward scales them."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, candidates: Tensor, temperature: Tensor,
                sweep: Callable[[tuple[bool, bool, bool]], tuple[Tensor, Gradients]]) -> Tensor:
        loss, ctx.grads = sweep(tuple(ctx.needs_input_grad[:3]))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (*(None if g is None else g * grad for g in ctx.grads), None)


#: A strip's anchors (a block of rows) and similarities -> their logit coefficients (shaped
#: for the strip) and a bound of each row's logits from above (0-dim: the shared sigma of
#: plain logits; (rows, 1): WEINCE's g at the row's largest similarity), or None: the
#: strip's own row max.
StripConstants = Callable[[slice, Tensor], tuple[Coefficients, Tensor | None]]


def _rows_sweep(q: Tensor, candidates: Tensor, tau: Tensor, plan: TilePlan,
                constants: StripConstants, weight: Tensor,
                needs: tuple[bool, bool, bool], known_sims: Tensor | None = None
                ) -> tuple[Tensor, Gradients]:
    """sum_i w_i l_i over strips of whole rows, and its gradients where ``needs`` says;
    ``known_sims``: the whole similarity matrix, computed already."""
    m, n = q.shape[0], candidates.shape[0]
    policy, dev = plan.policy, q.device
    losses = q.new_empty(m)
    need_grad, need_tau = needs[0] or needs[1], needs[2]
    grad_q = torch.zeros_like(q)
    grad_c = torch.zeros_like(candidates)
    tau_term = q.new_zeros(())            # sum of dL/dg * tau_weight * s
    height = strip_height(n, plan.tile)
    sims_buffer = q.new_empty((min(height, m), n)) if known_sims is None else None
    weights_buffer = q.new_empty((min(height, m), n))
    # Every per-chunk temporary lives in this buffer or in the strips: fresh multi-MB tensors
    # each chunk made glibc return and re-fault their pages (up to 5x the ops' own time).
    scratch_buffer = q.new_empty((min(height, m), min(plan.tile, n)))
    for r in blocks(m, height):
        sims = known_sims[r] if sims_buffer is None else strip_sims(q[r], candidates,
                                                                    sims_buffer)
        weights = weights_buffer[: r.stop - r.start]
        row_coef, shift = constants(r, sims)
        bias = None if shift is None else -shift
        # Logits chunk by chunk, so that their passes run in cache; with a known bound the
        # strip keeps e^{g - shift} (no running max: the rows are whole).
        positive = q.new_empty(r.stop - r.start)
        scratch = scratch_buffer[: r.stop - r.start]
        for c in blocks(n, plan.tile):
            sub = sims[:, c]
            shortfall = policy.shortfall(sub, slope=False, out=scratch[:, : c.stop - c.start])
            logits = masked_(mixed_logits(sub, row_coef, shortfall, bias, out=weights[:, c]),
                             plan.row_mask(r, c))
            diag = diagonal(r, c, dev)
            if diag is not None:
                positive[diag[1]] = logits[diag[1], diag[2]]
            if bias is not None:
                logits.exp_()
        if bias is None:
            top = weights.amax(dim=1)
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            positive -= top
            weights.sub_(top[:, None]).exp_()
        totals = weights.sum(dim=1)
        losses[r] = totals.log() - positive          # lse_i - g_ii, both shifted alike
        if not (need_grad or need_tau):
            continue
        # dL/dg = w_i softmax_ij - w_i 1[j = i]; e^{g - lse} = weights / totals.
        weights.mul_((weight[r] / totals)[:, None])
        diag = diagonal(r, slice(0, n), dev)
        if diag is not None:
            weights[diag[1], diag[2]] -= weight[diag[0]]
        for c in blocks(n, plan.tile):
            grad_logits = weights[:, c]
            if need_tau:
                tau_term += tau_sum(grad_logits, sims[:, c], row_coef, dim=1)
            if need_grad:
                grad_logits.mul_(policy.slope(sims[:, c], row_coef,
                                              out=scratch[:, : c.stop - c.start]))
        if need_grad:
            torch.mm(weights, candidates, out=grad_q[r])
            grad_c.addmm_(weights.T, q[r])
    loss = (losses * weight).sum()
    grad_tau = -tau_term / tau**2 if need_tau else None
    return loss, (grad_q if needs[0] else None, grad_c if needs[1] else None, grad_tau)


def _plain_constants(plan: TilePlan, tau: Tensor) -> StripConstants:
    coef = plan.policy.coefficients(None, tau)
    return lambda rows, sims: (coef, plan.shift)


def rows_loss_with_gradient(batch: ContrastiveBatch, tau: Tensor, plan: TilePlan
                            ) -> tuple[Tensor, list[WeinceLambda]]:
    """L0's loss, sum_i y_i l_i / m, with its gradients computed in the same sweep."""
    assert plan.rows and not plan.cols
    q, candidates, m = batch.q, batch.candidates, batch.m
    qd, cd, td = q.detach(), candidates.detach(), tau.detach()
    states: list[WeinceLambda] = []
    known_sims = None
    with torch.no_grad():
        if plan.policy.tail is None:
            constants = _plain_constants(plan, td)
        else:
            constants, known_sims = weince_strip_constants(qd, cd, td, plan, states)
    weight = (q.new_full((m,), 1.0 / m) if batch.anchor_weight is None
              else batch.anchor_weight.to(q.dtype) / m)

    def sweep(needs: tuple[bool, bool, bool]) -> tuple[Tensor, Gradients]:
        with torch.no_grad():
            return _rows_sweep(qd, cd, td, plan, constants, weight, needs,
                               known_sims=known_sims)

    loss = _LossWithGradient.apply(q, candidates, tau, sweep)
    return loss, [cat_lambdas(states)] if states else []
