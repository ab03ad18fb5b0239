r"""VRNS: variance reduction of negative-pair similarities.

Lee, Lim, Lee, Sohn, "On the Similarities of Embeddings in Contrastive Learning", ICML 2025
(arXiv 2506.09781). At the full-batch optimum every negative cosine equals -1/(n - 1) for
n training examples; small mini-batches keep that mean but inflate the variance. The penalty
pulls the cross-view negatives of the batch towards it:

    L_VRNS = 1/(m(m - 1)) * sum_{i != j} (s_ij + 1/(n - 1))^2,     s_ij = cos(q_i, a_j)

Added to a contrastive loss as L + lambda * L_VRNS (lambda = 30 by default in the paper).

Computed without the m x m similarities (at m = 16,384 their boolean-masked copy, its int64
indices and their gradients outgrew 23 GB): with c = 1/(n - 1), the sum over all pairs is
sum s_ij^2 + 2c sum s_ij + m^2 c^2, where sum s_ij^2 = <Q^T Q, A^T A>_F (two d x d Gram
matrices) and sum s_ij = (sum_i q_i) . (sum_j a_j); the m diagonal terms are subtracted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_embeddings, check_same_layout
from .similarity import normalize


def vrns_penalty(q: Tensor, a: Tensor, n: int) -> Tensor:
    """Mean squared gap between each cross-view negative cosine and -1/(n - 1)."""
    caller = "vrns_penalty"
    check_embeddings(caller, "q", q)
    check_embeddings(caller, "a", a)
    check_same_layout(caller, "q", q, "a", a)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{caller}: `n` (training-set size) must be an integer >= 2, got {n!r}")
    m, c = q.shape[0], 1.0 / (n - 1)
    # Half-precision Gram sums over m rows lose the penalty's small differences.
    dtype = torch.promote_types(q.dtype, torch.float32)
    qn, an = normalize(q.to(dtype), "l2"), normalize(a.to(dtype), "l2")
    all_pairs = ((qn.T @ qn) * (an.T @ an)).sum() + 2 * c * (qn.sum(0) @ an.sum(0)) + m * m * c * c
    diagonal = ((qn * an).sum(1) + c).square().sum()
    return (all_pairs - diagonal) / (m * (m - 1))
