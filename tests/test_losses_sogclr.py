"""SogCLR's loss against its algorithm written as loops (float64): the u update, the value and
the surrogate's gradient, with hard negatives, false-negative ids, label-aware masking and
softmax blocks; gamma = 1 is the mini-batch loss; the first visit from u = 0; no overflow at
small temperatures."""

from __future__ import annotations

import math

import pytest
import torch

from batchscale.losses import SOGCLR_GAMMA, sogclr_directions, sogclr_loss

TAU = 0.1


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def algorithm(q, a, u, tau, gamma, *, directions="both", hard=None, labels=None,
              threshold=None, query_ids=None, answer_ids=None, block=None):
    """One step of SogCLR (Algorithm 1) by explicit loops: per direction and anchor i, g_i is
    the mean of exp((s_ij - s_ii) / tau) over its negatives (the other candidates of its
    block, minus those sharing its positive's id), u_i <- (1 - gamma) u_i + gamma g_i, the
    value tau log u_i and the surrogate tau g_i / u_i (u_i held constant), both summed over
    the anchors and divided by m. ``u``: a list of lists (plain u, 0 = never seen).
    Returns (value, surrogate, new u), value and surrogate averaged over the directions."""
    m = q.shape[0]
    k = 0 if hard is None else hard.shape[0] // m
    n = block or m
    qn, an = _unit(q), _unit(a)
    hn = None if hard is None else _unit(hard)
    values, surrogates, new_u = [], [], []
    for d, direction in enumerate(sogclr_directions(directions)):
        value, surrogate, row = 0.0, 0.0, list(u[d])
        for i in range(m):
            if labels is not None and not (labels[i] > threshold if threshold is not None
                                           else labels[i] == 1):
                continue
            # (vector, id) of the positive and of every candidate of i's block
            lo, hi = i // n * n, i // n * n + n
            if direction == "q->a":
                anchor, positive = qn[i], an[i]
                cands = [(an[j], None if answer_ids is None else int(answer_ids[j]), j == i)
                         for j in range(lo, hi)]
                for p in range(lo, hi):
                    for r in range(k):
                        cands.append((hn[p * k + r], None if answer_ids is None
                                      else int(answer_ids[m + p * k + r]), False))
                own = None if answer_ids is None else int(answer_ids[i])
            else:
                anchor, positive = an[i], qn[i]
                cands = [(qn[j], None if query_ids is None else int(query_ids[j]), j == i)
                         for j in range(lo, hi)]
                own = None if query_ids is None else int(query_ids[i])
            s_pos = torch.dot(anchor, positive)
            terms = [torch.exp((torch.dot(anchor, c) - s_pos) / tau)
                     for c, cid, is_pos in cands if not is_pos and (own is None or cid != own)]
            if not terms:
                continue
            g = sum(terms) / len(terms)
            u_new = (1 - gamma) * row[i] + gamma * float(g.detach())
            row[i] = u_new
            value += tau * math.log(u_new)
            surrogate = surrogate + tau * g / u_new
        values.append(value / m)
        surrogates.append(surrogate / m)
        new_u.append(row)
    return sum(values) / len(values), sum(surrogates) / len(surrogates), new_u


