"""Shipping a study's results: ``results/<study>/`` with the report, the store and provenance.

:func:`ship` writes into one folder:

* the report (``report.md``, ``report.html``, ``report.json``, ``plots/``), exactly as
  ``batchscale report STORE --out FOLDER`` writes it (a function of the store alone, so
  ``batchscale report FOLDER/study.sqlite --out FOLDER`` reproduces it byte for byte);
* ``study.sqlite``: a consistent copy of the store (SQLite's backup API: the WAL's
  transactions included) when it is under ``max_store_mb``, else ``STORE-NOT-INCLUDED.md``
  saying how large it was and where it lives;
* ``sweep.yaml``: the store's resolved sweep config (base inlined), and whether it
  re-expands to the store's grid hash (then ``batchscale sweep sweep.yaml`` reruns the study);
* ``provenance.json`` and ``MANIFEST.md``: the commands that produced the store and the
  report, the package versions recorded in the store, the runs' hosts and devices, the
  study's wall-clock (the sum of the runs' wall seconds, and first start to last finish),
  and the machine this command ran on (CPU, cores, RAM, OS, Python, torch, transformers,
  sentence-transformers, matplotlib, GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..training.checkpoint import TMP_PREFIX, atomic_write_text
from .report import shipped_answer_quote, write_report
from .store import Store, StoreError

#: A store up to this size is copied into the results folder (GitHub warns at 50 MB).
MAX_STORE_MB = 20.0
STORE_NAME = "study.sqlite"
MISSING_STORE = "STORE-NOT-INCLUDED.md"
PACKAGES = ("torch", "transformers", "sentence-transformers", "numpy", "scipy", "matplotlib")


@dataclass(frozen=True)
class Shipped:
    folder: Path
    report: Path
    store: Path | None
    manifest: Path


# -- the store -------------------------------------------------------------------------------
def store_bytes(path: Path) -> int:
    """The store's size as SQLite counts it (its pages, the WAL's committed ones included).
    Through :class:`Store`: a read-only connection to a WAL database would leave its -wal
    and -shm files behind."""
    with Store(path, create=False) as store:
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        size = store.db.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def copy_store(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API, written to a temporary and renamed; the
    copy stays in WAL mode, as :class:`Store` opens it (so opening it changes no byte)."""
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    target = sqlite3.connect(tmp)
    try:
        with Store(src, create=False) as source:
            source.db.backup(target)
        target.execute("PRAGMA journal_mode=WAL")
    finally:
        target.close()
    for extra in ("-wal", "-shm"):
        Path(f"{tmp}{extra}").unlink(missing_ok=True)
    os.replace(tmp, dst)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- what the store records -------------------------------------------------------------------
def study_record(store_path: Path) -> dict[str, Any]:
    """The store's identity, versions, hosts, devices and wall-clock."""
    with Store(store_path, create=False) as store:
        meta = store.all_meta()
        if "sweep_config" not in meta:
            raise StoreError(f"{store_path}: an empty store (no sweep was started in it)")
        db = store.db
        runs, wall, train, first, last = db.execute(
            "SELECT COUNT(*), SUM(wall_seconds), SUM(train_seconds), MIN(started_at), "
            "MAX(finished_at) FROM runs").fetchone()
        ends = [(datetime.fromisoformat(f).timestamp(), w)
                for f, w in db.execute("SELECT finished_at, wall_seconds FROM runs")]
        distinct = {col: sorted({r[0] for r in db.execute(f"SELECT DISTINCT {col} FROM runs")
                                 if r[0] is not None})
                    for col in ("package_version", "host", "device")}
        reused = store.reused_from()
        cells = db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
        failures = db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
    return {"name": meta.get("sweep_name"), "sweep_hash": meta.get("sweep_hash"),
            "created_at": meta.get("created_at"),
            "package_version_at_creation": meta.get("package_version"),
            "package_versions_of_runs": distinct["package_version"],
            "hosts": distinct["host"], "devices": distinct["device"],
            "cells": cells, "finished_runs": runs, "failures": failures, "reused_from": reused,
            "wall_clock": wall_clock(wall, train, first, last,
                                     [(end - w, end) for end, w in ends]),
            "sweep_config": json.loads(meta["sweep_config"])}


