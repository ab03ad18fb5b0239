r"""BSC, InfoNCE and WEINCE as sentence-transformers loss modules.

Each adapts one function of :mod:`batchscale.losses` (where the maths, its checks and its
tests live); see :class:`~.base.BatchscaleLoss` for the columns, the gradient cache and the
gathering across ranks, :class:`~.base.BatchSoftmaxLoss` for temperature, labels and tiles.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from batchscale.losses import (
    DIRECTIONS,
    NORMALIZATIONS,
    Directions,
    LearnableTemperature,
    Normalization,
    WeinceConfig,
    bsc_loss,
    bsc_mse_loss,
    infonce_loss,
    weince_loss,
)
from batchscale.losses._checks import check_choice
from batchscale.losses.combined import BSC_LABEL_THRESHOLD
from batchscale.losses.pair_loss import TileSize

from . import citations
from .base import BatchSoftmaxLoss, check_fraction


class BSCLoss(BatchSoftmaxLoss):
    r"""Batch-softmax contrastive loss (Chernyavskiy, Ilvovsky, Kalinin, Nakov, NAACL 2022,
    arXiv 2110.15725) over the (anchor, positive) pairs of the batch, s_ij = cos(q_i, a_j):

        L0 = -(1/m) sum_i log softmax_j(s_ij / tau)[j = i]     (anchor -> positives)
        L1 = -(1/m) sum_i log softmax_j(s_ji / tau)[j = i]     (positive -> anchors)
        L_BSC = (L0 + L1) / 2

    With ``directions="both"`` and tau = 1 / scale this is sentence-transformers'
    ``MultipleNegativesSymmetricRankingLoss(model, scale)``. Negative columns are extra
    candidates of L0. With a ``label``/``score`` column, pairs labelled 0 (or scoring
    <= ``label_threshold``) are not anchors but stay candidates (eq. 5). With ``mu``, the loss is
    BSC combined with a regression of the pair's cosine on its score in [0, 1] (eq. 6):

        L = mu * L_BSC + (1 - mu) * (1/m) sum_i (s_ii - y_i)^2

    (``label_threshold`` then defaults to 0.6, the paper's).

    Args:
        directions: ``"both"``, ``"q->a"`` (L0: InfoNCE) or ``"a->q"`` (L1).
        normalization: ``"l2"`` (cosine), ``"coord"`` (per coordinate over the batch) or
            ``"none"`` (dot product).
        mu: None for BSC alone; a weight in [0, 1] for BSC + MSE (needs a score column).
        The other arguments: :class:`~.base.BatchSoftmaxLoss`.
    """

    def __init__(self, model: nn.Module, temperature: float | LearnableTemperature = 0.05, *,
                 directions: Directions = "both", normalization: Normalization = "l2",
                 label_threshold: float | None = None, mu: float | None = None,
                 tile_size: TileSize = "auto", mini_batch_size: int | None = None,
                 gather_across_ranks: bool = True) -> None:
        owner = type(self).__name__
        mu = check_fraction(owner, "mu", mu)
        if mu is not None and label_threshold is None:
            label_threshold = BSC_LABEL_THRESHOLD
        super().__init__(model, temperature, label_threshold=label_threshold,
                         tile_size=tile_size, mini_batch_size=mini_batch_size,
                         gather_across_ranks=gather_across_ranks)
        self.directions = check_choice(owner, "directions", directions, DIRECTIONS)
        self.normalization = check_choice(owner, "normalization", normalization, NORMALIZATIONS)
        self.mu = mu

    def pair_loss(self, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        options: dict[str, Any] = {"directions": self.directions,
                                   "normalization": self.normalization,
                                   "hard_negatives": hard_negatives, "tile_size": self.tile_size}
        if self.mu is None:
            return bsc_loss(q, a, self.tau, labels=labels,
                            label_threshold=self.threshold_for(labels), **options)
        if labels is None:
            raise ValueError(f"{type(self).__name__}: `mu`={self.mu} (BSC + MSE) needs a "
                             "'label' or 'score' column of scores in [0, 1] in the dataset")
        assert self.label_threshold is not None
        return bsc_mse_loss(q, a, labels, self.tau, mu=self.mu,
                            label_threshold=self.label_threshold, **options)

    def get_config_dict(self) -> dict[str, Any]:
        return {"directions": self.directions, "normalization": self.normalization,
                "mu": self.mu, **super().get_config_dict()}

    @property
    def citation(self) -> str:
        return citations.BSC


class InfoNCELoss(BatchSoftmaxLoss):
    r"""InfoNCE (van den Oord, Li, Vinyals 2018, arXiv 1807.03748), a.k.a. multiple-negatives
    ranking: BSC's L0 alone, each anchor against every positive and negative of the batch,

        L0 = -(1/m) sum_i log softmax_j(s_ij / tau)[j = i].

    With tau = 1 / scale this is sentence-transformers' ``MultipleNegativesRankingLoss``.

    Args:
        normalization: ``"l2"`` (cosine), ``"coord"`` or ``"none"`` (dot product).
        The other arguments: :class:`~.base.BatchSoftmaxLoss`.
    """

    def __init__(self, model: nn.Module, temperature: float | LearnableTemperature = 0.05, *,
                 normalization: Normalization = "l2", label_threshold: float | None = None,
                 tile_size: TileSize = "auto", mini_batch_size: int | None = None,
                 gather_across_ranks: bool = True) -> None:
        super().__init__(model, temperature, label_threshold=label_threshold,
                         tile_size=tile_size, mini_batch_size=mini_batch_size,
                         gather_across_ranks=gather_across_ranks)
        self.normalization = check_choice(type(self).__name__, "normalization", normalization,
                                          NORMALIZATIONS)

    def pair_loss(self, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        return infonce_loss(q, a, self.tau, normalization=self.normalization,
                            hard_negatives=hard_negatives, labels=labels,
                            label_threshold=self.threshold_for(labels), tile_size=self.tile_size)

    def get_config_dict(self) -> dict[str, Any]:
        return {"normalization": self.normalization, **super().get_config_dict()}

    @property
    def citation(self) -> str:
        return citations.INFONCE


class WEINCELoss(BatchSoftmaxLoss):
    r"""WEINCE (Erol, Evren, Ozel, Morgan, Ryu, Zheng, "When Softmax Fails at the Top: Extreme
    Value Corrections for InfoNCE", ICML 2026, arXiv 2606.00262) on the pairs of the batch: for
    each anchor (a row for L0, a column for L1) of the cosine matrix,

        g_ij = (1 - lambda_i) s_ij / tau + lambda_i (-log(1 - min(s_ij, 1 - eps)))
        l_i  = -log softmax_j(g_ij)[positive]

    with lambda_i (no gradient) from an extreme-value fit of the anchor's negative tail.

    Args:
        directions: ``"both"`` (rows and columns, as BSC), ``"q->a"`` or ``"a->q"``.
        config: a :class:`~batchscale.losses.WeinceConfig`, or its fields as keywords
            (``quantile``, ``kappa_rho``, ``kappa_aic``, ``margin``, ``factors``, ...);
            the authors' defaults otherwise.
        The other arguments: :class:`~.base.BatchSoftmaxLoss`.
    """

    def __init__(self, model: nn.Module, temperature: float | LearnableTemperature = 0.05, *,
                 directions: Directions = "both", label_threshold: float | None = None,
                 tile_size: TileSize = "auto", mini_batch_size: int | None = None,
                 gather_across_ranks: bool = True, config: WeinceConfig | None = None,
                 **weince_options: Any) -> None:
        super().__init__(model, temperature, label_threshold=label_threshold,
                         tile_size=tile_size, mini_batch_size=mini_batch_size,
                         gather_across_ranks=gather_across_ranks)
        owner = type(self).__name__
        self.directions = check_choice(owner, "directions", directions, DIRECTIONS)
        if config is None:
            config = WeinceConfig.from_kwargs(owner, **weince_options)
        elif weince_options:
            raise ValueError(f"{owner}: give `config` or WEINCE keywords, not both: "
                             f"{sorted(weince_options)}")
        elif not isinstance(config, WeinceConfig):
            raise ValueError(f"{owner}: `config` must be a WeinceConfig, "
                             f"got {type(config).__name__}")
        self.config = config

    def pair_loss(self, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        loss = weince_loss(q, a, self.tau, directions=self.directions,
                           hard_negatives=hard_negatives, labels=labels,
                           label_threshold=self.threshold_for(labels),
                           tile_size=self.tile_size, config=self.config)
        assert isinstance(loss, Tensor)  # return_stats=False
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {"directions": self.directions, **asdict(self.config),
                **super().get_config_dict()}

    @property
    def citation(self) -> str:
        return citations.WEINCE
