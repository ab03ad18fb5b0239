r"""WEINCE for sentence pairs: InfoNCE with the extreme-value ("t-lambda select") correction.

Erol, Evren, Ozel, Morgan, Ryu, Zheng, "When Softmax Fails at the Top: Extreme Value
Corrections for InfoNCE", ICML 2026 (arXiv 2606.00262).

For each anchor (a row of the q-a cosine matrix for L0, a column for L1):

    g_ij = (1 - lambda_i) s_ij / tau + lambda_i (-log(1 - min(s_ij, 1 - eps)))
    l_i  = -log softmax_j(g_ij)[positive]

with lambda_i (stop-gradient) from the anchor's negative tail; see
:mod:`batchscale.losses.weince_tail`. lambda = 0 gives InfoNCE / BSC exactly.
"""

from __future__ import annotations

from torch import Tensor

from .batch_softmax import Directions
from .logits import WeinceMixture
from .pair_loss import TileSize, pair_loss
from .weince_tail import AnchorPool, WeinceConfig, WeinceStats


def weince_loss(q: Tensor, a: Tensor, temperature: float | Tensor = 0.05, *,
                directions: Directions = "both", hard_negatives: Tensor | None = None,
                labels: Tensor | None = None, label_threshold: float | None = None,
                query_ids: Tensor | None = None, answer_ids: Tensor | None = None,
                tile_size: TileSize = "auto", config: WeinceConfig | None = None,
                return_stats: bool = False, anchor_pool: AnchorPool | None = None,
                softmax_batch: int | None = None, **weince_options: object
                ) -> Tensor | tuple[Tensor, WeinceStats]:
    """WEINCE over a batch of pairs; returns a 0-dim tensor (and :class:`WeinceStats` with
    ``return_stats=True``, computed from the same lambdas, no second pass).

    Similarities are cosine (the tail fit works on shortfalls 1 - s). The batch arguments
    are those of :func:`~batchscale.losses.bsc_loss`; the WEINCE constants come from
    ``config`` or as keywords (``quantile``, ``kappa_rho``, ``kappa_aic``, ``margin``,
    ``factors`` = ``"both" | "rho" | "aic"``, ...), with the authors' defaults.
    ``anchor_pool`` maps the rho of this call's anchors to the rho of every anchor of the
    batch, for the quantile rho0, when the call sees only some anchors (a rank's share under
    :func:`~batchscale.batching.local_pair_loss`, which passes an all-gather).
    ``softmax_batch`` N: the mean over blocks of N consecutive pairs, each its own WEINCE
    batch (its own rho0 quantile, tails from its own negatives); the stats cover every
    block's anchors. Not with ``anchor_pool``.

    ``query_ids`` / ``answer_ids`` (text or group ids) remove an anchor's false negatives
    from its softmax and from its tail alike: the tail size k_i comes from its own K_i
    negatives. An anchor with K_i = 0 (its whole batch in its group) has no rho and stays
    out of rho0, and lambda_i = 0: its softmax is its positive alone, l_i = 0. With
    K_i <= 3 (fewer than 3 fit points) lambda_i = 0 (plain InfoNCE logits) but its rho
    counts in rho0. The stats count the anchors with a fit only.
    """
    if config is None:
        config = WeinceConfig.from_kwargs("weince_loss", **weince_options)
    elif weince_options:
        raise ValueError(
            f"weince_loss: give `config` or keywords, not both: {sorted(weince_options)}"
        )
    loss, states = pair_loss("weince_loss", q, a, temperature, directions=directions,
                             normalization="l2", hard_negatives=hard_negatives, labels=labels,
                             label_threshold=label_threshold, query_ids=query_ids,
                             answer_ids=answer_ids, tile_size=tile_size,
                             policy=WeinceMixture(config, anchor_pool),
                             softmax_batch=softmax_batch)
    if return_stats:
        return loss, WeinceStats.from_lambdas(states)
    return loss
