r"""The base of the sentence-transformers loss modules: embed each column of the batch, then
hand the embeddings to a loss of :mod:`batchscale.losses`, optionally on the batch of every
rank.

The sentence-transformers loss contract: the module is built with the model, ``forward``
takes the tokenised columns (``sentence_features``: anchor, positive, optional negatives...)
and the ``label``/``score`` column (``labels``, None without one) and returns a 0-dim loss the
Trainer back-propagates; ``get_config_dict`` and ``citation`` go into the model card.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from batchscale.batching.distributed_loss import gathered_pair_loss
from batchscale.losses import LearnableTemperature
from batchscale.losses.pair_loss import TileSize, resolve_tile

from .embedding import Features, embed_columns


def check_optional_int(owner: str, name: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be None or an integer >= {minimum}, "
                         f"got {value!r}")
    return value


def check_fraction(owner: str, name: str, value: object) -> float | None:
    """None, or a number in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{owner}: `{name}` must be None or a number in [0, 1], got {value!r}")
    return float(value)


class BatchscaleLoss(nn.Module):
    """Embeds the columns and computes :meth:`pair_loss` on them; subclasses give the loss.

    Columns: the first is the query/anchor side q, the second the answer/positive side a, any
    further column a hard negative of each pair (extra candidates of the query rows).

    Args:
        model: the ``SentenceTransformer`` being trained.
        mini_batch_size: encode the batch ``mini_batch_size`` examples at a time through the
            gradient cache (exact gradients of the whole batch, the activation memory of one
            mini-batch; see :mod:`.embedding`); None encodes each column in one pass.
        gather_across_ranks: when torch.distributed is initialised with more than one rank,
            compute the loss of the global batch, every rank's embeddings all-gathered with
            gradient (:func:`batchscale.batching.distributed_loss.gathered_pair_loss`), so the
            negatives come from every rank. Ignored in a single process.
    """

    def __init__(self, model: nn.Module, *, mini_batch_size: int | None = None,
                 gather_across_ranks: bool = True) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise ValueError(f"{owner}: `model` must be a SentenceTransformer (an nn.Module), "
                             f"got {type(model).__name__}")
        if not isinstance(gather_across_ranks, bool):
            raise ValueError(f"{owner}: `gather_across_ranks` must be a bool, "
                             f"got {gather_across_ranks!r}")
        self.model = model
        self.mini_batch_size = check_optional_int(owner, "mini_batch_size", mini_batch_size, 1)
        self.gather_across_ranks = gather_across_ranks

    def forward(self, sentence_features: Iterable[Features],
                labels: Tensor | None = None) -> Tensor:
        columns = list(sentence_features)
        if len(columns) < 2:
            raise ValueError(f"{type(self).__name__}: needs at least 2 input columns (anchor, "
                             f"positive[, negatives...]), got {len(columns)}")
        embeddings = embed_columns(self.model, columns, self.mini_batch_size)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor],
                                     labels: Tensor | None = None) -> Tensor:
        """The loss of already computed column embeddings (q, a, negatives...)."""
        q, a, *negatives = embeddings
        # (m, k, d): negative j of pair i; the losses take them as extra answer columns.
        hard_negatives = torch.stack(negatives, dim=1) if negatives else None
        if self.gather_across_ranks:  # plain pair_loss when not distributed
            return gathered_pair_loss(self.pair_loss, q, a, hard_negatives=hard_negatives,
                                      labels=labels)
        return self.pair_loss(q, a, hard_negatives=hard_negatives, labels=labels)

    def pair_loss(self, q: Tensor, a: Tensor, *, hard_negatives: Tensor | None = None,
                  labels: Tensor | None = None) -> Tensor:
        """The loss of a (possibly gathered) batch of pairs."""
        raise NotImplementedError

    @property
    def uses_gradient_cache(self) -> bool:
        """True with ``mini_batch_size``: the model is re-run during the backward. Read by
        sentence-transformers' wrapping losses (MatryoshkaLoss, AdaptiveLayerLoss), which
        cannot patch the model's forward around such a loss."""
        return self.mini_batch_size is not None

    def get_config_dict(self) -> dict[str, Any]:
        return {"mini_batch_size": self.mini_batch_size,
                "gather_across_ranks": self.gather_across_ranks}

    @property
    def citation(self) -> str:
        raise NotImplementedError


class BatchSoftmaxLoss(BatchscaleLoss):
    """A batch-softmax loss: a temperature, label masking, and the memory-linear option.

    Args:
        temperature: tau > 0, or a :class:`~batchscale.losses.LearnableTemperature` (trained
            with the model: the Trainer's optimiser takes the loss's parameters).
            sentence-transformers' ``scale`` is 1 / tau: ``scale=20`` is ``temperature=0.05``.
        label_threshold: with a ``label``/``score`` column, pairs with score <= threshold are
            not anchors but stay candidates (BSC eq. 5); None needs 0/1 labels.
        tile_size: ``"auto"`` (dense up to a 2048 x 2048 similarity matrix on CPU, 4096 x 4096
            elsewhere, tiled above), an int (always tiled: memory linear in the batch size),
            None (always dense).
    """

    def __init__(self, model: nn.Module, temperature: float | LearnableTemperature = 0.05, *,
                 label_threshold: float | None = None, tile_size: TileSize = "auto",
                 mini_batch_size: int | None = None, gather_across_ranks: bool = True) -> None:
        super().__init__(model, mini_batch_size=mini_batch_size,
                         gather_across_ranks=gather_across_ranks)
        owner = type(self).__name__
        if not isinstance(temperature, LearnableTemperature) and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature <= 0
        ):
            raise ValueError(f"{owner}: `temperature` must be a finite number > 0 or a "
                             f"LearnableTemperature, got {temperature!r}")
        resolve_tile(owner, tile_size, 1, 1)  # raises on a bad value
        self.temperature = (temperature if isinstance(temperature, LearnableTemperature)
                            else float(temperature))
        self.label_threshold = check_fraction(owner, "label_threshold", label_threshold)
        self.tile_size = tile_size

    @property
    def tau(self) -> float | Tensor:
        """The temperature the loss uses now (a 0-dim tensor when learnable)."""
        if isinstance(self.temperature, LearnableTemperature):
            return self.temperature()
        return self.temperature

    def threshold_for(self, labels: Tensor | None) -> float | None:
        # A dataset without a label column gets no threshold (the losses reject one alone).
        return None if labels is None else self.label_threshold

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": float(self.tau),
                "learnable_temperature": isinstance(self.temperature, LearnableTemperature),
                "label_threshold": self.label_threshold, "tile_size": self.tile_size,
                **super().get_config_dict()}
