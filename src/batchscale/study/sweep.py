"""Run a sweep: every cell of the grid (or of one shard) is a training run, recorded in the
results store when it finishes.

Rerunning the same command continues: finished cells (a ``runs`` row) are skipped; a cell
whose run was interrupted is resumed from its last trainer checkpoint when its run directory
holds one for the same config (the trainer's exact resume), else restarted from scratch.
Each run directory lives under the work folder only while the run is in progress (use
``keep_runs`` to keep the selected models).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..training.checkpoint import latest_checkpoint
from ..training.config import dump_config
from ..training.trainer import TrainingDiverged, scalars
from .grid import Cell, Sweep
from .run import train_run
from .store import Store, now, reuse_runs
from .tuning import setting_of, tuned


def default_work_dir(store: Path) -> Path:
    return store.parent / f"{store.stem}-runs"


# -- peak memory ----------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one run: CUDA's peak allocated bytes on a GPU, else the process's peak
    resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` at the start of the
    run; where that is refused, the process's lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "peak_rss"
        except OSError:
            self.kind = "peak_rss_lifetime"

    def stop(self) -> tuple[float | None, str]:
        """(MiB, kind)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, self.kind
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_lifetime"


def _device(cell: Cell) -> torch.device:
    d = cell.config.train.device
    if d:
        return torch.device(d)
    if cell.config.model.name.startswith("static:"):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- one cell -------------------------------------------------------------------------------
def _resumable(run_dir: Path, cell: Cell) -> bool:
    """Whether ``run_dir`` holds a resumable run of this cell (read only)."""
    config = run_dir / "config.yaml"
    return (latest_checkpoint(run_dir / "checkpoints") is not None and config.is_file()
            and config.read_text(encoding="utf-8") == dump_config(cell.config))


def _numbers(d: dict[str, Any] | None) -> dict[str, float]:
    """The numeric entries of a metrics dict (nested and text entries left out)."""
    if not d:
        return {}
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_metrics(report: dict[str, Any] | None) -> dict[str, float]:
    """The training data's counts as store metrics (split ``data``): ``pairs``,
    ``contaminated`` and, per source, ``pairs/SOURCE`` and ``contaminated/SOURCE``."""
    if not report:
        return {}
    out = {"pairs": float(report["pairs"]), "contaminated": float(report["contaminated"])}
    for s in report["sources"]:
        out[f"pairs/{s['source']}"] = out.get(f"pairs/{s['source']}", 0.0) + s["pairs"]
        out[f"contaminated/{s['source']}"] = (out.get(f"contaminated/{s['source']}", 0.0)
                                              + s["contaminated"])
    return out


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _point_metrics(record: dict[str, Any], metric: str) -> dict[str, float]:
    """An evaluation point's numbers besides the dev metric: the other dev figures, the
    probe set's geometry, the noise scale (``dev/...`` nested keys by their own name) and the
    loss's diagnostics (``loss/...``)."""
    dev = {k: v for k, v in record["dev"].items() if k != metric}
    out = dict(scalars({k: v for k, v in dev.items() if not isinstance(v, dict)}, "dev/"))
    out.update(scalars({k: v for k, v in dev.items() if isinstance(v, dict)}))
    out.update(scalars(record.get("loss_diagnostics") or {}, "loss/"))
    return out


