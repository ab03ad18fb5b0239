"""Training examples as the trainer sees them: parallel text columns and optional labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import Pair, Triplet


@dataclass(frozen=True)
class TrainingSet:
    """``columns``: one list of texts per side (queries, answers[, negatives]), aligned.
    ``labels``: a graded label in [0, 1] per example, or None. ``groups``: each example's
    group name (None: a group of its own), or None when no example has one; texts of one
    group are never each other's negatives (``train.false_negatives``)."""

    columns: tuple[tuple[str, ...], ...]
    labels: tuple[float, ...] | None = None
    groups: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.columns) not in (2, 3):
            raise ValueError(f"a training set has 2 or 3 text columns, got {len(self.columns)}")
        sizes = {len(c) for c in self.columns}
        if self.labels is not None:
            sizes.add(len(self.labels))
        if self.groups is not None:
            sizes.add(len(self.groups))
        if len(sizes) != 1:
            raise ValueError(f"training columns of different lengths: {sorted(sizes)}")

    @classmethod
    def from_records(cls, records: Sequence[Pair | Triplet]) -> TrainingSet:
        if not records:
            raise ValueError("no training examples")
        if all(isinstance(r, Triplet) for r in records):
            cols = tuple(tuple(getattr(r, f) for r in records)
                         for f in ("anchor", "positive", "negative"))
            return cls(cols, groups=_groups(records))
        if not all(isinstance(r, Pair) for r in records):
            raise ValueError("training records must be all pairs or all triplets")
        cols = (tuple(r.text1 for r in records), tuple(r.text2 for r in records))
        has = [r.label is not None for r in records]
        labels = tuple(float(r.label) for r in records) if all(has) else None
        return cls(cols, labels, _groups(records))

    def __len__(self) -> int:
        return len(self.columns[0])

    def batch(self, indices: Sequence[int]) -> tuple[list[list[str]], Tensor | None]:
        sides = [[col[i] for i in indices] for col in self.columns]
        labels = None if self.labels is None else torch.tensor(
            [self.labels[i] for i in indices], dtype=torch.float32)
        return sides, labels


def _groups(records: Sequence[Pair | Triplet]) -> tuple[str | None, ...] | None:
    groups = tuple(r.group for r in records)
    return groups if any(g is not None for g in groups) else None
