"""Cut an ordered stream of examples into batches in which no text occurs twice.

In a batch softmax every other example's answer is a negative of a query; a copy of the
query's own text (or of its answer) among them is a false negative. sentence-transformers'
``NoDuplicatesBatchSampler`` avoids this with a per-example Python loop over the dataset, which
is slow at batches of 8,192 and more on millions of examples. Here the texts are int64 keys
(:mod:`batchscale.batching.text_keys`) and each candidate block is checked at once with numpy
(a sort finds the keys already in the batch and the repeats inside the block).

The rule (:func:`no_duplicate_batches`), for ``n`` examples and batch size ``B``:

* The batch sizes are fixed in advance: ``n // B`` batches of ``B``, then one of ``n % B``
  when it is not zero. Every example is in exactly one batch: none is lost, none repeated.
* Stream phase: batches are filled in stream order. An example whose text is already in the
  batch being filled is *deferred*: it waits in a first-in first-out queue, and each new
  batch first tries up to ``B`` deferred examples, then fresh ones from the stream. These
  batches are always duplicate-free.
* Tail phase, the last ``T`` batches: ``T`` is the fewest (at least ``tail_batches``, 2; at
  most a quarter of the batches or 8, whichever is more) such that no text has ``T`` or more
  copies in the part of the stream bound for them (:func:`tail_length`). The deferred and
  unread examples are grouped by their most repeated text, and each batch takes one example
  of each group, the groups with the most copies left first (falling back to a full scan),
  so copies spread over the remaining batches instead of piling up in the last one.
* A tail batch holds a repeated text only when it cannot be avoided from there on: some text
  has more copies left than there are batches left, or no remaining example can join the
  batch without one. From that batch on, everything left is dealt round-robin over the
  remaining batches, most repeated texts first, so the copies of a text are spread as evenly
  as the free places allow.

So duplicates happen only at the end of an epoch and only when the greedy cannot avoid them
(typically a text with more copies than there are batches). An example whose own columns
repeat a text (a query equal to its answer) is not a duplicate.
"""

from __future__ import annotations

from collections import deque

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)


def check_keys(keys: np.ndarray, num_examples: int | None = None) -> np.ndarray:
    """Keys as an (N, C) int64 array (a 1-D array is one column)."""
    arr = np.asarray(keys)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"`keys` must be an (N, C) integer array, got shape {arr.shape} dtype {arr.dtype}"
        )
    if num_examples is not None and arr.shape[0] != num_examples:
        raise ValueError(f"`keys` has {arr.shape[0]} rows for {num_examples} examples")
    return arr.astype(np.int64, copy=False)


def distinct_mask(keys: np.ndarray) -> np.ndarray:
    """(N, C) bool: True where a key is the first of its value in its row, so that an example
    whose query equals its answer does not clash with itself."""
    mask = np.ones(keys.shape, dtype=bool)
    for c in range(1, keys.shape[1]):
        mask[:, c] = ~(keys[:, :c] == keys[:, c : c + 1]).any(axis=1)
    return mask


