"""Does the training mix help? A static encoder trained on ``mix`` (STS-B, SNLI and the four
pair sets, ~98k pairs) against one trained on STS-B + SNLI alone (~12k pairs), at the same
budget of examples, scored on STS-B test (Spearman x100) and SciFact test (nDCG@10 x100).

Both arms: the static encoder initialised from all-MiniLM-L6-v2's token embeddings,
InfoNCE (tau 0.05, label-aware masking at 0.6: STS-B pairs scored <= 3/5 are never
anchors), batch 128, AdamW lr 0.01 with no warmup, the same budget of examples, false
negatives masked by group, decontaminated against STS-B dev / test; the checkpoint is
selected on STS-B dev (evaluated every ``--every`` examples), then scored once on both test
sets. Seeds pair the arms (seed s of one with seed s of the other); the table gives each
arm's mean with its 95% t interval over the seeds and the paired difference mix - base.

    python benchmarks/data_mix_quality.py [--seeds 0 1 2] [--examples 98304]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
ARMS = {"mix": "mix", "stsb+snli": ["stsb", "snli"]}


def run_arm(train: str | list[str], seed: int, examples: int, every: int, out: Path,
            sparse: bool) -> dict[str, float]:
    from batchscale.encoders import SentenceEncoder
    from batchscale.evaluation import run_task
    from batchscale.study.run import train_run
    from batchscale.training import config_from_dict

    config = config_from_dict({
        "model": {"name": "static:default"},
        "data": {"train": train, "data_dir": str(DATA)},
        "loss": {"name": "infonce", "temperature": 0.05, "label_threshold": 0.6},
        "optim": {"lr": 0.01, "warmup": 0.0, "sparse": sparse},
        "train": {"batch_size": 128, "max_examples": examples, "seed": seed},
        "eval": {"dev": {"task": "stsb", "split": "dev"},
                 "test": {"task": "stsb", "split": "test"}, "metric": "spearman",
                 "every_examples": every, "geometry": False},
    })
    t0 = time.perf_counter()
    result = train_run(config, out, show_progress=False)
    selected = SentenceEncoder.load(result.final_dir, device="cpu")
    scifact = run_task(selected, "scifact", "test", data_dir=DATA, show_progress=False)
    return {"pairs": result.summary["data"]["pairs"], "dev": result.fit.best_metric,
            "stsb_test": float(result.test["spearman"]), "scifact_test": float(scifact["ndcg@10"]),
            "pairs_per_second": result.fit.pairs_per_second,
            "seconds": time.perf_counter() - t0}


def untrained() -> dict[str, float]:
    """The starting point: the static encoder before training."""
    from batchscale.encoders import SentenceEncoder
    from batchscale.evaluation import run_task

    enc = SentenceEncoder.static("default")
    return {"dev": run_task(enc, "stsb", "dev", data_dir=DATA, show_progress=False)["spearman"],
            "stsb_test": run_task(enc, "stsb", "test", data_dir=DATA,
                                  show_progress=False)["spearman"],
            "scifact_test": run_task(enc, "scifact", "test", data_dir=DATA,
                                     show_progress=False)["ndcg@10"]}


def _fmt(values: list[float]) -> str:
    from dataclasses import asdict

    from batchscale.study.formatting import fmt_iv
    from batchscale.study.stats import t_interval

    ci = t_interval(values)
    return "n/a" if ci is None else f"{fmt_iv(asdict(ci))} (n = {ci.n})"


def _diff(a: list[float], b: list[float]) -> str:
    from batchscale.study.stats import paired_difference

    d = paired_difference(a, b)
    if d is None:
        return "n/a"
    if not d.has_ci:
        return f"{d.mean:+.2f} [n/a] (n = 1)"
    return f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}] (n = {d.n}, paired t p = {d.p_t:.3g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--examples", type=int, default=98_304,
                   help="training examples per run (default: one epoch of mix, 768 steps)")
    p.add_argument("--every", type=int, default=16_384, help="dev evaluation interval")
    p.add_argument("--sparse", action="store_true", help="optim.sparse (lazy AdamW)")
    p.add_argument("--json", type=Path, help="also write the per-run figures here")
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm, train in ARMS.items():
                r = run_arm(train, seed, args.examples, args.every,
                            Path(tmp) / f"{arm}-{seed}", args.sparse)
                results[arm].append(r)
                print(f"{arm:>10} seed {seed}: {r['pairs']} pairs, dev {r['dev']:.2f}, "
                      f"STS-B test {r['stsb_test']:.2f}, SciFact test {r['scifact_test']:.2f}, "
                      f"{r['pairs_per_second']:.0f} pairs/s, {r['seconds']:.0f} s", flush=True)
    print(f"\nstatic encoder, InfoNCE, batch 128, {args.examples} examples per run, "
          f"95% t intervals over seeds {args.seeds}")
    start = untrained()
    print(f"{'':>24} {'untrained':>10} {'mix':>34} {'stsb+snli':>34}  "
          "mix - stsb+snli (paired by seed)")
    for key, label in (("dev", "STS-B dev Spearman"), ("stsb_test", "STS-B test Spearman"),
                       ("scifact_test", "SciFact test nDCG@10")):
        a = [r[key] for r in results["mix"]]
        b = [r[key] for r in results["stsb+snli"]]
        print(f"{label:>24} {start[key]:>10.2f} {_fmt(a):>34} {_fmt(b):>34}  {_diff(a, b)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
