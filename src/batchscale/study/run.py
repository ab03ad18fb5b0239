"""One training run from a config: data, encoder, dev evaluation, trainer, final test.

This is where the layers meet: the trainer (``training/``) is given a dev evaluator built
from ``evaluation/``; the selected model is copied to ``OUT/final`` and evaluated once on
test exactly as ``batchscale eval --model OUT/final`` does (loaded from disk, same dtype), so
the two figures agree.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batching.distributed import is_distributed
from ..batching.false_negatives import batch_ids, unit_ids
from ..data import BeirDataset, load_stsb
from ..encoders import SentenceEncoder
from ..encoders.encoder import resolve_dtype
from ..evaluation import evaluate_retrieval, evaluate_sts, pair_geometry, run_task, task_path
from ..training import Objective, RunConfig, Trainer, TrainingSet
from ..training.checkpoint import atomic_write_text
from ..training.noise_scale import measure_noise_scale
from ..training.trainer import FitResult
from .training_data import load_training_data

#: Training pairs whose embeddings give the geometry diagnostics at each evaluation point.
GEOMETRY_PAIRS = 256
#: The probe set is drawn with this seed, not the run's: every cell measures the same pairs.
PROBE_SEED = 0


@dataclass
class RunResult:
    fit: FitResult
    final_dir: Path
    test: dict[str, Any] | None
    summary: dict[str, Any]


def _data_dir(config: RunConfig) -> Path | None:
    return config.data.data_dir


def make_evaluator(config: RunConfig, data: TrainingSet, holdout: Any, *,
                   objective: Objective | None = None, show_progress: bool = False
                   ) -> Callable[[SentenceEncoder], dict[str, Any]]:
    """The dev evaluation: on a copy of the encoder in the evaluation dtype (the figures of
    ``batchscale eval --split dev`` on a saved checkpoint), plus the mechanisms: pair
    geometry on a fixed probe set of training pairs (the same pairs for every seed and batch
    size) and, with ``eval.noise_scale`` and an ``objective``, the gradient noise scale."""
    e = config.eval
    ref = e.dev
    if ref.split == "holdout":
        if isinstance(holdout, tuple):
            ds, split = holdout
            kind, target = "retrieval", (ds, split)
        else:
            kind, target = "sts", holdout
    else:
        kind, path = task_path(ref.task, _data_dir(config))
        target = list(load_stsb(path, ref.split)) if kind == "sts" else (BeirDataset(path),
                                                                          ref.split)
    rng = random.Random(PROBE_SEED)
    sample = sorted(rng.sample(range(len(data)), min(GEOMETRY_PAIRS, len(data))))
    q_texts = [data.columns[0][i] for i in sample]
    a_texts = [data.columns[1][i] for i in sample]

    # The probe batches mask false negatives as training does.
    probe_ids = None
    if e.noise_scale is not None and config.train.false_negatives != "none":
        units = torch.from_numpy(unit_ids(data.columns, data.groups,
                                          config.train.false_negatives))

        def probe_ids(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return batch_ids(units, rows)

    def evaluate(encoder: SentenceEncoder) -> dict[str, Any]:
        dtype = resolve_dtype(e.dtype, encoder.device)
        model = copy.deepcopy(encoder).to(dtype) if dtype != torch.float32 else encoder
        if kind == "sts":
            metrics: dict[str, Any] = dict(evaluate_sts(model, target, batch_size=e.batch_size,
                                                        show_progress=show_progress))
        else:
            ds, split = target
            metrics = dict(evaluate_retrieval(model, ds, split, batch_size=e.batch_size,
                                              show_progress=show_progress))
        if e.geometry and len(sample) >= 2:
            q = model.encode(q_texts, batch_size=e.batch_size, show_progress=False)
            a = model.encode(a_texts, batch_size=e.batch_size, show_progress=False)
            metrics["geometry"] = pair_geometry(q, a, temperature=config.loss.temperature)
        # Only rank 0 evaluates, so under torchrun the objective's collectives cannot run.
        if e.noise_scale is not None and objective is not None and not is_distributed():
            metrics["noise_scale"] = measure_noise_scale(
                encoder, objective, data, config.train.batch_size,
                batches=e.noise_scale.batches, chunks=e.noise_scale.chunks,
                seed=config.train.seed, false_negatives=probe_ids).as_dict()
        return metrics

    return evaluate


def build_encoder(config: RunConfig) -> SentenceEncoder:
    m = config.model
    device = config.train.device
    if m.name.startswith("static:"):
        enc = SentenceEncoder.static(m.name[len("static:"):], device=device or "cpu")
    else:
        enc = SentenceEncoder.load(m.name, pooling=m.pooling, device=device)
    if m.max_seq_length is not None:
        enc.max_seq_length = m.max_seq_length
    return enc


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def train_run(config: RunConfig, out_dir: str | Path, *, resume: bool = False,
              show_progress: bool = True, evaluate_test: bool = True) -> RunResult:
    """Train, select on dev, copy the selection to ``OUT/final``, evaluate it once on test,
    write ``OUT/summary.json``."""
    out = Path(out_dir)
    seed_everything(config.train.seed, config.train.deterministic)
    data, holdout, report = load_training_data(config)
    encoder = build_encoder(config)
    objective = Objective(config.loss, num_examples=len(data),
                          cross_ranks=config.train.distributed_loss).to(encoder.device)
    evaluate = make_evaluator(config, data, holdout, objective=objective)
    trainer = Trainer(encoder, objective, data, config, out, evaluate,
                      show_progress=show_progress)
    fit = trainer.fit(resume=resume)
    if not trainer.is_main:  # under torchrun, rank 0 selects, tests and reports
        return RunResult(fit, out / "final", None, {})
    final = trainer.finalize()
    test = None
    if evaluate_test and config.eval.test is not None:
        selected = SentenceEncoder.load(final, device=config.train.device,
                                        dtype=config.eval.dtype)
        test = run_task(selected, config.eval.test.task, config.eval.test.split,
                        data_dir=_data_dir(config), batch_size=config.eval.batch_size,
                        show_progress=False)
        test["model"] = str(final)
    summary = {
        "out": str(out),
        "final": str(final),
        "metric": config.eval.metric,
        "best_dev": fit.best_metric,
        "best_examples": fit.best_examples,
        "examples": fit.examples,
        "train_seconds": fit.train_seconds,
        "pairs_per_second": fit.pairs_per_second,
        "data": report.as_dict(),
        "test": test,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return RunResult(fit, final, test, summary)


def summary_table(result: RunResult) -> str:
    """The curve (examples, steps, seconds, train loss, dev metric) and the outcome."""
    s = result.summary
    metric = s["metric"]
    rows = [f"{'examples':>9} {'steps':>6} {'seconds':>8} {'loss':>8} {'dev ' + metric:>12}"]
    for r in result.fit.curve:
        loss = r.get("train_loss")
        mark = " *" if r["examples"] == s["best_examples"] else ""
        rows.append(f"{r['examples']:>9} {r['steps']:>6} {r['seconds']:>8.1f} "
                    f"{'' if loss is None else f'{loss:.4f}':>8} "
                    f"{float(r['dev'][metric]):>12.2f}{mark}")
    rows.append(f"selected (*): {s['best_examples']} examples, dev {metric} "
                f"{s['best_dev']:.2f} -> {s['final']}")
    data = s.get("data")
    if data:
        rows.append(f"training data: {data['pairs']} pairs, {data['contaminated']} dropped as "
                    "sharing a text with dev / test" if data["decontaminated"] else
                    f"training data: {data['pairs']} pairs (not decontaminated)")
    rows.append(f"throughput: {s['pairs_per_second']:.1f} pairs/s over "
                f"{s['train_seconds']:.0f} s of training")
    test = s.get("test")
    if test:
        main = "spearman" if "spearman" in test else "ndcg@10"
        rows.append(f"test ({test['task']} {test['split']}, {test['dtype']}): {main} "
                    f"{float(test[main]):.2f}")
    return "\n".join(rows)
