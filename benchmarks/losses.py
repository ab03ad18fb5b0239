"""Forward + backward time and peak memory of the batch-softmax losses, side by side.

For each batch size B (d = 384, float32, CPU): times come from one process that runs the
losses round-robin (so a passing load hits them alike) and are medians over the rounds; the
peak RSS of each loss is measured in a fresh process of its own, above that process's
baseline with the inputs allocated. Ratios are WEINCE / InfoNCE at equal directions (rows
only: WEINCE q->a vs InfoNCE; both: WEINCE vs BSC).

    python benchmarks/losses.py [--sizes 256 1024 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "infonce": ("infonce_loss", {}),
    "bsc": ("bsc_loss", {}),
    "weince_rows": ("weince_loss", {"directions": "q->a"}),
    "weince": ("weince_loss", {}),
}


def _inputs(batch: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=g)
    a = q + torch.randn(batch, dim, generator=g)
    return q.requires_grad_(True), a.requires_grad_(True)


def _step(name: str, q, a) -> float:
    import batchscale.losses as losses

    fn_name, kwargs = CONFIGS[name]
    q.grad = a.grad = None
    start = time.perf_counter()
    getattr(losses, fn_name)(q, a, 0.05, **kwargs).backward()
    return time.perf_counter() - start


def time_round_robin(batch: int, dim: int, repeats: int) -> dict:
    q, a = _inputs(batch, dim)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for name in CONFIGS:  # warm-up
        _step(name, q, a)
    for _ in range(repeats):
        for name in CONFIGS:
            times[name].append(_step(name, q, a))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(name: str, batch: int, dim: int) -> float:
    q, a = _inputs(batch, dim)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(name, q, a)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024


def _child(*args: str) -> object:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, batch = args.child[0], int(args.child[1])
        if kind == "time":
            print(json.dumps(time_round_robin(batch, args.dim, args.repeats)))
        else:
            print(json.dumps(peak_memory(args.child[2], batch, args.dim)))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {args.dim}, "
          f"float32; median of {args.repeats} round-robin fwd+bwd rounds; peak MB in a fresh "
          f"process per cell\n")
    header = (f"{'B':>6} | " + " | ".join(f"{n + ' ms':>14} {'MB':>6}" for n in CONFIGS)
              + " | WEINCE/InfoNCE (rows) | WEINCE/BSC (both)")
    print(header)
    print("-" * len(header))
    for batch in args.sizes:
        ms = _child("time", str(batch), "--dim", str(args.dim), "--repeats", str(args.repeats))
        mb = {n: _child("memory", str(batch), n, "--dim", str(args.dim)) for n in CONFIGS}
        cells = " | ".join(f"{ms[n] * 1e3:>14.2f} {mb[n]:>6.0f}" for n in CONFIGS)
        rows = ms["weince_rows"] / ms["infonce"]
        both = ms["weince"] / ms["bsc"]
        print(f"{batch:>6} | {cells} | {rows:>21.2f} | {both:>17.2f}", flush=True)
    print("\ntarget: WEINCE / InfoNCE <= 1.5")


if __name__ == "__main__":
    main()
