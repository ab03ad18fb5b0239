"""Checkpoint files: pickle-free round trip, atomic replacement."""

from __future__ import annotations

import pytest
import torch

from batchscale.training.checkpoint import (
    atomic_directory,
    flatten_state,
    latest_checkpoint,
    read_state,
    remove_stale_temporaries,
    unflatten_state,
    write_state,
)


def _optimizer_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return opt.state_dict()


def test_optimizer_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    state = {"optimizer": _optimizer_state(), "rng": torch.get_rng_state(),
             "counters": {"step": 3, "best": None, "ratio": 0.25, 7: "int key"},
             "shape": (1, 2)}
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back["counters"] == state["counters"] and back["shape"] == (1, 2)
    assert torch.equal(back["rng"], state["rng"])
    opt, ref = back["optimizer"], state["optimizer"]
    assert opt["param_groups"] == ref["param_groups"]
    for key in ref["state"]:
        for name, value in ref["state"][key].items():
            assert torch.equal(opt["state"][key][name], value)
    # a fresh optimiser accepts it
    model = torch.nn.Linear(4, 3)
    torch.optim.AdamW(model.parameters()).load_state_dict(opt)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_objects_that_would_need_pickle_are_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        flatten_state({"x": object()})
    meta, tensors = flatten_state([1, {"a": torch.ones(2)}])
    assert unflatten_state(meta, tensors)[1]["a"].tolist() == [1.0, 1.0]


def test_a_failed_write_leaves_the_previous_directory_intact(tmp_path):
    target = tmp_path / "checkpoint-000000000010"

    def good(folder):
        write_state(folder, {"v": 1})

    atomic_directory(target, good)

    def crash(folder):
        write_state(folder, {"v": 2})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(target, crash)
    assert read_state(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_latest_checkpoint_ignores_temporaries(tmp_path):
    for n in (10, 20):
        atomic_directory(tmp_path / f"checkpoint-{n:012d}", lambda f: write_state(f, {}))
    half = tmp_path / ".tmp-checkpoint-000000000030.123"
    half.mkdir()
    (tmp_path / "checkpoint-000000000040").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "checkpoint-000000000020"
    remove_stale_temporaries(tmp_path)
    assert not half.exists()
