r"""VRNS as a wrapper that adds its penalty to any batchscale loss module.

Lee, Lim, Lee, Sohn, "On the Similarities of Embeddings in Contrastive Learning", ICML 2025
(arXiv 2506.09781): at the full-batch optimum every negative cosine equals -1/(n - 1) for n
training examples; small batches keep that mean but inflate the variance. The wrapped loss L
becomes

    L + lambda * 1/(m(m - 1)) * sum_{i != j} (s_ij + 1/(n - 1))^2,     s_ij = cos(q_i, a_j),

the penalty computed on the same embeddings as L (the batch is embedded once).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from batchscale.losses import vrns_penalty

from . import citations
from .base import BatchscaleLoss


class VRNSLoss(BatchscaleLoss):
    """``loss`` plus ``weight`` times the VRNS penalty of the (anchor, positive) pairs.

    The model, ``mini_batch_size`` and ``gather_across_ranks`` are those of ``loss`` (set them
    there); with gathering, the penalty covers the global batch like the loss.

    Args:
        loss: a batchscale loss module (:class:`~.losses.BSCLoss`, ``InfoNCELoss``,
            ``WEINCELoss``).
        n: the number of training examples (pairs), >= 2.
        weight: lambda >= 0 (30 in the paper).
    """

    def __init__(self, loss: BatchscaleLoss, n: int, weight: float = 30.0) -> None:
        owner = type(self).__name__
        if not isinstance(loss, BatchscaleLoss):
            raise ValueError(f"{owner}: `loss` must be a batchscale loss module (BSCLoss, "
                             f"InfoNCELoss, WEINCELoss, ...), got {type(loss).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"{owner}: `n` (training-set size) must be an integer >= 2, "
                             f"got {n!r}")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(f"{owner}: `weight` must be a finite number >= 0, got {weight!r}")
        # The same model module as `loss` (registered under both, as sentence-transformers'
        # wrapping losses do), so the Trainer's swap for its wrapped model reaches both.
        super().__init__(loss.model, mini_batch_size=loss.mini_batch_size,
                         gather_across_ranks=loss.gather_across_ranks)
        self.loss = loss
        self.n = n
        self.weight = float(weight)

    def pair_loss(self, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        base = self.loss.pair_loss(q, a, hard_negatives=hard_negatives, labels=labels)
        return base + self.weight * vrns_penalty(q, a, self.n)

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": type(self.loss).__name__, "n": self.n, "weight": self.weight,
                "loss_config": self.loss.get_config_dict()}

    @property
    def citation(self) -> str:
        return citations.VRNS + self.loss.citation
