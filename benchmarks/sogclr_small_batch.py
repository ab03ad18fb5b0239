"""Small batches without the small-batch penalty? SogCLR (Yuan et al., ICML 2022) against
InfoNCE, static encoder on ``mix``, at B = 16, 64, 256 and 4,096 with the same 204,800
examples per run and 3 seeds (``benchmarks/sogclr_small_batch.yaml``: the design and why).

The runs are a sweep (``batchscale sweep``: resumable, the store kept beside the log); this
script runs it, then prints STS-B dev and test Spearman per loss and batch size (mean and 95%
t interval over the seeds) and the answer to the question: does SogCLR at a small batch
reach InfoNCE at the largest? "Reaches" means the paired (by seed) difference SogCLR@B -
InfoNCE@4096 on test has a 95% t interval whose lower end is above -1 point (a non-
inferiority margin of 1 Spearman point, stated before the runs); "falls short" means the
interval lies below 0; anything else is undetermined at this n.

    python benchmarks/sogclr_small_batch.py [--store runs/bench-sogclr/study.sqlite] [--threads 1]
    python benchmarks/sogclr_small_batch.py --report-only   # the table from a finished store
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "sogclr_small_batch.yaml"
MARGIN = 1.0  # Spearman points: SogCLR@B "reaches" InfoNCE@large when diff CI low > -MARGIN


def run_sweep(store: Path, work: Path, threads: int) -> None:
    cmd = [sys.executable, "-m", "batchscale", "sweep", str(CONFIG), "--store", str(store),
           "--work", str(work), "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def load(store: Path) -> dict[tuple[str, int], dict[int, dict[str, float]]]:
    """(loss, batch size) -> seed -> {dev, test, seconds}."""
    db = sqlite3.connect(store)
    try:
        rows = db.execute("SELECT c.loss, c.batch_size, c.seed, r.best_dev, r.test, "
                          "r.train_seconds FROM runs r JOIN cells c USING (cell_id)").fetchall()
    finally:
        db.close()
    out: dict[tuple[str, int], dict[int, dict[str, float]]] = defaultdict(dict)
    for loss, batch, seed, dev, test, seconds in rows:
        out[(loss, int(batch))][int(seed)] = {"dev": dev, "test": test, "seconds": seconds}
    return out


def _ci(values: list[float]) -> str:
    from dataclasses import asdict

    from batchscale.study.formatting import fmt_iv
    from batchscale.study.stats import t_interval

    ci = t_interval(values)
    if ci is None:
        return "n/a"
    return fmt_iv(asdict(ci)) + (" (n = 1)" if not ci.has_ci else "")


def _diff(d) -> str:
    return "n/a" if d is None or not d.has_ci else \
        f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}] (n = {d.n})"


def verdict(diff) -> str:
    if diff is None or not diff.has_ci:
        return "undetermined (fewer than 2 paired seeds)"
    if diff.lo > -MARGIN:
        return "reaches it"
    if diff.hi < 0:
        return "falls short"
    return "undetermined at this n"


def report(results: dict[tuple[str, int], dict[int, dict[str, float]]]) -> dict:
    from batchscale.study.stats import paired_difference

    batches = sorted({b for _, b in results})
    print(f"{'loss':>8} {'B':>6} {'n':>3} {'dev Spearman':>22} {'test Spearman':>22} "
          f"{'train s (median)':>17}")
    for loss in ("infonce", "sogclr"):
        for b in batches:
            runs = results.get((loss, b), {})
            secs = sorted(r["seconds"] for r in runs.values())
            print(f"{loss:>8} {b:>6} {len(runs):>3} {_ci([r['dev'] for r in runs.values()]):>22} "
                  f"{_ci([r['test'] for r in runs.values()]):>22} "
                  f"{secs[len(secs) // 2] if secs else float('nan'):>17.0f}")
    large = max(batches)
    ref = results.get(("infonce", large), {})
    answers = {}
    print(f"\nSogCLR at B against InfoNCE at B = {large} (test Spearman, paired by seed, "
          f"95% t interval; margin {MARGIN:g} point):")
    for b in batches:
        mine = results.get(("sogclr", b), {})
        same = results.get(("infonce", b), {})
        seeds = sorted(set(mine) & set(ref))
        d = paired_difference([mine[s]["test"] for s in seeds], [ref[s]["test"] for s in seeds])
        seeds_b = sorted(set(mine) & set(same))
        d_same = paired_difference([mine[s]["test"] for s in seeds_b],
                                   [same[s]["test"] for s in seeds_b])
        d_dev = paired_difference([mine[s]["dev"] for s in seeds], [ref[s]["dev"] for s in seeds])
        answers[b] = verdict(d)
        print(f"  B = {b:>5}: test: SogCLR - InfoNCE@{large} {_diff(d)} -> {answers[b]}; "
              f"SogCLR - InfoNCE@{b} {_diff(d_same)}; dev (selection): SogCLR - "
              f"InfoNCE@{large} {_diff(d_dev)}")
    small = [b for b in batches if b < large]
    reached = [b for b in small if answers[b] == "reaches it"]
    short = [b for b in small if answers[b] == "falls short"]
    if reached:
        text = (f"Yes at B = {', '.join(map(str, reached))}: SogCLR there is within "
                f"{MARGIN:g} point of InfoNCE at B = {large} on STS-B test.")
    elif short and len(short) == len(small):
        text = (f"No: SogCLR at every smaller batch ({', '.join(map(str, small))}) falls short "
                f"of InfoNCE at B = {large} on STS-B test.")
    else:
        text = (f"Not shown: at B = {', '.join(map(str, small))} the intervals do not place "
                f"SogCLR within {MARGIN:g} point of InfoNCE at B = {large}"
                + (f" (it falls short at B = {', '.join(map(str, short))})" if short else "")
                + ".")
    print("\nAnswer: " + text)
    return {"answers": answers, "text": text}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=ROOT / "runs" / "bench-sogclr" / "study.sqlite")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the answer here")
    args = p.parse_args()
    if not args.report_only:
        args.store.parent.mkdir(parents=True, exist_ok=True)
        run_sweep(args.store, args.work or args.store.parent / "work", args.threads)
    answer = report(load(args.store))
    if args.json:
        args.json.write_text(json.dumps(answer, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
