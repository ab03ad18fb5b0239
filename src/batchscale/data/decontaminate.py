"""Decontamination: training pairs that share a text with an evaluation set are dropped.

Texts are compared folded (:func:`fold`: Unicode case folding, runs of whitespace as one
space, ends stripped), so ``"A man  plays."`` and ``"a man plays."`` match. A pair is dropped
when any of its texts (anchor, positive, hard negative) equals any held-out text; which
texts are held out is the caller's choice (the study: every sentence of the STS dev and
test splits it scores on, the queries of a retrieval split; see ``study/training_data``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from .records import Pair, Triplet

R = TypeVar("R", Pair, Triplet)


def fold(text: str) -> str:
    """The comparison form of a text: case-folded, whitespace runs collapsed, stripped."""
    return " ".join(text.casefold().split())


def folded_set(texts: Iterable[str]) -> frozenset[str]:
    return frozenset(fold(t) for t in texts)


def _texts(record: Pair | Triplet) -> tuple[str, ...]:
    if isinstance(record, Triplet):
        return record.anchor, record.positive, record.negative
    return record.text1, record.text2


def drop_contaminated(records: Sequence[R], held_out: frozenset[str]) -> tuple[list[R], int]:
    """(the records none of whose texts is in ``held_out`` (folded), how many were dropped)."""
    kept = [r for r in records if not any(fold(t) in held_out for t in _texts(r))]
    return kept, len(records) - len(kept)
