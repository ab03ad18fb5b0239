"""Geometry of the embeddings of a set of positive pairs (q_i, a_i).

* alignment and uniformity (Wang & Isola, "Understanding Contrastive Representation Learning
  through Alignment and Uniformity on the Hypersphere", ICML 2020), on L2-normalised
  embeddings: alignment = mean_i ||q_i - a_i||^2; uniformity = log mean_{i<j}
  exp(-2 ||z_i - z_j||^2), averaged over the two sides (z = q, then z = a), as in their code;
* mean and variance of the positive cosines s_ii and of the cross-view negative cosines
  s_ij, i != j (the quantities of VRNS, Lee et al., ICML 2025);
* the mean hardest negative: mean_i max_{j != i} s_ij, the closest wrong answer of each
  query (the in-batch negative a batch-softmax loss weighs most, here over the whole set);
* the WEINCE tail diagnostic on the same q-a similarity matrix: the mean lambda and the share
  of anchors whose AIC favours the Weibull (finite-endpoint) tail
  (:func:`batchscale.losses.weince_loss` with ``return_stats=True``).

Costs O(n^2 d) time, O(block x n) memory: meant for a few thousand pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(n, start + block)


def uniformity(z: Tensor, t: float = 2.0, block: int = 2048) -> float:
    """log mean_{i<j} exp(-t ||z_i - z_j||^2) of L2-normalised rows (blockwise)."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    n = z.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    parts = []
    for a, b in _blocks(n, block):
        # ||z_i - z_j||^2 = 2 - 2 cos for unit vectors; the mean over i != j equals i < j.
        logits = -t * (2.0 - 2.0 * (z[a:b] @ z.T))
        logits[torch.arange(b - a), torch.arange(a, b)] = float("-inf")
        parts.append(torch.logsumexp(logits.flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(parts), dim=0)) - math.log(n * (n - 1))


def pair_geometry(q: Tensor, a: Tensor, *, temperature: float = 0.05, weince: bool = True,
                  block: int = 2048) -> dict[str, float]:
    """The quantities of the module docstring for ``n`` pairs (rows of ``q`` and ``a``)."""
    if q.ndim != 2 or q.shape != a.shape:
        raise ValueError(f"q and a must be (n, d) of the same shape, got {tuple(q.shape)}, "
                         f"{tuple(a.shape)}")
    n = q.shape[0]
    if n < 2:
        raise ValueError("pair geometry needs at least two pairs")
    qn = torch.nn.functional.normalize(q.detach().double(), dim=-1)
    an = torch.nn.functional.normalize(a.detach().double(), dim=-1)
    pos = (qn * an).sum(dim=-1)
    neg_sum = neg_sq = hardest_sum = 0.0
    for s, e in _blocks(n, block):
        sims = qn[s:e] @ an.T
        diag = (torch.arange(e - s), torch.arange(s, e))
        sims[diag] = float("-inf")
        hardest_sum += float(sims.max(dim=1).values.sum())
        sims[diag] = 0.0
        neg_sum += float(sims.sum())
        neg_sq += float((sims * sims).sum())
    count = n * (n - 1)
    neg_mean = neg_sum / count
    out = {
        "pairs": n,
        "alignment": float((qn - an).pow(2).sum(dim=-1).mean()),
        "uniformity": 0.5 * (uniformity(qn, block=block) + uniformity(an, block=block)),
        "pos_cos_mean": float(pos.mean()),
        "pos_cos_var": float(pos.var(unbiased=False)),
        "neg_cos_mean": neg_mean,
        "neg_cos_var": max(0.0, neg_sq / count - neg_mean * neg_mean),
        "hardest_neg_cos_mean": hardest_sum / n,
    }
    if weince:
        from ..losses import weince_loss

        with torch.no_grad():
            _, stats = weince_loss(q.detach().double(), a.detach().double(),
                                   temperature=temperature, return_stats=True)
        out["weince_mean_lambda"] = stats.mean_lambda
        out["weince_weibull_share"] = stats.weibull_share
    return out
