r"""How embeddings and gradients cross torch.distributed ranks: the process group, the
all-gather with gradient, gradient averaging, and errors that say which collective failed.

Gradient convention (the one of DistributedDataParallel and of OpenCLIP's ``ClipLoss`` with
``local_loss=True, gather_with_grad=True``, open_clip/loss.py, Ilharco et al. 2021):
:func:`gather_with_grad` is the exact adjoint of an all-gather, so its backward SUMS over the
ranks each rank's gradient with respect to this rank's rows (a reduce-scatter). Each rank then
holds part of the gradient, and the gradients are AVERAGED across ranks (DDP,
:func:`data_parallel`; or :func:`average_gradients`). Two designs are exact under this
convention:

* global loss (what :func:`~batchscale.batching.distributed_loss.gathered_pair_loss` does):
  every rank computes the same full-batch loss L on the gathered embeddings; the backward
  hands each rank W * dL/d(its rows), and the average over the W ranks is dL/dtheta;
* local loss (OpenCLIP): rank r computes the loss of its own anchors against all candidates,
  L_r = (1/m_r) sum_{i in r} l_i with m_r = B / W; the average of the ranks' gradients is the
  gradient of (1/W) sum_r L_r = (1/B) sum_i l_i.

A collective whose peer died or hangs raises :class:`CollectiveError` within the process
group's timeout instead of hanging (gloo raises at once when a peer's connection closes).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

T = TypeVar("T")
BACKENDS: tuple[str, ...] = ("gloo", "nccl")
_MAX_DIMS = 8
_timeout_s: float | None = None  # set by init_distributed, quoted in error messages


class CollectiveError(RuntimeError):
    """A collective failed, most likely because another rank died or stopped responding."""


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when not distributed
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """A process group is up and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable `{name}` is not set (start with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable `{name}` must be an integer, got {value!r}"
        ) from None


def init_distributed(*, backend: str | None = None, timeout_s: float = 600.0) -> DistributedInfo:
    """Join the process group described by the launcher's environment (``torchrun`` sets
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process without them.

    ``backend`` defaults to NCCL with CUDA and gloo without. ``timeout_s`` bounds every
    collective: a rank whose peer died fails after at most that long with a
    :class:`CollectiveError` (NCCL's watchdog aborts the process after it).
    """
    global _timeout_s
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"`timeout_s` must be a finite number > 0, got {timeout_s!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)} or None, got {backend!r}")
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistributedInfo(0, 1, 0, None, device)
    world, rk = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = _env_int("LOCAL_RANK", rk)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend, rank=rk, world_size=world, timeout=timedelta(seconds=timeout_s)
            )
        except RuntimeError as err:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise CollectiveError(
                f"rank {rk}: joining the {backend} process group of {world} ranks at {where} "
                f"failed within {timeout_s:g} s; a rank did not start or died during start-up, "
                f"or the address is wrong. Cause: {err}"
            ) from err
        _timeout_s = float(timeout_s)
    return DistributedInfo(rank(), world_size(), local, dist.get_backend(), device)


def shutdown_distributed() -> None:
    """Leave the process group, also after a :class:`CollectiveError` (gloo aborts a process
    that exits with a broken group still up)."""
    global _timeout_s
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _timeout_s = None


def end_rank_process(code: int) -> NoReturn:
    """End a torchrun rank's process with ``code``, its output flushed, skipping the
    interpreter's teardown: call it last, after :func:`shutdown_distributed`.

    Why: DistributedDataParallel keeps a reference to the gloo process group that
    ``destroy_process_group`` does not release (torch 2.13: its worker threads outlive it), and
    destroying that group in the interpreter's teardown aborts the process now and then
    ("terminate called without an active exception"; 5 of 40 two-rank runs of a four-line DDP
    script here, 0 of 40 with this exit)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(what: str, collective: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """Run a collective; a failure names it, the rank and the likely cause."""
    try:
        return collective()
    except RuntimeError as err:  # DistBackendError, DistNetworkError and gloo's errors
        timeout = "" if _timeout_s is None else f", timeout {_timeout_s:g} s"
        raise CollectiveError(
            f"{what} failed on rank {rank(group)} of {world_size(group)} "
            f"(backend {dist.get_backend(group)}{timeout}): another rank probably died "
            f"(exception, out of memory, killed) or stopped before this collective; look for "
            f"the first error in the other ranks' logs. Cause: {err}"
        ) from err


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensors must live: NCCL moves CUDA tensors only (the current
    device, which :func:`init_distributed` set to the rank's), gloo CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


R = TypeVar("R", Tensor, list[Tensor])


def _collective(what: str, x: Tensor, op: Callable[[Tensor], R],
                group: dist.ProcessGroup | None) -> R:
    """The one door to torch.distributed: ``op`` runs on ``x`` moved to the group's collective
    device (:func:`_collective_device`), a failure is named (:func:`_run`), and what ``op``
    returns (a tensor or a list of them) comes back on ``x``'s device.

    Every collective of this module goes through here, so a CPU tensor (an RNG state, a
    diagnostic) never reaches NCCL and a CUDA tensor never reaches gloo. ``x`` already on the
    collective device is handed over as it is: an in-place ``op`` then changes it."""
    device = _collective_device(group)
    result = _run(what, lambda: op(x.to(device)), group)
    if isinstance(result, Tensor):
        return result.to(x.device)
    return [r.to(x.device) for r in result]


def _all_reduce(x: Tensor, what: str, group: dist.ProcessGroup | None) -> Tensor:
    """The sum of every rank's ``x`` (``x`` itself may be overwritten: pass a copy)."""

    def op(t: Tensor) -> Tensor:
        dist.all_reduce(t, group=group)
        return t

    return _collective(what, x, op, group)


