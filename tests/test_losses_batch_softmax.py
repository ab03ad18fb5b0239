"""BSC, InfoNCE and WEINCE on pairs against loop-by-loop float64 references."""

import numpy as np
import pytest
import torch

from batchscale.losses import (
    LearnableTemperature,
    WeinceConfig,
    bsc_loss,
    infonce_loss,
    nt_xent,
    weince_loss,
)
from batchscale.losses.logits import WeinceMixture
from batchscale.losses.pair_loss import pair_loss
from batchscale.losses.weince_tail import WeinceLambda, weince_lambda
from loss_reference import pair_loss_reference


def _pairs(m: int, d: int = 8, seed: int = 0, hard: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = q + 0.7 * torch.randn(m, d, generator=g, dtype=torch.float64)
    h = torch.randn(hard, d, generator=g, dtype=torch.float64) if hard else None
    return q, a, h


@pytest.mark.parametrize("directions", ["both", "q->a", "a->q"])
@pytest.mark.parametrize("normalization", ["l2", "coord", "none"])
def test_bsc_matches_formula(directions: str, normalization: str) -> None:
    q, a, _ = _pairs(7, seed=1)
    tau = 0.7 if normalization != "l2" else 0.1
    got = bsc_loss(q, a, temperature=tau, directions=directions, normalization=normalization)
    ref = pair_loss_reference(q.numpy(), a.numpy(), tau, directions=directions,
                              normalization=normalization)
    assert got.ndim == 0
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_infonce_is_rows_only_and_equals_formula() -> None:
    q, a, h = _pairs(6, seed=2, hard=4)
    got = infonce_loss(q, a, temperature=0.05, hard_negatives=h)
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.05, directions="q->a", hard=h.numpy())
    assert got.item() == pytest.approx(ref, rel=1e-12)
    assert got.item() == pytest.approx(
        bsc_loss(q, a, 0.05, directions="q->a", hard_negatives=h).item(), rel=0, abs=0)


def test_hard_negatives_as_matrix_or_per_anchor() -> None:
    q, a, h = _pairs(5, seed=3, hard=10)
    flat = bsc_loss(q, a, 0.1, hard_negatives=h)
    per_anchor = bsc_loss(q, a, 0.1, hard_negatives=h.reshape(5, 2, 8))
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.1, hard=h.numpy())
    assert flat.item() == pytest.approx(ref, rel=1e-12)
    assert per_anchor.item() == flat.item()


def test_label_masking_is_eq5() -> None:
    q, a, _ = _pairs(8, seed=4)
    labels = [1, 0, 1, 1, 0, 1, 1, 1]
    got = bsc_loss(q, a, 0.1, labels=torch.tensor(labels))
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.1, labels=labels)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    # Divided by m, not by the number of anchors: the per-anchor cross-entropies written out
    # (rows and columns, every candidate kept), summed over the anchors, over 2 x 8.
    keep = [i for i, y in enumerate(labels) if y]
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    an = torch.nn.functional.normalize(a.double(), dim=1)
    logits = qn @ an.T / 0.1
    ce = [float(torch.logsumexp(logits[i], 0) - logits[i, i])
          + float(torch.logsumexp(logits[:, i], 0) - logits[i, i]) for i in keep]
    assert got.item() == pytest.approx(sum(ce) / (2 * 8), rel=1e-9)
    assert got.item() != pytest.approx(sum(ce) / (2 * len(keep)), rel=1e-3)
    # Labelled negatives stay candidates: dropping the pairs from the batch changes the loss.
    dropped = bsc_loss(q[keep], a[keep], 0.1) * len(keep) / 8
    assert got.item() != pytest.approx(dropped.item(), rel=1e-3)
    # ... and are never anchors: the row of q_1 and the column of a_1 contribute nothing, so
    # moving q_1 only changes the loss through L1's candidates, never through its own row.
    q_leaf = q.clone().requires_grad_(True)
    bsc_loss(q_leaf, a, 0.1, labels=torch.tensor(labels), directions="q->a").backward()
    assert torch.count_nonzero(q_leaf.grad[1]) == 0


