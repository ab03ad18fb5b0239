"""What a batch composition gives the softmax: how hard the in-batch negatives are, and how
often a batch holds the same text twice (a false negative).

* Hardest in-batch negative similarity of a batch of pairs (q_i, a_i): for each anchor q_i,
  max over j != i of cos(q_i, a_j); the statistic is the mean over anchors. BSC's shuffling
  (Chernyavskiy et al., NAACL 2022, arXiv 2110.15725) exists to raise it.
* Duplicate rate: an example is a *duplicate* when one of its texts (keys) is already held
  by an earlier example of its batch (so two copies of a text count once, three twice). The
  rate is duplicates / examples; ``batch_rate`` is the share of batches holding any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .no_duplicates import check_keys, distinct_mask

_ROW_BLOCK = 4096  # rows of the similarity matrix at a time: memory O(block * m)


def _as_matrix(name: str, x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"`{name}` must be an (m, d) float matrix, got shape {tuple(t.shape)}")
    return t


@torch.no_grad()
def hardest_negatives(queries: Tensor | np.ndarray, answers: Tensor | np.ndarray,
                      rows: Tensor | None = None) -> Tensor:
    """(m,) float32: for each anchor i, max over j != i of cos(q_i, a_j). Empty when m < 2
    (no negatives). Detached: a statistic, not a loss. ``rows`` (int indices): only those
    anchors, each still against every answer (a sample, O(len(rows) * m))."""
    q = _as_matrix("queries", queries).detach().float()
    a = _as_matrix("answers", answers).detach().float()
    if q.shape != a.shape:
        raise ValueError(f"`queries` {tuple(q.shape)} and `answers` {tuple(a.shape)} differ")
    m = q.shape[0]
    if m < 2:
        return torch.zeros(0, device=q.device)
    index = torch.arange(m, device=q.device) if rows is None else rows.to(q.device)
    q = torch.nn.functional.normalize(q[index], dim=1)
    a = torch.nn.functional.normalize(a, dim=1)
    out = torch.empty(len(index), device=q.device)
    for start in range(0, len(index), _ROW_BLOCK):
        sim = q[start : start + _ROW_BLOCK] @ a.T
        block = torch.arange(sim.shape[0], device=q.device)
        sim[block, index[start : start + _ROW_BLOCK]] = -torch.inf  # the positive
        out[start : start + _ROW_BLOCK] = sim.max(dim=1).values
    return out


def mean_hardest_negative(queries: Tensor | np.ndarray, answers: Tensor | np.ndarray) -> float:
    """Mean over the batch's anchors of the hardest in-batch negative cosine (NaN if m < 2)."""
    values = hardest_negatives(queries, answers)
    return float(values.mean()) if values.numel() else float("nan")


def epoch_hardest_negative(
    batches: Sequence[Sequence[int] | np.ndarray],
    queries: Tensor | np.ndarray,
    answers: Tensor | np.ndarray,
) -> float:
    """Mean over all anchors of an epoch of their batch's hardest negative, from embeddings of
    the whole data set (rows indexed by example id). Batches of one example have no negative
    and count for nothing."""
    q, a = _as_matrix("queries", queries), _as_matrix("answers", answers)
    total, count = 0.0, 0
    for batch in batches:
        index = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        values = hardest_negatives(q[index], a[index])
        total += float(values.sum())
        count += values.numel()
    return total / count if count else float("nan")


@dataclass(frozen=True)
class DuplicateStats:
    """Duplicates in a list of batches (see the module docstring for the definition)."""

    examples: int
    duplicates: int
    batches: int
    batches_with_duplicates: int

    @property
    def rate(self) -> float:
        return self.duplicates / self.examples if self.examples else 0.0

    @property
    def batch_rate(self) -> float:
        return self.batches_with_duplicates / self.batches if self.batches else 0.0


def duplicate_stats(
    batches: Sequence[Sequence[int] | np.ndarray], keys: np.ndarray
) -> DuplicateStats:
    """Count the duplicates of ``batches`` under the text keys (N, C) of the examples."""
    keys = check_keys(keys)
    arrays = [np.asarray(b, dtype=np.int64).reshape(-1) for b in batches]
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(keys)):
        raise ValueError(f"`batches` hold ids outside [0, {len(keys)}) (the rows of `keys`)")
    batch_of = np.repeat(np.arange(len(arrays)), [len(b) for b in arrays])
    rows, cols = np.nonzero(distinct_mask(keys[ids]))
    flat, flat_batch = keys[ids[rows], cols], batch_of[rows]
    # Equal (batch, key) next to each other, in batch order: all but the first are repeats.
    order = np.lexsort((rows, flat, flat_batch))
    same = (flat[order][1:] == flat[order][:-1]) & (flat_batch[order][1:] == flat_batch[order][:-1])
    duplicate_rows = np.unique(rows[order][1:][same])
    return DuplicateStats(
        examples=len(ids),
        duplicates=len(duplicate_rows),
        batches=len(arrays),
        batches_with_duplicates=len(np.unique(batch_of[duplicate_rows])),
    )


def duplicate_rate(batches: Sequence[Sequence[int] | np.ndarray], keys: np.ndarray) -> float:
    """Share of the examples that are duplicates within their batch."""
    return duplicate_stats(batches, keys).rate
