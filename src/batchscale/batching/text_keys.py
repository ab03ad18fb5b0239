"""Integer keys for the texts of a dataset, so that batching compares int64 values, not strings.

Each text is hashed once with BLAKE2b (8-byte digest), which is stable across processes and
Python versions (unlike ``hash()``, salted per process), so every rank of a distributed run and
every resumed run computes the same keys. Two different texts collide with probability about
n^2 / 2^65 (about 1e-7 for two million texts); a collision can only make the no-duplicates rule
keep two different texts apart, never put two equal texts together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def text_key(text: str) -> int:
    """The signed 64-bit BLAKE2b digest of the UTF-8 text: equal texts, equal keys."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_keys(columns: Sequence[Sequence[str]], *, across_columns: bool = True) -> np.ndarray:
    """Keys of a dataset given column-wise, e.g. ``[queries, answers]``: an (N, C) int64 array.

    With ``across_columns`` (the default, as sentence-transformers' NoDuplicatesBatchSampler),
    a query equal to another example's answer has the same key, so the pair cannot share a
    batch: in a batch softmax that answer would be a false negative of the query. Without it,
    a text only clashes with the same text in the same column.
    """
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence) or not columns:
        raise ValueError(
            f"`columns` must be a non-empty sequence of text columns, got {type(columns).__name__}"
        )
    lengths = {len(column) for column in columns}
    if len(lengths) != 1:
        raise ValueError(f"the text columns of `columns` differ in length: {sorted(lengths)}")
    keys = np.empty((lengths.pop(), len(columns)), dtype=np.int64)
    for c, column in enumerate(columns):
        if isinstance(column, (str, bytes)):
            raise ValueError(f"`columns[{c}]` must be a sequence of texts, got a single string")
        # Equal texts hash once: datasets repeat texts (that is the point of the sampler).
        cache: dict[str, int] = {}
        salt = "" if across_columns else f"\x00column{c}\x00"
        for i, text in enumerate(column):
            if not isinstance(text, str):
                raise ValueError(f"`columns[{c}][{i}]` must be a str, got {type(text).__name__}")
            key = cache.get(text)
            if key is None:
                key = cache[text] = text_key(salt + text)
            keys[i, c] = key
    return keys
