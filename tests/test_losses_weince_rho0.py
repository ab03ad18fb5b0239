"""WEINCE's rho0 from a bfloat16 sweep equals the quantile of the exact rho (float64
brute force written here), whether or not the bfloat16 bounds separate the rows."""

import math

import pytest
import torch

import batchscale.losses.tiled_weince as tiled_weince
import batchscale.losses.weince_rho0 as weince_rho0
from batchscale.losses import weince_loss
from batchscale.losses.logits import WeinceMixture
from batchscale.losses.tile_plan import TilePlan, negatives_per_anchor
from batchscale.losses.weince_tail import WeinceConfig, tail_size

CFG = WeinceConfig()


def _exact_rho(q: torch.Tensor, c: torch.Tensor, answer_ids: torch.Tensor | None
               ) -> torch.Tensor:
    """rho_i = max(1 - max negative similarity, eps) in float64, by brute force."""
    sims = q.double() @ c.double().T
    m = q.shape[0]
    negative = torch.ones_like(sims, dtype=torch.bool)
    negative[torch.arange(m), torch.arange(m)] = False
    if answer_ids is not None:
        negative &= answer_ids[None, :] != answer_ids[:m, None]
    top = sims.masked_fill(~negative, float("-inf")).amax(dim=1)
    return torch.where(negative.any(dim=1), torch.clamp(1.0 - top, min=CFG.eps), 1.0)


def _reference_rho0(rho: torch.Tensor, counted: torch.Tensor) -> float:
    values = sorted(rho[counted].tolist())
    return values[round(CFG.quantile * (len(values) - 1))]


def _rho0(q, c, answer_ids=None, anchors=None, gather_anchors=None):
    m = q.shape[0]
    anchors = torch.ones(m, dtype=torch.bool) if anchors is None else anchors
    plan = TilePlan(WeinceMixture(CFG), True, False, answer_ids, None, anchors, 64)
    k = tail_size(negatives_per_anchor(answer_ids, m, c.shape[0], q.device), CFG)
    return weince_rho0.row_rho0(q, c, plan, k, CFG, gather_anchors), k


