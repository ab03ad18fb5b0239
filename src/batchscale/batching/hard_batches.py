"""Samplers that put similar examples in the same batch (hard in-batch negatives).

:class:`BSCShuffleSampler` is BSC's "special shuffling" (Chernyavskiy, Ilvovsky, Kalinin,
Nakov, "Batch-Softmax Contrastive Loss for Pairwise Sentence Scoring Tasks", NAACL 2022,
arXiv 2110.15725), recomputed every epoch from the current model's embeddings: groups of
size ``s`` from each example's nearest unused neighbours (``variant="knn"``) or from k-means
cluster ids (``variant="kmeans"``), the group sequence reversed so the small, easy groups
come first, then cut into batches. :class:`TeacherHardBatchSampler` mines batches once from a
fixed (teacher) model's embeddings: clusters of mutually close examples fill whole batches.

Both cut the global batch (see :mod:`batchscale.batching.samplers` for sharding, length and
resume). With ``keys`` (text keys), the planned order is cut by the no-duplicates rule
(:func:`~batchscale.batching.no_duplicates.no_duplicate_batches`): nearest neighbours are
often copies of the same text, false negatives that the rule moves to a later batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from .grouping import (
    centroid_chain,
    check_embeddings,
    cluster_groups,
    kmeans,
    knn_groups,
    nearest_neighbours,
    pack_groups,
    teacher_batches,
)
from .no_duplicates import check_keys, no_duplicate_batches
from .samplers import EpochBatchSampler, check_int, split_batches
from .shingles import ShingleSets

Variant = Literal["knn", "kmeans"]
VARIANTS: tuple[str, ...] = ("knn", "kmeans")


def check_group_size(group_size: int, batch_size: int) -> int:
    """A group size that divides the batch size, so that whole groups fill a batch."""
    s = check_int("group_size", group_size, 1)
    if batch_size % s:
        raise ValueError(
            f"`group_size` ({group_size}) must divide `batch_size` ({batch_size}), so that "
            "whole groups fill a batch"
        )
    return s


def _cut(order: np.ndarray, keys: np.ndarray | None, batch_size: int) -> list[np.ndarray]:
    if keys is None:
        return split_batches(order, batch_size)
    return no_duplicate_batches(order, keys, batch_size)


class BSCShuffleSampler(EpochBatchSampler):
    """BSC's special shuffling, from embeddings of the current model given each epoch.

    Give the embeddings (N, d), L2-normalised, for each epoch before iterating it: either
    ``set_embeddings(x)`` or an ``embed`` callable that the sampler calls when it plans an
    epoch. They are used for one plan, then released. ``group_size`` (s, 8 in most of the
    paper's runs) must divide ``batch_size`` so that full groups tile a batch;
    ``knn_candidates`` (200-500 in the paper) neighbours per example are searched (exact
    ``IndexFlatIP`` unless ``exact_knn=False``); ``n_clusters`` (about 300) for k-means.

    The plan is stored in ``state_dict``, so a resumed run replays the epoch it stopped in
    without the embeddings of the model at that epoch's start. ``groups`` holds the last
    plan's groups, in creation order (before the reversal), ``labels`` its cluster ids.
    """

    plan_in_state = True

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        group_size: int = 8,
        variant: Variant = "knn",
        knn_candidates: int = 300,
        n_clusters: int = 300,
        exact_knn: bool = True,
        embed: Callable[[], np.ndarray] | None = None,
        keys: np.ndarray | None = None,
        **options: Any,  # EpochBatchSampler's: drop_last, fill_last, seed, rank, world_size
    ) -> None:
        super().__init__(num_examples, batch_size, **options)
        self.group_size = check_group_size(group_size, self.batch_size)
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.knn_candidates = check_int("knn_candidates", knn_candidates, 1)
        self.n_clusters = check_int("n_clusters", n_clusters, 1)
        self.exact_knn = bool(exact_knn)
        if embed is not None and not callable(embed):
            raise ValueError(f"`embed` must be callable, got {type(embed).__name__}")
        self.embed = embed
        self.keys = None if keys is None else check_keys(keys, self.num_examples)
        self.groups: list[np.ndarray] = []
        self.labels: np.ndarray | None = None  # the last plan's cluster ids (k-means variant)
        self._embeddings: np.ndarray | None = None

    def set_embeddings(self, embeddings: np.ndarray) -> None:
        """The current model's embeddings (N, d) for the next plan the sampler computes: the
        current epoch's if it is not planned (or restored from a state) yet, else the next
        epoch's. A plan, once made, is never replaced mid-epoch."""
        self._embeddings = check_embeddings(embeddings, self.num_examples)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        x = self._embeddings
        if x is None and self.embed is not None:
            x = check_embeddings(self.embed(), self.num_examples)
        if x is None:
            raise ValueError(
                f"BSCShuffleSampler needs the current embeddings to plan epoch {epoch}: call "
                "set_embeddings(x) first or pass `embed=`"
            )
        self._embeddings = None  # one plan per set of embeddings: the model moves on
        rng = self.rng(epoch)
        if self.variant == "knn":
            neighbours = nearest_neighbours(x, self.knn_candidates, exact=self.exact_knn)
            self.groups = knn_groups(neighbours, self.group_size, rng.permutation(len(x)),
                                     self.keys)
        else:
            seed = int(rng.integers(2**31 - 1))
            self.labels, _ = kmeans(x, self.n_clusters, seed=seed)
            self.groups = cluster_groups(self.labels, self.group_size, rng)
        return _cut(pack_groups(self.groups), self.keys, self.batch_size)


class ShingleShuffleSampler(EpochBatchSampler):
    """BSC's fast variant without a model: groups of examples that share a random word
    shingle (MinHash over word n-grams, :class:`~batchscale.batching.shingles.ShingleSets`),
    split at ``group_size``, a new hash each epoch; packed and cut as
    :class:`BSCShuffleSampler` does. Deterministic from the seed, the epoch and the texts."""

    def __init__(
        self,
        columns: Sequence[Sequence[str]],
        batch_size: int,
        *,
        group_size: int = 8,
        shingle_size: int = 2,
        keys: np.ndarray | None = None,
        **options: Any,  # EpochBatchSampler's: drop_last, fill_last, seed, rank, world_size
    ) -> None:
        self.shingles = ShingleSets(columns, shingle_size)
        super().__init__(len(self.shingles), batch_size, **options)
        self.group_size = check_group_size(group_size, self.batch_size)
        self.keys = None if keys is None else check_keys(keys, self.num_examples)
        self.labels: np.ndarray | None = None  # the last plan's group ids

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        self.labels = self.shingles.minhash(self.rng(epoch, stream=1))
        groups = cluster_groups(self.labels, self.group_size, self.rng(epoch))
        return _cut(pack_groups(groups), self.keys, self.batch_size)


class TeacherHardBatchSampler(EpochBatchSampler):
    """Hard batches mined once from a fixed model's embeddings (N, d), L2-normalised.

    Spherical k-means with ``n_clusters`` (default ``ceil(N / batch_size)``) clusters, computed
    at construction; each epoch (from ``seed`` and the epoch) a cluster's members are shuffled,
    whole batches come from single clusters and the remainders fill batches along a chain of
    neighbouring centroids (:func:`~batchscale.batching.grouping.teacher_batches`); batch
    order is random. ``labels`` and the chain go into ``state_dict`` (the clustering is not
    recomputed on resume).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        batch_size: int,
        *,
        n_clusters: int | None = None,
        kmeans_iterations: int = 20,
        keys: np.ndarray | None = None,
        **options: Any,  # EpochBatchSampler's: drop_last, fill_last, seed, rank, world_size
    ) -> None:
        x = check_embeddings(embeddings)
        super().__init__(len(x), batch_size, **options)
        if n_clusters is None:
            n_clusters = max(1, -(-len(x) // self.batch_size))
        self.keys = None if keys is None else check_keys(keys, self.num_examples)
        if len(x):
            self.labels, centroids = kmeans(
                x, n_clusters, seed=self.seed, iterations=kmeans_iterations
            )
            self.chain = centroid_chain(centroids, seed=self.seed)
        else:
            self.labels = self.chain = np.zeros(0, dtype=np.int64)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        batches = teacher_batches(self.labels, self.chain, self.batch_size, self.rng(epoch))
        if self.keys is None:
            return batches
        order = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        return no_duplicate_batches(order, self.keys, self.batch_size)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        state = super().state_dict(consumed)
        state["labels"] = torch.from_numpy(self.labels.astype(np.int64))
        state["chain"] = torch.from_numpy(self.chain.astype(np.int64))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "labels" in state:
            labels = np.asarray(state["labels"], dtype=np.int64)
            if labels.shape != (self.num_examples,):
                raise ValueError(f"`state['labels']` has shape {labels.shape}")
            self.labels = labels
            self.chain = np.asarray(state["chain"], dtype=np.int64)
