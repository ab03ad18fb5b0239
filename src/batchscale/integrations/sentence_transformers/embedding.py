r"""The embeddings of the columns of a sentence-transformers batch (anchor, positive, optional
negatives), in one pass per column or through the gradient cache.

The sentence-transformers loss contract leaves the backward to the Trainer: ``forward`` returns
a loss tensor and the Trainer calls ``.backward()`` on it, scaled for gradient accumulation or
by the fp16 gradient scaler. So the gradient cache (Gao, Zhang, Han, Callan, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021) is split in time:

1. here, in ``forward``: every chunk of ``mini_batch_size`` examples is encoded without a graph,
   the RNG state saved before each chunk; the embeddings are returned as leaf tensors and the
   loss is computed on them with its graph;
2. the Trainer's backward runs the loss's backward down to those leaves: their gradients
   dL/de_i, already multiplied by whatever scale the Trainer applied;
3. a hook on the leaves then re-encodes each chunk with a graph under its saved RNG state (the
   same dropout masks, so the same embeddings) and back-propagates dL/de_i through it.

The parameter gradients are those of the whole batch in one graph (dL/dtheta = sum_i dL/de_i
de_i/dtheta), with the activation memory of one chunk. Parameters of the loss itself (a
learnable temperature) get theirs from step 2, as in the plain path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook
from torch.nn.parallel import DistributedDataParallel

from batchscale.batching.chunking import split_inputs
from batchscale.batching.gradient_cache import CachedEncoding, encode_chunks, replay_all

Features = Mapping[str, Any]


def embed(model: nn.Module, features: Features) -> Tensor:
    """A sentence-transformers model's ``sentence_embedding`` for one column."""
    return model(features)["sentence_embedding"]


def embed_columns(model: nn.Module, columns: Sequence[Features],
                  mini_batch_size: int | None = None) -> list[Tensor]:
    """One (m, d) embedding per column; through the gradient cache when ``mini_batch_size`` is
    set (see the module docstring), in one graph per column otherwise."""
    if mini_batch_size is None:
        return [embed(model, features) for features in columns]
    return cached_embeddings(model, columns, mini_batch_size)


def _device_type(columns: Sequence[Features]) -> str:
    for features in columns:
        for value in features.values():
            if isinstance(value, Tensor):
                return value.device.type
    return "cpu"


def cached_embeddings(model: nn.Module, columns: Sequence[Features],
                      mini_batch_size: int) -> list[Tensor]:
    """Steps 1 and 3 of the module docstring: the columns' embeddings as leaf tensors (encoded
    chunk by chunk without a graph) whose backward re-encodes the chunks with one."""
    # split_inputs passes non-tensor entries (the collator's `modality` or `task` strings) on
    # to every chunk as they are.
    chunks = [split_inputs(features, chunk_size=mini_batch_size) for features in columns]
    # Mixed precision: re-enter the autocast state of the first pass, so the replay computes
    # the same embeddings (torch.utils.checkpoint does the same).
    device_type = _device_type(columns)
    autocast = (device_type, torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type))
    # The copy of the inputs per pass (sentence-transformers modules write into the features
    # dict) is the core's.
    encodings = [encode_chunks(partial(embed, model), column) for column in chunks]
    leaves = [e.embeddings for e in encodings]
    if not torch.is_grad_enabled():  # evaluation: no backward will come
        return leaves
    leaves = [e.requires_grad_() for e in leaves]
    # One hook for all columns, called once per backward with every column's gradient (None
    # for a column the loss did not use), so the last re-encoding can be the one DDP syncs on.
    register_multi_grad_hook(leaves, partial(_replay, model, encodings, autocast))
    return leaves


def _replay(model: nn.Module, encodings: list[CachedEncoding],
            autocast: tuple[str, bool, torch.dtype], grads: Sequence[Tensor | None]) -> None:
    """Step 3: re-encode each chunk under its saved RNG state and push dL/de into it."""
    # Under DistributedDataParallel, reduce the gradients once, after the last chunk (an outer
    # no_sync, e.g. during gradient accumulation, still holds for that one).
    no_sync = model.no_sync if isinstance(model, DistributedDataParallel) else None
    device_type, enabled, dtype = autocast
    # The autograd engine runs hooks with grad mode off; the replay needs a graph.
    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        replay_all(encodings, grads, no_sync=no_sync)
