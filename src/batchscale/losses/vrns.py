r"""VRNS: variance reduction of negative-pair similarities.

Lee, Lim, Lee, Sohn, "On the Similarities of Embeddings in Contrastive Learning", ICML 2025
(arXiv 2506.09781). At the full-batch optimum every negative cosine equals -1/(n - 1) for
n training examples; small mini-batches keep that mean but inflate the variance. The penalty
pulls the cross-view negatives of the batch towards it:

    L_VRNS = 1/(m(m - 1)) * sum_{i != j} (s_ij + 1/(n - 1))^2,     s_ij = cos(q_i, a_j)

Added to a contrastive loss as L + lambda * L_VRNS (lambda = 30 by default in the paper).
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
    m = q.shape[0]
    sims = normalize(q, "l2") @ normalize(a, "l2").T
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=q.device)
    gap = sims[off_diagonal] + 1.0 / (n - 1)
    return (gap * gap).sum() / (m * (m - 1))
