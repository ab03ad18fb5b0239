"""``benchmarks/gpu_check.sh --cpu``, the dry run of the GPU check (issue 21): every step runs
on the CPU at tiny sizes (gloo for NCCL) and the table reports each as ok, so that the script
that only a GPU machine runs in full is known to work before it gets there."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_gpu_check_dry_run_passes_every_step() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = done.stdout[done.stdout.index("gpu_check (cpu)"):]
    rows = [line.split(" | ") for line in table.splitlines()[3:] if " | " in line]
    checks = [r[0].strip() for r in rows]
    assert checks == ["pytest -m cuda", "torchrun gloo train", "torchrun gloo --resume",
                      "train pairs/s", "train pairs/s", "loss fwd+bwd", "loss fwd+bwd"], table
    assert all(r[-1].strip() == "ok" for r in rows), table
    assert "skipped" in rows[0][2]  # the CUDA tests are collected, and skip on a CPU
    print(f"dry run: {seconds:.0f} s")  # 36 s on 2 shared cores
