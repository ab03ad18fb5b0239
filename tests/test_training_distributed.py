"""`torchrun --nproc-per-node 2 -m batchscale train` against one process on the same config:
the same curve (training loss and dev metric at every point) and the same selected model.

The config exercises the whole engine at once: WEINCE (whose lambda couples the anchors
through a batch quantile) with label-aware masking, a learnable temperature, the
memory-linear loss (tiles of 16 for a batch of 32), the gradient cache (chunks of 8), plus a
CoSENT term and VRNS (which couple all pairs: computed on the gathered batch). Both ways
negatives cross ranks are run: OpenCLIP's local loss (the default) and the global loss. The
static encoder has no dropout, so the runs can agree to rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ranks import free_port

pytestmark = pytest.mark.distributed

CONFIG = """\
model: {name: 'static:default'}
loss: {name: weince, temperature: 0.05, learnable_temperature: true, tile_size: 16,
       label_threshold: 0.6, vrns_weight: 0.1, plus: [{name: cosent, weight: 0.5}]}
optim: {lr: 0.05, eps: 1.0e-3}
train: {batch_size: 32, max_examples: 192, seed: 3, gradient_cache: {chunk_size: 8},
        hard_batches: {n_clusters: 64}}
eval: {every_examples: 96, geometry: false, dtype: float32, test: null}
"""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One process's run for a sampler, made once per sampler."""
    runs: dict[str, Path] = {}

    def run(sampler: str) -> Path:
        if sampler not in runs:
            tmp = tmp_path_factory.mktemp(f"one-process-{sampler}")
            config = tmp / "config.yaml"
            config.write_text(CONFIG, encoding="utf-8")
            _run([sys.executable, "-m", "batchscale", "train", str(config), "--no-progress",
                  "--set", f"data.data_dir={shared_data}", "--set", f"train.sampler={sampler}",
                  "--out", str(tmp / "run")])
            runs[sampler] = tmp / "run"
        return runs[sampler]

    return run


# (how negatives cross ranks, sampler): BSC's shuffling is planned by rank 0 from its
# embedding cache and adopted by rank 1.
MODES = [("local", "random"), ("global", "random"), ("local", "bsc_kmeans")]


@pytest.fixture(scope="module", params=MODES, ids=["-".join(m) for m in MODES])
def runs(request: pytest.FixtureRequest, one_process, shared_data: Path,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    mode, sampler = request.param
    tmp = tmp_path_factory.mktemp(f"two-ranks-{mode}-{sampler}")
    config = tmp / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                 "--nproc-per-node=2", "--master-addr=127.0.0.1",
                 f"--master-port={free_port()}", "-m", "batchscale", "train", str(config),
                 "--no-progress", "--set", f"data.data_dir={shared_data}",
                 "--set", f"train.distributed_loss={mode}", "--set", f"train.sampler={sampler}",
                 "--out", str(tmp / "run"), "--dist-timeout", "120"])
    return one_process(sampler), tmp / "run", done.stdout


def test_two_ranks_give_the_curve_of_one_process(runs):
    one, two, _ = runs
    a, b = _curve(one), _curve(two)
    assert [r["examples"] for r in a] == [r["examples"] for r in b] == [0, 96, 192]
    assert [r["steps"] for r in b] == [0, 3, 6]  # global batches of 32, not shares of 16
    assert a[1]["train_loss"] != a[2]["train_loss"]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["dev"]["spearman"] == pytest.approx(ra["dev"]["spearman"], abs=1e-3)
        for key in ("temperature", "weince_mean_lambda", "weince_weibull_share"):
            assert rb["loss_diagnostics"][key] == pytest.approx(ra["loss_diagnostics"][key],
                                                                rel=1e-4)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.rglob("model.safetensors")))


def test_two_ranks_train_the_same_weights(runs):
    one, two, _ = runs
    last = "checkpoint-000000000192"
    wa, wb = (_weights(run / "checkpoints" / last / "model") for run in (one, two))
    selected = [json.loads((run / "best" / "batchscale.json").read_text())["examples"]
                for run in (one, two)]
    assert selected[0] == selected[1]  # by both runs alike
    from batchscale.encoders import SentenceEncoder

    start = {n: p.detach() for n, p in SentenceEncoder.static("default").st[0].named_parameters()}
    assert wa.keys() == wb.keys() == start.keys()
    assert max(float((wa[n] - start[n]).abs().max()) for n in wa) > 1e-3  # it trained
    # AdamW divides by the root of the squared gradients, which turns float32 rounding in
    # near-zero gradients (rows of unused tokens) into steps of up to lr unless eps dominates
    # them: with eps 1e-3 the runs agree to 1e-6 (measured 2.6e-7) while training moves
    # weights by > 1e-3 (measured 0.047).
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name


def test_rank_zero_alone_reports_and_every_rank_state_is_saved(runs):
    _, two, stdout = runs
    assert stdout.count("selected (*)") == 1  # one summary table, from rank 0
    assert (two / "summary.json").is_file() and (two / "final" / "modules.json").is_file()
    from batchscale.training.checkpoint import read_state

    state = read_state(two / "checkpoints" / "checkpoint-000000000192")
    assert len(state["rng"]) == 2


def test_two_ranks_log_the_epochs_of_one_process(runs):
    one, two, _ = runs
    a, b = (json.loads((run / "epochs.jsonl").read_text()) for run in (one, two))
    for key in ("epoch", "examples", "complete", "sampler", "batches", "duplicate_rate"):
        assert a[key] == b[key], key
    assert b["hardest_negative"] == pytest.approx(a["hardest_negative"], abs=1e-5)


def test_batches_that_ranks_cannot_share_are_refused_by_name():
    from batchscale.training import config_from_dict
    from batchscale.training.trainer import check_world_size

    config = config_from_dict({"train": {"batch_size": 30}})
    with pytest.raises(ValueError, match=r"train.batch_size \(30\) must be a multiple .* \(4\)"):
        check_world_size(config, 100, 4)
    # 101 = 3 x 32 + 5: a last batch of 5 for 8 ranks leaves 3 ranks without an example.
    config = config_from_dict({"train": {"batch_size": 32}})
    with pytest.raises(ValueError, match=r"last batch .* 5 example\(s\) for 8 ranks"):
        check_world_size(config, 101, 8)
    check_world_size(config, 101, 4)  # 5 examples for 4 ranks: every rank has one
    check_world_size(config_from_dict({"train": {"batch_size": 32, "drop_last": True}}), 101, 8)
    coord = config_from_dict({"loss": {"normalization": "coord"}, "train": {"batch_size": 32}})
    with pytest.raises(ValueError, match=r"loss\.normalization: coord .*distributed_loss: global"):
        check_world_size(coord, 96, 2)
    check_world_size(coord, 96, 1)  # one process: the local loss is the whole loss