def test_graded_labels_use_threshold() -> None:
    q, a, _ = _pairs(6, seed=5)
    scores = torch.tensor([0.9, 0.2, 0.61, 0.6, 1.0, 0.0], dtype=torch.float64)
    got = bsc_loss(q, a, 0.1, labels=scores, label_threshold=0.6)
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.1, labels=[1, 0, 1, 0, 1, 0])
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_false_negatives_are_removed_by_text_id() -> None:
    q, a, h = _pairs(6, seed=6, hard=3)
    a[3] = a[1]                       # the same answer text twice
    h[0] = a[4]
    answer_ids = [0, 1, 2, 1, 4, 5, 6, 4, 8]
    query_ids = [0, 1, 0, 3, 4, 5]    # q_0 and q_2 are the same text
    q[2] = q[0]
    got = bsc_loss(q, a, 0.1, hard_negatives=h, answer_ids=torch.tensor(answer_ids),
                   query_ids=torch.tensor(query_ids))
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.1, hard=h.numpy(), answer_ids=answer_ids,
                              query_ids=query_ids)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    assert got.item() != pytest.approx(bsc_loss(q, a, 0.1, hard_negatives=h).item(), rel=1e-3)


def test_bsc_is_invariant_to_batch_permutation() -> None:
    q, a, h = _pairs(9, seed=7, hard=4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    base = bsc_loss(q, a, 0.05, hard_negatives=h)
    permuted = bsc_loss(q[perm], a[perm], 0.05, hard_negatives=h[torch.tensor([2, 0, 3, 1])])
    assert permuted.item() == pytest.approx(base.item(), rel=1e-13)
    w_base = weince_loss(q, a, 0.05, hard_negatives=h)
    w_perm = weince_loss(q[perm], a[perm], 0.05, hard_negatives=h[torch.tensor([2, 0, 3, 1])])
    assert w_perm.item() == pytest.approx(w_base.item(), rel=1e-12)


@pytest.mark.parametrize("directions", ["both", "q->a", "a->q"])
def test_weince_pairs_match_reference(directions: str) -> None:
    q, a, h = _pairs(14, d=6, seed=8, hard=5)
    labels = [1] * 14
    labels[3] = 0
    got, stats = weince_loss(q, a, 0.1, directions=directions, hard_negatives=h,
                             labels=torch.tensor(labels), return_stats=True)
    ref = pair_loss_reference(q.numpy(), a.numpy(), 0.1, directions=directions, hard=h.numpy(),
                              labels=labels, weince=True)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    assert stats.anchors == 13 * (2 if directions == "both" else 1)
    assert 0.0 < stats.mean_lambda < 1.0


class _FixedLambda(WeinceMixture):
    """WEINCE logits with lambda held at given values (what stop-gradient means)."""

    def __init__(self, lam: list[torch.Tensor]) -> None:
        super().__init__(WeinceConfig())
        object.__setattr__(self, "_lam", list(lam))

    def row_state(self, sims, positive_index, candidate_mask, anchors):
        lam = self._lam.pop(0)
        zero = torch.zeros_like(lam)
        return WeinceLambda(lam, zero, zero, zero, anchors)


def _pair_loss_with(policy, q, a, h=None):
    loss, _ = pair_loss("test", q, a, 0.1, directions="both", normalization="l2",
                        hard_negatives=h, labels=None, label_threshold=None, query_ids=None,
                        answer_ids=None, policy=policy)
    return loss


def test_weince_with_lambda_zero_is_infonce_exactly() -> None:
    q, a, h = _pairs(10, seed=9, hard=3)
    zeros = torch.zeros(10, dtype=torch.float64)
    forced = _pair_loss_with(_FixedLambda([zeros, zeros]), q, a, h)
    assert torch.equal(forced, bsc_loss(q, a, 0.1, hard_negatives=h))
    # Anchors with too few negatives to fit a tail fall back to lambda = 0 by themselves.
    q3, a3, _ = _pairs(3, seed=10)
    assert torch.equal(weince_loss(q3, a3, 0.1), bsc_loss(q3, a3, 0.1))
    z = torch.randn(2, 5, dtype=torch.float64)
    assert torch.equal(nt_xent(z, z + 0.1, 0.5, method="weince"),
                       nt_xent(z, z + 0.1, 0.5, method="infonce"))


def test_gradcheck_bsc_infonce_and_temperature() -> None:
    q, a, h = _pairs(5, d=4, seed=11, hard=2)
    tau = torch.tensor(0.2, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1, 1])
    for fn in (
        lambda q, a, h, t: bsc_loss(q, a, t, hard_negatives=h, labels=labels),
        lambda q, a, h, t: bsc_loss(q, a, t, normalization="coord"),
        lambda q, a, h, t: bsc_loss(q, a, t, normalization="none", directions="a->q"),
        lambda q, a, h, t: infonce_loss(q, a, t, hard_negatives=h),
        lambda q, a, h, t: nt_xent(q, a, t),
        lambda q, a, h, t: bsc_loss(q, a, t, hard_negatives=h, query_ids=torch.tensor(
            [0, 1, 0, 2, 3]), answer_ids=torch.tensor([0, 1, 2, 1, 4, 5, 2])),
    ):
        inputs = tuple(x.clone().requires_grad_(True) for x in (q, a, h, tau))
        assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_weince_with_lambda_held() -> None:
    q, a, h = _pairs(12, d=4, seed=12, hard=3)
    _, stats = weince_loss(q, a, 0.1, hard_negatives=h, return_stats=True)
    # lambda is a constant of the gradient: check the gradient at fixed lambda.
    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    target = torch.arange(12)
    lam_rows = weince_lambda(unit(q) @ unit(torch.cat([a, h])).T, target)
    lam_cols = weince_lambda(unit(a) @ unit(q).T, target)
    frozen = _pair_loss_with(_FixedLambda([lam_rows.lam, lam_cols.lam]), q, a, h)
    assert frozen.item() == pytest.approx(weince_loss(q, a, 0.1, hard_negatives=h).item(),
                                          rel=1e-14)
    assert stats.mean_lambda == pytest.approx(
        float(torch.cat([lam_rows.lam, lam_cols.lam]).mean()), rel=1e-12)

    def fn(q, a, h):
        return _pair_loss_with(_FixedLambda([lam_rows.lam, lam_cols.lam]), q, a, h)

    inputs = tuple(x.clone().requires_grad_(True) for x in (q, a, h))
    assert torch.autograd.gradcheck(fn, inputs)


