"""Dense vs tiled (memory-linear) batch-softmax losses from B = 1,024 to 65,536.

Every cell runs in a fresh process, so its peak RSS (above the process's baseline with the
inputs allocated) is its own; up to B = 16,384 an untimed call comes first and the time is
the median of the repeats after it (one call above). Printed side by side: median fwd+bwd
time and peak memory of
InfoNCE (q->a), BSC (both directions) and WEINCE (both directions, and q->a alone: the same
anchors as InfoNCE), dense and tiled, and two floors done tile by tile: the three matmuls
any exact loss needs (S = q a^T, dq = G a, da = G^T q), and the work an exact memory-linear
WEINCE over both directions cannot skip: five matmuls (its lambdas need the batch quantile
rho0 before any logit, so the forward takes two sweeps, and its columns' log-sum-exps are
complete only after the second, so the gradient takes a third), one log and two exps per
entry in the second sweep, log, 1/u and two exps per entry in the backward, and a sort of
each anchor's k tail values (numpy's AVX-512 sort, on torch's threads). The WEINCE floor
fuses everything else away, so its ratio to InfoNCE is about the best any implementation
built on torch's exp and log can reach on this machine (its memory is the synthetic tails
array that it sorts, not a requirement). Tiled q->a (InfoNCE, WEINCE's L0) computes its
gradient in the forward sweep: three matmuls per tile, the floor's. WEINCE's L0 keeps the
whole matrix while it fits in one strip (B <= 4,096), so it has InfoNCE's matmuls and no
more; above, it adds a bfloat16 sweep for its rho0 (2.3-3x faster than a float32 one on
AVX512-BF16 CPUs). Over both directions the like-for-like reference is BSC, whose own
columns direction already costs a second sweep.

    python benchmarks/loss_scaling.py [--sizes 1024 4096 16384 32768 65536] [--tile 1024]
                                      [--pairs 7] [--pairs-only]

Last, paired readings: WEINCE q->a and InfoNCE (and at B = 4,096 each loss tiled and dense)
are timed in turn in one process (--pairs calls of each, 2 above 16,384). The median
per-pair ratio is the steadier reading of a ratio: this VM drifts by +-5% between processes,
which two separate medians add up.

Targets (issue 5): tiled BSC and WEINCE at B = 32,768 under 1 GB peak; B = 65,536 completes;
tiled no slower than dense at B = 4,096; WEINCE <= 1.5x InfoNCE. The ratios come last, for
WEINCE over both directions (against InfoNCE and against BSC) and over q->a alone (against
InfoNCE: the same anchors).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

LOSSES = ("infonce", "bsc", "weince")
TILED_ONLY = ("weince_rows",)  # WEINCE q->a: tiled only (its dense cells add nothing)
DENSE_MAX = 16384  # dense cells above this would need tens of GB


REPEATED_MAX = 16384  # above this a cell is one call, with no untimed call before it


def _loss_call(q, a, loss: str, mode: str, tile: int):
    """One fwd+bwd of a loss column ("weince_rows": WEINCE q->a), dense or tiled."""
    import batchscale.losses as losses

    fn = getattr(losses, f"{loss.removesuffix('_rows')}_loss")
    options = {"directions": "q->a"} if loss == "weince_rows" else {}
    tile_size = None if mode == "dense" else tile

    def step() -> None:
        q.grad = a.grad = None
        fn(q, a, 0.05, tile_size=tile_size, **options).backward()

    return step


def _inputs(batch: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=g)
    a = q + torch.randn(batch, dim, generator=g)
    return q.requires_grad_(True), a.requires_grad_(True)


def run_cell(loss: str, mode: str, batch: int, dim: int, tile: int, repeats: int) -> dict:
    import torch


    q, a = _inputs(batch, dim)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if mode == "floor" and loss == "weince":
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        k = max(32, round(0.1 * (batch - 1)))
        tails = np.random.default_rng(0).random((2 * batch, k), dtype=np.float32)
        # numpy sorts on one thread but releases the GIL: blocks of rows on torch's threads.
        pool = ThreadPoolExecutor(torch.get_num_threads())
        blocks = [tails[i:i + 1024] for i in range(0, 2 * batch, 1024)]

        def step() -> None:
            with torch.no_grad():
                qd = torch.nn.functional.normalize(q.detach(), dim=1)
                ad = torch.nn.functional.normalize(a.detach(), dim=1)
                for i in range(0, batch, tile):
                    for j in range(0, batch, tile):
                        s = qd[i:i + tile] @ ad[j:j + tile].T      # sweep 1
                        s = qd[i:i + tile] @ ad[j:j + tile].T      # sweep 2
                        log_u = torch.log1p(-s)
                        torch.exp(s), torch.exp(log_u)
                        s = qd[i:i + tile] @ ad[j:j + tile].T      # backward
                        log_u = torch.log1p(-s)
                        torch.exp(s), torch.exp(log_u), torch.reciprocal(s)
                        _ = s @ ad[j:j + tile]
                        _ = s.T @ qd[i:i + tile]
                list(pool.map(lambda rows: np.sort(rows, axis=1), blocks))
    elif mode == "floor":
        def step() -> None:
            with torch.no_grad():
                qd, ad = q.detach(), a.detach()
                for i in range(0, batch, tile):
                    for j in range(0, batch, tile):
                        s = qd[i:i + tile] @ ad[j:j + tile].T
                        _ = s @ ad[j:j + tile]
                        _ = s.T @ qd[i:i + tile]
    else:
        step = _loss_call(q, a, loss, mode, tile)

    if repeats > 1:
        step()  # untimed: the first call pays one-off costs (thread pools, first-touch pages)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": statistics.median(times), "peak_mb": (peak - baseline) / 1024}


# Paired readings: (numerator, denominator) as (loss, tile_size option); tiled/dense only at
# the size of its target.
PAIRED = {"WEINCE q->a/InfoNCE": (("weince_rows", "tiled"), ("infonce", "tiled"))}
PAIRED_AT_4096 = {f"tiled/dense {name}": ((loss, "tiled"), (loss, "dense"))
                  for name, loss in (("InfoNCE", "infonce"), ("BSC", "bsc"),
                                     ("WEINCE", "weince"))}


def run_pairs(batch: int, dim: int, tile: int, pairs: int) -> dict:
    """Two configurations called in turn in one process (the order alternating from pair to
    pair), after two untimed calls each up to B = 16,384: per-pair ratios, which the VM's
    slow drift moves far less than it moves two medians taken in separate processes."""
    q, a = _inputs(batch, dim)

    def timed(loss: str, mode: str) -> float:
        step = _loss_call(q, a, loss, mode, tile)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    readings = dict(PAIRED, **(PAIRED_AT_4096 if batch == 4096 else {}))
    out = {}
    for name, (num, den) in readings.items():
        for _ in range(2 if batch <= REPEATED_MAX else 0):
            timed(*num), timed(*den)
        ratios = []
        for i in range(pairs):
            first, second = (num, den) if i % 2 == 0 else (den, num)
            times = {first: timed(*first), second: timed(*second)}
            ratios.append(times[num] / times[den])
        out[name] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=7,
                        help="paired calls per reading and size (2 above 16,384)")
    parser.add_argument("--pairs-only", action="store_true", help="skip the table")
    parser.add_argument("--child", nargs=3, metavar=("LOSS", "MODE", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loss, mode, batch = args.child
        out = (run_pairs(int(batch), args.dim, args.tile, args.repeats) if mode == "pairs"
               else run_cell(loss, mode, int(batch), args.dim, args.tile, args.repeats))
        print(json.dumps(out))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {args.dim}, "
          f"tile {args.tile}, float32; median fwd+bwd seconds and peak MB above baseline, "
          f"fresh process per cell\n")
    cols = (["floor", "weince/floor"]
            + [f"{loss}/{mode}" for loss in LOSSES for mode in ("dense", "tiled")]
            + [f"{loss}/tiled" for loss in TILED_ONLY])
    ratios = {
        "tiled/dense InfoNCE": ("infonce/tiled", "infonce/dense"),
        "tiled/dense BSC": ("bsc/tiled", "bsc/dense"),
        "tiled/dense WEINCE": ("weince/tiled", "weince/dense"),
        "WEINCE/InfoNCE": ("weince/tiled", "infonce/tiled"),
        "WEINCE/BSC": ("weince/tiled", "bsc/tiled"),
        "WEINCE q->a/InfoNCE": ("weince_rows/tiled", "infonce/tiled"),
        "WEINCE floor/InfoNCE": ("weince/floor", "infonce/tiled"),
    }
    if not args.pairs_only:
        print(f"{'B':>6} | " + " | ".join(f"{c:>20}" for c in cols))
    table = []
    for batch in [] if args.pairs_only else args.sizes:
        res: dict[str, dict | None] = {}
        for col in cols:
            loss, mode = ("bsc", "floor") if col == "floor" else col.split("/")
            if mode == "dense" and batch > DENSE_MAX:
                res[col] = None
                continue
            res[col] = _run_child(loss, mode, batch, args,
                                  args.repeats if batch <= REPEATED_MAX else 1)
        cells = []
        for col in cols:
            r = res[col]
            if r is None:
                cells.append(f"{'skipped':>20}")
            elif "error" in r:
                cells.append(f"{'failed':>20}")
            else:
                cells.append(f"{r['median_s']:>10.3f}s {r['peak_mb']:>7.0f}MB")
        print(f"{batch:>6} | " + " | ".join(cells), flush=True)
        table.append((batch, res))

    if table:
        print(f"\nRatios of median times (tiled unless named)\n{'B':>6} | "
              + " | ".join(f"{name:>20}" for name in ratios))
    for batch, res in table:
        print(f"{batch:>6} | " + " | ".join(f"{_ratio(res, *pair):>20}"
                                             for pair in ratios.values()))

    print("\nPaired: two configurations called in turn in one process, median of the per-pair "
          "ratios (the pairs follow)")
    for batch in args.sizes:
        out = _run_child("-", "pairs", batch, args,
                         args.pairs if batch <= REPEATED_MAX else min(args.pairs, 2))
        if "error" in out:
            print(f"{batch:>6} | failed: {out['error']}", flush=True)
            continue
        for name, pair_ratios in out.items():
            print(f"{batch:>6} | {name:>20} | {statistics.median(pair_ratios):>5.2f} | "
                  + " ".join(f"{r:.2f}" for r in pair_ratios), flush=True)


def _run_child(loss: str, mode: str, batch: int, args: argparse.Namespace, repeats: int
               ) -> dict:
    """A cell (or the paired readings) in a fresh process: its JSON, or {"error": ...}."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", loss, mode, str(batch), "--dim", str(args.dim),
         "--tile", str(args.tile), "--repeats", str(repeats)],
        capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(res: dict, num: str, den: str) -> str:
    a, b = res.get(num), res.get(den)
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a['median_s'] / b['median_s']:.2f}"


if __name__ == "__main__":
    main()
