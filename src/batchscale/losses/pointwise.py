r"""Pointwise baselines on sentence pairs with gold scores y_i in [0, 1].

* Cosine MSE (sentence-transformers' ``CosineSimilarityLoss``; Reimers & Gurevych,
  "Sentence-BERT", EMNLP 2019):  L = (1/m) sum_i (cos(q_i, a_i) - y_i)^2
* CoSENT (Su, 2022; sentence-transformers' ``CoSENTLoss``), a ranking loss on the pairs'
  cosines:  L = log(1 + sum_{(i, j): y_i > y_j} exp(scale * (cos_j - cos_i)))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_embeddings, check_same_layout, check_vector
from .similarity import cosine_diagonal


def _pair_scores(caller: str, q: Tensor, a: Tensor, scores: object, *, unit: bool) -> Tensor:
    check_embeddings(caller, "q", q, min_rows=1)
    check_embeddings(caller, "a", a, min_rows=1)
    check_same_layout(caller, "q", q, "a", a)
    y = check_vector(caller, "scores", scores, q.shape[0], q.device).to(q.dtype)
    if unit and bool(((y < 0) | (y > 1)).any()):
        raise ValueError(f"{caller}: `scores` must be scaled to [0, 1], got values "
                         f"{y[(y < 0) | (y > 1)][:3].tolist()}")
    return y


def cosine_mse_loss(q: Tensor, a: Tensor, scores: Tensor) -> Tensor:
    """Mean squared error between cos(q_i, a_i) and the gold score y_i in [0, 1]."""
    y = _pair_scores("cosine_mse_loss", q, a, scores, unit=True)
    return ((cosine_diagonal(q, a) - y) ** 2).mean()


def cosent_loss(q: Tensor, a: Tensor, scores: Tensor, scale: float = 20.0) -> Tensor:
    """CoSENT: every pair ranked above another by gold score should have the higher cosine."""
    if not scale > 0:
        raise ValueError(f"cosent_loss: `scale` must be > 0, got {scale}")
    y = _pair_scores("cosent_loss", q, a, scores, unit=False)
    cos = cosine_diagonal(q, a) * scale
    diff = cos[None, :] - cos[:, None]            # diff[i, j] = scale * (cos_j - cos_i)
    ordered = y[:, None] > y[None, :]             # pairs with y_i > y_j
    terms = diff.masked_fill(~ordered, float("-inf")).flatten()
    # The leading 0 is the "1 +" inside the log.
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)
