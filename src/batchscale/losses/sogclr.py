r"""SogCLR: the global contrastive loss with a moving-average partition per example.

Yuan, Wu, Qiu, Du, Zhang, Zhou, Yang, "Provable Stochastic Optimization for Global
Contrastive Learning: Small Batch Does Not Harm Performance", ICML 2022 (arXiv 2202.12387);
the authors' code is github.com/Optimization-AI/SogCLR (``sogclr/builder.py``,
``dynamic_contrastive_loss``) and LibAUC's ``GCLoss``.

The global contrastive objective (GCL) contrasts each anchor with *all* of its negatives:

    F(w) = (1/n) sum_i tau log g_i(w),
    g_i  = mean_{j in S_i^-} exp((s_ij - s_ii) / tau)

(s: similarities after the loss's normalisation; s_ii the anchor's positive). A mini-batch
replaces g_i by g_i(B), the mean over the batch's negatives; since log is concave,
E[tau log g_i(B)] < tau log g_i, a bias that shrinks only as the batch grows, which is why
mini-batch InfoNCE wants a large batch. SogCLR (Algorithm 1) keeps for every training
example a moving average u_i of its g_i across the steps that visit it,

    u_i <- (1 - gamma) u_i + gamma g_i(w_t; B)                      (the u update)
    m_t  = (1/|B|) sum_{i in B} tau / u_i * grad g_i(w_t; B)        (the gradient estimator)

with u_i the value just updated. Here, per anchor i of the batch: the negatives S_i^- are the
other candidates of the batch (and the hard negatives for the rows), minus the masked false
negatives (:func:`~batchscale.losses.batch_softmax.candidate_mask`: a candidate with the id of
the anchor's positive; the positive itself is never a negative); label-aware masking (BSC eq.
5) makes pairs with y_i = 0 non-anchors (their u is not updated, they add nothing, the divisor
stays m); an anchor with no negative left has no g_i (u_i unchanged, l_i = 0, in the divisor).
``directions="both"`` averages the rows (queries against answers) and the columns (answers
against queries), each with its own u; ``"q->a"`` is the InfoNCE-like one-way loss.

Choices, and where they come from:

* **gamma = 0.9** (:data:`SOGCLR_GAMMA`): the authors' default (``--gamma 0.9`` in their
  ``train.py`` and README; LibAUC's ``GCLoss`` too). gamma = 1 is the mini-batch loss.
* **u starts at 0** (log u = -inf), as in the authors' code (``torch.zeros(N)``), so an
  example's first visit gives u = gamma g_i and its gradient is 1 / gamma times the
  mini-batch one. (LibAUC later sets u = g_i on a first visit; not done here.)
* **u is kept as log u**: g_i ~ exp(2 / tau) overflows float32 below tau ~ 0.023, so the
  update is made in log space, log u' = logaddexp(log(1 - gamma) + log u, log gamma +
  log g_i), and log g_i is a log-sum-exp over the negatives.
* **One u per direction**, as LibAUC's two-way ``GCLoss_v2`` (u1, u2); the authors' one-way
  SimCLR code stores the mean of its two views' u in one slot.
* **The gradient** is that of the surrogate tau (g_i(B) / u_i).detach() log g_i(B), i.e.
  tau (g_i / u_i) grad log g_i = tau grad g_i / u_i: the estimator m_t, with log g_i(B) a
  log-sum-exp (no overflow) and the weight g_i / u_i = exp(log g_i - log u_i).
* **The value** returned is tau x (the anchors' mean of log u_i), the moving-average estimate
  of F over the batch's anchors (with the surrogate's gradient attached by x + s - s.detach(),
  s the surrogate): unlike the mini-batch tau log g_i(B), it is SogCLR's own estimate of the
  global objective, and it equals the mini-batch value when gamma = 1.
* **No learnable temperature**: Algorithm 1 fixes tau (a tensor temperature that requires
  grad is refused). **Dense only**: one (m, m + h) matrix per direction (B = 4096: 64 MiB in
  float32), or one (N, N + N k) per softmax block; there is no tiled path.

The function is pure: it takes the batch's anchors' current log u and returns the new
values; the caller (:class:`batchscale.training.objective.Objective`) keeps them per example.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_choice, check_temperature
from .batch_softmax import DIRECTIONS, ContrastiveBatch, Directions, candidate_mask, prepare_batch
from .blocks import PairInputs, block_size
from .similarity import Normalization

#: The authors' default moving-average weight of the new estimate (their ``--gamma``).
SOGCLR_GAMMA = 0.9
CALLER = "sogclr_loss"


def sogclr_directions(directions: str) -> tuple[str, ...]:
    """The directions whose u a loss with ``directions`` keeps, in the order of the rows of
    its state: ``("q->a", "a->q")`` for ``"both"``."""
    check_choice(CALLER, "directions", directions, DIRECTIONS)
    return ("q->a", "a->q") if directions == "both" else (directions,)


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) \
            or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"{CALLER}: `gamma` must be in (0, 1], got {gamma!r}")
    return float(gamma)


def _temperature(temperature: float | Tensor) -> float:
    check_temperature(CALLER, temperature)
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError(f"{CALLER}: the temperature is fixed in SogCLR (Algorithm 1); a "
                         "learnable temperature is not supported")
    return float(temperature)


def _check_state(log_u: object, rows: int, m: int, device: torch.device) -> Tensor:
    if not isinstance(log_u, Tensor) or tuple(log_u.shape) != (rows, m):
        got = tuple(log_u.shape) if isinstance(log_u, Tensor) else type(log_u).__name__
        raise ValueError(f"{CALLER}: `log_u` must have shape ({rows}, {m}) (one row per "
                         f"direction, one column per pair), got {got}")
    if not log_u.is_floating_point() or bool(torch.isnan(log_u).any()) \
            or bool((log_u == math.inf).any()):
        raise ValueError(f"{CALLER}: `log_u` must be floating point, finite or -inf (u = 0)")
    return log_u.to(device)


class _LogMeanExp(torch.autograd.Function):
    """log g_i = log mean_{j kept} exp((s_ij - s_ii) / tau) for each row i of ``sims``, its
    positive s_ii in column i. The forward's softmax buffer becomes the backward's gradient
    in place (one (m, n) buffer, as :mod:`~batchscale.losses.softmax` does)."""

    @staticmethod
    def forward(ctx: Any, sims: Tensor, drop: Tensor | None, tau: float,
                log_count: Tensor) -> Tensor:
        z = sims / tau
        if drop is None:
            z.diagonal().fill_(-math.inf)
        else:
            z.masked_fill_(drop, -math.inf)
        lse = torch.logsumexp(z, dim=1)
        z.sub_(lse[:, None]).exp_()  # the softmax over the kept candidates
        ctx.save_for_backward(z)
        ctx.tau = tau
        return lse - sims.diagonal() / tau - log_count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (p,) = ctx.saved_tensors
        g = grad / ctx.tau
        out = p.mul_(g[:, None])  # d log g_i / d s_ij = p_ij / tau; s_ii: -1 / tau
        out.diagonal().sub_(g)
        return out, None, None, None


def direction_terms(sims: Tensor, mask: Tensor | None, anchors: Tensor, log_u: Tensor,
                    tau: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """One direction: anchors on the rows of ``sims`` (m, n), anchor i's positive in column i.

    Returns (per-anchor value tau log u_i', per-anchor surrogate tau (g_i / u_i') log g_i with
    the weight detached, new log u), zeros and the old log u where i is not an anchor or
    has no negative. ``mask``: which candidates count (False: a false negative)."""
    m = sims.shape[0]
    if mask is None:  # every candidate but the positive (n >= m >= 2: at least one)
        drop = None
        count = torch.full((m,), sims.shape[1] - 1, device=sims.device)
    else:
        drop = ~mask
        drop.diagonal().fill_(True)
        count = mask.shape[1] - drop.sum(dim=1)
        # An anchor without negatives keeps its positive (logit 0) so that its log-sum-exp
        # stays finite; its terms are zeroed below.
        drop.diagonal().copy_(count > 0)
    update = anchors & (count > 0)
    log_g = _LogMeanExp.apply(sims, drop, tau, count.clamp_min(1).to(sims.dtype).log())
    with torch.no_grad():
        g64 = log_g.to(torch.float64)
        old = log_u.to(torch.float64)
        decayed = old + math.log1p(-gamma) if gamma < 1 else torch.full_like(old, -math.inf)
        moved = torch.logaddexp(decayed, g64 + math.log(gamma))
        new = torch.where(update, moved, old)
        weight = torch.where(update, (g64 - new).exp(), 0.0).to(sims.dtype)
        value = torch.where(update, tau * new, 0.0).to(sims.dtype)
    surrogate = tau * weight * log_g  # weight 0 off the updated anchors
    return value, surrogate, new.to(log_u.dtype)


def _attach(value: Tensor, surrogate: Tensor, count: int) -> Tensor:
    """mean value, carrying the surrogate's gradient: v + s - s.detach()."""
    s = surrogate.sum() / count
    return value.sum() / count + (s - s.detach())


