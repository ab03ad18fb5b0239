r"""The tail fit behind WEINCE: each anchor's lambda in the extreme-value ("t-lambda
select") correction of InfoNCE.

Erol, Evren, Ozel, Morgan, Ryu, Zheng, "When Softmax Fails at the Top: Extreme Value
Corrections for InfoNCE", ICML 2026 (arXiv 2606.00262).

Each anchor i mixes the usual scaled cosine with a log-shortfall logit,

    g_ij = (1 - lambda_i) * s_ij / tau + lambda_i * (-log(1 - min(s_ij, 1 - eps))),

and the loss is the cross-entropy of the positive over g_i. ``lambda_i`` is a constant for
the gradient (computed under ``no_grad``), the product of

* a rho factor, sigmoid(kappa_rho * (log rho0 - log rho_i)), where rho_i = 1 - max negative
  similarity and rho0 is the q-quantile of rho over the batch's anchors, and
* an AIC factor, sigmoid(kappa_aic * (dAIC_i - margin)), where dAIC_i = AIC_Gumbel - AIC_Weibull
  compares least-squares fits of the anchor's top-k negative shortfalls to a Weibull
  (finite endpoint) and a Gumbel tail.

lambda_i = 0 gives InfoNCE exactly. An anchor's negatives are its candidates outside its
positive's false-negative id (text or group id), so their count K_i varies by anchor, and
with it k_i. An anchor with K_i = 0 has no rho (set to 1) and is left out of rho0; one with
fewer than 3 fit points (K_i <= 3) gets lambda_i = 0, its rho still counted in rho0 (the
spec leaves both cases open). The functions below are split so that a tiled path
which gathers each anchor's tail with a streaming top-k can reuse :func:`lambda_from_tail`
and :func:`batchscale.losses.logits.weince_logits` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .candidates import keep_negatives_, negative_counts

WeinceFactors = Literal["both", "rho", "aic"]
#: The type of ``gather_anchors``, an all-gather across ranks: maps the rho of this call's
#: anchors to the rho of every anchor of the batch, for rho0 when a call sees only some of
#: the anchors (a rank's share under the local loss). The public keyword is ``anchor_pool``
#: (:func:`~batchscale.losses.weince_loss`).
AnchorPool = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class WeinceConfig:
    """The constants of t-lambda select, with the authors' defaults."""

    quantile: float = 0.2          # q of rho0
    kappa_rho: float = 10.0
    kappa_aic: float = 1.0
    margin: float = 2.0
    factors: WeinceFactors = "both"
    eps: float = 1e-6              # shortfall floor and the min(s, 1 - eps) clamp
    tail_fraction: float = 0.10    # k = max(tail_min, round(tail_fraction * K)) ...
    tail_min: int = 32
    tail_floor: int = 10           # ... and at least tail_floor, always capped to K
    drop_divisor: int = 20         # b = max(1, floor(k / drop_divisor)) points dropped
    sse_floor: float = 1e-12
    slope_penalty: float = 1e6     # added to the SSE of a fit with the wrong slope sign

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"WeinceConfig: `{name}` must be {rule}, got {getattr(self, name)!r}")

        if not (0.0 <= self.quantile <= 1.0):
            raise bad("quantile", "in [0, 1]")
        for name in ("kappa_rho", "kappa_aic"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0")
        if not abs(self.margin) < float("inf"):
            raise bad("margin", "finite")
        if self.factors not in ("both", "rho", "aic"):
            raise bad("factors", "one of ['both', 'rho', 'aic']")
        if not (0.0 < self.eps < 1.0):
            raise bad("eps", "in (0, 1)")
        if not (0.0 <= self.tail_fraction <= 1.0):
            raise bad("tail_fraction", "in [0, 1]")
        for name in ("tail_min", "tail_floor", "drop_divisor"):
            if int(getattr(self, name)) < 1:
                raise bad(name, ">= 1")
        if not self.sse_floor > 0:
            raise bad("sse_floor", "> 0")

    @classmethod
    def from_kwargs(cls, caller: str, **kwargs: object) -> WeinceConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{caller}: unknown WEINCE option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class WeinceLambda:
    """Per-anchor mixing weights and the quantities behind them (all detached)."""

    lam: Tensor          # (rows,) lambda_i actually used
    lam_rho: Tensor      # (rows,) rho factor
    lam_aic: Tensor      # (rows,) AIC factor
    delta_aic: Tensor    # (rows,) AIC_Gumbel - AIC_Weibull (> 0 favours the Weibull tail)
    anchors: Tensor      # (rows,) bool: rows that are anchors and have a fit

    def rows(self, block: slice) -> WeinceLambda:
        """The lambdas of a block of anchors (for a tiled pass)."""
        return WeinceLambda(self.lam[block], self.lam_rho[block], self.lam_aic[block],
                            self.delta_aic[block], self.anchors[block])


@dataclass(frozen=True)
class WeinceStats:
    """Batch means of the WEINCE diagnostics over its anchors."""

    mean_lambda: float
    mean_lambda_rho: float
    mean_lambda_aic: float
    weibull_share: float   # share of anchors whose AIC favours the Weibull tail
    anchors: int

    @staticmethod
    def from_lambdas(parts: list[WeinceLambda]) -> WeinceStats:
        sel = [(p.lam[p.anchors], p.lam_rho[p.anchors], p.lam_aic[p.anchors],
                p.delta_aic[p.anchors]) for p in parts]
        lam, rho, aic, d = (torch.cat([s[i] for s in sel]) for i in range(4))
        n = int(lam.numel())
        if n == 0:
            return WeinceStats(0.0, 0.0, 0.0, 0.0, 0)
        return WeinceStats(float(lam.mean()), float(rho.mean()), float(aic.mean()),
                           float((d > 0).double().mean()), n)


def tail_size(num_negatives: Tensor, cfg: WeinceConfig) -> Tensor:
    """k_i = min(K, max(floor, min(K, max(tail_min, round(fraction * K))))) per anchor."""
    k_all = num_negatives.to(torch.float64)
    # torch.round is round-half-to-even, like Python's round in the authors' code.
    k = torch.clamp(torch.round(cfg.tail_fraction * k_all), min=cfg.tail_min)
    k = torch.minimum(k, k_all)
    k = torch.minimum(torch.clamp(k, min=cfg.tail_floor), k_all)
    return k.to(torch.long)


def _least_squares(sums: Tensor, y_sums: Tensor, n: Tensor, sxx: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Least squares y = a + slope * x per row over the kept points: (SSE, slope), from the
    sums (sum x, sum x y) per row, (sum y, sum y^2) per row or broadcast, n and sum x^2."""
    sx, sxy = sums.unbind(-1)
    sy, syy = (t.expand_as(n) for t in y_sums.unbind(-1))
    var_x = sxx - sx * sx / n
    cov_xy = sxy - sx * sy / n
    var_y = syy - sy * sy / n
    slope = torch.where(var_x > 0, cov_xy / var_x.clamp_min(torch.finfo(sxx.dtype).tiny), 0.0)
    return (var_y - slope * cov_xy).clamp_min(0.0), slope


@dataclass(frozen=True)
class TailFit:
    """Per-anchor results of the tail fit, before the batch-level rho0 is known."""

    rho: Tensor        # (rows,) float64 1 - max negative similarity (1 where no negative)
    delta_aic: Tensor  # (rows,) float64 AIC_Gumbel - AIC_Weibull
    fitted: Tensor     # (rows,) bool: at least 3 fit points
    has_negative: Tensor  # (rows,) bool: rho is defined


def fit_tail(top_negatives: Tensor, k: Tensor, cfg: WeinceConfig,
             scratch: Tensor | None = None) -> TailFit:
    """Fit each anchor's tail from its largest negative similarities.

    ``top_negatives`` (rows, k_max) holds each row's negatives sorted descending (entries past
    k_i are ignored); ``k`` (rows,) the tail size k_i. Rows are independent, so a tiled path
    may fit them block by block, reusing a float64 ``scratch`` of at least rows * k_max
    entries for the shortfalls.
    """
    rows, k_max = top_negatives.shape
    dev = top_negatives.device
    drop = torch.clamp(torch.div(k, cfg.drop_divisor, rounding_mode="floor"), min=1)
    n = (k - drop).clamp_min(0).to(torch.float64)
    n_safe = n.clamp_min(1.0)

    def shortfall_log(sims: Tensor) -> Tensor:
        # Shortfalls delta = max(1 - s, eps) ascend as s descends; x = log delta. One copy,
        # then in place: each fresh multi-MB float64 temporary cost a round of page faults
        # (the copy into a fresh buffer took 3 s of a 100 s loss at B = 65,536).
        if scratch is None or scratch.numel() < sims.numel():
            x = sims.to(torch.float64, copy=True)
        else:
            x = scratch[: sims.numel()].view(sims.shape).copy_(sims)
        return x.neg_().add_(1.0).clamp_min_(cfg.eps).log_()

    def responses(r: Tensor, kf: Tensor) -> tuple[Tensor, Tensor]:
        cdf = r / (kf + 1.0)      # the empirical CDF; Weibull log F, Gumbel log(-log F)
        return torch.log(cdf), torch.log(-torch.log(cdf))

    # One host read for the three numbers (each read waits for the device's queue).
    uniform, drop0, k0 = (torch.stack([(k == k[0]).all().to(k.dtype), drop[0], k[0]]).tolist()
                          if rows > 0 else (False, 0, 0))
    if uniform:
        # Every anchor has the same k (no masks): the kept points are the same columns, and
        # one matmul gives sum x and both sum x y.
        first, last = drop0, max(k0, drop0)
        x = shortfall_log(top_negatives.detach()[:, first:last])
        r = torch.arange(first + 1, last + 1, device=dev, dtype=torch.float64)
        y_weibull, y_gumbel = responses(r, r.new_tensor(float(k0)))
        sums = x @ torch.stack([torch.ones_like(r), y_weibull, y_gumbel], dim=1)
        y_sums = [torch.stack([y.sum(), (y * y).sum()]) for y in (y_weibull, y_gumbel)]
    else:
        r = torch.arange(1, k_max + 1, device=dev, dtype=torch.float64)[None, :]
        kf = k.to(torch.float64)[:, None]
        keep = (r > drop.to(torch.float64)[:, None]) & (r <= kf)
        x = torch.where(keep, shortfall_log(top_negatives.detach()), 0.0)
        y_weibull, y_gumbel = (torch.where(keep, y, 0.0)
                               for y in responses(r, kf))
        sums = torch.stack([x.sum(1), (x * y_weibull).sum(1), (x * y_gumbel).sum(1)], dim=1)
        y_sums = [torch.stack([y.sum(1), (y * y).sum(1)], dim=1) for y in (y_weibull, y_gumbel)]
    sxx = (x[:, None, :] @ x[:, :, None]).reshape(rows)     # sum x^2 without an x * x buffer
    sse_w, slope_w = _least_squares(sums[:, :2], y_sums[0], n_safe, sxx)
    sse_g, slope_g = _least_squares(sums[:, ::2], y_sums[1], n_safe, sxx)
    sse_w = sse_w.clamp_min(cfg.sse_floor) + cfg.slope_penalty * (slope_w <= 0)
    sse_g = sse_g.clamp_min(cfg.sse_floor) + cfg.slope_penalty * (slope_g >= 0)
    aic_w = n_safe * torch.log(sse_w / n_safe) + 4.0
    aic_g = n_safe * torch.log(sse_g / n_safe) + 4.0

    if k_max > 0:
        rho = rho_from_max(top_negatives[:, 0], k, cfg)
    else:
        rho = torch.ones(rows, device=dev, dtype=torch.float64)
    return TailFit(rho, aic_g - aic_w, n >= 3, k > 0)


def rho_from_max(max_negative: Tensor, k: Tensor, cfg: WeinceConfig) -> Tensor:
    """rho_i = max(1 - max negative similarity, eps), float64; 1 where there is no negative.

    Shared by the tail fit and the tiled path, which knows the column maxima (and so the
    columns' rho0) one sweep before it fits the columns' tails."""
    top = max_negative.detach().to(torch.float64)
    return torch.where(k > 0, torch.clamp(1.0 - top, min=cfg.eps), 1.0)


def reference_rho(rho: Tensor, counted: Tensor, cfg: WeinceConfig,
                  gather_anchors: AnchorPool | None = None) -> Tensor:
    """rho0: the q-quantile of rho over the rows where ``counted`` (bool: anchors with a
    negative), and over every rank's anchors with ``gather_anchors``."""
    values = rho[counted]
    if gather_anchors is not None:
        values = gather_anchors(values)
    ranked = torch.sort(values).values
    if ranked.numel() > 0:
        return ranked[round(cfg.quantile * (ranked.numel() - 1))]
    return torch.ones((), device=rho.device, dtype=torch.float64)


def mix_lambda(fit: TailFit, anchors: Tensor, cfg: WeinceConfig, dtype: torch.dtype,
               rho0: Tensor | None = None, gather_anchors: AnchorPool | None = None
               ) -> WeinceLambda:
    """lambda_i from the anchors' fits: rho0 is the q-quantile of rho over the anchors (or
    given, when the fits of a block of rows come before the others')."""
    if rho0 is None:
        rho0 = reference_rho(fit.rho, anchors & fit.has_negative, cfg, gather_anchors)
    lam_rho = torch.sigmoid(cfg.kappa_rho * (torch.log(rho0) - torch.log(fit.rho)))
    lam_aic = torch.sigmoid(cfg.kappa_aic * (fit.delta_aic - cfg.margin))
    if cfg.factors == "both":
        lam = lam_rho * lam_aic
    elif cfg.factors == "rho":
        lam = lam_rho
    else:
        lam = lam_aic
    used = anchors & fit.fitted
    lam = torch.where(used, lam, 0.0)
    return WeinceLambda(lam.to(dtype), lam_rho.to(dtype), lam_aic.to(dtype),
                        fit.delta_aic.to(dtype), used)


def lambda_from_tail(top_negatives: Tensor, k: Tensor, anchors: Tensor,
                     cfg: WeinceConfig, gather_anchors: AnchorPool | None = None) -> WeinceLambda:
    """lambda_i from each anchor's largest negative similarities (sorted descending), its tail
    size k_i and which rows are anchors. Rows with fewer than 3 fit points get lambda = 0."""
    return mix_lambda(fit_tail(top_negatives, k, cfg), anchors, cfg, top_negatives.dtype,
                      gather_anchors=gather_anchors)


# A strided sample of every _SAMPLE_STRIDE-th entry bounds each row's k-th largest value
# from below; the bound keeps the sample's (k / stride + _SAMPLE_MARGIN * sd)-th largest, so a
# row falls back to torch.topk only when its sample is ~3 sd off (measured on random
# cosines at B = 32,768: 2 rows in 2,048 fell back; ~1.2 k survivors per row).
_SAMPLE_STRIDE = 16
_SAMPLE_MARGIN = 3.0


def _threshold_top(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(each row's k largest values, sorted descending; which rows are exact).

    A row is exact when at least k of its entries reach its threshold: its top k are then
    all among them. Other rows hold garbage and must be recomputed."""
    rows = x.shape[0]
    sample = x[:, ::_SAMPLE_STRIDE]
    size = sample.shape[1]
    expected = k / _SAMPLE_STRIDE
    rank = min(size, math.ceil(expected + _SAMPLE_MARGIN * math.sqrt(expected)) + 1)
    threshold = np.partition(sample, size - rank, axis=1)[:, size - rank]
    keep = x >= threshold[:, None]
    # a sum of the bytes in 16 bits where a row's count fits: 5x faster than count_nonzero
    counts = np.add.reduce(keep.view(np.uint8), axis=1,
                           dtype=np.uint16 if x.shape[1] < 1 << 16 else np.uint32)
    # Compact the survivors row by row (np.compress is ~3x faster than boolean indexing),
    # negated so that numpy's ascending sort yields descending values; +inf pads.
    survivors = np.compress(keep.ravel(), x.ravel())
    np.negative(survivors, out=survivors)
    width = max(k, int(counts.max()))
    packed = np.full((rows, width), np.inf, dtype=x.dtype)
    np.place(packed, np.arange(width)[None, :] < counts[:, None], survivors)
    packed.sort(axis=1)
    top = packed[:, :k]
    np.negative(top, out=top)
    return top, counts >= k


@cache
def _executor(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batchscale-topk")


def sorted_top_values(x: Tensor, k: int) -> Tensor:
    """Each row's k largest entries of ``x`` (rows, cols), sorted descending: the values of
    ``torch.topk(x, k, dim=1, sorted=True)`` exactly (ties are equal values).

    WEINCE needs only the values of a 10% tail. On CPU, torch.topk with such a k spends most
    of its time sorting (value, index) pairs; here a per-row threshold keeps ~1.2 k candidates,
    which numpy compacts and sorts (values only, ~6x faster than torch.sort). Entries must be
    finite or -inf (masked); rows where the threshold keeps fewer than k use torch.topk."""
    rows, cols = x.shape
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or k == 0 or rows == 0 or cols < 4 * k or cols < 64 * _SAMPLE_STRIDE):
        return torch.topk(x, k, dim=1, sorted=True).values
    array = x.detach().contiguous().numpy()
    # numpy runs one thread per call but releases the GIL: split the rows over torch's
    # thread count, as torch's own kernels would.
    chunks = np.array_split(array, min(torch.get_num_threads(), max(1, rows // 8)))
    if len(chunks) == 1:
        top, exact = _threshold_top(array, k)
    else:
        parts = list(_executor(len(chunks)).map(_threshold_top, chunks, [k] * len(chunks)))
        top = np.concatenate([p[0] for p in parts])
        exact = np.concatenate([p[1] for p in parts])
    values = torch.from_numpy(top)
    if not exact.all():
        redo = torch.from_numpy(~exact)
        values[redo] = torch.topk(x[redo], k, dim=1, sorted=True).values
    return values


# Rows of a dense similarity matrix masked and ranked at a time (a 16 MB float32 copy).
_CHUNK_ENTRIES = 1 << 22


def top_negatives(sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  k_max: int) -> Tensor:
    """Each row's k_max largest negative similarities, sorted descending (-inf past K_i)."""
    rows, cols = sims.shape
    step = max(1, _CHUNK_ENTRIES // max(cols, 1))
    parts = [sims.new_empty((0, k_max))]
    for start in range(0, rows, step):
        block = sims[start:start + step]
        # A masked copy of a few rows: the positive and the false negatives become -inf.
        local = torch.arange(block.shape[0], device=sims.device)
        negatives = keep_negatives_(
            block.clone(), (local, positive_index[start:start + step]),
            None if candidate_mask is None else ~candidate_mask[start:start + step])
        parts.append(sorted_top_values(negatives, k_max))
    return torch.cat(parts)


def weince_lambda(sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None = None,
                  anchors: Tensor | None = None, cfg: WeinceConfig | None = None,
                  gather_anchors: AnchorPool | None = None) -> WeinceLambda:
    """lambda_i for every row of a dense similarity matrix.

    ``sims`` (rows, cols) cosine similarities; ``positive_index`` (rows,) each row's positive;
    ``candidate_mask`` (rows, cols) bool, False for columns that are not candidates of the
    row; ``anchors`` (rows,) bool, rows that are anchors (count for rho0 and the statistics).
    """
    cfg = cfg or WeinceConfig()
    rows, cols = sims.shape
    if anchors is None:
        anchors = torch.ones(rows, dtype=torch.bool, device=sims.device)
    with torch.no_grad():
        num_negatives = negative_counts(candidate_mask, rows, cols, sims.device)
        k = tail_size(num_negatives, cfg)
        k_max = int(k.max()) if rows > 0 else 0
        top = top_negatives(sims.detach(), positive_index, candidate_mask, k_max)
        return lambda_from_tail(top, k, anchors, cfg, gather_anchors)
