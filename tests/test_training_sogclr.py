"""SogCLR in the trainer: the config, the objective's per-example state (read and written by
example index, in checkpoints, untouched by the noise-scale probe), exact resume with the
state, a sweep arm, and 2 gloo ranks against one process (local and global loss)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from batchscale.losses import sogclr_loss
from batchscale.study import train_run
from batchscale.study.grid import sweep_from_dict
from batchscale.training import ConfigError, Objective, TrainingSet, config_from_dict
from batchscale.training.checkpoint import latest_checkpoint, read_state
from batchscale.training.config import LossConfig
from batchscale.training.noise_scale import measure_noise_scale, probe_gradients
from ranks import run_ranks
from test_noise_scale import TableEncoder
from test_training import (  # noqa: F401  (scored_pairs is a fixture)
    _config,
    _run_cut_at,
    _weights,
    _without_time,
    scored_pairs,
)

HERE = Path(__file__).resolve()
TOL = 1e-10


def _embeddings(b: int, k: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 5, generator=g, dtype=torch.float64)
    sides = [q, q + 0.8 * torch.randn(b, 5, generator=g, dtype=torch.float64)]
    if k:
        sides.append(torch.randn(b * k, 5, generator=g, dtype=torch.float64))
    return sides, torch.rand(b, generator=g, dtype=torch.float64)


# -- config and sweep ---------------------------------------------------------------------------
def test_the_config_takes_sogclr_and_refuses_what_it_does_not_support() -> None:
    assert config_from_dict({"loss": {"name": "sogclr"}}).loss.sogclr_gamma == 0.9
    for loss, message in (
            ({"name": "sogclr", "learnable_temperature": True}, "temperature is fixed"),
            ({"name": "sogclr", "tile_size": 64}, "no tiled path"),
            ({"name": "bsc", "plus": [{"name": "sogclr"}]}, "main loss, not under plus"),
            ({"name": "sogclr", "sogclr_gamma": 1.5}, "loss.sogclr_gamma")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"loss": loss})


def test_a_sweep_takes_a_sogclr_arm() -> None:
    sweep = sweep_from_dict({
        "name": "s", "base": {"loss": {"name": "infonce"}},
        "grid": {"batch_sizes": [8, 16], "softmax_batches": [4],
                 "losses": {"infonce": {"name": "infonce"},
                            "sogclr": {"name": "sogclr", "sogclr_gamma": 0.8}}},
        "budget": {"examples": 64}}, "s.yaml")
    arms = {(c.loss, c.batch_size, c.softmax_batch) for c in sweep.cells}
    assert {("sogclr", 8, 8), ("sogclr", 8, 4), ("sogclr", 16, 4)} <= arms
    cell = next(c for c in sweep.cells if c.loss == "sogclr")
    assert cell.config.loss.name == "sogclr" and cell.config.loss.sogclr_gamma == 0.8


# -- the objective's state ------------------------------------------------------------------
def test_the_objective_reads_and_writes_u_by_example_index() -> None:
    objective = Objective(LossConfig(name="sogclr", temperature=0.1, label_threshold=0.3),
                          20).double()
    assert objective.sogclr_log_u.shape == (2, 20)
    assert set(objective.state_dict()) == {"sogclr_log_u"}
    sides, labels = _embeddings(6, 1, seed=0)
    rows = [7, 2, 19, 4, 11, 0]
    old = torch.randn(2, 20, dtype=torch.float64)
    objective.sogclr_log_u.copy_(old)
    loss = objective(sides, labels, indices=rows)
    want_loss, want = sogclr_loss(sides[0], sides[1], old[:, rows], 0.1,
                                  hard_negatives=sides[2], labels=labels, label_threshold=0.3)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
    expected = old.clone()
    expected[:, rows] = want
    assert torch.equal(objective.sogclr_log_u, expected)
    assert not torch.equal(want, old[:, rows])  # the anchors moved
    diagnostics = objective.pop_diagnostics()
    assert diagnostics["sogclr_mean_u"] == pytest.approx(float(want.exp().mean()), rel=1e-12)
    assert diagnostics["sogclr_log_u_std"] == pytest.approx(float(want.std(correction=0)),
                                                            rel=1e-12)
    with pytest.raises(ValueError, match="pass the batch's example indices"):
        objective(sides, labels)


def test_an_example_twice_in_a_batch_keeps_its_last_rows_value() -> None:
    objective = Objective(LossConfig(name="sogclr", directions="q->a"), 10).double()
    sides, _ = _embeddings(5, 0, seed=1)
    objective(sides, None, indices=[3, 8, 3, 1, 5])
    _, want = sogclr_loss(sides[0], sides[1], torch.full((1, 5), -math.inf,
                                                         dtype=torch.float64), 0.05,
                          directions="q->a")
    assert float(objective.sogclr_log_u[0, 3]) == float(want[0, 2])
    assert objective.sogclr_log_u[0, [0, 2, 4, 6, 7, 9]].eq(-math.inf).all()


def test_the_noise_scale_probe_leaves_the_state_and_sees_the_training_gradient() -> None:
    encoder = TableEncoder(80, 8, seed=3)
    data = TrainingSet((tuple(str(i) for i in range(40)), tuple(str(40 + i) for i in range(40))))
    objective = Objective(LossConfig(name="sogclr", temperature=0.1), len(data)).double()
    rows = list(range(0, 40, 2))
    sides, labels = data.batch(rows)
    objective([encoder(encoder.tokenize(s)) for s in sides], labels, indices=rows)
    before = objective.sogclr_log_u.clone()
    objective.pop_diagnostics()
    probe_rows = list(range(8, 32))
    sides, labels = data.batch(probe_rows)
    with objective.frozen_state():
        probe = probe_gradients(encoder, objective, sides, labels, chunks=4,
                                indices=probe_rows)
        embeddings = [encoder(encoder.tokenize(s)) for s in sides]
        (want,) = torch.autograd.grad(objective(embeddings, labels, indices=probe_rows),
                                      [encoder.table])
    torch.testing.assert_close(probe.big[0], want, rtol=0, atol=1e-10)
    assert torch.equal(objective.sogclr_log_u, before)
    measure_noise_scale(encoder, objective, data, 24, batches=2, chunks=4, seed=7)
    assert torch.equal(objective.sogclr_log_u, before) and objective.pop_diagnostics() == {}
    objective([encoder(encoder.tokenize(s)) for s in sides], labels, indices=probe_rows)
    assert not torch.equal(objective.sogclr_log_u, before)  # outside the probe it moves


# -- training ---------------------------------------------------------------------------------
def test_resume_gives_the_uninterrupted_run_state_included(tiny_st_dir, scored_pairs,  # noqa: F811
                                                           tmp_path, monkeypatch) -> None:
    config = _config(tiny_st_dir, scored_pairs, loss={"name": "sogclr", "temperature": 0.1},
                     train={"gradient_cache": {"chunk_size": 3}})
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    _run_cut_at(config, tmp_path / "cut", monkeypatch, 12)
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)
    assert all("sogclr_mean_u" in r["loss_diagnostics"] for r in whole.fit.curve[1:])
    a, b = _weights(whole.final_dir), _weights(resumed.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [read_state(latest_checkpoint(run / "checkpoints"))["objective"]["sogclr_log_u"]
              for run in (tmp_path / "whole", tmp_path / "cut")]
    assert torch.equal(states[0], states[1])
    assert torch.isfinite(states[0]).all()  # two epochs: every example was an anchor


# -- two ranks ----------------------------------------------------------------------------------
# name: (loss config, cross_ranks, global batch B, rank 0's share, hard negatives per pair)
SCENARIOS: dict[str, tuple[dict, str, int, int, int]] = {
    "local-both-labels-ids": ({"name": "sogclr", "temperature": 0.1, "label_threshold": 0.3},
                              "local", 8, 5, 1),
    "local-q->a": ({"name": "sogclr", "directions": "q->a", "sogclr_gamma": 0.6},
                   "local", 8, 4, 2),
    "local-blocks-span": ({"name": "sogclr", "softmax_batch": 4}, "local", 8, 3, 1),
    "global-both": ({"name": "sogclr", "temperature": 0.2}, "global", 8, 5, 1),
}
STEPS = 3
NUM_EXAMPLES = 12


def _step_inputs(name: str, step: int):
    """Step ``step``'s global batch: embeddings, labels, ids and example indices (an example
    twice in a batch, and examples met again at later steps)."""
    _, _, b, _, k = SCENARIOS[name]
    sides, labels = _embeddings(b, k, seed=100 * step + len(name))
    g = torch.Generator().manual_seed(step)
    indices = torch.randperm(NUM_EXAMPLES, generator=g)[:b]
    indices[-1] = indices[1]
    query_ids = torch.randint(0, 4, (b,), generator=g)
    answer_ids = torch.cat([query_ids, torch.randint(0, 6, (b * k,), generator=g)])
    return sides, labels, (query_ids, answer_ids), indices


def _run_objective(name: str, rank: int | None):
    """STEPS steps of the scenario's objective on rank ``rank``'s share (None: the whole
    batch on one process): per step the loss and the rows' gradients, then the state."""
    config, cross_ranks, b, share, k = SCENARIOS[name]
    objective = Objective(LossConfig(**config), NUM_EXAMPLES, cross_ranks=cross_ranks).double()
    rows = slice(0, b) if rank is None else slice(0, share) if rank == 0 else slice(share, b)
    losses, grads = [], []
    for step in range(STEPS):
        sides, labels, (query_ids, answer_ids), indices = _step_inputs(name, step)
        mine = [sides[0][rows], sides[1][rows]] + (
            [sides[2][rows.start * k : rows.stop * k]] if k else [])
        leaves = [x.clone().requires_grad_(True) for x in mine]
        ids = (query_ids[rows], torch.cat([answer_ids[rows],
                                           answer_ids[b + rows.start * k : b + rows.stop * k]]))
        loss = objective(leaves, labels[rows], ids, indices=indices[rows])
        loss.backward()
        losses.append(loss.detach())
        grads.append([x.grad for x in leaves])
    return losses, grads, objective.sogclr_log_u.clone(), objective.pop_diagnostics


