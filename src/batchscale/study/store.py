"""The results store: one SQLite file (WAL) per sweep or shard.

Tables:

* ``meta``: the sweep's identity (``sweep_hash``), its resolved config, the schema version
  and the package version that created the store;
* ``cells``: every cell of the grid (factors and resolved run config), written up front;
* ``attempts``: one row each time a run starts (a restarted run has several);
* ``runs``: one row per *finished* run: timings, throughput, peak memory, the selected dev
  score, the test score, the run's config and the package version;
* ``curve``: the run's evaluation points (examples, steps, seconds, dev metric, loss, lr);
* ``point_metrics``: every other number of each evaluation point, by name (``dev/pearson``,
  the probe set's geometry ``geometry/neg_cos_var``, ``noise_scale/b_simple``, the loss's
  diagnostics ``loss/weince_mean_lambda``, ``loss/temperature``);
* ``metrics``: every numeric final metric, by split (``dev``: the selected checkpoint's dev
  figures, ``test``: its test figures);
* ``failures``: runs that diverged (NaN / Inf), with the error; such a cell is not finished,
  so a rerun tries it again.

A run is finished exactly when its ``runs`` row exists. That row, its curve and its metrics
are written in one transaction, so a kill at any moment leaves either all of them or none:
at most the run in progress is lost, and a rerun restarts it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, idx INTEGER NOT NULL, loss TEXT NOT NULL,
    loss_name TEXT NOT NULL, vrns_weight REAL NOT NULL, batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL, lr_scaling TEXT NOT NULL, lr_multiplier REAL NOT NULL,
    softmax_batch INTEGER NOT NULL, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, cell_id TEXT NOT NULL REFERENCES cells, started_at TEXT NOT NULL,
    host TEXT, pid INTEGER, resumed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, cell_id TEXT NOT NULL UNIQUE REFERENCES cells,
    started_at TEXT NOT NULL, finished_at TEXT NOT NULL, package_version TEXT NOT NULL,
    host TEXT, device TEXT, metric TEXT NOT NULL, examples INTEGER NOT NULL,
    steps INTEGER NOT NULL, epochs REAL, train_seconds REAL NOT NULL, wall_seconds REAL NOT NULL,
    throughput REAL, peak_memory_mb REAL, memory_kind TEXT, best_dev REAL,
    best_examples INTEGER, last_dev REAL, test REAL, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS curve (
    run_id INTEGER NOT NULL REFERENCES runs, point INTEGER NOT NULL,
    examples INTEGER NOT NULL, steps INTEGER NOT NULL, seconds REAL NOT NULL,
    wall_seconds REAL, dev REAL, train_loss REAL, lr REAL,
    PRIMARY KEY (run_id, point));
CREATE TABLE IF NOT EXISTS point_metrics (
    run_id INTEGER NOT NULL REFERENCES runs, point INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (run_id, point, name));
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY, cell_id TEXT NOT NULL REFERENCES cells, failed_at TEXT NOT NULL,
    error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs, split TEXT NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (run_id, split, name));
"""

_RUN_COLUMNS = ("cell_id", "started_at", "finished_at", "package_version", "host", "device",
                "metric", "examples", "steps", "epochs", "train_seconds", "wall_seconds",
                "throughput", "peak_memory_mb", "memory_kind", "best_dev", "best_examples",
                "last_dev", "test", "config")
_CELL_COLUMNS = ("cell_id", "idx", "loss", "loss_name", "vrns_weight", "batch_size", "seed",
                 "lr_scaling", "lr_multiplier", "softmax_batch", "config")
_CURVE_COLUMNS = ("point", "examples", "steps", "seconds", "wall_seconds", "dev",
                  "train_loss", "lr")


