"""The cross-entropy of each anchor's positive among its candidates: the core of every
batch-softmax loss here (BSC's L0 and L1, InfoNCE, NT-Xent, WEINCE).

For anchor i with logits g_i over its valid candidates C_i and positive p(i):

    l_i = -log softmax_{j in C_i}(g_ij)[p(i)] = logsumexp_{j in C_i} g_ij - g_{i,p(i)}

The tiled (memory-linear) path computes the same l_i with an online log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_cross_entropy(logits: Tensor, positive_index: Tensor,
                          candidate_mask: Tensor | None = None) -> Tensor:
    """Per-anchor loss l_i, shape (rows,). ``candidate_mask[i, j]`` False removes j from
    anchor i's candidates; the positive must stay a candidate."""
    if candidate_mask is not None:
        logits = logits.masked_fill(~candidate_mask, float("-inf"))
    positive = logits.gather(1, positive_index.unsqueeze(1)).squeeze(1)
    return torch.logsumexp(logits, dim=1) - positive


def negative_mask(candidate_mask: Tensor | None, positive_index: Tensor,
                  shape: tuple[int, int], device: torch.device) -> Tensor:
    """Boolean (rows, cols): True where j is a valid negative of anchor i."""
    rows = torch.arange(shape[0], device=device)
    mask = torch.ones(shape, dtype=torch.bool, device=device) if candidate_mask is None \
        else candidate_mask.clone()
    mask[rows, positive_index] = False
    return mask


def weighted_anchor_mean(per_anchor: Tensor, weights: Tensor | None, count: int) -> Tensor:
    """sum_i w_i l_i / count: BSC's eq. 5 keeps the divisor m when labels zero out anchors."""
    if weights is None:
        return per_anchor.sum() / count
    return (per_anchor * weights.to(per_anchor.dtype)).sum() / count
