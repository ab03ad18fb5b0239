r"""Memory-linear batch softmax: the loss of :func:`batch_softmax_loss`, computed over tiles
of the similarity matrix so that no (m, m + h) matrix is ever held.

Forward: a sweep over blocks of the similarity matrix keeps, per query row and per answer
column, an online log-sum-exp (running max M and sum Z, rescaled as M grows; Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018):

    M' = max(M, max_j g_ij),   Z' = Z e^{M - M'} + sum_j e^{g_ij - M'},   l_i = log Z + M - g_ii

Backward: one sweep over (row block, column block) tiles recomputes each tile's similarities
and pushes dl/ds_ij = (softmax_ij - 1[j = i]) * dg/ds_ij of both directions into the
embeddings with two matmuls, so memory is O(B * tile). The logits, their derivative and the
false-negative masks come from the same policy and :func:`candidate_mask` as the dense path.

WEINCE needs each anchor's lambda before its logits, and lambda needs the anchor's top-k
negatives (a whole row, or a whole column) and the batch quantile rho0 of 1 - max negative.
Two forward sweeps give both directions with one matmul each:

1. row strips (a few queries against every candidate): each query's tail and fit, and a
   running max per answer column, whence the columns' rho0;
2. column strips (a few answers against every query): each answer's tail and fit, so its
   lambda (rho0 is known) and its complete log-sum-exp, while the rows' log-sum-exp (their
   lambdas known since sweep 1) runs online across the strips.

With the backward's three matmuls that is five per tile where InfoNCE needs four.

Plain logits g = s / tau need no running max: every logit lies in [-sigma, sigma] with
sigma = max ||q|| max ||c|| / tau (1 / tau for cosines), so while e^{-2 sigma} is a normal
float, exp(g - sigma) loses nothing on any entry, and one exp per tile serves both
directions (the row and the column sums of the same block), in the forward and in the
backward. Masks (ids) or a wider range (float32 and tau < 0.025 for cosines) take the
online path above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .batch_softmax import ContrastiveBatch, Directions, candidate_mask
from .logits import (
    Coefficients,
    LogitPolicy,
    Shortfall,
    WeinceMixture,
    mixed_logits,
    slope_product_,
)
from .softmax import weighted_anchor_mean
from .weince_tail import (
    AnchorPool,
    TailFit,
    WeinceConfig,
    WeinceLambda,
    fit_tail,
    mix_lambda,
    reference_rho,
    rho_from_max,
    sorted_top_values,
    tail_size,
)

DEFAULT_TILE = 1024


def _blocks(total: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, total)) for start in range(0, total, tile)]


def _diagonal(rows: slice, cols: slice, device: torch.device
              ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(global index, row offset, column offset) of the entries i == j inside a tile."""
    lo, hi = max(rows.start, cols.start), min(rows.stop, cols.stop)
    if lo >= hi:
        return None
    idx = torch.arange(lo, hi, device=device)
    return idx, idx - rows.start, idx - cols.start