class StoreError(ValueError):
    """A store that cannot be used for this sweep (another sweep's, unreadable, ...)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Store:
    """An open results store. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no such store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable results store ({e})") from None
        version = self.meta("schema_version")
        if version is not None and int(version) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version}, this batchscale reads "
                             f"{SCHEMA_VERSION}")

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta and cells ---------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def all_meta(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT key, value FROM meta")}

    def initialise(self, sweep_hash: str, name: str, resolved: dict[str, Any],
                   package_version: str, cells: Iterable[dict[str, Any]]) -> None:
        """Bind a new store to a sweep, or check that an existing one holds the same sweep
        (then the stored sweep config is updated: report settings may change)."""
        with self.transaction() as db:
            existing = self.check_sweep(sweep_hash)
            values = {"schema_version": str(SCHEMA_VERSION), "sweep_hash": sweep_hash,
                      "sweep_name": name, "sweep_config": json.dumps(resolved, sort_keys=True)}
            if existing is None:
                values["created_at"] = now()
                values["package_version"] = package_version
            for k, v in values.items():
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
            _insert_cells(db, cells)

    def check_sweep(self, sweep_hash: str) -> str | None:
        """The store's grid hash (None: not bound to a sweep yet); StoreError if it holds
        another sweep."""
        existing = self.meta("sweep_hash")
        if existing is not None and existing != sweep_hash:
            raise StoreError(
                f"{self.path}: holds another sweep ({self.meta('sweep_name')!r}, grid hash "
                f"{existing}; this config's grid hash is {sweep_hash}); use another --store, "
                "or the config that made it")
        return existing

    def reused_from(self) -> list[dict[str, Any]]:
        """The stores whose runs ``--reuse`` copied in: store, sweep, grid_hash, runs."""
        return json.loads(self.meta("reused_from") or "[]")

    def finished_cells(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT cell_id FROM runs")}

    def claim(self, cell_id: str, host: str, pid: int, resumed: bool) -> str | None:
        """Record an attempt at ``cell_id`` and return its start time; None (nothing
        recorded) when the cell is finished or its latest attempt is another process's on
        this host that is still alive and has not diverged since. One write transaction, so
        processes sharing the store never run one cell twice. Attempts from other hosts do
        not count as alive (a study moved to another machine resumes there)."""
        started = now()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE cell_id = ?", (cell_id,)).fetchone():
                return None
            last = db.execute("SELECT host, pid, started_at FROM attempts WHERE cell_id = ? "
                              "ORDER BY id DESC LIMIT 1", (cell_id,)).fetchone()
            if last is not None and last["host"] == host and last["pid"] != pid \
                    and _alive(last["pid"], last["started_at"]) \
                    and not db.execute("SELECT 1 FROM failures WHERE cell_id = ? AND "
                                       "failed_at >= ?", (cell_id, last["started_at"])
                                       ).fetchone():  # that attempt diverged: it is over
                return None
            db.execute("INSERT INTO attempts (cell_id, started_at, host, pid, resumed) "
                       "VALUES (?, ?, ?, ?, ?)", (cell_id, started, host, pid, int(resumed)))
        return started

    def first_attempt(self, cell_id: str) -> str | None:
        row = self.db.execute("SELECT MIN(started_at) FROM attempts WHERE cell_id = ?",
                              (cell_id,)).fetchone()
        return row[0]

    def add_failure(self, cell_id: str, error: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO failures (cell_id, failed_at, error) VALUES (?, ?, ?)",
                       (cell_id, now(), error))

    def failures(self) -> list[dict[str, Any]]:
        """Failures of cells that have no finished run, with the cell's factors."""
        rows = self.db.execute(
            "SELECT f.*, c.loss, c.vrns_weight, c.batch_size, c.seed, c.lr_scaling, "
            "c.lr_multiplier, c.softmax_batch "
            "FROM failures f JOIN cells c USING (cell_id) WHERE f.cell_id NOT IN "
            "(SELECT cell_id FROM runs) ORDER BY c.idx, f.id")
        return [dict(r) for r in rows]

    # -- finished runs ----------------------------------------------------------------------
    def add_run(self, run: dict[str, Any], curve: list[dict[str, Any]],
                metrics: dict[str, dict[str, float]]) -> int:
        """Insert a finished run, its curve and its metrics in one transaction."""
        with self.transaction() as db:
            return self._insert_run(db, run, curve, metrics)

    def _insert_run(self, db: sqlite3.Connection, run: dict[str, Any],
                    curve: list[dict[str, Any]], metrics: dict[str, dict[str, float]]) -> int:
        cols = ", ".join(_RUN_COLUMNS)
        marks = ", ".join(f":{c}" for c in _RUN_COLUMNS)
        cur = db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})",
                         {c: run.get(c) for c in _RUN_COLUMNS})
        run_id = int(cur.lastrowid)
        ccols = ", ".join(_CURVE_COLUMNS)
        cmarks = ", ".join(f":{c}" for c in _CURVE_COLUMNS)
        for point in curve:
            db.execute(f"INSERT INTO curve (run_id, {ccols}) VALUES (:run_id, {cmarks})",
                       {"run_id": run_id, **{c: point.get(c) for c in _CURVE_COLUMNS}})
            for name, value in point.get("metrics", {}).items():
                db.execute("INSERT INTO point_metrics (run_id, point, name, value) "
                           "VALUES (?, ?, ?, ?)", (run_id, point["point"], name, float(value)))
        for split, values in metrics.items():
            for name, value in values.items():
                db.execute("INSERT INTO metrics (run_id, split, name, value) VALUES (?, ?, ?, ?)",
                           (run_id, split, name, float(value)))
        return run_id

    def runs(self) -> list[dict[str, Any]]:
        """Finished runs joined with their cell's factors, in grid order."""
        rows = self.db.execute(
            "SELECT r.*, c.idx, c.loss, c.loss_name, c.vrns_weight, c.batch_size, c.seed, "
            "c.lr_scaling, c.lr_multiplier, c.softmax_batch, "
            "(SELECT value FROM metrics m WHERE m.run_id = r.id AND m.split = 'data' "
            "AND m.name = 'pairs') AS data_pairs, "
            "(SELECT value FROM metrics m WHERE m.run_id = r.id AND m.split = 'data' "
            "AND m.name = 'contaminated') AS data_contaminated "
            "FROM runs r JOIN cells c USING (cell_id) ORDER BY c.idx")
        return [dict(r) for r in rows]

    def curve(self, run_id: int) -> list[dict[str, Any]]:
        """The run's points, each with its ``metrics`` (the point_metrics rows by name)."""
        rows = [dict(r) for r in self.db.execute(
            "SELECT * FROM curve WHERE run_id = ? ORDER BY point", (run_id,))]
        extra: dict[int, dict[str, float]] = {}
        for r in self.db.execute("SELECT point, name, value FROM point_metrics "
                                 "WHERE run_id = ?", (run_id,)):
            extra.setdefault(r[0], {})[r[1]] = r[2]
        for r in rows:
            r["metrics"] = extra.get(r["point"], {})
        return rows

    def metrics(self, run_id: int) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.db.execute("SELECT split, name, value FROM metrics WHERE run_id = ?",
                                 (run_id,)):
            out.setdefault(r[0], {})[r[1]] = r[2]
        return out

    def cells(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM cells ORDER BY idx")]


def _alive(pid: int | None, since: str) -> bool:
    """Whether the process ``pid`` that started an attempt at ``since`` still runs on this
    host: the pid exists and (where /proc tells) did not start after ``since`` (else the
    pid was reused, e.g. on a restarted machine)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    started = _process_start(pid)
    return started is None or started <= datetime.fromisoformat(since).timestamp() + 1.0


def _process_start(pid: int) -> float | None:
    """The process's start (Unix seconds) from /proc (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = float(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _open_inputs(inputs: Iterable[str | Path]) -> list[Store]:
    """Open stores to read runs from (merge, reuse): each must exist and hold a sweep. On an
    error the ones already open are closed."""
    sources: list[Store] = []
    try:
        for p in inputs:
            if not Path(p).is_file():
                raise StoreError(f"{p}: no such store")
            s = Store(p, create=False)
            sources.append(s)
            if s.meta("sweep_hash") is None:
                raise StoreError(f"{p}: an empty store (no sweep was started in it)")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def _insert_cells(db: sqlite3.Connection, cells: Iterable[dict[str, Any]]) -> None:
    """Cell rows (their _CELL_COLUMNS) into the store ``db`` writes; one already there stays."""
    for c in cells:
        db.execute(f"INSERT OR IGNORE INTO cells ({', '.join(_CELL_COLUMNS)}) VALUES "
                   f"({', '.join(':' + k for k in _CELL_COLUMNS)})", c)


def _copy_attempts(db: sqlite3.Connection, source: Store, cell_id: str | None = None) -> None:
    """The source's attempts (of one cell, or all) into the store ``db`` writes."""
    where, args = ("WHERE cell_id = ?", (cell_id,)) if cell_id is not None else ("", ())
    for a in source.db.execute("SELECT cell_id, started_at, host, pid, resumed FROM attempts "
                               + where, args):
        db.execute("INSERT INTO attempts (cell_id, started_at, host, pid, resumed) "
                   "VALUES (?, ?, ?, ?, ?)", tuple(a))


def _write_reused(db: sqlite3.Connection, entries: dict[tuple[str, str], dict[str, Any]]) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('reused_from', ?)",
               (json.dumps(sorted(entries.values(), key=lambda e: e["store"])),))


