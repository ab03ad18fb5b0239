"""BSC's fast grouping by a random word shingle, without a model: MinHash.

Chernyavskiy et al. (NAACL 2022, arXiv 2110.15725) group examples by "a cluster id (k-means)
or a random word shingle". Here each example's id is the shingle (word n-gram of its texts)
that a random hash function ranks lowest, the MinHash of its shingle set (Broder, "On the
resemblance and containment of documents", 1997): two examples get the same id with
probability equal to the Jaccard similarity of their shingle sets, so lexically close examples
share groups. A new hash function each epoch gives new groups each epoch.

Shingles are hashed once (BLAKE2b, stable across processes, so every rank agrees); an epoch's
hash function is h(x) = a * x + b mod 2^64 with random odd a (a bijection on 64-bit values),
applied to all shingles at once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from .samplers import check_int

_WORD = re.compile(r"\w+", re.UNICODE)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                          "little")


class ShingleSets:
    """The shingle hashes of every example, flattened: example i owns
    ``values[offsets[i]:offsets[i + 1]]`` (at least one value: an example without words has
    the shingle of its empty text)."""

    def __init__(self, columns: Sequence[Sequence[str]], n: int = 2) -> None:
        self.n = check_int("n", n, 1)
        if not columns or len({len(c) for c in columns}) != 1:
            raise ValueError("`columns` must be non-empty text columns of equal length")
        cache: dict[str, int] = {}
        values: list[int] = []
        offsets = [0]
        for texts in zip(*columns, strict=True):
            shingles: set[str] = set()
            for text in texts:
                if not isinstance(text, str):
                    raise ValueError(f"texts must be str, got {type(text).__name__}")
                words = _WORD.findall(text.lower())
                if not words:
                    continue
                width = min(self.n, len(words))
                shingles.update(" ".join(words[i : i + width])
                                for i in range(len(words) - width + 1))
            if not shingles:
                shingles = {""}
            for s in shingles:
                value = cache.get(s)
                if value is None:
                    value = cache[s] = _hash(s)
                values.append(value)
            offsets.append(len(values))
        self.values = np.array(values, dtype=np.uint64)
        self.offsets = np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def minhash(self, rng: np.random.Generator) -> np.ndarray:
        """(N,) int64 group ids: each example's lowest shingle under a random hash."""
        a = rng.integers(0, 2**63, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        b = rng.integers(0, 2**63, dtype=np.uint64)
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
            hashed = self.values * a + b
        low = np.minimum.reduceat(hashed, self.offsets[:-1])
        return low.view(np.int64)
