"""The trainer: exact resume, NaN guard, evaluation points, selection, lr schedule."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from batchscale.study import train_run
from batchscale.training import (
    RunDirectoryError,
    Trainer,
    TrainingDiverged,
    TrainingSet,
    config_from_dict,
)
from batchscale.training.checkpoint import latest_checkpoint, read_state
from batchscale.training.schedule import scaled_lr, warmup_linear, warmup_steps
from conftest import _WORDS

TIME_KEYS = {"seconds", "wall_seconds", "eval_seconds"}


def _sentence(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(n)]


@pytest.fixture(scope="module")
def scored_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 pairs whose score is the word overlap of the two sentences (learnable)."""
    rng = random.Random(0)
    rows = ["sentence1\tsentence2\tscore"]
    for _ in range(80):
        a = _sentence(rng, rng.randint(4, 9))
        keep = rng.randint(0, len(a))
        b = a[:keep] + _sentence(rng, len(a) - keep)
        rng.shuffle(b)
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{5.0 * keep / len(a):.3f}")
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _config(model: Path, data: Path, **sections: dict) -> object:
    raw = {
        "model": {"name": str(model)},
        "data": {"train": str(data), "score_column": "score", "score_range": [0, 5],
                 "dev_holdout": 0.25},
        "loss": {"name": "bsc_mse"},
        "optim": {"lr": 5e-3, "warmup": 0.2},
        "train": {"batch_size": 8, "epochs": 2, "seed": 3, "device": "cpu"},
        "eval": {"dev": {"task": "pairs", "split": "holdout"}, "test": None,
                 "every_examples": 20, "dtype": "float32"},
        "checkpoint": {"keep": 2},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def _without_time(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in curve]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {str(p.relative_to(model_dir)) + k: v for p in sorted(model_dir.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def _epochs(out: Path) -> list[dict]:
    """The per-epoch composition records, without their timings."""
    lines = (out / "epochs.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
            for line in lines]


class _Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = Trainer._step

    def step_or_stop(self: Trainer, indices: list[int]) -> float:
        if self.progress.step == step:
            raise _Interrupt
        return original(self, indices)

    monkeypatch.setattr(Trainer, "_step", step_or_stop)


def _run_cut_at(config, out, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """A run of ``config`` into ``out`` interrupted after ``step`` steps."""
    with monkeypatch.context() as m:
        _interrupt_at(m, step)
        with pytest.raises(_Interrupt):
            train_run(config, out, show_progress=False)


RESUME_CASES = {
    "plain": {},
    "cache+nodup+weince+learnable-tau": {
        "loss": {"name": "weince", "learnable_temperature": True},
        "train": {"sampler": "no_duplicates", "gradient_cache": {"chunk_size": 3}},
    },
    # The plan of the epoch in progress and the embedding cache for the next are in the
    # checkpoint: the resumed run plans the same batches.
    "bsc_knn": {"train": {"sampler": "bsc_knn", "hard_batches": {"knn_candidates": 16}}},
    "teacher": {"train": {"sampler": "teacher"}},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_gives_the_uninterrupted_curve(case, tiny_st_dir, scored_pairs, tmp_path,
                                              monkeypatch):
    config = _config(tiny_st_dir, scored_pairs, **RESUME_CASES[case])
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    # 60 training pairs, batch 8: 8 steps an epoch, 16 in all; points every 20 examples.
    # Epoch 1: 7 batches of 8 then one of 4; points at the first batch end >= each multiple.
    assert whole.fit.examples == 120 and [r["examples"] for r in whole.fit.curve] == [
        0, 24, 40, 60, 84, 100, 120]
    # after step 12, between the points at 84 (11) and 100 (13)
    _run_cut_at(config, tmp_path / "cut", monkeypatch, 12)
    assert len((tmp_path / "cut" / "curve.jsonl").read_text().splitlines()) == 5
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)
    a, b = _weights(whole.final_dir), _weights(resumed.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [_epochs(run.fit.out_dir) for run in (whole, resumed)]
    assert epochs[0] == epochs[1] and [e["epoch"] for e in epochs[0]] == [0, 1]
    # the training loss moved and the curve records the examples-seen abscissa
    assert whole.fit.curve[-1]["train_loss"] is not None
    if RESUME_CASES[case].get("loss", {}).get("name") == "weince":
        assert "weince_mean_lambda" in whole.fit.curve[-1]["loss_diagnostics"]
        assert "temperature" in whole.fit.curve[-1]["loss_diagnostics"]


def test_resume_across_an_epoch_boundary(tiny_st_dir, scored_pairs, tmp_path, monkeypatch):
    config = _config(tiny_st_dir, scored_pairs, eval={"every_examples": 60})
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    # the point at 60 examples falls on the epoch's end: its checkpoint holds a spent epoch
    assert [r["examples"] for r in whole.fit.curve] == [0, 60, 120]
    _run_cut_at(config, tmp_path / "cut", monkeypatch, 9)
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)


def test_bsc_shuffling_resumed_mid_epoch_plans_the_next_epoch_alike(tiny_st_dir, scored_pairs,
                                                                    tmp_path, monkeypatch):
    """Cut in epoch 0 (after the checkpoint at step 5): epoch 1 is planned from the training
    embeddings of epoch 0, half of them cached before the cut, so the cache is checkpointed."""
    config = _config(tiny_st_dir, scored_pairs, **RESUME_CASES["bsc_knn"])
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    _run_cut_at(config, tmp_path / "cut", monkeypatch, 6)
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)
    records = [json.loads(line) for line in
               (whole.fit.out_dir / "epochs.jsonl").read_text().splitlines()]
    # epoch 0 encoded the queries (no training embeddings yet); epoch 1 used the cached ones
    assert records[0]["embed_seconds"] > 0 and records[1]["embed_seconds"] == 0


def test_selection_is_the_best_dev_point_and_final_reproduces_it(tiny_st_dir, scored_pairs,
                                                                  tmp_path):
    from batchscale.encoders import SentenceEncoder
    from batchscale.evaluation import evaluate_sts
    from batchscale.study.run import load_training_data

    config = _config(tiny_st_dir, scored_pairs)
    result = train_run(config, tmp_path / "run", show_progress=False)
    curve = result.fit.curve
    dev = [r["dev"]["spearman"] for r in curve]
    best = curve[max(range(len(dev)), key=lambda i: (dev[i], -i))]
    assert result.fit.best_metric == max(dev) and result.fit.best_examples == best["examples"]
    # a point is marked best exactly when its score beats every earlier one
    assert [r["best"] for r in curve] == [d > max(dev[:i], default=-math.inf)
                                          for i, d in enumerate(dev)]
    saved = json.loads((result.final_dir / "batchscale.json").read_text())
    assert saved["examples"] == best["examples"]
    _, held, _ = load_training_data(config)
    final = SentenceEncoder.load(result.final_dir, device="cpu")
    assert evaluate_sts(final, held, show_progress=False)["spearman"] == pytest.approx(
        best["dev"]["spearman"], abs=1e-9)


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_nan_stops_with_the_step_named_and_the_checkpoint_intact(where, tiny_st_dir,
                                                                 scored_pairs, tmp_path,
                                                                 monkeypatch):
    config = _config(tiny_st_dir, scored_pairs)
    bad_step = 7  # the 7th optimiser step, after the point at 40 examples (step 5)
    original = Trainer._backward

    def poisoned(self: Trainer, sides, labels, *rest):
        if self.progress.step + 1 == bad_step:
            if where == "loss":
                objective = self.objective
                clean = type(objective).forward
                objective.forward = lambda *a, **k: clean(objective, *a, **k) * float("nan")
            else:
                p = next(self.encoder.parameters())
                p.register_hook(lambda g: torch.full_like(g, float("inf")))
        return original(self, sides, labels, *rest)

    monkeypatch.setattr(Trainer, "_backward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        train_run(config, out, show_progress=False)
    msg = str(err.value)
    assert f"step {bad_step} " in msg and "after 48 examples" in msg
    assert ("the loss is nan" if where == "loss" else "the gradient norm is") in msg
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name.endswith("000000040") and str(ckpt) in msg
    digest = _tree_digest(ckpt)
    assert read_state(ckpt)["progress"]["examples"] == 40
    # the checkpoint is complete: resuming from it (without the poison) finishes the run
    monkeypatch.setattr(Trainer, "_backward", original)
    assert _tree_digest(ckpt) == digest
    resumed = train_run(config, out, resume=True, show_progress=False)
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)


def test_a_run_directory_is_not_overwritten_and_resume_checks_the_config(
        tiny_st_dir, scored_pairs, tmp_path):
    config = _config(tiny_st_dir, scored_pairs, train={"epochs": 0.5})
    train_run(config, tmp_path / "run", show_progress=False)
    with pytest.raises(RunDirectoryError, match="holds a run already"):
        train_run(config, tmp_path / "run", show_progress=False)
    other = _config(tiny_st_dir, scored_pairs, train={"epochs": 0.5}, optim={"lr": 1e-3})
    with pytest.raises(RunDirectoryError, match="another config"):
        train_run(other, tmp_path / "run", resume=True, show_progress=False)
    with pytest.raises(RunDirectoryError, match="no checkpoint"):
        train_run(config, tmp_path / "empty", resume=True, show_progress=False)


def test_lr_schedule_and_scaling_follow_the_formulas():
    assert scaled_lr(2e-5, 64, 16, "none") == 2e-5
    assert scaled_lr(2e-5, 64, 16, "linear") == pytest.approx(8e-5)
    assert scaled_lr(2e-5, 64, 16, "sqrt") == pytest.approx(4e-5)
    total, warm = 100, warmup_steps(100, 0.1)
    assert warm == 10
    values = [warmup_linear(s, total, warm) for s in range(total + 1)]
    assert values[0] == 0 and values[5] == pytest.approx(0.5) and values[10] == 1
    assert values[55] == pytest.approx(0.5) and values[100] == 0
    assert all(b <= a for a, b in itertools.pairwise(values[10:]))


def test_trainer_applies_the_scaled_warmup_schedule(tiny_st_dir, scored_pairs, tmp_path):
    config = _config(tiny_st_dir, scored_pairs,
                     optim={"lr": 1e-3, "lr_scaling": "sqrt", "reference_batch_size": 2,
                            "warmup": 0.25})
    result = train_run(config, tmp_path / "run", show_progress=False)
    peak = 1e-3 * math.sqrt(8 / 2)
    for r in result.fit.curve:  # 16 steps, 4 of warmup
        expected = peak * warmup_linear(r["steps"], 16, 4)
        assert r["lr"] == pytest.approx(expected, rel=1e-9)


def test_training_set_from_records_checks_its_columns():
    from batchscale.data import Pair, Triplet

    ts = TrainingSet.from_records([Pair("a", "b", 1.0, 0.2), Pair("c", "d", 2.0, 0.4)])
    sides, labels = ts.batch([1, 0])
    assert sides == [["c", "a"], ["d", "b"]] and labels.tolist() == pytest.approx([0.4, 0.2])
    tri = TrainingSet.from_records([Triplet("a", "b", "c")])
    assert tri.labels is None and len(tri.columns) == 3
    with pytest.raises(ValueError, match="all pairs or all triplets"):
        TrainingSet.from_records([Pair("a", "b"), Triplet("a", "b", "c")])
    with pytest.raises(ValueError, match="needs a graded label"):
        config = config_from_dict({"loss": {"name": "cosine_mse"}})
        from batchscale.training import Objective

        Trainer(None, Objective(config.loss, 2), TrainingSet.from_records(
            [Pair("a", "b"), Pair("c", "d")]), config, "unused", lambda e: {})


def test_added_loss_terms_are_weighted_into_the_objective():
    """CoSENT + 10 x BSC+MSE, each term written out here in float64 from its equation."""
    from batchscale.training import Objective

    config = config_from_dict({"loss": {
        "name": "cosent", "cosent_scale": 20.0,
        "plus": [{"name": "bsc_mse", "weight": 10.0, "mu": 0.1, "temperature": 0.05}]}})
    g = torch.Generator().manual_seed(3)
    q, a = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    y = torch.rand(6, generator=g)
    objective = Objective(config.loss, 100)
    assert objective.needs_labels
    got = objective([q, a], y)

    qn = torch.nn.functional.normalize(q.double(), dim=-1)
    an = torch.nn.functional.normalize(a.double(), dim=-1)
    s = qn @ an.T
    d = s.diagonal()
    yd = y.double()
    # CoSENT: log(1 + sum over pairs (i, j) with y_i > y_j of exp(20 (s_j - s_i))).
    diffs = [20 * (d[j] - d[i]) for i in range(6) for j in range(6) if yd[i] > yd[j]]
    cosent = torch.logsumexp(torch.stack([torch.zeros((), dtype=torch.float64), *diffs]), 0)
    # BSC (rows and columns averaged), anchors only where y > 0.6, divided by m; + 0.9 MSE.
    keep = (yd > 0.6).double()
    rows = -(torch.log_softmax(s / 0.05, dim=1).diagonal() * keep).sum() / 6
    cols = -(torch.log_softmax(s.T / 0.05, dim=1).diagonal() * keep).sum() / 6
    bsc_mse = 0.1 * (rows + cols) / 2 + 0.9 * ((d - yd) ** 2).mean()
    assert got.item() == pytest.approx((cosent + 10 * bsc_mse).item(), rel=1e-5)


def test_tiled_loss_trains_like_the_dense_one(tiny_st_dir, scored_pairs, tmp_path):
    """InfoNCE over tiles of 3 (batch 8: its gradient computed in the forward sweep), with a
    learnable temperature and the gradient cache, follows the dense run's curve."""
    curves = {}
    for tile in (None, 3):
        config = _config(tiny_st_dir, scored_pairs,
                         loss={"name": "infonce", "learnable_temperature": True,
                               "tile_size": tile},
                         train={"epochs": 2, "gradient_cache": {"chunk_size": 3}})
        out = tmp_path / f"tile-{tile}"
        curves[tile] = train_run(config, out, show_progress=False).fit.curve
    assert len(curves[None]) == len(curves[3]) > 3
    for dense, tiled in zip(curves[None], curves[3], strict=True):
        assert tiled["steps"] == dense["steps"]
        # (the tiny model's dev Spearman ranks near-equal cosines: too sensitive to compare)
        if dense["train_loss"] is not None:
            assert tiled["train_loss"] == pytest.approx(dense["train_loss"], rel=1e-5)
