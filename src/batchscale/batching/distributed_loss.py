r"""A pair loss whose negatives come from every rank.

Each rank holds m_r pairs; the embeddings of both sides (and the hard negatives) are
all-gathered with gradient, the per-example arguments (labels, ids) without, and every rank
computes the loss of the whole global batch of B = sum_r m_r pairs. This is exact for every
loss of :mod:`batchscale.losses` whatever couples the anchors (WEINCE's batch quantile of
rho, ``normalization="coord"``), and with :func:`average_gradients` (or DDP) the parameter
gradients equal one process's on the whole batch (see
:mod:`batchscale.batching.distributed`). The price is the B x B similarity block on every
rank. :func:`local_pair_loss` is OpenCLIP's local loss: each rank scores only its own
anchors' rows and columns (m_r x B similarities), with the same gradients.
:func:`local_block_loss` is the local loss of a loss split into softmax blocks
(``softmax_batch``, :mod:`batchscale.losses.blocks`): each rank computes the blocks that hold
its pairs, from its own pairs alone when no block crosses a rank's share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch import distributed as dist

from ..losses.blocks import PairInputs, block_size
from .distributed import gather_rows, gather_with_grad, is_distributed, rank


def _per_example(name: str, value: object, rows: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(value, device=device)
    if t.ndim != 1 or t.shape[0] != rows:
        raise ValueError(f"`{name}` must have shape ({rows},) on this rank, got {tuple(t.shape)}")
    return t


def _pair_rows(fn: str, q: object, a: object) -> int:
    """m, after checking that ``q`` and ``a`` are (m, d) tensors of the same pairs."""
    for name, x in (("q", q), ("a", a)):
        if not isinstance(x, Tensor) or x.ndim != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{fn}: `{name}` must be a 2-D tensor, got {got}")
    m = q.shape[0]  # type: ignore[union-attr]
    if a.shape[0] != m:  # type: ignore[union-attr]
        raise ValueError(f"{fn}: `q` and `a` must hold the same pairs, got {m} and "
                         f"{a.shape[0]}")  # type: ignore[union-attr]
    return m


def gather_batch(
    embeddings: Sequence[Tensor],
    labels: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """The global batch from every rank's share: each side's embeddings (queries, answers[,
    hard negatives]) gathered with gradient, in rank order, and the labels without.

    This is how the trainer's objective sees the batch under ``torchrun``: the loss of the
    whole global batch on every rank (see the module docstring). Returns the inputs as they
    are on one process.
    """
    if not is_distributed(group):
        return list(embeddings), labels
    for i, x in enumerate(embeddings):
        if not isinstance(x, Tensor) or x.ndim != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"gather_batch: side {i} must be a 2-D tensor, got {got}")
    gathered = [gather_with_grad(x, group) for x in embeddings]
    if labels is not None:
        labels = gather_rows(_per_example("labels", labels, embeddings[0].shape[0],
                                          embeddings[0].device), group)
    return gathered, labels


def rank_shares(m: int, device: torch.device | str = "cpu",
                group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's number of pairs, in rank order (an all-gather); ``[m]`` on one process.
    The global batch is their concatenation, rank 0's pairs first."""
    if not is_distributed(group):
        return [m]
    return [int(c) for c in gather_rows(torch.tensor([m], device=device), group)]