def _near_ties(m: int, d: int, seed: int, spread: float, dtype=torch.float64):
    """Each query's largest negative is a hard negative at cosine 0.8 + spread * u_i: with
    spread far below bfloat16's resolution every row's bounds overlap the others'."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    positives = torch.nn.functional.normalize(q + 0.3 * torch.randn(m, d, generator=g,
                                                                     dtype=torch.float64), dim=1)
    cos = 0.8 + spread * torch.rand(m, 1, generator=g, dtype=torch.float64)
    v = torch.randn(m, d, generator=g, dtype=torch.float64)
    v = torch.nn.functional.normalize(v - (v * q).sum(1, keepdim=True) * q, dim=1)
    hard = cos * q + torch.sqrt(1 - cos**2) * v
    return q.to(dtype), torch.cat([positives, hard]).to(dtype)


@pytest.fixture(params=[True, False], ids=["bfloat16", "exact"])
def sweep(request, monkeypatch):
    monkeypatch.setattr(weince_rho0, "fast_bfloat16", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("spread", [1e-5, 0.15])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rho0_equals_the_exact_quantile(sweep, spread: float, dtype) -> None:
    q, c = _near_ties(301, 48, seed=int(spread * 1e5), spread=spread, dtype=dtype)
    got, _ = _rho0(q, c)
    want = _reference_rho0(_exact_rho(q, c, None), torch.ones(301, dtype=torch.bool))
    # bfloat16 alone would be ~1e-3 off; float32 products are within ~1e-7
    assert float(got) == pytest.approx(want, abs=1e-12 if dtype == torch.float64 else 1e-6)


def test_rho0_with_masks_labels_and_rows_without_negatives(sweep) -> None:
    g = torch.Generator().manual_seed(4)
    m, hard = 90, 7
    q = torch.randn(m, 12, generator=g, dtype=torch.float64) * 3.0     # not normalised
    c = torch.randn(m + hard, 12, generator=g, dtype=torch.float64)
    answer_ids = torch.randint(0, 20, (m + hard,), generator=g)
    answer_ids[m:] = torch.arange(1000, 1000 + hard)    # false negatives among the answers
    anchors = torch.rand(m, generator=g) > 0.3
    got, k = _rho0(q, c, answer_ids, anchors)
    counted = anchors & (k > 0)
    want = _reference_rho0(_exact_rho(q, c, answer_ids), counted)
    assert float(got) == pytest.approx(want, abs=1e-12)
    # a batch where nothing is a negative of anything: rho0 = 1
    single = torch.zeros(3, dtype=torch.long)
    got, k = _rho0(q[:3], c[:3], single)
    assert int(k.sum()) == 0 and float(got) == 1.0


def test_rho0_over_every_rank_through_the_anchor_gather(sweep) -> None:
    q, c = _near_ties(120, 32, seed=5, spread=1e-4)
    local = _exact_rho(q, c, None)
    # other ranks' exact rho, some inside this rank's window, appended by the all-gather
    others = torch.cat([local[:40] + 1e-7, torch.linspace(0.1, 0.4, 50, dtype=torch.float64)])
    calls = []

    def gather_anchors(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.numel())
        return torch.cat([x, others])

    got, _ = _rho0(q, c, gather_anchors=gather_anchors)
    want = sorted(local.tolist() + others.tolist())[round(CFG.quantile * (120 + 90 - 1))]
    assert float(got) == pytest.approx(want, abs=1e-12)
    assert calls == [120, 120, 120]           # bounds below, above, then the exact values


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, -1.0])
def test_bfloat16_bounds_hold_the_float32_max(scale: float, monkeypatch) -> None:
    """Rows of mixed magnitudes, float32: every bound holds the float64 brute-force max
    (scale < 0: every similarity is negative, where the bit-pattern max does not apply).
    The bfloat16 path is forced: a CPU without native bfloat16 would take the exact float32
    sweep, whose max is not a bound of the float64 one."""
    monkeypatch.setattr(weince_rho0, "fast_bfloat16", lambda device: True)
    g = torch.Generator().manual_seed(int(math.log10(abs(scale))) + 7)
    q = torch.randn(200, 96, generator=g) * scale * torch.rand(200, 1, generator=g)
    c = torch.randn(230, 96, generator=g) * torch.rand(230, 1, generator=g) * 10
    if scale < 0:
        q, c = -q.abs(), c.abs()
    lower, upper = weince_rho0._max_negative_bounds(q, c, None, 64)
    sims = q.double() @ c.double().T
    sims[torch.arange(200), torch.arange(200)] = float("-inf")
    exact = sims.amax(dim=1)
    assert bool((lower <= exact).all()) and bool((exact <= upper).all())
    # and they are tight enough to be useful: within a few bfloat16 roundings
    size = (q.double().norm(dim=1) * c.double().norm(dim=1).max())
    assert float(((upper - lower) / size).max()) < 0.05


def test_few_rows_are_computed_exactly_on_spread_data(monkeypatch) -> None:
    """The exact pass touches only the rows near the quantile (here < 5%)."""
    monkeypatch.setattr(weince_rho0, "fast_bfloat16", lambda device: True)
    exact_rows = []
    real = weince_rho0._max_negatives

    def spy(q, c, rows, ids, tile):
        if q.dtype != torch.bfloat16:
            exact_rows.append(rows.numel())
        return real(q, c, rows, ids, tile)

    monkeypatch.setattr(weince_rho0, "_max_negatives", spy)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2048, 64, generator=g), dim=1)
    c = torch.nn.functional.normalize(q + torch.randn(2048, 64, generator=g), dim=1)
    _rho0(q, c)
    assert 0 < sum(exact_rows) < 0.05 * 2048


@pytest.fixture(params=["whole", "bfloat16", "exact"])
def l0_path(request, monkeypatch):
    """How tiled L0 finds rho0: from the whole matrix (kept while it is small), or first from
    a bfloat16 sweep, or from an exact one ("dense": not tiled); a spy checks the path was
    taken."""
    calls = []
    if request.param in ("bfloat16", "exact"):
        monkeypatch.setattr(tiled_weince, "WHOLE_MATRIX_ENTRIES", 0)
        monkeypatch.setattr(weince_rho0, "fast_bfloat16",
                            lambda device: request.param == "bfloat16")
    original = tiled_weince.row_rho0
    monkeypatch.setattr(tiled_weince, "row_rho0",
                        lambda *args: calls.append(1) or original(*args))
    yield request.param
    assert len(calls) == (request.param in ("bfloat16", "exact"))


@pytest.mark.parametrize("spread", [1e-5, 0.15])
def test_tiled_weince_rows_equal_dense_on_every_path(l0_path, spread: float) -> None:
    """WEINCE q->a over tiles (rho0 first, then one sweep) against the dense loss, with labels
    and ids, loss and gradients in float64."""
    q, c = _near_ties(97, 24, seed=3, spread=spread)
    a, h = c[:97], c[97:]
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(97, generator=g) > 0.2).long()
    answer_ids = torch.cat([torch.randint(0, 40, (97,), generator=g), torch.arange(100, 197)])
    results = []
    for tile in (None, 16):
        leaves = [x.clone().requires_grad_(True) for x in (q, a, h)]
        loss = weince_loss(*leaves[:2], 0.1, hard_negatives=leaves[2], labels=labels,
                           answer_ids=answer_ids, directions="q->a", tile_size=tile)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (dense, dense_grads), (tiled, tiled_grads) = results
    assert float(tiled) == pytest.approx(float(dense), rel=1e-9)
    for want, got in zip(dense_grads, tiled_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("l0_path", ["dense", "whole", "bfloat16", "exact"], indirect=True)
def test_weince_rows_gradient_where_the_shortfall_is_clamped(l0_path) -> None:
    """A candidate identical to a query (s = 1 > 1 - eps): the log term is constant there,
    so only (1 - lambda) s / tau carries a gradient; against autograd through the plain
    reference logits (torch.clamp), float64."""
    from batchscale.losses.logits import weince_logits
    from batchscale.losses.weince_tail import weince_lambda

    tile = None if l0_path == "dense" else 16
    q, c = _near_ties(60, 16, seed=9, spread=0.15)
    c = c.clone()
    c[61] = q[3]                 # a hard negative equal to query 3 ...
    c[5] = q[7]                  # ... and query 7 as the answer of pair 5
    a, h = c[:60], c[60:]
    leaves = [x.clone().requires_grad_(True) for x in (q, a, h)]
    loss = weince_loss(*leaves[:2], 0.1, hard_negatives=leaves[2], directions="q->a",
                       tile_size=tile)
    loss.backward()

    ref = [x.clone().requires_grad_(True) for x in (q, a, h)]
    qn = torch.nn.functional.normalize(ref[0], dim=1)
    cn = torch.nn.functional.normalize(torch.cat(ref[1:]), dim=1)
    sims = qn @ cn.T
    assert float(sims[3, 61].detach()) > 1 - CFG.eps and float(sims[7, 5].detach()) > 1 - CFG.eps
    lam = weince_lambda(sims.detach(), torch.arange(60), cfg=CFG).lam
    logits = weince_logits(sims, lam, 0.1, CFG.eps)
    want = torch.nn.functional.cross_entropy(logits, torch.arange(60))
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-10)
    for got_leaf, want_leaf in zip(leaves, ref, strict=True):
        assert torch.allclose(got_leaf.grad, want_leaf.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case", ["random", "negative", "masked", "ties", "signed_zeros"])
def test_top_two_of_a_bfloat16_strip(case: str) -> None:
    """The two-level int16 max gives each row's max, a column holding it and the max of the
    other columns, as the float max does: widths that 128 does not divide, rows all negative,
    -inf masks, ties, and -0.0 (the int16 minimum)."""
    g = torch.Generator().manual_seed(len(case))
    for rows, cols in [(7, 2), (5, 127), (9, 128), (6, 300), (4, 1000)]:
        x = torch.randn(rows, cols, generator=g)
        if case == "negative":
            x = -x.abs()
        elif case == "masked":
            x[:, torch.randperm(cols, generator=g)[: cols // 2]] = float("-inf")
            x[0, :-1] = float("-inf")
        elif case == "ties":
            x = (x * 4).round() / 4
        elif case == "signed_zeros":
            x[0] = -0.0
            x[0, cols // 2] = -0.5
            x[1] = 0.0
        strip = x.to(torch.bfloat16)
        first, column, second = weince_rho0._top_two(strip.clone())
        want = strip.float()
        every = torch.arange(rows)
        assert torch.equal(first.float(), want.amax(dim=1))
        assert torch.equal(want[every, column], want.amax(dim=1))
        want[every, column] = float("-inf")
        assert torch.equal(second.float(), want.amax(dim=1))