def _all_gather(x: Tensor, what: str, group: dist.ProcessGroup | None) -> list[Tensor]:
    """Every rank's ``x`` (the same shape on every rank), in rank order."""

    def op(t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return out

    return _collective(what, x, op, group)


def _broadcast(x: Tensor, what: str, group: dist.ProcessGroup | None) -> Tensor:
    """Rank 0's ``x`` (``x`` of the same shape and dtype on the other ranks; it may be
    overwritten)."""

    def op(t: Tensor) -> Tensor:
        dist.broadcast(t, src=0, group=group)
        return t

    return _collective(what, x, op, group)


def _all_gather_rows(x: Tensor, group: dist.ProcessGroup | None, what: str) -> list[Tensor]:
    """Every rank's ``x``, in rank order; the row counts may differ between ranks."""
    if x.ndim == 0 or x.ndim > _MAX_DIMS:
        raise ValueError(f"{what}: needs a tensor with 1 to {_MAX_DIMS} dims, got {tuple(x.shape)}")
    # Shapes first, so that rows can be padded to the longest and a mismatch fails on every
    # rank alike (a ValueError on one rank only would leave the others waiting).
    shape = torch.full((_MAX_DIMS,), -1, dtype=torch.int64)
    shape[: x.ndim] = torch.tensor(x.shape, dtype=torch.int64)
    shapes = _all_gather(shape, f"{what} (all_gather of shapes)", group)
    dims = [[int(v) for v in s.tolist() if v >= 0] for s in shapes]
    if any(d[1:] != list(x.shape[1:]) for d in dims):
        raise ValueError(f"{what}: the ranks' tensors differ beyond the first dimension: {dims}")
    rows = [d[0] for d in dims]
    send = x.contiguous()
    if send.dtype == torch.bool:  # not every backend reduces or gathers bool
        send = send.to(torch.uint8)
    longest = max(rows)
    if send.shape[0] < longest:
        send = torch.cat([send, send.new_zeros((longest - send.shape[0], *send.shape[1:]))])
    out = _all_gather(send, f"{what} (all_gather)", group)
    return [o[:n].to(x.dtype) for o, n in zip(out, rows, strict=True)]


class _GatherWithGrad(Function):
    """All-gather along dim 0; backward: the sum over ranks of the gradient of this rank's
    rows (an all-reduce then this rank's slice, as gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        parts = _all_gather_rows(x, group, "gather_with_grad")
        ctx.group = group
        ctx.rows = [p.shape[0] for p in parts]
        ctx.rank = dist.get_rank(group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = _all_reduce(grad.contiguous().clone(), "gather_with_grad backward (all_reduce)",
                            ctx.group)
        start = sum(ctx.rows[: ctx.rank])
        return total[start : start + ctx.rows[ctx.rank]], None


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``x`` (rank order) with gradients flowing back to the rank
    that owns each row; ``x`` itself when not distributed. See the module docstring for how
    the gradients add up."""
    if not is_distributed(group):
        return x
    return _GatherWithGrad.apply(x, group)


def gather_rows(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``x`` (rank order), without gradient: labels, ids."""
    if not is_distributed(group):
        return x
    return torch.cat(_all_gather_rows(x.detach(), group, "gather_rows"))


def average_gradients(
    parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None
) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks (what DDP does).

    A parameter counts if it has a gradient on any rank (others contribute zeros), so the
    ranks always reduce the same tensors. One flat all-reduce per dtype and device.
    """
    params = [p for p in parameters if p.requires_grad]
    if not is_distributed(group) or not params:
        return
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError("average_gradients: sparse gradients are not supported")
    device = params[0].device
    has_grad = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.float32, device=device
    )
    has_grad = _all_reduce(has_grad, "average_gradients (all_reduce of flags)", group)
    used = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in used:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    world = dist.get_world_size(group)
    for (dtype, dev), bucket in buckets.items():
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        flat = _all_reduce(flat, f"average_gradients (all_reduce of {flat.numel()} {dtype} "
                                 f"on {dev})", group)
        flat /= world
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def data_parallel(module: torch.nn.Module, *, find_unused_parameters: bool,
                  group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """``module`` under torch's DistributedDataParallel when distributed, else ``module``.

    DDP averages the gradients bucket by bucket while the backward still runs (rank 0's
    weights are copied to every rank at construction). It needs the trainable parameters on
    the group's collective device (gloo: CPU, NCCL: the rank's GPU); a module held elsewhere
    (a static encoder kept on the CPU under NCCL) is returned as it is, and its gradients go
    through :func:`average_gradients`. Buffers are not re-broadcast before each forward:
    the encoders' buffers are constants, and a rank's number of forwards per step may differ
    (the gradient cache's chunks), which a per-forward collective would not survive.
    ``find_unused_parameters``: a module with parameters that get no gradient (a
    transformer's pooler, which sentence-transformers' pooling does not read).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not is_distributed(group):
        return module
    device = _collective_device(group)
    trained = [p for p in module.parameters() if p.requires_grad]
    if not trained or any(p.device != device or p.is_sparse for p in trained):
        return module
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group, find_unused_parameters=find_unused_parameters,
        forward_sync_buffers=False)


def broadcast_parameters(
    parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None
) -> None:
    """Copy rank 0's parameter values to every rank (what DDP does at construction), so the
    ranks start from the same weights even if their initialisation drew different numbers."""
    if not is_distributed(group):
        return
    for i, p in enumerate(parameters):
        value = _broadcast(p.data, f"broadcast_parameters (parameter {i}, shape "
                                   f"{tuple(p.shape)})", group)
        if value is not p.data:  # it went through another device
            p.data.copy_(value)


def _sum_flag(value: float, what: str, group: dist.ProcessGroup | None) -> float:
    """The sum over the ranks of one number: the bookkeeping collective of barrier and agree."""
    return float(_all_reduce(torch.tensor([value]), what, group).item())


def barrier(what: str, group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank; ``what`` names the meeting point in the error if a rank is gone.

    A barrier is an all-reduce of one number here: gloo's ``dist.barrier`` takes no timeout
    of its own, the all-reduce fails within the process group's timeout."""
    if is_distributed(group):
        _sum_flag(1.0, f"barrier at {what}", group)


def agree(ok: bool, what: str, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``ok`` holds on every rank: ranks that checked something
    locally (a file, a size) decide together, so that none waits for a rank that gave up."""
    if not is_distributed(group):
        return ok
    return _sum_flag(0.0 if ok else 1.0, f"agree on {what}", group) == 0.0


def mean_across_ranks(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The mean over the ranks of a detached tensor (``x`` itself on one process): a value
    that each rank holds a part of, such as the local loss."""
    if not is_distributed(group):
        return x
    total = _all_reduce(x.detach().clone(), "mean_across_ranks (all_reduce)", group)
    return total / world_size(group)


def broadcast_tensor(x: Tensor | None, group: dist.ProcessGroup | None = None, *,
                     device: torch.device | str = "cpu") -> Tensor:
    """Rank 0's tensor on every rank, on ``device`` (``x`` is ignored elsewhere and may be
    None): a plan that rank 0 computed alone. Its shape and dtype (int64 or float32) travel
    first."""
    if not is_distributed(group):
        if x is None:
            raise ValueError("broadcast_tensor: rank 0 must give a tensor")
        return x.to(device)
    head = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64)
    if rank(group) == 0:
        if x is None or x.dtype not in (torch.int64, torch.float32) or x.ndim > _MAX_DIMS:
            raise ValueError("broadcast_tensor: rank 0 must give an int64 or float32 tensor "
                             f"of at most {_MAX_DIMS} dims")
        head[0] = 0 if x.dtype == torch.int64 else 1
        head[1 : x.ndim + 1] = torch.tensor(x.shape, dtype=torch.int64)
    head = _broadcast(head, "broadcast_tensor (shape)", group)
    shape = [int(v) for v in head[1:].tolist() if v >= 0]
    dtype = torch.int64 if int(head[0]) == 0 else torch.float32
    value = x.to(device).contiguous() if rank(group) == 0 and x is not None else \
        torch.empty(shape, dtype=dtype, device=device)
    return _broadcast(value, "broadcast_tensor", group)