def reuse_runs(target: Store, inputs: Sequence[str | Path], cells: dict[str, str]) -> int:
    """Copy into ``target`` the finished runs of ``inputs`` (stores of any sweep: an earlier
    grid, a pilot) whose cell is one of ``cells`` (cell id -> resolved run config, JSON) and
    not finished in ``target``. A cell id hashes the run's whole resolved config, so such a run
    is the same experiment whatever grid it ran in. A run whose recorded config is not the
    cell's is refused (nothing is copied). Its attempts come along, so the study's
    wall-clock starts at its first start. Returns the number of runs copied."""
    for p in inputs:
        if Path(p).resolve() == target.path.resolve():
            raise StoreError(f"--reuse {p}: that is the sweep's own store")
    sources = _open_inputs(inputs)
    try:
        done = target.finished_cells()
        copied = 0
        with target.transaction() as db:
            for s in sources:
                for run in s.runs():
                    cid = run["cell_id"]
                    if cid not in cells or cid in done:
                        continue
                    if json.loads(run["config"]) != json.loads(cells[cid]):
                        raise StoreError(
                            f"{s.path}: run of cell {cid} has another config than this "
                            "sweep's cell of that id (a store from a batchscale that hashed "
                            "configs differently?); refusing to reuse it")
                    target._insert_run(db, run, s.curve(run["id"]), s.metrics(run["id"]))
                    _copy_attempts(db, s, cid)
                    done.add(cid)
                    copied += 1
            _record_reused(target, db, sources)
        return copied
    finally:
        for s in sources:
            s.close()