def wall_clock(wall: float | None, train: float | None, first: str | None,
               last: str | None, spans: list[tuple[float, float]]) -> dict[str, Any]:
    span = None
    if first and last:
        span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return {"sum_run_wall_seconds": wall, "sum_run_train_seconds": train,
            "first_start": first, "last_finish": last, "first_start_to_last_finish_seconds": span,
            "busy_seconds": busy_seconds(spans) if spans else None}


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the runs' (start, end) spans: the time with a run in
    progress, which leaves out the gaps between sessions of a study that spans several. A
    run's span is its last ``wall_seconds`` before it finished (a resumed run's seconds before
    the interruption are counted as if they came just before the rest)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def grid_check(resolved: dict[str, Any], want: str | None) -> dict[str, Any]:
    """Does the stored sweep config re-expand to the store's grid hash?"""
    from ..training.config import ConfigError
    from .grid import sweep_from_dict

    try:
        got = sweep_from_dict(resolved, "sweep.yaml").hash
    except (ConfigError, ValueError, OSError) as e:
        return {"reproduces_grid_hash": False, "error": str(e).splitlines()[0]}
    return {"reproduces_grid_hash": got == want, "grid_hash": got}


# -- this machine ----------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """The machine this runs on: CPU, cores, RAM, OS, Python, library versions, GPUs."""
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "ram_gib": ram_gib(),
            "os": platform.platform(), "python": platform.python_version(),
            "packages": {"batchscale": __version__, **{p: package_version(p)
                                                       for p in PACKAGES}},
            "gpus": gpus()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda})
    return out


# -- the manifest ----------------------------------------------------------------------------
def shown(path: Path) -> str:
    """A path as a command line should show it: relative to the working directory when it
    lies under it (no absolute paths of this machine in the results), else as given."""
    full, cwd = path.resolve(), Path.cwd().resolve()
    return full.relative_to(cwd).as_posix() if full.is_relative_to(cwd) else path.as_posix()


def commands(store: Path, folder: Path, shipped_store: bool,
             sweep_commands: list[str] | None, grid: dict[str, Any],
             max_store_mb: float) -> dict[str, Any]:
    f = shown(folder)
    ship_args = ["batchscale", "ship", shown(store), "--out", f]
    for c in sweep_commands or []:
        ship_args += ["--sweep-command", c]
    if max_store_mb != MAX_STORE_MB:
        ship_args += ["--max-store-mb", f"{max_store_mb:g}"]
    rerun = f"batchscale sweep {f}/sweep.yaml --store STORE"
    return {
        "sweep": sweep_commands or None,
        "sweep_note": None if sweep_commands else (
            "the commands that filled the store were not given (batchscale ship "
            "--sweep-command); " + (f"`{rerun}` reruns the same grid"
                                    if grid.get("reproduces_grid_hash") else
                                    "sweep.yaml does not re-expand to the store's grid")),
        "ship": shlex.join(ship_args),
        "report": (f"batchscale report {f}/{STORE_NAME} --out {f}" if shipped_store else
                   f"batchscale report {shown(store)} --out {f}"),
    }


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"


def _reused_lines(reused: list[dict[str, Any]]) -> list[str]:
    if not reused:
        return []
    parts = [f"{e['runs']} from `{e['store']}` (sweep `{e['sweep']}`, grid hash "
             f"`{e['grid_hash']}`)" for e in reused]
    return [f"- runs reused from other stores (`batchscale sweep --reuse`: the same resolved "
            f"configs, run earlier under another grid): {'; '.join(parts)}"]


