"""The static encoder's training fast path: token ids cached per text, fed to the embedding
bag as flat ids + offsets, and sparse gradients. Each is checked against the padded
``tokenize`` path or a reference computed from the tokenizer's ids here."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from torch import Tensor

import batchscale.encoders.token_cache as token_cache
from batchscale.batching.gradient_cache import cached_backward, split_side
from batchscale.encoders import SentenceEncoder
from conftest import _WORDS

TEXTS = ["a man is playing a guitar", "the dog runs on the beach", "two women are eating",
         "a man is playing a guitar", "", "cells", "young people dancing and singing music " * 3,
         "the cat sitting on a red chair", "a child is cutting an onion", "what is this"]


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty process-wide cache registry, so that counts start at zero."""
    monkeypatch.setattr(token_cache, "_SHARED", OrderedDict())


@pytest.fixture
def static64(tiny_hf_dir, fresh_caches) -> SentenceEncoder:
    enc = SentenceEncoder.static(tiny_hf_dir).double()
    enc.train()
    return enc


def _reference(enc: SentenceEncoder, texts: list[str], max_length: int | None) -> Tensor:
    """Means of the table's rows of each text's token ids, straight from the tokenizer."""
    table = enc.st[0].embedding.weight
    rows = []
    for text in texts:
        ids = enc.tokenizer.encode(text, add_special_tokens=False).ids[:max_length]
        rows.append(table[ids].mean(0) if ids else table.new_zeros(table.shape[1]))
    return torch.stack(rows)


def _table_grad(enc: SentenceEncoder, features: dict[str, Tensor], weights: Tensor) -> Tensor:
    table = enc.st[0].embedding.weight
    table.grad = None
    emb = enc(features)
    (emb * weights).sum().backward()
    grad = table.grad.to_dense() if table.grad.is_sparse else table.grad
    table.grad = None
    return grad


@pytest.mark.parametrize("max_length", [None, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_bag_features_give_the_padded_paths_embeddings_and_gradients(static64, max_length,
                                                                      sparse):
    enc = static64
    bags = enc.training_features(TEXTS, max_length)
    padded = enc.tokenize(TEXTS, max_length)
    assert set(bags) == {"input_ids", "offsets"} and bags["input_ids"].ndim == 1
    weights = torch.randn(len(TEXTS), enc.dim, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    want = _table_grad(enc, padded, weights)  # the padded path, dense gradient
    enc.sparse_gradients = sparse
    with torch.no_grad():
        torch.testing.assert_close(enc(bags), _reference(enc, TEXTS, max_length),
                                   rtol=1e-12, atol=1e-12)
    got = _table_grad(enc, bags, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert want.abs().sum() > 0


def test_sparse_gradient_holds_only_the_batchs_tokens_once(static64):
    enc = static64
    enc.sparse_gradients = True
    table = enc.st[0].embedding.weight
    enc(enc.training_features(TEXTS)).sum().backward()
    grad = table.grad.coalesce()
    used = sorted({i for t in TEXTS for i in enc.tokenizer.encode(t, add_special_tokens=False).ids})
    assert table.grad.is_sparse and grad.indices()[0].tolist() == used
    assert table.grad._nnz() == len(used)  # one row per distinct token, not per occurrence


def test_sparse_gradients_need_a_static_encoder(tiny_encoder):
    with pytest.raises(ValueError, match="static encoder"):
        tiny_encoder.sparse_gradients = True


def _infonce(q: Tensor, a: Tensor) -> Tensor:
    q, a = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(a, dim=-1)
    return torch.nn.functional.cross_entropy(q @ a.T / 0.05, torch.arange(len(q)))


RULES = [{"chunk_size": 3}, {"chunk_size": 4, "sort_by_length": True}, {"max_tokens": 12}]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(map(str, r.items())))
@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_cache_splits_bags_as_the_padded_features(static64, rule, sparse):
    enc = static64
    rng = random.Random(1)
    queries = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 9))) for _ in range(10)]
    answers = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 9))) for _ in range(10)]
    padded = [enc.tokenize(t) for t in (queries, answers)]
    bags = [enc.training_features(t) for t in (queries, answers)]
    for p, b in zip(padded, bags, strict=True):  # the same rows in the same chunks
        assert [c.index.tolist() for c in split_side(p, **rule)] == \
            [c.index.tolist() for c in split_side(b, **rule)]
    table = enc.st[0].embedding.weight

    def run(sides: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        table.grad = None
        loss = cached_backward(enc, sides, _infonce, **rule)
        grad = table.grad.to_dense() if table.grad.is_sparse else table.grad.clone()
        table.grad = None
        return loss, grad

    want_loss, want_grad = run(padded)
    whole = _infonce(*(enc(p) for p in padded))  # one pass over the whole batch
    enc.sparse_gradients = sparse
    got_loss, got_grad = run(bags)
    torch.testing.assert_close(got_loss, whole.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_the_token_cache_is_shared_by_encoders_of_one_tokenizer(tiny_hf_dir, fresh_caches):
    a, b = SentenceEncoder.static(tiny_hf_dir), SentenceEncoder.static(tiny_hf_dir)
    assert a.token_cache is b.token_cache
    a.cache_texts(TEXTS)
    distinct = len(set(TEXTS))
    assert a.token_cache.tokenized == distinct
    b.training_features(TEXTS[::-1])
    b.training_features(TEXTS, max_length=2)  # truncation is applied on lookup
    assert b.token_cache.tokenized == distinct
    ids = b.token_cache.ids(TEXTS[:1])[0].tolist()
    assert ids == b.tokenizer.encode(TEXTS[0], add_special_tokens=False).ids


def test_cache_tokens_off_is_the_padded_path(tiny_hf_dir, fresh_caches):
    enc = SentenceEncoder.static(tiny_hf_dir)
    enc.cache_tokens = False
    enc.cache_texts(TEXTS)
    features = enc.training_features(TEXTS)
    assert set(features) == {"input_ids", "attention_mask"}
    assert enc.token_cache.tokenized == 0


def test_encode_reads_the_token_cache_and_equals_the_uncached_path(tiny_hf_dir, fresh_caches):
    enc = SentenceEncoder.static(tiny_hf_dir)
    plain = SentenceEncoder.static(tiny_hf_dir)
    plain.cache_tokens = False
    for max_length in (None, 3):
        want = plain.encode(TEXTS, max_length=max_length, show_progress=False)
        got = enc.encode(TEXTS, max_length=max_length, show_progress=False)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert enc.token_lengths(TEXTS, max_length) == plain.token_lengths(TEXTS, max_length)
    # evaluation points after the first tokenise nothing (the uncached encoder adds nothing)
    assert enc.token_cache.tokenized == len(set(TEXTS))
