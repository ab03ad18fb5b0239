"""The gradient cache's RNG snapshots cover the CPU and the CUDA devices in use only: asking
every visible GPU for its generator would create a CUDA context on each, from every rank."""

from __future__ import annotations

import torch

from batchscale.batching.chunking import Chunk
from batchscale.batching.gradient_cache import rng_devices
from batchscale.batching.rng_state import RngState, cuda_indices


def test_only_the_named_cuda_devices_are_captured() -> None:
    assert cuda_indices(["cuda:1", torch.device("cuda", 1), "cpu", "cuda:0"]) == (0, 1)
    state = RngState.capture(["cpu", "meta"])  # no CUDA device named: none touched
    assert state.devices == () and state.cuda == ()


def test_the_devices_are_the_given_ones_else_the_inputs() -> None:
    chunk = Chunk({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, torch.arange(2))
    assert rng_devices([chunk]) == [torch.device("cpu")]
    assert rng_devices([chunk], ["cuda:2"]) == [torch.device("cuda", 2)]


def test_a_replay_draws_the_captured_numbers_and_restores_the_stream() -> None:
    state = RngState.capture(["cpu"])
    first = torch.rand(4)
    after = torch.get_rng_state()
    with state.replay():
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(torch.get_rng_state(), after)
