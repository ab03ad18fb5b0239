"""Softmax blocks (``softmax_batch=N``): the batch of B pairs as B / N independent batch
softmaxes, averaged. The blocked loss is the mean of separate calls, one per block (float64,
loss and gradients), on the dense and the tiled path; N = B is the plain loss; under two
gloo ranks the Objective with blocks equals one process, locally and globally, with blocks
inside a rank's share and blocks across ranks."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from batchscale.losses import bsc_loss, bsc_mse_loss, infonce_loss, weince_loss
from batchscale.losses.blocks import PairInputs
from ranks import run_ranks

HERE = Path(__file__).resolve()
TOL = 1e-10


def _case(m: int, k: int, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = q + 0.8 * torch.randn(m, d, generator=g, dtype=torch.float64)
    h = torch.randn(m * k, d, generator=g, dtype=torch.float64) if k else None
    scores = torch.rand(m, generator=g, dtype=torch.float64)
    query_ids = torch.randint(0, max(2, m // 3), (m,), generator=g)
    answer_ids = torch.randint(0, max(2, m // 3), (m + m * k,), generator=g)
    return q, a, h, scores, query_ids, answer_ids


def _loss_and_grads(fn, q, a, h, **kwargs):
    """The loss and its gradients with respect to q, a (and the hard negatives)."""
    leaves = [x.clone().requires_grad_(True) for x in (q, a) + ((h,) if h is not None else ())]
    hard = leaves[2] if h is not None else None
    loss = fn(leaves[0], leaves[1], hard_negatives=hard, **kwargs)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _separate_blocks(fn, q, a, h, n, *, per_pair: dict, k: int, **kwargs):
    """The mean of ``fn`` called once per block of n pairs, with the block's slice of every
    per-pair argument, written out independently of the library's split."""
    m = q.shape[0]
    total = 0.0
    for s in range(0, m, n):
        block = {}
        for name, v in per_pair.items():
            if name == "answer_ids":
                block[name] = torch.cat([v[s : s + n], v[m + s * k : m + (s + n) * k]])
            else:
                block[name] = v[s : s + n]
        hard = h[s * k : (s + n) * k] if h is not None else None
        total = total + fn(q[s : s + n], a[s : s + n], hard_negatives=hard, **block, **kwargs)
    return total / (m // n)


LOSSES = {
    "bsc": (bsc_loss, {"directions": "both"}),
    "bsc_q->a": (bsc_loss, {"directions": "q->a"}),
    "bsc_a->q": (bsc_loss, {"directions": "a->q"}),
    "infonce": (infonce_loss, {}),
    "weince": (weince_loss, {"directions": "both"}),
    "weince_a->q": (weince_loss, {"directions": "a->q"}),
}


@pytest.mark.parametrize("tile", [None, 3], ids=["dense", "tiled"])
@pytest.mark.parametrize(("m", "n", "k"), [(12, 4, 2), (24, 8, 1), (16, 2, 0), (18, 6, 3)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_blocked_loss_is_the_mean_of_the_blocks(name: str, m: int, n: int, k: int,
                                                tile: int | None) -> None:
    fn, options = LOSSES[name]
    q, a, h, scores, query_ids, answer_ids = _case(m, k, seed=m + n + k)
    per_pair = {"labels": scores, "answer_ids": answer_ids}
    if fn is not infonce_loss:
        per_pair["query_ids"] = query_ids
    kwargs = dict(options, tile_size=tile, label_threshold=0.3)
    fn_tau = functools.partial(fn, temperature=0.1)
    got, got_grads = _loss_and_grads(fn_tau, q, a, h, softmax_batch=n, **per_pair, **kwargs)
    want, want_grads = _loss_and_grads(
        lambda q_, a_, hard_negatives: _separate_blocks(
            fn_tau, q_, a_, hard_negatives, n, per_pair=per_pair, k=k, **kwargs),
        q, a, h)
    assert abs(float(got) - float(want)) <= TOL
    for g, w in zip(got_grads, want_grads, strict=True):
        assert float((g - w).abs().max()) <= TOL
    # Blocks change the loss: every anchor lost most of its negatives.
    whole = fn_tau(q, a, hard_negatives=h, **per_pair, **kwargs)
    assert abs(float(whole) - float(got)) > 1e-6


@pytest.mark.parametrize("tile", [None, 4], ids=["dense", "tiled"])
def test_tiled_blocks_equal_dense_blocks_and_three_d_negatives(tile) -> None:
    q, a, h, scores, query_ids, answer_ids = _case(18, 2, seed=5)
    kwargs = dict(hard_negatives=h.reshape(18, 2, -1), labels=scores, label_threshold=0.5,
                  query_ids=query_ids, answer_ids=answer_ids, softmax_batch=6)
    dense = bsc_loss(q, a, 0.07, tile_size=None, **kwargs)
    assert abs(float(bsc_loss(q, a, 0.07, tile_size=tile, **kwargs)) - float(dense)) <= TOL
    flat = dict(kwargs, hard_negatives=h)
    assert abs(float(bsc_loss(q, a, 0.07, tile_size=tile, **flat)) - float(dense)) <= TOL


def test_plain_dense_blocks_take_one_batched_pass(monkeypatch) -> None:
    """BSC / InfoNCE on the dense path: one stacked pass, no loop over blocks (whose results
    the other tests compare it with); WEINCE and tiles: one call per block."""
    from batchscale.losses import blocks, pair_loss

    looped = []
    real = blocks.over_blocks
    monkeypatch.setattr(pair_loss, "over_blocks",
                        lambda *args: looped.append(args[1]) or real(*args))
    q, a, h, *_ = _case(12, 1, seed=6)
    bsc_loss(q, a, hard_negatives=h, softmax_batch=4, tile_size=None)
    infonce_loss(q, a, hard_negatives=h, softmax_batch=4)
    assert looped == []
    bsc_loss(q, a, hard_negatives=h, softmax_batch=4, tile_size=2)
    weince_loss(q, a, hard_negatives=h, softmax_batch=6, tile_size=None)
    assert looped == [4, 6]


def test_coord_normalization_is_per_block() -> None:
    q, a, h, *_ = _case(12, 1, seed=2)
    got = bsc_loss(q, a, 1.0, normalization="coord", hard_negatives=h, softmax_batch=6)
    want = (bsc_loss(q[:6], a[:6], 1.0, normalization="coord", hard_negatives=h[:6])
            + bsc_loss(q[6:], a[6:], 1.0, normalization="coord", hard_negatives=h[6:])) / 2
    assert abs(float(got) - float(want)) <= TOL


def test_weince_stats_cover_every_block() -> None:
    q, a, h, *_ = _case(40, 2, seed=7)
    loss, stats = weince_loss(q, a, 0.1, hard_negatives=h, softmax_batch=20,
                              return_stats=True)
    parts = [weince_loss(q[s : s + 20], a[s : s + 20], 0.1, hard_negatives=h[2 * s : 2 * s + 40],
                         return_stats=True) for s in (0, 20)]
    assert abs(float(loss) - float(sum(p[0] for p in parts) / 2)) <= TOL
    assert stats.anchors == sum(p[1].anchors for p in parts) == 80
    want_lambda = sum(p[1].mean_lambda * p[1].anchors for p in parts) / 80
    assert stats.mean_lambda == pytest.approx(want_lambda, abs=1e-12)
    assert stats.weibull_share == pytest.approx(
        sum(p[1].weibull_share * p[1].anchors for p in parts) / 80, abs=1e-12)


def test_bsc_mse_blocks() -> None:
    q, a, h, scores, *_ = _case(16, 1, seed=3)
    got = bsc_mse_loss(q, a, scores, 0.1, mu=0.3, hard_negatives=h, softmax_batch=4)
    want = sum(bsc_mse_loss(q[s : s + 4], a[s : s + 4], scores[s : s + 4], 0.1, mu=0.3,
                            hard_negatives=h[s : s + 4]) for s in range(0, 16, 4)) / 4
    assert abs(float(got) - float(want)) <= TOL


@pytest.mark.parametrize("fn", [bsc_loss, infonce_loss, weince_loss])
@pytest.mark.parametrize("tile", [None, 5, "auto"])
def test_one_block_is_the_plain_loss(fn, tile) -> None:
    q, a, h, scores, _, answer_ids = _case(10, 1, seed=1)
    kwargs = dict(hard_negatives=h, labels=scores, label_threshold=0.4, answer_ids=answer_ids,
                  tile_size=tile)
    plain = fn(q, a, 0.1, **kwargs)
    assert torch.equal(fn(q, a, 0.1, softmax_batch=10, **kwargs), plain)
    assert torch.equal(fn(q, a, 0.1, softmax_batch=None, **kwargs), plain)


def test_bad_block_sizes_are_named() -> None:
    q, a, h, scores, *_ = _case(12, 1, seed=4)
    for n in (5, 7, 24):
        with pytest.raises(ValueError, match=rf"`softmax_batch` \({n}\) must divide the batch "
                                             r"of 12 pairs"):
            bsc_loss(q, a, softmax_batch=n)
    with pytest.raises(ValueError, match=r"weince_loss: `softmax_batch` \(8\)"):
        weince_loss(q, a, softmax_batch=8)
    with pytest.raises(ValueError, match=r"infonce_loss: `softmax_batch` \(5\)"):
        infonce_loss(q, a, softmax_batch=5)
    with pytest.raises(ValueError, match=r"bsc_mse_loss|bsc_loss: `softmax_batch` \(9\)"):
        bsc_mse_loss(q, a, scores, softmax_batch=9)
    for bad in (1, 0, -4, 2.0, True):
        with pytest.raises(ValueError, match=rf"`softmax_batch` must be an integer >= 2 or "
                                             rf"None, got {bad!r}"):
            bsc_loss(q, a, softmax_batch=bad)
    with pytest.raises(ValueError, match=r"k per pair.*got 5 rows for 12 pairs"):
        bsc_loss(q, a, hard_negatives=h[:5], softmax_batch=6)
    with pytest.raises(ValueError, match=r"`anchor_pool` and `softmax_batch` \(6\)"):
        weince_loss(q, a, softmax_batch=6, anchor_pool=lambda x: x)


def test_pair_inputs_slice_answer_ids_with_their_negatives() -> None:
    q, a, h, scores, query_ids, _ = _case(6, 2, seed=0)
    answer_ids = torch.arange(6 + 12)
    rows = PairInputs("t", q, a, hard_negatives=h, labels=scores, query_ids=query_ids,
                      answer_ids=answer_ids).rows(2, 4)
    assert rows["answer_ids"].tolist() == [2, 3, 6 + 4, 6 + 5, 6 + 6, 6 + 7]
    assert torch.equal(rows["hard_negatives"], h[4:8])
    assert torch.equal(rows["labels"], scores[2:4])


# -- the Objective under two gloo ranks -------------------------------------------------------

# name: (loss config, cross_ranks, global batch B, rank 0's share, hard negatives per pair).
# Rank 1 holds the other B - share pairs. N dividing both shares keeps every block inside a
# rank; otherwise blocks span the two ranks.
SCENARIOS: dict[str, tuple[dict, str, int, int, int]] = {
    "bsc-N2-inside": ({"name": "bsc", "softmax_batch": 2, "temperature": 0.1}, "local", 8, 4, 1),
    "bsc-N2-inside-uneven": ({"name": "bsc", "softmax_batch": 2, "label_threshold": 0.4},
                             "local", 8, 2, 2),
    "bsc-N8-one-block": ({"name": "bsc", "softmax_batch": 8}, "local", 8, 4, 1),
    "bsc-N4-span-labels": ({"name": "bsc", "softmax_batch": 4, "label_threshold": 0.3,
                            "learnable_temperature": True}, "local", 8, 6, 1),
    "bsc-N4-span-a->q": ({"name": "bsc", "softmax_batch": 4, "directions": "a->q"},
                         "local", 12, 6, 0),
    "bsc-N8-span-three": ({"name": "bsc", "softmax_batch": 8}, "local", 16, 5, 2),
    "infonce-N2-span": ({"name": "infonce", "softmax_batch": 2}, "local", 8, 3, 1),
    "weince-N6-inside": ({"name": "weince", "softmax_batch": 6}, "local", 24, 12, 1),
    "weince-N8-span": ({"name": "weince", "softmax_batch": 8, "label_threshold": 0.2},
                       "local", 24, 12, 1),
    "bsc_mse-N4-span": ({"name": "bsc_mse", "softmax_batch": 4, "mu": 0.5}, "local", 8, 2, 0),
    "bsc-N4-global": ({"name": "bsc", "softmax_batch": 4, "label_threshold": 0.3,
                       "tile_size": 3}, "global", 8, 6, 1),
    "weince-N6-global": ({"name": "weince", "softmax_batch": 6}, "global", 12, 6, 1),
    "cosent+bsc-N2-local": ({"name": "cosent", "plus": [
        {"name": "infonce", "softmax_batch": 2, "weight": 2.0}]}, "local", 8, 4, 0),
}


def _global_inputs(b: int, k: int, seed: int):
    q, a, h, scores, *_ = _case(b, k, d=5, seed=seed)
    return q, a, h, scores


def _objective_loss(name: str, rows: slice | None):
    """The Objective's loss on ``rows`` of the scenario's global batch (all of it: None), and
    the gradients of the rows' embeddings and of the learnable temperature."""
    from batchscale.training import Objective
    from batchscale.training.config import LossConfig

    config, cross_ranks, b, _, k = SCENARIOS[name]
    objective = Objective(LossConfig(**config), 1000, cross_ranks=cross_ranks).double()
    q, a, h, scores = _global_inputs(b, k, seed=len(name))
    rows = rows or slice(0, b)
    sides = [q[rows], a[rows]] + ([h[rows.start * k : rows.stop * k]] if k else [])
    leaves = [x.clone().requires_grad_(True) for x in sides]
    loss = objective(leaves, scores[rows])
    loss.backward()
    temp = objective.temperature_module
    grads = [x.grad for x in leaves]
    return objective, loss.detach(), grads, None if temp is None else temp.inverse_temperature.grad


def worker_blocks(out_dir: str) -> None:
    from batchscale.batching.distributed import init_distributed, shutdown_distributed

    info = init_distributed(backend="gloo", timeout_s=60)
    results = {}
    for name, (_, _, b, share, _) in SCENARIOS.items():
        rows = slice(0, share) if info.rank == 0 else slice(share, b)
        objective, loss, grads, temp_grad = _objective_loss(name, rows)
        torch.distributed.all_reduce(loss)  # global: W copies; local: the ranks' parts
        loss /= info.world_size
        if temp_grad is not None:  # the trainer averages parameter gradients
            torch.distributed.all_reduce(temp_grad)
            temp_grad /= info.world_size
        # A row's gradient sums every rank's loss: W times one process's (see distributed.py).
        grads = [g / info.world_size for g in grads]
        diagnostics = objective.pop_diagnostics(
            lambda s: (torch.distributed.all_reduce(s), s)[1] / info.world_size)
        results[name] = {"loss": loss, "grads": grads, "temp": temp_grad,
                         "diagnostics": diagnostics}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    shutdown_distributed()




@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:

    out = tmp_path_factory.mktemp("blocks")
    return run_ranks(HERE, ["blocks", str(out)], out)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(two_ranks: list[dict], name: str) -> None:
    _, _, b, share, _ = SCENARIOS[name]
    objective, want_loss, (q_grad, a_grad, *h_grad), want_temp = _objective_loss(name, None)
    want_diagnostics = objective.pop_diagnostics()
    k = SCENARIOS[name][4]
    for rank, got in enumerate(two_ranks):
        got = got[name]
        rows = slice(0, share) if rank == 0 else slice(share, b)
        assert abs(float(got["loss"]) - float(want_loss)) <= TOL, rank
        want = [q_grad[rows], a_grad[rows]] + [g[rows.start * k : rows.stop * k] for g in h_grad]
        for g, w in zip(got["grads"], want, strict=True):
            assert float((g - w).abs().max()) <= TOL, rank
        if want_temp is not None:
            assert abs(float(got["temp"]) - float(want_temp)) <= TOL
        if "inside" in name or "global" in name:  # spanning blocks count twice (documented)
            assert got["diagnostics"].keys() == want_diagnostics.keys()
            for key, value in want_diagnostics.items():
                assert got["diagnostics"][key] == pytest.approx(value, abs=1e-12), key


def test_objective_blocks_change_the_loss_and_bad_sizes_are_named() -> None:
    from batchscale.training import Objective
    from batchscale.training.config import LossConfig

    q, a, h, scores = _global_inputs(8, 1, seed=0)
    plain = Objective(LossConfig(name="bsc"), 100)([q, a, h], scores)
    blocked = Objective(LossConfig(name="bsc", softmax_batch=4), 100)([q, a, h], scores)
    whole = Objective(LossConfig(name="bsc", softmax_batch=8), 100)([q, a, h], scores)
    assert torch.equal(whole, plain)
    assert float(blocked) == pytest.approx(float(
        bsc_loss(q[:4], a[:4], hard_negatives=h[:4]) + bsc_loss(q[4:], a[4:], hard_negatives=h[4:])
    ) / 2, abs=TOL)
    with pytest.raises(ValueError, match=r"`softmax_batch` \(3\) must divide the batch of 8"):
        Objective(LossConfig(name="weince", softmax_batch=3), 100)([q, a], scores)


if __name__ == "__main__":
    worker_blocks(sys.argv[2])