def _negative_counts(ids: Tensor | None, anchors: int, candidates: int,
                     device: torch.device) -> Tensor:
    """K_i: candidates of anchor i minus its positive (and candidates sharing its id)."""
    if ids is None:
        return torch.full((anchors,), candidates - 1, dtype=torch.long, device=device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return candidates - counts[inverse[:anchors]]


def _masked(block: Tensor, mask: Tensor | None) -> Tensor:
    """``block`` with the entries outside ``mask`` at -inf, in place."""
    return block if mask is None else block.masked_fill_(~mask, float("-inf"))


def _online_logsumexp_(run_max: Tensor, run_sum: Tensor, logits: Tensor, dim: int) -> None:
    """Fold a block's logits into the running (max, sum) of each anchor, in place; the
    anchors lie along ``1 - dim`` and ``dim`` is reduced."""
    new_max = torch.maximum(run_max, logits.amax(dim=dim))
    # An anchor whose candidates so far are all masked has max -inf: shift by 0 instead.
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    weights = logits.sub_(shift.unsqueeze(dim)).exp_()
    run_sum.mul_(torch.exp(run_max - shift)).add_(weights.sum(dim))
    run_max.copy_(new_max)


@dataclass(frozen=True)
class _Plan:
    """What the sweeps need besides the embeddings and the temperature."""

    policy: LogitPolicy
    rows: bool                       # L0: queries against all candidates
    cols: bool                       # L1: answers (first m candidates) against queries
    answer_ids: Tensor | None
    query_ids: Tensor | None
    is_anchor: Tensor                # (m,) bool
    tile: int
    shift: Tensor | None = None      # sigma of the shared-shift plain path (see the docstring)

    def row_mask(self, rows: slice, cols: slice) -> Tensor | None:
        """L0's candidates: queries ``rows`` against candidates ``cols``."""
        return candidate_mask(self.answer_ids, rows, cols)

    def col_mask(self, answers: slice, rows: slice) -> Tensor | None:
        """L1's candidates, transposed to the (queries, answers) layout of a tile."""
        mask = candidate_mask(self.query_ids, answers, rows)
        return None if mask is None else mask.T


@dataclass
class _Direction:
    """One direction's anchors after the forward: what its loss and backward need."""

    lse: Tensor                      # (m,) log-sum-exp of each anchor's logits
    positive: Tensor                 # (m,) each anchor's positive logit
    coef: Coefficients               # the logits' per-anchor constants
    state: WeinceLambda | None


_Directions = _Direction | None       # None: the direction is not computed


def _running(m: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return like.new_full((m,), float("-inf")), like.new_zeros(m), like.new_zeros(m)


def _finish(stats: tuple[Tensor, Tensor, Tensor], coef: Coefficients,
            state: WeinceLambda | None) -> _Direction:
    run_max, run_sum, positive = stats
    return _Direction(run_sum.log() + run_max, positive, coef, state)


# --- plain logits: one forward sweep over tiles -----------------------------------------------


# The widest logit range 2 sigma whose exp(-2 sigma) stays a normal float (min normal e^-87.3
# in float32, e^-708 in float64).
_SHARED_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def _shared_shift(q: Tensor, candidates: Tensor, coef: Coefficients,
                  masked: bool) -> Tensor | None:
    """sigma >= max |g| over the batch for plain logits without masks, or None."""
    limit = _SHARED_RANGE.get(q.dtype)
    if limit is None or coef.mix is not None or masked or q.shape[0] == 0:
        return None
    bound = (coef.scale.abs() * q.norm(dim=1).max() * candidates.norm(dim=1).max()
             ).to(torch.float64)
    # 1e-3 of slack for the rounding of the norms and of the matmul.
    sigma = bound * (1.0 + 1e-3)
    return sigma.to(q.dtype) if 2.0 * float(sigma) <= limit else None


def _shared_exp(sims: Tensor, coef: Coefficients, shift: Tensor) -> Tensor:
    """exp(g - sigma) of a block, a fresh buffer."""
    return mixed_logits(sims, coef, None, -shift).exp_()


def _shared_forward(q: Tensor, candidates: Tensor, coef: Coefficients, plan: _Plan,
                    shift: Tensor) -> tuple[_Directions, _Directions]:
    m, n = q.shape[0], candidates.shape[0]
    row_sum, row_pos = q.new_zeros(m), q.new_zeros(m)
    col_sum = q.new_zeros(m)
    width = n if plan.rows else m
    for r in _blocks(m, plan.tile):
        for c in _blocks(width, plan.tile):
            sims = q[r] @ candidates[c].T
            diag = _diagonal(r, c, sims.device)
            if diag is not None:
                row_pos[diag[0]] = sims[diag[1], diag[2]] * coef.scale
            weights = _shared_exp(sims, coef, shift)
            if plan.rows:
                row_sum[r] += weights.sum(dim=1)
            if plan.cols and c.start < m:
                answers = slice(c.start, min(c.stop, m))
                col_sum[answers] += weights[:, : answers.stop - answers.start].sum(dim=0)

    def direction(total: Tensor) -> _Direction:
        return _Direction(total.log() + shift, row_pos, coef, None)

    return (direction(row_sum) if plan.rows else None,
            direction(col_sum) if plan.cols else None)


def _plain_forward(q: Tensor, candidates: Tensor, tau: Tensor, plan: _Plan
                   ) -> tuple[_Directions, _Directions]:
    m, n = q.shape[0], candidates.shape[0]
    coef = plan.policy.coefficients(None, tau)
    if plan.shift is not None:
        return _shared_forward(q, candidates, coef, plan, plan.shift)
    rows, cols = _running(m, q), _running(m, q)
    for r in _blocks(m, plan.tile):
        for c in _blocks(n, plan.tile):
            sims = q[r] @ candidates[c].T
            diag = _diagonal(r, c, sims.device)
            if plan.rows:
                logits = _masked(mixed_logits(sims, coef, None), plan.row_mask(r, c))
                if diag is not None:
                    rows[2][diag[0]] = logits[diag[1], diag[2]]
                _online_logsumexp_(rows[0][r], rows[1][r], logits, dim=1)
            if plan.cols and c.start < m:
                answers = slice(c.start, min(c.stop, m))
                sub = sims[:, : answers.stop - answers.start]
                logits = _masked(mixed_logits(sub, coef, None), plan.col_mask(answers, r))
                if diag is not None:
                    cols[2][diag[0]] = logits[diag[1], diag[2]]
                _online_logsumexp_(cols[0][answers], cols[1][answers], logits, dim=0)
    return (_finish(rows, coef, None) if plan.rows else None,
            _finish(cols, coef, None) if plan.cols else None)


# --- WEINCE: two forward sweeps in strips -----------------------------------------------------


# A strip holds at most this many similarities (32 MB in float32): whole rows for the tails,
# and enough of them that the strip's matmul runs near the speed of square tiles (256-row
# strips ~10% slower, 128-row ~25% slower, measured at B = 32,768 on one thread).
STRIP_ENTRIES = 1 << 23


def _strip(width: int, tile: int) -> int:
    return max(1, min(tile, STRIP_ENTRIES // max(width, 1)))


# Column width of the matmuls that fill a strip.
_STRIP_MM_COLUMNS = 2048


def _strip_sims(anchors: Tensor, candidates: Tensor, buffer: Tensor) -> Tensor:
    """anchors @ candidates.T, written into the leading rows of a reused strip buffer a block
    of columns at a time. One matmul into a fresh 32 MB strip ran ~50% slower than square
    tiles on two threads (first-touch page faults, and MKL's split of a thin product);
    this runs at tile speed (measured)."""
    out = buffer[: anchors.shape[0]]
    for cols in _blocks(candidates.shape[0], _STRIP_MM_COLUMNS):
        torch.mm(anchors, candidates[cols].T, out=out[:, cols])
    return out


class _Fits:
    """Tail fits of a direction's anchors, strip by strip, with their max negatives."""

    def __init__(self) -> None:
        self.fits: list[TailFit] = []
        self.max_negative: list[Tensor] = []

    def add(self, negatives: Tensor, k: Tensor, cfg: WeinceConfig) -> TailFit:
        """Fit a strip of anchors from their negatives (others at -inf)."""
        top = sorted_top_values(negatives, int(k.max()))
        fit = fit_tail(top, k, cfg)
        self.fits.append(fit)
        # a copy: a view of column 0 would keep the strip's whole sorted tail alive
        self.max_negative.append(top[:, 0].clone() if top.shape[1] else negatives.amax(dim=1))
        return fit

    def fit(self) -> TailFit:
        return TailFit(*(torch.cat([getattr(p, f) for p in self.fits]) for f in
                         ("rho", "delta_aic", "fitted", "has_negative")))


def _cat_lambdas(parts: list[WeinceLambda]) -> WeinceLambda:
    return WeinceLambda(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("lam", "lam_rho", "lam_aic", "delta_aic", "anchors")))


def _row_strips(q: Tensor, candidates: Tensor, plan: _Plan, cfg: WeinceConfig,
                k_rows: Tensor | None) -> tuple[_Fits | None, Tensor | None]:
    """Sweep 1: each query's tail fit (L0) and each answer's max negative (L1)."""
    m = q.shape[0]
    width = candidates.shape[0] if plan.rows else m
    fits = _Fits() if k_rows is not None else None
    col_max = q.new_full((m,), float("-inf")) if plan.cols else None
    height = _strip(width, plan.tile)
    buffer = q.new_empty((min(height, m), width))
    for r in _blocks(m, height):
        sims = _strip_sims(q[r], candidates[:width], buffer)
        diag = _diagonal(r, slice(0, width), sims.device)
        if diag is not None:
            sims[diag[1], diag[2]] = float("-inf")      # the positive, in both directions
        if fits is not None and k_rows is not None:
            mask = plan.row_mask(r, slice(0, width))
            negatives = sims if mask is None else sims.masked_fill(~mask, float("-inf"))
            fits.add(negatives, k_rows[r], cfg)
        if col_max is not None:
            answers = _masked(sims[:, :m], plan.col_mask(slice(0, m), r))
            torch.maximum(col_max, answers.amax(dim=0), out=col_max)
    return fits, col_max


def _fit_without_positive(fits: _Fits, sims: Tensor, mask: Tensor | None,
                          diag: tuple[Tensor, Tensor, Tensor] | None, k: Tensor,
                          cfg: WeinceConfig) -> TailFit:
    """Fit a strip of anchors whose positives lie on ``diag``; ``sims`` is left as it was."""
    if mask is not None:
        negatives = sims.masked_fill(~mask, float("-inf"))
        if diag is not None:
            negatives[diag[1], diag[2]] = float("-inf")
        return fits.add(negatives, k, cfg)
    if diag is None:
        return fits.add(sims, k, cfg)
    # No ids: only the positives differ from the negatives, so hide them in place and put
    # them back rather than copy the strip.
    positives = sims[diag[1], diag[2]]
    sims[diag[1], diag[2]] = float("-inf")
    try:
        return fits.add(sims, k, cfg)
    finally:
        sims[diag[1], diag[2]] = positives


def _shift(policy: LogitPolicy, coef: Coefficients, max_negative: Tensor, positive: Tensor
           ) -> Tensor:
    """Each anchor's largest logit, g(max similarity): g grows with s (scale >= 0, mix <= 0),
    so the log-sum-exp needs no running max (within rounding, which the shift tolerates)."""
    top = torch.maximum(max_negative, positive)[:, None]
    return mixed_logits(top, coef.part(slice(None), 0), policy.shortfall(top, slope=False))[:, 0]


def _answer_anchors(sims_t: Tensor, answers: slice, plan: _Plan, tau: Tensor, k: Tensor,
                    rho0: Tensor, positive_sims: Tensor
                    ) -> tuple[WeinceLambda, Coefficients, Tensor]:
    """L1 in a column strip: the answers' tail fits from their whole columns (the strip's
    first rows), their lambdas (rho0 known since sweep 1), logit coefficients (broadcast
    along the strip's rows) and log-sum-exp shifts."""
    cfg = plan.policy.tail
    assert cfg is not None
    m = sims_t.shape[1]
    fits = _Fits()
    fit = _fit_without_positive(fits, sims_t[: answers.stop - answers.start],
                                candidate_mask(plan.query_ids, answers, slice(0, m)),
                                _diagonal(answers, slice(0, m), sims_t.device), k, cfg)
    state = mix_lambda(fit, plan.is_anchor[answers], cfg, sims_t.dtype, rho0=rho0)
    coef = plan.policy.coefficients(state, tau)
    shift = _shift(plan.policy, coef, fits.max_negative[0], positive_sims)
    return state, coef.part(slice(None), 0), shift


def _anchor_pool(policy: LogitPolicy) -> AnchorPool | None:
    return policy.anchor_pool if isinstance(policy, WeinceMixture) else None


def _weince_forward(q: Tensor, candidates: Tensor, tau: Tensor, plan: _Plan
                    ) -> tuple[_Directions, _Directions]:
    policy, cfg = plan.policy, plan.policy.tail
    assert cfg is not None
    m, n = q.shape[0], candidates.shape[0]
    dev, dtype = q.device, q.dtype
    k_rows = tail_size(_negative_counts(plan.answer_ids, m, n, dev), cfg) if plan.rows else None
    k_cols = tail_size(_negative_counts(plan.query_ids, m, m, dev), cfg) if plan.cols else None
    positive_sims = (q * candidates[:m]).sum(dim=1)
    row_fits, col_max = _row_strips(q, candidates, plan, cfg, k_rows)
    row_state = row_coef = row_shift = None
    if row_fits is not None:
        row_state = mix_lambda(row_fits.fit(), plan.is_anchor, cfg, dtype,
                               anchor_pool=_anchor_pool(policy))
        row_coef = policy.coefficients(row_state, tau)
        row_shift = _shift(policy, row_coef, torch.cat(row_fits.max_negative), positive_sims)
    col_rho0 = None
    if col_max is not None and k_cols is not None:
        col_rho0 = reference_rho(rho_from_max(col_max, k_cols, cfg),
                                 plan.is_anchor & (k_cols > 0), cfg, _anchor_pool(policy))

    # Sweep 2, column strips: sims_t[a, i] = s(q_i, candidate a). The tails need whole
    # strip rows; the logits are taken a tile of queries at a time, so that their passes
    # run in cache (the forward took ~25% less time than over whole strips at B = 8,192).
    row_sum, row_pos = q.new_zeros(m), q.new_zeros(m)
    col_lse, col_pos = q.new_zeros(m), q.new_zeros(m)
    col_states: list[WeinceLambda] = []
    width = n if plan.rows else m
    height = _strip(m, plan.tile)
    buffer = q.new_empty((min(height, width), m))
    for c in _blocks(width, height):
        sims_t = _strip_sims(candidates[c], q, buffer)
        col: tuple[slice, Coefficients, Tensor] | None = None
        if plan.cols and c.start < m:
            assert k_cols is not None and col_rho0 is not None
            answers = slice(c.start, min(c.stop, m))
            state, coef, shift = _answer_anchors(sims_t, answers, plan, tau, k_cols[answers],
                                                 col_rho0, positive_sims[answers])
            col_states.append(state)
            col = (answers, coef, shift)
            col_sum = q.new_zeros(answers.stop - answers.start)
        for chunk in _blocks(m, plan.tile):
            sub = sims_t[:, chunk]
            diag = _diagonal(c, chunk, dev)
            shortfall = policy.shortfall(sub, slope=False)
            if row_coef is not None and row_shift is not None:
                mask = plan.row_mask(chunk, c)
                logits = _masked(mixed_logits(sub, row_coef.part(chunk, 1), shortfall,
                                              -row_shift[None, chunk]),
                                 None if mask is None else mask.T)
                if diag is not None:
                    row_pos[diag[0]] = logits[diag[1], diag[2]] + row_shift[diag[0]]
                row_sum[chunk] += logits.exp_().sum(dim=0)
            if col is not None:
                answers, coef, shift = col
                size = answers.stop - answers.start
                part = None if shortfall is None else Shortfall(shortfall.log[:size], None)
                logits = _masked(mixed_logits(sub[:size], coef, part, -shift[:, None]),
                                 candidate_mask(plan.query_ids, answers, chunk))
                if diag is not None:
                    col_pos[diag[0]] = logits[diag[1], diag[2]] + shift[diag[1]]
                col_sum += logits.exp_().sum(dim=1)
        if col is not None:
            col_lse[col[0]] = col_sum.log() + col[2]
    rows = cols = None
    if row_coef is not None and row_shift is not None:
        rows = _Direction(row_sum.log() + row_shift, row_pos, row_coef, row_state)
    if col_states:
        col_state = _cat_lambdas(col_states)
        cols = _Direction(col_lse, col_pos, policy.coefficients(col_state, tau), col_state)
    return rows, cols



# --- the tiled softmax cross-entropy ---------------------------------------------------------


def _grad_of_logits(sims: Tensor, coef: Coefficients, shortfall: Shortfall | None,
                    mask: Tensor | None, lse: Tensor, grad: Tensor,
                    diag: tuple[Tensor, Tensor] | None, anchors: Tensor | None) -> Tensor:
    """dL/dg = grad * (softmax - onehot(positive)) of a block; ``lse`` and ``grad`` broadcast
    along the anchors' dimension, ``anchors`` indexes them at the ``diag`` entries.

    With grad >= 0 (a loss being minimised) grad * e^{g - lse} = e^{g - lse + log grad}: the
    scaling rides on the bias of the logits instead of a pass of its own."""
    fold = bool((grad >= 0).all())
    bias = grad.log() - lse if fold else -lse
    g = _masked(mixed_logits(sims, coef, shortfall, bias), mask).exp_()
    if not fold:
        g.mul_(grad)
    if diag is not None and anchors is not None:
        g[diag[0], diag[1]] -= grad.reshape(-1)[anchors]
    return g


class _TiledSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, candidates: Tensor, temperature: Tensor, plan: _Plan,
                rows: _Directions, cols: _Directions) -> tuple[Tensor, Tensor]:
        m = q.shape[0]
        losses = [q.new_zeros(m) if d is None else d.lse - d.positive for d in (rows, cols)]
        ctx.save_for_backward(q, candidates, temperature)
        ctx.plan, ctx.directions = plan, (rows, cols)
        return losses[0], losses[1]

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor, grad_cols: Tensor
                 ) -> tuple[Tensor | None, ...]:
        q, candidates, temperature = ctx.saved_tensors
        plan: _Plan = ctx.plan
        rows, cols = ctx.directions
        need_tau = ctx.needs_input_grad[2]
        if plan.shift is not None:
            grad_q, grad_c, tau_term = _shared_backward(q, candidates, plan, rows, cols,
                                                        grad_rows, grad_cols, need_tau)
            grad_tau = -tau_term / temperature**2 if need_tau else None
            return grad_q, grad_c, grad_tau, None, None, None
        m, n = q.shape[0], candidates.shape[0]
        grad_q, grad_c = torch.zeros_like(q), torch.zeros_like(candidates)
        tau_term = q.new_zeros(())          # sum of dL/dg * tau_weight * s

        width = n if rows is not None else m       # L1 has no hard-negative columns
        for r in _blocks(m, plan.tile):
            for c in _blocks(width, plan.tile):
                sims = q[r] @ candidates[c].T
                diag = _diagonal(r, c, sims.device)
                # log(1 - s) and 1 / (1 - s), once for both directions
                shortfall = plan.policy.shortfall(sims, slope=True)
                grad_sims = None
                if rows is not None:
                    coef = rows.coef.part(r, 0)
                    g = _grad_of_logits(sims, coef, shortfall, plan.row_mask(r, c),
                                        rows.lse[r, None], grad_rows[r, None],
                                        None if diag is None else diag[1:],
                                        None if diag is None else diag[1])
                    if need_tau:
                        tau_term = tau_term + _tau_sum(g, sims, coef, dim=1)
                    grad_sims = slope_product_(g, coef, shortfall)
                if cols is not None and c.start < m:
                    answers = slice(c.start, min(c.stop, m))
                    size = answers.stop - answers.start
                    sub = sims[:, :size]
                    part = None if shortfall is None else Shortfall(
                        shortfall.log[:, :size],
                        None if shortfall.inverse is None else shortfall.inverse[:, :size])
                    coef = cols.coef.part(answers, 1)
                    g = _grad_of_logits(sub, coef, part, plan.col_mask(answers, r),
                                        cols.lse[None, answers], grad_cols[None, answers],
                                        None if diag is None else diag[1:],
                                        None if diag is None else diag[2])
                    if need_tau:
                        tau_term = tau_term + _tau_sum(g, sub, coef, dim=0)
                    if grad_sims is None and size < sims.shape[1]:
                        grad_sims = torch.zeros_like(sims)
                    if grad_sims is None:
                        grad_sims = slope_product_(g, coef, part)
                    else:
                        slope_product_(g, coef, part, out=grad_sims[:, :size])
                if grad_sims is None:
                    continue
                grad_q[r] += grad_sims @ candidates[c]
                grad_c[c] += grad_sims.T @ q[r]
        grad_tau = -tau_term / temperature**2 if need_tau else None
        return grad_q, grad_c, grad_tau, None, None, None


def _shared_backward(q: Tensor, candidates: Tensor, plan: _Plan, rows: _Directions,
                     cols: _Directions, grad_rows: Tensor, grad_cols: Tensor, need_tau: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of the shared-shift plain path: dL/dg_ij = w_ij (r_i + c_j) minus the
    positives' grad on the diagonal, with w = exp(g - sigma) once per tile and the per-anchor
    factors r_i = grad_i e^{sigma - lse_i} (rows), c_j likewise (columns)."""
    assert plan.shift is not None
    shift = plan.shift
    m, n = q.shape[0], candidates.shape[0]
    coef = (rows if rows is not None else cols).coef  # type: ignore[union-attr]
    row_factor = None if rows is None else grad_rows * torch.exp(shift - rows.lse)
    col_factor = None if cols is None else grad_cols * torch.exp(shift - cols.lse)
    diag_grad = (grad_rows if rows is not None else 0.0) + (grad_cols if cols is not None else 0.0)
    grad_q, grad_c = torch.zeros_like(q), torch.zeros_like(candidates)
    tau_term = q.new_zeros(())
    width = n if rows is not None else m
    for r in _blocks(m, plan.tile):
        for c in _blocks(width, plan.tile):
            sims = q[r] @ candidates[c].T
            weights = _shared_exp(sims, coef, shift)
            size = max(0, min(c.stop, m) - c.start) if col_factor is not None else 0
            if row_factor is None:
                assert col_factor is not None
                grad_logits = weights.mul_(col_factor[None, c])
            elif size:
                assert col_factor is not None
                grad_logits = torch.mul(weights, row_factor[r, None])
                grad_logits[:, :size].addcmul_(weights[:, :size],
                                               col_factor[None, c.start:c.start + size])
            else:
                grad_logits = weights.mul_(row_factor[r, None])
            diag = _diagonal(r, c, sims.device)
            if diag is not None:
                grad_logits[diag[1], diag[2]] -= diag_grad[diag[0]]
            if need_tau:
                tau_term = tau_term + (grad_logits * sims).sum()
            grad_sims = grad_logits.mul_(coef.scale)
            grad_q[r] += grad_sims @ candidates[c]
            grad_c[c] += grad_sims.T @ q[r]
    return grad_q, grad_c, tau_term


def _tau_sum(grad_logits: Tensor, sims: Tensor, coef: Coefficients, dim: int) -> Tensor:
    """sum_ij dL/dg_ij * tau_weight * s_ij, tau_weight per anchor (anchors along 1 - dim)."""
    per_anchor = (grad_logits * sims).sum(dim)
    if coef.tau_weight is not None:
        per_anchor = per_anchor * coef.tau_weight.reshape(-1)
    return per_anchor.sum()


def tiled_batch_softmax_loss(batch: ContrastiveBatch, temperature: float | Tensor,
                             directions: Directions, policy: LogitPolicy,
                             tile: int = DEFAULT_TILE) -> tuple[Tensor, list[WeinceLambda]]:
    """The same value and gradients as :func:`batch_softmax_loss`, in O(B * tile) memory."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tiled_batch_softmax_loss: `tile` must be a positive int, got {tile!r}")
    m = batch.m
    tau = temperature if isinstance(temperature, Tensor) else torch.tensor(
        float(temperature), dtype=batch.q.dtype, device=batch.q.device)
    tau = tau.to(batch.q.dtype).reshape(())
    is_anchor = (torch.ones(m, dtype=torch.bool, device=batch.q.device)
                 if batch.anchor_weight is None else batch.anchor_weight.to(torch.bool))
    shift = None
    if policy.tail is None:
        shift = _shared_shift(batch.q.detach(), batch.candidates.detach(),
                              policy.coefficients(None, tau.detach()),
                              batch.answer_ids is not None or batch.query_ids is not None)
    plan = _Plan(policy, directions in ("both", "q->a"), directions in ("both", "a->q"),
                 batch.answer_ids, batch.query_ids, is_anchor, tile, shift)
    forward = _plain_forward if policy.tail is None else _weince_forward
    with torch.no_grad():
        rows, cols = forward(batch.q.detach(), batch.candidates.detach(), tau.detach(), plan)
    loss_rows, loss_cols = _TiledSoftmaxCrossEntropy.apply(batch.q, batch.candidates, tau,
                                                          plan, rows, cols)
    losses = []
    if rows is not None:
        losses.append(weighted_anchor_mean(loss_rows, batch.anchor_weight, m))
    if cols is not None:
        losses.append(weighted_anchor_mean(loss_cols, batch.anchor_weight, m))
    total = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return total, [d.state for d in (rows, cols) if d is not None and d.state is not None]
