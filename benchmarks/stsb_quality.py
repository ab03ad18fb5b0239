"""STS-B fine-tuning of the default model (all-MiniLM-L6-v2): our best recipe against
sentence-transformers' standard one, in the same run.

* ``st``: the standard recipe through sentence-transformers' own ``fit``: CosineSimilarityLoss,
  batch 16, 4 epochs, 10% warmup then linear decay, AdamW lr 2e-5, float32, no evaluator
  during training (its time is training only); the model after the last step.
* ``ours``: ``batchscale train configs/stsb-best.yaml`` (the recipe, chosen on dev; see the
  file), the selected model evaluated once on test.
* ``ours@16``: our trainer on the standard recipe's settings (cosine MSE, batch 16) for one
  epoch, to compare throughput at equal batch size.

Every model is scored by the same evaluator (``batchscale eval``: Spearman of cosine x100,
``--dtype auto``). Throughput is training pairs per second of training time (tokenisation
included, evaluation excluded). Each part runs in its own process, so its peak RSS is its own.

    python benchmarks/stsb_quality.py [--config configs/stsb-best.yaml] [--parts st,ours,ours@16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
TARGETS = {"test": 86.5, "speed": 1.2}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _score(model_dir: str) -> dict[str, float]:
    from batchscale.encoders import SentenceEncoder
    from batchscale.evaluation import run_task

    enc = SentenceEncoder.load(model_dir, dtype="auto")
    return {split: run_task(enc, "stsb", split, data_dir=DATA, show_progress=False)["spearman"]
            for split in ("dev", "test")}


def part_st(out: Path) -> dict[str, object]:
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    from torch.utils.data import DataLoader

    from batchscale.data import load_stsb
    from batchscale.encoders.encoder import default_model_path

    train = load_stsb(DATA / "stsbenchmark", "train")
    examples = [InputExample(texts=[p.text1, p.text2], label=p.label) for p in train]
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    loader = DataLoader(examples, shuffle=True, batch_size=16)
    epochs = 4
    warmup = math.ceil(len(loader) * epochs * 0.1)
    t0 = time.perf_counter()
    model.fit(train_objectives=[(loader, CosineSimilarityLoss(model))], epochs=epochs,
              warmup_steps=warmup, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    model.save(str(out / "st-final"))
    return {"recipe": "ST CosineSimilarityLoss b16 x4 (fit)", "batch": 16,
            "pairs_per_s": epochs * len(examples) / seconds, "train_s": seconds,
            **_score(str(out / "st-final")), "peak_rss_mb": _peak_mb()}


def part_ours(out: Path, config_path: Path, overrides: list[str], label: str,
              score: bool) -> dict[str, object]:
    from batchscale.study import train_run
    from batchscale.training import load_config

    config = load_config(config_path, [f"data.data_dir={DATA}", *overrides])
    result = train_run(config, out / label, show_progress=False, evaluate_test=score)
    row: dict[str, object] = {"recipe": f"ours {label}", "batch": config.train.batch_size,
                              "pairs_per_s": result.fit.pairs_per_second,
                              "train_s": result.fit.train_seconds}
    if score:
        row.update(dev=result.fit.best_metric, test=result.test["spearman"],
                   selected_at=result.fit.best_examples)
    row["peak_rss_mb"] = _peak_mb()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "stsb-best.yaml")
    ap.add_argument("--parts", default="st,ours,ours@16")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="stsb-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        if args.part == "st":
            row = part_st(out)
        elif args.part == "ours":
            row = part_ours(out, args.config, [], "best", score=True)
        else:
            row = part_ours(out, args.config, [
                "loss.name=cosine_mse", "train.batch_size=16", "train.epochs=1",
                "optim.lr=2e-5", "eval.at_start=false", "eval.every_examples=1000000",
                "eval.test=null", "eval.geometry=false"], "standard@16", score=False)
        print(json.dumps(row))
        return 0

    rows = []
    for part in args.parts.split(","):
        cmd = [sys.executable, __file__, "--part", part, "--config", str(args.config),
               "--out", str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {part}", file=sys.stderr)

    print(f"STS-B fine-tuning of all-MiniLM-L6-v2, CPU ({os.cpu_count()} cores), "
          f"load average {os.getloadavg()[0]:.1f}; runs in {out}")
    print(f"{'recipe':<40} {'batch':>5} {'dev':>7} {'test':>7} {'pairs/s':>8} "
          f"{'train s':>8} {'peak RSS MB':>11}")
    for r in rows:
        dev = f"{r['dev']:.2f}" if "dev" in r else "-"
        test = f"{r['test']:.2f}" if "test" in r else "-"
        print(f"{r['recipe']:<40} {r['batch']:>5} {dev:>7} {test:>7} {r['pairs_per_s']:>8.1f} "
              f"{r['train_s']:>8.0f} {r['peak_rss_mb']:>11.0f}")
    by = {r["recipe"]: r for r in rows}
    st = next((r for r in rows if r["recipe"].startswith("ST")), None)
    ours = by.get("ours best")
    same = by.get("ours standard@16")
    if ours is not None:
        ok = ours["test"] >= TARGETS["test"]
        print(f"ours test Spearman {ours['test']:.2f} (selected on dev at "
              f"{ours['selected_at']} examples): target >= {TARGETS['test']}: "
              f"{'met' if ok else 'MISSED'}")
    if st is not None:
        for r in (same, ours):
            if r is not None:
                ratio = r["pairs_per_s"] / st["pairs_per_s"]
                verdict = "met" if ratio >= TARGETS["speed"] else "MISSED"
                target = (f" (target >= {TARGETS['speed']} at equal batch size: {verdict})"
                          if r["batch"] == 16 else "")
                print(f"{r['recipe']} (batch {r['batch']}) / ST (batch 16) pairs/s: "
                      f"{ratio:.2f}x{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
