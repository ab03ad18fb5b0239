"""The training loop: contrastive fine-tuning measured by examples seen.

Evaluation points fall every ``eval.every_examples`` examples (plus the start and the end),
so runs at different batch sizes are measured at the same abscissae. At each point the
trainer evaluates on dev (through the ``evaluate`` callable it is given: the trainer does
not know the task), appends a line to ``curve.jsonl``, keeps the best model by the dev metric
in ``best/``, and writes an atomic checkpoint from which ``resume`` continues exactly: the
resumed run yields the same curve as an uninterrupted one.

A NaN or Inf in the loss or in the gradients stops the run before the optimiser step with
:class:`TrainingDiverged`, naming the step; the last checkpoint is left as it was.

Under ``torchrun`` (a process group is up, :func:`~batchscale.batching.init_distributed`)
each rank trains on its share of every global batch (the sampler shards it), the objective
takes the negatives from every rank (``train.distributed_loss``: OpenCLIP's local loss or the
global one, see :class:`~batchscale.training.Objective`) and the gradients are averaged, so
the run equals one process on the whole batch. The encoder's gradients are averaged by torch's
DistributedDataParallel (:func:`~batchscale.batching.distributed.data_parallel`: bucketed,
overlapped with the backward), which reduces once per step: every forward but the step's
last runs under ``no_sync`` (the sides of the plain path; the gradient cache's re-encodings);
a packing transformer (:attr:`SentenceEncoder.packs_sequences`) encodes a step's sides in one
forward.
The objective's parameters (a learnable temperature), which DDP does not hold, are averaged by
one explicit all-reduce after the backward; so is an encoder that DDP cannot take (held off
the collective device, e.g. a static encoder on the CPU under NCCL). Checkpoints and the
selected model hold the plain encoder's weights.
``train.batch_size`` is the global batch. Rank 0 alone evaluates, writes the curve, the
selected model and the checkpoints (with every rank's random state); every rank resumes from
them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..batching import cached_backward
from ..batching.distributed import (
    agree,
    average_gradients,
    barrier,
    broadcast_parameters,
    data_parallel,
    gather_rows,
    mean_across_ranks,
    rank,
    world_size,
)
from ..encoders import SentenceEncoder
from ..hardware import keep_large_allocations_in_heap
from .checkpoint import (
    atomic_directory,
    atomic_write_text,
    checkpoint_name,
    latest_checkpoint,
    read_state,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
    write_state,
)
from .composition import BatchComposition, budgeted
from .config import RunConfig, dump_config, run_identity, term_key
from .examples import TrainingSet
from .objective import FalseNegativeIds, Objective
from .schedule import log_points, next_point, scaled_lr, warmup_linear, warmup_steps
from .sparse import LazyAdamW, clip_gradients

Evaluator = Callable[[SentenceEncoder], dict[str, Any]]

CURVE = "curve.jsonl"
EPOCHS = "epochs.jsonl"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"
TENSORBOARD = "tensorboard"
FINAL = "final"


def scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Every finite number of an evaluation record, nested keys joined by '/'
    (``dev/spearman``, ``dev/geometry/uniformity``)."""
    out: list[tuple[str, float]] = []
    for k, v in record.items():
        tag = f"{prefix}{k}"
        if isinstance(v, dict):
            out += scalars(v, tag + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((tag, float(v)))
    return out


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN / Inf."""


class RunDirectoryError(ValueError):
    """An output directory that holds another run, or a resume that does not match it."""


@dataclass
class Progress:
    """Counters that a checkpoint carries."""

    step: int = 0
    epoch: int = 0
    examples: int = 0
    next_eval: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    curve_points: int = 0
    best_metric: float | None = None
    best_examples: int | None = None
    loss_sum: float = 0.0
    loss_steps: int = 0
    epoch_records: int = 0

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FitResult:
    curve: list[dict[str, Any]]
    best_metric: float | None
    best_examples: int | None
    train_seconds: float
    examples: int
    out_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_second(self) -> float:
        return self.examples / self.train_seconds if self.train_seconds > 0 else float("nan")


def check_world_size(config: RunConfig, num_examples: int, world: int) -> None:
    """Every rank needs a non-empty share of every batch (its collectives must run)."""
    t = config.train
    if t.batch_size % world:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of the number "
                         f"of ranks ({world}): each rank takes an equal share of every batch")
    rest = num_examples % t.batch_size
    if world > 1 and rest and rest < world and not t.drop_last and not budgeted(config):
        raise ValueError(f"the last batch of each epoch has {rest} example(s) for {world} "
                         "ranks, so a rank would get none; set train.drop_last: true or "
                         "change train.batch_size")
    for i, term in enumerate(config.loss.terms()):  # (that N divides B: the config's check)
        n = term.softmax_batch
        if n is not None and rest % n and not t.drop_last and not budgeted(config):
            raise ValueError(f"{term_key(i, 'softmax_batch')} ({n}): the last batch of each "
                             f"epoch has {rest} pairs, which softmax blocks of {n} do not "
                             "divide; set train.drop_last: true, or a budget "
                             "(train.max_examples / max_steps: every batch is then whole)")
    coord = [term_key(i, "normalization")
             for i, term in enumerate(config.loss.terms()) if term.normalization == "coord"]
    if world > 1 and coord and t.distributed_loss == "local":
        raise ValueError(f"{coord[0]}: coord normalises over the whole batch, which the local "
                         "loss does not see on one rank; set train.distributed_loss: global")


def _gather_rng_states() -> list[dict[str, Tensor]]:
    """Every rank's random state, rank 0 first (tensors, so no pickling crosses ranks)."""
    state = rng_state()
    gathered = {k: gather_rows(torch.stack(list(v)) if isinstance(v, list) else v[None])
                for k, v in state.items()}
    return [{k: v[r] for k, v in gathered.items()} for r in range(world_size())]


class Trainer:
    """Fine-tunes ``encoder`` on ``data`` with ``objective``; see the module docstring.

    ``evaluate(encoder)`` returns the dev metrics (a flat dict of numbers, ``metric`` among
    them); it must leave the encoder's weights alone.
    """

    def __init__(self, encoder: SentenceEncoder, objective: Objective, data: TrainingSet,
                 config: RunConfig, out_dir: str | Path, evaluate: Evaluator, *,
                 show_progress: bool = True) -> None:
        if objective.needs_labels and data.labels is None:
            raise ValueError(f"loss: {', '.join(config.loss.scored_terms)} needs a graded label "
                             f"on every training pair; data.train ({config.data.train}) has none")
        self.encoder = encoder
        self.objective = objective
        self.data = data
        self.config = config
        self.out = Path(out_dir)
        self.evaluate = evaluate
        self.metric = config.eval.metric
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        self.show_progress = show_progress and self.is_main
        t = config.train
        check_world_size(config, len(data), self.world)
        self.composition = BatchComposition(config, data, encoder, rank=self.rank,
                                            world_size=self.world)
        self.sampler = self.composition.sampler
        self.steps_per_epoch = len(self.sampler)
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.max_examples is not None:
            self.total_steps = math.ceil(t.max_examples / t.batch_size)
        else:
            self.total_steps = max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.lr = scaled_lr(config.optim.lr, t.batch_size, config.optim.reference_batch_size,
                            config.optim.lr_scaling)
        self.optimizer = self._optimizer()
        # A static encoder's steps look token ids up instead of tokenising (one pass here).
        encoder.cache_texts(text for column in data.columns for text in column)
        # A dense 47 MB embedding gradient (a transformer's word embeddings, a dense static
        # table) is allocated every step: from the heap it is not page-faulted in anew.
        keep_large_allocations_in_heap()
        warm = warmup_steps(self.total_steps, config.optim.warmup)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_linear(s, total, warm))
        self.progress = Progress()
        e = config.eval
        self.eval_points = (log_points(self._total_examples(), e.points, t.batch_size,
                                       e.align_points)
                            if e.schedule == "log" else None)
        self._tensorboard = None
        # The module the steps call: DDP over the encoder under torchrun (it copies rank 0's
        # weights to every rank), the encoder itself in one process. A transformer's pooler
        # gets no gradient from sentence-transformers' pooling: DDP must look for it.
        self.model = data_parallel(encoder, find_unused_parameters=not encoder.is_static)
        in_ddp = {id(p) for p in self.model.parameters()} if self.ddp else set()
        self._explicit = [p for p in self.parameters if id(p) not in in_ddp]
        broadcast_parameters(self._explicit)

    # -- set-up -----------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        decay, no_decay = [], []
        for p in self.encoder.parameters():
            if p.requires_grad:
                # As transformers' Trainer: no weight decay on biases and LayerNorm weights.
                (no_decay if p.ndim < 2 else decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": o.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}]
        groups += self.objective.param_groups()
        groups = [g for g in groups if g["params"]]
        if o.sparse:
            return self._sparse_optimizer(groups)
        # The fused kernel: one pass over each parameter, ~10x faster than the per-tensor
        # loop on a CPU for a large embedding matrix (a static encoder's 30k x 384).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=self.lr, betas=o.betas, eps=o.eps,
                                 fused=fused or None)

    def _sparse_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """``optim.sparse``: the static encoder's sparse gradients and lazy AdamW."""
        if not self.encoder.is_static:
            raise ValueError(f"optim.sparse: needs a static encoder (model.name: static:...), "
                             f"got {self.config.model.name!r}; set optim.sparse: false")
        if self.world > 1:
            raise ValueError("optim.sparse: sparse gradients are not averaged across ranks; "
                             "set optim.sparse: false under torchrun")
        self.encoder.sparse_gradients = True
        o = self.config.optim
        return LazyAdamW(groups, lr=self.lr, betas=o.betas, eps=o.eps)

    @property
    def parameters(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def ddp(self) -> bool:
        """Whether DistributedDataParallel averages the encoder's gradients."""
        return isinstance(self.model, DistributedDataParallel)

    def _no_sync(self) -> Callable[[], AbstractContextManager[object]] | None:
        """The context under which a forward leaves DDP's reduction for a later one."""
        return self.model.no_sync if self.ddp else None

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if not self.config.train.bf16:
            return nullcontext()
        return torch.autocast(self.encoder.device.type, dtype=torch.bfloat16)

    def _encode(self, features: dict[str, Tensor]) -> Tensor:
        with self._autocast():
            emb = self.model(features)
        return emb.float()

    def _encode_sides(self, features: list[dict[str, Tensor]]) -> list[Tensor]:
        """Each side's embeddings with a graph; under DDP only the last side's forward
        prepares the reduction (the one backward then reduces every side's gradient once).
        A packing transformer encodes the sides in one forward, split back by rows (the
        same embeddings: each text is encoded on its own tokens)."""
        joined = self.encoder.join_training_features(features)
        if joined is not None:
            return list(self._encode(joined).split([len(f["attention_mask"]) for f in features]))
        no_sync = self._no_sync()
        last = len(features) - 1
        out = []
        for i, f in enumerate(features):
            with nullcontext() if no_sync is None or i == last else no_sync():
                out.append(self._encode(f))
        return out

    def _objective(self, embeddings: list[Tensor], labels: Tensor | None,
                   ids: FalseNegativeIds | None = None,
                   indices: list[int] | None = None) -> Tensor:
        self.composition.observe(embeddings)
        return self.objective(embeddings, labels, ids, indices=indices)

    def _backward(self, sides: list[list[str]], labels: Tensor | None,
                  ids: FalseNegativeIds | None = None,
                  indices: list[int] | None = None) -> Tensor:
        """Loss of the batch (0-dim, on the device: not read here); its gradients
        accumulated into ``.grad`` (averaged over ranks). Under the local loss each rank
        holds part of the loss: the mean over ranks is it."""
        features = [self.encoder.training_features(texts) for texts in sides]
        if labels is not None:
            labels = self._to_device(labels)
        gc = self.config.train.gradient_cache
        if gc is not None:
            chunk = gc.chunk_size if gc.chunk_size or gc.max_tokens else 32
            loss = cached_backward(self._encode, features,
                                   lambda *embs: self._objective(list(embs), labels, ids, indices),
                                   chunk_size=None if gc.max_tokens else chunk,
                                   max_tokens=gc.max_tokens, sort_by_length=gc.sort_by_length,
                                   no_sync=self._no_sync(), devices=[self.encoder.device])
        else:
            features = [{k: self._to_device(v) for k, v in f.items()} for f in features]
            loss = self._objective(self._encode_sides(features), labels, ids, indices)
            loss.backward()
        average_gradients(self._explicit)  # what DDP does not hold (all of it without DDP)
        return mean_across_ranks(loss.detach())  # the same value on every rank

    def _to_device(self, x: Tensor) -> Tensor:
        """``x`` on the encoder's device; to a GPU from pinned memory, without waiting for
        the copy (the gradient cache's chunks are copied by the encoder, from the host)."""
        device = self.encoder.device
        if device.type != "cuda" or x.device == device:
            return x.to(device)
        return x.pin_memory().to(device, non_blocking=True)

    def _checked(self, loss: Tensor, norm: Tensor) -> float:
        """The loss's value, read together with the gradient norm: the step's one host
        read, before the optimiser step. A NaN or Inf in either stops the run (both are the
        same on every rank, so every rank stops)."""
        values = torch.stack([loss.detach().to(norm.device, torch.float64).reshape(()),
                              norm.detach().to(torch.float64).reshape(())]).tolist()
        for what, value in zip(("the loss", "the gradient norm"), values, strict=True):
            if not math.isfinite(value):
                p = self.progress
                last = latest_checkpoint(self.out / CHECKPOINTS)
                raise TrainingDiverged(
                    f"step {p.step + 1} (after {p.examples} examples): {what} is {value}; "
                    f"stopped before the optimiser step. The last good checkpoint is "
                    f"{last if last is not None else '(none yet)'}; lower optim.lr, set "
                    "optim.max_grad_norm or train.bf16: false and start again")
        return values[0]

    def _step(self, indices: list[int]) -> float:
        sides, labels = self.data.batch(indices)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(sides, labels, self.composition.false_negative_ids(indices),
                              indices)  # the examples' ids for a per-example loss state
        max_norm = self.config.optim.max_grad_norm
        norm = clip_gradients(self.parameters, max_norm)  # sparse gradients too
        value = self._checked(loss, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.objective.after_step()
        return value

    # -- evaluation points ------------------------------------------------------------------
    def _point(self, started: float, bar) -> None:
        # Collectives first, on every rank, before rank 0 alone goes on.
        rngs = _gather_rng_states()
        diagnostics = self.objective.pop_diagnostics(reduce=mean_across_ranks)
        if self.is_main:
            self._main_point(started, bar, rngs, diagnostics)
        else:  # the same counters as rank 0, for a consistent resume
            p = self.progress
            p.loss_sum, p.loss_steps = 0.0, 0
            p.curve_points += 1
            p.wall_seconds += time.perf_counter() - started
        barrier(f"the evaluation point after {self.progress.examples} examples (rank 0 "
                "evaluates and writes the checkpoint meanwhile)")

    def _main_point(self, started: float, bar, rngs: list[dict[str, Tensor]],
                    diagnostics: dict[str, float]) -> None:
        p = self.progress
        t0 = time.perf_counter()
        metrics = self.evaluate(self.encoder)
        if self.metric not in metrics:
            raise KeyError(f"eval.metric: the dev evaluation has no {self.metric!r} "
                           f"(it has {sorted(metrics)})")
        value = float(metrics[self.metric])
        record: dict[str, Any] = {
            "examples": p.examples,
            "steps": p.step,
            "epoch": p.examples / len(self.data),
            "seconds": p.train_seconds,
            "wall_seconds": p.wall_seconds + (time.perf_counter() - started),
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": p.loss_sum / p.loss_steps if p.loss_steps else None,
            "dev": metrics,
            "eval_seconds": time.perf_counter() - t0,
        }
        if diagnostics:
            record["loss_diagnostics"] = diagnostics
        p.loss_sum, p.loss_steps = 0.0, 0
        if p.best_metric is None or value > p.best_metric:
            p.best_metric, p.best_examples = value, p.examples
            atomic_directory(self.out / BEST, self._save_model)
        record["best"] = p.best_examples == p.examples
        self._append_line(CURVE, record)
        if self.config.eval.tensorboard:
            self._write_tensorboard(record)
        p.curve_points += 1
        p.wall_seconds += time.perf_counter() - started
        self._checkpoint(rngs)
        if bar is not None:
            bar.set_postfix({"loss": record["train_loss"], f"dev {self.metric}": value},
                            refresh=False)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        """The point's numbers as TensorBoard scalars, against examples seen (the study's
        abscissa); a resumed run purges the events written after its checkpoint."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("eval.tensorboard needs the tensorboard package: pip "
                                   "install 'batchscale[tensorboard]'") from None
            self._tensorboard = SummaryWriter(str(self.out / TENSORBOARD),
                                              purge_step=record["examples"])
        step = record["examples"]
        for tag, value in scalars(record):
            self._tensorboard.add_scalar(tag, value, step)
        self._tensorboard.flush()

    def _save_model(self, folder: Path) -> None:
        self.encoder.save(folder)
        (folder / "batchscale.json").write_text(json.dumps({
            "examples": self.progress.examples, "steps": self.progress.step,
            f"dev_{self.metric}": self.progress.best_metric}), encoding="utf-8")

    def _append_line(self, name: str, record: dict[str, Any]) -> None:
        """One JSON line appended to OUT/name, on disk before the next checkpoint counts it."""
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_curve(self) -> list[dict[str, Any]]:
        return self._read_lines(CURVE)

    def _read_lines(self, name: str) -> list[dict[str, Any]]:
        path = self.out / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]

    def _end_epoch(self, complete: bool) -> None:
        """Append the epoch's composition record (rank 0 writes it)."""
        p = self.progress
        if self.is_main:
            self._append_line(EPOCHS, self.composition.epoch_record(p.epoch, p.examples,
                                                                    complete))
        p.epoch_records += 1

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, rngs: list[dict[str, Tensor]]) -> None:
        p = self.progress
        folder = self.out / CHECKPOINTS
        state = {
            "progress": p.state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "composition": self.composition.state(),
            "objective": self.objective.state_dict(),
            "rng": rngs,
        }

        def write(tmp: Path) -> None:
            self.encoder.save(tmp / "model")
            write_state(tmp, state)

        atomic_directory(folder / checkpoint_name(p.examples), write)
        done = sorted(c for c in folder.iterdir() if c.name.startswith("checkpoint-"))
        for old in done[: -self.config.checkpoint.keep]:
            shutil.rmtree(old)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out / CHECKPOINTS)
        assert ckpt is not None  # checked by _check_start, with the config
        state = read_state(ckpt)
        loaded = SentenceEncoder.load(ckpt / "model", device=self.encoder.device)
        self.encoder.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if "composition" in state:
            self.composition.load_state(state["composition"])
        self.objective.load_state_dict(state["objective"])
        rngs = state["rng"]
        # Each rank its own stream; a run resumed on more ranks than it had starts the new
        # ranks from rank 0's state.
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.progress = Progress(**state["progress"])
        if self.is_main:
            # Points and epochs written after the checkpoint are replayed, so they are dropped.
            kept = ((CURVE, self.progress.curve_points), (EPOCHS, self.progress.epoch_records))
            for name, count in kept:
                lines = self._read_lines(name)[:count]
                atomic_write_text(self.out / name, "".join(json.dumps(r) + "\n" for r in lines))

    def _start(self, resume: bool) -> None:
        # Every rank checks the run directory before rank 0 changes it, and they agree, so
        # that no rank goes on to wait for one that refused.
        error: Exception | None = None
        try:
            self._check_start(resume)
        except (RunDirectoryError, OSError) as e:
            error = e
        if not agree(error is None, "the run directory"):
            raise error or RunDirectoryError(f"{self.out}: another rank refused the run "
                                             "directory (see rank 0's error)")
        if resume:
            self._resume()
        else:
            if self.is_main:
                atomic_write_text(self.out / CONFIG, dump_config(self.config))
            self.progress = Progress(next_eval=0 if self.config.eval.at_start
                                     else self._next_point(0))
        barrier("the start of the run")

    def _check_start(self, resume: bool) -> None:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            remove_stale_temporaries(self.out / CHECKPOINTS)
        if resume:
            if latest_checkpoint(self.out / CHECKPOINTS) is None:
                raise RunDirectoryError(f"{self.out}: no checkpoint to resume from")
            # Checked on every rank before they agree; a rank's own device does not count.
            saved = (self.out / CONFIG).read_text(encoding="utf-8")
            if run_identity(saved) != run_identity(dump_config(self.config)):
                raise RunDirectoryError(
                    f"{self.out / CONFIG}: the run was started with another config; resume "
                    "with the same config (and --set values), or train into a new --out")
            return
        if latest_checkpoint(self.out / CHECKPOINTS) is not None or (self.out / CURVE).exists():
            raise RunDirectoryError(f"{self.out}: holds a run already; pass --resume to "
                                    "continue it or choose another --out")

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> FitResult:
        from tqdm.auto import tqdm

        self._start(resume)
        p = self.progress
        started = time.perf_counter()
        total_examples = self._total_examples()
        self.encoder.train()
        with tqdm(total=total_examples, initial=p.examples, unit="pair", unit_scale=True,
                  desc="train", disable=not self.show_progress, dynamic_ncols=True) as bar:
            if p.examples >= p.next_eval and p.step == 0 and p.curve_points == 0:
                self._point(started, bar)
                started = time.perf_counter()
                p.next_eval = self._next_point(0)
            while p.step < self.total_steps:
                p.train_seconds += self.composition.plan(p.epoch)
                for indices in self.sampler:
                    t0 = time.perf_counter()
                    loss = self._step(indices)
                    p.train_seconds += time.perf_counter() - t0
                    p.step += 1
                    p.examples += self.sampler.last_batch_size
                    p.loss_sum += loss
                    p.loss_steps += 1
                    bar.update(self.sampler.last_batch_size)
                    last = p.step >= self.total_steps
                    if last:  # before the final checkpoint, which then counts it
                        self._end_epoch(complete=self.sampler.position == len(self.sampler))
                    if p.examples >= p.next_eval or last:
                        p.next_eval = self._next_point(p.examples)
                        self._point(started, bar)
                        started = time.perf_counter()
                    if last:
                        break
                else:
                    self._end_epoch(complete=True)
                    p.epoch += 1
                    continue
                break
        if self._tensorboard is not None:
            self._tensorboard.close()
        return FitResult(self.read_curve(), p.best_metric, p.best_examples, p.train_seconds,
                         p.examples, self.out)

    def _next_point(self, done: int) -> int:
        return next_point(done, every=self.config.eval.every_examples,
                          schedule=self.eval_points)

    def _total_examples(self) -> int:
        if budgeted(self.config):  # every step takes a whole batch
            return self.total_steps * self.config.train.batch_size
        per_epoch = len(self.data) if not self.config.train.drop_last else \
            self.steps_per_epoch * self.config.train.batch_size
        full, rest = divmod(self.total_steps, self.steps_per_epoch)
        last_epoch = min(rest * self.config.train.batch_size, per_epoch)
        return full * per_epoch + last_epoch

    def finalize(self) -> Path:
        """Copy the selected model to ``final/`` (atomically) and return its path."""
        best = self.out / BEST
        if not best.is_dir():
            raise RunDirectoryError(f"{best}: no selected model (no evaluation point ran)")
        return atomic_directory(self.out / FINAL,
                                lambda tmp: shutil.copytree(best, tmp, dirs_exist_ok=True))