def run_cell(store: Store, cell: Cell, work: Path, *, show_progress: bool = False,
             keep_runs: bool = False) -> int | None:
    """Train one cell and record it; returns the run's row id, or None when another live
    process sharing the store holds the cell (or finished it): :meth:`Store.claim`."""
    run_dir = work / cell.id
    resumed = run_dir.is_dir() and _resumable(run_dir, cell)
    started = store.claim(cell.id, socket.gethostname(), os.getpid(), resumed)
    if started is None:
        return None
    if run_dir.is_dir() and not resumed:
        shutil.rmtree(run_dir)
    device = _device(cell)
    memory = PeakMemory(device)
    memory.start()
    t0 = time.perf_counter()
    result = train_run(cell.config, run_dir, resume=resumed, show_progress=show_progress)
    wall = time.perf_counter() - t0
    peak, kind = memory.stop()
    fit, metric = result.fit, cell.config.eval.metric
    curve = [{"point": i, "examples": r["examples"], "steps": r["steps"],
              "seconds": r["seconds"], "wall_seconds": r.get("wall_seconds"),
              "dev": _finite_or_none(r["dev"][metric]), "train_loss": r.get("train_loss"),
              "lr": r.get("lr"), "metrics": _point_metrics(r, metric)}
             for i, r in enumerate(fit.curve)]
    best = next((r for r in fit.curve if r["examples"] == fit.best_examples), None)
    test = result.test or {}
    test_metric = test.get(metric)
    run = {
        "cell_id": cell.id,
        "started_at": store.first_attempt(cell.id) or started,
        "finished_at": now(),
        "package_version": __version__,
        "host": socket.gethostname(),
        "device": str(device),
        "metric": metric,
        "examples": fit.examples,
        "steps": fit.curve[-1]["steps"] if fit.curve else 0,
        "epochs": fit.curve[-1].get("epoch") if fit.curve else None,
        "train_seconds": fit.train_seconds,
        # A resumed run: its seconds before the interruption are in the last curve point.
        "wall_seconds": max(wall, float(fit.curve[-1].get("wall_seconds") or 0.0))
        if fit.curve else wall,
        "throughput": fit.pairs_per_second,
        "peak_memory_mb": peak,
        "memory_kind": kind + ("_resumed" if resumed else ""),
        "best_dev": fit.best_metric,
        "best_examples": fit.best_examples,
        "last_dev": curve[-1]["dev"] if curve else None,
        "test": None if test_metric is None else float(test_metric),
        "config": _config_json(cell),
    }
    metrics = {"dev": _numbers(best["dev"] if best else None), "test": _numbers(test)}
    metrics["test"].pop("seconds", None)
    metrics["data"] = data_metrics(result.summary.get("data"))
    run_id = store.add_run(run, curve, metrics)
    if not keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run_id


# -- the sweep ------------------------------------------------------------------------------
@dataclass
class SweepSummary:
    store: Path
    cells: int
    skipped: int
    ran: int
    failed: int = 0
    #: Cells not run: another lr multiplier won their setting on the first seed.
    not_tuned: int = 0
    #: Cells another process sharing the store ran while this one ran the rest.
    elsewhere: int = 0