def _inputs(m=6, d=5, k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    hard = torch.randn(m * k, d, generator=g, dtype=torch.float64, requires_grad=True) \
        if k else None
    return q, a, hard


def _state(rows: int, m: int, seed: int = 1) -> list[list[float]]:
    """Plain u: some examples never seen (0), the others positive."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, m, generator=g, dtype=torch.float64) * 3
    u[:, ::3] = 0.0
    return u.tolist()


def _log(u: list[list[float]]) -> torch.Tensor:
    return torch.tensor(u, dtype=torch.float64).log()


def _check(q, a, hard, u, gamma, tau=TAU, **kw) -> None:
    """sogclr_loss against the loops: value, new u and the gradient of every input."""
    loss, new = sogclr_loss(q, a, _log(u), tau, gamma=gamma, hard_negatives=hard,
                            labels=kw.get("labels"), label_threshold=kw.get("threshold"),
                            query_ids=kw.get("query_ids"), answer_ids=kw.get("answer_ids"),
                            directions=kw.get("directions", "both"),
                            softmax_batch=kw.get("block"))
    value, surrogate, want = algorithm(q, a, u, tau, gamma, hard=hard, **kw)
    leaves = [x for x in (q, a, hard) if x is not None]
    got_grads = torch.autograd.grad(loss, leaves)
    want_grads = torch.autograd.grad(surrogate, leaves, allow_unused=True)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(new, _log(want), rtol=1e-12, atol=0)
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_g, torch.zeros_like(got_g) if want_g is None else want_g,
                                   rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("directions", ["both", "q->a", "a->q"])
def test_one_step_is_the_algorithm(directions) -> None:
    q, a, hard = _inputs(k=2)
    rows = len(sogclr_directions(directions))
    _check(q, a, hard, _state(rows, 6), SOGCLR_GAMMA, directions=directions)


def test_false_negatives_labels_and_hard_negatives_are_masked_as_the_algorithm_says() -> None:
    q, a, hard = _inputs(m=8, k=2, seed=3)
    query_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    # the answers' ids, then the hard negatives' (two per pair; some share a group)
    answer_ids = torch.cat([query_ids, torch.tensor([0, 9, 1, 2, 7, 8, 2, 10, 11, 12, 4, 3,
                                                     13, 14, 15, 4])])
    labels = torch.tensor([0.9, 0.2, 0.7, 1.0, 0.5, 0.8, 0.1, 0.6])
    _check(q, a, hard, _state(2, 8, seed=4), 0.7, labels=labels, threshold=0.5,
           query_ids=query_ids, answer_ids=answer_ids)
    # binary labels without a threshold
    _check(q, a, hard, _state(2, 8, seed=5), 0.7, labels=(labels > 0.5).double())


def test_an_anchor_whose_candidates_are_all_in_its_group_keeps_its_u() -> None:
    q, a, hard = _inputs(m=5, k=1, seed=6)
    ids = torch.zeros(5, dtype=torch.long)  # one group: the columns (a->q) have no negative
    u = _state(2, 5, seed=7)
    # the rows keep one negative each: the hard negative outside the group
    _check(q, a, hard, u, 0.9, query_ids=ids,
           answer_ids=torch.cat([ids, torch.tensor([0, 0, 0, 0, 7])]))
    ids = torch.full((5,), 3)  # nobody has a negative: nothing moves, nothing is learnt
    loss, new = sogclr_loss(q, a, _log(u), TAU, query_ids=ids, answer_ids=ids)
    assert float(loss.detach()) == 0.0 and torch.equal(new, _log(u))
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(loss, [q, a]))


def test_softmax_blocks_are_the_algorithm_within_each_block() -> None:
    q, a, hard = _inputs(m=8, k=1, seed=8)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])
    answer_ids = torch.cat([ids, torch.tensor([6, 1, 7, 8, 3, 9, 10, 11])])
    _check(q, a, hard, _state(2, 8, seed=9), 0.8, block=4, query_ids=ids,
           answer_ids=answer_ids)


def test_gamma_one_is_the_mini_batch_loss() -> None:
    """One step with gamma = 1: u = g, so the value and the gradient are those of the
    mini-batch loss tau * mean_i log g_i, here written with tensor ops."""
    q, a, _ = _inputs(m=7, seed=10)
    loss, _ = sogclr_loss(q, a, torch.full((2, 7), -math.inf, dtype=torch.float64), TAU,
                          gamma=1.0)
    s = _unit(q) @ _unit(a).T
    off = ~torch.eye(7, dtype=torch.bool)

    def direct(s: torch.Tensor) -> torch.Tensor:
        z = (s - s.diagonal()[:, None]) / TAU
        return TAU * (z.exp() * off).sum(1).div(6).log().mean()

    want = (direct(s) + direct(s.T)) / 2
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    for got_g, want_g in zip(torch.autograd.grad(loss, [q, a]),
                             torch.autograd.grad(want, [q, a]), strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-14)


def test_a_first_visit_from_zero_is_one_over_gamma_of_the_mini_batch_gradient() -> None:
    """The authors' initialisation u = 0: the first update gives u = gamma g."""
    q, a, _ = _inputs(m=6, seed=11)
    never = torch.full((2, 6), -math.inf, dtype=torch.float64)
    first, new = sogclr_loss(q, a, never, TAU, gamma=0.9)
    plain, g = sogclr_loss(q, a, never, TAU, gamma=1.0)
    torch.testing.assert_close(new, g + math.log(0.9), rtol=1e-12, atol=0)
    assert float(first.detach()) == pytest.approx(float(plain.detach()) + TAU * math.log(0.9),
                                                  rel=1e-12)
    for x, y in zip(torch.autograd.grad(first, [q, a]), torch.autograd.grad(plain, [q, a]),
                    strict=True):
        torch.testing.assert_close(x, y / 0.9, rtol=1e-10, atol=1e-14)


def test_a_second_step_uses_the_first_steps_state() -> None:
    q, a, hard = _inputs(k=1, seed=12)
    _, new = sogclr_loss(q, a, torch.full((2, 6), -math.inf, dtype=torch.float64), TAU,
                         hard_negatives=hard)
    q2, a2, hard2 = _inputs(k=1, seed=13)
    _check(q2, a2, hard2, new.exp().tolist(), SOGCLR_GAMMA)


def test_small_temperatures_do_not_overflow_in_float32() -> None:
    """g ~ exp(2 / tau) is beyond float32 at tau = 0.005: the state and the loss are kept in
    log space, and match the float64 computation."""
    q, a, _ = _inputs(m=6, seed=14)
    q32, a32 = (x.detach().float().requires_grad_() for x in (q, a))
    u = torch.full((2, 6), 250.0)  # log u, u = e^250
    loss32, new32 = sogclr_loss(-q32, a32, u, 0.005)
    loss64, new64 = sogclr_loss(-q, a, u.double(), 0.005)
    assert torch.isfinite(new32).all() and float(new32.max()) > 88  # u itself would overflow
    torch.testing.assert_close(new32.double(), new64, rtol=1e-5, atol=0)
    assert float(loss32.detach()) == pytest.approx(float(loss64.detach()), rel=1e-5)
    (grad32,) = torch.autograd.grad(loss32, [q32])
    (grad64,) = torch.autograd.grad(loss64, [q])
    assert torch.isfinite(grad32).all()
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-3, atol=1e-6)


def test_bad_arguments_are_refused_by_name() -> None:
    q, a, _ = _inputs()
    state = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="sogclr_loss: `log_u` must have shape \\(2, 6\\)"):
        sogclr_loss(q, a, state[:1])
    with pytest.raises(ValueError, match="shape \\(1, 6\\)"):
        sogclr_loss(q, a, state, directions="q->a")
    with pytest.raises(ValueError, match="finite or -inf"):
        sogclr_loss(q, a, torch.full((2, 6), math.nan, dtype=torch.float64))
    for gamma in (0.0, 1.5):
        with pytest.raises(ValueError, match="`gamma` must be in \\(0, 1\\]"):
            sogclr_loss(q, a, state, gamma=gamma)
    with pytest.raises(ValueError, match="learnable temperature is not supported"):
        sogclr_loss(q, a, state, torch.tensor(0.05, requires_grad=True))
    with pytest.raises(ValueError, match="sogclr_loss: `softmax_batch` \\(4\\) must divide"):
        sogclr_loss(q, a, state, softmax_batch=4)
