"""The steps of ``benchmarks/gpu_check.sh`` (issue 21): each appends rows to a JSON-lines
results file, and ``table`` prints them as one table.

    python benchmarks/gpu_check.py tests      --results R [--cpu]
    python benchmarks/gpu_check.py nccl       --results R --work DIR [--cpu]
    python benchmarks/gpu_check.py throughput --results R --work DIR [--cpu]
    python benchmarks/gpu_check.py losses     --results R [--cpu] [--budget SECONDS]
    python benchmarks/gpu_check.py table      --results R

``--cpu`` is the dry run: tiny sizes on the CPU, gloo instead of NCCL, a few steps. Nothing
is downloaded: the models are the packaged default (``default``, all-MiniLM-L6-v2) and its
static table (``static:default``); the training pairs are generated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "man", "woman", "dog", "cat", "child", "plays", "playing", "guitar",
         "piano", "ball", "runs", "street", "beach", "water", "horse", "car", "bike", "eats",
         "food", "kitchen", "sits", "table", "dances", "sings", "music", "red", "blue", "green",
         "black", "white", "small", "large", "two", "three", "young", "old", "cell", "protein",
         "gene", "study", "brain"]


# -- results --------------------------------------------------------------------------------
def record(results: Path, check: str, setting: str, result: str, status: str) -> None:
    """One row of the table: ``status`` is ok, FAIL or skipped."""
    row = {"check": check, "setting": setting, "result": result, "status": status}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[gpu_check] {check} | {setting} | {result} | {status}", flush=True)


def table(results: Path) -> str:
    rows = [json.loads(x) for x in results.read_text(encoding="utf-8").splitlines() if x]
    head = {"check": "check", "setting": "setting", "result": "result", "status": "status"}
    keys = list(head)
    width = {k: max(len(str(r[k])) for r in [head, *rows]) for k in keys}
    lines = [" | ".join(f"{r[k]!s:<{width[k]}}" for k in keys) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * width[k] for k in keys))
    return "\n".join(lines)


def _device(cpu: bool) -> str:
    import torch

    if cpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu for the dry run")
    return "cuda"


def _environment() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


# -- the CUDA tests -------------------------------------------------------------------------
def run_tests(results: Path, cpu: bool) -> None:
    """The suite's ``cuda`` tests (all skipped without CUDA: the dry run checks that they
    are collected and skip)."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-rs",
           "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=ROOT, env=_environment(), capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                      tail))
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], file=sys.stderr)
    ok = done.returncode == 0 and (counts.get("passed", 0) > 0 if not cpu
                                   else counts.get("skipped", 0) > 0)
    record(results, "pytest -m cuda", "tests/test_cuda.py", tail, "ok" if ok else "FAIL")


