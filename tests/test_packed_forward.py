"""The packed (unpadded) training forward of a transformer equals the padded one: the same
embeddings, loss and gradients (float64, dropout off), in the encoder and in a trainer
step; length buckets are the cheapest cut; a static encoder never takes the path."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from batchscale.encoders import SentenceEncoder, packing
from batchscale.encoders import encoder as encoder_module
from batchscale.training import Objective, Trainer, TrainingSet, config_from_dict
from conftest import _WORDS


def _texts(n: int, seed: int, longest: int = 30) -> list[str]:
    """Texts of 1 to ``longest`` words (widely spread lengths: several buckets)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, longest)))
            for _ in range(n)]


def _without_dropout(enc: SentenceEncoder) -> SentenceEncoder:
    for m in enc.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # BERT's attention reads its dropout module's p as well
    return enc


@pytest.fixture
def enc64(tiny_st_dir) -> SentenceEncoder:
    enc = _without_dropout(SentenceEncoder.load(tiny_st_dir, device="cpu").double())
    enc.train()
    return enc


def _padded(enc: SentenceEncoder, features: dict[str, Tensor]) -> Tensor:
    """The reference: sentence-transformers' own forward on the padded tensors."""
    return enc.st(dict(features))["sentence_embedding"]


def _loss_and_grads(enc: SentenceEncoder, embed) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Embeddings of two sides, a cosine-MSE loss and its gradients on every parameter."""
    enc.zero_grad(set_to_none=True)
    q, a = embed()
    target = torch.linspace(0, 1, len(q), dtype=q.dtype)
    loss = ((nn.functional.cosine_similarity(q, a) - target) ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return torch.cat([q, a]), loss.detach(), grads


def _assert_same(got: tuple, want: tuple) -> None:
    emb, loss, grads = got
    ref_emb, ref_loss, ref_grads = want
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert set(grads) == set(ref_grads) and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("call_cost", [0, packing.CALL_COST, 10**9])
def test_packed_forward_gives_the_padded_embeddings_loss_and_gradients(enc64, monkeypatch,
                                                                      call_cost):
    """One attention call per distinct length (0), the default cut, one call (10**9)."""
    monkeypatch.setattr(packing, "CALL_COST", call_cost)
    q_texts, a_texts = _texts(13, 0), _texts(13, 1)
    fq, fa = enc64.tokenize(q_texts), enc64.tokenize(a_texts)
    lengths = fq["attention_mask"].sum(1).numpy()
    assert len(set(lengths)) > 5 and lengths.min() < fq["attention_mask"].shape[1]
    buckets = packing.pack(fq["attention_mask"]).buckets
    if call_cost == 0:
        assert len(buckets) == len(set(lengths))
    elif call_cost == 10**9:
        assert len(buckets) == 1
    want = _loss_and_grads(enc64, lambda: (_padded(enc64, fq), _padded(enc64, fa)))
    got = _loss_and_grads(enc64, lambda: (enc64(fq), enc64(fa)))
    _assert_same(got, want)


def test_joined_sides_split_back_into_each_sides_embeddings(enc64):
    fq, fa = enc64.tokenize(_texts(7, 2, longest=6)), enc64.tokenize(_texts(7, 3))
    assert fq["input_ids"].shape[1] < fa["input_ids"].shape[1]  # joining pads a side
    joined = enc64.join_training_features([fq, fa])
    assert set(joined) == set(fq) and joined["input_ids"].shape == (14, fa["input_ids"].shape[1])
    want = _loss_and_grads(enc64, lambda: (_padded(enc64, fq), _padded(enc64, fa)))
    got = _loss_and_grads(enc64, lambda: enc64(joined).split([7, 7]))
    _assert_same(got, want)


def test_training_mode_packs_and_evaluation_keeps_the_padded_forward(enc64, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return packing.packed_forward(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "packed_forward", counted)
    features = enc64.tokenize(_texts(5, 4))
    assert enc64.packs_sequences
    enc64.train()
    enc64(features)
    assert len(calls) == 1
    enc64.eval()
    enc64(features)
    enc64.encode(_texts(5, 4), show_progress=False)
    assert len(calls) == 1


def test_a_static_encoder_never_packs(tiny_hf_dir, monkeypatch):
    monkeypatch.setattr(encoder_module, "packed_forward",
                        lambda *a, **k: pytest.fail("a static encoder took the packed path"))
    enc = SentenceEncoder.static(tiny_hf_dir)
    enc.train()
    assert not enc.packs_sequences
    for cache in (True, False):  # its bag features, and its padded ones
        enc.cache_tokens = cache
        sides = [enc.training_features(_texts(4, 5)), enc.training_features(_texts(4, 6))]
        assert enc.join_training_features(sides) is None
        enc(sides[0]).sum().backward()


def test_pack_refuses_left_padding_and_empty_texts():
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert packing.pack(right) is not None
    assert packing.pack(torch.tensor([[1, 1, 1], [0, 1, 1]])) is None
    assert packing.pack(torch.tensor([[1, 1, 1], [0, 0, 0]])) is None


def _brute_force_cost(lengths: np.ndarray, call_cost: int) -> float:
    """The cheapest cut of the length order into runs, by trying every cut."""
    ordered = np.sort(lengths)
    n, best = len(ordered), float("inf")
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            best = min(best, sum((j - i) * float(ordered[j - 1]) ** 2 + call_cost
                                 for i, j in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_are_the_cheapest_cut_and_cover_every_text(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 60, size=int(rng.integers(1, 10)))
    call_cost = int(rng.choice([0, 100, 512, 5000]))
    runs = packing.length_buckets(lengths, call_cost=call_cost)
    assert sorted(np.concatenate(runs).tolist()) == list(range(len(lengths)))
    cost = sum(len(r) * float(lengths[r].max()) ** 2 + call_cost for r in runs)
    assert cost == pytest.approx(_brute_force_cost(lengths, call_cost))


def _trainer(model_dir, tmp_path, loss: str, gradient_cache: dict | None) -> Trainer:
    config = config_from_dict({
        "model": {"name": str(model_dir)},
        "loss": {"name": loss},
        "train": {"batch_size": 6, "device": "cpu", "gradient_cache": gradient_cache},
    })
    q, a = _texts(12, 7), _texts(12, 8)
    data = TrainingSet(columns=(tuple(q), tuple(a)),
                       labels=tuple(i / 11 for i in range(12)))
    enc = _without_dropout(SentenceEncoder.load(model_dir, device="cpu").double())
    objective = Objective(config.loss, num_examples=len(data))
    return Trainer(enc, objective, data, config, tmp_path / "run", lambda e: {},
                   show_progress=False)


@pytest.mark.parametrize(("loss", "gradient_cache"), [("cosine_mse", None), ("infonce", None),
                                                      ("infonce", {"chunk_size": 4})])
def test_a_trainer_step_gives_the_padded_paths_loss_and_gradients(tiny_st_dir, tmp_path,
                                                                 monkeypatch, loss,
                                                                 gradient_cache):
    trainer = _trainer(tiny_st_dir, tmp_path, loss, gradient_cache)
    enc = trainer.encoder
    enc.train()
    indices = [5, 0, 11, 3, 8, 1]
    sides, labels = trainer.data.batch(indices)

    def step() -> tuple[Tensor, dict[str, Tensor]]:
        enc.zero_grad(set_to_none=True)
        value = trainer._backward(sides, labels, trainer.composition.false_negative_ids(
            indices), indices)
        return value, {n: p.grad.clone() for n, p in enc.named_parameters()
                       if p.grad is not None}

    calls = []
    monkeypatch.setattr(encoder_module, "packed_forward",
                        lambda *a, **k: calls.append(1) or packing.packed_forward(*a, **k))
    got_loss, got = step()
    assert calls  # the packed path ran
    with monkeypatch.context() as m:
        m.setattr(SentenceEncoder, "packs_sequences", property(lambda self: False))
        want_loss, want = step()
    # (the objective runs in float32 on the float64 embeddings, hence the tolerance)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert set(got) == set(want) and len(got) > 10
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-8, msg=name)


def test_packed_forward_runs_under_bfloat16_autocast(tiny_st_dir):
    """``train.bf16``: the packed forward under autocast stays near the padded one (bf16
    rounding apart) and has gradients."""
    enc = _without_dropout(SentenceEncoder.load(tiny_st_dir, device="cpu"))
    enc.train()
    features = enc.tokenize(_texts(9, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc(features)
        want = _padded(enc, features)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert all(p.grad is not None for p in enc.st[0].auto_model.encoder.parameters())
