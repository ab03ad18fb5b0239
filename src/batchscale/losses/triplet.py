r"""Triplet loss with a margin (Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015;
sentence-transformers' ``TripletLoss``):

    L = (1/m) sum_i max(0, d(x_i, p_i) - d(x_i, n_i) + margin)

with d the Euclidean distance (sentence-transformers' default, margin 5) or the cosine
distance 1 - cos.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._checks import check_choice, check_embeddings, check_same_layout
from .similarity import cosine_diagonal


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 5.0,
                 distance: Literal["euclidean", "cosine"] = "euclidean") -> Tensor:
    """Mean hinge of d(anchor, positive) - d(anchor, negative) + margin."""
    caller = "triplet_loss"
    for name, x in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        check_embeddings(caller, name, x, min_rows=1)
    check_same_layout(caller, "anchor", anchor, "positive", positive)
    check_same_layout(caller, "anchor", anchor, "negative", negative)
    check_choice(caller, "distance", distance, ("euclidean", "cosine"))
    if not margin >= 0:
        raise ValueError(f"{caller}: `margin` must be >= 0, got {margin}")
    if distance == "euclidean":
        d_pos = torch.linalg.vector_norm(anchor - positive, dim=-1)
        d_neg = torch.linalg.vector_norm(anchor - negative, dim=-1)
    else:
        d_pos = 1.0 - cosine_diagonal(anchor, positive)
        d_neg = 1.0 - cosine_diagonal(anchor, negative)
    return torch.relu(d_pos - d_neg + margin).mean()
