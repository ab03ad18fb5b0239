"""Epoch batch samplers: which examples form each batch, in which order, on which rank.

Every sampler plans an epoch as a list of *global* batches of example indices (the batch
over which the softmax runs, across all ranks), deterministically from ``(seed, epoch)`` and
the sampler's inputs. The global batch is the unit of every composition rule: the
no-duplicates rule and the hard-batch grouping apply to it, never to one rank's share.

Sharding (``rank``, ``world_size``): each rank receives a disjoint, contiguous share of every
global batch, ``batch_size / world_size`` examples of a full batch (``batch_size`` must be a
multiple of ``world_size``), and all ranks step through the same batches together; the loss
gathers the shares (:mod:`batchscale.batching.distributed`). The last, partial global batch
(``drop_last=False``) is split with ``numpy.array_split``: the shares differ by at most one
example, and a rank gets an empty list when the batch has fewer examples than there are ranks.

``drop_last``: an epoch has ``N // batch_size`` full batches; the ``N % batch_size`` examples
that come last in the epoch's plan form one partial batch, yielded last (``drop_last=False``)
or skipped for this epoch (``drop_last=True``), or filled up to ``batch_size`` with examples
drawn at random from the rest of the epoch (``fill_last=True``: every step takes a whole
batch, so a budget of examples is met exactly). ``len(sampler)`` is the exact number of
batches of an epoch.

Epochs and resume: ``set_epoch(e)`` selects epoch ``e`` (a different epoch restarts at its
first batch; the current one keeps its position, so a resumed run may call it again).
``state_dict()`` holds the epoch, the number of batches of this epoch already handed out
(``position``) and the seed; after ``load_state_dict``, the next iteration continues at the
batch after the last one handed out. A later iteration of the same epoch starts over, as
torch's samplers do. With a multi-worker DataLoader the sampler runs ahead of training
(prefetching): pass the number of batches the trainer has consumed,
``state_dict(consumed=k)``. Samplers whose plan depends on the current model (BSC
shuffling) store the epoch's plan in the state, so the resumed epoch has the same batches.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from .no_duplicates import check_keys, no_duplicate_batches
from .text_keys import text_keys

#: The random stream of the examples that fill a short last batch (``fill_last``).
FILL_STREAM = 1000


def check_int(name: str, value: object, minimum: int) -> int:
    """An int (not a bool) >= minimum, or a ValueError naming the argument and value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of ``batch_size``, the last one possibly smaller."""
    return np.split(np.asarray(order, dtype=np.int64), range(batch_size, len(order), batch_size))


def flatten_plan(batches: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan as two int64 tensors (the ids in batch order, the batch sizes): how a plan goes
    into a checkpoint or crosses ranks."""
    flat = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    return torch.from_numpy(flat.astype(np.int64)), sizes


