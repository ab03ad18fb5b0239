"""Gradient cache against the computation that keeps the whole batch's graph in memory.

With dropout on, the reference encodes the same chunks with gradient, one after the other from
the same seed (so it draws the masks a plain step over those chunks draws), concatenates the
embeddings and back-propagates the loss through everything at once. With dropout off it is
one forward pass over the whole, unchunked and unpadded-trimmed, batch.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from batchscale.batching.chunking import split_inputs
from batchscale.batching.gradient_cache import cached_backward
from batchscale.losses import LearnableTemperature, bsc_loss, infonce_loss, weince_loss
from conftest import random_token_batch, tiny_mean_pooled_bert

SEQ = 16
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_bert(dtype: torch.dtype, dropout: float = 0.1) -> nn.Module:
    """A tiny random BERT with dropout, mean-pooled over the attention mask."""
    return tiny_mean_pooled_bert(dtype, seq=SEQ, dropout=dropout)


def token_batch(n: int, seed: int) -> dict[str, Tensor]:
    return random_token_batch(n, seed, seq=SEQ)


def loss_closure(name: str) -> Callable[..., Tensor]:
    if name == "bsc":
        return lambda q, a, n: bsc_loss(q, a, 0.1, hard_negatives=n)
    if name == "weince":
        return lambda q, a, n: weince_loss(q, a, 0.1, hard_negatives=n)
    if name == "infonce":  # no hard negatives: the third side is unused
        return lambda q, a: infonce_loss(q, a, 0.1)
    raise AssertionError(name)


def sides(m: int = 12) -> list[dict[str, Tensor]]:
    return [token_batch(m, 1), token_batch(m, 2), token_batch(m, 3)]


def grads(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out


def full_graph_reference(
    model: nn.Module, batch: list[dict[str, Tensor]], loss_fn, rule: dict, seed: int
) -> Tensor:
    """Plain autograd over the same chunks, all graphs alive at once."""
    torch.manual_seed(seed)
    embeddings = []
    for inputs in batch:
        chunks = split_inputs(inputs, **rule)
        emb = torch.cat([model(c.inputs) for c in chunks])
        order = torch.cat([c.index for c in chunks])
        embeddings.append(emb[torch.argsort(order)])
    loss = loss_fn(*embeddings)
    loss.backward()
    return loss.detach()


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> None:
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in got)
    assert worst <= tol, f"max |grad difference| {worst:.3g} > {tol}"


RULES = {
    "count": {"chunk_size": 5},
    "sorted": {"chunk_size": 5, "sort_by_length": True},
    "tokens": {"max_tokens": 40},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rule", ["count", "sorted", "tokens"])
@pytest.mark.parametrize("loss", ["bsc", "weince"])
def test_matches_full_graph_with_dropout(dtype: torch.dtype, rule: str, loss: str) -> None:
    model = tiny_bert(dtype).train()
    batch, loss_fn = sides(), loss_closure(loss)
    want_loss = full_graph_reference(model, batch, loss_fn, RULES[rule], seed=7)
    want = grads(model)
    after_reference = torch.rand(3)

    torch.manual_seed(7)
    got_loss = cached_backward(model, batch, loss_fn, **RULES[rule])
    after_cache = torch.rand(3)

    assert not got_loss.requires_grad
    assert float(got_loss) == pytest.approx(float(want_loss), rel=TOLERANCE[dtype])
    assert_close(grads(model), want, TOLERANCE[dtype])
    # Replaying the masks does not shift the random stream of what comes next.
    assert torch.equal(after_cache, after_reference)


def test_dropout_masks_are_what_makes_it_match() -> None:
    """The same comparison with the reference's masks drawn from another seed fails by far
    more than the tolerance: the equality above is the replay of the masks."""
    model = tiny_bert(torch.float64).train()
    batch, loss_fn = sides(), loss_closure("bsc")
    full_graph_reference(model, batch, loss_fn, RULES["count"], seed=8)
    other_seed = grads(model)
    torch.manual_seed(7)
    cached_backward(model, batch, loss_fn, **RULES["count"])
    got = grads(model)
    worst = max(float((got[k] - other_seed[k]).abs().max()) for k in got)
    assert worst > 1e-4


@pytest.mark.parametrize("rule", ["count", "sorted", "tokens"])
def test_dropout_off_matches_one_pass_over_the_whole_batch(rule: str) -> None:
    model = tiny_bert(torch.float64).eval()  # eval: no dropout, so no chunking reference
    batch, loss_fn = sides(), loss_closure("bsc")
    want_loss = loss_fn(*[model(inputs) for inputs in batch])
    want_loss.backward()
    want = grads(model)
    got_loss = cached_backward(model, batch, loss_fn, **RULES[rule])
    assert float(got_loss) == pytest.approx(want_loss.item(), rel=1e-12)
    assert_close(grads(model), want, 1e-10)


def test_chunks_given_as_a_list_and_a_learnable_temperature() -> None:
    """Pre-chunked sides, one encoder per side, a loss parameter and an unused side."""
    model = tiny_bert(torch.float64).eval()
    other = tiny_bert(torch.float64).eval()
    temperature = LearnableTemperature(0.1).double()
    q, a, _ = sides()

    def loss_fn(q_emb: Tensor, a_emb: Tensor, unused: Tensor) -> Tensor:
        return infonce_loss(q_emb, a_emb, temperature())

    loss_fn(model(q), other(a), model(q)).backward()
    want_model, want_other = grads(model), grads(other)
    want_tau = temperature.inverse_temperature.grad.clone()
    temperature.zero_grad()

    pieces = [{k: v[i : i + 4] for k, v in a.items()} for i in range(0, 12, 4)]
    cached_backward([model, other, model], [q, pieces, q], loss_fn, chunk_size=5)
    assert_close(grads(model), want_model, 1e-10)
    assert_close(grads(other), want_other, 1e-10)
    assert float(temperature.inverse_temperature.grad) == pytest.approx(float(want_tau), rel=1e-10)


def test_gradients_accumulate_over_calls() -> None:
    model = tiny_bert(torch.float64).eval()
    batch, loss_fn = sides(), loss_closure("bsc")
    loss_fn(*[model(inputs) for inputs in batch]).backward()
    want = {k: 2 * v for k, v in grads(model).items()}
    for _ in range(2):
        cached_backward(model, batch, loss_fn, chunk_size=4)
    assert_close(grads(model), want, 1e-10)


def test_without_grad_only_the_loss() -> None:
    model = tiny_bert(torch.float64).eval()
    batch, loss_fn = sides(), loss_closure("weince")
    with torch.no_grad():
        want = loss_fn(*[model(inputs) for inputs in batch])
        got = cached_backward(model, batch, loss_fn, max_tokens=30)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_split_by_count_keeps_order_and_trims_padding() -> None:
    inputs = token_batch(11, 4)
    chunks = split_inputs(inputs, chunk_size=4)
    assert [len(c) for c in chunks] == [4, 4, 3]
    assert torch.equal(torch.cat([c.index for c in chunks]), torch.arange(11))
    lengths = inputs["attention_mask"].sum(1)
    for c in chunks:
        width = int(lengths[c.index].max())
        assert c.inputs["input_ids"].shape == (len(c), width)
        assert torch.equal(c.inputs["input_ids"], inputs["input_ids"][c.index, :width])
        assert torch.equal(c.inputs["attention_mask"], inputs["attention_mask"][c.index, :width])


def test_split_by_token_budget_sorts_by_length_and_respects_the_budget() -> None:
    inputs = token_batch(30, 5)
    lengths = inputs["attention_mask"].sum(1)
    chunks = split_inputs(inputs, max_tokens=40)
    order = torch.cat([c.index for c in chunks])
    assert torch.equal(torch.sort(order).values, torch.arange(30))  # every row exactly once
    assert torch.all(lengths[order][:-1] >= lengths[order][1:])  # longest first
    for c in chunks:
        width = c.inputs["input_ids"].shape[1]
        assert width == int(lengths[c.index].max())
        assert len(c) * width <= 40
        assert torch.equal(c.inputs["input_ids"], inputs["input_ids"][c.index, :width])
    # Greedy: the next row would not have fitted into the chunk before it.
    for before in chunks[:-1]:
        assert (len(before) + 1) * before.inputs["input_ids"].shape[1] > 40


def test_split_by_count_sorted_by_length() -> None:
    inputs = token_batch(11, 4)
    lengths = inputs["attention_mask"].sum(1)
    chunks = split_inputs(inputs, chunk_size=4, sort_by_length=True)
    order = torch.cat([c.index for c in chunks])
    assert [len(c) for c in chunks] == [4, 4, 3]
    assert torch.equal(torch.sort(order).values, torch.arange(11))
    assert torch.all(lengths[order][:-1] >= lengths[order][1:])
    for c in chunks:
        width = int(lengths[c.index].max())
        assert torch.equal(c.inputs["input_ids"], inputs["input_ids"][c.index, :width])


def test_an_example_longer_than_the_budget_gets_its_own_chunk() -> None:
    inputs = token_batch(6, 6)
    chunks = split_inputs(inputs, max_tokens=1)
    assert [len(c) for c in chunks] == [1] * 6


def test_left_padding_is_kept() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    inputs = {"input_ids": mask * 5, "attention_mask": mask}
    (chunk,) = split_inputs(inputs, chunk_size=2)
    assert torch.equal(chunk.inputs["attention_mask"], mask)


@pytest.mark.parametrize(
    "rule, message",
    [
        ({}, "exactly one of"),
        ({"chunk_size": 4, "max_tokens": 10}, "exactly one of"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive integer, got 0"),
        ({"max_tokens": 2.5}, "`max_tokens` must be a positive integer, got 2.5"),
    ],
)
def test_bad_rule(rule: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_inputs(token_batch(4, 0), **rule)


def test_bad_inputs() -> None:
    model = tiny_bert(torch.float64).eval()
    batch = sides()
    with pytest.raises(ValueError, match="must return a 0-dim tensor"):
        cached_backward(model, batch, lambda q, a, n: torch.stack([q.sum(), a.sum()]), chunk_size=4)
    with pytest.raises(ValueError, match=r"must return a \(4, d\) tensor"):
        cached_backward(lambda x: model(x)[:2], batch, loss_closure("bsc"), chunk_size=4)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        split_inputs(
            {"input_ids": torch.ones(3, 2), "attention_mask": torch.ones(4, 2)}, chunk_size=2
        )
    with pytest.raises(ValueError, match="one callable per side"):
        cached_backward([model], batch, loss_closure("bsc"), chunk_size=4)


def test_an_encoder_that_writes_into_its_inputs_does_not_change_the_replay() -> None:
    """sentence-transformers stores outputs in the features dict; some poolings edit the mask."""
    model = tiny_bert(torch.float64).eval()
    batch, loss_fn = sides(), loss_closure("bsc")
    loss_fn(*[model(inputs) for inputs in batch]).backward()
    want = grads(model)

    def scribbler(inputs: dict[str, Tensor]) -> Tensor:
        emb = model(inputs)
        inputs["attention_mask"][:, 1:] = 0
        inputs["sentence_embedding"] = emb
        return emb

    cached_backward(scribbler, batch, loss_fn, chunk_size=5)
    assert_close(grads(model), want, 1e-10)
