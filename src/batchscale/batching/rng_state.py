"""Snapshot and replay of the random number generators, so that a second forward pass draws
the same dropout masks as the first (GradCache's ``RandContext``: Gao, Zhang, Han, Callan,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021).

Only the CPU generator and the CUDA devices named are captured (GradCache's
``get_device_states`` takes its inputs' devices): asking a GPU for its generator creates a
CUDA context on it, which every rank of a multi-GPU machine would otherwise do on every GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


def cuda_indices(devices: Iterable[torch.device | str]) -> tuple[int, ...]:
    """The CUDA device indices among ``devices`` (``cuda`` alone: the current device),
    sorted, each once."""
    out = set()
    for device in devices:
        d = torch.device(device)
        if d.type == "cuda":
            out.add(d.index if d.index is not None else torch.cuda.current_device())
    return tuple(sorted(out))


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and the states of the CUDA devices ``devices``."""

    cpu: Tensor
    cuda: tuple[Tensor, ...] = ()
    devices: tuple[int, ...] = ()

    @classmethod
    def capture(cls, devices: Iterable[torch.device | str] = ()) -> RngState:
        """The current state of the CPU generator and of the CUDA ``devices`` (CPU devices
        among them are ignored)."""
        indices = cuda_indices(devices)
        return cls(torch.get_rng_state(), tuple(torch.cuda.get_rng_state(i) for i in indices),
                   indices)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators are put back as they were on exit,
        so replaying does not shift the random stream of what comes after."""
        with torch.random.fork_rng(devices=list(self.devices), device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield
