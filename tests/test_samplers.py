"""Random and no-duplicates samplers: coverage, exact length, sharding, resume, determinism.

References are written here independently: Python sets of the actual strings for the
duplicates rule, sorted index lists for coverage.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from batchscale.batching.no_duplicates import no_duplicate_batches
from batchscale.batching.samplers import NoDuplicatesBatchSampler, RandomBatchSampler
from batchscale.batching.text_keys import text_key, text_keys


def make_pairs(n: int, n_queries: int, seed: int) -> tuple[list[str], list[str]]:
    """Pairs whose queries repeat (drawn from ``n_queries`` texts) and whose answers sometimes
    equal a query text (a cross-column duplicate)."""
    rng = np.random.default_rng(seed)
    queries = [f"q{int(i)}" for i in rng.integers(0, n_queries, n)]
    answers = [
        f"q{int(rng.integers(0, n_queries))}" if rng.random() < 0.1 else f"a{i}" for i in range(n)
    ]
    return queries, answers


def texts_of(batch: list[int], columns: list[list[str]]) -> list[str]:
    return [column[i] for i in batch for column in columns]


def has_duplicate(batch: list[int], columns: list[list[str]]) -> bool:
    """Brute force: a text held by two different examples of the batch (an example whose
    query equals its own answer is not a duplicate)."""
    seen: set[str] = set()
    for i in batch:
        own = {column[i] for column in columns}
        if own & seen:
            return True
        seen |= own
    return False


def assert_covers_once(batches: list[list[int]], n: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(n))


# -- text keys ------------------------------------------------------------------------------


def test_text_keys_equal_texts_equal_keys() -> None:
    queries = ["a", "b", "a", "é"]
    answers = ["b", "c", "x", "é"]
    keys = text_keys([queries, answers])
    assert keys.shape == (4, 2) and keys.dtype == np.int64
    texts = queries + answers
    flat = list(keys[:, 0]) + list(keys[:, 1])
    for s, ks in zip(texts, flat, strict=True):
        for t, kt in zip(texts, flat, strict=True):
            assert (s == t) == (ks == kt)
    assert keys[0, 0] == text_key("a")  # stable: no per-process salt
    per_column = text_keys([queries, answers], across_columns=False)
    assert per_column[0, 1] != per_column[1, 0]  # "b" as answer vs "b" as query
    assert per_column[0, 0] == per_column[2, 0]


# -- no duplicates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "n_queries"), [(1000, 32, 400), (1003, 64, 900), (257, 16, 60)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_no_duplicates_covers_once_and_never_repeats(
    n: int, batch_size: int, n_queries: int, seed: int
) -> None:
    queries, answers = make_pairs(n, n_queries, seed)
    columns = [queries, answers]
    sampler = NoDuplicatesBatchSampler.from_texts(columns, batch_size, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-n // batch_size)
    assert_covers_once(batches, n)
    assert all(len(b) == batch_size for b in batches[:-1])
    # Each text has at most ~8 copies against >= 16 batches: the greedy never gets stuck.
    for batch in batches:
        assert not has_duplicate(batch, columns), sorted(Counter(texts_of(batch, columns)).items())


def test_no_duplicates_catches_cross_column_and_ignores_self_pairs() -> None:
    # Example 0's answer is example 1's query; example 2 is a self-pair (query == answer).
    queries = ["x", "y", "z", "w"]
    answers = ["y", "v", "z", "u"]
    batches = [
        b.tolist() for b in no_duplicate_batches(np.arange(4), text_keys([queries, answers]), 2)
    ]
    assert_covers_once(batches, 4)
    assert not any({0, 1} <= set(b) for b in batches)
    assert not any(has_duplicate(b, [queries, answers]) for b in batches)


def test_no_duplicates_unavoidable_spread_over_batches() -> None:
    # "same" is the query of 25 of 100 examples, 10 batches of 10: 15 duplicates at least
    # (at most one copy per batch is free), and no fewer are made.
    queries = ["same" if i % 4 == 0 else f"q{i}" for i in range(100)]
    answers = [f"a{i}" for i in range(100)]
    for seed in range(5):
        sampler = NoDuplicatesBatchSampler.from_texts([queries, answers], 10, seed=seed)
        batches = list(sampler)
        assert_covers_once(batches, 100)
        copies = [sum(queries[i] == "same" for i in b) for b in batches]
        assert sum(c - 1 for c in copies if c) == 15
        # Duplicates only at the end of the epoch: once a batch has one, all later do, and
        # there the copies are spread evenly.
        dup = [has_duplicate(b, [queries, answers]) for b in batches]
        first = dup.index(True)
        assert all(dup[first:])
        assert max(copies[first:]) - min(copies[first:]) <= 1


def test_no_duplicates_property_sweep() -> None:
    # Many shapes, from no repeats to one text in most examples: always exact sizes and every
    # example once.
    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(1, 400))
        batch_size = int(rng.integers(1, 40))
        distinct = int(rng.integers(1, 2 * n + 1))
        keys = np.stack([rng.integers(0, distinct, n), rng.integers(0, 3 * n, n)], axis=1)
        batches = [b.tolist() for b in no_duplicate_batches(rng.permutation(n), keys, batch_size)]
        sizes = [len(b) for b in batches]
        assert sizes == [batch_size] * (n // batch_size) + (
            [n % batch_size] if n % batch_size else []
        )
        assert_covers_once(batches, n)


def test_no_duplicates_free_when_copies_are_few() -> None:
    # Every query text has at most two copies (some answers equal another example's query),
    # and there are at least eight batches: the greedy keeps all copies apart.
    rng = np.random.default_rng(12)
    for trial in range(30):
        batch_size = int(rng.integers(2, 40))
        n = int(rng.integers(8 * batch_size, 12 * batch_size))
        base = [f"q{i}" for i in range(n)]
        twice = rng.choice(n, size=n // 3, replace=False)
        queries = [base[i] for i in rng.permutation(np.r_[np.arange(n - len(twice)), twice])[:n]]
        counts = Counter(queries)
        singles = [t for t, c in counts.items() if c == 1]
        answers = [f"a{i}" for i in range(n)]
        for i, t in enumerate(rng.choice(singles, size=min(len(singles), n // 10), replace=False)):
            if queries[i] != t:  # the answer becomes the second copy of a single query text
                answers[i] = str(t)
        columns = [queries, answers]
        copies = Counter(t for i in range(n) for t in {queries[i], answers[i]})
        assert max(copies.values()) == 2
        sampler = NoDuplicatesBatchSampler.from_texts(columns, batch_size, seed=trial)
        batches = list(sampler)
        assert_covers_once(batches, n)
        assert not any(has_duplicate(b, columns) for b in batches), trial


def test_no_duplicates_drop_last_and_exact_length() -> None:
    queries, answers = make_pairs(203, 150, 3)
    for drop_last in (False, True):
        sampler = NoDuplicatesBatchSampler.from_texts([queries, answers], 20, drop_last=drop_last)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (10 if drop_last else 11)
        assert all(len(b) == 20 for b in batches[:10])
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == (200 if drop_last else 203)


def test_no_duplicates_keeps_stream_order_without_duplicates() -> None:
    # No text repeats: the batches are the stream cut in order (nothing is deferred), except
    # the tail (two batches here), which holds the rest of the stream.
    keys = np.arange(50)[:, None]
    order = np.random.default_rng(0).permutation(50)
    batches = no_duplicate_batches(order, keys, 8)
    assert [len(b) for b in batches] == [8] * 6 + [2]
    assert np.array_equal(np.concatenate(batches[:-2]), order[:40])
    assert sorted(np.concatenate(batches[-2:])) == sorted(order[40:])


# -- random ---------------------------------------------------------------------------------


def test_random_sampler_is_a_permutation_cut_in_batches() -> None:
    sampler = RandomBatchSampler(103, 10, seed=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 11
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert_covers_once(batches, 103)


@pytest.mark.parametrize("cls", ["random", "nodup"])
def test_deterministic_for_seed_and_epoch(cls: str) -> None:
    queries, answers = make_pairs(300, 200, 0)

    def make(seed: int) -> RandomBatchSampler | NoDuplicatesBatchSampler:
        if cls == "random":
            return RandomBatchSampler(300, 16, seed=seed)
        return NoDuplicatesBatchSampler.from_texts([queries, answers], 16, seed=seed)

    a, b, c = make(7), make(7), make(8)
    assert list(a) == list(b)
    assert list(a) != list(c)
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0


# -- sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_splits_every_global_batch(drop_last: bool) -> None:
    queries, answers = make_pairs(250, 120, 1)
    world = 4
    keys = text_keys([queries, answers])
    ranks = [
        NoDuplicatesBatchSampler(keys, 16, seed=3, rank=r, world_size=world, drop_last=drop_last)
        for r in range(world)
    ]
    single = NoDuplicatesBatchSampler(keys, 16, seed=3, drop_last=drop_last)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(single) for p in per_rank)
    for step, global_batch in enumerate(single):
        shares = [p[step] for p in per_rank]
        assert [i for share in shares for i in share] == global_batch  # disjoint, in order
        if len(global_batch) == 16:
            assert all(len(share) == 4 for share in shares)
        else:  # the partial batch: shares differ by at most one
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert not has_duplicate(global_batch, [queries, answers])
    if not drop_last:
        assert_covers_once([i for p in per_rank for i in p], 250)


def test_sharding_requires_divisible_batch() -> None:
    with pytest.raises(ValueError, match="world_size"):
        RandomBatchSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        RandomBatchSampler(100, 8, rank=4, world_size=4)


# -- resume ---------------------------------------------------------------------------------


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_continues_with_next_batch(world_size: int) -> None:
    queries, answers = make_pairs(500, 300, 2)
    keys = text_keys([queries, answers])

    def make(rank: int) -> NoDuplicatesBatchSampler:
        return NoDuplicatesBatchSampler(keys, 32, seed=5, rank=rank, world_size=world_size)

    for rank in range(world_size):
        full = make(rank)
        full.set_epoch(2)
        expected = list(full)
        first = make(rank)
        first.set_epoch(2)
        it = iter(first)
        done = [next(it) for _ in range(6)]
        state = roundtrip(first.state_dict())
        assert state["epoch"] == 2 and state["position"] == 6

        resumed = make(rank)
        resumed.seed = 99  # the state's seed wins
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the trainer's loop calls it again: keeps the position
        rest = list(resumed)
        assert done + rest == expected
        # Next epoch starts from its first batch; a replay of an epoch starts over.
        resumed.set_epoch(3)
        assert len(list(resumed)) == len(resumed)
        assert list(resumed) == list(resumed)
    union = [i for b in expected for i in b]
    assert len(union) == len(set(union))


def test_resume_with_consumed_count_and_state_checks() -> None:
    sampler = RandomBatchSampler(100, 10, seed=1)
    it = iter(sampler)
    batches = [next(it) for _ in range(5)]  # a prefetching loader ran ahead of training
    state = sampler.state_dict(consumed=3)
    other = RandomBatchSampler(100, 10, seed=1)
    other.load_state_dict(state)
    assert list(other) == list(RandomBatchSampler(100, 10, seed=1))[3:]
    assert batches[3:5] == list(RandomBatchSampler(100, 10, seed=1))[3:5]
    with pytest.raises(ValueError, match="batch_size"):
        RandomBatchSampler(100, 20).load_state_dict(state)
    with pytest.raises(ValueError, match="NoDuplicatesBatchSampler"):
        NoDuplicatesBatchSampler(np.arange(100), 10).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed"):
        sampler.state_dict(consumed=11)


def test_works_as_dataloader_batch_sampler() -> None:
    data = torch.arange(50) * 10
    sampler = RandomBatchSampler(50, 8, seed=0)
    loader = DataLoader(data, batch_sampler=sampler)
    got = [b.tolist() for b in loader]
    assert got == [[10 * i for i in b] for b in RandomBatchSampler(50, 8, seed=0)]
    assert len(loader) == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 10, "batch_size": 0}, "batch_size"),
        ({"num_examples": -1, "batch_size": 4}, "num_examples"),
        ({"num_examples": 10, "batch_size": 4, "seed": -3}, "seed"),
        ({"num_examples": 10, "batch_size": 4, "drop_last": 1}, "drop_last"),
        ({"num_examples": 10, "batch_size": True}, "batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RandomBatchSampler(**kwargs)


def test_bad_keys_and_texts() -> None:
    with pytest.raises(ValueError, match="keys"):
        NoDuplicatesBatchSampler(np.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match="columns"):
        text_keys([["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="order"):
        no_duplicate_batches(np.array([0, 5]), np.arange(3), 2)
