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
from ..data import BeirDataset, Pair, load_pairs, load_snli_pairs, load_stsb, load_triplets
from ..encoders import SentenceEncoder
from ..encoders.encoder import resolve_dtype
from ..evaluation import evaluate_retrieval, evaluate_sts, pair_geometry, run_task, task_path
from ..evaluation.tasks import default_data_dir
from ..training import Objective, RunConfig, Trainer, TrainingSet
from ..training.checkpoint import atomic_write_text
from ..training.noise_scale import measure_noise_scale
from ..training.trainer import FitResult

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


def load_training_data(config: RunConfig) -> tuple[TrainingSet, Any]:
    """The training set and, with ``data.dev_holdout``, the held-out dev part (an STS pair
    list or a BEIR split)."""
    d = config.data
    if isinstance(d.train, list):
        return _combined_pairs(config, d.train)
    train = d.train
    if train == "stsb" or train == "scifact" or train.startswith("beir:"):
        kind, path = task_path(train, _data_dir(config))
        if kind == "sts":
            records = list(load_stsb(path, "train"))
            return _holdout_pairs(records, d.dev_holdout, config.train.seed)
        ds = BeirDataset(path)
        if d.dev_holdout > 0:
            kept, held = ds.holdout("train", d.dev_holdout, seed=config.train.seed)
            return TrainingSet.from_records(ds.training_pairs(kept)), (ds, held)
        return TrainingSet.from_records(ds.training_pairs("train")), None
    if _is_snli(train):
        return _holdout_pairs(_snli_pairs(config, train), d.dev_holdout, config.train.seed)
    path = Path(train)
    if d.kind == "triplets":
        cols = d.columns or ["anchor", "positive", "negative"]
        return TrainingSet.from_records(load_triplets(path, columns=cols)), None
    cols = d.columns or ["sentence1", "sentence2"]
    records = list(load_pairs(path, columns=cols, score_column=d.score_column,
                              score_range=d.score_range))
    return _holdout_pairs(records, d.dev_holdout, config.train.seed)


#: SNLI splits that ``snli`` trains on (the shared copy has no train split).
SNLI_TRAIN_SPLITS = ("dev", "test")


def _is_snli(source: str) -> bool:
    return source == "snli" or source.startswith("snli:")


def _snli_pairs(config: RunConfig, source: str) -> list[Pair]:
    """(premise, entailed hypothesis) pairs with label 1.0 (a positive pair), so that they
    can join graded pairs under label-aware masking. ``snli``: dev + test; ``snli:SPLIT``."""
    base = _data_dir(config) or default_data_dir()
    splits = SNLI_TRAIN_SPLITS if source == "snli" else (source[len("snli:"):],)
    return [Pair(p.text1, p.text2, label=1.0) for split in splits
            for p in load_snli_pairs(base / "snli", split)]


def _combined_pairs(config: RunConfig, sources: list[str]) -> tuple[TrainingSet, Any]:
    """Pair sources concatenated in order; every pair labelled or none (else label-aware
    masking would silently turn off)."""
    d = config.data
    if d.kind != "pairs":
        raise ValueError("data.train: a list of sources takes pairs (data.kind: pairs)")
    records: list[Pair] = []
    labelled: dict[str, bool] = {}
    for source in sources:
        if source in ("stsb", "scifact") or source.startswith("beir:"):
            kind, path = task_path(source, _data_dir(config))
            if kind == "sts":
                part = list(load_stsb(path, "train"))
            elif d.dev_holdout > 0:
                raise ValueError(f"data.train: {source} in a list of sources cannot have "
                                 "data.dev_holdout (hold out from a single retrieval source)")
            else:
                part = list(BeirDataset(path).training_pairs("train"))
        elif _is_snli(source):
            part = _snli_pairs(config, source)
        else:
            cols = d.columns or ["sentence1", "sentence2"]
            part = list(load_pairs(Path(source), columns=cols, score_column=d.score_column,
                                   score_range=d.score_range))
        records += part
        labelled[source] = all(p.label is not None for p in part)
    if len(set(labelled.values())) > 1:
        raise ValueError("data.train: some sources have a label on every pair "
                         f"({', '.join(k for k, v in labelled.items() if v)}) and some do not "
                         f"({', '.join(k for k, v in labelled.items() if not v)}); combine "
                         "sources of one kind")
    return _holdout_pairs(records, d.dev_holdout, config.train.seed)


def _holdout_pairs(records: list[Pair], fraction: float, seed: int
                   ) -> tuple[TrainingSet, list[Pair] | None]:
    if fraction <= 0:
        return TrainingSet.from_records(records), None
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(fraction * len(records)))
    held = sorted(order[:cut])
    kept = sorted(order[cut:])
    return (TrainingSet.from_records([records[i] for i in kept]),
            [records[i] for i in held])


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
                seed=config.train.seed).as_dict()
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
    data, holdout = load_training_data(config)
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
    rows.append(f"throughput: {s['pairs_per_second']:.1f} pairs/s over "
                f"{s['train_seconds']:.0f} s of training")
    test = s.get("test")
    if test:
        main = "spearman" if "spearman" in test else "ndcg@10"
        rows.append(f"test ({test['task']} {test['split']}, {test['dtype']}): {main} "
                    f"{float(test[main]):.2f}")
    return "\n".join(rows)
