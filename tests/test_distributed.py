"""Negatives across torch.distributed ranks: 2 gloo processes against 1 process on the whole
batch, alone and with the gradient cache (also under DDP, also with the tiled loss); a dead or
hung rank fails fast.

The workers are this file run as a script: under ``torchrun`` for the equivalence (as in
training), as two plain processes with torchrun's environment for the failures (torchrun's
agent would kill the survivor itself and hide its error). Loopback only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from batchscale.batching.distributed import (
    CollectiveError,
    average_gradients,
    end_rank_process,
    gather_with_grad,
    init_distributed,
    shutdown_distributed,
)
from batchscale.batching.distributed_loss import gathered_pair_loss, local_pair_loss
from batchscale.batching.gradient_cache import cached_backward
from batchscale.losses import LearnableTemperature, bsc_loss, infonce_loss, weince_loss
from conftest import random_token_batch, tiny_mean_pooled_bert
from ranks import free_port, run_ranks

pytestmark = pytest.mark.distributed

SEQ, B = 12, 8
# Gradient differences allowed, relative to each tensor's largest gradient (at least 1). float64
# is held to the 1e-6 (measured: 2e-15); float32 to 1e-5, the rounding of float32 sums
# over ~100 tokens in another order (measured: 6.6e-7 on a gradient of size 0.94).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}
HERE = Path(__file__).resolve()


def make_model(dtype: torch.dtype) -> nn.Module:
    """A tiny random BERT, mean-pooled; no dropout, so 1 and 2 processes can agree."""
    return tiny_mean_pooled_bert(dtype, seq=SEQ, dropout=0.0).train()


def token_batch(n: int, seed: int) -> dict[str, Tensor]:
    return random_token_batch(n, seed, seq=SEQ)


def global_batch() -> dict[str, object]:
    """B pairs, one hard negative each, a negative pair (label 0) and a duplicate answer."""
    return {
        "q": token_batch(B, 1),
        "a": token_batch(B, 2),
        "n": token_batch(B, 3),
        "labels": torch.tensor([1, 1, 0, 1, 1, 1, 1, 1]),
        "query_ids": torch.arange(B),
        "answer_ids": torch.cat(
            [torch.tensor([0, 1, 2, 3, 4, 5, 6, 3]), torch.arange(100, 100 + B)]
        ),
    }


def shard(batch: dict[str, object], rows: slice) -> dict[str, object]:
    """One rank's rows; its answer ids are its answers' then its hard negatives'."""

    def take(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v[rows] for k, v in inputs.items()}

    ids = batch["answer_ids"]
    return {
        "q": take(batch["q"]),
        "a": take(batch["a"]),
        "n": take(batch["n"]),
        "labels": batch["labels"][rows],
        "query_ids": batch["query_ids"][rows],
        "answer_ids": torch.cat([ids[:B][rows], ids[B:][rows]]),
    }


# Each scenario: dtype, the rows of rank 0 (rank 1 takes the rest), how it is computed.
SCENARIOS = {
    "bsc_plain_f64": (torch.float64, 4, "plain"),
    "bsc_plain_f32": (torch.float32, 4, "plain"),
    "bsc_plain_uneven": (torch.float64, 5, "plain"),
    "weince_cached": (torch.float64, 4, "cached"),
    "weince_cached_tiled": (torch.float64, 4, "cached_tiled"),
    "infonce_cached_ddp_tokens": (torch.float32, 4, "ddp"),
    # OpenCLIP's local loss: each rank scores its own anchors; the mean over ranks is
    # compared with the single process's loss.
    "bsc_local_uneven": (torch.float64, 5, "local"),
    "weince_local_cached_tiled": (torch.float64, 4, "local_weince"),
}


def local_rows(loss_fn, temperature: Tensor, labels: Tensor, **options):
    """The rows-direction loss that local_pair_loss calls, with this rank's labels bound."""

    def rows(anchors, positives, *, hard_negatives, answer_ids, anchor_pool):
        extra = {"anchor_pool": anchor_pool} if loss_fn is weince_loss else {}
        return loss_fn(
            anchors,
            positives,
            temperature,
            directions="q->a",
            hard_negatives=hard_negatives,
            labels=labels,
            answer_ids=answer_ids,
            **extra,
            **options,
        )

    return rows