def worker(out_dir: str) -> None:
    from batchscale.batching.distributed import init_distributed, shutdown_distributed

    info = init_distributed(backend="gloo", timeout_s=60)
    results = {}
    for name in SCENARIOS:
        losses, grads, state, pop = _run_objective(name, info.rank)
        for loss in losses:  # the mean over ranks is the loss (local: parts; global: copies)
            torch.distributed.all_reduce(loss)
            loss /= info.world_size
        # A row's gradient sums every rank's loss: W times one process's.
        grads = [[g / info.world_size for g in step] for step in grads]
        diagnostics = pop(lambda s: (torch.distributed.all_reduce(s), s)[1] / info.world_size)
        results[name] = {"losses": losses, "grads": grads, "state": state,
                         "diagnostics": diagnostics}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    shutdown_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sogclr-ranks")
    return run_ranks(HERE, ["sogclr", str(out)], out)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_keep_the_state_of_one_process(two_ranks: list[dict], name: str) -> None:
    losses, grads, state, pop = _run_objective(name, None)
    diagnostics = pop()
    _, _, b, share, k = SCENARIOS[name]
    assert torch.isfinite(state).sum() > 0
    for rank, got in enumerate(two_ranks):
        got = got[name]
        assert torch.equal(got["state"].isfinite(), state.isfinite()), rank
        assert float((got["state"] - state).nan_to_num().abs().max()) <= TOL, rank
        rows = slice(0, share) if rank == 0 else slice(share, b)
        for step in range(STEPS):
            assert abs(float(got["losses"][step]) - float(losses[step])) <= TOL, (rank, step)
            want = [grads[step][0][rows], grads[step][1][rows]] + (
                [grads[step][2][rows.start * k : rows.stop * k]] if k else [])
            for g, w in zip(got["grads"][step], want, strict=True):
                assert float((g - w).abs().max()) <= TOL, (rank, step)
        assert got["diagnostics"].keys() == diagnostics.keys() != set()
        for key, value in diagnostics.items():
            assert got["diagnostics"][key] == pytest.approx(value, rel=1e-10)


if __name__ == "__main__":
    worker(sys.argv[2])
