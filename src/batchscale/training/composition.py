"""Batch composition in the trainer: which sampler, how it plans each epoch, what it costs and
what the batches look like.

``train.sampler`` picks the sampler (:mod:`batchscale.batching`). BSC's shuffling
(``bsc_knn``, ``bsc_kmeans``) regroups the data every epoch from the current model's
embeddings: those of the training forward passes of the previous epoch (kept, detached, in an
:class:`~batchscale.batching.EmbeddingCache`: no extra pass), or, when some example has none
yet (the first epoch, ``drop_last``), a fresh encoding of the queries in eval mode.
``bsc_shingle`` groups by a random word shingle (MinHash), no model needed.
Teacher-mined batches cluster a fixed model's embeddings once. The time spent
embedding and planning counts as training time, so throughput and time-to-target pay for it.

Under torchrun, rank 0 plans a model-dependent epoch and the other ranks adopt its plan, so
all ranks step through the same global batches.

Per epoch, a line in ``OUT/epochs.jsonl``: the sampler, the planning and embedding seconds,
the duplicate rate of the plan (examples whose text already occurs in their batch) and the
mean hardest in-batch negative cosine max_{j != i} cos(q_i, a_j) of the training embeddings,
over at most :data:`HARDEST_ANCHORS` anchors per batch (evenly spaced; exact below that).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..batching import (
    BSCShuffleSampler,
    EmbeddingCache,
    NoDuplicatesBatchSampler,
    RandomBatchSampler,
    ShingleShuffleSampler,
    TeacherHardBatchSampler,
    duplicate_stats,
    text_keys,
)
from ..batching.batch_stats import hardest_negatives
from ..batching.distributed import broadcast_tensor, gather_rows
from ..batching.false_negatives import batch_ids, unit_ids
from ..batching.samplers import EpochBatchSampler, flatten_plan, split_plan
from ..encoders import SentenceEncoder
from .config import RunConfig
from .examples import TrainingSet

#: Anchors per batch whose hardest negative is measured (each against the whole batch).
HARDEST_ANCHORS = 256
#: Samplers whose plan depends on a model's embeddings.
MODEL_SAMPLERS = frozenset({"bsc_knn", "bsc_kmeans", "teacher"})


def pair_embeddings(encoder: SentenceEncoder, data: TrainingSet, batch_size: int) -> np.ndarray:
    """One vector per pair, normalize(q) + normalize(a), L2-normalised (eval mode)."""
    q = encoder.encode(data.columns[0], batch_size=batch_size, show_progress=False,
                       normalize=True)
    a = encoder.encode(data.columns[1], batch_size=batch_size, show_progress=False,
                       normalize=True)
    return torch.nn.functional.normalize(q + a, dim=1).numpy()


def budgeted(config: RunConfig) -> bool:
    """The run stops at a budget of examples or steps (not after whole epochs)."""
    return config.train.max_examples is not None or config.train.max_steps is not None


class BatchComposition:
    """The trainer's sampler and its per-epoch planning, cache and statistics."""

    def __init__(self, config: RunConfig, data: TrainingSet, encoder: SentenceEncoder, *,
                 rank: int = 0, world_size: int = 1) -> None:
        t, h = config.train, config.train.hard_batches
        self.name = t.sampler
        self.data = data
        self.encoder = encoder
        self.embed_batch_size = config.eval.batch_size
        self.is_main = rank == 0
        self.distributed = world_size > 1
        self.keys = text_keys(data.columns)
        # One id per example and column; a candidate with its anchor's id is masked.
        units = (None if t.false_negatives == "none"
                 else unit_ids(data.columns, data.groups, t.false_negatives))
        self.units = None if units is None else torch.from_numpy(units).to(encoder.device)
        if t.duplicates == "text":
            rule_keys = self.keys
        else:  # the group rule's keys are the group units (computed once when they mask too)
            rule_keys = units if t.false_negatives == "group" else unit_ids(
                data.columns, data.groups, "group")
        # Under a budget of examples or steps every step takes a whole batch, so each cell
        # of a study sees its budget exactly.
        fill_last = budgeted(config) and not t.drop_last
        shard: dict[str, Any] = dict(drop_last=t.drop_last, fill_last=fill_last, seed=t.seed,
                                     rank=rank, world_size=world_size)
        grouping_keys = rule_keys if h.no_duplicates else None
        self.cache: EmbeddingCache | None = None
        if t.sampler == "no_duplicates":
            self.sampler: EpochBatchSampler = NoDuplicatesBatchSampler(
                rule_keys, t.batch_size, **shard)
        elif t.sampler in ("bsc_knn", "bsc_kmeans"):
            self.sampler = BSCShuffleSampler(
                len(data), t.batch_size, group_size=h.group_size,
                variant="knn" if t.sampler == "bsc_knn" else "kmeans",
                knn_candidates=h.knn_candidates, n_clusters=h.n_clusters, keys=grouping_keys,
                **shard)
            self.cache = EmbeddingCache(len(data), encoder.dim)
        elif t.sampler == "bsc_shingle":
            self.sampler = ShingleShuffleSampler(
                data.columns[:2], t.batch_size, group_size=h.group_size,
                shingle_size=h.shingle_size, keys=grouping_keys, **shard)
        elif t.sampler == "teacher":
            teacher = encoder if h.teacher is None else SentenceEncoder.load(
                h.teacher, device=encoder.device)
            x = pair_embeddings(teacher, data, self.embed_batch_size)
            self.sampler = TeacherHardBatchSampler(x, t.batch_size, keys=grouping_keys, **shard)
        else:
            self.sampler = RandomBatchSampler(len(data), t.batch_size, **shard)
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.plan_seconds = 0.0
        self.embed_seconds = 0.0
        self.duplicate_rate = float("nan")
        self.hardest_sum = 0.0
        self.hardest_count = 0

    # -- planning -------------------------------------------------------------------------
    def plan(self, epoch: int) -> float:
        """Plan ``epoch`` (a no-op when its plan exists, e.g. restored by a resume); returns
        the seconds it took, embedding included."""
        self.sampler.set_epoch(epoch)
        if self.sampler.planned:
            return 0.0
        resuming = self.sampler.position > 0  # this epoch's statistics came with the state
        start = time.perf_counter()
        embed_seconds = 0.0
        plan: list[np.ndarray] | None = None
        if self.is_main or self.name not in MODEL_SAMPLERS:
            if isinstance(self.sampler, BSCShuffleSampler):
                embed_seconds = self._set_current_embeddings()
            plan = self.sampler.global_batches()
        if self.distributed and self.name in MODEL_SAMPLERS:
            plan = self._share_plan(plan)
        seconds = time.perf_counter() - start
        if not resuming:
            self._reset_epoch()
            self.plan_seconds, self.embed_seconds = seconds, embed_seconds
            self.duplicate_rate = duplicate_stats(plan, self.keys).rate
        return seconds

    def _set_current_embeddings(self) -> float:
        assert isinstance(self.sampler, BSCShuffleSampler) and self.cache is not None
        if self.cache.coverage == 1.0:
            self.sampler.set_embeddings(self.cache.embeddings())
            self.cache.reset()
            return 0.0
        # A cold start encodes the queries alone: half the cost of both sides, and groups as
        # hard (benchmarks/shuffling.py: 0.453 against 0.455 with both sides).
        start = time.perf_counter()
        queries = self.encoder.encode(self.data.columns[0], batch_size=self.embed_batch_size,
                                      show_progress=False, normalize=True)
        self.sampler.set_embeddings(queries.numpy())
        self.cache.reset()
        return time.perf_counter() - start

    def _share_plan(self, plan: list[np.ndarray] | None) -> list[np.ndarray]:
        """Rank 0's plan on every rank."""
        flat, sizes = flatten_plan(plan) if plan is not None else (None, None)
        flat, sizes = broadcast_tensor(flat), broadcast_tensor(sizes)
        shared = split_plan(flat.cpu(), sizes.cpu())
        if not self.is_main:
            self.sampler.adopt_plan(shared)
        return shared

    # -- during the epoch -----------------------------------------------------------------
    def false_negative_ids(self, indices: list[int]) -> tuple[Tensor, Tensor] | None:
        """(query ids (m,), answer ids (m + m * k,): the answers', then the hard negatives')
        of a batch, as the losses take them; None when ``train.false_negatives: none``."""
        if self.units is None:
            return None
        return batch_ids(self.units, indices)

    @torch.no_grad()
    def observe(self, embeddings: list[Tensor]) -> None:
        """The current step's embeddings (this rank's share): cache and hardness statistic."""
        d = embeddings[0].shape[1]
        both = gather_rows(torch.cat([embeddings[0].detach(), embeddings[1].detach()], dim=1))
        if both.shape[0] < 2:
            return
        q, a = both[:, :d].float(), both[:, d:].float()
        rows = torch.linspace(0, q.shape[0] - 1, min(HARDEST_ANCHORS, q.shape[0])).long()
        values = hardest_negatives(q, a, rows=rows.unique())
        self.hardest_sum += float(values.sum())
        self.hardest_count += values.numel()
        if self.cache is not None:
            batch = self.sampler.global_batches()[self.sampler.position - 1]
            pair = torch.nn.functional.normalize(q, dim=1) + torch.nn.functional.normalize(a, dim=1)
            self.cache.update(batch, pair)

    def epoch_record(self, epoch: int, examples: int, complete: bool) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "examples": examples,
            "complete": complete,
            "sampler": self.name,
            "batches": self.sampler.position,
            "plan_seconds": self.plan_seconds,
            "embed_seconds": self.embed_seconds,
            "duplicate_rate": self.duplicate_rate,
            "hardest_negative": (self.hardest_sum / self.hardest_count
                                 if self.hardest_count else None),
        }

    # -- resume ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "plan_seconds": self.plan_seconds, "embed_seconds": self.embed_seconds,
            "duplicate_rate": self.duplicate_rate, "hardest_sum": self.hardest_sum,
            "hardest_count": self.hardest_count}
        if self.cache is not None and self.is_main:  # only rank 0 plans from it
            state["cache"] = self.cache.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        for key in ("plan_seconds", "embed_seconds", "duplicate_rate", "hardest_sum"):
            setattr(self, key, float(state[key]))
        self.hardest_count = int(state["hardest_count"])
        if self.cache is not None and "cache" in state:
            self.cache.load_state_dict(state["cache"])