def run_scenario(kind: str, model: nn.Module, temperature: nn.Module, part: dict) -> Tensor:
    """The loss of one step; the gradients are left in ``.grad`` (not yet averaged)."""
    if kind == "plain":
        embed = [model(part[s]) for s in "qan"]
        loss = gathered_pair_loss(
            bsc_loss,
            embed[0],
            embed[1],
            hard_negatives=embed[2],
            labels=part["labels"],
            query_ids=part["query_ids"],
            answer_ids=part["answer_ids"],
            temperature=temperature(),
        )
        loss.backward()
        return loss.detach()
    if kind in ("cached", "cached_tiled"):
        # Tiles of 3 rows: the memory-linear path, against the dense single-process loss.
        tile_size = 3 if kind == "cached_tiled" else None
        return cached_backward(
            model,
            [part["q"], part["a"], part["n"]],
            lambda q, a, n: gathered_pair_loss(
                weince_loss,
                q,
                a,
                hard_negatives=n,
                temperature=temperature(),
                tile_size=tile_size,
            ),
            chunk_size=3,
        )
    if kind == "local":
        q, a, n = (model(part[s]) for s in "qan")
        loss = local_pair_loss(
            local_rows(bsc_loss, temperature(), part["labels"], tile_size=None),
            q,
            a,
            hard_negatives=n,
            query_ids=part["query_ids"],
            answer_ids=part["answer_ids"],
        )
        loss.backward()
        return loss.detach()
    if kind == "local_weince":
        # WEINCE's rho0 is a quantile over all anchors: it must see the other ranks' rho.
        return cached_backward(
            model,
            [part["q"], part["a"], part["n"]],
            lambda q, a, n: local_pair_loss(
                local_rows(weince_loss, temperature(), part["labels"], tile_size=3),
                q,
                a,
                hard_negatives=n,
                query_ids=part["query_ids"],
                answer_ids=part["answer_ids"],
            ),
            chunk_size=3,
        )
    assert kind == "ddp"
    return cached_backward(
        model,
        [part["q"], part["a"]],
        lambda q, a: gathered_pair_loss(infonce_loss, q, a, temperature=temperature()),
        max_tokens=20,
        no_sync=model.no_sync,
    )


def single_process(kind: str, model: nn.Module, temperature: nn.Module, batch: dict) -> Tensor:
    """The reference: one process, the whole batch, one plain forward and backward, the dense
    (B x B) loss."""
    q, a, n = (model(batch[s]) for s in "qan")
    masked = {
        "hard_negatives": n,
        "labels": batch["labels"],
        "query_ids": batch["query_ids"],
        "answer_ids": batch["answer_ids"],
        "tile_size": None,
    }
    if kind in ("plain", "local"):
        loss = bsc_loss(q, a, temperature(), **masked)
    elif kind in ("cached", "cached_tiled"):
        loss = weince_loss(q, a, temperature(), hard_negatives=n, tile_size=None)
    elif kind == "local_weince":
        loss = weince_loss(q, a, temperature(), **masked)
    else:
        loss = infonce_loss(q, a, temperature(), tile_size=None)
    loss.backward()
    return loss.detach()


def named_grads(*modules: nn.Module) -> dict[str, Tensor]:
    out = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            out[f"{i}.{name}"] = p.grad.detach().clone()
            p.grad = None
    return out


