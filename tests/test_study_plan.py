"""`batchscale sweep --plan`: what a rerun would still run, in order, with wall-clock
estimates from the store's finished runs. Stores are filled by hand (no training), so every
expected number is given here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from batchscale.cli import main
from batchscale.study.grid import sweep_from_dict
from batchscale.study.store import Store
from batchscale.study.sweep import _cell_row, plan_sweep
from test_study import _sweep_dict, _write, data_dir, tiny_static  # noqa: F401


def _finish(store: Store, cell, wall: float, dev: float) -> None:
    """Record a finished run of ``cell`` that took ``wall`` seconds and scored ``dev``."""
    b = cell.batch_size
    store.add_run({"cell_id": cell.id, "started_at": "2026-01-01T00:00:00+00:00",
                   "finished_at": "2026-01-01T01:00:00+00:00", "package_version": "0.1.0",
                   "host": "testhost", "device": "cpu", "metric": "spearman",
                   "examples": 192, "steps": 192 // b, "train_seconds": wall - 1,
                   "wall_seconds": wall, "throughput": 1.0, "peak_memory_mb": 1.0,
                   "memory_kind": "peak_rss", "best_dev": dev, "best_examples": 192,
                   "last_dev": dev, "test": 50.0, "config": "{}"},
                  [{"point": 0, "examples": 0, "steps": 0, "seconds": 0.0, "dev": dev,
                    "train_loss": None, "lr": None}], {"dev": {"spearman": dev}})


@pytest.fixture
def tuned_sweep(tiny_static, data_dir):  # noqa: F811
    """InfoNCE at B = 8, 32, seeds 0-2, lr x0.5 / x1 chosen on seed 0: 12 cells."""
    raw = _sweep_dict(tiny_static, data_dir, batch_sizes=[8, 32], seeds=[0, 1, 2],
                      losses={"infonce": {"name": "infonce"}}, lr_multipliers=[0.5, 1],
                      lr_tuning="first_seed")
    return sweep_from_dict(raw)


def test_the_plan_lists_what_a_rerun_runs_with_the_median_wall_clock(tuned_sweep, tmp_path):
    """Seed 0 chose x1 at B = 8 (dev 75 over 70); at B = 32 only x0.5 finished, so seeds 1
    and 2 wait for the choice there (one run each, whichever multiplier wins). Seed 1 ran at
    B = 8; seed 2's B = 8 run diverged (a rerun retries it)."""
    sweep = tuned_sweep
    cell = {(c.seed, c.batch_size, c.lr_multiplier): c for c in sweep.cells}
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.initialise(sweep.hash, sweep.config.name, sweep.resolved(), "0.1.0",
                         [_cell_row(c) for c in sweep.cells])
        _finish(store, cell[0, 8, 0.5], 100.0, 70.0)
        _finish(store, cell[0, 8, 1.0], 120.0, 75.0)
        _finish(store, cell[0, 32, 0.5], 50.0, 60.0)
        _finish(store, cell[1, 8, 1.0], 110.0, 74.0)
        store.add_failure(cell[2, 8, 1.0].id, "loss is nan")
    plan = plan_sweep(sweep, path)
    got = [(r.cell.id, r.seconds, r.pending, r.retry) for r in plan.todo]
    want = [(cell[0, 32, 1.0].id, 50.0, False, False),   # B = 32's only finished run: 50 s
            (cell[1, 32, 0.5].id, 50.0, True, False),    # the first of its multipliers
            (cell[2, 32, 0.5].id, 50.0, True, False),
            (cell[2, 8, 1.0].id, 110.0, False, True)]    # median of 100, 120, 110
    assert got == want
    # in the sweep's order: seeds outermost, then multipliers, then batch sizes
    assert (plan.cells, plan.finished, plan.not_run) == (12, 4, 4)
    assert plan.seconds == 260.0


