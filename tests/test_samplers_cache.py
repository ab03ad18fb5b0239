"""The embedding cache that feeds BSC's per-epoch regrouping, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscale.batching.embedding_cache import EmbeddingCache


def test_cache_stores_normalised_rows_by_example_id() -> None:
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(6, 3)
    first = rng.standard_normal((4, 3))
    cache.update([5, 0, 2, 3], torch.from_numpy(first).requires_grad_())
    assert cache.coverage == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match=r"2 examples have no embedding yet \(e.g. \[1, 4\]\)"):
        cache.embeddings()
    second = rng.standard_normal((3, 3))
    cache.update(np.array([1, 4, 0]), second)  # example 0 again: the latest wins
    table = cache.embeddings()
    expected = {5: first[0], 2: first[2], 3: first[3], 1: second[0], 4: second[1], 0: second[2]}
    for i, row in expected.items():
        assert np.allclose(table[i], row / np.sqrt((row**2).sum()), atol=1e-6)
    cache.reset()
    assert cache.coverage == 0.0


def test_cache_rejects_bad_input() -> None:
    cache = EmbeddingCache(4, 2)
    with pytest.raises(ValueError, match="embeddings"):
        cache.update([0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="indices"):
        cache.update([0, 4], np.ones((2, 2)))
    with pytest.raises(ValueError, match="num_examples"):
        EmbeddingCache(0, 2)
