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


#: glibc's ``M_TRIM_THRESHOLD`` while large allocations come from the heap: freed memory up
#: to this much stays with the process for the next step instead of going back to the OS.
HEAP_TRIM_THRESHOLD = 256 * 2**20


@cache
def keep_large_allocations_in_heap() -> bool:
    """Serve large allocations from the heap instead of fresh ``mmap`` pages (glibc only;
    once per process). A transformer's dense word-embedding gradient (30k x 384 floats,
    47 MB, over glibc's largest mmap threshold) is allocated anew at every step; from
    ``mmap`` every page of it faults on first touch: measured on all-MiniLM-L6-v2 at batch
    16 (one thread, loaded machine), zero-filling it took 82 ms a step from ``mmap`` and
    20 ms from the heap (the static encoder's dense table gradient, likewise). The trainer
    applies it to its process. Returns whether it took effect."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold,
                                                                        HEAP_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