def _record_reused(target: Store, db: sqlite3.Connection, sources: list[Store]) -> None:
    """Meta ``reused_from``: per source store, how many of ``target``'s runs are its runs
    (the same cell and start time), counted afresh on every ``--reuse``, so a rerun records
    what an earlier copy did."""
    mine = {(r[0], r[1]) for r in db.execute("SELECT cell_id, started_at FROM runs")}
    entries = {(e["store"], e["grid_hash"]): e for e in target.reused_from()}
    for s in sources:
        n = sum((r[0], r[1]) in mine
                for r in s.db.execute("SELECT cell_id, started_at FROM runs"))
        if n:
            entries[(str(s.path), s.meta("sweep_hash"))] = {
                "store": str(s.path), "sweep": s.meta("sweep_name"),
                "grid_hash": s.meta("sweep_hash"), "runs": n}
    _write_reused(db, entries)


def _merge_reused(db: sqlite3.Connection, target: Store, sources: list[Store]) -> None:
    """The inputs' ``reused_from`` in the merged store: runs summed per source store over the
    inputs (each shard copied its own cells); the target's entries for other stores stay."""
    merged = {(e["store"], e["grid_hash"]): e for e in target.reused_from()}
    summed: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sources:
        for e in s.reused_from():
            key = (e["store"], e["grid_hash"])
            n = summed[key]["runs"] if key in summed else 0
            summed[key] = {**e, "runs": n + e["runs"]}
    merged.update(summed)
    if merged:
        _write_reused(db, merged)


def merge_stores(out: str | Path, inputs: list[str | Path]) -> dict[str, int]:
    """Combine shard stores into ``out`` (new or holding the same sweep). Every input must
    hold the same sweep (same grid hash); a run finished in several inputs is taken once (the
    first). Returns counts: runs added, duplicates skipped."""
    if not inputs:
        raise StoreError("merge: no input stores")
    sources = _open_inputs(inputs)
    try:
        first = sources[0]
        want = first.meta("sweep_hash")
        for s in sources[1:]:
            if s.meta("sweep_hash") != want:
                raise StoreError(
                    f"{s.path}: holds another sweep (grid hash {s.meta('sweep_hash')}, "
                    f"{s.meta('sweep_name')!r}) than {first.path} (grid hash {want}, "
                    f"{first.meta('sweep_name')!r}); refusing to merge")
        added = skipped = 0
        with Store(out) as target:
            have = target.meta("sweep_hash")
            if have is not None and have != want:
                raise StoreError(f"{target.path}: holds another sweep (grid hash {have}); "
                                 f"the inputs have {want}; refusing to merge")
            meta = first.all_meta()
            target.initialise(want or "", meta.get("sweep_name", ""),
                              json.loads(meta["sweep_config"]),
                              meta.get("package_version", ""), first.cells())
            done = target.finished_cells()
            with target.transaction() as db:
                _merge_reused(db, target, sources)
                for s in sources:
                    _insert_cells(db, s.cells())
                    _copy_attempts(db, s)
                    for f in s.db.execute("SELECT cell_id, failed_at, error FROM failures"):
                        db.execute("INSERT INTO failures (cell_id, failed_at, error) "
                                   "VALUES (?, ?, ?)", tuple(f))
                    for run in s.runs():
                        if run["cell_id"] in done:
                            skipped += 1
                            continue
                        target._insert_run(db, run, s.curve(run["id"]), s.metrics(run["id"]))
                        done.add(run["cell_id"])
                        added += 1
        return {"added": added, "skipped": skipped}
    finally:
        for s in sources:
            s.close()
