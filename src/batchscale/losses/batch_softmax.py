r"""Batch-softmax contrastive loss over a batch of m pairs (q_i, a_i).

With s_ij = sim(q_i, a_j) and logits g = policy(s) (s / tau unless WEINCE):

    L0 = (1/m) sum_i y_i * CE(g_i., i)      rows: each query against every answer
    L1 = (1/m) sum_j y_j * CE(g_.j, j)      columns: each answer against every query
    L  = (L0 + L1) / 2                      (``directions="both"``)

``q->a`` alone is InfoNCE / multiple-negatives ranking. Hard negatives are extra answer
columns (candidates of L0 only). Label-aware masking (BSC eq. 5) sets y_i = 0 for negative
pairs: they are never anchors but stay candidates, and the divisor stays m. Ids remove false
negatives: a candidate with the same id as the anchor's positive is not a negative. The ids
are false-negative ids, one per text: text ids (the same text twice) or group ids (texts
that are never each other's negatives: one group, one id; a pair's query and answer share
it). Anchor i's softmax is then its positive and the candidates outside its group; when
every candidate is in its group, its positive alone (l_i = 0, no gradient). Anchors keep
their weight and the divisor stays m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._checks import (
    check_choice,
    check_embeddings,
    check_same_layout,
    check_vector,
)
from .logits import LogitPolicy
from .similarity import NORMALIZATIONS, Normalization, normalize
from .softmax import softmax_cross_entropy, weighted_anchor_mean
from .weince_tail import WeinceLambda

Directions = Literal["both", "q->a", "a->q"]
DIRECTIONS: tuple[str, ...] = ("both", "q->a", "a->q")


@dataclass(frozen=True)
class ContrastiveBatch:
    """A validated, normalised batch: queries, candidate answers (positives first, then hard
    negatives), anchor weights and false-negative masks."""

    q: Tensor                    # (m, d)
    candidates: Tensor           # (m + h, d)
    anchor_weight: Tensor | None  # (m,) y_i in {0, 1}, None = all anchors
    answer_ids: Tensor | None    # (m + h,) false-negative ids of the candidates (L0's masks)
    query_ids: Tensor | None     # (m,) false-negative ids of the queries (L1's masks)

    @property
    def m(self) -> int:
        return self.q.shape[0]


def binary_labels(caller: str, labels: object, m: int, device: torch.device,
                  threshold: float | None) -> Tensor:
    """y_i in {0, 1}: given as binary, or 1[score_i > threshold] for scores in [0, 1]."""
    y = check_vector(caller, "labels", labels, m, device)
    y = y.to(torch.float64)
    if threshold is None:
        if not bool(((y == 0) | (y == 1)).all()):
            bad = y[(y != 0) & (y != 1)][:3].tolist()
            raise ValueError(
                f"{caller}: `labels` must be 0/1 unless `label_threshold` is set, got values {bad}"
            )
        return y > 0.5
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"{caller}: `label_threshold` must be in [0, 1], got {threshold}")
    if bool(((y < 0) | (y > 1)).any()):
        bad = y[(y < 0) | (y > 1)][:3].tolist()
        raise ValueError(f"{caller}: graded `labels` must be scaled to [0, 1], got values {bad}")
    return y > threshold


def prepare_batch(caller: str, q: Tensor, a: Tensor, *, normalization: Normalization,
                  hard_negatives: Tensor | None = None, labels: object = None,
                  label_threshold: float | None = None, query_ids: object = None,
                  answer_ids: object = None) -> ContrastiveBatch:
    """Validate and normalise the inputs of a pair loss."""
    check_embeddings(caller, "q", q)
    check_embeddings(caller, "a", a)
    check_same_layout(caller, "q", q, "a", a)
    check_choice(caller, "normalization", normalization, NORMALIZATIONS)
    m, dev = q.shape[0], q.device
    candidates = a
    if hard_negatives is not None:
        if isinstance(hard_negatives, Tensor) and hard_negatives.ndim == 3:
            hard_negatives = hard_negatives.reshape(-1, hard_negatives.shape[-1])
        check_embeddings(caller, "hard_negatives", hard_negatives, min_rows=1)
        check_same_layout(caller, "a", a, "hard_negatives", hard_negatives, same_rows=False)
        candidates = torch.cat([a, hard_negatives])
    n_cand = candidates.shape[0]

    weight = None
    if labels is not None:
        weight = binary_labels(caller, labels, m, dev, label_threshold)
    elif label_threshold is not None:
        raise ValueError(f"{caller}: `label_threshold` given without `labels`")

    if answer_ids is not None:
        answer_ids = check_vector(caller, "answer_ids", answer_ids, n_cand, dev, integer=True)
    if query_ids is not None:
        query_ids = check_vector(caller, "query_ids", query_ids, m, dev, integer=True)
    return ContrastiveBatch(normalize(q, normalization), normalize(candidates, normalization),
                            weight, answer_ids, query_ids)


def candidate_mask(ids: Tensor | None, anchors: slice, candidates: slice) -> Tensor | None:
    """Which candidates (a block of columns) count for which anchors (a block of rows).

    Anchor i's positive is candidate i. A candidate is dropped when it carries the same id
    (text or group) as the anchor's positive but is not the positive itself (a false
    negative); the ids are those of the softmax's own candidates, so a block or a rank's
    share masks only the members of a group that it holds."""
    if ids is None:
        return None
    dev = ids.device
    rows = torch.arange(anchors.start, anchors.stop, device=dev)
    cols = torch.arange(candidates.start, candidates.stop, device=dev)
    return (ids[candidates][None, :] != ids[anchors][:, None]) | (cols[None, :] == rows[:, None])


def direction_loss(sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                   anchor_weight: Tensor | None, policy: LogitPolicy,
                   temperature: float | Tensor, count: int) -> tuple[Tensor, WeinceLambda | None]:
    """The mean cross-entropy of each anchor row of ``sims`` against its candidates."""
    anchors = (torch.ones(sims.shape[0], dtype=torch.bool, device=sims.device)
               if anchor_weight is None else anchor_weight.to(torch.bool))
    state = policy.row_state(sims, positive_index, candidate_mask, anchors)
    per_anchor = softmax_cross_entropy(sims, positive_index, candidate_mask, policy, state,
                                       temperature)
    return weighted_anchor_mean(per_anchor, anchor_weight, count), state


def batch_softmax_loss(batch: ContrastiveBatch, temperature: float | Tensor,
                       directions: Directions, policy: LogitPolicy
                       ) -> tuple[Tensor, list[WeinceLambda]]:
    """L0, L1 or their mean over a prepared batch (dense: one (m, m + h) matrix)."""
    m, n = batch.m, batch.candidates.shape[0]
    sims = batch.q @ batch.candidates.T
    target = torch.arange(m, device=sims.device)
    losses, states = [], []
    if directions in ("both", "q->a"):
        mask = candidate_mask(batch.answer_ids, slice(0, m), slice(0, n))
        loss, state = direction_loss(sims, target, mask, batch.anchor_weight,
                                     policy, temperature, m)
        losses.append(loss)
        states.append(state)
    if directions in ("both", "a->q"):
        columns = sims[:, :m].T.contiguous()
        mask = candidate_mask(batch.query_ids, slice(0, m), slice(0, m))
        loss, state = direction_loss(columns, target, mask, batch.anchor_weight,
                                     policy, temperature, m)
        losses.append(loss)
        states.append(state)
    total = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return total, [s for s in states if s is not None]