def worker_equivalence(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    info = init_distributed(backend="gloo", timeout_s=60)
    results = {}
    for name, (dtype, split, kind) in SCENARIOS.items():
        model = make_model(dtype)
        temperature = LearnableTemperature(0.1).to(dtype)
        rows = slice(0, split) if info.rank == 0 else slice(split, B)
        part = shard(global_batch(), rows)
        encoder = DistributedDataParallel(model) if kind == "ddp" else model
        loss = run_scenario(kind, encoder, temperature, part)
        if kind.startswith("local"):  # each rank holds its share of the loss: report the mean
            torch.distributed.all_reduce(loss)
            loss /= info.world_size
        # DDP averaged the encoder's gradients already; the temperature is outside DDP.
        average_gradients(
            temperature.parameters()
            if kind == "ddp"
            else [*model.parameters(), *temperature.parameters()]
        )
        results[name] = {"loss": loss, "grads": named_grads(model, temperature)}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    shutdown_distributed()
    end_rank_process(0)  # DDP ran: no interpreter teardown (see end_rank_process)


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task").iterdir()
    return [name for t in tasks if "gloo" in (name := (t / "comm").read_text().strip())]


def worker_teardown(out_dir: str, kind: str) -> None:
    """What end_rank_process works around: after DDP, the gloo group's threads outlive
    ``destroy_process_group``; without DDP they end with it."""
    from torch.nn.parallel import DistributedDataParallel

    info = init_distributed(backend="gloo", timeout_s=60)
    gather_with_grad(torch.ones(2, 3))
    if kind == "ddp":
        model = DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        del model
    shutdown_distributed()
    torch.save(_gloo_threads(), Path(out_dir) / f"rank{info.rank}.pt")
    end_rank_process(0)




def child_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    return run_ranks(HERE, ["equivalence", str(out)], out)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(two_rank_results: list[dict], name: str) -> None:
    dtype, _, kind = SCENARIOS[name]
    model, temperature = make_model(dtype), LearnableTemperature(0.1).to(dtype)
    want_loss = single_process(kind, model, temperature, global_batch())
    want = named_grads(model, temperature)
    for rank, results in enumerate(two_rank_results):
        got = results[name]
        assert float(got["loss"]) == pytest.approx(float(want_loss), abs=TOLERANCE[dtype]), rank
        assert got["grads"].keys() == want.keys()
        worst = max(
            float((got["grads"][k] - want[k]).abs().max()) / max(1.0, float(want[k].abs().max()))
            for k in want
        )
        assert worst <= TOLERANCE[dtype], f"rank {rank}: max |grad difference| {worst:.3g}"
    # Not vacuous: the gradients are far from zero.
    assert max(float(g.abs().max()) for g in want.values()) > 1e-2


def worker_failure(mode: str, timeout_s: float) -> None:
    info = init_distributed(backend="gloo", timeout_s=timeout_s)
    torch.distributed.barrier()  # both ranks are past start-up
    if info.rank == 1:
        if mode == "dead":
            os._exit(3)  # no clean shutdown: a crash, a kill, an OOM
        time.sleep(120)  # hung: alive but never reaches the collective
        return
    time.sleep(1.0)
    start = time.monotonic()
    try:
        gather_with_grad(torch.ones(2, 3))
    except CollectiveError as err:
        print(f"ELAPSED {time.monotonic() - start:.2f}")
        print(f"MESSAGE {err}", flush=True)
        shutdown_distributed()
        sys.exit(0)
    print("NO ERROR")
    sys.exit(1)


@pytest.mark.parametrize("mode, timeout_s", [("dead", 60.0), ("hung", 5.0)])
def test_lost_rank_fails_fast_with_a_clear_message(mode: str, timeout_s: float) -> None:
    """A dead peer (connection closed) fails at once even under a long timeout; a hung one
    (process alive, socket open) within the process group's timeout."""
    port = free_port()
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), "failure", mode, str(timeout_s)],
            env=child_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 0, out + err[-3000:]
    assert elapsed < 30, f"rank 0 took {elapsed:.1f} s to give up"
    message = out.split("MESSAGE ", 1)[1]
    assert "gather_with_grad" in message
    assert "rank 0 of 2" in message
    assert "another rank probably died" in message
    assert f"timeout {timeout_s:g} s" in message
    if mode == "hung":
        collective_s = float(out.split("ELAPSED ", 1)[1].split()[0])
        assert timeout_s - 0.5 <= collective_s < timeout_s + 10


if __name__ == "__main__":
    if sys.argv[1] == "equivalence":
        worker_equivalence(sys.argv[2])
    elif sys.argv[1] == "teardown":
        worker_teardown(sys.argv[2], sys.argv[3])
    else:
        worker_failure(sys.argv[2], float(sys.argv[3]))


def test_one_process_is_the_plain_loss_and_bad_arguments_are_named() -> None:
    g = torch.Generator().manual_seed(0)
    q, a = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert gather_with_grad(q) is q
    want = bsc_loss(q, a, 0.1, labels=torch.tensor([1, 0, 1, 1, 1, 1]))
    got = gathered_pair_loss(
        bsc_loss, q, a, labels=torch.tensor([1, 0, 1, 1, 1, 1]), temperature=0.1
    )
    assert float(got) == float(want)
    with pytest.raises(ValueError, match="`timeout_s` must be a finite number > 0, got 0"):
        init_distributed(timeout_s=0)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        init_distributed(backend="mpi")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux thread names")
def test_a_rank_that_ran_ddp_ends_its_process_flushed_past_the_group_ddp_keeps(tmp_path):
    """torch 2.13's DDP keeps the gloo group alive after destroy_process_group (its threads
    run on: the reason for end_rank_process), a group without DDP ends with it; ranks ending
    through end_rank_process exit 0 (run_ranks checks). If torch stops leaking the group, the
    last assertion fails and end_rank_process may go. One group per launch: joining a second
    group after the first was destroyed hung now and then."""
    threads = {}
    for kind in ("plain", "ddp"):
        out = tmp_path / kind
        out.mkdir()
        threads[kind] = run_ranks(HERE, ["teardown", str(out), kind], out)
    assert threads["plain"] == [[], []]
    assert all("pt_gloo_runloop" in t for t in threads["ddp"])


def test_end_rank_process_flushes_and_exits_with_its_code(tmp_path):
    script = ("import sys\nfrom batchscale.batching import end_rank_process\n"
              "print('to stdout', end='')\nprint('to stderr', end='', file=sys.stderr)\n"
              "end_rank_process(5)\nprint('never')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (5, "to stdout", "to stderr")
