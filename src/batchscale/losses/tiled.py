r"""Memory-linear batch softmax: the loss of :func:`batch_softmax_loss`, computed over tiles
of the similarity matrix so that no (m, m + h) matrix is ever held.

Forward: one sweep over (row block, column block) tiles keeps, per query row and per answer
column, an online log-sum-exp (running max M and sum Z, rescaled as M grows; Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018):

    M' = max(M, max_j g_ij),   Z' = Z e^{M - M'} + sum_j e^{g_ij - M'},   l_i = log Z + M - g_ii

Backward: the same sweep recomputes each tile's similarities and logits and pushes
dl/ds_ij = (softmax_ij - 1[j = i]) * dg/ds_ij into the embeddings with two matmuls, so memory
is O(B * tile). The logits, their derivative and the false-negative masks come from the same
policy and :func:`candidate_mask` as the dense path. WEINCE's per-anchor lambda is fitted from
each anchor's top-k negatives, taken one strip of anchors (against every candidate) at a
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .batch_softmax import ContrastiveBatch, Directions, candidate_mask
from .logits import LogitBlock, LogitPolicy, WeinceMixture
from .softmax import weighted_anchor_mean
from .weince_tail import TailFit, WeinceConfig, WeinceLambda, fit_tail, mix_lambda, tail_size

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


# --- WEINCE: streaming tail ------------------------------------------------------------------


def _negative_counts(ids: Tensor | None, anchors: int, candidates: int,
                     device: torch.device) -> Tensor:
    """K_i: candidates of anchor i minus its positive (and candidates sharing its id)."""
    if ids is None:
        return torch.full((anchors,), candidates - 1, dtype=torch.long, device=device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return candidates - counts[inverse[:anchors]]


# A tail strip holds at most this many similarities (16 MB in float32). torch.topk with a
# large k keeps several strip-sized buffers, so at B = 32,768 strips of 2^25 peaked at 1.7 GB;
# 2^22 keeps WEINCE under 1 GB there for ~5% more time (measured with
# benchmarks/loss_scaling.py: 2^23 0.94 GB 61 s, 2^21 0.34 GB 65 s).
STRIP_ENTRIES = 1 << 22


def streaming_tail_fit(anchors: Tensor, candidates: Tensor, ids: Tensor | None,
                       cfg: WeinceConfig, tile: int) -> TailFit:
    """Each anchor's tail fit from its top-k negatives, one strip of anchors at a time.

    Anchor i's positive is candidate i; ``ids`` drop false negatives as in the dense path.
    A strip holds min(tile, STRIP_ENTRIES / candidates) anchors against every candidate, so
    memory stays O(B * tile) while each anchor's top-k is taken in one pass."""
    m, n = anchors.shape[0], candidates.shape[0]
    k = tail_size(_negative_counts(ids, m, n, anchors.device), cfg)
    strip = max(1, min(tile, STRIP_ENTRIES // max(n, 1)))
    parts = []
    with torch.no_grad():
        for rows in _blocks(m, strip):
            sims = anchors[rows] @ candidates.T
            diag = _diagonal(rows, slice(0, n), sims.device)
            if diag is not None:
                sims[diag[1], diag[2]] = float("-inf")
            mask = candidate_mask(ids, rows, slice(0, n))
            if mask is not None:
                sims.masked_fill_(~mask, float("-inf"))
            k_block = k[rows]
            top = torch.topk(sims, int(k_block.max()), dim=1, sorted=True).values
            parts.append(fit_tail(top, k_block, cfg))
    return TailFit(*(torch.cat([getattr(p, f) for p in parts]) for f in
                     ("rho", "delta_aic", "fitted", "has_negative")))


def _tail_state(policy: LogitPolicy, anchors: Tensor, candidates: Tensor, ids: Tensor | None,
                is_anchor: Tensor, tile: int) -> WeinceLambda | None:
    cfg = policy.tail
    if cfg is None:
        return None
    fit = streaming_tail_fit(anchors.detach(), candidates.detach(), ids, cfg, tile)
    pool = policy.anchor_pool if isinstance(policy, WeinceMixture) else None
    return mix_lambda(fit, is_anchor, cfg, anchors.dtype, pool)


# --- the tiled softmax cross-entropy ---------------------------------------------------------


@dataclass(frozen=True)
class _Sweep:
    """What a tiled sweep needs besides the tensors autograd tracks."""

    policy: LogitPolicy
    rows: bool                       # L0: queries against all candidates
    cols: bool                       # L1: answers (first m candidates) against queries
    answer_ids: Tensor | None
    query_ids: Tensor | None
    row_state: WeinceLambda | None
    col_state: WeinceLambda | None
    tile: int

    def row_logits(self, sims: Tensor, rows: slice, cols: slice, tau: Tensor) -> LogitBlock:
        """L0: query anchors ``rows`` against candidates ``cols``."""
        return self._masked_logits(sims, self.row_state, self.answer_ids, rows, cols, tau)

    def col_logits(self, sims_t: Tensor, cols: slice, rows: slice, tau: Tensor) -> LogitBlock:
        """L1: answer anchors ``cols`` against queries ``rows``."""
        return self._masked_logits(sims_t, self.col_state, self.query_ids, cols, rows, tau)

    def _masked_logits(self, sims: Tensor, state: WeinceLambda | None, ids: Tensor | None,
                       anchors: slice, candidates: slice, tau: Tensor) -> LogitBlock:
        block = self.policy.logits(sims, None if state is None else state.rows(anchors), tau)
        mask = candidate_mask(ids, anchors, candidates)
        if mask is not None:
            block.logits.masked_fill_(~mask, float("-inf"))
        return block


def _online_logsumexp_(run_max: Tensor, run_sum: Tensor, logits: Tensor) -> None:
    """Fold a tile's logits into the running (max, sum) of each row, in place."""
    new_max = torch.maximum(run_max, logits.amax(dim=1))
    # A row whose candidates so far are all masked has max -inf: shift by 0 instead.
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    run_sum.mul_(torch.exp(run_max - shift)).add_(torch.exp(logits - shift[:, None]).sum(1))
    run_max.copy_(new_max)


class _TiledSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, candidates: Tensor, temperature: Tensor,
                sweep: _Sweep) -> tuple[Tensor, Tensor]:
        m, n = q.shape[0], candidates.shape[0]
        stats = {}
        for name, on in (("rows", sweep.rows), ("cols", sweep.cols)):
            if on:
                stats[name] = (q.new_full((m,), float("-inf")), q.new_zeros(m), q.new_zeros(m))
        for rows in _blocks(m, sweep.tile):
            for cols in _blocks(n, sweep.tile):
                sims = q[rows] @ candidates[cols].T
                diag = _diagonal(rows, cols, sims.device)
                if sweep.rows:
                    run_max, run_sum, positive = stats["rows"]
                    logits = sweep.row_logits(sims, rows, cols, temperature).logits
                    _online_logsumexp_(run_max[rows], run_sum[rows], logits)
                    if diag is not None:
                        positive[diag[0]] = logits[diag[1], diag[2]]
                if sweep.cols and cols.start < m:
                    answers = slice(cols.start, min(cols.stop, m))
                    sims_t = sims[:, : answers.stop - answers.start].T
                    run_max, run_sum, positive = stats["cols"]
                    logits = sweep.col_logits(sims_t, answers, rows, temperature).logits
                    _online_logsumexp_(run_max[answers], run_sum[answers], logits)
                    if diag is not None:
                        positive[diag[0]] = logits[diag[2], diag[1]]
        losses, lse = [], []
        for name in ("rows", "cols"):
            if name in stats:
                run_max, run_sum, positive = stats[name]
                total = run_sum.log() + run_max
                lse.append(total)
                losses.append(total - positive)
            else:
                lse.append(q.new_zeros(0))
                losses.append(q.new_zeros(m))
        ctx.save_for_backward(q, candidates, temperature, *lse)
        ctx.sweep = sweep
        return losses[0], losses[1]

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor, grad_cols: Tensor
                 ) -> tuple[Tensor | None, ...]:
        q, candidates, temperature, lse_rows, lse_cols = ctx.saved_tensors
        sweep: _Sweep = ctx.sweep
        m, n = q.shape[0], candidates.shape[0]
        grad_q, grad_c = torch.zeros_like(q), torch.zeros_like(candidates)
        grad_tau = torch.zeros_like(temperature)
        need_tau = ctx.needs_input_grad[2]

        def grad_of_sims(block, sims: Tensor, lse: Tensor, grad: Tensor,
                         diag: tuple[Tensor, Tensor] | None) -> Tensor:
            nonlocal grad_tau
            g = block.logits.sub_(lse[:, None]).exp_()          # softmax
            if diag is not None:
                g[diag[0], diag[1]] -= 1.0
            g.mul_(grad[:, None])                               # dL/dg
            if need_tau:
                per_row = torch.einsum("ij,ij->i", g, sims)
                if block.tau_weight is not None:
                    per_row = per_row * block.tau_weight
                grad_tau = grad_tau - per_row.sum() / temperature**2
            return g.mul_(block.slope)                          # dL/ds

        for rows in _blocks(m, sweep.tile):
            for cols in _blocks(n, sweep.tile):
                sims = q[rows] @ candidates[cols].T
                diag = _diagonal(rows, cols, sims.device)
                grad_sims = torch.zeros_like(sims)
                if sweep.rows:
                    block = sweep.row_logits(sims, rows, cols, temperature)
                    grad_sims += grad_of_sims(block, sims, lse_rows[rows], grad_rows[rows],
                                              None if diag is None else diag[1:])
                if sweep.cols and cols.start < m:
                    answers = slice(cols.start, min(cols.stop, m))
                    width = answers.stop - answers.start
                    sims_t = sims[:, :width].T
                    block = sweep.col_logits(sims_t, answers, rows, temperature)
                    grad_t = grad_of_sims(block, sims_t, lse_cols[answers], grad_cols[answers],
                                          None if diag is None else (diag[2], diag[1]))
                    grad_sims[:, :width] += grad_t.T
                grad_q[rows] += grad_sims @ candidates[cols]
                grad_c[cols] += grad_sims.T @ q[rows]
        return grad_q, grad_c, (grad_tau if need_tau else None), None


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
    rows, cols = directions in ("both", "q->a"), directions in ("both", "a->q")
    row_state = _tail_state(policy, batch.q, batch.candidates, batch.answer_ids, is_anchor,
                            tile) if rows else None
    col_state = _tail_state(policy, batch.candidates[:m], batch.q, batch.query_ids, is_anchor,
                            tile) if cols else None
    sweep = _Sweep(policy, rows, cols, batch.answer_ids, batch.query_ids, row_state, col_state,
                   tile)
    loss_rows, loss_cols = _TiledSoftmaxCrossEntropy.apply(batch.q, batch.candidates, tau, sweep)
    losses = []
    if rows:
        losses.append(weighted_anchor_mean(loss_rows, batch.anchor_weight, m))
    if cols:
        losses.append(weighted_anchor_mean(loss_cols, batch.anchor_weight, m))
    total = losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2
    return total, [s for s in (row_state, col_state) if s is not None]
