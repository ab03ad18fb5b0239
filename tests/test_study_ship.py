"""`batchscale ship`: results/<study>/ with the report, a copy of the store (or a note), the
resolved sweep config and the provenance; its report command regenerates the report byte for
byte; the figures of the provenance recomputed from the store's rows."""

from __future__ import annotations

import hashlib
import json
import shlex
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from batchscale.cli import main
from batchscale.study.report import REPORT_FILES, shipped_answer_quote
from batchscale.study.ship import MISSING_STORE, STORE_NAME, ship
from study_stores import make_store
from test_report_reproducible import files
from test_study_reach import scores


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "src" / "study.sqlite", scores(), name="tiny-study",
                      wall_seconds=5.0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ship_writes_report_store_and_provenance(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ship", "src/study.sqlite", "--sweep-command",
                 "batchscale sweep s.yaml --store src/study.sqlite"]) == 0
    out = Path("results/tiny-study")
    printed = capsys.readouterr().out
    assert printed.rstrip("\n").endswith(shipped_answer_quote(out))
    assert {*REPORT_FILES, STORE_NAME, "sweep.yaml", "provenance.json", "MANIFEST.md"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / MISSING_STORE).exists()
    assert [p.name for p in store.parent.iterdir()] == ["study.sqlite"]  # no -wal / -shm left
    prov = json.loads((out / "provenance.json").read_text())

    # the store's copy holds the same runs, and the provenance names its hash
    copy, original = (sqlite3.connect(p) for p in (out / STORE_NAME, store))
    q = "SELECT cell_id, best_dev, test, started_at FROM runs ORDER BY cell_id"
    assert copy.execute(q).fetchall() == original.execute(q).fetchall()
    rows = original.execute("SELECT wall_seconds, started_at, finished_at FROM runs").fetchall()
    copy.close()
    original.close()
    assert _sha(out / STORE_NAME) in prov["store"]["note"] and prov["store"]["included"]

    # the wall-clock, from the rows
    w = prov["study"]["wall_clock"]
    assert w["sum_run_wall_seconds"] == pytest.approx(sum(r[0] for r in rows)) == 5.0 * 15
    first, last = min(r[1] for r in rows), max(r[2] for r in rows)
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    assert (w["first_start"], w["last_finish"]) == (first, last)
    assert w["first_start_to_last_finish_seconds"] == pytest.approx(span) == 5.0 * (2 * 15 - 1)
    assert w["busy_seconds"] == pytest.approx(5.0 * 15)  # a 5 s gap after each 5 s run
    assert prov["study"]["hosts"] == ["testhost"] and prov["study"]["devices"] == ["cpu"]
    assert prov["study"]["package_versions_of_runs"] == ["0.1.0"]
    m = prov["machine"]
    assert m["logical_cores"] >= 1 and m["python"] and m["packages"]["torch"]
    assert prov["commands"]["sweep"] == ["batchscale sweep s.yaml --store src/study.sqlite"]
    text = (out / "MANIFEST.md").read_text()
    assert "batchscale sweep s.yaml --store src/study.sqlite" in text
    assert "75 s" in text and str(tmp_path) not in text  # no absolute paths
    assert "of which 75 s (0.02 h) with a run in progress" in text
    assert "reused" not in text and prov["study"]["reused_from"] == []


    # the manifest's report command regenerates the report from the shipped store
    before, store_sha = files(out), _sha(out / STORE_NAME)
    cmd = prov["commands"]["report"]
    assert cmd == "batchscale report results/tiny-study/study.sqlite --out results/tiny-study"
    for f in REPORT_FILES:
        (out / f).unlink()
    assert main(shlex.split(cmd)[1:]) == 0
    assert files(out) == before
    assert _sha(out / STORE_NAME) == store_sha  # reading the shipped store changes no byte


def test_a_large_store_is_not_copied_but_named(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = ship(Path("src/study.sqlite"), Path("out"), max_store_mb=0.01)
    assert shipped.store is None and not (tmp_path / "out" / STORE_NAME).exists()
    assert [p.name for p in store.parent.iterdir()] == ["study.sqlite"]  # no -wal / -shm left
    note = (tmp_path / "out" / MISSING_STORE).read_text()
    assert "over the 0.01 MiB limit" in note and "src/study.sqlite" in note
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert not prov["store"]["included"]
    assert prov["commands"]["report"] == "batchscale report src/study.sqlite --out out"
    # the hand-built store's config is no real sweep: said, not claimed to rerun
    assert not prov["grid"]["reproduces_grid_hash"]
    assert "sweep.yaml does not re-expand" in prov["commands"]["sweep_note"]


def test_sweep_yaml_is_the_stored_config(store, tmp_path):
    import yaml

    ship(store, tmp_path / "out")
    stored = sqlite3.connect(store).execute(
        "SELECT value FROM meta WHERE key = 'sweep_config'").fetchone()[0]
    assert yaml.safe_load((tmp_path / "out" / "sweep.yaml").read_text()) == json.loads(stored)


def test_ship_errors_name_the_store(tmp_path, capsys):
    assert main(["ship", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o")]) == 1
    assert f"{tmp_path / 'none.sqlite'}: no such store" in capsys.readouterr().err
    assert main(["ship", str(tmp_path / "x.sqlite"), "--max-store-mb", "-1"]) == 1
    assert "--max-store-mb must be >= 0" in capsys.readouterr().err


def test_busy_time_is_the_length_of_the_union_of_the_runs_spans():
    """Against a brute force: integer spans (two shards overlapping, gaps between sessions),
    the union's length counted one unit second at a time."""
    import random

    from batchscale.study.ship import busy_seconds

    rng = random.Random(0)
    for _ in range(200):
        spans = []
        for _ in range(rng.randint(1, 12)):
            a = rng.randint(0, 100)
            spans.append((float(a), float(a + rng.randint(0, 30))))
        covered = {t for a, b in spans for t in range(int(a), int(b))}
        assert busy_seconds(spans) == len(covered)


def test_the_manifest_names_the_stores_whose_runs_were_reused(store, tmp_path, monkeypatch):
    from batchscale.study.store import Store

    reused = [{"store": "runs/old/shard-0.sqlite", "sweep": "old", "grid_hash": "abc", "runs": 3},
              {"store": "runs/pilot.sqlite", "sweep": "pilot", "grid_hash": "def", "runs": 1}]
    with Store(store) as s, s.transaction() as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('reused_from', ?)",
                   (json.dumps(reused),))
    monkeypatch.chdir(tmp_path)
    assert main(["ship", "src/study.sqlite"]) == 0
    out = Path("results/tiny-study")
    assert json.loads((out / "provenance.json").read_text())["study"]["reused_from"] == reused
    assert ("- runs reused from other stores (`batchscale sweep --reuse`: the same resolved "
            "configs, run earlier under another grid): 3 from `runs/old/shard-0.sqlite` (sweep "
            "`old`, grid hash `abc`); 1 from `runs/pilot.sqlite` (sweep `pilot`, grid hash "
            "`def`)") in (out / "MANIFEST.md").read_text()
