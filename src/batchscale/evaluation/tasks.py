"""Named evaluation tasks, as the CLI runs them: ``stsb``, ``scifact``, ``beir:PATH``."""

from __future__ import annotations

import os
import time
from pathlib import Path

DATA_ENV = "BATCHSCALE_DATA"


def default_data_dir() -> Path:
    """Where the shared data sets live: ``$BATCHSCALE_DATA``, else ``../shared/data`` beside
    the working directory or beside this checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    candidates = [Path.cwd() / ".." / "shared" / "data",
                  Path(__file__).resolve().parents[3] / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(f"no data folder: set {DATA_ENV} or pass --data-dir "
                            f"(looked in {', '.join(str(c) for c in candidates)})")


def task_path(task: str, data_dir: Path | None) -> tuple[str, Path]:
    """(kind, path): kind 'sts' or 'retrieval'."""
    if task.startswith("beir:"):
        return "retrieval", Path(task[len("beir:"):])
    base = data_dir if data_dir is not None else default_data_dir()
    if task == "stsb":
        return "sts", base / "stsbenchmark"
    if task == "scifact":
        return "retrieval", base / "scifact"
    raise ValueError(f"unknown task {task!r}: stsb, scifact or beir:PATH")


def run_task(encoder, task: str, split: str = "test", *, data_dir: Path | None = None,
             batch_size: int = 256, max_length: int | None = None,
             show_progress: bool = True) -> dict[str, object]:
    """Evaluate ``encoder`` on ``task``; the metrics (0-100 scale) plus task, split, model."""
    from ..data import BeirDataset, load_stsb
    from .retrieval import evaluate_retrieval
    from .sts import evaluate_sts

    kind, path = task_path(task, data_dir)
    t0 = time.perf_counter()
    if kind == "sts":
        metrics: dict[str, object] = dict(evaluate_sts(
            encoder, load_stsb(path, split), batch_size=batch_size, max_length=max_length,
            show_progress=show_progress))
    else:
        metrics = dict(evaluate_retrieval(
            encoder, BeirDataset(path), split, batch_size=batch_size, max_length=max_length,
            show_progress=show_progress))
    metrics["seconds"] = time.perf_counter() - t0
    dtype = str(next(encoder.parameters()).dtype).removeprefix("torch.")
    return {"task": task, "split": split, "model": encoder.name, "dtype": dtype, **metrics}
