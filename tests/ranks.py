"""Launching a test script under torchrun: 2 gloo ranks on this machine, each writing its
results to OUT/rank{r}.pt."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str | Path, args: list[str], out: Path, *, timeout: int = 180,
              ranks: int = 2) -> list[dict]:
    """Run ``script args`` on ``ranks`` processes (torch.distributed.run, one OpenMP thread
    each) and load what each rank saved to ``out/rank{r}.pt``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(ranks)]
