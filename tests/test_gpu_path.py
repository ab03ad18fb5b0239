"""The GPU path's defects, checked on a CPU (issue 21):

* every tensor handed to a torch.distributed collective lies on the group's collective
  device (NCCL: the current CUDA device), for a whole training step, its checkpoint (every
  rank's RNG state) and the loss diagnostics: an NCCL world of two identical ranks is faked
  in one process, its collective device is ``meta``, and the collectives record the devices
  of the tensors they get (their values live in a shadow on the CPU);
* ``--resume`` under torchrun when each rank's config names its own device, as the CLI
  writes ``train.device=cuda:LOCAL_RANK`` (here ``cpu:LOCAL_RANK`` on 2 gloo ranks);
* the dense batch-softmax losses under bfloat16 autocast: finite, and the float32 values.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from batchscale.batching import distributed
from batchscale.losses import bsc_loss, infonce_loss, weince_loss
from batchscale.study import train_run
from batchscale.training import config_from_dict
from batchscale.training.checkpoint import latest_checkpoint, read_state
from conftest import _WORDS
from ranks import free_port

META = torch.device("meta")
aten = torch.ops.aten


# -- a faked NCCL world ----------------------------------------------------------------------
class _Shadow(TorchDispatchMode):
    """Values for meta tensors: a copy onto ``meta`` keeps the source's values on the CPU,
    ``empty_like`` of a meta tensor gets zeros, and a copy back returns them. Only what
    :func:`distributed._collective` does on the collective device is covered: anything
    else on ``meta`` has no values (and fails when read). Meta tensors are known by id, and
    held so that their ids stay theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def of(self, t: torch.Tensor) -> torch.Tensor:
        return self.values[id(t)][1]

    def _keep(self, meta: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.values[id(meta)] = (meta, value)
        return meta

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and args[0].device == META:
            target = torch.device(kwargs.get("device") or META)
            if target != META:  # back from the collective device
                return self.of(args[0]).to(kwargs.get("dtype") or args[0].dtype).clone()
        out = func(*args, **kwargs)
        if func is aten._to_copy.default and out.device == META and args[0].device != META:
            return self._keep(out, args[0].detach().to(out.dtype).clone())
        if func is aten.empty_like.default and out.device == META:
            return self._keep(out, torch.zeros(out.shape, dtype=out.dtype))
        if func is aten.detach.default and id(args[0]) in self.values:  # (empty_like's)
            return self._keep(out, self.of(args[0]))
        return out


class _FakeNccl:
    """Two identical ranks (this process is rank 0, the other holds the same tensors):
    all_gather repeats, all_reduce doubles, broadcast keeps. Each call records the devices
    of the tensors it was handed."""

    def __init__(self, shadow: _Shadow) -> None:
        self.shadow = shadow
        self.calls: list[tuple[str, set[str]]] = []

    def _record(self, name: str, *tensors: torch.Tensor) -> None:
        self.calls.append((name, {str(t.device) for t in tensors}))
        wrong = [str(t.device) for t in tensors if t.device != META]
        assert not wrong, f"{name} was handed tensors on {wrong}, not the collective device"

    def all_gather(self, out: list[torch.Tensor], x: torch.Tensor, group=None, **_: Any) -> None:
        self._record("all_gather", x, *out)
        for o in out:
            self.shadow.of(o).copy_(self.shadow.of(x))

    def all_reduce(self, x: torch.Tensor, op=None, group=None, **_: Any) -> None:
        self._record("all_reduce", x)
        self.shadow.of(x).mul_(2)

    def broadcast(self, x: torch.Tensor, src: int = 0, group=None, **_: Any) -> None:
        self._record("broadcast", x)


# Collectives the code must not use (its one door is distributed._collective).
_OTHER_COLLECTIVES = ("barrier", "all_gather_object", "broadcast_object_list", "gather",
                      "scatter", "reduce", "reduce_scatter", "all_to_all", "send", "recv",
                      "all_gather_into_tensor", "reduce_scatter_tensor")


@pytest.fixture()
def fake_nccl(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeNccl]:
    shadow = _Shadow()
    world = _FakeNccl(shadow)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    for name in ("all_gather", "all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, getattr(world, name))
    for name in _OTHER_COLLECTIVES:
        monkeypatch.setattr(dist, name, _refuse(name))
    # The choice of device: NCCL's current CUDA device, here meta.
    monkeypatch.setattr(distributed, "_collective_device", lambda group=None: META)
    with shadow:
        yield world


def _refuse(name: str) -> Callable[..., None]:
    def call(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"dist.{name} called outside the collective door")

    return call


def _pairs_file(folder: Path) -> Path:
    rng = random.Random(0)
    rows = ["sentence1\tsentence2\tscore"]
    for _ in range(48):
        a = [rng.choice(_WORDS) for _ in range(rng.randint(4, 8))]
        keep = rng.randint(0, len(a))
        b = a[:keep] + [rng.choice(_WORDS) for _ in range(len(a) - keep)]
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{5.0 * keep / len(a):.3f}")
    path = folder / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _fake_world_config(data: Path) -> Any:
    """WEINCE (diagnostics, an all-gathered rho0), a learnable temperature, the gradient
    cache, BSC's k-means shuffling (rank 0's plan broadcast) and the local loss."""
    return config_from_dict({
        "model": {"name": "static:default"},
        "data": {"train": str(data), "score_column": "score", "score_range": [0, 5],
                 "dev_holdout": 0.25},
        "loss": {"name": "weince", "learnable_temperature": True},
        "optim": {"lr": 1e-2},
        "train": {"batch_size": 16, "max_steps": 2, "seed": 1, "sampler": "bsc_kmeans",
                  "hard_batches": {"n_clusters": 4}, "gradient_cache": {"chunk_size": 4}},
        "eval": {"dev": {"task": "pairs", "split": "holdout"}, "test": None,
                 "every_examples": 16, "dtype": "float32", "geometry": False},
    })


def test_every_collective_runs_on_the_collective_device(fake_nccl: _FakeNccl,
                                                        tmp_path: Path) -> None:
    config = _fake_world_config(_pairs_file(tmp_path))
    result = train_run(config, tmp_path / "run", show_progress=False)
    names = {name for name, _ in fake_nccl.calls}
    assert names == {"all_gather", "all_reduce", "broadcast"}
    assert {d for _, devices in fake_nccl.calls for d in devices} == {"meta"}
    # the steps, the checkpoint with both ranks' RNG states, the diagnostics all ran
    assert result.fit.examples == 32
    state = read_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert len(state["rng"]) == 2
    assert torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # identical ranks
    curve = [json.loads(x) for x in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert 0.0 <= curve[-1]["loss_diagnostics"]["weince_mean_lambda"] <= 1.0
    assert curve[-1]["loss_diagnostics"]["temperature"] > 0


def test_collectives_return_on_the_callers_device(fake_nccl: _FakeNccl) -> None:
    """What crossed to the collective device comes back, with the values of the world of
    two identical ranks."""
    x = torch.arange(6.0).reshape(3, 2)
    gathered = distributed.gather_rows(x)
    assert gathered.device == x.device and torch.equal(gathered, torch.cat([x, x]))
    flags = torch.tensor([True, False])
    assert torch.equal(distributed.gather_rows(flags), torch.tensor([True, False] * 2))
    mean = distributed.mean_across_ranks(torch.tensor(3.0))
    assert mean.device == x.device and float(mean) == 3.0
    assert distributed.agree(True, "a test") and not distributed.agree(False, "a test")
    plan = distributed.broadcast_tensor(torch.tensor([4, 5, 6]))
    assert plan.device.type == "cpu" and plan.tolist() == [4, 5, 6]
    leaf = x.clone().requires_grad_()
    distributed.gather_with_grad(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(x, 2.0))  # both ranks' rows of x: 1 + 1
    assert {d for _, devices in fake_nccl.calls for d in devices} == {"meta"}


# -- resume with per-rank devices -----------------------------------------------------------
_RESUME_SCRIPT = """\
import os
import sys
from batchscale import cli
# What the CLI adds per rank under NCCL (train.device=cuda:LOCAL_RANK), on CPU devices.
device = f"train.device=cpu:{os.environ['LOCAL_RANK']}"
sys.exit(cli.main([*sys.argv[1:], "--set", device]))
"""


def _torchrun(script: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
def test_resume_with_a_device_per_rank(tmp_path: Path) -> None:
    script = tmp_path / "train_per_rank_device.py"
    script.write_text(_RESUME_SCRIPT, encoding="utf-8")
    config = tmp_path / "config.yaml"
    data = _pairs_file(tmp_path)
    config.write_text(
        "model: {name: 'static:default'}\n"
        f"data: {{train: '{data}', score_column: score, score_range: [0, 5], "
        "dev_holdout: 0.25}\n"
        "train: {batch_size: 8, max_steps: 2, seed: 2}\n"
        "eval: {dev: {task: pairs, split: holdout}, test: null, every_examples: 8, "
        "dtype: float32, geometry: false}\n", encoding="utf-8")
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress",
            "--dist-timeout", "30"]
    first = _torchrun(script, args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "device: cpu:0" in (tmp_path / "run" / "config.yaml").read_text()
    curve = (tmp_path / "run" / "curve.jsonl").read_text()
    resumed = _torchrun(script, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "run" / "curve.jsonl").read_text() == curve  # a finished run
    # another config is still refused, by every rank, at once (no rank left waiting)
    refused = _torchrun(script, [*args, "--resume", "--set", "optim.lr=0.5"])
    assert refused.returncode != 0
    assert refused.stderr.count("started with another config") == 2, refused.stderr[-3000:]


# -- the dense loss under autocast ----------------------------------------------------------
def _near_pairs(m: int, d: int, top: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs whose cosines run from 0.5 up to ``top`` (a few at ``top`` exactly, to rounding)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(m, d, generator=g), dim=1)
    noise = torch.randn(m, d, generator=g)
    noise = F.normalize(noise - (noise * q).sum(1, keepdim=True) * q, dim=1)
    cos = torch.linspace(0.5, top, m)
    a = cos[:, None] * q + (1 - cos**2).sqrt()[:, None] * noise
    return q, a


LOSSES = {"bsc": bsc_loss, "infonce": infonce_loss, "weince": weince_loss}


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_loss_under_bfloat16_autocast_is_the_float32_loss(name: str) -> None:
    q, a = _near_pairs(64, 32, 0.9999)
    assert float(F.cosine_similarity(q, a).max()) == pytest.approx(0.9999, abs=1e-6)
    loss_fn = LOSSES[name]

    def run(autocast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qq, aa = q.clone().requires_grad_(), a.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(qq, aa, tile_size=None)
        loss.backward()
        return loss.detach(), qq.grad, aa.grad

    ref, mixed = run(False), run(True)
    for r, x in zip(ref, mixed, strict=True):
        assert bool(torch.isfinite(x).all())
        assert x.dtype == torch.float32
        assert (x - r).abs().max() <= 1e-2 * max(1.0, float(r.abs().max()))


@pytest.mark.parametrize("name", ["bsc", "weince"])
def test_half_precision_embeddings_get_the_float32_loss_and_their_gradients(name: str) -> None:
    """Embeddings that are bf16 themselves (a model run in bf16): the loss of their values
    in float32, on the dense and the tiled path alike, and gradients in bf16."""
    q, a = _near_pairs(48, 16, 0.9999, seed=1)
    q16, a16 = q.bfloat16().requires_grad_(), a.bfloat16().requires_grad_()
    ref = LOSSES[name](q16.detach().float(), a16.detach().float(), tile_size=None)
    for tile in (None, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = LOSSES[name](q16, a16, tile_size=tile)
        assert loss.dtype == torch.float32
        assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)
        q16.grad = a16.grad = None
        loss.backward()
        assert q16.grad.dtype == torch.bfloat16 and bool(torch.isfinite(q16.grad).all())
        assert bool(torch.isfinite(a16.grad).all()) and float(q16.grad.abs().sum()) > 0
