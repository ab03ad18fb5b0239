"""Under torchrun the trainer averages the encoder's gradients with DistributedDataParallel:
the model it calls is a DDP instance, the explicit all-reduce (``average_gradients``) gets the
objective's temperature only, and DDP reduces every parameter exactly once per step, with the
gradient cache (several re-encodings per step, all but the last under ``no_sync``) and on the
plain path (one forward per side). A static encoder and the tiny BERT (whose pooler gets no
gradient: ``find_unused_parameters``) run on 2 gloo ranks. That the run equals one process
is tests/test_training_distributed.py's check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranks import run_ranks
from test_gpu_path import _pairs_file

pytestmark = pytest.mark.distributed

_SCRIPT = """\
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from batchscale.batching import end_rank_process, init_distributed, shutdown_distributed
from batchscale.study import train_run
from batchscale.training import config_from_dict
from batchscale.training import trainer as module

out, data, tiny = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
info = init_distributed(backend="gloo", timeout_s=60)
record = {}
wrap, average, step = module.data_parallel, module.average_gradients, module.Trainer._step


def counting_wrap(encoder, **kwargs):
    model = wrap(encoder, **kwargs)
    record["model"] = type(model).__name__
    if hasattr(model, "register_comm_hook"):
        def hook(state, bucket):  # each bucket's reduction: how many numbers it carries
            record["reduced"].append(bucket.buffer().numel())
            return allreduce_hook(None, bucket)
        model.register_comm_hook(None, hook)
    return model


def spy_average(parameters, group=None):
    parameters = list(parameters)
    record["explicit"].append([tuple(p.shape) for p in parameters])
    return average(parameters, group)


def counted_step(self, indices):
    before = len(record["reduced"])
    loss = step(self, indices)
    record["per_step"].append(sum(record["reduced"][before:]))
    record["trainer"] = self
    return loss


module.data_parallel = counting_wrap
module.average_gradients = spy_average
module.Trainer._step = counted_step
results = {}
for model in ("static:default", tiny):
    for cache in (True, False):
        record.update(reduced=[], explicit=[], per_step=[])
        config = config_from_dict({
            "model": {"name": model},
            "data": {"train": data, "score_column": "score", "score_range": [0, 5],
                     "dev_holdout": 0.25},
            "loss": {"name": "infonce", "learnable_temperature": True},
            "optim": {"lr": 1e-2},
            "train": {"batch_size": 16, "max_steps": 3, "seed": 1,
                      "gradient_cache": {"chunk_size": 4} if cache else None},
            "eval": {"dev": {"task": "pairs", "split": "holdout"}, "test": None,
                     "every_examples": 32, "dtype": "float32", "geometry": False},
        })
        name = f"{'static' if model.startswith('static') else 'bert'}-{cache}"
        train_run(config, out / name, show_progress=False)
        encoder = record.pop("trainer").encoder
        trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        results[name] = {**{k: record[k] for k in ("model", "explicit", "per_step")},
                         "trained": trained,
                         "weights": {k: v.clone() for k, v in encoder.state_dict().items()}}
torch.save(results, out / f"rank{info.rank}.pt")
shutdown_distributed()
end_rank_process(0)  # DDP ran: no interpreter teardown (see end_rank_process)
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory, tiny_st_dir: Path) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_ranks.py"
    script.write_text(_SCRIPT, encoding="utf-8")
    return run_ranks(script, [str(tmp), str(_pairs_file(tmp)), str(tiny_st_dir)], tmp,
                     timeout=300)


RUNS = ["static-True", "static-False", "bert-True", "bert-False"]


@pytest.mark.parametrize("name", RUNS)
def test_ddp_averages_the_encoder_and_the_explicit_all_reduce_the_temperature(ranks, name):
    for rank in ranks:
        run = rank[name]
        assert run["model"] == "DistributedDataParallel"
        # one explicit all-reduce per step, of the learnable temperature alone
        assert run["explicit"] == [[()]] * 3 or run["explicit"] == [[(1,)]] * 3, run["explicit"]


@pytest.mark.parametrize("name", RUNS)
def test_ddp_reduces_every_parameter_once_per_step(ranks, name):
    """The numbers DDP's buckets carry in a step are the encoder's trainable parameters,
    once: the gradient cache's re-encodings and the plain path's sides do not reduce again."""
    for rank in ranks:
        run = rank[name]
        assert run["per_step"] == [run["trained"]] * 3


@pytest.mark.parametrize("name", RUNS)
def test_the_ranks_hold_the_same_plain_weights(ranks, name):
    a, b = (rank[name]["weights"] for rank in ranks)
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
