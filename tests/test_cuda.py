"""Checks that need a CUDA GPU (marker ``cuda``, skipped without one;
``benchmarks/gpu_check.sh`` runs them): the dense and tiled losses agree on CUDA, the
collectives take CPU tensors through a real NCCL group, the gradient cache is exact on
CUDA, and the dense loss is finite under fp16 autocast."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from batchscale.batching import distributed
from batchscale.batching.chunking import split_inputs
from batchscale.batching.gradient_cache import cached_backward
from batchscale.losses import bsc_loss, infonce_loss, weince_loss
from conftest import random_token_batch, tiny_mean_pooled_bert
from ranks import free_port

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOSSES = {"bsc": bsc_loss, "infonce": infonce_loss, "weince": weince_loss}


def _pairs(m: int, d: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = q + 0.7 * torch.randn(m, d, generator=g, dtype=torch.float64)
    return q.to(device), a.to(device)


def _loss_and_grads(fn, q: torch.Tensor, a: torch.Tensor, tile: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, a = q.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    loss = fn(q, a, tile_size=tile)
    loss.backward()
    return loss.detach(), q.grad, a.grad


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_and_tiled_agree_on_cuda_with_the_cpu_float64_loss(name: str) -> None:
    """float32 on the GPU (TF32 off: torch's default for matmuls) against float64 on the
    CPU, the dense path and tiles of 128 over 512 pairs (several strips and tiles)."""
    q, a = _pairs(512, 64, 0, "cpu")
    ref = _loss_and_grads(LOSSES[name], q, a, None)
    for tile in (None, 128):
        got = _loss_and_grads(LOSSES[name], q.float().cuda(), a.float().cuda(), tile)
        for r, x in zip(ref, got, strict=True):
            assert x.is_cuda
            scale = max(1.0, float(r.abs().max()))
            assert float((x.double().cpu() - r).abs().max()) <= 2e-5 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bsc", "weince"])
def test_dense_loss_under_cuda_autocast_is_finite_and_float32(name: str, dtype) -> None:
    q, a = _pairs(256, 64, 1, "cuda")
    a = 0.02 * a + q  # cosines near 1, where half precision rounds to 1
    ref = _loss_and_grads(LOSSES[name], q.float(), a.float(), None)
    qq, aa = q.float().requires_grad_(), a.float().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        loss = LOSSES[name](qq, aa, tile_size=None)
    loss.backward()
    assert loss.dtype == torch.float32
    for r, x in zip(ref, (loss.detach(), qq.grad, aa.grad), strict=True):
        assert bool(torch.isfinite(x).all())
        assert float((x - r).abs().max()) <= 1e-2 * max(1.0, float(r.abs().max()))


@pytest.fixture()
def nccl_group() -> Iterator[None]:
    """A real NCCL process group of one rank, in this process."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_cpu_tensors_cross_a_real_nccl_group(nccl_group: None) -> None:
    """The collectives the checkpoint (CPU RNG bytes) and the diagnostics (CPU means) make:
    through NCCL and back on the CPU, with their values."""
    assert distributed._collective_device(None) == torch.device("cuda", 0)
    rng = torch.get_rng_state()
    rows = distributed._all_gather_rows(rng[None], None, "rng")
    assert len(rows) == 1 and rows[0].device.type == "cpu" and torch.equal(rows[0][0], rng)
    flags = torch.tensor([True, False])
    assert torch.equal(distributed._all_gather_rows(flags, None, "flags")[0], flags)
    total = distributed._all_reduce(torch.tensor([2.5]), "a mean", None)
    assert total.device.type == "cpu" and float(total) == 2.5
    plan = distributed._broadcast(torch.tensor([3, 1, 2]), "a plan", None)
    assert plan.device.type == "cpu" and plan.tolist() == [3, 1, 2]
    on_gpu = distributed._all_reduce(torch.ones(3, device="cuda"), "a gpu tensor", None)
    assert on_gpu.is_cuda and on_gpu.tolist() == [1.0, 1.0, 1.0]


def test_gradient_cache_is_exact_on_cuda() -> None:
    """cached_backward's gradients equal plain autograd over the same chunks (dropout masks
    replayed by the CUDA RNG)."""
    model = tiny_mean_pooled_bert(torch.float32, seq=16, dropout=0.1).cuda().train()
    batch = [{k: v.cuda() for k, v in random_token_batch(24, s, seq=16).items()}
             for s in (1, 2)]

    def loss_fn(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return weince_loss(q, a, 0.1)

    torch.manual_seed(5)
    embeddings = []
    for inputs in batch:
        chunks = split_inputs(inputs, chunk_size=8)
        emb = torch.cat([model(c.inputs) for c in chunks])
        embeddings.append(emb[torch.argsort(torch.cat([c.index for c in chunks]))])
    want_loss = loss_fn(*embeddings)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(5)
    got_loss = cached_backward(model, batch, loss_fn, chunk_size=8)
    assert float(got_loss) == pytest.approx(float(want_loss.detach()), rel=1e-5)
    worst = max(float((p.grad - want[n]).abs().max()) for n, p in model.named_parameters())
    assert worst <= 1e-5
