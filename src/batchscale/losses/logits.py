"""How an anchor's similarities become logits: plain s/tau (InfoNCE, BSC) or WEINCE's
per-anchor mixture. One policy object decides it (the logits, their derivative, and any
per-anchor constants), so the dense and tiled paths, and every loss that uses a softmax
over candidates, share the same maths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .weince_tail import AnchorPool, WeinceConfig, WeinceLambda, weince_lambda


class LogitBlock(NamedTuple):
    """Logits of a block of anchor rows and what their backward needs.

    ``logits`` is a fresh buffer the caller may overwrite; ``slope`` is dg/ds (a buffer of the
    block's shape, or a scalar); dg/dtau = -tau_weight_i * s_ij / tau^2 (``tau_weight`` None
    means 1)."""

    logits: Tensor
    slope: Tensor
    tau_weight: Tensor | None


class LogitPolicy(Protocol):
    @property
    def tail(self) -> WeinceConfig | None:
        """The tail-fit constants when the logits need each anchor's negative tail."""

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> WeinceLambda | None:
        """Per-anchor constants computed once from the (detached) similarities."""

    def logits(self, sims: Tensor, state: WeinceLambda | None, temperature: Tensor
               ) -> LogitBlock:
        """Logits g of a block of rows, with dg/ds and dg/dtau."""


@dataclass(frozen=True)
class ScaledCosine:
    """g_ij = s_ij / tau."""

    @property
    def tail(self) -> None:
        return None

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> None:
        return None

    def logits(self, sims: Tensor, state: WeinceLambda | None, temperature: Tensor
               ) -> LogitBlock:
        scale = 1.0 / temperature
        return LogitBlock(sims * scale, scale, None)


@dataclass(frozen=True)
class WeinceMixture:
    """WEINCE's t-lambda select logits, g = (1 - lam) s / tau + lam * (-log(1 - min(s, 1 - eps)))
    (see :mod:`batchscale.losses.weince_tail` for lam)."""

    config: WeinceConfig = field(default_factory=WeinceConfig)
    anchor_pool: AnchorPool | None = None  # rho0 over anchors beyond this call's

    @property
    def tail(self) -> WeinceConfig:
        return self.config

    def row_state(self, sims: Tensor, positive_index: Tensor, candidate_mask: Tensor | None,
                  anchors: Tensor) -> WeinceLambda:
        return weince_lambda(sims, positive_index, candidate_mask, anchors, self.config,
                             self.anchor_pool)

    def logits(self, sims: Tensor, state: WeinceLambda | None, temperature: Tensor
               ) -> LogitBlock:
        assert state is not None
        lam = state.lam.to(sims.dtype)[:, None]
        plain_weight = 1.0 - lam
        ceiling = torch.tensor(1.0 - self.config.eps, dtype=sims.dtype)
        # shortfall u = 1 - min(s, 1 - eps); exact for the clamped entries (Sterbenz), so
        # u == 1 - ceiling marks exactly the entries where the log term has no gradient.
        shortfall = torch.clamp(sims, max=ceiling).neg_().add_(1.0)
        logits = torch.log(shortfall).mul_(-lam).addcmul_(sims, plain_weight / temperature)
        slope = shortfall.masked_fill_(shortfall <= 1.0 - ceiling, float("inf")).reciprocal_()
        slope.mul_(lam).add_(plain_weight / temperature)
        return LogitBlock(logits, slope, plain_weight.squeeze(1))


def weince_logits(sims: Tensor, lam: Tensor, temperature: float | Tensor, eps: float) -> Tensor:
    """g_ij = (1 - lambda_i) s_ij / tau + lambda_i (-log(1 - min(s_ij, 1 - eps))), given each
    row's lambda (a plain, differentiable reference of :class:`WeinceMixture`'s logits)."""
    lam = lam.to(sims.dtype)[:, None]
    return (1.0 - lam) * sims / temperature - lam * torch.log1p(-torch.clamp(sims, max=1 - eps))


PLAIN_LOGITS = ScaledCosine()
