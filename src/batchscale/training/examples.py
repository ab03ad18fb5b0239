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
    ``labels``: a graded label in [0, 1] per example, or None."""

    columns: tuple[tuple[str, ...], ...]
    labels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.columns) not in (2, 3):
            raise ValueError(f"a training set has 2 or 3 text columns, got {len(self.columns)}")
        sizes = {len(c) for c in self.columns}
        if self.labels is not None:
            sizes.add(len(self.labels))
        if len(sizes) != 1:
            raise ValueError(f"training columns of different lengths: {sorted(sizes)}")

    @classmethod
    def from_records(cls, records: Sequence[Pair | Triplet]) -> TrainingSet:
        if not records:
            raise ValueError("no training examples")
        if all(isinstance(r, Triplet) for r in records):
            cols = tuple(tuple(getattr(r, f) for r in records)
                         for f in ("anchor", "positive", "negative"))
            return cls(cols)
        if not all(isinstance(r, Pair) for r in records):
            raise ValueError("training records must be all pairs or all triplets")
        cols = (tuple(r.text1 for r in records), tuple(r.text2 for r in records))
        has = [r.label is not None for r in records]
        labels = tuple(float(r.label) for r in records) if all(has) else None
        return cls(cols, labels)

    def __len__(self) -> int:
        return len(self.columns[0])

    def batch(self, indices: Sequence[int]) -> tuple[list[list[str]], Tensor | None]:
        sides = [[col[i] for i in indices] for col in self.columns]
        labels = None if self.labels is None else torch.tensor(
            [self.labels[i] for i in indices], dtype=torch.float32)
        return sides, labels
