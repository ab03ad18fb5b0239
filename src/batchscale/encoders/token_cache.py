"""Token ids computed once per text, for a static encoder's training steps.

A static encoder's step is an embedding-bag mean: microseconds of arithmetic, next to which
running the tokenizer on every batch dominates a small batch's step. :class:`TokenCache`
keeps each text's ids (untruncated, so one cache serves every ``max_length``) and gives a
batch as an embedding bag's inputs: the flat ids of all texts and each text's offset.

:func:`shared_token_cache` returns one cache per tokenizer in the process, keyed by the
tokenizer's serialised form, so the cells of a sweep in one process (each building its own
encoder from the same model) tokenise the training set once between them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Tokenizers whose caches a process keeps (the least recently used goes first).
MAX_SHARED_CACHES = 4

_SHARED: OrderedDict[str, TokenCache] = OrderedDict()


class TokenCache:
    """Token ids (no special tokens, untruncated) per text, from a ``tokenizers.Tokenizer``.

    ``tokenized`` counts the texts run through the tokenizer (each at most once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, np.ndarray] = {}
        self.tokenized = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, text: object) -> bool:
        return text in self._ids

    def add(self, texts: Iterable[str]) -> None:
        """Tokenise the texts not seen yet, in one batch call."""
        ids = self._ids
        missing = [t for t in dict.fromkeys(texts) if t not in ids]
        if not missing:
            return
        for text, enc in zip(missing, self.tokenizer.encode_batch(missing,
                                                                  add_special_tokens=False),
                             strict=True):
            ids[text] = np.asarray(enc.ids, dtype=np.int64)
        self.tokenized += len(missing)

    def ids(self, texts: Sequence[str], max_length: int | None = None) -> list[np.ndarray]:
        """Each text's ids, truncated to ``max_length`` (None: whole)."""
        self.add(texts)
        ids = self._ids
        if max_length is None:
            return [ids[t] for t in texts]
        return [ids[t][:max_length] for t in texts]

    def bags(self, texts: Sequence[str],
             max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """``(input_ids, offsets)``: the texts' ids end to end (int64) and where each text's
        ids start, as ``torch.nn.EmbeddingBag`` takes them."""
        arrays = self.ids(texts, max_length)
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(flat), torch.from_numpy(offsets)


def tokenizer_key(tokenizer: Any) -> str:
    """A digest of the tokenizer's whole serialised form (vocabulary, normaliser,
    pre-tokeniser, truncation and padding settings): equal keys tokenise alike."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def shared_token_cache(tokenizer: Any) -> TokenCache:
    """The process's cache for this tokenizer (created on first use; at most
    :data:`MAX_SHARED_CACHES` tokenizers are kept)."""
    key = tokenizer_key(tokenizer)
    cache = _SHARED.get(key)
    if cache is None:
        cache = _SHARED[key] = TokenCache(tokenizer)
        while len(_SHARED) > MAX_SHARED_CACHES:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return cache
