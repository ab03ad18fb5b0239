"""The unpadded ("packed") training forward of a BERT-type transformer.

A padded batch costs (texts x longest text) token positions in every linear layer, layer
norm, GELU and dropout of the model; on STS-B, batches of 16 texts are half padding. The
packed forward hands the model the batch's real tokens end to end as one row ``(1, T)``,
each text with its own positions (``position_ids`` restarting at 0 per text), so all of
that runs on the T real tokens only. Attention alone needs the texts apart:
:func:`packed_attention`, registered with transformers' attention interface and switched
on for the duration of the call, scatters the queries, keys and values into the padded
layout, runs ``scaled_dot_product_attention`` with the key-padding mask (what the padded
path's SDPA computes for every real token) and gathers the real rows back. The token
embeddings come back padded, with zeros at the pads, so sentence-transformers' own pooling
(and Normalize) run unchanged on them.

It is the same function as the padded forward (tests/test_packed_forward.py: float64,
embeddings and every gradient); only dropout's random masks are laid out over other
positions. It applies to the model types in :data:`PACKED_MODEL_TYPES` (absolute
positions read from ``position_ids``; attention through the attention interface) with
right-padded inputs; :func:`packable` says whether a sentence-transformers model is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Hugging Face ``model_type``s whose packed forward equals the padded one (tested on BERT:
#: all-MiniLM-L6-v2 is one). Others (RoBERTa's padding-offset positions, relative or rotary
#: positions) keep the padded forward.
PACKED_MODEL_TYPES = frozenset({"bert"})
#: The attention implementations whose arithmetic :func:`packed_attention` reproduces.
PADDED_ATTENTION = frozenset({"sdpa", "eager"})
#: The name :func:`packed_attention` is registered under.
ATTENTION_NAME = "batchscale_packed"
#: The keyword the packing travels under, from the model's forward to the attention call.
PACKED_KWARG = "batchscale_packed"
#: The feature keys the packed forward knows how to pack (anything else: padded forward).
PACKED_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})

_registered = False


#: One more padded attention call costs about as much as this many more (token x token)
#: scores (its ops' fixed overheads, forward and backward): what decides when texts of
#: different lengths share a call (:func:`length_buckets`).
CALL_COST = 512


@dataclass(frozen=True)
class Bucket:
    """Texts of similar length whose attention runs in one padded call.

    ``gather``: ``(texts * width,)`` the packed token behind each padded slot (the pads
    point at token 0, masked as keys and dropped as queries); ``key_mask``: ``(texts, 1, 1,
    width)``; ``keep``: the slots of the real tokens, text by text."""

    gather: Tensor
    key_mask: Tensor
    keep: Tensor
    texts: int
    width: int


@dataclass(frozen=True)
class Packing:
    """Where a padded ``(texts, width)`` batch's real tokens are.

    ``rows``: ``(T,)`` flat indices of the real tokens in the padded layout, text by text
    (the packed order); ``positions``: ``(T,)`` each token's position in its text;
    ``buckets``: the attention calls; ``order``: ``(T,)`` where each packed token's row is
    in the buckets' outputs end to end."""

    rows: Tensor
    positions: Tensor
    buckets: tuple[Bucket, ...]
    order: Tensor
    texts: int
    width: int


def length_buckets(lengths: np.ndarray, call_cost: int = CALL_COST) -> list[np.ndarray]:
    """Texts (indices into ``lengths``) cut into runs of the length order that minimise the
    padded attention's work, sum over runs of (texts x longest^2 + ``call_cost``): an exact
    dynamic programme over the distinct lengths (texts of one length never part)."""
    order = np.argsort(lengths, kind="stable")
    values, counts = np.unique(lengths[order], return_counts=True)
    ends = np.cumsum(counts)  # texts up to and including each distinct length
    before = np.concatenate([[0], ends[:-1]])
    best = np.zeros(len(values) + 1)
    cut = np.zeros(len(values), dtype=np.int64)
    for j, top in enumerate(values.astype(np.float64)):
        # a run from distinct length i to j: (texts in it) x top^2 + call_cost
        costs = best[: j + 1] + (ends[j] - before[: j + 1]) * top * top + call_cost
        cut[j] = int(np.argmin(costs))
        best[j + 1] = costs[cut[j]]
    runs, j = [], len(values) - 1
    while j >= 0:
        i = cut[j]
        runs.append(order[before[i]: ends[j]])
        j = i - 1
    return runs[::-1]


