"""Embedding normalisation and the similarity matrix s_ij of a batch.

BSC (Chernyavskiy et al., NAACL 2022) compares three normalisations: per vector (L2, so
s_ij is the cosine), per coordinate over the batch axis (each coordinate divided by its
max-min range within the batch), or none (plain dot product).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Normalization = Literal["l2", "coord", "none"]
NORMALIZATIONS: tuple[str, ...] = ("l2", "coord", "none")

# Guards a zero norm / zero range; small enough not to move any real embedding.
_EPS = 1e-12


def normalize(x: Tensor, mode: Normalization) -> Tensor:
    """Normalise a (batch, dim) tensor, or each block of a (blocks, batch, dim) one, as BSC's
    ``mode`` says."""
    if mode == "l2":
        return F.normalize(x, p=2, dim=-1, eps=_EPS)
    if mode == "coord":  # over the batch axis: the rows (of each block of a (blocks, batch, dim))
        spread = x.amax(dim=-2, keepdim=True) - x.amin(dim=-2, keepdim=True)
        return x / spread.clamp_min(_EPS)
    if mode == "none":
        return x
    raise ValueError(
        f"normalize: `normalization` must be one of {list(NORMALIZATIONS)}, got {mode!r}"
    )


def cosine_diagonal(q: Tensor, a: Tensor) -> Tensor:
    """cos(q_i, a_i) for every pair i (the pointwise losses' prediction)."""
    return (normalize(q, "l2") * normalize(a, "l2")).sum(dim=-1)
