r"""BSC combined with a pointwise regression (Chernyavskiy et al., NAACL 2022, eq. 6):

    L = mu * L_BSC + (1 - mu) * (1/m) sum_i (s_ii - y_i)^2

The BSC part uses label-aware masking with y_i = 1[score_i > t] (eq. 5); the regression
covers only the diagonal, with s_ii the cosine of the pair. The paper uses mu = 0.1 for
STS-B, QQP, MRPC and CQA-A, 0.9 elsewhere, and t = 0.6 on scores scaled to [0, 1].
"""

from __future__ import annotations

from torch import Tensor

from ._checks import check_unit_interval
from .batch_softmax import Directions
from .bsc import bsc_loss
from .pair_loss import TileSize
from .pointwise import cosine_mse_loss
from .similarity import Normalization

#: BSC's label threshold t on scores scaled to [0, 1]: pairs scored <= t are never anchors.
BSC_LABEL_THRESHOLD = 0.6


def bsc_mse_loss(q: Tensor, a: Tensor, scores: Tensor, temperature: float | Tensor = 0.05, *,
                 mu: float = 0.1, label_threshold: float = BSC_LABEL_THRESHOLD,
                 directions: Directions = "both", normalization: Normalization = "l2",
                 hard_negatives: Tensor | None = None, query_ids: Tensor | None = None,
                 answer_ids: Tensor | None = None, tile_size: TileSize = "auto",
                 softmax_batch: int | None = None) -> Tensor:
    """``mu * bsc_loss(labels=scores > label_threshold) + (1 - mu) * cosine_mse_loss``.

    ``scores`` (m,) are gold similarities scaled to [0, 1]. ``query_ids`` / ``answer_ids``
    are the false-negative ids of :func:`~batchscale.losses.bsc_loss` (text ids or group
    ids), for the BSC part only: the MSE sees each pair's own cosine, no negatives.
    ``softmax_batch`` splits the BSC part into blocks; the MSE, a mean over pairs, is the
    mean of the blocks' MSEs already."""
    mu = check_unit_interval("bsc_mse_loss", "mu", mu)
    contrastive = bsc_loss(q, a, temperature, directions=directions,
                           normalization=normalization, hard_negatives=hard_negatives,
                           labels=scores, label_threshold=label_threshold, query_ids=query_ids,
                           answer_ids=answer_ids, tile_size=tile_size,
                           softmax_batch=softmax_batch)
    return mu * contrastive + (1.0 - mu) * cosine_mse_loss(q, a, scores)
