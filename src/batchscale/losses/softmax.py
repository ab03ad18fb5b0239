"""The cross-entropy of each anchor's positive among its candidates: the core of every
batch-softmax loss here (BSC's L0 and L1, InfoNCE, NT-Xent, WEINCE).

For anchor i with logits g_i = policy(s_i) over its valid candidates C_i and positive p(i):

    l_i = -log softmax_{j in C_i}(g_ij)[p(i)] = logsumexp_{j in C_i} g_ij - g_{i,p(i)}
    dl_i / ds_ij = (softmax(g_i)_j - 1[j = p(i)]) * dg_ij / ds_ij

A custom autograd Function computes both in a few in-place passes over the (rows, cols)
block instead of autograd's chain of temporaries; the policy supplies g and dg/ds, so the
tiled (memory-linear) path evaluates exactly the same maths tile by tile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .logits import LogitBlock, LogitPolicy, RowState


def _softmax_buffers(sims: Tensor, temperature: Tensor, positive_index: Tensor,
                     candidate_mask: Tensor | None, policy: LogitPolicy,
                     state: RowState) -> tuple[Tensor, Tensor, Tensor, LogitBlock]:
    """(loss per row, exp(g - max) per entry, its row sums, the policy's block)."""
    block = policy.logits(sims, state, temperature)
    logits = block.logits
    if candidate_mask is not None:
        logits.masked_fill_(~candidate_mask, float("-inf"))
    positive = logits.gather(1, positive_index[:, None]).squeeze(1)
    top = logits.amax(dim=1, keepdim=True)
    # The logits buffer becomes exp(g - max) in place: the backward's softmax for free.
    weights = logits.sub_(top).exp_()
    total = weights.sum(dim=1)
    return total.log() + top.squeeze(1) - positive, weights, total, block


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, sims: Tensor, temperature: Tensor, positive_index: Tensor,
                candidate_mask: Tensor | None, policy: LogitPolicy,
                state: RowState) -> Tensor:
        loss, weights, total, block = _softmax_buffers(sims, temperature, positive_index,
                                                       candidate_mask, policy, state)
        ctx.save_for_backward(sims, temperature, positive_index)
        # Our own buffers (no graph): kept off save_for_backward, whose version check would
        # refuse the in-place reuse below.
        ctx.buffers = (weights, total, block.slope)
        ctx.tau_weight, ctx.candidate_mask, ctx.policy, ctx.state = (
            block.tau_weight, candidate_mask, policy, state)
        ctx.buffers_used = False
        return loss

    @staticmethod
    @once_differentiable  # the backward reuses the forward's buffers in place
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        sims, temperature, positive_index = ctx.saved_tensors
        if ctx.buffers_used:
            # A second backward (retain_graph, gradcheck): the first one consumed the saved
            # buffers in place, so rebuild them.
            _, weights, total, block = _softmax_buffers(
                sims, temperature, positive_index, ctx.candidate_mask, ctx.policy, ctx.state)
            slope = block.slope
        else:
            weights, total, slope = ctx.buffers
        ctx.buffers_used = True
        ctx.buffers = None
        # dL/dg = grad_i * (softmax(g_i) - onehot(p(i))), built in the saved buffer.
        grad_logits = weights.div_(total[:, None])
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits[rows, positive_index] -= 1.0
        grad_logits.mul_(grad_loss[:, None])
        grad_tau = None
        if ctx.needs_input_grad[1]:
            per_row = torch.einsum("ij,ij->i", grad_logits, sims)
            if ctx.tau_weight is not None:
                per_row = per_row * ctx.tau_weight
            grad_tau = -per_row.sum() / temperature**2
        grad_sims = grad_logits.mul_(slope) if ctx.needs_input_grad[0] else None
        return grad_sims, grad_tau, None, None, None, None


def softmax_cross_entropy(sims: Tensor, positive_index: Tensor,
                          candidate_mask: Tensor | None, policy: LogitPolicy,
                          state: RowState, temperature: float | Tensor) -> Tensor:
    """Per-anchor loss l_i, shape (rows,), of the similarities ``sims`` (rows, cols).

    ``candidate_mask[i, j]`` False removes j from anchor i's candidates (the positive must
    stay one); ``policy`` and its per-row ``state`` turn similarities into logits."""
    tau = temperature if isinstance(temperature, Tensor) else torch.tensor(
        float(temperature), dtype=sims.dtype, device=sims.device)
    return _SoftmaxCrossEntropy.apply(sims, tau.to(sims.dtype).reshape(()), positive_index,
                                      candidate_mask, policy, state)


def weighted_anchor_mean(per_anchor: Tensor, weights: Tensor | None, count: int) -> Tensor:
    """sum_i w_i l_i / count: BSC's eq. 5 keeps the divisor m when labels zero out anchors."""
    if weights is None:
        return per_anchor.sum() / count
    return (per_anchor * weights.to(per_anchor.dtype)).sum() / count
