r"""The tiled forward of WEINCE: two sweeps in strips.

WEINCE needs each anchor's lambda before its logits, and lambda needs the anchor's top-k
negatives (a whole row, or a whole column) and the batch quantile rho0 of 1 - max negative.
Two forward sweeps give both directions with one matmul each:

1. row strips (a few queries against every candidate): each query's tail and fit, and a
   running max per answer column, whence the columns' rho0;
2. column strips (a few answers against every query): each answer's tail and fit, so its
   lambda (rho0 is known) and its complete log-sum-exp, while the rows' log-sum-exp (their
   lambdas known since sweep 1) runs online across the strips.

With the backward's three matmuls that is five per tile where BSC needs four. L0 alone with
its gradient takes one sweep after a bfloat16 one for rho0, or none while the whole matrix
fits in one strip (:func:`weince_strip_constants`, used by
:mod:`~batchscale.losses.tiled_rows`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .batch_softmax import candidate_mask
from .candidates import keep_negatives_
from .logits import Coefficients, LogitPolicy, Shortfall, gather_anchors_of, mixed_logits
from .tile_plan import (
    STRIP_ENTRIES,
    DirectionState,
    MaybeDirection,
    TilePlan,
    blocks,
    diagonal,
    masked_,
    negatives_per_anchor,
    strip_height,
    strip_sims,
)
from .weince_rho0 import row_rho0
from .weince_tail import (
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


class _Fits:
    """Tail fits of a direction's anchors, strip by strip, with their max negatives."""

    def __init__(self) -> None:
        self.fits: list[TailFit] = []
        self.max_negative: list[Tensor] = []
        self._scratch: Tensor | None = None     # the fits' float64 shortfalls, strip to strip

    def add(self, negatives: Tensor, k: Tensor, cfg: WeinceConfig) -> TailFit:
        """Fit a strip of anchors from their negatives (others at -inf)."""
        top = sorted_top_values(negatives, int(k.max()))
        if self._scratch is None or self._scratch.numel() < top.numel():
            self._scratch = top.new_empty(top.numel(), dtype=torch.float64)
        fit = fit_tail(top, k, cfg, self._scratch)
        self.fits.append(fit)
        # a copy: a view of column 0 would keep the strip's whole sorted tail alive
        self.max_negative.append(top[:, 0].clone() if top.shape[1] else negatives.amax(dim=1))
        return fit

    def fit(self) -> TailFit:
        return TailFit(*(torch.cat([getattr(p, f) for p in self.fits]) for f in
                         ("rho", "delta_aic", "fitted", "has_negative")))


def cat_lambdas(parts: list[WeinceLambda]) -> WeinceLambda:
    return WeinceLambda(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("lam", "lam_rho", "lam_aic", "delta_aic", "anchors")))


def _row_strips(q: Tensor, candidates: Tensor, plan: TilePlan, cfg: WeinceConfig,
                k_rows: Tensor | None) -> tuple[_Fits | None, Tensor | None]:
    """Sweep 1: each query's tail fit (L0) and each answer's max negative (L1)."""
    m = q.shape[0]
    width = candidates.shape[0] if plan.rows else m
    fits = _Fits() if k_rows is not None else None
    col_max = q.new_full((m,), float("-inf")) if plan.cols else None
    height = strip_height(width, plan.tile)
    buffer = q.new_empty((min(height, m), width))
    for r in blocks(m, height):
        sims = strip_sims(q[r], candidates[:width], buffer)
        diag = diagonal(r, slice(0, width), sims.device)
        # the positive, in both directions
        keep_negatives_(sims, None if diag is None else diag[1:], None)
        if fits is not None and k_rows is not None:
            mask = plan.row_mask(r, slice(0, width))
            negatives = sims if mask is None else keep_negatives_(sims.clone(), None, ~mask)
            fits.add(negatives, k_rows[r], cfg)
        if col_max is not None:
            answers = masked_(sims[:, :m], plan.col_mask(slice(0, m), r))
            torch.maximum(col_max, answers.amax(dim=0), out=col_max)
    return fits, col_max


def _fit_without_positive(fits: _Fits, sims: Tensor, mask: Tensor | None,
                          diag: tuple[Tensor, Tensor, Tensor] | None, k: Tensor,
                          cfg: WeinceConfig) -> TailFit:
    """Fit a strip of anchors whose positives lie on ``diag``; ``sims`` is left as it was."""
    positions = None if diag is None else diag[1:]
    if mask is not None:
        return fits.add(keep_negatives_(sims.clone(), positions, ~mask), k, cfg)
    if positions is None:
        return fits.add(sims, k, cfg)
    # No ids: only the positives differ from the negatives, so hide them in place and put
    # them back rather than copy the strip.
    positives = sims[positions]
    keep_negatives_(sims, positions, None)
    try:
        return fits.add(sims, k, cfg)
    finally:
        sims[positions] = positives


