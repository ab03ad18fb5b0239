"""Training with sparse embedding gradients (``optim.sparse``): a static encoder's table
receives a gradient for the rows of the batch's tokens only, and the optimiser updates those
rows only, so a step's cost follows the batch, not the 30k x 384 table.

:class:`LazyAdamW` is AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
ICLR 2019; torch.optim.AdamW's update) applied lazily to a sparse gradient's rows, as
TensorFlow's ``LazyAdamOptimizer`` and ``torch.optim.SparseAdam`` update Adam's moments:

* a dense gradient gets exactly AdamW's update (torch.optim.AdamW with ``amsgrad=False``);
* a sparse gradient with rows R: for the rows in R only,
  ``p <- p (1 - lr wd)``, ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
  ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``; every other row of
  ``p``, ``m`` and ``v`` stays as it is (no decay, no momentum step);
* ``t`` counts the optimiser steps in which the parameter had a gradient, whichever rows
  it touched (SparseAdam's bias correction), not the steps that touched a given row.

So it is not dense AdamW on a sparse problem: dense AdamW keeps moving (and decaying) rows
that a batch did not touch. :func:`clip_gradients` is ``clip_grad_norm_`` for gradients
that may be sparse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LazyAdamW(torch.optim.Optimizer):
    """AdamW that updates only the rows a sparse gradient holds (see the module docstring);
    parameters with dense gradients get AdamW's update. Options as torch.optim.AdamW."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad LazyAdamW options: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad
        if not grad.is_sparse:
            _adamw(p, grad, m, v, group, state["step"])
            return
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        p_rows, m_rows, v_rows = (t.index_select(0, rows) for t in (p, m, v))
        _adamw(p_rows, values, m_rows, v_rows, group, state["step"])
        for full, part in ((p, p_rows), (m, m_rows), (v, v_rows)):
            full.index_copy_(0, rows, part)


def _adamw(p: Tensor, g: Tensor, m: Tensor, v: Tensor, group: dict[str, Any],
           step: int) -> None:
    """AdamW's update of ``p``, ``m``, ``v`` in place (torch.optim.AdamW's order of terms)."""
    lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
    p.mul_(1.0 - lr * group["weight_decay"])
    m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (v.sqrt() / math.sqrt(1.0 - b2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1.0 - b1**step))


def clip_gradients(parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """The total 2-norm of the gradients, which are scaled down to ``max_norm`` when above
    it (None: measured only), as ``torch.nn.utils.clip_grad_norm_`` does, which it calls when
    every gradient is dense. A sparse gradient is coalesced in place first (duplicate rows
    summed), so its norm and its scaling are those of its values."""
    params = [p for p in parameters if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None
                                              else max_norm)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s formula
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return norm