# -- training pairs -------------------------------------------------------------------------
def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated pairs with a graded score (the word overlap), as a TSV file."""
    rng = random.Random(seed)
    rows = ["sentence1\tsentence2\tscore"]
    for _ in range(n):
        a = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        keep = rng.randint(1, len(a))
        b = a[:keep] + [rng.choice(WORDS) for _ in range(len(a) - keep)]
        rng.shuffle(b)
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{5.0 * keep / len(a):.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _run_config(model: str, data: Path, train: dict[str, Any], every: int,
                loss: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": {"name": model},
        "data": {"train": str(data), "score_column": "score", "score_range": [0, 5],
                 "dev_holdout": 0.05},
        "loss": loss or {"name": "weince", "learnable_temperature": True},
        "optim": {"lr": 2e-5 if model == "default" else 1e-2},
        "train": train,
        "eval": {"dev": {"task": "pairs", "split": "holdout"}, "test": None,
                 "every_examples": every, "dtype": "float32", "geometry": False},
    }


# -- torchrun with NCCL: train, checkpoint, resume -------------------------------------------
def run_nccl(results: Path, work: Path, cpu: bool) -> None:
    """``torchrun --nproc-per-node 1 -m batchscale train`` (NCCL on a GPU, gloo with --cpu)
    for 50 steps (4 with --cpu) with checkpoints, then the same command with ``--resume``."""
    import yaml

    steps, batch = (4, 8) if cpu else (50, 64)
    model = "static:default" if cpu else "default"
    data = write_pairs(work / "nccl" / "pairs.tsv", 1200 if not cpu else 200)
    config = _run_config(model, data, {"batch_size": batch, "max_steps": steps, "seed": 0},
                         every=batch * steps // 2)
    path = work / "nccl" / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = work / "nccl" / "run"
    backend = "gloo" if cpu else "nccl"
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "batchscale",
            "train", str(path), "--out", str(out), "--no-progress", "--dist-timeout", "60"]
    for label, extra in (("train", []), ("--resume", ["--resume"])):
        t0 = time.perf_counter()
        done = subprocess.run(base + extra, cwd=ROOT, env=_environment(), capture_output=True,
                              text=True)
        seconds = time.perf_counter() - t0
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
        ok = done.returncode == 0 and bool(ckpts)
        if not ok:
            print(done.stdout[-3000:], done.stderr[-4000:], file=sys.stderr)
        summary = out / "summary.json"
        pps = json.loads(summary.read_text())["pairs_per_second"] if summary.is_file() else 0
        result = (f"{steps} steps x {batch}, {len(ckpts)} checkpoints, {pps:.0f} pairs/s, "
                  f"{seconds:.0f} s" if ok else f"exit {done.returncode}: "
                  f"{_last_error(done.stderr)}")
        record(results, f"torchrun {backend} {label}", f"{model}, 1 rank", result,
               "ok" if ok else "FAIL")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if "error" in x.lower()]
    return (lines[-1] if lines else stderr.strip()[-160:])[:160]


# -- training throughput: batchscale against sentence-transformers ----------------------------
def tiny_bert(path: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with a word-piece vocabulary of :data:`WORDS`, saved
    as a Hugging Face model directory: the dry run's stand-in for MiniLM."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *letters,
             *(f"##{c}" for c in letters)]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), model_max_length=64)
    tokenizer.save_pretrained(str(path))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path), safe_serialization=True)
    return path


def _warm_rate(ends: list[float], batch: int) -> float:
    """Pairs/s over the steps after the first (which pays for start-up: kernels, caches)."""
    if len(ends) < 2:
        raise RuntimeError(f"{len(ends)} step(s) timed; need 2 or more")
    return (len(ends) - 1) * batch / (ends[-1] - ends[0])


def _batchscale_rate(data: Path, out: Path, batch: int, steps: int, chunk: int | None,
                     device: str, model: str) -> float:
    """batchscale's trainer, InfoNCE (q->a) at tau 0.05, evaluating once at the end."""
    import torch

    from batchscale.study import train_run
    from batchscale.training import Trainer, config_from_dict

    train: dict[str, Any] = {"batch_size": batch, "max_steps": steps, "seed": 0,
                             "device": device}
    if chunk is not None:
        train["gradient_cache"] = {"chunk_size": chunk}
    raw = _run_config(model, data, train, every=10**9,
                      loss={"name": "infonce", "temperature": 0.05})
    raw["eval"]["at_start"] = False
    ends: list[float] = []
    step = Trainer._step

    def timed(self: Trainer, indices: list[int]) -> float:
        loss = step(self, indices)  # float(loss): the step's work is done on the device
        if device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return loss

    Trainer._step = timed  # type: ignore[method-assign]
    try:
        train_run(config_from_dict(raw), out, show_progress=False, evaluate_test=False)
    finally:
        Trainer._step = step  # type: ignore[method-assign]
    return _warm_rate(ends, batch)


