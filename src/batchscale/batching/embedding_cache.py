"""Embeddings of every example as the training forward passes saw them, for the next epoch's
batch composition.

BSC's special shuffling (Chernyavskiy et al., NAACL 2022, arXiv 2110.15725) regroups the data
every epoch from the current model's embeddings. Encoding the whole data set again costs a
forward pass over it (about a quarter of a training epoch of forward + backward + step in
``benchmarks/shuffling.py``); the training steps of the epoch already computed an embedding
of every example, so keeping them (detached) costs nothing. They come from a model that moved during
the epoch and, in train mode, with dropout: the grouping only needs neighbours, not exact
values. With several ranks, update with the gathered global batch (every rank then holds the
same cache and plans the same epoch).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .samplers import check_int


class EmbeddingCache:
    """An (N, d) float32 table filled row by row during an epoch."""

    def __init__(self, num_examples: int, dim: int) -> None:
        n, d = check_int("num_examples", num_examples, 1), check_int("dim", dim, 1)
        self._table = np.zeros((n, d), dtype=np.float32)
        self._seen = np.zeros(n, dtype=bool)

    def reset(self) -> None:
        """Forget which rows were written (the values stay until overwritten)."""
        self._seen[:] = False

    def update(
        self, indices: Tensor | np.ndarray | list[int], embeddings: Tensor | np.ndarray
    ) -> None:
        """Write the rows ``indices`` (example ids) with ``embeddings`` (m, d), L2-normalised
        here. For pairs, pass e.g. normalize(q) + normalize(a): one vector per pair."""
        if isinstance(embeddings, Tensor):
            embeddings = embeddings.detach().to("cpu", torch.float32).numpy()
        x = np.asarray(embeddings, dtype=np.float32)
        ids = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        n, d = self._table.shape
        if x.ndim != 2 or x.shape[1] != d or ids.shape != (x.shape[0],):
            raise ValueError(
                f"`embeddings` must be ({len(ids)}, {d}) for {len(ids)} indices, got {x.shape}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"`indices` must lie in [0, {n}), got [{ids.min()}, {ids.max()}]")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        self._table[ids] = x / np.maximum(norms, 1e-12)
        self._seen[ids] = True

    @property
    def coverage(self) -> float:
        """Share of the examples written since the last reset."""
        return float(self._seen.mean())

    def embeddings(self) -> np.ndarray:
        """The table (a copy), once every example has been written since the last reset."""
        if not self._seen.all():
            missing = np.flatnonzero(~self._seen)
            raise ValueError(
                f"{len(missing)} examples have no embedding yet (e.g. {missing[:5].tolist()}): "
                "an epoch with drop_last=True skips some, so encode those or keep drop_last off"
            )
        return self._table.copy()

    def state_dict(self) -> dict[str, Tensor]:
        """The table and which rows were written, for a checkpoint (N x d float32): a resumed
        run plans its next epoch from the same embeddings as an uninterrupted one."""
        return {"table": torch.from_numpy(self._table.copy()),
                "seen": torch.from_numpy(self._seen.copy())}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        table = np.asarray(state["table"], dtype=np.float32)
        seen = np.asarray(state["seen"], dtype=bool)
        if table.shape != self._table.shape or seen.shape != self._seen.shape:
            raise ValueError(f"the cached embeddings have shape {table.shape}, this cache "
                             f"{self._table.shape}")
        self._table[:], self._seen[:] = table, seen