def _bucket(texts: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> Bucket:
    width = int(lengths[texts].max())
    slots = np.arange(width)
    real = slots[None, :] < lengths[texts, None]  # (texts, width)
    gather = np.where(real, starts[texts, None] + slots[None, :], 0).reshape(-1)
    keep = np.flatnonzero(real.reshape(-1))
    return Bucket(torch.from_numpy(gather), torch.from_numpy(real)[:, None, None, :],
                  torch.from_numpy(keep), len(texts), width)


def pack(attention_mask: Tensor) -> Packing | None:
    """The packing of a right-padded batch; None when the mask is not right padding (a
    left-padded text's positions would differ) or a text is empty."""
    mask = attention_mask.bool()
    texts, width = mask.shape
    lengths_t = mask.sum(dim=1)
    if texts == 0 or bool((lengths_t == 0).any()):
        return None
    rows = mask.reshape(-1).nonzero().squeeze(1)
    starts_t = torch.cumsum(lengths_t, 0) - lengths_t
    positions = torch.arange(rows.numel(), device=rows.device) - torch.repeat_interleave(
        starts_t, lengths_t)
    if not torch.equal(rows % width, positions):  # some text does not start at column 0
        return None
    lengths, starts = lengths_t.cpu().numpy(), starts_t.cpu().numpy()
    buckets = [_bucket(run, lengths, starts)
               for run in length_buckets(lengths, call_cost=CALL_COST)]
    # the buckets' outputs hold the packed tokens text by text in bucket order
    in_buckets = np.concatenate([b.gather.numpy()[b.keep.numpy()] for b in buckets])
    order = np.empty_like(in_buckets)
    order[in_buckets] = np.arange(len(in_buckets))
    device = attention_mask.device
    buckets = [Bucket(b.gather.to(device), b.key_mask.to(device), b.keep.to(device),
                      b.texts, b.width) for b in buckets]
    return Packing(rows, positions, tuple(buckets), torch.from_numpy(order).to(device),
                   texts, width)


def packable(st: nn.Module, transformer_type: type, tail_types: tuple[type, ...]) -> bool:
    """Whether ``st`` (a SentenceTransformer) is a transformer of a packed model type, read
    out as its last hidden state, followed only by modules of ``tail_types`` (pooling,
    normalisation: they read the padded token embeddings and the attention mask)."""
    modules = list(st.children())
    if not modules or not isinstance(modules[0], transformer_type):
        return False
    if not all(isinstance(m, tail_types) for m in modules[1:]):
        return False
    model = getattr(modules[0], "auto_model", None)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "output_hidden_states", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(config, "_attn_implementation", None) not in PADDED_ATTENTION:
        return False
    text = getattr(modules[0], "modality_config", {}).get("text")  # sentence-transformers 6
    if text is None:  # 5.x: the last hidden state, always
        return True
    output = text.get("method_output_name")
    return text.get("method") == "forward" and output in (
        "last_hidden_state", ["last_hidden_state"], ("last_hidden_state",))


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of packed ``(1, heads, T, dim)`` projections, each text attending to its
    own tokens: computed in the padded layout, one call per length bucket (so a short text
    is not padded to the batch's longest), returned packed as ``(1, T, heads, dim)``, as
    the attention interface wants."""
    packing: Packing | None = kwargs.get(PACKED_KWARG)
    if packing is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention needs the {PACKED_KWARG!r} "
                           "keyword (it is switched on only inside packed_forward)")
    heads, dim = query.shape[1], query.shape[3]
    flat = [x[0].transpose(0, 1) for x in (query, key, value)]  # (T, heads, dim) views
    outs = []
    for b in packing.buckets:
        q, k, v = (x.index_select(0, b.gather).view(b.texts, b.width, heads, dim)
                   .transpose(1, 2) for x in flat)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.key_mask,
                                             dropout_p=dropout, scale=scaling)
        outs.append(out.transpose(1, 2).reshape(b.texts * b.width, heads, dim)
                    .index_select(0, b.keep))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, packing.order).unsqueeze(0), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        _registered = True


@contextmanager
def _packed_attention_on(config: Any) -> Iterator[None]:
    """The model's attention switched to :func:`packed_attention` for one call (restored
    after, so evaluation and a saved model keep their own implementation)."""
    _register()
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = saved


def packed_forward(st: nn.Module, features: dict[str, Tensor], packing: Packing) -> Tensor:
    """``(texts, dim)`` sentence embeddings of padded ``features`` (right-padded
    ``input_ids``, ``attention_mask``, optionally ``token_type_ids``) through ``st``'s
    transformer on the real tokens only, then its other modules on the padded token
    embeddings."""
    modules = list(st.children())
    model = modules[0].auto_model
    inputs = {"input_ids": features["input_ids"].reshape(-1).index_select(0, packing.rows)[None],
              "position_ids": packing.positions[None]}
    if "token_type_ids" in features:
        inputs["token_type_ids"] = features["token_type_ids"].reshape(-1).index_select(
            0, packing.rows)[None]
    with _packed_attention_on(model.config):
        hidden = model(**inputs, attention_mask=None, return_dict=True,
                       **{PACKED_KWARG: packing}).last_hidden_state[0]  # (T, hidden)
    tokens = hidden.new_zeros(packing.texts * packing.width, hidden.shape[-1]).index_copy(
        0, packing.rows, hidden).view(packing.texts, packing.width, -1)
    out: dict[str, Any] = {**features, "token_embeddings": tokens}
    for module in modules[1:]:
        out = module(out)
    return out["sentence_embedding"]


def join_padded(features: list[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Padded feature dicts with the same keys as one: their rows end to end, each padded
    on the right to the widest (``pad_id`` in ``input_ids``, 0 elsewhere)."""
    width = max(f["attention_mask"].shape[1] for f in features)
    joined = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        joined[key] = torch.cat([F.pad(f[key], (0, width - f[key].shape[1]), value=fill)
                                 for f in features])
    return joined
