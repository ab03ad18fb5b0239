"""The training objective: a loss of :mod:`batchscale.losses` chosen by the config.

The trainer only sees ``objective(embeddings, labels) -> loss``: one embedding tensor per
side of the batch (queries, answers[, hard negatives]) and the pairs' labels in [0, 1] (or
None). Loss parameters (a learnable temperature) live here, with their own learning rate,
and so do the loss's diagnostics (WEINCE's lambdas), averaged between evaluation points.
Terms listed under ``loss.plus`` are added with their weights (one objective, several losses).

Under ``torchrun`` the objective decides how the batch crosses ranks (the trainer passes each
rank's share): ``cross_ranks="local"`` (OpenCLIP's local loss) scores this rank's anchors
against every rank's candidates for the batch-softmax terms
(:func:`~batchscale.batching.local_pair_loss`) and computes the other terms (CoSENT, MSE,
triplet, VRNS: cheap, some coupling all pairs) on the gathered batch; ``"global"`` computes
every term on the gathered batch (:func:`~batchscale.batching.gather_batch`). Both give the
gradients of one process on the whole batch once the trainer averages them across ranks.

``loss.softmax_batch`` N (each term its own) splits a batch-softmax term of the global batch
into independent blocks of N consecutive pairs (:mod:`batchscale.losses.blocks`): passed to
the loss on the gathered batch, and under the local loss
:func:`~batchscale.batching.distributed_loss.local_block_loss` (each rank's blocks from its
own pairs when N divides the shares, else the blocks holding its pairs from the gathered
batch). N = B is the term without blocks.

``loss.name: sogclr`` (:func:`~batchscale.losses.sogclr_loss`) is the one loss with a state:
the moving average u of every training example's negative partition, per direction, kept
here as a buffer (``sogclr_log_u``, log u, (directions, num_examples); -inf = never seen), so
that ``state_dict()`` and hence the trainer's checkpoints carry it. The trainer passes the
batch's example indices (``indices``); each step reads the anchors' log u and writes the new
values back. Under torchrun every rank keeps the whole state: with the local loss each rank
scores its own anchors and the new values are all-gathered with their indices; with the
global loss, or softmax blocks that do not fall within the ranks' shares, every rank
computes every anchor. :meth:`Objective.frozen_state` computes losses without writing it
(the noise-scale probe). Its diagnostics are the mean u and the standard deviation of log u
over the batch's anchors (both directions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from ..batching.distributed import gather_rows, is_distributed
from ..batching.distributed_loss import (
    gather_batch,
    local_block_loss,
    local_pair_loss,
    rank_shares,
)
from ..losses import (
    LearnableTemperature,
    bsc_loss,
    bsc_mse_loss,
    cosent_loss,
    cosine_mse_loss,
    infonce_loss,
    sogclr_directions,
    sogclr_loss,
    triplet_loss,
    vrns_penalty,
    weince_loss,
)
from ..losses.combined import BSC_LABEL_THRESHOLD
from .config import LossConfig

#: Losses with a softmax over the batch's candidates: under the local loss, each rank scores
#: only its own anchors.
SOFTMAX_LOSSES = frozenset({"bsc", "infonce", "weince", "bsc_mse"})
CrossRanks = Literal["local", "global"]
#: (query ids (m,), answer ids (m + m * k,)): a candidate with its anchor's id is masked.
FalseNegativeIds = tuple[Tensor | None, Tensor | None]


def gather_ids(ids: FalseNegativeIds | None, m: int) -> FalseNegativeIds | None:
    """The global batch's ids from every rank's share, in the gathered layout (all ranks'
    answers, then all ranks' hard negatives); as given on one process."""
    if ids is None or not is_distributed():
        return ids
    query_ids, answer_ids = ids
    if answer_ids is not None:
        parts = [gather_rows(answer_ids[:m])]
        if answer_ids.shape[0] > m:
            parts.append(gather_rows(answer_ids[m:]))
        answer_ids = torch.cat(parts)
    return None if query_ids is None else gather_rows(query_ids), answer_ids


class Objective(nn.Module):
    """``forward(embeddings, labels) -> 0-dim loss`` for the configured loss."""

    def __init__(self, config: LossConfig, num_examples: int,
                 cross_ranks: CrossRanks = "local") -> None:
        super().__init__()
        if cross_ranks not in ("local", "global"):
            raise ValueError(f"`cross_ranks` must be 'local' or 'global', got {cross_ranks!r}")
        self.config = config
        self.num_examples = num_examples
        self.cross_ranks = cross_ranks
        self.temperature_module = (LearnableTemperature(config.temperature)
                                   if config.learnable_temperature else None)
        # name -> [weighted sum, total weight] since the last pop
        self._stats: dict[str, list[float]] = {}
        self._update_state = True
        if config.name == "sogclr":
            # SogCLR's u per direction and example, as log u (-inf: u = 0, the authors'
            # initialisation); a buffer, so that checkpoints carry it (safetensors).
            rows = len(sogclr_directions(config.directions))
            self.register_buffer("sogclr_log_u", torch.full((rows, num_examples), -math.inf,
                                                            dtype=torch.float64))

    @property
    def needs_indices(self) -> bool:
        """Whether ``forward`` needs the batch's example indices (a per-example state)."""
        return self.config.name == "sogclr"

    @contextmanager
    def frozen_state(self) -> Iterator[None]:
        """Losses computed inside leave the per-example state (SogCLR's u) and its
        diagnostics as they are: for batches that are not training steps."""
        saved, self._update_state = self._update_state, False
        try:
            yield
        finally:
            self._update_state = saved

    @property
    def needs_labels(self) -> bool:
        return bool(self.config.scored_terms)

    def temperature(self) -> float | Tensor:
        if self.temperature_module is not None:
            return self.temperature_module()
        return self.config.temperature

    def param_groups(self) -> list[dict[str, object]]:
        """Optimiser groups of the loss's own parameters (the temperature, at its own lr)."""
        if self.temperature_module is None:
            return []
        return [{"params": list(self.temperature_module.parameters()),
                 "lr": self.config.temperature_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self) -> None:
        if self.temperature_module is not None:
            self.temperature_module.clamp_()

    def forward(self, embeddings: Sequence[Tensor], labels: Tensor | None,
                ids: FalseNegativeIds | None = None,
                indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """The loss of the batch: on one process, of ``embeddings`` (queries, answers[,
        hard negatives]); under torchrun, of the global batch whose share this rank holds
        (see the module docstring; with the local loss the value is this rank's part, and
        its mean over the ranks is the global loss). ``ids``: the false-negative ids
        (query ids (m,), answer ids (m + m * k,)) the batch-softmax terms mask by.
        ``indices``: the (m,) training-example indices of this rank's pairs (SogCLR's state)."""
        c = self.config
        if self.needs_labels and labels is None:
            raise ValueError(f"loss {', '.join(c.scored_terms)} needs a graded label on "
                             "every pair")
        local = self.cross_ranks == "local" and is_distributed()
        gathered: list[Tensor | None] = []  # the global batch, gathered once when needed

        def whole() -> tuple[list[Tensor], Tensor | None]:
            if not gathered:
                sides, all_labels = gather_batch(list(embeddings), labels)
                gathered.extend([*sides, all_labels])
            return gathered[:-1], gathered[-1]  # type: ignore[return-value]

        all_ids: list[FalseNegativeIds | None] = []

        def whole_ids() -> FalseNegativeIds | None:
            if not all_ids:
                all_ids.append(gather_ids(ids, embeddings[0].shape[0]))
            return all_ids[0]

        tau = self.temperature()
        loss: Tensor | float = 0.0
        for i, term in enumerate(c.terms()):
            weight = 1.0 if i == 0 else term.weight  # type: ignore[attr-defined]
            t_tau = tau if i == 0 else term.temperature
            if term.name == "sogclr":  # the main loss only (the config checks)
                value = self._sogclr_term(term, embeddings, labels, t_tau, ids, indices, local)
            elif local and term.name in SOFTMAX_LOSSES:
                value = self._local_term(term, embeddings, labels, t_tau, ids)
            else:
                (q, a, *rest), batch_labels = whole()
                value = self._term(term, q, a, rest[0] if rest else None, batch_labels, t_tau,
                                   softmax_batch=term.softmax_batch,
                                   ids=whole_ids() if term.name in SOFTMAX_LOSSES else None)
            loss = loss + weight * value
        if c.vrns_weight > 0:
            (q, a, *_), _ = whole()
            loss = loss + c.vrns_weight * vrns_penalty(q, a, max(2, self.num_examples))
        if self.temperature_module is not None:
            self._record(temperature=float(torch.as_tensor(tau).detach()))
        return loss

    def _local_term(self, c: LossConfig, embeddings: Sequence[Tensor], labels: Tensor | None,
                    tau: float | Tensor, ids: FalseNegativeIds | None) -> Tensor:
        """A batch-softmax term as OpenCLIP's local loss: this rank's anchors, every rank's
        candidates; each direction is the term's rows direction with these anchors."""
        q, a, *rest = embeddings
        negatives = rest[0] if rest else None
        query_ids, answer_ids = ids if ids is not None else (None, None)
        if c.softmax_batch is not None:
            shares = rank_shares(q.shape[0], q.device)
            if c.softmax_batch != sum(shares):

                def blocks(q: Tensor, a: Tensor, *, softmax_batch: int,
                           hard_negatives: Tensor | None = None,
                           labels: Tensor | None = None, query_ids: Tensor | None = None,
                           answer_ids: Tensor | None = None) -> Tensor:
                    block_ids = None if answer_ids is None else (query_ids, answer_ids)
                    return self._term(c, q, a, hard_negatives, labels, tau,
                                      softmax_batch=softmax_batch, ids=block_ids)

                return local_block_loss(blocks, q, a, softmax_batch=c.softmax_batch,
                                        hard_negatives=negatives, labels=labels,
                                        query_ids=query_ids, answer_ids=answer_ids,
                                        shares=shares)

        def rows(anchors: Tensor, positives: Tensor, *, hard_negatives: Tensor | None,
                 answer_ids: Tensor | None, anchor_pool) -> Tensor:
            # One direction (q->a on these anchors): the candidates' ids make its mask.
            row_ids = None if answer_ids is None else (None, answer_ids)
            return self._term(c, anchors, positives, hard_negatives, labels, tau,
                              directions="q->a", anchor_pool=anchor_pool, ids=row_ids)

        directions = "q->a" if c.name == "infonce" else c.directions
        return local_pair_loss(rows, q, a, directions=directions, hard_negatives=negatives,
                               query_ids=query_ids, answer_ids=answer_ids)

    def _term(self, c: LossConfig, q: Tensor, a: Tensor, negatives: Tensor | None,
              labels: Tensor | None, tau: float | Tensor, *, directions: str | None = None,
              anchor_pool=None, softmax_batch: int | None = None,
              ids: FalseNegativeIds | None = None) -> Tensor:
        """One term on a batch (its batch-softmax loss in blocks of ``softmax_batch`` pairs,
        masking false negatives by ``ids``)."""
        blocks = dict(softmax_batch=softmax_batch) if c.name in SOFTMAX_LOSSES else {}
        masking: dict[str, object] = dict(labels=labels, label_threshold=c.label_threshold) \
            if c.label_threshold is not None and labels is not None else {}
        directions = directions or c.directions
        if ids is not None:
            query_ids, answer_ids = ids
            if query_ids is not None and c.name != "infonce":  # InfoNCE has no a->q mask
                masking["query_ids"] = query_ids
            if answer_ids is not None:
                masking["answer_ids"] = answer_ids
        if c.name == "bsc":
            return bsc_loss(q, a, tau, directions=directions, normalization=c.normalization,
                            hard_negatives=negatives, tile_size=c.tile_size, **blocks,
                            **masking)
        if c.name == "infonce":
            return infonce_loss(q, a, tau, normalization=c.normalization,
                                hard_negatives=negatives, tile_size=c.tile_size, **blocks,
                                **masking)
        if c.name == "weince":
            loss, stats = weince_loss(q, a, tau, directions=directions,
                                      hard_negatives=negatives, tile_size=c.tile_size,
                                      return_stats=True, anchor_pool=anchor_pool, **blocks,
                                      **masking)
            self._record(weight=stats.anchors, weince_mean_lambda=stats.mean_lambda,
                         weince_weibull_share=stats.weibull_share)
            return loss
        if c.name == "bsc_mse":
            threshold = c.label_threshold if c.label_threshold is not None \
                else BSC_LABEL_THRESHOLD
            fn_ids = {k: v for k, v in masking.items() if k.endswith("_ids")}
            return bsc_mse_loss(q, a, labels, tau, mu=c.mu, label_threshold=threshold,
                                directions=directions, normalization=c.normalization,
                                hard_negatives=negatives, tile_size=c.tile_size, **blocks,
                                **fn_ids)
        if c.name == "cosine_mse":
            return cosine_mse_loss(q, a, labels)
        if c.name == "cosent":
            return cosent_loss(q, a, labels, scale=c.cosent_scale)
        if c.name == "triplet":
            if negatives is None:
                raise ValueError("loss triplet needs (anchor, positive, negative) batches")
            return triplet_loss(q, a, negatives, margin=c.triplet_margin)
        raise ValueError(f"unknown loss {c.name!r}")  # the config's Literal forbids this

    def _sogclr_term(self, c: LossConfig, embeddings: Sequence[Tensor], labels: Tensor | None,
                     tau: float | Tensor, ids: FalseNegativeIds | None,
                     indices: Sequence[int] | Tensor | None, local: bool) -> Tensor:
        """SogCLR with this objective's state: the anchors' log u read by example index, the
        loss, and the new log u written back on every rank alike."""
        if indices is None:
            raise ValueError("loss sogclr keeps a moving average per training example: pass "
                             "the batch's example indices (objective(..., indices=...))")
        mine = torch.as_tensor(indices, dtype=torch.long).reshape(-1).to(
            self.sogclr_log_u.device)
        q, a, *rest = embeddings
        if mine.shape[0] != q.shape[0]:
            raise ValueError(f"loss sogclr: {mine.shape[0]} example indices for a batch of "
                             f"{q.shape[0]} pairs")
        blocks = c.softmax_batch
        if local and blocks is not None and blocks == sum(rank_shares(q.shape[0], q.device)):
            blocks = None
        if local and blocks is None:
            value, rows, new = self._sogclr_local(c, q, a, rest[0] if rest else None, labels,
                                                  tau, ids, mine)
        else:  # every anchor of the global batch on every rank
            (q, a, *rest), labels = gather_batch(list(embeddings), labels)
            query_ids, answer_ids = gather_ids(ids, mine.shape[0]) or (None, None)
            rows = gather_rows(mine) if is_distributed() else mine
            value, new = sogclr_loss(q, a, self.sogclr_log_u[:, rows].to(q.device), tau,
                                     directions=c.directions, hard_negatives=rest[0] if rest
                                     else None, query_ids=query_ids, answer_ids=answer_ids,
                                     softmax_batch=c.softmax_batch,
                                     **self._sogclr_options(c, labels))
        if self._update_state:
            self._store_state(rows, new)
        return value

    def _sogclr_options(self, c: LossConfig, labels: Tensor | None) -> dict[str, object]:
        options: dict[str, object] = dict(gamma=c.sogclr_gamma, normalization=c.normalization)
        if c.label_threshold is not None and labels is not None:
            options.update(labels=labels, label_threshold=c.label_threshold)
        return options

    def _sogclr_local(self, c: LossConfig, q: Tensor, a: Tensor, negatives: Tensor | None,
                      labels: Tensor | None, tau: float | Tensor,
                      ids: FalseNegativeIds | None, mine: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """The local loss (this rank's anchors, every rank's candidates), then the new log u
        of every rank's anchors, all-gathered with their indices."""
        old = self.sogclr_log_u[:, mine].to(q.device)
        news: list[Tensor] = []

        def rows(anchors: Tensor, positives: Tensor, *, hard_negatives: Tensor | None,
                 answer_ids: Tensor | None, anchor_pool) -> Tensor:
            d = len(news)  # local_pair_loss calls the rows (q->a), then the columns (a->q)
            loss, new = sogclr_loss(anchors, positives, old[d : d + 1], tau, directions="q->a",
                                    hard_negatives=hard_negatives, answer_ids=answer_ids,
                                    **self._sogclr_options(c, labels))
            news.append(new[0])
            return loss

        query_ids, answer_ids = ids if ids is not None else (None, None)
        value = local_pair_loss(rows, q, a, directions=c.directions, hard_negatives=negatives,
                                query_ids=query_ids, answer_ids=answer_ids)
        new = torch.stack(news)
        if not is_distributed():
            return value, mine, new
        return value, gather_rows(mine), gather_rows(new.T.contiguous()).T

    @torch.no_grad()
    def _store_state(self, rows: Tensor, new: Tensor) -> None:
        """Write the new log u of examples ``rows`` (an example twice in a batch: its last
        row, as one process would), and record the batch's mean u and std of log u."""
        state = self.sogclr_log_u
        rows = rows.to(state.device)
        order = torch.arange(rows.shape[0], device=rows.device)
        distinct, inverse = torch.unique(rows, return_inverse=True)
        last = torch.full_like(distinct, -1).scatter_reduce(0, inverse, order, "amax")
        state[:, distinct] = new[:, last].to(state.device, state.dtype)
        seen = state[:, rows].reshape(-1)
        seen = seen[torch.isfinite(seen)]
        if seen.numel():
            self._record(weight=seen.numel(), sogclr_mean_u=float(seen.exp().mean()),
                         sogclr_log_u_std=float(seen.std(correction=0)))

    def _record(self, weight: float = 1.0, **values: float) -> None:
        for k, v in values.items():
            acc = self._stats.setdefault(k, [0.0, 0.0])
            acc[0] += float(v) * weight
            acc[1] += weight

    def pop_diagnostics(self, reduce: Callable[[Tensor], Tensor] | None = None
                        ) -> dict[str, float]:
        """Means of the diagnostics recorded since the last call (WEINCE's per anchor, the
        temperature per step). ``reduce`` (e.g. a mean across ranks, whose anchors differ
        under the local loss) is applied to the sums and weights first; every rank must then
        call it, with the same loss."""
        keys = sorted(self._stats)
        sums = torch.tensor([self._stats[k] for k in keys], dtype=torch.float64).reshape(-1, 2)
        self._stats = {}
        if reduce is not None:
            sums = reduce(sums)
        return {k: float(s / w) for k, (s, w) in zip(keys, sums.tolist(), strict=True) if w > 0}
