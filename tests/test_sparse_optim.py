"""``optim.sparse``: lazy AdamW against a float64 reference written here, gradient clipping
of sparse gradients, and training runs with the option (exact resume, its first step equal
to dense AdamW's, the noise-scale probe, clear errors)."""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import batchscale.encoders.token_cache as token_cache
from batchscale.encoders import SentenceEncoder
from batchscale.encoders.token_cache import TokenCache
from batchscale.study import train_run
from batchscale.training import Trainer, config_from_dict
from batchscale.training.checkpoint import latest_checkpoint
from batchscale.training.sparse import LazyAdamW, clip_gradients
from conftest import _WORDS


def _reference_lazy_adamw(p, m, v, t, rows, grads, lr, b1, b2, eps, wd):
    """One step of lazy AdamW in plain Python floats: rows ``rows`` (each once, with gradient
    row ``grads[i]``) decay and move; every other row keeps p, m and v. ``t``: the step."""
    for r, g in zip(rows, grads, strict=True):
        for j, gj in enumerate(g):
            p[r][j] *= 1 - lr * wd
            m[r][j] = b1 * m[r][j] + (1 - b1) * gj
            v[r][j] = b2 * v[r][j] + (1 - b2) * gj * gj
            m_hat = m[r][j] / (1 - b1**t)
            v_hat = v[r][j] / (1 - b2**t)
            p[r][j] -= lr * m_hat / (math.sqrt(v_hat) + eps)