def test_the_cli_prints_the_plan_and_runs_nothing(tiny_static, data_dir, tmp_path,  # noqa: F811
                                                  capsys):
    raw = _sweep_dict(tiny_static, data_dir, batch_sizes=[8], seeds=[0],
                      losses={"infonce": {"name": "infonce"}, "weince": {"name": "weince"}})
    config = _write(tmp_path / "two.yaml", raw)
    sweep = sweep_from_dict(raw)
    store = tmp_path / "none-yet.sqlite"
    assert main(["sweep", str(config), "--store", str(store), "--plan"]) == 0
    assert not store.exists()  # a missing store is taken as empty, not created
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("2 cells, 0 finished, 0 not to run (another lr multiplier won, or "
                           "will win, their setting on the first seed), 2 to run: ~0 s one "
                           "after another (each run: the median wall-clock of the store's "
                           "finished runs of its loss and (B, N), else of its (B, N)); 2 "
                           "without an estimate (no finished run of its (B, N))")
    assert out[1:] == ["  1. infonce B=8 seed=0 lr=none: ?", "  2. weince B=8 seed=0 lr=none: ?"]

    # InfoNCE finished in 42 s: WEINCE, with no run of its own, is estimated from its (B, N)
    with Store(store) as s:
        s.initialise(sweep.hash, sweep.config.name, sweep.resolved(), "0.1.0",
                     [_cell_row(c) for c in sweep.cells])
        _finish(s, next(c for c in sweep.cells if c.loss == "infonce"), 42.0, 70.0)
    assert main(["sweep", str(config), "--store", str(store), "--plan"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "2 cells, 1 finished" in out[0] and "1 to run: ~42 s one after" in out[0]
    assert out[1:] == ["  1. weince B=8 seed=0 lr=none: ~42 s"]

    # a store of another sweep is refused, naming it
    other = _write(tmp_path / "other.yaml", {**raw, "budget": {"examples": 64}})
    assert main(["sweep", str(other), "--store", str(store), "--plan"]) == 1
    assert "holds another sweep" in capsys.readouterr().err



# -- processes sharing one store -------------------------------------------------------------
def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_cell_held_by_a_live_process_on_this_host_is_not_claimed(tmp_path):
    """The claim is the cell's latest attempt: refused while its process runs on this host
    (and has not recorded a divergence since), granted once it is gone, when the pid was
    reused by a process that started later, when the attempt is another host's, and never
    once the cell is finished."""
    from study_stores import make_store

    path = make_store(tmp_path / "s.sqlite", {("infonce", 16, 0): (80.0, 70.0)})
    host, me = socket.gethostname(), os.getpid()
    with Store(path) as store:
        for cid in ("a", "b", "c", "d"):
            store.db.execute("INSERT INTO cells (cell_id, idx, loss, loss_name, vrns_weight, "
                             "batch_size, seed, lr_scaling, lr_multiplier, softmax_batch, "
                             "config) VALUES (?, 9, 'x', 'x', 0, 4, 0, 'none', 1, 4, '{}')",
                             (cid,))
        other = _sleeper()
        try:
            assert store.claim("a", host, other.pid, False) is not None
            assert store.claim("a", host, me, False) is None      # held: it runs
            assert store.claim("a", "elsewhere", me, False) is not None  # not this host's
            assert store.claim("b", "elsewhere", other.pid, False) is not None
            assert store.claim("b", host, me, False) is not None  # another host's attempt
            assert store.claim("c", host, other.pid, False) is not None
            assert store.claim("d", host, other.pid, False) is not None
            store.add_failure("d", "loss is nan")  # the live process's attempt diverged
            assert store.claim("d", host, me, False) is not None
        finally:
            other.kill()
            other.wait()
        assert store.claim("c", host, me, False) is not None      # its process is gone
        # pid 1 runs, but started after this attempt: the pid was reused
        store.db.execute("INSERT INTO attempts (cell_id, started_at, host, pid, resumed) "
                         "VALUES ('c', '1999-01-01T00:00:00+00:00', ?, 1, 0)", (host,))
        assert store.claim("c", host, me, False) is not None
        assert store.claim("c0", host, me, False) is None         # finished (make_store)
        rows = store.db.execute("SELECT cell_id, pid FROM attempts WHERE cell_id != 'c0' "
                                "ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [
        ("a", other.pid), ("a", me), ("b", other.pid), ("b", me), ("c", other.pid),
        ("d", other.pid), ("d", me), ("c", me), ("c", 1), ("c", me)]


def test_two_processes_sharing_a_store_run_every_cell_once(tiny_static, data_dir,  # noqa: F811
                                                           tmp_path):
    raw = _sweep_dict(tiny_static, data_dir, seeds=[0, 1, 2])  # 2 losses x 2 B x 3 seeds
    config = _write(tmp_path / "tiny.yaml", raw)
    store = tmp_path / "shared.sqlite"
    cmd = [sys.executable, "-m", "batchscale.cli", "sweep", str(config), "--store", str(store),
           "--threads", "1"]
    procs = [subprocess.Popen([*cmd, "--work", str(tmp_path / f"work-{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with Store(store) as s:
        runs = s.runs()
        attempts = [r[0] for r in s.db.execute("SELECT cell_id FROM attempts")]
    cells = sweep_from_dict(raw).cells
    assert len(cells) == 12
    assert sorted(r["cell_id"] for r in runs) == sorted(c.id for c in cells)
    assert sorted(attempts) == sorted(c.id for c in cells)  # one attempt each: none run twice
    ran = [int(o.strip().splitlines()[-1].split(" runs done")[0]) for o in outs]
    assert sum(ran) == 12, ran


def test_a_plan_piped_into_a_reader_that_left_ends_quietly(tiny_static, data_dir,  # noqa: F811
                                                           tmp_path):
    """`batchscale sweep ... --plan | head -1`: the pipe's reader is gone before the plan is
    written; the command exits 1 without a traceback."""
    config = _write(tmp_path / "tiny.yaml", _sweep_dict(tiny_static, data_dir))
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run([sys.executable, "-m", "batchscale.cli", "sweep", str(config),
                           "--store", str(tmp_path / "none.sqlite"), "--plan"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert done.returncode == 1
    assert done.stderr == ""
