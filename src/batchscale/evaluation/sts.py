"""Semantic textual similarity: Spearman and Pearson correlation (x100) between the gold
scores and the cosine similarity of the two sentences' embeddings, as MTEB and
sentence-transformers' EmbeddingSimilarityEvaluator report them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.records import Pair


def cosine_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two ``(n, d)`` tensors (float64 for the statistics)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return (a * b).sum(dim=-1)


def sts_correlations(emb1: Tensor, emb2: Tensor, gold: Sequence[float] | np.ndarray
                     ) -> dict[str, float]:
    """``{"spearman", "pearson"}`` on the 0-100 scale (scipy's coefficients x 100)."""
    from scipy.stats import pearsonr, spearmanr

    gold = np.asarray(gold, dtype=np.float64)
    if emb1.shape != emb2.shape or emb1.shape[0] != gold.shape[0]:
        raise ValueError(f"shapes disagree: {tuple(emb1.shape)}, {tuple(emb2.shape)}, "
                         f"{gold.shape[0]} scores")
    if gold.shape[0] < 2:
        raise ValueError("need at least two pairs for a correlation")
    cos = cosine_pairs(emb1, emb2).cpu().numpy()
    return {"spearman": 100.0 * float(spearmanr(gold, cos)[0]),
            "pearson": 100.0 * float(pearsonr(gold, cos)[0])}


def evaluate_sts(encoder, pairs: Sequence[Pair], *, batch_size: int = 256,
                 max_length: int | None = None, show_progress: bool = True
                 ) -> dict[str, float]:
    """Encode the pairs (each distinct sentence once) and correlate cosine similarity with
    ``Pair.score``: ``{"spearman", "pearson", "pairs"}``."""
    if any(p.score is None for p in pairs):
        raise ValueError("STS evaluation needs pairs with scores")
    texts = list(dict.fromkeys(t for p in pairs for t in (p.text1, p.text2)))
    where = {t: i for i, t in enumerate(texts)}
    emb = encoder.encode(texts, batch_size=batch_size, max_length=max_length,
                         show_progress=show_progress, desc="STS")
    i1 = torch.tensor([where[p.text1] for p in pairs])
    i2 = torch.tensor([where[p.text2] for p in pairs])
    out = sts_correlations(emb[i1], emb[i2], [p.score for p in pairs])
    out["pairs"] = len(pairs)
    return out