def test_lazy_adamw_matches_the_float64_reference_on_touched_and_untouched_rows():
    gen = torch.Generator().manual_seed(0)
    n, d, b1, b2, eps, wd = 7, 3, 0.8, 0.95, 1e-6, 0.1
    table = torch.nn.Parameter(torch.randn(n, d, dtype=torch.float64, generator=gen))
    scalar = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))  # dense gradient
    opt = LazyAdamW([{"params": [table]}, {"params": [scalar], "weight_decay": 0.0}],
                    lr=0.1, betas=(b1, b2), eps=eps, weight_decay=wd)
    p = table.detach().tolist()
    m, v = [[0.0] * d for _ in range(n)], [[0.0] * d for _ in range(n)]
    ps, ms, vs = scalar.detach().tolist(), [[0.0]], [[0.0]]
    # rows per step, with repeats (an uncoalesced gradient sums them); row 6 never touched
    touched = [[0, 2, 2], [2, 3], [0, 1, 4, 0], [5]]
    for t, rows in enumerate(touched, start=1):
        lr = 0.1 * t / 2  # a schedule changes the group's lr between steps
        for group in opt.param_groups:
            group["lr"] = lr
        values = torch.randn(len(rows), d, dtype=torch.float64, generator=gen)
        table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (n, d),
                                             check_invariants=True)
        scalar.grad = torch.randn(1, dtype=torch.float64, generator=gen)
        summed: dict[int, list[float]] = {}
        for r, g in zip(rows, values.tolist(), strict=True):
            summed[r] = [a + b for a, b in zip(summed.get(r, [0.0] * d), g, strict=True)]
        _reference_lazy_adamw(p, m, v, t, list(summed), list(summed.values()), lr, b1, b2,
                              eps, wd)
        _reference_lazy_adamw([ps], ms, vs, t, [0], [scalar.grad.tolist()], lr, b1, b2, eps,
                              0.0)
        opt.step()
        torch.testing.assert_close(table.detach(), torch.tensor(p, dtype=torch.float64),
                                   rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(scalar.detach(), torch.tensor(ps, dtype=torch.float64),
                                   rtol=1e-13, atol=1e-13)
    state = opt.state[table]
    assert state["step"] == len(touched)
    torch.testing.assert_close(state["exp_avg"], torch.tensor(m, dtype=torch.float64),
                               rtol=1e-13, atol=1e-13)
    assert state["exp_avg_sq"][6].abs().sum() == 0  # never touched: no moment


def test_lazy_adamw_on_dense_gradients_is_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = LazyAdamW([a], lr=0.05, eps=1e-6, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=0.05, eps=1e-6, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(5, 4)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clipping_sparse_gradients_is_clipping_their_dense_form(max_norm):
    gen = torch.Generator().manual_seed(1)
    table = torch.nn.Parameter(torch.zeros(6, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    rows = torch.tensor([[1, 4, 1, 0]])
    sparse = torch.sparse_coo_tensor(rows, torch.randn(4, 3, generator=gen), (6, 3))
    dense_bias = torch.randn(3, generator=gen)
    twins = [torch.nn.Parameter(torch.zeros(6, 3)), torch.nn.Parameter(torch.zeros(3))]
    table.grad, bias.grad = sparse.clone(), dense_bias.clone()
    twins[0].grad, twins[1].grad = sparse.to_dense(), dense_bias.clone()
    want = torch.nn.utils.clip_grad_norm_(twins, math.inf if max_norm is None else max_norm)
    got = clip_gradients([table, bias], max_norm)
    torch.testing.assert_close(got, want)
    assert table.grad.is_sparse and table.grad.is_coalesced()
    torch.testing.assert_close(table.grad.to_dense(), twins[0].grad)
    torch.testing.assert_close(bias.grad, twins[1].grad)


# -- training runs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 pairs whose score is the word overlap of the two sentences."""
    rng = random.Random(0)
    rows = ["sentence1\tsentence2\tscore"]
    for _ in range(60):
        a = [rng.choice(_WORDS) for _ in range(rng.randint(3, 8))]
        keep = rng.randint(1, len(a))
        b = a[:keep] + [rng.choice(_WORDS) for _ in range(len(a) - keep)]
        rows.append(f"{' '.join(a)}\t{' '.join(b)}\t{5.0 * keep / len(a):.3f}")
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _config(model: str, data: Path, **sections: dict):
    raw = {
        "model": {"name": model},
        "data": {"train": str(data), "score_column": "score", "score_range": [0, 5],
                 "dev_holdout": 0.25},
        "loss": {"name": "infonce"},
        "optim": {"lr": 0.05, "warmup": 0.2, "sparse": True, "max_grad_norm": 0.5},
        "train": {"batch_size": 8, "epochs": 2, "seed": 3, "device": "cpu"},
        "eval": {"dev": {"task": "pairs", "split": "holdout"}, "test": None,
                 "every_examples": 16, "dtype": "float32", "geometry": False,
                 "noise_scale": {"batches": 1, "chunks": 2}},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {str(p.relative_to(model_dir)) + k: v for p in sorted(model_dir.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def _last_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights at the end of training (the last checkpoint's model)."""
    return _weights(latest_checkpoint(out / "checkpoints") / "model")


def _without_time(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in curve]


class _Interrupt(Exception):
    pass


def _count_tokenising_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fresh process-wide token cache registry; each cache call that ran the tokenizer
    appends how many texts it tokenised."""
    monkeypatch.setattr(token_cache, "_SHARED", OrderedDict())
    calls: list[int] = []
    original = TokenCache.add

    def add(self: TokenCache, texts) -> None:
        before = self.tokenized
        original(self, texts)
        if self.tokenized > before:
            calls.append(self.tokenized - before)

    monkeypatch.setattr(TokenCache, "add", add)
    return calls


def test_a_sparse_run_resumes_exactly(tiny_hf_dir, pairs_file, tmp_path, monkeypatch):
    config = _config(f"static:{tiny_hf_dir}", pairs_file)
    calls = _count_tokenising_calls(monkeypatch)
    whole = train_run(config, tmp_path / "whole", show_progress=False)
    # the training texts tokenised once, before the first step: not per batch, not per
    # epoch (2 here), not for the noise-scale probes; the evaluation texts once, at the
    # first evaluation point, not again at the later ones
    assert len(calls) == 2 and calls[0] > 2 * config.train.batch_size
    assert len(whole.fit.curve) > 2
    assert "sparse: true" in (tmp_path / "whole" / "config.yaml").read_text()
    assert all(math.isfinite(r["dev"]["noise_scale"]["trace_sigma"]) for r in whole.fit.curve)
    original = Trainer._step

    def step_or_stop(self: Trainer, *args, **kwargs) -> float:
        if self.progress.step == 7:
            raise _Interrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_step", step_or_stop)
        with pytest.raises(_Interrupt):
            train_run(config, tmp_path / "cut", show_progress=False)
    resumed = train_run(config, tmp_path / "cut", resume=True, show_progress=False)
    assert len(calls) == 2  # the later runs in this process found every text cached
    assert _without_time(resumed.fit.curve) == _without_time(whole.fit.curve)
    for a, b in ((_weights(whole.final_dir), _weights(resumed.final_dir)),
                 (_last_weights(tmp_path / "whole"), _last_weights(tmp_path / "cut"))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_first_sparse_step_is_dense_adamws_without_weight_decay(tiny_hf_dir, pairs_file,
                                                                    tmp_path):
    """From zero moments, dense AdamW moves no row that the batch did not touch (its update
    there is 0 / eps) and only weight decay tells the two apart."""
    finals = {}
    for sparse in (False, True):
        config = _config(f"static:{tiny_hf_dir}", pairs_file,
                         optim={"sparse": sparse, "weight_decay": 0.0, "warmup": 0.0},
                         train={"max_steps": 1}, eval={"noise_scale": None})
        train_run(config, tmp_path / str(sparse), show_progress=False)
        finals[sparse] = _last_weights(tmp_path / str(sparse))
    start = SentenceEncoder.static(tiny_hf_dir).st[0].embedding.weight.detach()
    (key,) = finals[False]
    torch.testing.assert_close(finals[True][key], finals[False][key], rtol=1e-6, atol=1e-7)
    moved = (finals[False][key] - start).abs().sum(dim=1) > 0
    assert 0 < int(moved.sum()) < len(start)  # the batch's rows moved, the others did not


def test_sparse_needs_a_static_encoder_and_one_process(tiny_hf_dir, tiny_st_dir, pairs_file,
                                                       tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"optim\.sparse: needs a static encoder"):
        train_run(_config(str(tiny_st_dir), pairs_file), tmp_path / "t", show_progress=False)
    monkeypatch.setattr("batchscale.training.trainer.world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"optim\.sparse: sparse gradients are not averaged"):
        train_run(_config(f"static:{tiny_hf_dir}", pairs_file), tmp_path / "s",
                  show_progress=False)
