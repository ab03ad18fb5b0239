"""A trainable temperature, parametrised as 1/tau (BSC's "trainable temperature"; the
logit scale of CLIP, Radford et al. 2021).

The parameter is clamped to [1/max_temperature, 1/min_temperature] in ``forward`` so a loss
never sees a degenerate tau, and :meth:`clamp_` pulls it back after each optimiser step so
the gradient does not die at the bound. Give it its own learning rate (~1e-3) in a separate
optimiser parameter group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnableTemperature(nn.Module):
    """``tau = 1 / clamp(inverse_temperature)``; call the module to get tau as a 0-dim tensor."""

    def __init__(self, initial: float = 0.05, min_temperature: float = 0.01,
                 max_temperature: float = 1.0) -> None:
        super().__init__()
        for name, value in (("initial", initial), ("min_temperature", min_temperature),
                            ("max_temperature", max_temperature)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LearnableTemperature: `{name}` must be finite and > 0, "
                                 f"got {value!r}")
        if not min_temperature <= initial <= max_temperature:
            raise ValueError(
                "LearnableTemperature: need min_temperature <= initial <= max_temperature, got "
                f"{min_temperature} <= {initial} <= {max_temperature}"
            )
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.inverse_temperature = nn.Parameter(torch.tensor(1.0 / initial))

    def forward(self) -> Tensor:
        scale = self.inverse_temperature.clamp(1.0 / self.max_temperature,
                                               1.0 / self.min_temperature)
        return 1.0 / scale

    @torch.no_grad()
    def clamp_(self) -> None:
        self.inverse_temperature.clamp_(1.0 / self.max_temperature, 1.0 / self.min_temperature)

    def extra_repr(self) -> str:
        return (f"tau={float(self()):.4g}, range=[{self.min_temperature}, "
                f"{self.max_temperature}]")
