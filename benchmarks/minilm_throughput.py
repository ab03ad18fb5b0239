"""MiniLM training throughput: our trainer against sentence-transformers' ``fit``, side by
side in one run, at batch 16 and 64 (issue 20, item 4), and a quality check.

Both train all-MiniLM-L6-v2 on the standard STS-B recipe: CosineSimilarityLoss (ours:
``cosine_mse``, the same loss) on STS-B train pairs with their score / 5, AdamW lr 2e-5,
weight decay 0.01, gradient norm clipped at 1, 10% linear warmup then linear decay,
float32, no evaluation while training.

* **Speed**: the same ``--pairs`` training pairs (the first of STS-B train shuffled with
  seed 0) for one epoch, each cell in its own process (its peak RSS is its own), in
  ``--rounds`` alternating rounds (which system goes first alternates). Training time is our
  ``FitResult.train_seconds`` (the steps, tokenisation included) and, for ST, its Trainer's
  loop from ``on_train_begin`` to ``on_train_end`` (the steps, its collation and
  tokenisation included); pairs/s = pairs / training time, ms/step = training time / steps;
  medians over the rounds.
* **Quality**: one epoch of each at batch 16 on the whole of STS-B train (5,749 pairs, not
  decontaminated, as ST's recipe), the model after the last step, both scored by the same
  evaluator (``stsb_quality._score``: ``batchscale eval``'s STS-B Spearman x100).

    python benchmarks/minilm_throughput.py [--pairs 384] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stsb_quality import DATA, ROOT, _peak_mb, _score

RESULTS = ROOT / "benchmarks" / "results" / "minilm_throughput.txt"
BATCHES = (16, 64)
LR = 2e-5
TARGET_SPEED = 2.0
TARGET_QUALITY = 0.2  # |ours - ST| test Spearman points


def _stsb_pairs(limit: int | None) -> list:
    """STS-B train (all of it, or the first ``limit`` pairs of a seed-0 shuffle)."""
    from batchscale.data import load_stsb

    pairs = list(load_stsb(DATA / "stsbenchmark", "train"))
    if limit is None:
        return pairs
    random.Random(0).shuffle(pairs)
    return pairs[:limit]


def part_st(out: Path, batch: int, limit: int | None, score: bool) -> dict[str, object]:
    """sentence-transformers' ``fit``, its loop timed by a callback."""
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer import trainer as st_trainer
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    from batchscale.encoders.encoder import default_model_path

    clock: dict[str, float] = {}

    class LoopClock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["begin"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            clock["end"] = time.perf_counter()

    base_init = st_trainer.SentenceTransformerTrainer.__init__

    def init_with_clock(self, *args, **kwargs):  # fit builds its Trainer inside
        base_init(self, *args, **kwargs)
        self.add_callback(LoopClock())

    st_trainer.SentenceTransformerTrainer.__init__ = init_with_clock
    pairs = _stsb_pairs(limit)
    examples = [InputExample(texts=[p.text1, p.text2], label=p.label) for p in pairs]
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    loader = DataLoader(examples, shuffle=True, batch_size=batch)
    os.chdir(out)  # fit's default checkpoint folder is relative to the working directory
    model.fit(train_objectives=[(loader, CosineSimilarityLoss(model))], epochs=1,
              warmup_steps=math.ceil(len(loader) * 0.1), optimizer_params={"lr": LR},
              weight_decay=0.01, max_grad_norm=1.0, show_progress_bar=False)
    seconds = clock["end"] - clock["begin"]
    row: dict[str, object] = {"system": "st", "batch": batch, "pairs": len(examples),
                              "steps": len(loader), "train_s": seconds}
    if score:
        model.save(str(out / "st-final"))
        row.update(_score(str(out / "st-final")))
    row["peak_rss_mb"] = _peak_mb()
    return row


def _write_pairs(path: Path, pairs: list) -> Path:
    rows = ["sentence1\tsentence2\tscore"]
    rows += [f"{p.text1}\t{p.text2}\t{p.label!r}" for p in pairs]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def part_ours(out: Path, batch: int, limit: int | None, score: bool) -> dict[str, object]:
    """Our trainer on the same recipe; its one evaluation point (the end) is a stub, so
    that the run does only training (the selected model is then the last step's)."""
    from batchscale.study.run import build_encoder, seed_everything
    from batchscale.study.training_data import load_training_data
    from batchscale.training import Objective, Trainer, config_from_dict

    pairs = _stsb_pairs(limit)
    run = out / f"ours-b{batch}-{time.time_ns()}"
    run.mkdir(parents=True)
    source = _write_pairs(run / "pairs.tsv", pairs)
    config = config_from_dict({
        "model": {"name": "default"},
        "data": {"train": str(source), "score_column": "score", "score_range": [0, 1],
                 "decontaminate": False, "data_dir": str(DATA)},
        "loss": {"name": "cosine_mse"},
        "optim": {"lr": LR, "warmup": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0},
        "train": {"batch_size": batch, "epochs": 1, "seed": 0, "device": "cpu"},
        "eval": {"dev": {"task": "stsb", "split": "dev"}, "test": None, "at_start": False,
                 "every_examples": 10**9, "geometry": False, "dtype": "float32"},
    })
    seed_everything(config.train.seed, config.train.deterministic)
    data, _, _ = load_training_data(config)
    encoder = build_encoder(config)
    objective = Objective(config.loss, num_examples=len(data))
    trainer = Trainer(encoder, objective, data, config, run / "run",
                      lambda _: {"spearman": 0.0}, show_progress=False)
    fit = trainer.fit()
    row: dict[str, object] = {"system": "ours", "batch": batch, "pairs": fit.examples,
                              "steps": trainer.progress.step, "train_s": fit.train_seconds}
    if score:
        row.update(_score(str(trainer.finalize())))
    row["peak_rss_mb"] = _peak_mb()
    return row


def _run_part(args: argparse.Namespace, out: Path, system: str, batch: int,
              quality: bool) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--part", system, "--batch", str(batch), "--out",
           str(out), "--threads", str(args.threads), "--pairs", str(args.pairs)]
    if quality:
        cmd.append("--quality")
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"part {system} b{batch} failed ({proc.returncode})")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"done: {system} b{batch}{' quality' if quality else ''}: "
          f"{row['pairs'] / row['train_s']:.1f} pairs/s", file=sys.stderr)
    return row