def run_sweep(sweep: Sweep, store_path: str | Path, *, work_dir: str | Path | None = None,
              shard: tuple[int, int] | None = None, show_progress: bool = False,
              keep_runs: bool = False, threads: int | None = None,
              reuse: Sequence[str | Path] = (), poll_seconds: float = 30.0,
              log: Callable[[str], None] = print) -> SweepSummary:
    """Run the cells of ``sweep`` (of one shard) not yet finished in the store.

    ``threads``: torch's intra-op threads for the whole sweep (None: torch's default). On a
    small machine shared with other jobs, 1 avoids OpenMP's oversubscription (measured in
    benchmarks/README.md). ``reuse``: stores (of any grid) whose finished runs of this
    sweep's (shard's) cells are taken instead of run again (:func:`reuse_runs`). Processes
    on one host may share a store: each runs the cells no other has claimed
    (:meth:`Store.claim`), then waits (polling every ``poll_seconds``) for those the others
    hold, and takes any they leave unfinished, so that every process ends with the sweep.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    store_path = Path(store_path)
    work = Path(work_dir) if work_dir is not None else default_work_dir(store_path)
    cells = list(sweep.cells) if shard is None else sweep.shard(*shard)
    with Store(store_path) as store:
        store.initialise(sweep.hash, sweep.config.name, sweep.resolved(), __version__,
                         [_cell_row(c) for c in sweep.cells])
        if reuse:
            n = reuse_runs(store, reuse, {c.id: _config_json(c) for c in cells})
            log(f"reused {n} finished runs of {', '.join(map(str, reuse))} (the same "
                "resolved configs)")
        done = store.finished_cells()
        todo = [c for c in cells if c.id not in done]
        plan = _plan(sweep, store, cells)
        where = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
        skipped = (f", {plan.not_run} not to run (another lr multiplier won, or will win, "
                   "their setting on the first seed)") if plan.not_run else ""
        log(f"sweep {sweep.config.name}{where}: {len(cells)} cells, {plan.finished} "
            f"finished already, {len(plan.todo)} to run{skipped}; store {store_path}")
        for c in cells:  # finished before a kill that came ahead of the clean-up
            if c.id in done and not keep_runs and (work / c.id).is_dir():
                shutil.rmtree(work / c.id, ignore_errors=True)
        counts = {"ran": 0, "diverged": 0, "not_tuned": 0}
        said: set[str] = set()

        def once(message: str) -> None:  # a cell waited for is retried at every look
            if message not in said:
                said.add(message)
                log(message)

        gate = _LrGate(sweep, store)
        pending = list(enumerate(todo, 1))
        while pending:
            retry, held = [], False
            for k, cell in pending:
                outcome = _attempt(store, gate, cell, work, f"[{k}/{len(todo)}]",
                                   show_progress, keep_runs, once)
                if outcome in ("held", "choice_open"):
                    retry.append((k, cell))
                    held |= outcome == "held"
                elif outcome != "finished":
                    counts[outcome] += 1
            finished = store.finished_cells()
            pending = [(k, c) for k, c in retry if c.id not in finished]
            if not held:  # a choice still open here is no other process's to make
                counts["not_tuned"] += len(pending)
                break
            if pending:
                once(f"waiting for {len(pending)} cells that another process sharing the "
                     f"store runs (or whose lr it is choosing); looking every {poll_seconds:g} s")
                time.sleep(poll_seconds)
        elsewhere = sum(c.id in store.finished_cells() for c in todo) - counts["ran"]
    return SweepSummary(store_path, len(cells), len(cells) - len(todo), counts["ran"],
                        counts["diverged"], counts["not_tuned"], elsewhere)


def _attempt(store: Store, gate: _LrGate, cell: Cell, work: Path, tag: str,
             show_progress: bool, keep_runs: bool, log: Callable[[str], None]) -> str:
    """Run one cell of the sweep: "ran", "diverged", "not_tuned" (another lr won its
    setting), "choice_open" (its lr is not chosen yet), "held" (another live process holds
    it) or "finished" (another process finished it)."""
    skip = gate.skip(cell)
    if skip is not None:
        log(f"{tag} {cell.label()}: skipped ({skip})")
        return "choice_open" if skip == _LrGate.OPEN else "not_tuned"
    t0 = time.perf_counter()
    try:
        run_id = run_cell(store, cell, work, show_progress=show_progress, keep_runs=keep_runs)
    except TrainingDiverged as e:  # an outcome of the grid (a too-high lr), not a bug
        store.add_failure(cell.id, str(e))
        if not keep_runs:
            shutil.rmtree(work / cell.id, ignore_errors=True)
        log(f"{tag} {cell.label()}: diverged ({e})")
        return "diverged"
    if run_id is None:
        if cell.id in store.finished_cells():
            return "finished"
        log(f"{tag} {cell.label()}: another process sharing the store runs it")
        return "held"
    row = store.db.execute("SELECT best_dev, test FROM runs WHERE id = ?",
                           (run_id,)).fetchone()
    test = "" if row["test"] is None else f", test {row['test']:.2f}"
    log(f"{tag} {cell.label()}: dev {row['best_dev']:.2f}{test} "
        f"({time.perf_counter() - t0:.1f} s)")
    return "ran"


# -- what is left to run ----------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """A cell the sweep would run, with its estimated wall-clock."""

    cell: Cell
    #: Median wall-clock of the store's finished runs of the same loss (with its VRNS
    #: weight) and (B, N), else of the same (B, N); None without either.
    seconds: float | None
    #: Its setting's lr is not chosen yet (first seed unfinished): one of its multipliers
    #: will run, whichever wins; ``cell`` is the first of them.
    pending: bool = False
    #: It diverged before (a rerun retries it).
    retry: bool = False


@dataclass(frozen=True)
class Plan:
    cells: int
    finished: int
    #: Cells a rerun will not run: another multiplier won (or will win) their setting.
    not_run: int
    todo: tuple[PlannedRun, ...]

    @property
    def seconds(self) -> float:
        """The estimated wall-clock of the runs with an estimate, one after another."""
        return sum(r.seconds for r in self.todo if r.seconds is not None)


def _wall_clock(runs: list[dict[str, Any]]) -> Callable[[Cell], float | None]:
    by_arm: dict[tuple, list[float]] = {}
    by_shape: dict[tuple, list[float]] = {}
    for r in runs:
        if r["wall_seconds"] is not None:
            shape = (r["batch_size"], r["softmax_batch"])
            by_arm.setdefault((r["loss"], r["vrns_weight"], *shape), []).append(r["wall_seconds"])
            by_shape.setdefault(shape, []).append(r["wall_seconds"])

    def estimate(c: Cell) -> float | None:
        shape = (c.batch_size, c.softmax_batch)
        xs = by_arm.get((c.loss, c.vrns_weight, *shape)) or by_shape.get(shape)
        return float(statistics.median(xs)) if xs else None

    return estimate


def plan_sweep(sweep: Sweep, store_path: str | Path,
               shard: tuple[int, int] | None = None) -> Plan:
    """What :func:`run_sweep` would run next (of one shard), in its order, with wall-clock
    estimates from the store's finished runs. Reads the store (a missing one is taken as
    empty and not created); runs and writes nothing."""
    cells = list(sweep.cells) if shard is None else sweep.shard(*shard)
    path = Path(store_path)
    with Store(path if path.is_file() else ":memory:") as store:
        store.check_sweep(sweep.hash)
        return _plan(sweep, store, cells)


def _plan(sweep: Sweep, store: Store, cells: list[Cell]) -> Plan:
    done = store.finished_cells()
    diverged = {f["cell_id"] for f in store.failures()}
    estimate = _wall_clock(store.runs())
    gate = _LrGate(sweep, store)
    todo: list[PlannedRun] = []
    waiting: set[tuple] = set()
    for c in cells:
        if c.id in done:
            continue
        skip = gate.skip(c)
        if skip is None:
            todo.append(PlannedRun(c, estimate(c), retry=c.id in diverged))
        elif skip == _LrGate.OPEN and (c.setting, c.seed) not in waiting:
            waiting.add((c.setting, c.seed))
            todo.append(PlannedRun(c, estimate(c), pending=True))
    finished = sum(c.id in done for c in cells)
    return Plan(len(cells), finished, len(cells) - finished - len(todo), tuple(todo))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_text(plan: Plan, name: str, shard: tuple[int, int] | None,
              store: str | Path) -> str:
    """The plan as ``batchscale sweep --plan`` prints it: a summary line, then a line per
    run in the order the sweep takes them."""
    where = "" if shard is None else f"shard {shard[0]}/{shard[1]}; "
    unknown = sum(r.seconds is None for r in plan.todo)
    head = (f"plan of {name} ({where}store {store}): {plan.cells} cells, {plan.finished} "
            f"finished, {plan.not_run} not to run (another lr multiplier won, or will win, "
            f"their setting on the first seed), {len(plan.todo)} to run")
    if plan.todo:
        head += (f": ~{_duration(plan.seconds)} one after another (each run: the median "
                 "wall-clock of the store's finished runs of its loss and (B, N), else of "
                 "its (B, N))")
        if unknown:
            head += f"; {unknown} without an estimate (no finished run of its (B, N))"
    lines = [head]
    for k, r in enumerate(plan.todo, 1):
        label = r.cell.label()
        if r.pending:
            label = (label.rsplit(" lr=", 1)[0]
                     + f" lr={r.cell.lr_scaling} x(the first seed's choice)")
        est = "?" if r.seconds is None else f"~{_duration(r.seconds)}"
        lines.append(f"  {k}. {label}: {est}{' (diverged before; retried)' if r.retry else ''}")
    return "\n".join(lines)


class _LrGate:
    """Under ``lr_tuning: first_seed``, a later seed's cell runs only with the multiplier that
    won its setting on the first seed. Cells are in grid order (seeds outermost), so the first
    seed's cells come first; a cell whose choice is still open (the first seed's cells of its
    setting unfinished, e.g. in another shard) is skipped, and a rerun takes it up."""

    def __init__(self, sweep: Sweep, store: Store) -> None:
        g = sweep.config.grid
        self.active = g.lr_tuning == "first_seed" and len(g.lr_multipliers) > 1
        self.first = g.seeds[0]
        self.store = store
        self.cells = [_cell_row(c) for c in sweep.cells]

    def _choice(self, cell: Cell) -> float | None:
        dev: dict[str, float | None] = {r["cell_id"]: r["best_dev"] for r in self.store.runs()}
        dev.update({f["cell_id"]: None for f in self.store.failures()})
        setting = setting_of(_cell_row(cell))
        same = [c for c in self.cells if setting_of(c) == setting]
        return tuned(same, dev, "first_seed", self.first).get(setting)

    #: The reason :meth:`skip` gives while a setting's lr is still to be chosen.
    OPEN = "its lr is not chosen yet: the first seed's cells of this setting are unfinished"

    def skip(self, cell: Cell) -> str | None:
        """Why ``cell`` is not run now, or None when it runs."""
        if not self.active or cell.seed == self.first:
            return None
        choice = self._choice(cell)
        if choice is None:
            return self.OPEN
        if choice != cell.lr_multiplier:
            return f"seed {self.first} chose lr x{choice:g} for this setting"
        return None


def _config_json(c: Cell) -> str:
    """The cell's resolved run config as the store keeps it (canonical JSON)."""
    return json.dumps(c.config.model_dump(mode="json"), sort_keys=True)


def _cell_row(c: Cell) -> dict[str, Any]:
    return {"cell_id": c.id, "idx": c.index, "loss": c.loss, "loss_name": c.config.loss.name,
            "vrns_weight": c.vrns_weight, "batch_size": c.batch_size, "seed": c.seed,
            "lr_scaling": c.lr_scaling, "lr_multiplier": c.lr_multiplier,
            "softmax_batch": c.softmax_batch,
            "config": _config_json(c)}
