r"""Softmax blocks: the batch's negatives as an axis of their own.

With ``softmax_batch=N`` a batch of m pairs is split into m / N blocks of N consecutive
pairs, and each block is an independent batch softmax: an anchor sees the N - 1 other pairs
of its block as in-batch negatives, plus the hard negatives of the pairs of its block, and
nothing of the other blocks. The loss is the mean of the blocks' losses, which (blocks being
equal sized) is also the mean over the batch's anchors:

    L = (N / m) sum_b L_b,     L_b = the loss of block b alone (its own rows, columns,
                                     normalisation, WEINCE quantile rho0, ...)

so the blocked loss equals the mean of separate calls, one per block (what the gradient
accumulation of m / N micro-batches of N pairs would optimise). ``N = m`` (or None) is the
plain loss. The per-pair inputs follow their pairs into the blocks:

* labels (label-aware masking, BSC eq. 5): a block's divisor is its N pairs, so L is
  (1/m) sum_i y_i l_i over the whole batch, as without blocks;
* hard negatives: k per pair, ``(m * k, d)`` pair-major (pair i's are rows i k .. i k + k - 1)
  or ``(m, k, d)``; a block gets the N k of its pairs;
* query_ids, answer_ids (text or group ids): the false-negative masks act within a block:
  a group that crosses a block boundary is masked for its members inside the block (the
  other blocks' texts are not candidates anyway). ``answer_ids`` is the answers' ids then
  the hard negatives', in the same pair-major order.

Plain logits (BSC, InfoNCE) on the dense path take every block at once
(:func:`stacked_plain_loss`: one batched matmul, the blocks' rows stacked into one softmax
pass); WEINCE and the tiled path call the loss once per block (:func:`over_blocks`).

The split is made here once, for every batch-softmax loss (:func:`pair_loss
<batchscale.losses.pair_loss.pair_loss>`) and for the local loss under torch.distributed
(:func:`~batchscale.batching.distributed_loss.local_block_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._checks import check_choice, check_embeddings, check_same_layout, check_vector
from .batch_softmax import Directions, binary_labels, direction_loss
from .logits import PLAIN_LOGITS
from .similarity import NORMALIZATIONS, Normalization, normalize

T = TypeVar("T")


def block_size(caller: str, softmax_batch: object, m: int) -> int | None:
    """N, after checking that it splits ``m`` pairs into equal blocks; None for one block
    (``softmax_batch`` None or equal to m), the plain loss."""
    if softmax_batch is None:
        return None
    if isinstance(softmax_batch, bool) or not isinstance(softmax_batch, int) \
            or softmax_batch < 2:
        raise ValueError(f"{caller}: `softmax_batch` must be an integer >= 2 or None, got "
                         f"{softmax_batch!r}")
    if m % softmax_batch:
        raise ValueError(f"{caller}: `softmax_batch` ({softmax_batch}) must divide the batch of "
                         f"{m} pairs into equal softmax blocks")
    return None if softmax_batch == m else softmax_batch


class PairInputs:
    """The per-pair inputs of a pair loss, checked for splitting: queries and answers (m, d),
    hard negatives k per pair, pair-major (m * k, d), and the per-pair vectors."""

    def __init__(self, caller: str, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                 labels: object = None, query_ids: object = None,
                 answer_ids: object = None) -> None:
        check_embeddings(caller, "q", q)
        check_embeddings(caller, "a", a)
        check_same_layout(caller, "q", q, "a", a)
        m, dev = q.shape[0], q.device
        k = 0
        if hard_negatives is not None:
            if isinstance(hard_negatives, Tensor) and hard_negatives.ndim == 3:
                if hard_negatives.shape[0] != m:
                    raise ValueError(
                        f"{caller}: `hard_negatives` of shape (m, k, d) must have m = {m} (one row "
                        f"of negatives per pair), got shape {tuple(hard_negatives.shape)}")
                hard_negatives = hard_negatives.reshape(-1, hard_negatives.shape[-1])
            check_embeddings(caller, "hard_negatives", hard_negatives, min_rows=1)
            check_same_layout(caller, "a", a, "hard_negatives", hard_negatives, same_rows=False)
            h = hard_negatives.shape[0]
            if h % m:
                raise ValueError(
                    f"{caller}: with `softmax_batch`, `hard_negatives` must hold k per pair "
                    f"((m * k, d) pair-major or (m, k, d)), got {h} rows for {m} pairs")
            k = h // m
        self.caller, self.m, self.k = caller, m, k
        self.q, self.a, self.hard_negatives = q, a, hard_negatives
        self.labels = None if labels is None else check_vector(caller, "labels", labels, m, dev)
        self.query_ids = None if query_ids is None else check_vector(
            caller, "query_ids", query_ids, m, dev, integer=True)
        self.answer_ids = None if answer_ids is None else check_vector(
            caller, "answer_ids", answer_ids, m + m * k, dev, integer=True)

    def rows(self, start: int, stop: int) -> dict[str, Any]:
        """The inputs of pairs ``start .. stop - 1`` as keywords of a pair loss: ``q``, ``a``,
        and those of ``hard_negatives``, ``labels``, ``query_ids``, ``answer_ids`` given."""
        out: dict[str, Any] = {"q": self.q[start:stop], "a": self.a[start:stop]}
        k = self.k
        if self.hard_negatives is not None:
            out["hard_negatives"] = self.hard_negatives[start * k : stop * k]
        if self.labels is not None:
            out["labels"] = self.labels[start:stop]
        if self.query_ids is not None:
            out["query_ids"] = self.query_ids[start:stop]
        if self.answer_ids is not None:
            ids = self.answer_ids
            out["answer_ids"] = torch.cat([ids[start:stop],
                                           ids[self.m + start * k : self.m + stop * k]])
        return out


def over_blocks(inputs: PairInputs, n: int, loss: Callable[..., tuple[Tensor, list[T]]]
                ) -> tuple[Tensor, list[T]]:
    """The mean of ``loss(**inputs.rows(block))`` over the blocks of ``n`` consecutive pairs,
    and the concatenation of the lists it returns alongside (WEINCE's lambdas)."""
    losses, extras = [], []
    for start in range(0, inputs.m, n):
        value, extra = loss(**inputs.rows(start, start + n))
        losses.append(value)
        extras.extend(extra)
    return torch.stack(losses).mean(), extras


def _within_blocks(ids: Tensor, g: int, n: int, cols: int) -> Tensor:
    """(g * n, cols) candidate mask of each block: candidate j of anchor i's block counts
    unless it has the id of i's positive (candidate i of the block) without being it."""
    ids = ids.reshape(g, cols)
    eye = torch.eye(n, cols, dtype=torch.bool, device=ids.device)
    return ((ids[:, None, :] != ids[:, :n, None]) | eye).reshape(g * n, cols)


def stacked_plain_loss(inputs: PairInputs, n: int, temperature: float | Tensor,
                       directions: Directions, normalization: Normalization,
                       label_threshold: float | None) -> Tensor:
    """The blocked loss with plain logits, dense, in one pass: the g = m / n blocks'
    similarities as one batched matmul (g, n, n + n k), their rows stacked into one
    (m, n + n k) softmax with each anchor's positive at its place in its block. Each
    block's loss is the dense loss's (the same candidates, masks, normalisation per block),
    and the mean over the m anchors is the mean over the blocks."""
    caller, m, k, g = inputs.caller, inputs.m, inputs.k, inputs.m // n
    check_choice(caller, "normalization", normalization, NORMALIZATIONS)
    weight = None
    if inputs.labels is not None:
        weight = binary_labels(caller, inputs.labels, m, inputs.q.device, label_threshold)
    elif label_threshold is not None:
        raise ValueError(f"{caller}: `label_threshold` given without `labels`")
    d = inputs.q.shape[1]
    q = normalize(inputs.q.reshape(g, n, d), normalization)
    candidates = inputs.a.reshape(g, n, d)
    if k:
        assert inputs.hard_negatives is not None
        candidates = torch.cat([candidates, inputs.hard_negatives.reshape(g, n * k, d)], dim=1)
    candidates = normalize(candidates, normalization)
    sims = torch.bmm(q, candidates.transpose(1, 2))  # (g, n, n + n k)
    cols = n + n * k
    target = torch.arange(n, device=sims.device).repeat(g)
    losses = []
    if directions in ("both", "q->a"):
        mask = None
        if inputs.answer_ids is not None:
            ids = inputs.answer_ids
            mask = _within_blocks(torch.cat([ids[:m].reshape(g, n),
                                             ids[m:].reshape(g, n * k)], dim=1), g, n, cols)
        loss, _ = direction_loss(sims.reshape(m, cols), target, mask, weight, PLAIN_LOGITS,
                                 temperature, m)
        losses.append(loss)
    if directions in ("both", "a->q"):
        columns = sims[:, :, :n].transpose(1, 2).reshape(m, n)
        mask = None if inputs.query_ids is None else _within_blocks(inputs.query_ids, g, n, n)
        loss, _ = direction_loss(columns, target, mask, weight, PLAIN_LOGITS, temperature, m)
        losses.append(loss)
    return losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