def split_plan(flat: object, sizes: object) -> list[np.ndarray]:
    """The inverse of :func:`flatten_plan`."""
    ids, counts = np.asarray(flat, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    if int(counts.sum()) != len(ids):
        raise ValueError(f"a plan of {len(ids)} ids does not match batch sizes summing to "
                         f"{int(counts.sum())}")
    return np.split(ids, np.cumsum(counts)[:-1])


class EpochBatchSampler(ABC):
    """Base of the samplers: epoch plans, exact length, sharding, state for resume.

    Subclasses implement :meth:`plan_epoch`. Usable as a DataLoader ``batch_sampler``.
    """

    #: True when the plan depends on something a resumed run cannot recompute (the model's
    #: embeddings at the start of the epoch): the plan then goes into ``state_dict``.
    plan_in_state: ClassVar[bool] = False

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        drop_last: bool = False,
        fill_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_examples = check_int("num_examples", num_examples, 0)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        for name, flag in (("drop_last", drop_last), ("fill_last", fill_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}")
        if drop_last and fill_last:
            raise ValueError("`drop_last` and `fill_last`: choose one way to treat the short "
                             "last batch")
        if fill_last and self.batch_size > self.num_examples:
            raise ValueError(f"`fill_last`: a batch of {self.batch_size} cannot be filled "
                             f"from {self.num_examples} examples without repeating one "
                             "inside the batch; use a smaller batch or more data")
        self.drop_last = drop_last
        self.fill_last = fill_last
        if self.rank >= self.world_size:
            raise ValueError(f"`rank` must be < world_size={world_size}, got {rank!r}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"`batch_size` ({batch_size}) must be a multiple of `world_size` ({world_size}): "
                "each rank takes an equal share of every global batch"
            )
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out
        self.plan_seconds = 0.0  # wall time of the last plan computation
        self.last_batch_size = 0  # size of the global batch whose share was yielded last
        self._resume_at = 0
        self._plan: list[np.ndarray] | None = None
        self._plan_epoch: int | None = None

    # -- planning ---------------------------------------------------------------------------

    @abstractmethod
    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches: every example exactly once, ``N // batch_size`` batches
        of ``batch_size`` then one of ``N % batch_size`` if not zero (never dropped here)."""

    def rng(self, epoch: int, stream: int = 0) -> np.random.Generator:
        """The generator of (seed, epoch, stream): independent streams for independent uses."""
        return np.random.default_rng([self.seed, epoch, stream])

    def global_batches(self) -> list[np.ndarray]:
        """The current epoch's global batches as yielded (after ``drop_last``), planned once."""
        if self._plan is None or self._plan_epoch != self.epoch:
            start = time.perf_counter()
            plan = self.plan_epoch(self.epoch)
            self.plan_seconds = time.perf_counter() - start
            self._check_plan(plan)
            if self.drop_last and self.num_examples % self.batch_size:
                plan = plan[:-1]
            elif self.fill_last and self.num_examples % self.batch_size:
                plan = [*plan[:-1], self._filled(plan[-1], self.epoch)]
            self._plan, self._plan_epoch = plan, self.epoch
        return self._plan

    def _filled(self, last: np.ndarray, epoch: int) -> np.ndarray:
        """The short last batch filled up to ``batch_size`` with examples drawn at random
        from the epoch's other batches (as torch's DistributedSampler pads), so that every
        step takes a whole batch: a few examples are seen twice in such an epoch."""
        others = np.setdiff1d(np.arange(self.num_examples), last, assume_unique=True)
        extra = self.rng(epoch, stream=FILL_STREAM).choice(others, self.batch_size - len(last),
                                                 replace=False)
        return np.concatenate([last, np.sort(extra)]).astype(np.int64)

    @property
    def planned(self) -> bool:
        """The current epoch's plan exists (computed, adopted or restored from a state)."""
        return self._plan is not None and self._plan_epoch == self.epoch

    def adopt_plan(self, batches: list[np.ndarray]) -> None:
        """Use ``batches`` (as :meth:`global_batches` returns them) as the current epoch's
        plan: under torchrun, rank 0 plans a model-dependent epoch and the others adopt it, so
        that every rank steps through the same batches."""
        sizes = [len(b) for b in batches]
        n, b = self.num_examples, self.batch_size
        short = [] if not n % b or self.drop_last else [b if self.fill_last else n % b]
        expected = [b] * (n // b) + short
        if sizes != expected:
            raise ValueError(f"adopt_plan: batch sizes {sizes[:5]}... do not fit {n} examples "
                             f"in batches of {b} (drop_last={self.drop_last})")
        self._plan = [np.asarray(x, dtype=np.int64) for x in batches]
        self._plan_epoch = self.epoch

    def _check_plan(self, plan: list[np.ndarray]) -> None:
        # Cheap (O(N)) and it guards the promises the trainer relies on: exact length, every
        # example exactly once.
        n, b = self.num_examples, self.batch_size
        sizes = [len(batch) for batch in plan]
        expected = [b] * (n // b) + ([n % b] if n % b else [])
        if sizes != expected:
            raise RuntimeError(f"{type(self).__name__} planned batch sizes {sizes[:5]}...")
        flat = np.concatenate(plan) if plan else np.zeros(0, dtype=np.int64)
        if n and (flat.min() < 0 or flat.max() >= n or np.bincount(flat, minlength=n).max() > 1):
            raise RuntimeError(f"{type(self).__name__} planned an example twice or out of range")

    # -- iteration --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (each rank yields this many, its shares of the global batches)."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def shard(self, batch: np.ndarray) -> list[int]:
        """This rank's share of a global batch."""
        if self.world_size == 1:
            return batch.tolist()
        if len(batch) == self.batch_size:
            per = self.batch_size // self.world_size
            return batch[self.rank * per : (self.rank + 1) * per].tolist()
        return np.array_split(batch, self.world_size)[self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        start, self._resume_at = self._resume_at, 0
        self.position = start
        for batch in batches[start:]:
            self.position += 1
            self.last_batch_size = len(batch)
            yield self.shard(batch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at its first batch."""
        epoch = check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._resume_at = 0

    # -- state ------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Epoch, position (batches handed out, or ``consumed``), seed, and the plan where it
        cannot be recomputed. Tensors and plain types only (``torch.load(weights_only=True)``)."""
        position = self.position if consumed is None else check_int("consumed", consumed, 0)
        if position > len(self):
            raise ValueError(f"`consumed` must be <= {len(self)} batches, got {consumed!r}")
        state: dict[str, Any] = {
            "sampler": type(self).__name__,
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "fill_last": self.fill_last,
        }
        if self.plan_in_state and self._plan is not None and self._plan_epoch == self.epoch:
            state["plan"], state["plan_sizes"] = flatten_plan(self._plan)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state: the next iteration continues after the last batch handed out."""
        if not isinstance(state, dict):
            raise ValueError(f"`state` must be a dict, got {type(state).__name__}")
        missing = {"sampler", "epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"`state` lacks {sorted(missing)}")
        if state["sampler"] != type(self).__name__:
            raise ValueError(f"`state` is for a {state['sampler']}, not a {type(self).__name__}")
        for name in ("num_examples", "batch_size", "drop_last", "fill_last"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"`state` has {name}={state[name]!r} but this sampler has "
                    f"{name}={getattr(self, name)!r}"
                )
        self.seed = check_int("state['seed']", state["seed"], 0)
        self.epoch = check_int("state['epoch']", state["epoch"], 0)
        position = check_int("state['position']", state["position"], 0)
        if position > len(self):
            raise ValueError(f"`state['position']` must be <= {len(self)}, got {position}")
        self.position = self._resume_at = position
        self._plan, self._plan_epoch = None, None
        if "plan" in state:
            try:
                plan = split_plan(state["plan"], state["plan_sizes"])
            except ValueError as err:
                raise ValueError(f"`state['plan']`: {err}") from None
            if len(plan) != len(self):
                raise ValueError(f"`state['plan']` has {len(plan)} batches, this sampler "
                                 f"{len(self)}")
            self._plan = plan
            self._plan_epoch = self.epoch


class RandomBatchSampler(EpochBatchSampler):
    """A fresh uniform permutation each epoch, cut into consecutive batches."""

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        return split_batches(self.rng(epoch).permutation(self.num_examples), self.batch_size)


class NoDuplicatesBatchSampler(EpochBatchSampler):
    """Random batches in which no text occurs twice (any column against any column).

    ``keys``: (N, C) int64 text keys (:func:`~batchscale.batching.text_keys.text_keys`), or
    build from texts with :meth:`from_texts`. Each epoch a random permutation is cut by
    :func:`~batchscale.batching.no_duplicates.no_duplicate_batches`, whose docstring states
    the guarantee: every example exactly once per epoch, duplicates only at the end of the
    epoch when unavoidable.
    """

    def __init__(self, keys: np.ndarray, batch_size: int, **options: Any) -> None:
        """``options``: those of :class:`EpochBatchSampler` (``drop_last``, ``fill_last``,
        ``seed``, ``rank``, ``world_size``)."""
        self.keys = check_keys(keys)
        super().__init__(len(self.keys), batch_size, **options)

    @classmethod
    def from_texts(
        cls,
        columns: Sequence[Sequence[str]],
        batch_size: int,
        *,
        across_columns: bool = True,
        **kwargs: Any,
    ) -> NoDuplicatesBatchSampler:
        """From text columns, e.g. ``[queries, answers]``."""
        return cls(text_keys(columns, across_columns=across_columns), batch_size, **kwargs)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        order = self.rng(epoch).permutation(self.num_examples)
        return no_duplicate_batches(order, self.keys, self.batch_size)
