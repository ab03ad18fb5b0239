"""Group-aware false negatives: with group ids as ``query_ids`` / ``answer_ids`` (one id per
pair, the query's and the answer's; a hard negative's is its group's or one of its own), each
anchor's softmax is its positive and the candidates outside its group.

Every batch-softmax loss (BSC both ways, InfoNCE, WEINCE, BSC + MSE) is compared in float64
at 1e-10, loss and gradients (q, a, hard negatives, a learnable temperature), with a
brute-force reference written here with loops over anchors and candidates: dense and tiled,
with softmax blocks (groups cross block boundaries: a block masks only its own members), with
hard negatives (some in their pair's group) and label-aware masking. Two gloo ranks, local and
global loss, groups spanning the ranks, equal the same reference. Every case also checks that
the masked loss is not the unmasked one, so that the tests fail without group masking.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from batchscale.losses import bsc_loss, bsc_mse_loss, infonce_loss, weince_loss
from loss_reference import sigmoid, weince_anchor_fit
from ranks import run_ranks

HERE = Path(__file__).resolve()
TOL = 1e-10
EPS = 1e-6          # WEINCE's shortfall floor
FRESH = 1000        # hard negatives with an id of their own: FRESH + their index


# -- the batch --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """m pairs in groups, k hard negatives per pair (pair-major), labels and scores."""

    q: Tensor                 # (m, d)
    a: Tensor                 # (m, d)
    h: Tensor | None          # (m * k, d)
    groups: list[int]         # (m,) the group of pair i (its query's and its answer's)
    hard_groups: list[int]    # (m * k,) each hard negative's group
    labels: Tensor            # (m,) 0/1
    scores: Tensor            # (m,) in [0, 1], for BSC + MSE
    k: int

    @property
    def m(self) -> int:
        return self.q.shape[0]

    def ids(self, rows: slice | None = None) -> dict[str, Tensor]:
        """query_ids and answer_ids of pairs ``rows`` (all: None), as a rank holds them."""
        rows = rows or slice(0, self.m)
        hard = self.hard_groups[rows.start * self.k : rows.stop * self.k]
        return {"query_ids": torch.tensor(self.groups[rows]),
                "answer_ids": torch.tensor(self.groups[rows] + hard)}

    def ungrouped(self) -> Case:
        """The same batch with every text in a group of its own (a pair's two sides share)."""
        return replace(self, groups=list(range(self.m)),
                       hard_groups=list(range(FRESH, FRESH + self.m * self.k)))


def _group_of_each(m: int, gen: torch.Generator) -> list[int]:
    """Groups of random sizes 1..5, their members scattered over the m pairs."""
    sizes: list[int] = []
    while sum(sizes) < m:
        sizes.append(int(torch.randint(1, 6, (1,), generator=gen)))
    ids = [10 + g for g, size in enumerate(sizes) for _ in range(size)][:m]
    return [ids[p] for p in torch.randperm(m, generator=gen).tolist()]


def make_case(m: int = 12, k: int = 2, d: int = 8, seed: int = 0) -> Case:
    """Texts of a group near the group's centre (false negatives are hard ones); a third of
    the hard negatives in their pair's group, a third in another group, a third on their own."""
    gen = torch.Generator().manual_seed(seed)
    groups = _group_of_each(m, gen)
    centre = {g: 1.5 * torch.randn(d, generator=gen, dtype=torch.float64) for g in set(groups)}

    def near(g: int) -> Tensor:
        return centre[g] + torch.randn(d, generator=gen, dtype=torch.float64)

    q = torch.stack([near(g) for g in groups])
    a = torch.stack([near(g) for g in groups])
    hard_groups = []
    for t in range(m * k):
        pick = int(torch.randint(3, (1,), generator=gen))
        other = groups[int(torch.randint(m, (1,), generator=gen))]
        hard_groups.append([groups[t // k], other, FRESH + t][pick])
    h = None
    if k:
        h = torch.stack([near(g) if g < FRESH else torch.randn(d, generator=gen,
                                                               dtype=torch.float64)
                         for g in hard_groups])
    labels = torch.ones(m, dtype=torch.long)
    labels[torch.randperm(m, generator=gen)[:2]] = 0
    scores = torch.rand(m, generator=gen, dtype=torch.float64)
    return Case(q, a, h, groups, hard_groups, labels, scores, k)


# -- the brute-force reference ----------------------------------------------------------------

def _cos(u: Tensor, v: Tensor) -> Tensor:
    return (u @ v) / (u.norm() * v.norm())


@dataclass
class Anchor:
    positive: Tensor          # s(anchor, its positive), 0-dim
    negatives: list[Tensor]   # s(anchor, c) for every candidate c outside the anchor's group
    weight: float             # y_i


def _anchors(case: Case, q: Tensor, a: Tensor, h: Tensor | None, pairs: range,
             direction: str, labels: list[float]) -> list[Anchor]:
    """The anchors of one direction in the softmax of pairs ``pairs`` (a block, or all)."""
    k = case.k
    if direction == "q->a":
        sides = (q, a)
        candidates = [(a[j], case.groups[j]) for j in pairs]
        if h is not None:
            candidates += [(h[t], case.hard_groups[t]) for j in pairs
                           for t in range(j * k, (j + 1) * k)]
    else:  # L1: each answer against the queries (hard negatives are not its candidates)
        sides = (a, q)
        candidates = [(q[j], case.groups[j]) for j in pairs]
    out = []
    for i in pairs:
        anchor, positive = sides[0][i], sides[1][i]
        negatives = [_cos(anchor, c) for c, g in candidates if g != case.groups[i]]
        out.append(Anchor(_cos(anchor, positive), negatives, labels[i]))
    return out


def _lambdas(anchors: list[Anchor]) -> list[float]:
    """WEINCE's lambdas (loss_reference's per-anchor fit) over anchors of varying K: an
    anchor with no negative has no rho and stays out of rho0; fewer than 4 negatives leave
    fewer than 3 fit points (n = K - 1), and lambda = 0 (the library's documented rule)."""
    negatives = [[float(s.detach()) for s in an.negatives] for an in anchors]
    pool = sorted(max(1.0 - max(n), EPS) for n, an in zip(negatives, anchors, strict=True)
                  if n and an.weight)
    rho0 = pool[round(0.2 * (len(pool) - 1))] if pool else 1.0
    out = []
    for n, an in zip(negatives, anchors, strict=True):
        if len(n) < 4 or not an.weight:
            out.append(0.0)
            continue
        rho, d_aic = weince_anchor_fit(n)
        out.append(sigmoid(10.0 * (math.log(rho0) - math.log(rho))) * sigmoid(d_aic - 2.0))
    return out


def _anchor_loss(an: Anchor, lam: float | None, tau: Tensor) -> Tensor:
    """-log softmax of the positive over [positive, *negatives]."""
    sims = torch.stack([an.positive, *an.negatives])
    if lam is None:
        logits = sims / tau
    else:
        logits = (1 - lam) * sims / tau - lam * torch.log1p(-torch.clamp(sims, max=1 - EPS))
    return torch.logsumexp(logits, dim=0) - logits[0]


def reference_loss(case: Case, q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor, *,
                   directions: str = "both", weince: bool = False, block: int | None = None,
                   labels: list[float] | None = None) -> Tensor:
    """(1/m) sum over blocks and anchors of y_i l_i, per direction; both: their mean."""
    m = case.m
    n = block or m
    y = labels if labels is not None else [1.0] * m
    chosen = ["q->a", "a->q"] if directions == "both" else [directions]
    parts = []
    for direction in chosen:
        total = q.new_zeros(())
        for start in range(0, m, n):
            anchors = _anchors(case, q, a, h, range(start, start + n), direction, y)
            lams = _lambdas(anchors) if weince else [None] * len(anchors)
            for an, lam in zip(anchors, lams, strict=True):
                if an.weight:
                    total = total + an.weight * _anchor_loss(an, lam, tau)
        parts.append(total / m)
    return sum(parts[1:], start=parts[0]) / len(parts)


def reference_bsc_mse(case: Case, q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor, *,
                      mu: float, threshold: float, block: int | None = None) -> Tensor:
    """mu * BSC (labels 1[score > t]) + (1 - mu) * mean_i (cos(q_i, a_i) - score_i)^2."""
    y = [float(s > threshold) for s in case.scores.tolist()]
    mse = sum((_cos(q[i], a[i]) - case.scores[i]) ** 2 for i in range(case.m)) / case.m
    return mu * reference_loss(case, q, a, h, tau, block=block, labels=y) + (1 - mu) * mse


# -- library against reference ----------------------------------------------------------------

TAU = 0.1
MU, THRESHOLD = 0.3, 0.5

LossCall = Callable[[Case, Tensor, Tensor, Tensor | None, Tensor, dict], Tensor]


def _labelled(fn: Callable[..., Tensor], **fixed: object) -> LossCall:
    def call(case: Case, q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor,
             opts: dict) -> Tensor:
        ids = case.ids()
        if fn is infonce_loss:
            del ids["query_ids"]
        return fn(q, a, tau, hard_negatives=h, labels=case.labels, **ids, **fixed, **opts)
    return call


def _bsc_mse(case: Case, q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor,
             opts: dict) -> Tensor:
    return bsc_mse_loss(q, a, case.scores, tau, mu=MU, label_threshold=THRESHOLD,
                        hard_negatives=h, **case.ids(), **opts)


def _reference_of(name: str) -> Callable[..., Tensor]:
    if name == "bsc_mse":
        return functools.partial(reference_bsc_mse, mu=MU, threshold=THRESHOLD)
    directions = {"bsc": "both", "bsc_q->a": "q->a", "bsc_a->q": "a->q", "infonce": "q->a",
                  "weince": "both", "weince_q->a": "q->a", "weince_a->q": "a->q"}[name]

    def ref(case: Case, q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor,
            block: int | None = None) -> Tensor:
        return reference_loss(case, q, a, h, tau, directions=directions,
                              weince=name.startswith("weince"), block=block,
                              labels=[float(v) for v in case.labels.tolist()])
    return ref


LOSSES: dict[str, LossCall] = {
    "bsc": _labelled(bsc_loss, directions="both"),
    "bsc_q->a": _labelled(bsc_loss, directions="q->a"),
    "bsc_a->q": _labelled(bsc_loss, directions="a->q"),
    "infonce": _labelled(infonce_loss),
    "weince": _labelled(weince_loss, directions="both"),
    "weince_q->a": _labelled(weince_loss, directions="q->a"),
    "weince_a->q": _labelled(weince_loss, directions="a->q"),
    "bsc_mse": _bsc_mse,
}


def _with_grads(fn: Callable[[Tensor, Tensor, Tensor | None, Tensor], Tensor], case: Case
                ) -> tuple[float, list[Tensor]]:
    """fn's value and its gradients w.r.t. q, a, the hard negatives and tau."""
    leaves = [case.q.clone().requires_grad_(True), case.a.clone().requires_grad_(True)]
    h = None if case.h is None else case.h.clone().requires_grad_(True)
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    loss = fn(leaves[0], leaves[1], h, tau)
    loss.backward()
    inputs = [*leaves, *([h] if h is not None else []), tau]
    # an input the loss does not use (L1 alone: the hard negatives) has gradient 0
    return float(loss.detach()), [torch.zeros_like(x) if x.grad is None else x.grad
                                  for x in inputs]


def _assert_close(got: tuple[float, list[Tensor]], want: tuple[float, list[Tensor]]) -> None:
    assert abs(got[0] - want[0]) <= TOL, (got[0], want[0])
    for g, w in zip(got[1], want[1], strict=True):
        assert float((g - w).abs().max()) <= TOL, float((g - w).abs().max())


@pytest.fixture(scope="module")
def case() -> Case:
    c = make_case(seed=5)
    # The fixture has what the tests are about: groups of 1 to 5 pairs, scattered across
    # the blocks of 4; hard negatives in their own pair's group and in another.
    assert {1, 5} <= {c.groups.count(g) for g in c.groups}
    assert any(len({i // 4 for i, g in enumerate(c.groups) if g == group}) > 1
               for group in set(c.groups))
    assert any(g == c.groups[t // c.k] for t, g in enumerate(c.hard_groups))
    assert any(FRESH > g != c.groups[t // c.k] for t, g in enumerate(c.hard_groups))
    return c


@pytest.mark.parametrize("block", [None, 4], ids=["whole", "blocks4"])
@pytest.mark.parametrize("tile", [None, 5], ids=["dense", "tiled"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_group_masking_matches_brute_force(case: Case, name: str, tile: int | None,
                                           block: int | None) -> None:
    call, ref = LOSSES[name], _reference_of(name)
    opts = {"tile_size": tile, "softmax_batch": block}
    got = _with_grads(lambda q, a, h, tau: call(case, q, a, h, tau, opts), case)
    want = _with_grads(lambda q, a, h, tau: ref(case, q, a, h, tau, block=block), case)
    _assert_close(got, want)
    # The masks matter here: the loss without groups is another number.
    plain = case.ungrouped()
    assert abs(got[0] - float(ref(plain, plain.q, plain.a, plain.h,
                                  torch.tensor(TAU, dtype=torch.float64), block=block))) > 1e-3


@pytest.mark.parametrize("name", ["weince_q->a", "weince_a->q"])
def test_weince_rows_path_rho0_sweep_masks_groups(case: Case, name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows path's rho0 from its sweep (bfloat16 bounds or exact), not the whole matrix."""
    monkeypatch.setattr("batchscale.losses.tiled_weince.WHOLE_MATRIX_ENTRIES", 0)
    call, ref = LOSSES[name], _reference_of(name)
    got = _with_grads(lambda q, a, h, tau: call(case, q, a, h, tau, {"tile_size": 5}), case)
    _assert_close(got, _with_grads(lambda q, a, h, tau: ref(case, q, a, h, tau), case))


def _one_group(k: int) -> Case:
    """Six pairs of one group; the hard negatives (if any) each in a group of its own."""
    c = make_case(m=6, k=k, seed=3)
    return replace(c, groups=[7] * 6, hard_groups=list(range(FRESH, FRESH + 6 * k)),
                   labels=torch.ones(6, dtype=torch.long))


@pytest.mark.parametrize("tile", [None, 2], ids=["dense", "tiled"])
@pytest.mark.parametrize("name", ["bsc", "infonce", "weince", "weince_q->a"])
def test_an_anchor_whose_batch_is_its_group_has_no_negative(name: str, tile: int | None
                                                            ) -> None:
    """Its softmax is its positive alone: l_i = 0 and no gradient (WEINCE: lambda = 0, no
    rho). With fresh hard negatives, L0 sees those alone and L1 (no hard negatives) is 0.

    Dense, exactly 0; tiled, 0 within rounding: its log-sum-exp and softmax are computed
    apart from the positive's logit (the shift from an elementwise product, the gradient's
    grad * e^{g - lse} as e^{g - lse + log grad})."""
    c = _one_group(0)
    loss, grads = _with_grads(lambda q, a, h, tau: LOSSES[name](c, q, a, h, tau,
                                                                {"tile_size": tile}), c)
    rounding = 0.0 if tile is None else 1e-12
    assert abs(loss) <= rounding
    assert all(float(g.abs().max()) <= rounding for g in grads)
    if name.startswith("weince"):
        _, stats = weince_loss(c.q, c.a, TAU, **c.ids(), tile_size=tile, return_stats=True)
        assert stats.anchors == 0
    c = _one_group(3)
    got = _with_grads(lambda q, a, h, tau: LOSSES[name](c, q, a, h, tau, {"tile_size": tile}),
                      c)
    _assert_close(got, _with_grads(lambda q, a, h, tau: _reference_of(name)(c, q, a, h, tau),
                                   c))
    if name == "bsc":  # (L0 + 0) / 2
        half = _with_grads(lambda q, a, h, tau: LOSSES["bsc_q->a"](c, q, a, h, tau, {}), c)
        assert got[0] == pytest.approx(half[0] / 2, abs=TOL)


# -- two gloo ranks ---------------------------------------------------------------------------

RANK_B, RANK_K = 12, 1
# name: (how the rank computes it, loss, rank 0's share of the RANK_B pairs, options).
RANK_SCENARIOS: dict[str, tuple[str, str, int, dict]] = {
    "global-bsc-dense": ("global", "bsc", 5, {"tile_size": None}),
    "global-weince-tiled": ("global", "weince", 7, {"tile_size": 5}),
    "local-bsc": ("local", "bsc", 5, {"tile_size": None}),
    "local-infonce-tiled": ("local", "infonce", 7, {"tile_size": 3}),
    "local-weince-tiled": ("local", "weince", 5, {"tile_size": 4}),
    "blocks-span-bsc": ("blocks", "bsc", 5, {"softmax_batch": 4, "tile_size": None}),
    "blocks-span-weince": ("blocks", "weince", 7, {"softmax_batch": 6, "tile_size": 4}),
    "blocks-inside-bsc": ("blocks", "bsc", 4, {"softmax_batch": 4, "tile_size": 3}),
}
LOSS_FNS = {"bsc": bsc_loss, "infonce": infonce_loss, "weince": weince_loss}


def _rank_case() -> Case:
    return make_case(m=RANK_B, k=RANK_K, seed=11)


def _rank_loss(name: str, case: Case, rows: slice, leaves: list[Tensor]) -> Tensor:
    """This rank's loss of scenario ``name`` on pairs ``rows`` of ``case``."""
    from batchscale.batching.distributed_loss import (
        gathered_pair_loss,
        local_block_loss,
        local_pair_loss,
    )

    how, loss, _, opts = RANK_SCENARIOS[name]
    fn, (q, a, h) = LOSS_FNS[loss], leaves
    ids, labels = case.ids(rows), case.labels[rows]
    if loss == "infonce":
        del ids["query_ids"]
    if how == "global":
        return gathered_pair_loss(fn, q, a, hard_negatives=h, labels=labels, **ids,
                                  temperature=TAU, **opts)
    if how == "blocks":
        return local_block_loss(functools.partial(fn, temperature=TAU, tile_size=opts["tile_size"]),
                                q, a, softmax_batch=opts["softmax_batch"], hard_negatives=h,
                                labels=labels, **ids)

    def row_loss(anchors: Tensor, positives: Tensor, *, hard_negatives: Tensor | None,
                 answer_ids: Tensor | None, anchor_pool: Callable[[Tensor], Tensor]) -> Tensor:
        pool = {"anchor_pool": anchor_pool} if fn is weince_loss else {}
        rows = {} if fn is infonce_loss else {"directions": "q->a"}
        return fn(anchors, positives, TAU, hard_negatives=hard_negatives, labels=labels,
                  answer_ids=answer_ids, **rows, **pool, **opts)

    return local_pair_loss(row_loss, q, a, directions="q->a" if loss == "infonce" else "both",
                           hard_negatives=h, **ids)


def worker_groups(out_dir: str) -> None:
    from batchscale.batching.distributed import init_distributed, shutdown_distributed

    info = init_distributed(backend="gloo", timeout_s=60)
    case = _rank_case()
    results = {}
    for name, (_, _, share, _) in RANK_SCENARIOS.items():
        rows = slice(0, share) if info.rank == 0 else slice(share, RANK_B)
        assert case.h is not None
        leaves = [x.clone().requires_grad_(True) for x in
                  (case.q[rows], case.a[rows], case.h[rows.start * RANK_K : rows.stop * RANK_K])]
        loss = _rank_loss(name, case, rows, leaves)
        loss.backward()
        loss = loss.detach()
        torch.distributed.all_reduce(loss)  # global: W copies; local: the ranks' parts
        # A row's gradient sums every rank's loss: W times one process's (distributed.py).
        results[name] = {"loss": loss / info.world_size,
                         "grads": [x.grad / info.world_size for x in leaves]}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    shutdown_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("groups")
    return run_ranks(HERE, ["groups", str(out)], out)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RANK_SCENARIOS))
def test_two_ranks_equal_the_reference(two_ranks: list[dict], name: str) -> None:
    case = _rank_case()
    _, loss, share, opts = RANK_SCENARIOS[name]
    # groups span the two ranks' shares
    assert set(case.groups[:share]) & set(case.groups[share:])
    block = opts.get("softmax_batch")
    labels = [float(v) for v in case.labels.tolist()]

    def ref(q: Tensor, a: Tensor, h: Tensor | None, tau: Tensor) -> Tensor:
        return reference_loss(case, q, a, h, tau, directions="q->a" if loss == "infonce"
                              else "both", weince=loss == "weince", block=block, labels=labels)

    want_loss, (q_grad, a_grad, h_grad, _) = _with_grads(ref, case)
    for rank, got in enumerate(two_ranks):
        got = got[name]
        rows = slice(0, share) if rank == 0 else slice(share, RANK_B)
        assert abs(float(got["loss"]) - want_loss) <= TOL, rank
        want = [q_grad[rows], a_grad[rows], h_grad[rows.start * RANK_K : rows.stop * RANK_K]]
        for g, w in zip(got["grads"], want, strict=True):
            assert float((g - w).abs().max()) <= TOL, rank
    plain = case.ungrouped()
    unmasked = reference_loss(plain, plain.q, plain.a, plain.h,
                              torch.tensor(TAU, dtype=torch.float64),
                              directions="q->a" if loss == "infonce" else "both",
                              weince=loss == "weince", block=block, labels=labels)
    assert abs(float(unmasked) - want_loss) > 1e-3


if __name__ == "__main__":
    worker_groups(sys.argv[2])
