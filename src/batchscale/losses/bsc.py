r"""Batch-softmax contrastive loss (BSC) and InfoNCE.

Chernyavskiy, Ilvovsky, Kalinin, Nakov, "Batch-Softmax Contrastive Loss for Pairwise
Sentence Scoring Tasks", NAACL 2022 (arXiv 2110.15725):

    L0 = -(1/m) sum_i log softmax_j(s_ij / tau)[j = i]     (rows)
    L1 = -(1/m) sum_i log softmax_j(s_ji / tau)[j = i]     (columns)
    L_BSC = (L0 + L1) / 2

InfoNCE (van den Oord et al., 2018), a.k.a. multiple-negatives ranking, is L0 alone.
"""

from __future__ import annotations

from torch import Tensor

from .batch_softmax import Directions
from .pair_loss import TileSize, pair_loss
from .similarity import Normalization


def bsc_loss(q: Tensor, a: Tensor, temperature: float | Tensor = 0.05, *,
             directions: Directions = "both", normalization: Normalization = "l2",
             hard_negatives: Tensor | None = None, labels: Tensor | None = None,
             label_threshold: float | None = None, query_ids: Tensor | None = None,
             answer_ids: Tensor | None = None, tile_size: TileSize = "auto",
             softmax_batch: int | None = None) -> Tensor:
    """BSC over a batch of pairs (``q[i]``, ``a[i]``); returns a 0-dim tensor.

    Args:
        q, a: (m, d) embeddings of the two sides of each pair.
        temperature: tau > 0, a float or a scalar tensor (e.g. a
            :class:`~batchscale.losses.LearnableTemperature` output).
        directions: ``"both"`` (L0 + L1) / 2, ``"q->a"`` rows only (InfoNCE),
            ``"a->q"`` columns only.
        normalization: ``"l2"`` (cosine), ``"coord"`` (per coordinate over the batch),
            ``"none"`` (dot product).
        hard_negatives: (m * k, d) or (m, k, d) extra answer columns, candidates of L0.
        labels: (m,) 0/1, or scores in [0, 1] with ``label_threshold``: pairs with
            y_i = 0 are not anchors but stay candidates; the mean still divides by m.
        query_ids, answer_ids: false-negative ids ((m,) and (m + m * k,), the answers' then
            the hard negatives'): text ids, or group ids (one id per group of texts that are
            never each other's negatives, the same for a pair's query and answer; a hard
            negative's is its group's or its own). A candidate with the same id as the
            anchor's positive, other than the positive, is not a negative; an anchor whose
            candidates are all in its group has its positive alone (l_i = 0).
        tile_size: ``"auto"`` (dense while the matrix is small), an int (tiled, memory-linear,
            tiles of that many rows / columns) or None (dense).
        softmax_batch: N dividing m: the mean of the losses of the m / N blocks of N
            consecutive pairs, each an independent batch softmax (its N - 1 other pairs and its
            pairs' hard negatives as negatives; labels, ids and the divisor N within the
            block; see :mod:`~batchscale.losses.blocks`). None or m: the whole batch.
    """
    loss, _ = pair_loss("bsc_loss", q, a, temperature, directions=directions,
                        normalization=normalization, hard_negatives=hard_negatives,
                        labels=labels, label_threshold=label_threshold, query_ids=query_ids,
                        answer_ids=answer_ids, tile_size=tile_size,
                        softmax_batch=softmax_batch)
    return loss


def infonce_loss(q: Tensor, a: Tensor, temperature: float | Tensor = 0.05, *,
                 normalization: Normalization = "l2", hard_negatives: Tensor | None = None,
                 labels: Tensor | None = None, label_threshold: float | None = None,
                 answer_ids: Tensor | None = None, tile_size: TileSize = "auto",
                 softmax_batch: int | None = None) -> Tensor:
    """InfoNCE / multiple-negatives ranking: BSC's L0 alone (each query against all answers,
    or against the answers of its block of ``softmax_batch`` pairs). ``answer_ids``: the
    false-negative ids (text or group ids) of :func:`bsc_loss`."""
    loss, _ = pair_loss("infonce_loss", q, a, temperature, directions="q->a",
                        normalization=normalization, hard_negatives=hard_negatives,
                        labels=labels, label_threshold=label_threshold, query_ids=None,
                        answer_ids=answer_ids, tile_size=tile_size,
                        softmax_batch=softmax_batch)
    return loss
