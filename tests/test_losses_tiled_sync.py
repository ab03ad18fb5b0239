"""The tiled loss's tile loops read nothing back from the device: a host read inside a loop
(``bool``, ``float``, ``.item()``) makes the host wait for every tile queued before it, so
the GPU idles between tiles. Reads are counted as ``aten._local_scalar_dense`` calls."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchscale.losses import bsc_loss, weince_loss


class _HostReads(TorchDispatchMode):
    """Counts the device-to-host reads of one scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _case(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, 8, generator=g, dtype=torch.float64)
    a = q + 0.8 * torch.randn(m, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(0, m // 3, (m,), generator=g)  # masks: the general tiled backward
    return q, a, ids


def _backward_reads(tile: int) -> int:
    q, a, ids = _case(64)
    q.requires_grad_()
    loss = bsc_loss(q, a, 0.1, query_ids=ids, answer_ids=ids, tile_size=tile)
    with _HostReads() as reads:
        loss.backward()
    return reads.count


def test_the_tiled_backward_reads_no_scalar_per_tile() -> None:
    assert _backward_reads(32) == _backward_reads(4)  # 4 tiles vs 256: the same reads


@pytest.mark.parametrize("fn", [bsc_loss, weince_loss], ids=["bsc", "weince"])
def test_tiled_equals_dense_under_a_negative_upstream_gradient(fn) -> None:
    """A loss maximised (its gradient scaled by -2): the blocks whose gradient is not
    folded into the logits' bias."""
    q, a, ids = _case(40, seed=1)

    def grads(tile: int | None) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in (q, a)]
        loss = fn(*leaves, 0.1, query_ids=ids, answer_ids=ids, tile_size=tile)
        (-2.0 * loss).backward()
        return [x.grad for x in leaves]

    for dense, tiled in zip(grads(None), grads(8), strict=True):
        assert torch.allclose(tiled, dense, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("directions", ["both", "q->a"])
def test_weince_tiles_without_host_reads_equal_the_dense_loss(monkeypatch, directions) -> None:
    """WEINCE's shortfall 1 - s, clamped near s = 1: on a GPU its clamp mask is built for
    every tile instead of read back to skip it (the CPU path, forced here): the same loss
    and gradients, and no read per tile."""
    from batchscale.losses import logits

    q, a, ids = _case(48, seed=2)
    a[:3] = q[:3]  # duplicates: clamped shortfalls

    def run(tile: int | None) -> tuple[list[torch.Tensor], int]:
        leaves = [x.clone().requires_grad_() for x in (q, a)]
        with _HostReads() as reads:
            loss = weince_loss(*leaves, 0.1, query_ids=ids, answer_ids=ids, tile_size=tile,
                               directions=directions)
            loss.backward()
        return [loss.detach(), *(x.grad for x in leaves)], reads.count

    dense, _ = run(None)
    monkeypatch.setattr(logits, "host_reads_are_free", lambda device: False)
    tiled, reads = run(4)
    _, fewer_tiles = run(24)
    for d, t in zip(dense, tiled, strict=True):
        assert torch.allclose(t, d, rtol=1e-6, atol=1e-12)
    # What is left is WEINCE's tail fits: at most 2 reads per strip of 4 rows or columns
    # (their top-k widths), where 12 x 12 tiles made 2 reads each.
    assert reads - fewer_tiles <= 2 * 2 * (48 // 4)