def manifest_markdown(p: dict[str, Any]) -> str:
    s, m, c = p["study"], p["machine"], p["commands"]
    w = s["wall_clock"]
    lines = [f"# Results: {s['name']}", "",
             "The report (`report.md`, `report.html`, `report.json`, `plots/`) is a function of "
             "the store alone; the report command below regenerates it byte for byte.", "",
             "## Commands", ""]
    if c["sweep"]:
        lines += ["The store:", "", "```bash", *c["sweep"], "```", ""]
    else:
        lines += [f"The store: {c['sweep_note']}.", ""]
    lines += ["The report (from the shipped store):" if p["store"]["included"] else
              "The report:", "", "```bash", c["report"], "```", "",
              "This folder:", "", "```bash", c["ship"], "```", "", "## Study", "",
              f"- sweep `{s['name']}`, grid hash `{s['sweep_hash']}`, store created "
              f"{s['created_at']}; sweep.yaml re-expands to the grid hash: "
              f"{'yes' if p['grid']['reproduces_grid_hash'] else 'no'}",
              f"- {s['finished_runs']} finished runs of {s['cells']} cells; "
              f"{s['failures']} diverged attempts recorded",
              f"- batchscale version at creation {s['package_version_at_creation']}; of the "
              f"runs: {', '.join(s['package_versions_of_runs']) or 'n/a'}",
              f"- hosts {', '.join(s['hosts']) or 'n/a'}; devices "
              f"{', '.join(s['devices']) or 'n/a'}",
              f"- wall-clock: the runs' wall seconds sum to {_hours(w['sum_run_wall_seconds'])} "
              f"(training {_hours(w['sum_run_train_seconds'])}); first start "
              f"{w['first_start']} to last finish {w['last_finish']}: "
              f"{_hours(w['first_start_to_last_finish_seconds'])}, of which "
              f"{_hours(w.get('busy_seconds'))} with a run in progress (the rest: none running, "
              "e.g. between sessions)",
              *_reused_lines(s.get("reused_from") or []),
              f"- store: {p['store']['note']}", "",
              "## Machine (where `batchscale ship` ran; the runs' hosts are above)", "",
              f"- CPU {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gib']} GiB RAM",
              f"- {m['os']}, Python {m['python']}",
              "- " + ", ".join(f"{k} {v or 'not installed'}" for k, v in m["packages"].items()),
              "- GPU: " + ("; ".join(f"{g['name']} ({g['memory_gib']} GiB, CUDA {g['cuda']})"
                                     for g in m["gpus"]) or "none"), ""]
    return "\n".join(lines)


# -- all of it -------------------------------------------------------------------------------
def ship(store_path: str | Path, folder: str | Path | None = None, *,
         sweep_commands: list[str] | None = None,
         max_store_mb: float = MAX_STORE_MB) -> Shipped:
    """Write the study's results folder (default ``results/<sweep name>``; see the module
    docstring)."""
    store_path = Path(store_path)
    study = study_record(store_path)
    folder = Path(folder) if folder is not None else Path("results") / str(study["name"])
    folder.mkdir(parents=True, exist_ok=True)
    md, _ = write_report(store_path, folder)
    size = store_bytes(store_path)
    target = folder / STORE_NAME
    included = size <= max_store_mb * 2**20
    if included:
        if not (target.exists() and target.resolve() == store_path.resolve()):
            copy_store(store_path, target)
        (folder / MISSING_STORE).unlink(missing_ok=True)
        note = f"{STORE_NAME} ({size / 2**20:.2f} MiB, sha256 {sha256(target)})"
    else:
        note = (f"not included: {size / 2**20:.1f} MiB is over the {max_store_mb:g} MiB limit; "
                f"it lives at {shown(store_path)}")
        atomic_write_text(folder / MISSING_STORE, f"# The store is not included\n\n{note}.\n")
        if target.exists() and target.resolve() != store_path.resolve():
            target.unlink()
    resolved = study.pop("sweep_config")
    atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(resolved, sort_keys=True))
    grid = grid_check(resolved, study["sweep_hash"])
    provenance = {"study": study, "store": {"included": included, "bytes": size, "note": note},
                  "grid": grid,
                  "commands": commands(store_path, folder, included, sweep_commands, grid,
                                       max_store_mb),
                  "machine": machine()}
    atomic_write_text(folder / "provenance.json", json.dumps(provenance, indent=1) + "\n")
    manifest = folder / "MANIFEST.md"
    atomic_write_text(manifest, manifest_markdown(provenance))
    return Shipped(folder, md, target if included else None, manifest)


def quote(folder: Path) -> str:
    return shipped_answer_quote(folder, shown(folder))
