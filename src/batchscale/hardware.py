"""What this machine's processor can do, asked of torch once (one place for the probe)."""

from __future__ import annotations

from functools import cache

import torch


@cache
def cpu_has_native_bfloat16() -> bool:
    """Native bfloat16 matrix instructions (AVX512-BF16 or AMX): torch's own check, which
    inductor uses; without them bfloat16 is emulated and slower than float32."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