def _shift(policy: LogitPolicy, coef: Coefficients, max_negative: Tensor, positive: Tensor
           ) -> Tensor:
    """Each anchor's largest logit, g(max similarity): g grows with s (scale >= 0, mix <= 0),
    so the log-sum-exp needs no running max (within rounding, which the shift tolerates)."""
    top = torch.maximum(max_negative, positive)[:, None]
    return mixed_logits(top, coef.part(slice(None), 0), policy.shortfall(top, slope=False))[:, 0]


def _answer_anchors(sims_t: Tensor, answers: slice, plan: TilePlan, tau: Tensor, k: Tensor,
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
                                diagonal(answers, slice(0, m), sims_t.device), k, cfg)
    state = mix_lambda(fit, plan.is_anchor[answers], cfg, sims_t.dtype, rho0=rho0)
    coef = plan.policy.coefficients(state, tau)
    shift = _shift(plan.policy, coef, fits.max_negative[0], positive_sims)
    return state, coef.part(slice(None), 0), shift


def _row_lambdas(fits: _Fits, plan: TilePlan, tau: Tensor, positive_sims: Tensor
                 ) -> tuple[WeinceLambda, Coefficients, Tensor]:
    """L0's lambdas (rho0 over every query), logit coefficients and log-sum-exp shifts."""
    policy, cfg = plan.policy, plan.policy.tail
    assert cfg is not None
    state = mix_lambda(fits.fit(), plan.is_anchor, cfg, positive_sims.dtype,
                       gather_anchors=gather_anchors_of(policy))
    coef = policy.coefficients(state, tau)
    return state, coef, _shift(policy, coef, torch.cat(fits.max_negative), positive_sims)


# L0 keeps the whole similarity matrix up to one strip's size (64 MB in float32).
WHOLE_MATRIX_ENTRIES = STRIP_ENTRIES


def weince_strip_constants(q: Tensor, candidates: Tensor, tau: Tensor, plan: TilePlan,
                           states: list[WeinceLambda]
                           ) -> tuple[Callable[[slice, Tensor], tuple[Coefficients, Tensor]],
                                      Tensor | None]:
    """L0 alone in one sweep of whole-row strips: rho0 first (a bfloat16 sweep, see
    :mod:`~batchscale.losses.weince_rho0`), then each strip's tail fits, lambdas (appended
    to ``states``), logit coefficients and log-sum-exp shifts, from its own similarities.

    Returns the strips' constants, and the similarities when the whole matrix fits in one
    strip's budget (B <= 4,096 without hard negatives, in float32): then they are computed
    once, here, every tail is fitted from them and the sweep reuses them, so L0 costs
    InfoNCE's three matmuls and no bfloat16 sweep. The test is on the candidates alone,
    the same on every rank, so that all ranks make the same all-gathers for rho0."""
    policy, cfg = plan.policy, plan.policy.tail
    assert cfg is not None and plan.rows and not plan.cols
    m, n = q.shape[0], candidates.shape[0]
    k = tail_size(negatives_per_anchor(plan.answer_ids, m, n, q.device), cfg)
    everything = slice(0, n)
    if n * n <= WHOLE_MATRIX_ENTRIES:
        return _whole_matrix_constants(q, candidates, tau, plan, k, states)
    rho0 = row_rho0(q, candidates, plan, k, cfg, gather_anchors_of(policy))

    fits = _Fits()

    def constants(rows: slice, sims: Tensor) -> tuple[Coefficients, Tensor]:
        diag = diagonal(rows, everything, sims.device)
        fit = _fit_without_positive(fits, sims, plan.row_mask(rows, everything), diag,
                                    k[rows], cfg)
        state = mix_lambda(fit, plan.is_anchor[rows], cfg, sims.dtype, rho0=rho0)
        states.append(state)
        coef = policy.coefficients(state, tau)
        assert diag is not None                  # row i's positive is candidate i
        shift = _shift(policy, coef, fits.max_negative[-1], sims[diag[1], diag[2]])
        return coef.part(slice(None), 0), shift[:, None]

    return constants, None


