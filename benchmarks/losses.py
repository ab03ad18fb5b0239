"""Forward + backward time and peak memory of the batch-softmax losses, side by side.

For each batch size B (d = 384, float32, CPU) every configuration runs in a fresh process,
so its peak RSS is its own. Printed: median fwd+bwd time over repeats, the peak RSS above the
process's baseline (inputs allocated), and the ratios WEINCE / InfoNCE at equal directions
(rows only: WEINCE q->a vs InfoNCE; both: WEINCE vs BSC).

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


def run_one(name: str, batch: int, dim: int, repeats: int) -> dict:
    import torch

    import batchscale.losses as losses

    fn_name, kwargs = CONFIGS[name]
    fn = getattr(losses, fn_name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=g)
    a = q + torch.randn(batch, dim, generator=g)
    q.requires_grad_(True)
    a.requires_grad_(True)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        q.grad = a.grad = None
        start = time.perf_counter()
        fn(q, a, 0.05, **kwargs).backward()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": statistics.median(times), "peak_mb": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=2, metavar=("NAME", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, batch = args.child
        print(json.dumps(run_one(name, int(batch), args.dim, args.repeats)))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {args.dim}, "
          f"float32, median of {args.repeats} fwd+bwd (fresh process per cell)\n")
    header = (f"{'B':>6} | " + " | ".join(f"{n + ' ms':>14} {'MB':>6}" for n in CONFIGS)
              + " | WEINCE/InfoNCE (rows) | WEINCE/BSC (both)")
    print(header)
    print("-" * len(header))
    for batch in args.sizes:
        res = {}
        for name in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, str(batch), "--dim", str(args.dim),
                 "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        cells = " | ".join(f"{res[n]['median_s'] * 1e3:>14.2f} {res[n]['peak_mb']:>6.0f}"
                           for n in CONFIGS)
        rows = res["weince_rows"]["median_s"] / res["infonce"]["median_s"]
        both = res["weince"]["median_s"] / res["bsc"]["median_s"]
        print(f"{batch:>6} | {cells} | {rows:>21.2f} | {both:>17.2f}")
    print("\ntarget: WEINCE / InfoNCE <= 1.5")


if __name__ == "__main__":
    main()