def _speed_table(rows: list[dict[str, object]], rounds: int) -> list[str]:
    lines = [f"{'batch':>5} {'system':>6} {'pairs/s':>8} {'ms/step':>8} {'peak RSS MB':>11} "
             f"{'x ST':>5}  pairs/s by round"]
    verdicts = []
    for batch in BATCHES:
        med = {}
        for system in ("ours", "st"):
            cells = [r for r in rows if r["batch"] == batch and r["system"] == system]
            rates = [r["pairs"] / r["train_s"] for r in cells]
            med[system] = {
                "rate": statistics.median(rates),
                "ms": statistics.median(1000 * r["train_s"] / r["steps"] for r in cells),
                "rss": statistics.median(r["peak_rss_mb"] for r in cells),
                "rates": rates}
        for system in ("ours", "st"):
            m = med[system]
            ratio = m["rate"] / med["st"]["rate"]
            lines.append(f"{batch:>5} {system:>6} {m['rate']:>8.1f} {m['ms']:>8.0f} "
                         f"{m['rss']:>11.0f} {ratio:>5.2f}  "
                         + ", ".join(f"{x:.1f}" for x in m["rates"]))
        ratio = med["ours"]["rate"] / med["st"]["rate"]
        verdicts.append(f"batch {batch}: ours {med['ours']['rate']:.1f} pairs/s vs ST "
                        f"{med['st']['rate']:.1f} pairs/s: {ratio:.2f} x (target >= "
                        f"{TARGET_SPEED:g}x: {'met' if ratio >= TARGET_SPEED else 'missed'})")
    return lines + verdicts


def _quality_lines(ours: dict[str, object], st: dict[str, object]) -> list[str]:
    diff = float(ours["test"]) - float(st["test"])
    ok = abs(diff) <= TARGET_QUALITY
    return [
        f"quality, 1 epoch at batch 16 on STS-B train ({ours['pairs']} pairs): "
        f"ours dev {ours['dev']:.2f} test {ours['test']:.2f} "
        f"({ours['pairs'] / ours['train_s']:.1f} pairs/s); ST dev {st['dev']:.2f} test "
        f"{st['test']:.2f} ({st['pairs'] / st['train_s']:.1f} pairs/s)",
        f"test Spearman ours - ST: {diff:+.2f} (within {TARGET_QUALITY}: "
        f"{'yes' if ok else 'no'})",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=384, help="training pairs per speed cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="minilm-throughput-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        import torch

        torch.set_num_threads(args.threads)
        part = part_st if args.part == "st" else part_ours
        print(json.dumps(part(out, args.batch, None if args.quality else args.pairs,
                              args.quality)))
        return 0

    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    rows = []
    for r in range(args.rounds):
        for batch in BATCHES:
            for system in (("ours", "st") if r % 2 == 0 else ("st", "ours")):
                rows.append(_run_part(args, out, system, batch, quality=False))
                load.append(os.getloadavg()[0])
    lines = [f"MiniLM (all-MiniLM-L6-v2) training throughput, CPU ({os.cpu_count()} cores, "
             f"{args.threads} thread(s) per process), {args.pairs} STS-B train pairs per "
             f"cell, {args.rounds} alternating rounds, medians; load average "
             f"{min(load):.1f}-{max(load):.1f}", *_speed_table(rows, args.rounds)]
    if not args.no_quality:
        st = _run_part(args, out, "st", 16, quality=True)
        ours = _run_part(args, out, "ours", 16, quality=True)
        lines += _quality_lines(ours, st)
    lines.append(f"({time.perf_counter() - started:.0f} s in all; runs in {out})")
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
