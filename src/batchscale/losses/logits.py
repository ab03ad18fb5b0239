"""How an anchor's similarities become logits: plain s/tau (InfoNCE, BSC) or WEINCE's
per-anchor mixture. One policy object decides it, so the dense and tiled paths, and
every loss that uses a softmax over candidates, share the same maths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from .weince_tail import WeinceConfig, WeinceLambda, weince_lambda, weince_logits


class LogitPolicy(Protocol):
    def row_state(self, sims: Tensor, negatives: Tensor, anchors: Tensor) -> WeinceLambda | None:
        """Per-anchor constants computed once from the (detached) similarities."""

    def logits(self, sims: Tensor, state: WeinceLambda | None,
               temperature: float | Tensor) -> Tensor:
        """Elementwise logits of a block of rows given their row state."""


@dataclass(frozen=True)
class ScaledCosine:
    """g_ij = s_ij / tau."""

    def row_state(self, sims: Tensor, negatives: Tensor, anchors: Tensor) -> None:
        return None

    def logits(self, sims: Tensor, state: WeinceLambda | None,
               temperature: float | Tensor) -> Tensor:
        return sims / temperature


@dataclass(frozen=True)
class WeinceMixture:
    """WEINCE's t-lambda select logits (see :mod:`batchscale.losses.weince_tail`)."""

    config: WeinceConfig = field(default_factory=WeinceConfig)

    def row_state(self, sims: Tensor, negatives: Tensor, anchors: Tensor) -> WeinceLambda:
        return weince_lambda(sims, negatives, anchors, self.config)

    def logits(self, sims: Tensor, state: WeinceLambda | None,
               temperature: float | Tensor) -> Tensor:
        assert state is not None
        return weince_logits(sims, state.lam, temperature, self.config.eps)


PLAIN_LOGITS = ScaledCosine()
