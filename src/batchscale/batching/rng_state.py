"""Snapshot and replay of the random number generators, so that a second forward pass draws
the same dropout masks as the first (GradCache's ``RandContext``: Gao, Zhang, Han, Callan,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, when CUDA is in use, every visible GPU's."""

    cpu: Tensor
    cuda: tuple[Tensor, ...] = ()

    @classmethod
    def capture(cls) -> RngState:
        # Only an initialised CUDA context can have drawn numbers; asking otherwise would
        # initialise CUDA (slow, and wrong in a CPU-only process).
        cuda: tuple[Tensor, ...] = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators are put back as they were on exit,
        so replaying does not shift the random stream of what comes after."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in zip(devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield
