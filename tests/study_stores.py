"""Small results stores filled by hand (no training): every score is given by the test, so
the report's numbers can be checked against an independent computation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from batchscale.study.store import Store

#: (loss, batch size, seed) or (loss, batch size, seed, softmax block N) -> (dev, test)
Scores = dict[tuple, tuple[float, float]]
START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def make_store(path: Path, scores: Scores, *, name: str = "tiny",
               report: dict | None = None, wall_seconds: float = 4.0,
               grid: dict | None = None) -> Path:
    """One finished run per key of ``scores``, each starting ``wall_seconds`` after the last
    one finished; its curve rises to the dev score at its last point. ``grid``: more fields of
    the sweep's grid (e.g. ``vrns_weights``)."""
    losses = list(dict.fromkeys(k[0] for k in scores))
    resolved = {"name": name, "base": {"eval": {"metric": "spearman"}},
                "grid": {"losses": {x: {"name": x} for x in losses},
                         "seeds": sorted({k[2] for k in scores}), **(grid or {})},
                "report": report or {}}
    keys = sorted(scores, key=lambda k: (k[2], k[0], k[1], *k[3:]))
    cells = [{"cell_id": f"c{i}", "idx": i, "loss": k[0], "loss_name": k[0],
              "vrns_weight": 0.0, "batch_size": k[1], "seed": k[2], "lr_scaling": "none",
              "lr_multiplier": 1.0, "softmax_batch": k[3] if len(k) > 3 else k[1],
              "config": "{}"} for i, k in enumerate(keys)]
    with Store(path) as s:
        s.initialise("h-" + name, name, resolved, "0.1.0", cells)
        t = START
        for c, key in zip(cells, keys, strict=True):
            dev, test = scores[key]
            b = c["batch_size"]
            curve = [{"point": k, "examples": b * 4 * k, "steps": 4 * k, "seconds": float(k),
                      "dev": dev - (3 - k) ** 2, "train_loss": None, "lr": None}
                     for k in range(4)]
            end = t + timedelta(seconds=wall_seconds)
            s.add_run({"cell_id": c["cell_id"], "started_at": t.isoformat(),
                       "finished_at": end.isoformat(), "package_version": "0.1.0",
                       "host": "testhost", "device": "cpu", "metric": "spearman",
                       "examples": b * 12, "steps": 12, "train_seconds": wall_seconds - 1,
                       "wall_seconds": wall_seconds, "throughput": 100.0,
                       "peak_memory_mb": 10.0, "memory_kind": "peak_rss", "best_dev": dev,
                       "best_examples": b * 12, "last_dev": dev, "test": test,
                       "config": "{}"}, curve, {"dev": {"spearman": dev},
                                                "test": {"spearman": test}})
            t = end + timedelta(seconds=wall_seconds)
    return path