class _Fifo:
    """A queue of example ids kept as numpy chunks (amortised O(1) per id)."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, ids: np.ndarray) -> None:
        if len(ids):
            self._chunks.append(ids)
            self._size += len(ids)

    def pop(self, count: int) -> np.ndarray:
        out: list[np.ndarray] = []
        while count > 0 and self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > count:
                self._chunks.appendleft(chunk[count:])
                chunk = chunk[:count]
            out.append(chunk)
            count -= len(chunk)
            self._size -= len(chunk)
        return np.concatenate(out) if out else _EMPTY

    def drain(self) -> np.ndarray:
        return self.pop(self._size)


class _Batch:
    """A batch being filled: its members and the keys they hold."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.members: list[np.ndarray] = []
        self.keys = _EMPTY
        self.count = 0

    @property
    def need(self) -> int:
        return self.size - self.count

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        if len(ids):
            self.members.append(ids)
            self.keys = np.sort(np.concatenate([self.keys, keys]))  # sorted: binary search
            self.count += len(ids)

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` the batch holds (faster than np.isin, which re-sorts both)."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys

    def ids(self) -> np.ndarray:
        return np.concatenate(self.members) if self.members else _EMPTY


class _Packer:
    """The greedy filler over fixed keys."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self.valid = distinct_mask(keys)

    def flat_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distinct keys of ``ids`` flattened, and the position in ``ids`` of each."""
        rows, cols = np.nonzero(self.valid[ids])
        return self.keys[ids[rows], cols], rows

    def clean(self, cand: np.ndarray, batch: _Batch) -> np.ndarray:
        """Positions in ``cand`` (ascending, at most ``batch.need``) of the candidates that can
        join the batch: no key already in it, and no key shared with an earlier candidate that
        could join. The first admissible candidate always qualifies, so a scan that finds none
        proves every candidate clashes with the batch."""
        if len(cand) == 0 or batch.need == 0:
            return _EMPTY
        flat, rows = self.flat_keys(cand)
        bad = np.zeros(len(cand), dtype=bool)
        bad[rows[batch.holds(flat)]] = True
        keep = ~bad[rows]
        flat, rows = flat[keep], rows[keep]
        if len(flat):
            # A stable sort keeps stream order among equal keys: the first copy stays.
            order = np.argsort(flat, kind="stable")
            ordered = flat[order]
            repeat = np.zeros(len(ordered), dtype=bool)
            repeat[1:] = ordered[1:] == ordered[:-1]
            bad[rows[order[repeat]]] = True
        return np.flatnonzero(~bad)[: batch.need]

    def admit(self, cand: np.ndarray, batch: _Batch) -> np.ndarray:
        """Add what can join from ``cand`` to the batch; return the rest, in order."""
        take = self.clean(cand, batch)
        if len(take):
            ids = cand[take]
            batch.add(ids, self.flat_keys(ids)[0])
            return np.delete(cand, take)
        return cand

    def fill_from_pool(self, batch: _Batch, pool: np.ndarray, window: int) -> np.ndarray:
        """Fill the batch from the whole pool, scanned in windows, until it is full or a full
        pass admits nothing; return what is left of the pool, in order."""
        while batch.need and len(pool):
            before = batch.count
            rest: list[np.ndarray] = []
            for start in range(0, len(pool), window):
                if batch.need == 0:
                    rest.append(pool[start:])
                    break
                rest.append(self.admit(pool[start : start + window], batch))
            pool = np.concatenate(rest) if rest else _EMPTY
            if batch.count == before:
                break
        return pool

    def most_repeated(self, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each example of ``pool``: how many examples of the pool hold its most repeated
        key, and that key (the smallest one on ties)."""
        flat, rows = self.flat_keys(pool)
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        count = counts[inverse]
        top_count = np.zeros(len(pool), dtype=np.int64)
        np.maximum.at(top_count, rows, count)
        is_top = count == top_count[rows]
        top_key = np.full(len(pool), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(top_key, rows[is_top], flat[is_top])
        return top_count, top_key

    def deal(self, pool: np.ndarray, capacities: list[int]) -> list[np.ndarray]:
        """Spread ``pool`` over batches with these free places: sorted by their most repeated
        key (most repeated first), examples are dealt round-robin, so the copies of one text go
        to different batches as long as there are batches left."""
        top_count, top_key = self.most_repeated(pool)
        items = pool[np.lexsort((np.arange(len(pool)), top_key, -top_count))]
        caps = np.asarray(capacities, dtype=np.int64)
        # Slot r of batch b for r < capacity_b, visited round by round.
        slot_batch = np.repeat(np.arange(len(caps)), caps)
        slot_round = np.arange(len(slot_batch)) - np.repeat(np.cumsum(caps) - caps, caps)
        dealt_to = slot_batch[np.lexsort((slot_batch, slot_round))]
        by_batch = np.argsort(dealt_to, kind="stable")
        return np.split(items[by_batch], np.cumsum(caps)[:-1])


class _RunQueue:
    """The tail's examples grouped by their most repeated key into runs. A batch takes run
    heads (at most one example per run), the runs with the most copies left first, so each
    batch takes one copy of every frequent text before any rare one: the copies spread over
    the remaining batches."""

    def __init__(self, packer: _Packer, pool: np.ndarray) -> None:
        top_count, top_key = packer.most_repeated(pool)
        order = np.lexsort((np.arange(len(pool)), top_key, -top_count))
        self.pool = pool[order]
        run_key = top_key[order]
        self.start = (
            np.flatnonzero(np.r_[True, run_key[1:] != run_key[:-1]]) if len(pool) else _EMPTY
        )
        self.length = np.diff(np.r_[self.start, len(pool)])
        self.taken = np.zeros(len(self.start), dtype=np.int64)
        self.active = np.arange(len(self.start))  # runs not yet exhausted, in priority order

    def fill(self, packer: _Packer, batch: _Batch, window: int) -> None:
        # Most copies left first; among equals, those not served lately (the stable sort keeps
        # the previous order, in which the runs just served fell behind).
        left = self.length[self.active] - self.taken[self.active]
        dtype = np.int16 if len(left) and left.max() < 2**15 else np.int64  # radix sort
        self.active = self.active[np.argsort(-left.astype(dtype), kind="stable")]
        scanned = 0
        while batch.need and scanned < len(self.active):
            runs = self.active[scanned : scanned + window]
            scanned += len(runs)
            heads = self.start[runs] + self.taken[runs]
            take = packer.clean(self.pool[heads], batch)
            if len(take):
                ids = self.pool[heads[take]]
                batch.add(ids, packer.flat_keys(ids)[0])
                self.taken[runs[take]] += 1
        scanned_runs = self.active[:scanned]
        done = self.taken[scanned_runs] >= self.length[scanned_runs]
        if done.any():
            self.active = np.concatenate([scanned_runs[~done], self.active[scanned:]])

    def most_left(self) -> int:
        """The most copies any run still holds."""
        runs = self.active
        return int((self.length[runs] - self.taken[runs]).max()) if len(runs) else 0

    def rest(self) -> np.ndarray:
        """The examples not taken yet, in run order."""
        run_of = np.repeat(np.arange(len(self.start)), self.length)
        within = np.arange(len(self.pool)) - np.repeat(self.start, self.length)
        return self.pool[within >= self.taken[run_of]]


def tail_length(
    stream: np.ndarray, packer: _Packer, sizes: list[int], minimum: int, maximum: int
) -> int:
    """How many of the last batches form the tail: the fewest T >= ``minimum`` such that no
    text has T or more copies among the stream's examples bound for the last T batches (one
    batch to spare for deferred copies), at most ``maximum``."""
    maximum = min(max(minimum, maximum), len(sizes))
    span = min(maximum, max(4 * minimum, 8))
    while True:
        # Look at the last `span` batches of the stream only (most streams need few).
        region = stream[len(stream) - sum(sizes[len(sizes) - span :]) :]
        flat, rows = packer.flat_keys(region)
        # Copies of its text at or after each position (1 for the last copy), per example.
        order = np.lexsort((-rows, flat))
        ordered = flat[order]
        new = np.r_[True, ordered[1:] != ordered[:-1]]
        first = np.maximum.accumulate(np.where(new, np.arange(len(ordered)), 0))
        copies_after = np.zeros(len(region) + 1, dtype=np.int64)
        np.maximum.at(copies_after, rows[order], np.arange(len(ordered)) - first + 1)
        suffix_max = np.maximum.accumulate(copies_after[::-1])[::-1]
        for t in range(minimum, span):
            if suffix_max[len(region) - sum(sizes[len(sizes) - t :]) if t else -1] < t:
                return t
        if span >= maximum:
            return maximum
        span = min(maximum, 2 * span)


def no_duplicate_batches(
    order: np.ndarray,
    keys: np.ndarray,
    batch_size: int,
    *,
    tail_batches: int = 2,
    window: int | None = None,
) -> list[np.ndarray]:
    """Batches of the examples of ``order`` (a permutation of a subset of the rows of ``keys``,
    taken as the stream), none holding a key twice unless unavoidable at the end (see the
    module's docstring for the exact rule). All batches have ``batch_size`` examples except the
    last, which has ``len(order) % batch_size`` when that is not zero. ``tail_batches``: the
    fewest batches of the tail (see :func:`tail_length`; at most max(a quarter, 8))."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if isinstance(tail_batches, bool) or not isinstance(tail_batches, int) or tail_batches < 0:
        raise ValueError(f"`tail_batches` must be an integer >= 0, got {tail_batches!r}")
    keys = check_keys(keys)
    order = np.asarray(order, dtype=np.int64)
    if order.ndim != 1:
        raise ValueError(f"`order` must be 1-D, got shape {order.shape}")
    n = len(order)
    if n and (order.min() < 0 or order.max() >= len(keys)):
        raise ValueError(f"`order` holds ids outside [0, {len(keys)}) (the rows of `keys`)")
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    window = window or max(2 * batch_size, 4096)
    packer = _Packer(keys)
    batches: list[np.ndarray] = []
    deferred = _Fifo()
    ptr = 0
    current: _Batch | None = None
    tail = tail_length(order, packer, sizes, tail_batches, max(-(-len(sizes) // 4), 8))
    # Phase 1, the stream: deferred examples first, then fresh ones, in stream order.
    while ptr < n and len(batches) < len(sizes) - tail:
        current = _Batch(sizes[len(batches)])
        fresh = order[ptr : ptr + current.size]
        ptr += len(fresh)
        cand = np.concatenate([deferred.pop(current.size), fresh])
        while True:
            deferred.push(packer.admit(cand, current))
            if current.need == 0 or ptr >= n:
                break
            cand = order[ptr : ptr + current.need]
            ptr += len(cand)
        if current.need:
            break  # the stream ran out while this batch was filling
        batches.append(current.ids())
        current = None
    # Phase 2, the tail: the deferred and unread examples, most repeated texts first.
    queue = _RunQueue(packer, np.concatenate([deferred.drain(), order[ptr:]]))
    while len(batches) < len(sizes):
        if current is None:
            current = _Batch(sizes[len(batches)])
        if queue.most_left() > len(sizes) - len(batches):
            # More copies of a text than batches left: duplicates are unavoidable, so spread
            # everything left evenly now rather than after the rare texts are used up.
            dealt = packer.deal(queue.rest(), [current.need, *sizes[len(batches) + 1 :]])
            batches.append(np.concatenate([current.ids(), dealt[0]]))
            batches.extend(dealt[1:])
            break
        queue.fill(packer, current, window)
        if current.need:
            # Run heads are exhausted or clash: scan every remaining example.
            rest = packer.fill_from_pool(current, queue.rest(), window)
            if current.need:
                # Stuck: every remaining example clashes with this batch.
                dealt = packer.deal(rest, [current.need, *sizes[len(batches) + 1 :]])
                batches.append(np.concatenate([current.ids(), dealt[0]]))
                batches.extend(dealt[1:])
                break
            queue = _RunQueue(packer, rest)
        batches.append(current.ids())
        current = None
    if sum(len(b) for b in batches) != n:  # pragma: no cover - an internal bug
        raise RuntimeError("no_duplicate_batches lost or repeated examples")
    return batches
