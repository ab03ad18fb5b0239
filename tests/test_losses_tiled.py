"""The memory-linear (tiled) path equals the dense path: loss and gradients, float64."""

import pytest
import torch

from batchscale.losses import bsc_loss, bsc_mse_loss, infonce_loss, weince_loss


def _case(m: int, hard: int, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = q + 0.8 * torch.randn(m, d, generator=g, dtype=torch.float64)
    h = torch.randn(hard, d, generator=g, dtype=torch.float64) if hard else None
    return q, a, h


def _loss_and_grads(fn, q, a, h, tau, **kwargs):
    leaves = [x.clone().requires_grad_(True) for x in (q, a) + ((h,) if h is not None else ())]
    tau_leaf = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    hard = leaves[2] if h is not None else None
    loss = fn(leaves[0], leaves[1], tau_leaf, hard_negatives=hard, **kwargs)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves] + [tau_leaf.grad]


def _ids(m: int, hard: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # few distinct ids so that false negatives occur in many tiles
    return (torch.randint(0, max(2, m // 3), (m,), generator=g),
            torch.randint(0, max(2, m // 3), (m + hard,), generator=g))


def _spy(monkeypatch, module, name: str) -> list[tuple]:
    """The positional arguments of every call to ``module.name`` from now on."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize(("m", "hard", "tile"), [(37, 0, 8), (50, 11, 7), (23, 5, 64), (31, 4, 1)])
@pytest.mark.parametrize("directions", ["both", "q->a", "a->q"])
@pytest.mark.parametrize("fn", [bsc_loss, weince_loss], ids=["bsc", "weince"])
def test_tiled_equals_dense(fn, m: int, hard: int, tile: int, directions: str) -> None:
    q, a, h = _case(m, hard, seed=m + tile)
    query_ids, answer_ids = _ids(m, hard, seed=tile)
    labels = (torch.rand(m, generator=torch.Generator().manual_seed(m)) > 0.2).long()
    kwargs = dict(directions=directions, labels=labels, query_ids=query_ids,
                  answer_ids=answer_ids)
    dense_loss, dense_grads = _loss_and_grads(fn, q, a, h, 0.1, tile_size=None, **kwargs)
    tiled_loss, tiled_grads = _loss_and_grads(fn, q, a, h, 0.1, tile_size=tile, **kwargs)
    assert tiled_loss.item() == pytest.approx(dense_loss.item(), rel=1e-6, abs=0)
    for dense, tiled in zip(dense_grads, tiled_grads, strict=True):
        assert torch.allclose(tiled, dense, rtol=1e-6, atol=1e-12)


def test_tiled_without_masks_and_other_normalisations() -> None:
    q, a, h = _case(45, 6, seed=3)
    for normalization in ("l2", "coord", "none"):
        dense = bsc_loss(q, a, 0.5, hard_negatives=h, normalization=normalization,
                         tile_size=None)
        tiled = bsc_loss(q, a, 0.5, hard_negatives=h, normalization=normalization,
                         tile_size=16)
        assert tiled.item() == pytest.approx(dense.item(), rel=1e-10)
    assert infonce_loss(q, a, 0.05, tile_size=9).item() == pytest.approx(
        infonce_loss(q, a, 0.05, tile_size=None).item(), rel=1e-10)
    scores = torch.rand(45, dtype=torch.float64)
    assert bsc_mse_loss(q, a, scores, tile_size=10).item() == pytest.approx(
        bsc_mse_loss(q, a, scores, tile_size=None).item(), rel=1e-10)


def test_tiled_weince_stats_equal_dense() -> None:
    q, a, h = _case(60, 8, seed=4)
    _, dense = weince_loss(q, a, 0.1, hard_negatives=h, tile_size=None, return_stats=True)
    _, tiled = weince_loss(q, a, 0.1, hard_negatives=h, tile_size=13, return_stats=True)
    assert tiled.mean_lambda == pytest.approx(dense.mean_lambda, rel=1e-10)
    assert tiled.weibull_share == dense.weibull_share
    assert tiled.anchors == dense.anchors == 120


def test_auto_path_with_an_anchor_pool_is_the_same_on_uneven_ranks(monkeypatch) -> None:
    """Under torchrun the last batch may give ranks 11 and 12 anchors against the same 23
    candidates; each path makes its own all-gathers for rho0 (dense 1, a bfloat16 sweep 3),
    so both ranks must take the same one, or the collectives would not pair up."""
    import batchscale.losses.pair_loss as pair_loss_module
    import batchscale.losses.tiled_weince as tiled_weince

    monkeypatch.setitem(pair_loss_module.AUTO_DENSE_ENTRIES, "cpu", 11 * 23)
    monkeypatch.setattr(tiled_weince, "WHOLE_MATRIX_ENTRIES", 0)
    q, a, _ = _case(23, 0, seed=2)
    gathers = []
    for m in (11, 12):
        calls = []

        def pool(x: torch.Tensor, calls=calls) -> torch.Tensor:
            calls.append(x.numel())
            return x

        leaves = [x.clone().requires_grad_(True) for x in (q[:m], a[:m], a[m:])]
        weince_loss(*leaves[:2], 0.1, hard_negatives=leaves[2], directions="q->a",
                    anchor_pool=pool).backward()
        gathers.append(len(calls))
    assert gathers[0] == gathers[1] > 0


def test_auto_tiles_large_batches(monkeypatch) -> None:
    import batchscale.losses.pair_loss as pair_loss_module

    calls = _spy(monkeypatch, pair_loss_module, "tiled_batch_softmax_loss")
    monkeypatch.setitem(pair_loss_module.AUTO_DENSE_ENTRIES, "cpu", 20 * 20)
    q, a, _ = _case(20, 0)
    bsc_loss(q, a, 0.1)
    assert calls == []
    q, a, _ = _case(21, 0)
    bsc_loss(q, a, 0.1)
    assert [args[-1] for args in calls] == [pair_loss_module.DEFAULT_TILE]
    # CPU tiles above 2048 x 2048 (measured), other devices above 4096 x 4096.
    resolve = pair_loss_module.resolve_tile
    assert resolve("f", "auto", 3000, 3000, "cpu") == pair_loss_module.DEFAULT_TILE
    assert resolve("f", "auto", 3000, 3000, "cuda") is None
    assert resolve("f", "auto", 4097, 4096, "cuda") == pair_loss_module.DEFAULT_TILE
    with pytest.raises(ValueError, match=r"`tile_size` must be a positive int, 'auto' or None, "
                                         r"got 0"):
        bsc_loss(q, a, 0.1, tile_size=0)


def test_tiled_gradcheck() -> None:
    q, a, h = _case(9, 3, d=3, seed=5)
    query_ids, answer_ids = _ids(9, 3, seed=1)
    tau = torch.tensor(0.3, dtype=torch.float64)

    def fn(q, a, h, t):
        return bsc_loss(q, a, t, hard_negatives=h, query_ids=query_ids, answer_ids=answer_ids,
                        tile_size=4)

    inputs = tuple(x.clone().requires_grad_(True) for x in (q, a, h, tau))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("k", [1, 37, 200])
def test_sorted_top_values_equals_topk(k: int) -> None:
    """The threshold path gives torch.topk's values exactly: ties, -inf (masked) entries,
    rows whose strided sample over-estimates the k-th value (fallback), float32 and 64."""
    from batchscale.losses.weince_tail import _threshold_top, sorted_top_values

    g = torch.Generator().manual_seed(k)
    x = torch.randn(40, 2048, generator=g, dtype=torch.float64)
    x[0] = torch.round(x[0] * 4) / 4                   # heavy ties
    x[1, ::3] = float("-inf")                          # masked candidates
    x[2, : 2048 - k // 2] = float("-inf")              # fewer finite entries than k
    x[3, ::16] = 10.0 + torch.arange(128.0)            # the sample holds the largest values
    x[4] = 0.5                                         # all equal
    _, exact = _threshold_top(x.numpy(), k)
    if k > 1:
        assert not exact[3], "the prefilter should fail on row 3 and fall back"
    for dtype in (torch.float64, torch.float32):
        y = x.to(dtype)
        assert torch.equal(sorted_top_values(y, k), torch.topk(y, k, dim=1).values)


def test_sorted_top_values_of_rows_wider_than_16_bit_counts() -> None:
    """Rows of 2^16 entries or more count their survivors in 32 bits: all of row 0 survives,
    a count that 16 bits would wrap to 3,500."""
    from batchscale.losses.weince_tail import sorted_top_values

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, (1 << 16) + 3500, generator=g)
    x[0] = 1.0
    assert torch.equal(sorted_top_values(x, 3000), torch.topk(x, 3000, dim=1).values)


def test_tiled_weince_equals_dense_on_the_threshold_path() -> None:
    """A batch wide enough (> 1,024 candidates) for the sampled-threshold top-k, with
    labels, ids and hard negatives, tiled against dense in float64."""
    m, hard = 1100, 40
    q, a, h = _case(m, hard, d=8, seed=11)
    query_ids, answer_ids = _ids(m, hard, seed=3)
    labels = (torch.rand(m, generator=torch.Generator().manual_seed(2)) > 0.1).long()
    for kwargs in ({}, dict(labels=labels, query_ids=query_ids, answer_ids=answer_ids)):
        dense_loss, dense_grads = _loss_and_grads(weince_loss, q, a, h, 0.1, tile_size=None,
                                                  **kwargs)
        tiled_loss, tiled_grads = _loss_and_grads(weince_loss, q, a, h, 0.1, tile_size=256,
                                                  **kwargs)
        assert tiled_loss.item() == pytest.approx(dense_loss.item(), rel=1e-6, abs=0)
        for dense, tiled in zip(dense_grads, tiled_grads, strict=True):
            assert torch.allclose(tiled, dense, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(("m", "hard", "tile"), [(37, 0, 8), (50, 11, 7), (23, 5, 64)])
@pytest.mark.parametrize("directions", ["both", "q->a", "a->q"])
def test_tiled_shared_shift_equals_dense(monkeypatch, m: int, hard: int, tile: int,
                                         directions: str) -> None:
    """Plain logits without ids take one exp per tile for both directions (shared shift);
    one direction alone runs the rows sweep (forward and gradient) shifted by the same
    sigma."""
    import batchscale.losses.tiled as tiled
    import batchscale.losses.tiled_rows as tiled_rows

    taken = _spy(monkeypatch, *((tiled, "shared_backward") if directions == "both"
                                else (tiled_rows, "_rows_sweep")))
    q, a, h = _case(m, hard, seed=m + tile)
    labels = (torch.rand(m, generator=torch.Generator().manual_seed(m)) > 0.2).long()
    for normalization in ("l2", "none"):
        kwargs = dict(directions=directions, labels=labels, normalization=normalization)
        dense_loss, dense_grads = _loss_and_grads(bsc_loss, q, a, h, 0.1, tile_size=None,
                                                  **kwargs)
        tiled_loss, tiled_grads = _loss_and_grads(bsc_loss, q, a, h, 0.1, tile_size=tile,
                                                  **kwargs)
        assert tiled_loss.item() == pytest.approx(dense_loss.item(), rel=1e-6, abs=0)
        for dense, got in zip(dense_grads, tiled_grads, strict=True):
            assert torch.allclose(got, dense, rtol=1e-6, atol=1e-12)
    assert len(taken) == 2
    if directions != "both":
        shifts = [args[4](slice(0, 1), None)[1] for args in taken]   # the strip constants
        assert all(shift is not None and shift.ndim == 0 for shift in shifts)


def test_tiled_shared_shift_only_within_the_exp_range() -> None:
    """float32 logits spanning more than e^-80 fall back to the running max, and both paths
    match a float64 dense reference."""
    from batchscale.losses.logits import Coefficients
    from batchscale.losses.tiled_plain import shared_shift

    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    a = torch.nn.functional.normalize(q + 0.3 * torch.randn(300, 16, generator=g), dim=1)
    scale = torch.tensor(20.0)
    coef = Coefficients(scale, None, None)
    assert shared_shift(q, a, coef, masked=False) is not None        # 2 sigma ~ 40
    assert shared_shift(q, a, coef, masked=True) is None
    wide = Coefficients(torch.tensor(100.0), None, None)
    assert shared_shift(q, a, wide, masked=False) is None            # 2 sigma ~ 200
    assert shared_shift(q.double(), a.double(), wide, masked=False) is not None
    for tau in (0.05, 0.01):
        ref = bsc_loss(q.double(), a.double(), tau, tile_size=None)
        got = bsc_loss(q, a, tau, tile_size=64)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("fn", [infonce_loss, weince_loss], ids=["infonce", "weince"])
def test_rows_gradient_from_the_forward_scales_with_the_output_grad(fn) -> None:
    """q->a computes its gradient in the forward sweep; backward must scale it by whatever
    grad reaches the loss (here 3 + 2 * loss, twice with retain_graph), as dense autograd."""
    q, a, h = _case(41, 5, seed=8)
    query_ids, answer_ids = _ids(41, 5, seed=2)
    kwargs = dict(hard_negatives=None, answer_ids=answer_ids)
    if fn is weince_loss:
        kwargs.update(directions="q->a", query_ids=query_ids)
    grads = []
    for tile in (None, 6):
        leaves = [x.clone().requires_grad_(True) for x in (q, a, h)]
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        loss = fn(leaves[0], leaves[1], tau, tile_size=tile,
                  **{**kwargs, "hard_negatives": leaves[2]})
        total = 3 * loss + loss**2
        total.backward(retain_graph=True)
        total.backward()
        grads.append([x.grad for x in leaves] + [tau.grad])
    for dense, tiled in zip(*grads, strict=True):
        assert torch.allclose(tiled, dense, rtol=1e-6, atol=1e-12)


def test_rows_gradient_only_when_autograd_wants_it(monkeypatch) -> None:
    """Under no_grad the q->a forward computes no gradient; with only tau learnable the
    sweep computes tau's alone (and it matches dense)."""
    import batchscale.losses.tiled_rows as tiled_rows

    calls = _spy(monkeypatch, tiled_rows, "_rows_sweep")
    q, a, _ = _case(30, 0, seed=9)
    with torch.no_grad():
        got = infonce_loss(q.requires_grad_(True), a, 0.1, tile_size=7)
    assert calls == []
    assert got.item() == pytest.approx(infonce_loss(q, a, 0.1, tile_size=None).item(),
                                       rel=1e-10)
    q = q.detach()
    taus = [torch.tensor(0.1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for tau, tile in zip(taus, (None, 7), strict=True):
        infonce_loss(q, a, tau, tile_size=tile).backward()
    assert [args[-1] for args in calls] == [(False, False, True)]
    assert taus[1].grad.item() == pytest.approx(taus[0].grad.item(), rel=1e-8)


def test_rows_gradcheck() -> None:
    q, a, h = _case(9, 3, d=3, seed=6)
    _, answer_ids = _ids(9, 3, seed=4)
    tau = torch.tensor(0.3, dtype=torch.float64)

    def fn(q, a, h, t):
        return infonce_loss(q, a, t, hard_negatives=h, answer_ids=answer_ids, tile_size=4)

    inputs = tuple(x.clone().requires_grad_(True) for x in (q, a, h, tau))
    assert torch.autograd.gradcheck(fn, inputs)


def test_tiled_under_autocast_keeps_the_embeddings_dtype() -> None:
    """Inside torch.autocast (a trainer in bf16), the tiled sweeps still run in float32:
    the same loss and gradients as outside it (the backward too runs inside)."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(70, 16, generator=g)
    a = q + 0.5 * torch.randn(70, 16, generator=g)
    cases = [(bsc_loss, "both"), (bsc_loss, "a->q"), (infonce_loss, None),
             (weince_loss, "both"), (weince_loss, "q->a")]
    for fn, directions in cases:
        kwargs = {} if directions is None else {"directions": directions}
        results = []
        for autocast in (False, True):
            leaves = [x.clone().requires_grad_(True) for x in (q, a)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn(*leaves, 0.1, tile_size=16, **kwargs)
                loss.backward()
            assert loss.dtype == torch.float32
            results.append([loss.detach()] + [x.grad for x in leaves])
        for plain, cast in zip(*results, strict=True):
            assert torch.allclose(cast, plain, rtol=1e-6, atol=1e-9), (fn.__name__, directions)
