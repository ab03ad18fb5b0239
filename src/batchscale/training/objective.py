"""The training objective: a loss of :mod:`batchscale.losses` chosen by the config.

The trainer only sees ``objective(embeddings, labels) -> loss``: one embedding tensor per
side of the batch (queries, answers[, hard negatives]) and the pairs' labels in [0, 1] (or
None). Loss parameters (a learnable temperature) live here, with their own learning rate,
and so do the loss's diagnostics (WEINCE's lambdas), averaged between evaluation points.
Terms listed under ``loss.plus`` are added with their weights (one objective, several losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..losses import (
    LearnableTemperature,
    bsc_loss,
    bsc_mse_loss,
    cosent_loss,
    cosine_mse_loss,
    infonce_loss,
    triplet_loss,
    vrns_penalty,
    weince_loss,
)
from .config import LossConfig

#: BSC's label threshold on [0, 1] scores (t = 0.6), used by bsc_mse when none is set.
DEFAULT_LABEL_THRESHOLD = 0.6


class Objective(nn.Module):
    """``forward(embeddings, labels) -> 0-dim loss`` for the configured loss."""

    def __init__(self, config: LossConfig, num_examples: int) -> None:
        super().__init__()
        self.config = config
        self.num_examples = num_examples
        self.temperature_module = (LearnableTemperature(config.temperature)
                                   if config.learnable_temperature else None)
        self._stats: dict[str, list[float]] = {}

    @property
    def needs_labels(self) -> bool:
        return bool(self.config.scored_terms)

    def temperature(self) -> float | Tensor:
        if self.temperature_module is not None:
            return self.temperature_module()
        return self.config.temperature

    def param_groups(self) -> list[dict[str, object]]:
        """Optimiser groups of the loss's own parameters (the temperature, at its own lr)."""
        if self.temperature_module is None:
            return []
        return [{"params": list(self.temperature_module.parameters()),
                 "lr": self.config.temperature_lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self) -> None:
        if self.temperature_module is not None:
            self.temperature_module.clamp_()

    def forward(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        c = self.config
        q, a, *rest = embeddings
        negatives = rest[0] if rest else None
        if self.needs_labels and labels is None:
            raise ValueError(f"loss {', '.join(c.scored_terms)} needs a graded label on "
                             "every pair")
        tau = self.temperature()
        loss = self._term(c, q, a, negatives, labels, tau)
        for term in c.plus:
            loss = loss + term.weight * self._term(term, q, a, negatives, labels,
                                                   term.temperature)
        if c.vrns_weight > 0:
            loss = loss + c.vrns_weight * vrns_penalty(q, a, max(2, self.num_examples))
        if self.temperature_module is not None:
            self._record(temperature=float(torch.as_tensor(tau).detach()))
        return loss

    def _term(self, c: LossConfig, q: Tensor, a: Tensor, negatives: Tensor | None,
              labels: Tensor | None, tau: float | Tensor) -> Tensor:
        masking = dict(labels=labels, label_threshold=c.label_threshold) \
            if c.label_threshold is not None and labels is not None else {}
        if c.name == "bsc":
            return bsc_loss(q, a, tau, directions=c.directions, normalization=c.normalization,
                            hard_negatives=negatives, tile_size=c.tile_size, **masking)
        if c.name == "infonce":
            return infonce_loss(q, a, tau, normalization=c.normalization,
                                hard_negatives=negatives, tile_size=c.tile_size, **masking)
        if c.name == "weince":
            loss, stats = weince_loss(q, a, tau, directions=c.directions,
                                      hard_negatives=negatives, tile_size=c.tile_size,
                                      return_stats=True, **masking)
            self._record(weince_mean_lambda=stats.mean_lambda,
                         weince_weibull_share=stats.weibull_share)
            return loss
        if c.name == "bsc_mse":
            threshold = c.label_threshold if c.label_threshold is not None \
                else DEFAULT_LABEL_THRESHOLD
            return bsc_mse_loss(q, a, labels, tau, mu=c.mu, label_threshold=threshold,
                                directions=c.directions, normalization=c.normalization,
                                hard_negatives=negatives, tile_size=c.tile_size)
        if c.name == "cosine_mse":
            return cosine_mse_loss(q, a, labels)
        if c.name == "cosent":
            return cosent_loss(q, a, labels, scale=c.cosent_scale)
        if c.name == "triplet":
            if negatives is None:
                raise ValueError("loss triplet needs (anchor, positive, negative) batches")
            return triplet_loss(q, a, negatives, margin=c.triplet_margin)
        raise ValueError(f"unknown loss {c.name!r}")  # the config's Literal forbids this

    def _record(self, **values: float) -> None:
        for k, v in values.items():
            self._stats.setdefault(k, []).append(float(v))

    def pop_diagnostics(self) -> dict[str, float]:
        """Means of the diagnostics recorded since the last call."""
        out = {k: sum(v) / len(v) for k, v in self._stats.items() if v}
        self._stats = {}
        return out