def test_weince_factor_variants_and_constants() -> None:
    q, a, _ = _pairs(40, d=6, seed=13)
    _, both = weince_loss(q, a, 0.1, return_stats=True)
    _, rho = weince_loss(q, a, 0.1, factors="rho", return_stats=True)
    _, aic = weince_loss(q, a, 0.1, factors="aic", return_stats=True)
    assert rho.mean_lambda == pytest.approx(both.mean_lambda_rho, rel=1e-12)
    assert aic.mean_lambda == pytest.approx(both.mean_lambda_aic, rel=1e-12)
    _, sharp = weince_loss(q, a, 0.1, kappa_rho=20.0, margin=6.0, quantile=0.5,
                           return_stats=True)
    assert sharp.mean_lambda != pytest.approx(both.mean_lambda, rel=1e-6)


def test_learnable_temperature_trains_and_clamps() -> None:
    q, a, _ = _pairs(6, seed=14)
    temp = LearnableTemperature(initial=0.1, min_temperature=0.02, max_temperature=0.5)
    assert float(temp().detach()) == pytest.approx(0.1)
    loss = bsc_loss(q.float(), a.float(), temp())
    loss.backward()
    # d loss / d (1/tau) by the chain rule through tau = 1/s: compare to finite differences.
    s = float(temp.inverse_temperature.detach())
    h = 1e-3
    num = (bsc_loss(q, a, 1 / (s + h)) - bsc_loss(q, a, 1 / (s - h))).item() / (2 * h)
    assert temp.inverse_temperature.grad.item() == pytest.approx(num, rel=1e-3)
    with torch.no_grad():
        temp.inverse_temperature.fill_(1000.0)
    assert float(temp().detach()) == pytest.approx(0.02)
    temp.clamp_()
    assert float(temp.inverse_temperature.detach()) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="min_temperature"):
        LearnableTemperature(initial=1.0, min_temperature=0.01, max_temperature=0.5)


def test_float32_matches_float64() -> None:
    q, a, h = _pairs(64, d=32, seed=15, hard=16)
    a = a + 3.0 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    for fn in (bsc_loss, weince_loss):
        lo = fn(q.float(), a.float(), 0.05, hard_negatives=h.float())
        hi = fn(q, a, 0.05, hard_negatives=h)
        assert lo.dtype == torch.float32
        assert hi.item() > 1.0
        assert lo.item() == pytest.approx(hi.item(), rel=1e-5)


def test_reference_sanity() -> None:
    # The reference itself: identical q and a, orthogonal pairs -> loss = log(1 + (m-1) e^0 /
    # e^(1/tau)) per row.
    q = np.eye(4)
    ref = pair_loss_reference(q, q, 1.0)
    assert ref == pytest.approx(np.log(np.e + 3) - 1.0)
