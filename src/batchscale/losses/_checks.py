"""Input validation shared by the losses: every error names the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_embeddings(caller: str, name: str, x: object, *, min_rows: int = 2) -> Tensor:
    """A 2-D floating tensor of finite values with at least ``min_rows`` rows."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{caller}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{caller}: `{name}` must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{caller}: `{name}` must be floating point, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{caller}: `{name}` needs a batch of at least {min_rows}, got batch {x.shape[0]}"
        )
    if x.shape[1] < 1:
        raise ValueError(f"{caller}: `{name}` has embedding dimension 0")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{caller}: `{name}` holds NaN or Inf values (rows {bad})")
    return x


def check_same_layout(caller: str, name_a: str, a: Tensor, name_b: str, b: Tensor, *,
                      same_rows: bool = True) -> None:
    """Two embedding tensors that can be compared: same dim, dtype, device (and batch)."""
    if same_rows and a.shape != b.shape:
        raise ValueError(
            f"{caller}: `{name_a}` and `{name_b}` must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{caller}: `{name_a}` and `{name_b}` must have the same embedding dimension, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )
    if a.dtype != b.dtype:
        raise ValueError(
            f"{caller}: `{name_a}` and `{name_b}` must have the same dtype, "
            f"got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{caller}: `{name_a}` and `{name_b}` must be on the same device, "
            f"got {a.device} and {b.device}"
        )


def check_temperature(caller: str, temperature: float | Tensor) -> None:
    """tau > 0 and finite; a tensor temperature must be a scalar (it may carry a gradient)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"{caller}: `temperature` must be a scalar, got shape {tuple(temperature.shape)}"
            )
        value = float(temperature.detach())
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        value = float(temperature)
    else:
        raise ValueError(f"{caller}: `temperature` must be a number, got {temperature!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{caller}: `temperature` must be finite and > 0, got {value}")


def check_unit_interval(caller: str, name: str, value: float) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{caller}: `{name}` must be a number in [0, 1], got {value!r}")
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{caller}: `{name}` must be in [0, 1], got {value}")
    return float(value)


def check_choice(caller: str, name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``caller`` and ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{caller}: `{name}` must be one of {list(choices)}, got {value!r}")
    return value


def check_vector(caller: str, name: str, v: object, length: int, device: torch.device, *,
                 integer: bool = False) -> Tensor:
    """A 1-D tensor of ``length`` finite values (integers for ids)."""
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v)
    if v.ndim != 1 or v.shape[0] != length:
        raise ValueError(
            f"{caller}: `{name}` must have shape ({length},), got {tuple(v.shape)}"
        )
    if integer:
        if v.is_floating_point() or v.is_complex():
            raise ValueError(f"{caller}: `{name}` must hold integer ids, got dtype {v.dtype}")
    elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{caller}: `{name}` holds NaN or Inf values")
    return v.to(device)