def _whole_matrix_constants(q: Tensor, candidates: Tensor, tau: Tensor, plan: TilePlan,
                            k: Tensor, states: list[WeinceLambda]
                            ) -> tuple[Callable[[slice, Tensor], tuple[Coefficients, Tensor]],
                                       Tensor]:
    """:func:`weince_strip_constants` from the whole similarity matrix, kept for the sweep:
    every tail in one fit, rho0 from the exact max negatives, as the dense path does."""
    cfg = plan.policy.tail
    assert cfg is not None
    m, n = q.shape[0], candidates.shape[0]
    sims = q.new_empty((m, n))
    height = strip_height(n, plan.tile)
    for r in blocks(m, height):
        strip_sims(q[r], candidates, sims[r])
    fits = _Fits()
    diag = diagonal(slice(0, m), slice(0, n), q.device)
    assert diag is not None                      # row i's positive is candidate i
    _fit_without_positive(fits, sims, plan.row_mask(slice(0, m), slice(0, n)), diag, k, cfg)
    state, coef, shift = _row_lambdas(fits, plan, tau, sims[diag[1], diag[2]])
    states.append(state)

    def constants(rows: slice, strip: Tensor) -> tuple[Coefficients, Tensor]:
        return coef.part(rows, 0), shift[rows, None]

    return constants, sims


def weince_forward(q: Tensor, candidates: Tensor, tau: Tensor, plan: TilePlan
                   ) -> tuple[MaybeDirection, MaybeDirection]:
    policy, cfg = plan.policy, plan.policy.tail
    assert cfg is not None
    m, n = q.shape[0], candidates.shape[0]
    dev = q.device
    k_rows = tail_size(negatives_per_anchor(plan.answer_ids, m, n, dev), cfg) if plan.rows else None
    k_cols = tail_size(negatives_per_anchor(plan.query_ids, m, m, dev), cfg) if plan.cols else None
    positive_sims = (q * candidates[:m]).sum(dim=1)
    row_fits, col_max = _row_strips(q, candidates, plan, cfg, k_rows)
    row_state = row_coef = row_shift = None
    if row_fits is not None:
        row_state, row_coef, row_shift = _row_lambdas(row_fits, plan, tau, positive_sims)
    col_rho0 = None
    if col_max is not None and k_cols is not None:
        col_rho0 = reference_rho(rho_from_max(col_max, k_cols, cfg),
                                 plan.is_anchor & (k_cols > 0), cfg, gather_anchors_of(policy))

    # Sweep 2, column strips: sims_t[a, i] = s(q_i, candidate a). The tails need whole
    # strip rows; the logits are taken a tile of queries at a time, so that their passes
    # run in cache (the forward took ~25% less time than over whole strips at B = 8,192).
    row_sum, row_pos = q.new_zeros(m), q.new_zeros(m)
    col_lse, col_pos = q.new_zeros(m), q.new_zeros(m)
    col_states: list[WeinceLambda] = []
    width = n if plan.rows else m
    height = strip_height(m, plan.tile)
    buffer = q.new_empty((min(height, width), m))
    for c in blocks(width, height):
        sims_t = strip_sims(candidates[c], q, buffer)
        col: tuple[slice, Coefficients, Tensor] | None = None
        if plan.cols and c.start < m:
            assert k_cols is not None and col_rho0 is not None
            answers = slice(c.start, min(c.stop, m))
            state, coef, shift = _answer_anchors(sims_t, answers, plan, tau, k_cols[answers],
                                                 col_rho0, positive_sims[answers])
            col_states.append(state)
            col = (answers, coef, shift)
            col_sum = q.new_zeros(answers.stop - answers.start)
        for chunk in blocks(m, plan.tile):
            sub = sims_t[:, chunk]
            diag = diagonal(c, chunk, dev)
            shortfall = policy.shortfall(sub, slope=False)
            if row_coef is not None and row_shift is not None:
                mask = plan.row_mask(chunk, c)
                logits = masked_(mixed_logits(sub, row_coef.part(chunk, 1), shortfall,
                                              -row_shift[None, chunk]),
                                 None if mask is None else mask.T)
                if diag is not None:
                    row_pos[diag[0]] = logits[diag[1], diag[2]] + row_shift[diag[0]]
                row_sum[chunk] += logits.exp_().sum(dim=0)
            if col is not None:
                answers, coef, shift = col
                size = answers.stop - answers.start
                part = None if shortfall is None else Shortfall(shortfall.log[:size], None)
                logits = masked_(mixed_logits(sub[:size], coef, part, -shift[:, None]),
                                 candidate_mask(plan.query_ids, answers, chunk))
                if diag is not None:
                    col_pos[diag[0]] = logits[diag[1], diag[2]] + shift[diag[1]]
                col_sum += logits.exp_().sum(dim=1)
        if col is not None:
            col_lse[col[0]] = col_sum.log() + col[2]
    rows = cols = None
    if row_coef is not None and row_shift is not None:
        rows = DirectionState(row_sum.log() + row_shift, row_pos, row_coef, row_state)
    if col_states:
        col_state = cat_lambdas(col_states)
        cols = DirectionState(col_lse, col_pos, policy.coefficients(col_state, tau), col_state)
    return rows, cols
