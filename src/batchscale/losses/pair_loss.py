"""The entry of every batch-softmax pair loss: validate, prepare, then compute densely or
over tiles (memory-linear) depending on the batch size."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._checks import check_choice, check_temperature
from .batch_softmax import DIRECTIONS, Directions, batch_softmax_loss, prepare_batch
from .blocks import PairInputs, block_size, over_blocks, stacked_plain_loss
from .logits import PLAIN_LOGITS, LogitPolicy, ScaledCosine, gather_anchors_of
from .similarity import Normalization
from .tiled import DEFAULT_TILE, tiled_batch_softmax_loss
from .weince_tail import WeinceLambda

TileSize = int | Literal["auto"] | None

# "auto" stays dense while the similarity matrix is small and tiles above, where the tiled
# path is as fast or faster and holds O(B * tile) memory. On CPU (2 cores, d = 384, fwd+bwd,
# medians of 7) tiled/dense was 0.93-1.07 at B = 2,048 and 0.77-0.90 at 3,072 and 4,096 for
# InfoNCE, BSC and WEINCE. Other devices keep 4096 x 4096 (not measured here).
AUTO_DENSE_ENTRIES = {"cpu": 2048 * 2048}
AUTO_DENSE_OTHER = 4096 * 4096


def resolve_tile(caller: str, tile_size: TileSize, rows: int, cols: int,
                 device_type: str = "cpu") -> int | None:
    """The tile to use, or None for the dense path."""
    if tile_size is None:
        return None
    if tile_size == "auto":
        limit = AUTO_DENSE_ENTRIES.get(device_type, AUTO_DENSE_OTHER)
        return None if rows * cols <= limit else DEFAULT_TILE
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"{caller}: `tile_size` must be a positive int, 'auto' or None, "
                         f"got {tile_size!r}")
    return tile_size


#: Embedding dtypes the loss computes in float32: half precision rounds a cosine of 0.9999
#: to 1 (WEINCE's log(1 - s) becomes -inf) and its logits s / tau to steps of 2^-8 s / tau.
_HALF = (torch.float16, torch.bfloat16)


def loss_precision(x: object) -> object:
    """``x`` in float32 when it is a half-precision tensor (the cast passes the gradient
    back in ``x``'s dtype), else ``x`` itself."""
    return x.float() if isinstance(x, Tensor) and x.dtype in _HALF else x


def pair_loss(caller: str, q: Tensor, a: Tensor, temperature: float | Tensor, *,
              directions: Directions, normalization: Normalization,
              hard_negatives: Tensor | None, labels: object, label_threshold: float | None,
              query_ids: object, answer_ids: object, tile_size: TileSize = "auto",
              policy: LogitPolicy = PLAIN_LOGITS, softmax_batch: int | None = None
              ) -> tuple[Tensor, list[WeinceLambda]]:
    """Validate, prepare and compute a batch-softmax pair loss; with ``softmax_batch`` N < m,
    the mean of the losses of its blocks of N pairs (:mod:`~batchscale.losses.blocks`).

    The similarities and logits are computed in float32 for half-precision embeddings and
    with autocast off (a trainer or sentence-transformers under fp16 / bf16), on the dense
    path as on the tiled one, so the precision does not depend on the batch size."""
    if not isinstance(q, Tensor) or not torch.amp.is_autocast_available(q.device.type):
        # (not a tensor: the checks below name the bad argument)
        return _pair_loss(caller, q, a, temperature, directions=directions,
                          normalization=normalization, hard_negatives=hard_negatives,
                          labels=labels, label_threshold=label_threshold,
                          query_ids=query_ids, answer_ids=answer_ids, tile_size=tile_size,
                          policy=policy, softmax_batch=softmax_batch)
    with torch.autocast(q.device.type, enabled=False):
        return _pair_loss(caller, loss_precision(q), loss_precision(a), temperature,
                          directions=directions, normalization=normalization,
                          hard_negatives=loss_precision(hard_negatives), labels=labels,
                          label_threshold=label_threshold, query_ids=query_ids,
                          answer_ids=answer_ids, tile_size=tile_size, policy=policy,
                          softmax_batch=softmax_batch)


def _pair_loss(caller: str, q: Tensor, a: Tensor, temperature: float | Tensor, *,
               directions: Directions, normalization: Normalization,
               hard_negatives: Tensor | None, labels: object, label_threshold: float | None,
               query_ids: object, answer_ids: object, tile_size: TileSize,
               policy: LogitPolicy, softmax_batch: int | None
               ) -> tuple[Tensor, list[WeinceLambda]]:
    """:func:`pair_loss` in the embeddings' dtype, autocast as the caller left it."""
    check_temperature(caller, temperature)
    check_choice(caller, "directions", directions, DIRECTIONS)
    n = block_size(caller, softmax_batch, q.shape[0] if isinstance(q, Tensor) else 0)
    if n is not None:
        if gather_anchors_of(policy) is not None:
            raise ValueError(f"{caller}: `anchor_pool` and `softmax_batch` ({n}) together: a "
                             "block's rho0 comes from the block's own anchors")
        inputs = PairInputs(caller, q, a, hard_negatives=hard_negatives, labels=labels,
                            query_ids=query_ids, answer_ids=answer_ids)
        k = inputs.k
        if isinstance(policy, ScaledCosine) and resolve_tile(
                caller, tile_size, n, n + n * k, inputs.q.device.type) is None:
            return stacked_plain_loss(inputs, n, temperature, directions, normalization,
                                      label_threshold), []

        def block(q: Tensor, a: Tensor, hard_negatives: Tensor | None = None,
                  labels: object = None, query_ids: object = None, answer_ids: object = None
                  ) -> tuple[Tensor, list[WeinceLambda]]:
            return pair_loss(caller, q, a, temperature, directions=directions,
                             normalization=normalization, hard_negatives=hard_negatives,
                             labels=labels, label_threshold=label_threshold,
                             query_ids=query_ids, answer_ids=answer_ids, tile_size=tile_size,
                             policy=policy)

        return over_blocks(inputs, n, block)
    batch = prepare_batch(caller, q, a, normalization=normalization, hard_negatives=hard_negatives,
                          labels=labels, label_threshold=label_threshold, query_ids=query_ids,
                          answer_ids=answer_ids)
    n = batch.candidates.shape[0]
    # With `anchor_pool` (an all-gather: rho0 over every rank's anchors) each path makes its
    # own all-gathers, so the choice must not hang on this rank's row count, which the last
    # batch of an epoch may make uneven across ranks: the candidates, gathered from every
    # rank, decide alone.
    across_ranks = gather_anchors_of(policy) is not None
    tile = resolve_tile(caller, tile_size, n if across_ranks else batch.m, n, batch.q.device.type)
    if tile is None:
        return batch_softmax_loss(batch, temperature, directions, policy)
    return tiled_batch_softmax_loss(batch, temperature, directions, policy, tile)
