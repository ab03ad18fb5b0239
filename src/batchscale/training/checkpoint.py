"""Atomic checkpoints without pickle.

A checkpoint is a directory: ``model/`` (sentence-transformers format, safetensors), and the
training state split into ``state.safetensors`` (every tensor: optimiser moments, RNG states,
a sampler's plan) and ``state.json`` (everything else, with references to the tensors).
Loading never unpickles anything.

Writes are atomic: the directory is written under a temporary name, every file and the
directory are fsync'ed, and only then is it renamed into place (a rename is atomic on
POSIX). A crash leaves either the old checkpoint or the new one, never half of one; stale
temporaries are removed on the next write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

TMP_PREFIX = ".tmp-"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any) -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able structure, tensors by name): each tensor replaced by a reference.

    Dicts (any scalar keys, restored as they were), lists, tuples, str, int, float, bool and
    None are kept; anything else is an error (so nothing needs pickle)."""
    tensors: dict[str, Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().cpu().contiguous()
            return {_TENSOR: name}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (str, bool, int, float)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint: {x!r}")

    return walk(obj), tensors


def unflatten_state(meta: Any, tensors: dict[str, Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if _TENSOR in x:
                return tensors[x[_TENSOR]]
            if _TUPLE in x:
                return tuple(walk(v) for v in x[_TUPLE])
            return {walk(k): walk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(meta)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_directory(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, fsync it, then move it to ``target`` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f"{TMP_PREFIX}{target.name}.old.{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary, fsync and rename: a reader (or a crash) sees the old
    file or the new one, never a part; a failed write leaves no temporary behind."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_state(folder: Path, state: dict[str, Any]) -> None:
    meta, tensors = flatten_state(state)
    save_file(tensors, str(folder / "state.safetensors"))
    (folder / "state.json").write_text(json.dumps(meta), encoding="utf-8")


def read_state(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{folder}: unreadable checkpoint ({e})") from e
    return unflatten_state(meta, tensors)


def remove_stale_temporaries(folder: Path) -> None:
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def checkpoint_name(examples: int) -> str:
    return f"checkpoint-{examples:012d}"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporaries are never complete)."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir()
                  if p.name.startswith("checkpoint-") and (p / "state.json").is_file())
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
