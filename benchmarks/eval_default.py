"""Time the acceptance evaluations of the default model against MTEB's published figures.

Runs ``batchscale eval --model default`` as a user would (a fresh process each, so model
loading counts) and prints, per task: the figure, the target, wall time, and the CPU time
the process used (user + system; on a busy machine wall time overstates the cost, CPU time
divided by the cores is what a dedicated machine would take).

    .venv/bin/python benchmarks/eval_default.py                   # all three, as `eval` runs
    .venv/bin/python benchmarks/eval_default.py --dtype float32   # the exact computation
    .venv/bin/python benchmarks/eval_default.py --only stsb:test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (task, split): (metric, MTEB's figure, tolerance)
TARGETS = {
    ("stsb", "test"): ("spearman", 82.03, 0.05),
    ("stsb", "dev"): ("spearman", 86.72, 0.05),
    ("scifact", "test"): ("ndcg@10", 64.51, 0.1),
}
SCIFACT_BUDGET_S = 240.0


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("batchscale")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "batchscale.cli"]


def run_one(task: str, split: str, dtype: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run([*_cli(), "eval", "--model", "default", "--task", task, "--split",
                        split, "--dtype", dtype, "--json", str(out), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**result, "wall_s": wall, "cpu_s": cpu, "load_before": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--only", action="append", metavar="TASK:SPLIT",
                        help="e.g. stsb:test (repeatable; default: all)")
    args = parser.parse_args()
    wanted = [tuple(x.split(":", 1)) for x in args.only] if args.only else list(TARGETS)
    cores = os.cpu_count() or 1
    print(f"dtype={args.dtype}  cores={cores}")
    print(f"{'task':<14}{'metric':<10}{'got':>8}{'target':>13}{'ok':>4}"
          f"{'wall s':>9}{'cpu s':>9}{'cpu/cores':>10}{'load':>6}")
    failed = False
    for task, split in wanted:
        metric, target, tol = TARGETS[(task, split)]
        r = run_one(task, split, args.dtype)
        ok = abs(r[metric] - target) <= tol
        if task == "scifact":
            ok = ok and r["wall_s"] < SCIFACT_BUDGET_S
        failed |= not ok
        print(f"{task + ':' + split:<14}{metric:<10}{r[metric]:>8.3f}"
              f"{f'{target:.2f}±{tol:g}':>13}{'yes' if ok else 'NO':>4}"
              f"{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['cpu_s'] / cores:>10.1f}"
              f"{r['load_before']:>6.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
