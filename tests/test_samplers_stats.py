"""Batch statistics against brute-force loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchscale.batching import batch_stats
from batchscale.batching.batch_stats import (
    duplicate_rate,
    duplicate_stats,
    epoch_hardest_negative,
    hardest_negatives,
    mean_hardest_negative,
)
from batchscale.batching.text_keys import text_keys


def cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def loop_hardest(q: np.ndarray, a: np.ndarray) -> list[float]:
    rows_q, rows_a = q.tolist(), a.tolist()
    return [
        max(cosine(rows_q[i], rows_a[j]) for j in range(len(rows_a)) if j != i)
        for i in range(len(rows_q))
    ]


@pytest.mark.parametrize("block", [4096, 3])
def test_hardest_negatives_equal_a_loop(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_stats, "_ROW_BLOCK", block)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((11, 5)) * rng.uniform(0.5, 3, (11, 1))  # not normalised
    a = rng.standard_normal((11, 5))
    got = hardest_negatives(torch.from_numpy(q), a)
    ref = loop_hardest(q, a)
    assert got.shape == (11,)
    assert np.allclose(got.numpy(), ref, atol=1e-6)
    assert mean_hardest_negative(q, a) == pytest.approx(sum(ref) / len(ref), abs=1e-6)


def test_hardest_negative_ignores_the_positive() -> None:
    q = np.eye(3)
    a = np.eye(3)  # every positive has cosine 1, every negative 0
    assert hardest_negatives(q, a).tolist() == [0.0, 0.0, 0.0]
    assert hardest_negatives(q[:1], a[:1]).numel() == 0
    assert math.isnan(mean_hardest_negative(q[:1], a[:1]))


def test_hardest_negative_is_detached() -> None:
    q = torch.randn(4, 3, requires_grad=True)
    assert not hardest_negatives(q, torch.randn(4, 3)).requires_grad


def test_epoch_hardest_negative_equals_a_loop() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((20, 4))
    a = rng.standard_normal((20, 4))
    batches = [[3, 1, 7], [0], [2, 4, 5, 6, 8, 9], list(range(10, 20))]
    values = []
    for batch in batches:
        if len(batch) > 1:
            values += loop_hardest(q[batch], a[batch])
    assert epoch_hardest_negative(batches, q, a) == pytest.approx(np.mean(values), abs=1e-6)


def test_duplicate_stats_equal_a_loop() -> None:
    rng = np.random.default_rng(2)
    queries = [f"t{int(i)}" for i in rng.integers(0, 15, 60)]
    answers = [
        f"t{int(i)}" if rng.random() < 0.3 else f"a{k}"
        for k, i in enumerate(rng.integers(0, 15, 60))
    ]
    answers[5] = queries[5]  # a self-pair is not a duplicate by itself
    keys = text_keys([queries, answers])
    order = rng.permutation(60)
    batches = [order[i : i + 8].tolist() for i in range(0, 60, 8)]
    duplicates, bad_batches = 0, 0
    for batch in batches:
        seen: set[str] = set()
        found = 0
        for i in batch:
            own = {queries[i], answers[i]}
            found += bool(own & seen)
            seen |= own
        duplicates += found
        bad_batches += found > 0
    stats = duplicate_stats(batches, keys)
    assert (stats.examples, stats.duplicates, stats.batches) == (60, duplicates, len(batches))
    assert stats.batches_with_duplicates == bad_batches
    assert duplicate_rate(batches, keys) == pytest.approx(duplicates / 60)
    assert stats.batch_rate == pytest.approx(bad_batches / len(batches))
    assert duplicates > 0  # the data has some, so the comparison means something


def test_duplicate_stats_edge_cases() -> None:
    keys = np.array([[1, 2], [3, 3], [1, 4]])
    assert duplicate_stats([[0, 1]], keys).duplicates == 0  # [3, 3]: a self-pair
    assert duplicate_stats([[0, 2], [1]], keys).duplicates == 1
    assert duplicate_stats([], keys).rate == 0.0
    with pytest.raises(ValueError, match="batches"):
        duplicate_stats([[0, 3]], keys)
    with pytest.raises(ValueError, match="queries"):
        hardest_negatives(np.zeros(3), np.zeros(3))


def test_the_batching_package_exports_what_it_lists():
    import batchscale.batching as batching

    missing = [name for name in batching.__all__ if not hasattr(batching, name)]
    assert missing == []