def batch_sogclr(batch: ContrastiveBatch, log_u: Tensor, tau: float, gamma: float,
                 directions: Directions) -> tuple[Tensor, Tensor]:
    """The loss and the new log u of a prepared batch (one matrix, every direction)."""
    m, n = batch.m, batch.candidates.shape[0]
    sims = batch.q @ batch.candidates.T
    anchors = torch.ones(m, dtype=torch.bool, device=sims.device) \
        if batch.anchor_weight is None else batch.anchor_weight.to(torch.bool)
    losses, states = [], []
    for d, direction in enumerate(sogclr_directions(directions)):
        if direction == "q->a":
            s, mask = sims, candidate_mask(batch.answer_ids, slice(0, m), slice(0, n))
        else:
            s = sims[:, :m].T
            mask = candidate_mask(batch.query_ids, slice(0, m), slice(0, m))
        value, surrogate, new = direction_terms(s, mask, anchors, log_u[d], tau, gamma)
        losses.append(_attach(value, surrogate, m))
        states.append(new)
    loss = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return loss, torch.stack(states)


def sogclr_loss(q: Tensor, a: Tensor, log_u: Tensor, temperature: float | Tensor = 0.05, *,
                gamma: float = SOGCLR_GAMMA, directions: Directions = "both",
                normalization: Normalization = "l2", hard_negatives: Tensor | None = None,
                labels: Tensor | None = None, label_threshold: float | None = None,
                query_ids: Tensor | None = None, answer_ids: Tensor | None = None,
                softmax_batch: int | None = None) -> tuple[Tensor, Tensor]:
    """SogCLR over a batch of pairs (``q[i]``, ``a[i]``): returns ``(loss, new_log_u)``.

    Args:
        q, a, hard_negatives, labels, label_threshold, query_ids, answer_ids,
        normalization: as :func:`~batchscale.losses.bsc_loss` (false-negative ids: text or
            group ids; labels: pairs with y_i = 0 are not anchors).
        log_u: (D, m) the log of the batch's anchors' moving averages u, one row per direction
            in the order of :func:`sogclr_directions` (rows ``q->a`` then ``a->q`` for
            ``"both"``); -inf is u = 0, an example never visited.
        temperature: tau > 0, fixed (a tensor that requires grad is refused).
        gamma: the weight of the batch's estimate in the u update, in (0, 1].
        directions: ``"both"``, ``"q->a"`` or ``"a->q"``, each direction with its own u.
        softmax_batch: N dividing m: blocks of N consecutive pairs, each anchor's negatives
            those of its block (as :func:`~batchscale.losses.bsc_loss`'s blocks).

    Returns:
        loss: 0-dim, the value tau x mean over the m pairs of log u' (u' the updated u; 0 for
            non-anchors), whose gradient is the SogCLR estimator (1/m) sum_i tau grad g_i / u_i'
            (averaged over the directions).
        new_log_u: (D, m), detached, log u' for the updated anchors and ``log_u`` elsewhere.
    """
    tau = _temperature(temperature)
    gamma = _check_gamma(gamma)
    dirs = sogclr_directions(directions)
    m = q.shape[0] if isinstance(q, Tensor) else 0
    n = block_size(CALLER, softmax_batch, m)
    if n is None:
        batch = prepare_batch(CALLER, q, a, normalization=normalization,
                              hard_negatives=hard_negatives, labels=labels,
                              label_threshold=label_threshold, query_ids=query_ids,
                              answer_ids=answer_ids)
        state = _check_state(log_u, len(dirs), m, batch.q.device)
        return batch_sogclr(batch, state, tau, gamma, directions)
    inputs = PairInputs(CALLER, q, a, hard_negatives=hard_negatives, labels=labels,
                        query_ids=query_ids, answer_ids=answer_ids)
    state = _check_state(log_u, len(dirs), m, inputs.q.device)
    losses, states = [], []
    for start in range(0, m, n):
        block = inputs.rows(start, start + n)
        batch = prepare_batch(CALLER, block.pop("q"), block.pop("a"),
                              normalization=normalization, label_threshold=label_threshold,
                              **block)
        loss, new = batch_sogclr(batch, state[:, start:start + n], tau, gamma, directions)
        losses.append(loss)
        states.append(new)
    return torch.stack(losses).mean(), torch.cat(states, dim=1)