def _st_rate(data: Path, out: Path, batch: int, steps: int, chunk: int | None, device: str,
             model: str) -> float:
    """sentence-transformers' Trainer with MultipleNegativesRankingLoss (scale 20, i.e.
    InfoNCE at tau 0.05), CachedMultipleNegativesRankingLoss with ``chunk``."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    from batchscale.encoders import SentenceEncoder

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    st = SentenceEncoder.load(model, device=device).st
    rows = [x.split("\t")[:2] for x in data.read_text().splitlines()[1:]]
    pairs = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})
    loss = (MultipleNegativesRankingLoss(st, scale=20.0) if chunk is None else
            CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=chunk))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=2e-5, report_to="none", save_strategy="no", logging_strategy="no",
        dataloader_drop_last=True, disable_tqdm=True, use_cpu=device == "cpu", seed=0)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=pairs, loss=loss,
                                         callbacks=[StepEnds()])
    trainer.train()
    return _warm_rate(ends, batch)


def run_throughput(results: Path, work: Path, cpu: bool) -> None:
    """MiniLM training pairs/s (the steps after the first), batchscale's trainer (InfoNCE)
    against sentence-transformers' Trainer ((Cached)MultipleNegativesRankingLoss) on the
    same device, both in float32: batch 64, and 512 with
    the gradient cache in chunks of 64 (--cpu: a tiny random BERT, 8, and 16 in chunks of
    8, 3 steps)."""
    device = _device(cpu)
    # The dry run checks the code path, on a tiny random BERT that a CPU trains in seconds.
    model, name = (str(tiny_bert(work / "tiny-bert")), "tiny BERT") if cpu else \
        ("default", "MiniLM")
    cases = [(8, None, 3), (16, 8, 3)] if cpu else [(64, None, 30), (512, 64, 8)]
    data = write_pairs(work / "throughput" / "pairs.tsv", 200 if cpu else 5000)
    for batch, chunk, steps in cases:
        setting = f"{name}, B={batch}" + (f", cache {chunk}" if chunk else "") + \
            f", {steps} steps, {device}"
        try:
            ours = _batchscale_rate(data, work / "throughput" / f"bs-{batch}", batch, steps,
                                    chunk, device, model)
            theirs = _st_rate(data, work / "throughput" / f"st-{batch}", batch, steps, chunk,
                              device, model)
        except Exception as e:  # a row says what failed; the other checks still run
            record(results, "train pairs/s", setting, f"{type(e).__name__}: {e}"[:160], "FAIL")
            continue
        record(results, "train pairs/s", setting,
               f"batchscale {ours:.0f}, sentence-transformers {theirs:.0f} "
               f"({ours / theirs:.2f}x)", "ok")


# -- dense against tiled losses ---------------------------------------------------------------
def _loss_cell(loss: str, b: int, d: int, tile: int | None, device: str, repeats: int
               ) -> tuple[float, float | None]:
    """Median fwd+bwd seconds and peak memory (GB above the inputs; None on the CPU)."""
    import torch

    import batchscale.losses as losses

    fn = getattr(losses, f"{loss}_loss")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, d, device=device, generator=g).requires_grad_()
    a = (q.detach() + torch.randn(b, d, device=device, generator=g)).requires_grad_()
    times = []
    for i in range(repeats + 1):
        q.grad = a.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn(q, a, 0.05, tile_size=tile).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i or repeats == 0:
            times.append(time.perf_counter() - t0)
        if repeats == 0:
            break
    peak = None
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return sorted(times)[len(times) // 2], peak


def _dense_fits(b: int, device: str) -> bool:
    """Whether the dense loss's matrices (about six B x B float32 buffers) fit."""
    import torch

    if device != "cuda":
        return b <= 4096
    free, _ = torch.cuda.mem_get_info()
    return 6 * 4 * b * b < 0.9 * free


def run_losses(results: Path, cpu: bool, budget: float) -> None:
    """Dense and tiled BSC and WEINCE, fwd+bwd time and peak memory, B = 8,192 to 262,144
    at d = 384 (--cpu: 256 at d = 32). Cells stop when ``budget`` seconds are
    spent; a dense cell whose matrices do not fit is not tried."""
    import torch

    from batchscale.losses.pair_loss import AUTO_DENSE_ENTRIES, AUTO_DENSE_OTHER
    from batchscale.losses.tiled import DEFAULT_TILE

    device = _device(cpu)
    sizes, d = ([256], 32) if cpu else ([8192, 16384, 32768, 65536, 131072, 262144], 384)
    tile = 128 if cpu else DEFAULT_TILE
    limit = AUTO_DENSE_ENTRIES.get(device, AUTO_DENSE_OTHER)
    start = time.perf_counter()
    for loss in ("bsc", "weince"):
        for b in sizes:
            setting = f"{loss}, B={b:,}, d={d}, tile {tile}, {device}"
            if time.perf_counter() - start > budget:
                record(results, "loss fwd+bwd", setting, f"over the {budget:.0f} s budget",
                       "skipped")
                continue
            repeats = 3 if b <= 32768 else (1 if b <= 65536 else 0)
            cells = []
            for mode, t in (("dense", None), ("tiled", tile)):
                if mode == "dense" and not _dense_fits(b, device):
                    cells.append(f"{mode} too big")
                    continue
                try:
                    seconds, peak = _loss_cell(loss, b, d, t, device, repeats)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    cells.append(f"{mode} out of memory")
                    continue
                mem = "" if peak is None else f" {peak:.2f} GB"
                cells.append(f"{mode} {seconds * 1e3:.0f} ms{mem}")
            auto = "dense" if b * b <= limit else "tiled"
            record(results, "loss fwd+bwd", setting, "; ".join(cells) + f" (auto: {auto})",
                   "ok")
            if device == "cuda":
                torch.cuda.empty_cache()


# -- entry ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("tests", "nccl", "throughput", "losses", "table"))
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    p.add_argument("--cpu", action="store_true", help="the dry run: tiny sizes on the CPU")
    p.add_argument("--budget", type=float, default=150.0, help="seconds for the loss cells")
    args = p.parse_args(argv)
    steps: dict[str, Callable[[], None]] = {
        "tests": lambda: run_tests(args.results, args.cpu),
        "nccl": lambda: run_nccl(args.results, args.work, args.cpu),
        "throughput": lambda: run_throughput(args.results, args.work, args.cpu),
        "losses": lambda: run_losses(args.results, args.cpu, args.budget),
        "table": lambda: print(table(args.results)),
    }
    steps[args.step]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
