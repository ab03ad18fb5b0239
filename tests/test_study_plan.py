"""`batchscale sweep --plan`: what a rerun would still run, in order, with wall-clock
estimates from the store's finished runs. Stores are filled by hand (no training), so every
expected number is given here."""

from __future__ import annotations

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

