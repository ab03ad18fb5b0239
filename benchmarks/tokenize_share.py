"""How much of a transformer's training step the tokenizer takes: is caching token ids per
text (as the static encoder does) worth it for a transformer?

For each batch size, on Flickr8k caption pairs: the time of ``encoder.training_features`` for
both sides of a batch (the fast tokenizer, padding, tensors) against the time of a whole
training step on the same batch (that tokenisation, forward of both sides, InfoNCE,
backward, AdamW). Medians over steps after warmup, one process, ``--threads`` threads.

    python benchmarks/tokenize_share.py [--model default] [--batch-sizes 16 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from batchscale.data import load_pairs
from batchscale.encoders import SentenceEncoder
from batchscale.losses import infonce_loss

PAIRS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pairs" / \
    "flickr8k-captions.jsonl"


def _pairs(n: int) -> tuple[list[str], list[str]]:
    pairs = load_pairs(PAIRS)[:n]
    return [p.text1 for p in pairs], [p.text2 for p in pairs]


def _median_ms(fn, steps: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        fn(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(model: str, batch: int, steps: int) -> dict[str, float]:
    encoder = SentenceEncoder.load(model, device="cpu")
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    anchors, positives = _pairs(batch * (steps + 3))

    def texts(i: int) -> tuple[list[str], list[str]]:
        window = slice(i * batch, (i + 1) * batch)
        return anchors[window], positives[window]

    def tokenize(i: int) -> None:
        for side in texts(i):
            encoder.training_features(side)

    def step(i: int) -> None:
        q, a = (encoder(encoder.training_features(side)) for side in texts(i))
        optimizer.zero_grad(set_to_none=True)
        infonce_loss(q, a, 0.05).backward()
        optimizer.step()

    tok, full = _median_ms(tokenize, steps), _median_ms(step, steps)
    return {"batch": batch, "tokenize_ms": tok, "step_ms": full, "share": tok / full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for batch in args.batch_sizes:
        r = measure(args.model, batch, args.steps)
        print(f"{args.model} B={batch}: tokenise {r['tokenize_ms']:.2f} ms of a "
              f"{r['step_ms']:.1f} ms step ({100 * r['share']:.1f}%)", flush=True)


if __name__ == "__main__":
    main()
