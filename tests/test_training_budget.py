"""Exact budgets (whole batches across a short epoch end), log-spaced evaluation points,
TensorBoard events."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchscale.batching.samplers import NoDuplicatesBatchSampler, RandomBatchSampler
from batchscale.study import train_run
from batchscale.training.schedule import log_points, next_point
from test_training import _config, _run_cut_at, _without_time, scored_pairs  # noqa: F401


def test_fill_last_fills_the_short_batch_from_the_rest_of_the_epoch():
    # 23 examples, batch 5: four whole batches, then 3 + 2 drawn from the other 20
    s = RandomBatchSampler(23, 5, seed=4, fill_last=True)
    plan = s.global_batches()
    assert [len(b) for b in plan] == [5] * 5
    flat = np.concatenate(plan)
    assert set(flat.tolist()) == set(range(23))  # every example at least once this epoch
    counts = np.bincount(flat, minlength=23)
    assert counts.sum() == 25 and counts.max() == 2 and (counts == 2).sum() == 2
    assert all(len(set(b.tolist())) == 5 for b in plan)  # no example twice in a batch
    plain = RandomBatchSampler(23, 5, seed=4).global_batches()
    assert all(np.array_equal(a, b) for a, b in zip(plan[:4], plain[:4], strict=True))
    assert np.array_equal(plan[4][:3], plain[4])


def test_fill_last_checks_its_inputs():
    with pytest.raises(ValueError, match="batch of 30 cannot be filled from 23"):
        RandomBatchSampler(23, 30, fill_last=True)
    with pytest.raises(ValueError, match="choose one"):
        RandomBatchSampler(23, 5, fill_last=True, drop_last=True)
    keys = np.arange(46, dtype=np.int64).reshape(23, 2)
    nd = NoDuplicatesBatchSampler(keys, 5, fill_last=True)
    assert [len(b) for b in nd.global_batches()] == [5] * 5


def test_log_points_are_log_spaced_whole_steps_shared_across_batch_sizes():
    # targets 1, 2, 4, ..., 1024 (11 points from 1 to 1,024)
    assert log_points(1024, 11, 1) == [2**k for k in range(11)]
    assert log_points(1024, 11, 64) == [64, 128, 256, 512, 1024]
    assert log_points(1024, 11, 16) == [16, 32, 64, 128, 256, 512, 1024]
    # a target between steps rounds up to the next whole step: geomspace(1, 1000, 4)
    assert log_points(1000, 4, 40) == [40, 120, 1000]
    # aligned on a sweep's batch sizes: geomspace(1, 192, 8) = 1, 2.1, 4.5, 9.5, 20, 43, 91, 192
    align = [8, 16, 32]
    assert log_points(192, 8, 16, align) == [16, 32, 64, 96, 192]
    assert log_points(192, 8, 32, align) == [32, 64, 96, 192]
    assert log_points(192, 8, 8, align) == [8, 16, 32, 64, 96, 192]
    assert next_point(40, schedule=[40, 120, 1000]) == 120
    assert next_point(1000, schedule=[40, 120, 1000]) > 10**12
    assert next_point(41, every=20) == 60 and next_point(60, every=20) == 80


@pytest.mark.parametrize(("batch", "budget"), [(8, {"max_examples": 96}),
                                               (16, {"max_examples": 96}),
                                               (8, {"max_steps": 12})])
def test_a_budget_is_met_exactly_when_the_batch_size_does_not_divide_the_data(
        batch, budget, tiny_st_dir, scored_pairs, tmp_path):  # noqa: F811
    # 60 training pairs (80, a quarter held out): 60 % 8 = 4, 60 % 16 = 12
    config = _config(tiny_st_dir, scored_pairs, train={"epochs": 1, "batch_size": batch,
                                                       **budget},
                     eval={"every_examples": 1000})
    result = train_run(config, tmp_path / "run", show_progress=False)
    assert result.fit.examples == 96
    assert [r["steps"] for r in result.fit.curve] == [0, 96 // batch]
    assert result.fit.curve[-1]["epoch"] == pytest.approx(96 / 60)


def test_log_schedule_points_and_resume(tiny_st_dir, scored_pairs, tmp_path,  # noqa: F811
                                        monkeypatch):
    config = _config(tiny_st_dir, scored_pairs, train={"max_examples": 128},
                     eval={"schedule": "log", "points": 8})
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    want = [0] + [min(128, math.ceil(128 ** (k / 7) / 8 - 1e-9) * 8) for k in range(8)]
    assert [r["examples"] for r in whole.fit.curve] == sorted(set(want))
    _run_cut_at(config, tmp_path / "cut", monkeypatch, 7)
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)


def test_tensorboard_events_hold_every_point(tiny_st_dir, scored_pairs, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tiny_st_dir, scored_pairs, train={"max_examples": 64},
                     optim={"lr": 1e-4}, eval={"every_examples": 32, "tensorboard": True})
    result = train_run(config, tmp_path / "run", show_progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    dev = events.Scalars("dev/spearman")
    assert [e.step for e in dev] == [r["examples"] for r in result.fit.curve]
    assert [e.value for e in dev] == pytest.approx(
        [r["dev"]["spearman"] for r in result.fit.curve], abs=1e-4)