def _gather_pairs(q: Tensor, a: Tensor, m: int, hard_negatives: Tensor | None, labels: object,
                  query_ids: object, answer_ids: object, group: dist.ProcessGroup | None
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The global batch's queries, answers and, of the per-pair inputs given, the gathered
    ones as keywords of a pair loss (hard negatives and ids in the global pair order)."""
    sides = [q, a]
    h = 0
    if hard_negatives is not None:
        if hard_negatives.ndim == 3:
            hard_negatives = hard_negatives.reshape(-1, hard_negatives.shape[-1])
        h = hard_negatives.shape[0]
        sides.append(hard_negatives)
    if labels is not None:
        labels = _per_example("labels", labels, m, q.device)
    (q, a, *negatives), labels = gather_batch(sides, labels, group)
    extra: dict[str, Tensor] = {}
    if negatives:
        extra["hard_negatives"] = negatives[0]
    if labels is not None:
        extra["labels"] = labels
    if query_ids is not None:
        extra["query_ids"] = gather_rows(_per_example("query_ids", query_ids, m, q.device), group)
    if answer_ids is not None:
        ids = _per_example("answer_ids", answer_ids, m + h, q.device)
        # Global layout: all ranks' answers, then all ranks' hard negatives, as the loss
        # puts the gathered hard negatives after the gathered answers.
        parts = [gather_rows(ids[:m], group)]
        if h:
            parts.append(gather_rows(ids[m:], group))
        extra["answer_ids"] = torch.cat(parts)
    return q, a, extra


def gathered_pair_loss(
    loss_fn: Callable[..., Tensor],
    q: Tensor,
    a: Tensor,
    *,
    hard_negatives: Tensor | None = None,
    labels: object = None,
    query_ids: object = None,
    answer_ids: object = None,
    group: dist.ProcessGroup | None = None,
    **loss_kwargs: object,
) -> Tensor:
    """``loss_fn`` (e.g. :func:`~batchscale.losses.bsc_loss`, ``infonce_loss``,
    ``weince_loss``) on the global batch; ``loss_fn(q, a, ...)`` itself on one process.

    Args:
        q, a: (m, d) this rank's pairs. Ranks may hold different m.
        hard_negatives: (m * k, d) or (m, k, d) this rank's extra answers.
        labels, query_ids: (m,) this rank's per-pair values.
        answer_ids: (m + m * k,) ids of this rank's answers, then of its hard negatives.
            The ids are false-negative ids (text or group ids, see
            :func:`~batchscale.losses.bsc_loss`), global across ranks: a group split over
            ranks is masked in full, as on one process.
        loss_kwargs: passed as they are (temperature, directions, config, ...).

    Returns the global loss, the same value on every rank.
    """
    if not is_distributed(group):
        kwargs = {
            k: v
            for k, v in (
                ("hard_negatives", hard_negatives),
                ("labels", labels),
                ("query_ids", query_ids),
                ("answer_ids", answer_ids),
            )
            if v is not None
        }
        return loss_fn(q, a, **kwargs, **loss_kwargs)
    m = _pair_rows("gathered_pair_loss", q, a)
    q, a, extra = _gather_pairs(q, a, m, hard_negatives, labels, query_ids, answer_ids, group)
    return loss_fn(q, a, **extra, **loss_kwargs)


class RowLoss(Protocol):
    """A batch-softmax loss in the rows direction only: each anchor against its positive
    (same row of ``positives``) and every other candidate, averaged over the anchors; e.g.
    ``functools.partial(bsc_loss, temperature=0.05, directions="q->a")``."""

    def __call__(self, anchors: Tensor, positives: Tensor, *, hard_negatives: Tensor | None,
                 answer_ids: Tensor | None, anchor_pool: Callable[[Tensor], Tensor]
                 ) -> Tensor: ...


def _without(x: Tensor, rows: slice) -> Tensor:
    return torch.cat([x[: rows.start], x[rows.stop :]])


def local_pair_loss(
    row_loss: RowLoss,
    q: Tensor,
    a: Tensor,
    *,
    directions: Literal["both", "q->a", "a->q"] = "both",
    hard_negatives: Tensor | None = None,
    query_ids: object = None,
    answer_ids: object = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    r"""OpenCLIP's local loss: this rank's anchors against every rank's candidates.

    Rows (L0): this rank's queries against all answers and all hard negatives; columns (L1):
    this rank's answers against all queries. Each is one call of ``row_loss`` with this
    rank's pairs as anchors and positives and the other ranks' rows as extra candidates, so
    the similarity work per rank is m_r x B instead of B x B. The per-anchor losses are the
    global loss's (the same candidates, masks and labels; ``query_ids`` / ``answer_ids``,
    text or group ids as for :func:`~batchscale.losses.bsc_loss`, are gathered with the
    candidates, so a group spanning ranks is masked as on one process; the positive stays
    candidate i: this rank's rows come first); batch-level statistics (WEINCE's
    rho0) see every rank's anchors through ``anchor_pool``, an all-gather. The result is
    scaled by W m_r / B, so that the mean over ranks is the global loss and, with the
    gradients averaged across ranks, the gradients are the global loss's (see
    :mod:`batchscale.batching.distributed`). One process: the plain loss.

    ``row_loss`` binds everything else (temperature, labels of this rank's pairs, tiles).
    Losses that normalise over the batch axis (``normalization="coord"``) need the global
    batch (:func:`gather_batch`).
    """
    if directions not in ("both", "q->a", "a->q"):
        raise ValueError(f"local_pair_loss: `directions` must be both, q->a or a->q, got "
                         f"{directions!r}")
    m = _pair_rows("local_pair_loss", q, a)
    if hard_negatives is not None and hard_negatives.ndim == 3:
        hard_negatives = hard_negatives.reshape(-1, hard_negatives.shape[-1])
    h = 0 if hard_negatives is None else hard_negatives.shape[0]
    distributed = is_distributed(group)

    def pool(x: Tensor) -> Tensor:
        return gather_rows(x, group) if distributed else x

    counts = rank_shares(m, q.device, group)
    mine = slice(sum(counts[: rank(group)]), sum(counts[: rank(group)]) + m)
    total = sum(counts)
    a_ids = q_ids = None
    if answer_ids is not None:
        a_ids = _per_example("answer_ids", answer_ids, m + h, q.device)
    if query_ids is not None:
        q_ids = _per_example("query_ids", query_ids, m, q.device)

    parts = []
    if directions in ("both", "q->a"):
        extra = [_without(gather_with_grad(a, group), mine)] if distributed else []
        if hard_negatives is not None:
            extra.append(gather_with_grad(hard_negatives, group))
        ids = None
        if a_ids is not None:
            ids = torch.cat([a_ids[:m], _without(pool(a_ids[:m]), mine)] if distributed
                            else [a_ids[:m]])
            if h:
                ids = torch.cat([ids, pool(a_ids[m:])])
        parts.append(row_loss(q, a, hard_negatives=torch.cat(extra) if extra else None,
                              answer_ids=ids, anchor_pool=pool))
    if directions in ("both", "a->q"):
        extra = [_without(gather_with_grad(q, group), mine)] if distributed else []
        ids = None
        if q_ids is not None:
            ids = torch.cat([q_ids, _without(pool(q_ids), mine)]) if distributed else q_ids
        parts.append(row_loss(a, q, hard_negatives=torch.cat(extra) if extra else None,
                              answer_ids=ids, anchor_pool=pool))
    loss = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2
    world = len(counts)
    return loss * (world * m / total) if distributed else loss


class BlockLoss(Protocol):
    """A pair loss split into softmax blocks, called with a batch of whole blocks: the mean of
    its blocks' losses; e.g. ``functools.partial(bsc_loss, temperature=0.05)``. Called with
    ``softmax_batch`` and, of ``hard_negatives``, ``labels``, ``query_ids``, ``answer_ids``,
    the ones given to :func:`local_block_loss`."""

    def __call__(self, q: Tensor, a: Tensor, *, softmax_batch: int, **per_pair: Tensor
                 ) -> Tensor: ...


def _touched_blocks(start: int, m: int, n: int) -> list[tuple[int, int, int]]:
    """The blocks of n pairs that hold pairs ``start .. start + m - 1``, as (first pair, end
    pair, how many of those pairs they hold); consecutive blocks held whole are merged."""
    out: list[tuple[int, int, int]] = []
    end = start + m
    for lo in range(start // n * n, end, n):
        held = min(lo + n, end) - max(lo, start)
        if held == n and out and out[-1][2] == out[-1][1] - out[-1][0]:
            out[-1] = (out[-1][0], lo + n, out[-1][2] + n)
        else:
            out.append((lo, lo + n, held))
    return out


def local_block_loss(
    block_loss: BlockLoss,
    q: Tensor,
    a: Tensor,
    *,
    softmax_batch: int | None,
    hard_negatives: Tensor | None = None,
    labels: object = None,
    query_ids: object = None,
    answer_ids: object = None,
    group: dist.ProcessGroup | None = None,
    shares: Sequence[int] | None = None,
) -> Tensor:
    r"""The local loss of a loss in softmax blocks of N = ``softmax_batch`` pairs.

    The global batch of B pairs (the ranks' shares in rank order) splits into B / N blocks of
    N consecutive pairs; the global loss is L = (N / B) sum_b L_b. Rank r returns
    L_r = (W / B) sum_b n_rb L_b, n_rb the number of its pairs in block b, so that the mean
    over the ranks is L and, with the gradients averaged across ranks, the gradients are L's
    (:mod:`batchscale.batching.distributed`):

    * when every rank's share starts and ends on a block boundary (N divides the shares),
      each block lies in one rank: the rank calls ``block_loss`` on its own pairs, with no
      communication, and L_r = (W m_r / B) x its blocks' mean, as :func:`local_pair_loss`'s;
    * otherwise some block spans ranks, and every rank gathers the global batch (with
      gradient) and computes, whole, each block that holds any of its pairs, weighted by
      n_rb: a block shared by two ranks is computed on both (at most N x N similarities per
      block, the same candidates as one process). WEINCE diagnostics recorded inside
      ``block_loss`` then count a shared block once per rank that computes it.

    Every rank takes the same branch and makes the same collectives (the shares are known to
    all). One process: ``block_loss`` on the batch. ``shares`` (every rank's pair count, from
    :func:`rank_shares`) saves an all-gather when the caller has them. Raises ``ValueError``
    naming N when it does not divide B, on every rank alike.
    """
    m = _pair_rows("local_block_loss", q, a)
    given = {k: v for k, v in (("hard_negatives", hard_negatives), ("labels", labels),
                               ("query_ids", query_ids), ("answer_ids", answer_ids))
             if v is not None}
    counts = list(shares) if shares is not None else rank_shares(m, q.device, group)
    total, world = sum(counts), len(counts)
    if counts[rank(group)] != m:
        raise ValueError(f"local_block_loss: `shares` gives this rank {counts[rank(group)]} "
                         f"pairs, it holds {m}")
    n = block_size("local_block_loss", softmax_batch, total) or total
    if world == 1:
        return block_loss(q, a, softmax_batch=n, **given)
    edges = [sum(counts[:r]) for r in range(world + 1)]
    if all(e % n == 0 for e in edges):
        if m == 0:  # no pairs here (and nothing to gather): a zero in the graph
            return q.sum() * 0.0
        return block_loss(q, a, softmax_batch=n, **given) * (world * m / total)
    gq, ga, extra = _gather_pairs(q, a, m, hard_negatives, labels, query_ids, answer_ids, group)
    pairs = PairInputs("local_block_loss", gq, ga, **extra)
    parts = [held * block_loss(**pairs.rows(lo, hi), softmax_batch=n)
             for lo, hi, held in _touched_blocks(edges[rank(group)], m, n)]
    if not parts:  # no pairs here: zeros keep the gathered tensors (and the all-reduces of
        # their backward, which every rank must run) in the graph
        parts = [x.sum() * 0.0 for x in (gq, ga, *extra.values()) if x.is_floating_point()]
    return sum(parts[1:], start=parts[0]) * (world / total)
