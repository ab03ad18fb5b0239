"""Float64 reference implementations written straight from ../shared/spec/losses.md with
Python loops and numpy, independent of batchscale's vectorised code."""

from __future__ import annotations

import math

import numpy as np


def cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def cross_entropy(logits: list[float], positive: int) -> float:
    top = max(logits)
    lse = top + math.log(sum(math.exp(g - top) for g in logits))
    return lse - logits[positive]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def weince_anchor_fit(negatives: list[float], eps: float = 1e-6) -> tuple[float, float]:
    """(rho_i, dAIC_i) of one anchor from its negative similarities; spec section 3."""
    big = len(negatives)
    k = min(max(32, round(0.10 * big)), big)
    k = min(max(k, 10), big)
    top = sorted(negatives, reverse=True)[:k]
    delta = [max(1.0 - s, eps) for s in top]            # ascending
    x = np.log(np.array(delta))
    f = np.array([r / (k + 1) for r in range(1, k + 1)])
    b = max(1, k // 20)
    x, f = x[b:], f[b:]
    n = k - b
    aic = {}
    for name, y in (("W", np.log(f)), ("G", np.log(-np.log(f)))):
        slope, intercept = np.polyfit(x, y, 1)
        sse = max(float(((y - (intercept + slope * x)) ** 2).sum()), 1e-12)
        if (name == "W" and slope <= 0) or (name == "G" and slope >= 0):
            sse += 1e6
        aic[name] = n * math.log(sse / n) + 4
    rho = max(1.0 - max(negatives), eps)
    return rho, aic["G"] - aic["W"]


def weince_lambdas(rows_negatives: list[list[float]], anchors: list[bool], q: float = 0.2,
                   kappa_rho: float = 10.0, kappa_aic: float = 1.0, margin: float = 2.0
                   ) -> list[float]:
    fits = [weince_anchor_fit(neg) for neg in rows_negatives]
    pool = sorted(fit[0] for fit, is_anchor in zip(fits, anchors, strict=True) if is_anchor)
    rho0 = pool[round(q * (len(pool) - 1))]
    return [sigmoid(kappa_rho * (math.log(rho0) - math.log(rho)))
            * sigmoid(kappa_aic * (d_aic - margin)) for rho, d_aic in fits]


def weince_logit(s: float, lam: float, tau: float, eps: float = 1e-6) -> float:
    return (1 - lam) * s / tau + lam * (-math.log(1 - min(s, 1 - eps)))


def pair_loss_reference(q: np.ndarray, a: np.ndarray, tau: float, *, directions: str = "both",
                        hard: np.ndarray | None = None, labels: list[int] | None = None,
                        query_ids: list[int] | None = None, answer_ids: list[int] | None = None,
                        weince: bool = False, normalization: str = "l2") -> float:
    """BSC / InfoNCE / WEINCE over m pairs, loop by loop."""
    m = len(q)
    cands = a if hard is None else np.concatenate([a, hard])
    if normalization == "l2":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        cn = cands / np.linalg.norm(cands, axis=1, keepdims=True)
    elif normalization == "coord":
        qn = q / (q.max(0) - q.min(0))
        cn = cands / (cands.max(0) - cands.min(0))
    else:
        qn, cn = q, cands
    sim = [[float(qn[i] @ cn[j]) for j in range(len(cands))] for i in range(m)]
    y = labels if labels is not None else [1] * m
    aid = answer_ids if answer_ids is not None else list(range(len(cands)))
    qid = query_ids if query_ids is not None else list(range(m))

    def one_direction(rows: list[list[float]], ids: list[int]) -> float:
        # candidates of anchor i: its positive i, plus every j whose id differs from id[i]
        cand_idx = [[j for j in range(len(rows[i])) if j == i or ids[j] != ids[i]]
                    for i in range(m)]
        if weince:
            negs = [[rows[i][j] for j in cand_idx[i] if j != i] for i in range(m)]
            lams = weince_lambdas(negs, [bool(v) for v in y])
        total = 0.0
        for i in range(m):
            if not y[i]:
                continue
            if weince:
                logits = [weince_logit(rows[i][j], lams[i], tau) for j in cand_idx[i]]
            else:
                logits = [rows[i][j] / tau for j in cand_idx[i]]
            total += cross_entropy(logits, cand_idx[i].index(i))
        return total / m

    parts = []
    if directions in ("both", "q->a"):
        parts.append(one_direction(sim, aid))
    if directions in ("both", "a->q"):
        cols = [[sim[i][j] for i in range(m)] for j in range(m)]
        parts.append(one_direction(cols, qid))
    return sum(parts) / len(parts)
