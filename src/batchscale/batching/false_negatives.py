"""False-negative ids: which examples of a batch must never be each other's negatives.

In a batch softmax every other pair's answer is a negative of a query. Two pairs are *the
same unit* when they share a group (the five captions of one Flickr8k image, one paper's
paraphrases) or a text (the same premise with two hypotheses, one sentence twice, a query
equal to another pair's answer), and, transitively, when a chain of such links joins them.
Each unit gets one int64 id; the losses mask a candidate whose id equals the anchor's
(:func:`~batchscale.losses.bsc_loss`'s ``query_ids`` / ``answer_ids``), so a pair's own
positive stays and every other member of its unit leaves its softmax.

``mode``:

* ``group``: units joined by groups and by equal texts (the default of training);
* ``text``: by equal texts alone (the text-identity masking of earlier versions);
* ``none``: no masking (every pair its own unit; the losses then take no ids).

A hard negative (a third column) gets the id of the unit that holds its text as a query or
an answer (so another member's copy of it is masked for that unit's anchors) or an id of its
own; it never joins its own pair's unit by being that pair's negative.

The units are the connected components of the bipartite graph examples -- keys (texts,
groups), found with :func:`scipy.sparse.csgraph.connected_components`, linear in the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .text_keys import text_key, text_keys

FalseNegatives = Literal["group", "text", "none"]
MODES: tuple[str, ...] = ("group", "text", "none")


def _group_links(groups: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(examples, keys): the examples that have a group, and their groups' keys."""
    cache: dict[str, int] = {}
    examples, keys = [], []
    for i, g in enumerate(groups):
        if g is None:
            continue
        key = cache.get(g)
        if key is None:  # salted: a group name never equals a text's key
            key = cache[g] = text_key("\x00group\x00" + g)
        examples.append(i)
        keys.append(key)
    return np.asarray(examples, dtype=np.int64), np.asarray(keys, dtype=np.int64)


def unit_ids(columns: Sequence[Sequence[str]], groups: Sequence[str | None] | None = None,
             mode: FalseNegatives = "group") -> np.ndarray:
    """(N, C) int64 false-negative ids of a dataset given column-wise (queries, answers[,
    hard negatives]): columns 0 and 1 hold the example's unit id, column 2 its hard
    negative's. Ids are component numbers, 0 .. units - 1 (hard negatives' own ids follow)."""
    if mode not in MODES:
        raise ValueError(f"false negatives: mode must be one of {MODES}, got {mode!r}")
    if len(columns) not in (2, 3):
        raise ValueError(f"unit_ids: 2 or 3 text columns, got {len(columns)}")
    n = len(columns[0])
    if groups is not None and len(groups) != n:
        raise ValueError(f"unit_ids: {len(groups)} groups for {n} examples")
    keys = text_keys(columns)  # across columns: a query equal to an answer links them
    if mode == "none":
        units = np.arange(n, dtype=np.int64)
    else:
        every = np.arange(n, dtype=np.int64)
        links = [(every, keys[:, 0]), (every, keys[:, 1])]
        if mode == "group" and groups is not None:
            links.append(_group_links(groups))
        units = _components(links, n)
    out = np.repeat(units[:, None], len(columns), axis=1)
    if len(columns) == 3:
        out[:, 2] = _negative_ids(keys, units)
    return out


def batch_ids(units: torch.Tensor, indices: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's ids as the losses take them, from a dataset's (N, C) :func:`unit_ids`:
    query ids (m,) and answer ids (m + m * k,), the answers' then the hard negatives'."""
    rows = units[torch.as_tensor(list(indices), dtype=torch.long, device=units.device)]
    return rows[:, 0], rows[:, 1:].T.reshape(-1)


def _components(links: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Component number of each of ``n`` examples in the graph example -- key, the edges
    given as (examples, keys) arrays."""
    rows = np.concatenate([e for e, _ in links])
    _, key_node = np.unique(np.concatenate([k for _, k in links]), return_inverse=True)
    cols = n + key_node
    size = n + (int(key_node.max()) + 1 if len(key_node) else 0)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    # Renumber the examples' components 0 .. k-1 in order of first appearance.
    _, first, inverse = np.unique(labels[:n], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def _negative_ids(keys: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The unit holding each hard negative's text as a query or an answer; else a fresh id."""
    owner: dict[int, int] = {}
    for col in (0, 1):
        for k, u in zip(keys[:, col].tolist(), units.tolist(), strict=True):
            owner.setdefault(k, u)
    fresh = int(units.max()) + 1 if len(units) else 0
    out = np.empty(len(keys), dtype=np.int64)
    own: dict[int, int] = {}
    for i, k in enumerate(keys[:, 2].tolist()):
        u = owner.get(k)
        if u is None:
            u = own.get(k)
            if u is None:
                u = own[k] = fresh
                fresh += 1
        out[i] = u
    return out
