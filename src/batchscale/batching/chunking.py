"""Split a batch of encoder inputs into chunks that are encoded one at a time.

Two rules: ``chunk_size`` examples per chunk (GradCache's sub-batches), in the batch's order
or sorted by length (``sort_by_length``: rows of similar length share a chunk, so less
padding is encoded), or a ``max_tokens`` budget of padded tokens per chunk on the examples
sorted by length, so a chunk of short sentences holds more of them. Each chunk keeps the
original positions of its rows (``Chunk.index``), so the embeddings can be put back in the
batch's order before the loss. Padding columns that no row of a chunk uses are cut off, as
GradCache and sentence-transformers do: padded positions are masked out, so the embeddings
do not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Inputs = Mapping[str, Tensor]


@dataclass(frozen=True)
class Chunk:
    """The inputs of some rows of a batch and the rows' positions in the batch."""

    inputs: dict[str, Tensor]
    index: Tensor  # (n,) int64, positions in the original batch

    def __len__(self) -> int:
        return int(self.index.numel())


def check_rule(chunk_size: int | None, max_tokens: int | None) -> None:
    """Exactly one of the two rules, a positive integer."""
    if (chunk_size is None) == (max_tokens is None):
        raise ValueError(
            "give exactly one of `chunk_size` and `max_tokens`, "
            f"got chunk_size={chunk_size!r}, max_tokens={max_tokens!r}"
        )
    for name, value in (("chunk_size", chunk_size), ("max_tokens", max_tokens)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def batch_rows(inputs: Inputs) -> int:
    """The number of examples: the shared first dimension of every tensor."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(
            f"`inputs` must be a non-empty mapping of name -> tensor, got {type(inputs).__name__}"
        )
    rows = {name: t.shape[0] for name, t in inputs.items() if isinstance(t, Tensor) and t.ndim >= 1}
    if not rows:
        raise ValueError(f"`inputs` holds no tensor with a batch dimension: keys {list(inputs)}")
    if len(set(rows.values())) != 1:
        raise ValueError(f"the tensors of `inputs` disagree on the batch size: {rows}")
    return next(iter(rows.values()))


def token_lengths(inputs: Inputs) -> Tensor:
    """Tokens per example: the attention mask's sum, or the padded width without a mask."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.reshape(mask.shape[0], -1).sum(dim=1).to(torch.int64).cpu()
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2:
        raise ValueError(
            "`max_tokens` needs an `attention_mask` or 2-D `input_ids` in the inputs, "
            f"got keys {list(inputs)}"
        )
    return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)


def _take(inputs: Inputs, index: Tensor) -> dict[str, Tensor]:
    """Rows ``index`` of every tensor, without the padding columns none of them uses."""
    mask = inputs.get("attention_mask")
    width, keep = None, None
    if mask is not None and mask.ndim == 2:
        width = mask.shape[1]
        used = mask.index_select(0, index.to(mask.device)).ne(0).any(dim=0)
        if bool(used.any()):
            keep = int(used.nonzero().max()) + 1
    out = {}
    for name, t in inputs.items():
        if not isinstance(t, Tensor) or t.ndim == 0:
            out[name] = t
            continue
        rows = t.index_select(0, index.to(t.device))
        # Only trailing columns go, so left padding (and the positions it implies) stays.
        if keep is not None and keep < width and rows.ndim >= 2 and rows.shape[1] == width:
            rows = rows[:, :keep]
        out[name] = rows
    return out


def _budget_groups(lengths: Tensor, max_tokens: int) -> list[Tensor]:
    """Longest first; a chunk grows while rows x its longest row fit in ``max_tokens``. A row
    longer than the budget gets a chunk of its own (an example cannot be split)."""
    # Stable sort: ties keep the batch order, so the split is deterministic.
    order = torch.sort(lengths, descending=True, stable=True).indices
    groups, start = [], 0
    sorted_lengths = lengths[order].tolist()
    while start < len(order):
        longest = max(sorted_lengths[start], 1)
        count = max(1, max_tokens // longest)
        groups.append(order[start : start + count])
        start += count
    return groups


def split_inputs(
    inputs: Inputs,
    *,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
) -> list[Chunk]:
    """Chunks of ``inputs`` (a mapping of tensors sharing the batch dimension) by example
    count (``sort_by_length``: longest first instead of the batch's order) or by padded-token
    budget (always length-sorted); see the module docstring."""
    check_rule(chunk_size, max_tokens)
    if not isinstance(sort_by_length, bool):
        raise ValueError(f"`sort_by_length` must be a bool, got {sort_by_length!r}")
    n = batch_rows(inputs)
    if max_tokens is not None:
        groups = _budget_groups(token_lengths(inputs), max_tokens)
    else:
        assert chunk_size is not None
        order = torch.arange(n)
        if sort_by_length:
            order = torch.sort(token_lengths(inputs), descending=True, stable=True).indices
        groups = list(order.split(chunk_size))
    return [Chunk(_take(inputs, g), g) for g in groups]
