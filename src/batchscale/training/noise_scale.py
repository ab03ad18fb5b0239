r"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 during training (McCandlish, Kaplan,
Amodei et al., "An Empirical Model of Large-Batch Training", arXiv 1812.06162).

For i.i.d. per-example gradients g with mean G and covariance Sigma, a gradient measured on a
batch of B examples has E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measured at two sizes B_small <
B_big, the two-batch estimator of their appendix A is unbiased for both parts:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and B_simple is the ratio of the averages of these estimates over several measurements
(:func:`two_batch_estimate`, :class:`NoiseScaleAccumulator`; like theirs, optionally as
exponential moving averages).

:func:`measure_noise_scale` measures them at the training batch size B = ``batch_size``:
for each of ``batches`` probe batches drawn apart from training it encodes every side of the
batch, computes the objective's loss L of the **whole** batch, takes dL/de for every
embedding once, and pulls it back through the encoder chunk by chunk (the gradient cache's
replay, :func:`batchscale.batching.cached_backward`): with k = ``chunks`` equal chunks of
b = B / k pairs (rows [c b, (c+1) b) of every side), G_c = k x (the parameter gradient carried
by chunk c's embeddings). Then G_big = mean_c G_c is exactly the batch's gradient (B_big = B)
and |G_small|^2 = mean_c |G_c|^2 (B_small = b).

What this measures under in-batch negatives
-------------------------------------------
A batch-softmax loss is not a mean of independent per-example losses: every anchor's softmax
runs over the batch's other pairs. The gradient still splits exactly over the examples'
encoder passes, G_big = mean_i g_i with g_i = B (de_i/dtheta)^T dL/de_i (example i as an
anchor, as its own positive and as everyone else's negative), but the g_i of a batch are not
independent: each depends on the whole batch through the softmax normalisers. The estimator
resamples only *which examples carry the gradient*; the loss, its negatives and its
normalisers stay those of the full batch. So:

* tr(Sigma) here is the expected within-batch variance of the contributions g_i (a random
  partition into chunks makes the estimate the batch's unbiased sample variance), i.e. the
  anchor-sampling noise at a fixed negative set;
* |G|^2 here is E|G_big|^2 - E[tr(Sigma)] / B: the squared mean batch gradient plus the
  between-batch variance of G_big that independence would not predict (the part due to the
  negative set changing from batch to batch, which may be larger or smaller than tr(Sigma) /
  B);
* it does not measure how the objective itself changes with the batch size: a batch of
  B_small pairs trained on its own would have B_small - 1 negatives per anchor, a different
  (biased) loss, not a subsample of this one. B_simple describes the noise of the B-batch
  objective's gradient, measured at the batch size being trained.

Parameters are the encoder's parameters that require grad; the objective's own parameters (a
learnable temperature) are left out, and so are the probes' effects on anything else: the
measurement runs under :func:`torch.random.fork_rng` (its dropout draws do not shift
training's random stream), in training mode (the training gradient, dropout included),
restores the encoder's train/eval mode, leaves every ``.grad`` as it found it, never touches
an optimiser, discards the objective's diagnostics recorded meanwhile and leaves its
per-example state (SogCLR's u: the probes run under ``objective.frozen_state()``). It encodes in the
encoder's own dtype, without the trainer's bf16 autocast (embeddings below float32 are
upcast, as the trainer does). Cost per probe batch: one forward without a graph plus, per
chunk, one forward and one backward of that chunk (memory of one chunk, as the gradient
cache).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..batching.distributed import is_distributed
from ..batching.gradient_cache import checked_encoder, encode_chunks, split_side
from .examples import TrainingSet

__all__ = [
    "NoiseScale",
    "NoiseScaleAccumulator",
    "ProbeGradients",
    "measure_noise_scale",
    "probe_gradients",
    "probe_indices",
    "two_batch_estimate",
]


def two_batch_estimate(small_sq_norms: float | Iterable[float], big_sq_norm: float,
                       b_small: float, b_big: float) -> tuple[float, float]:
    """``(grad_sq, trace_sigma)``: the unbiased estimates of |G|^2 and tr(Sigma) from squared
    gradient norms measured at batch sizes ``b_small`` (one or several, averaged) and
    ``b_big``. Either estimate can come out negative when it is small next to its noise."""
    scalar = isinstance(small_sq_norms, int | float | np.number) \
        or getattr(small_sq_norms, "ndim", None) == 0
    small_values = [float(small_sq_norms)] if scalar \
        else [float(v) for v in small_sq_norms]  # type: ignore[union-attr]
    if not small_values:
        raise ValueError("no small-batch squared norm")
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    small = math.fsum(small_values) / len(small_values)
    big = float(big_sq_norm)
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace_sigma = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


@dataclass(frozen=True)
class NoiseScale:
    """B_simple = ``trace_sigma / grad_sq`` (``inf`` when the |G|^2 estimate is not positive:
    the noise swamps the signal) from ``probes`` two-batch measurements."""

    b_simple: float
    trace_sigma: float
    grad_sq: float
    probes: int

    def as_dict(self) -> dict[str, float | int]:
        return {"b_simple": self.b_simple, "trace_sigma": self.trace_sigma,
                "grad_sq": self.grad_sq, "probes": self.probes}


class NoiseScaleAccumulator:
    """Averages of the two estimates over measurements, and their ratio B_simple (the ratio of
    averages, not the average of ratios: each ratio is noisy and biased).

    ``decay=None``: plain means. ``decay`` in [0, 1): exponential moving averages (each new
    measurement weighs ``1 - decay``), bias-corrected as Adam's so that the first ones are not
    pulled towards zero; as McCandlish et al. track them over training steps."""

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1) or None, got {decay}")
        self.decay = decay
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0
        self.probes = 0

    def add(self, grad_sq: float, trace_sigma: float) -> None:
        """One measurement's estimates (see :func:`two_batch_estimate`)."""
        if self.decay is None:
            self._grad_sq += float(grad_sq)
            self._trace += float(trace_sigma)
            self._weight += 1.0
        else:
            d = self.decay
            self._grad_sq = d * self._grad_sq + (1.0 - d) * float(grad_sq)
            self._trace = d * self._trace + (1.0 - d) * float(trace_sigma)
            self._weight = d * self._weight + (1.0 - d)
        self.probes += 1

    def add_norms(self, small_sq_norms: float | Iterable[float], big_sq_norm: float,
                  b_small: float, b_big: float) -> None:
        self.add(*two_batch_estimate(small_sq_norms, big_sq_norm, b_small, b_big))

    def result(self) -> NoiseScale:
        if self.probes == 0:
            raise ValueError("no measurement yet")
        grad_sq = self._grad_sq / self._weight
        trace = self._trace / self._weight
        b_simple = trace / grad_sq if grad_sq > 0 else math.inf
        return NoiseScale(b_simple=b_simple, trace_sigma=trace, grad_sq=grad_sq,
                          probes=self.probes)


@dataclass
class ProbeGradients:
    """One probe batch: |G_c|^2 for each chunk (``small_sq_norms``, at B_small = B / chunks),
    |G_big|^2 and G_big itself (one tensor per parameter, the batch's gradient)."""

    small_sq_norms: list[float]
    big_sq_norm: float
    big: list[Tensor]
    b_small: int
    b_big: int


def probe_indices(num_examples: int, batch_size: int, batches: int,
                  seed: int) -> list[np.ndarray]:
    """The probe batches: ``batches`` draws of ``batch_size`` distinct example indices, in
    random order, from a numpy generator seeded with ``seed`` (nothing shared with training)."""
    if batch_size > num_examples:
        raise ValueError(f"a probe batch of {batch_size} needs as many examples; the training "
                         f"set has {num_examples}")
    rng = np.random.default_rng(seed)
    return [rng.choice(num_examples, size=batch_size, replace=False) for _ in range(batches)]


def _as_loss_dtype(encoder: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
    """``encoder``'s embeddings as the trainer's float() gives them to the loss: float32 at
    least (float64 stays float64)."""

    def encode(features: dict[str, Tensor]) -> Tensor:
        emb = encoder(features)
        return emb if emb.dtype in (torch.float32, torch.float64) else emb.float()

    return encode


def _features(encoder: nn.Module, texts: Sequence[str]) -> dict[str, Tensor]:
    """The encoder's training inputs (a static encoder's cached token ids) where it has
    them, else its ``tokenize``."""
    make = getattr(encoder, "training_features", None) or encoder.tokenize
    return make(list(texts))


def _sq_norm(grads: Sequence[Tensor | None]) -> float:
    # Each tensor's norm in its own dtype (a float64 copy of a static encoder's 30k x 384
    # gradient cost 5x the norm), summed in float64.
    return math.fsum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads if g is not None)


def probe_gradients(encoder: nn.Module, objective, sides: Sequence[Sequence[str]],
                    labels: Tensor | None, chunks: int,
                    params: Sequence[Tensor] | None = None,
                    ids: tuple[Tensor | None, Tensor | None] | None = None,
                    indices: Sequence[int] | None = None) -> ProbeGradients:
    """The chunk gradients of one batch (``sides``: its text columns, ``labels``: as
    :meth:`TrainingSet.batch` gives them), as the module docstring describes. Runs in the
    encoder's current mode with the current random state, and does not touch ``.grad``
    (gradients are taken with :func:`torch.autograd.grad`). ``indices``: the batch's example
    indices, passed to an objective that ``needs_indices`` (SogCLR's per-example state)."""
    if params is None:
        params = [p for p in encoder.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("the encoder has no parameter that requires grad")
    n = len(sides[0])
    if chunks < 2 or n % chunks:
        raise ValueError(f"a probe batch of {n} pairs cannot be split into {chunks} equal "
                         "chunks (need chunks >= 2 dividing the batch size)")
    b = n // chunks
    features = [_features(encoder, texts) for texts in sides]
    if labels is not None:
        labels = labels.to(encoder.device)

    # 1. Embeddings without a graph, equal chunks of consecutive pairs, the RNG state saved
    #    before each so that the replay draws the same dropout masks (the gradient cache's
    #    first step).
    encode = _as_loss_dtype(encoder)
    encodings = [encode_chunks(checked_encoder(encode, f"sides[{i}]"),
                               split_side(f, chunk_size=b, name=f"sides[{i}]"))
                 for i, f in enumerate(features)]
    leaves = [e.embeddings.requires_grad_() for e in encodings]

    # 2. The loss of the whole batch and dL/de, once. Gradients stop at the embeddings (and
    #    never reach the objective's own parameters).
    with torch.enable_grad():
        extra = {"indices": indices} if getattr(objective, "needs_indices", False) else {}
        loss = objective(leaves, labels, ids, **extra) if ids is not None or extra \
            else objective(leaves, labels)
        if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.requires_grad:
            raise ValueError("the objective must return a 0-dim loss of the embeddings")
        d_emb = torch.autograd.grad(loss, leaves, allow_unused=True)
    del leaves, loss

    # 3. Each chunk replayed with a graph; its share of dL/de pulled back to the parameters.
    small: list[float] = []
    big: list[Tensor] = [torch.zeros_like(p) for p in params]
    for c in range(chunks):
        outputs, grad_outputs = [], []
        for side, encoding in enumerate(encodings):
            if d_emb[side] is None:  # a side the loss does not use carries no gradient
                continue
            with torch.enable_grad():
                emb = encoding.replayed(c)
            if emb.requires_grad:  # else a frozen tower: nothing to pull back
                outputs.append(emb)
                rows = encoding.chunks[c].index.to(d_emb[side].device)
                grad_outputs.append(d_emb[side].index_select(0, rows).to(emb.dtype))
        if not outputs:
            raise ValueError("the loss does not depend on the encoder's parameters")
        grads = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs,
                                    allow_unused=True)
        grads = [None if g is None else (g.to_dense() if g.is_sparse else g) for g in grads]
        for total, g in zip(big, grads, strict=True):
            if g is not None:
                total.add_(g)
        small.append(chunks * chunks * _sq_norm(grads))  # |G_c|^2, G_c = chunks x chunk's
    return ProbeGradients(small_sq_norms=small, big_sq_norm=_sq_norm(big), big=big,
                          b_small=b, b_big=n)


def measure_noise_scale(encoder: nn.Module, objective, data: TrainingSet, batch_size: int, *,
                        batches: int = 4, chunks: int = 4, seed: int = 0,
                        false_negatives: Callable[[list[int]], tuple[Tensor, Tensor]] | None
                        = None) -> NoiseScale:
    """B_simple at ``batch_size`` from ``batches`` probe batches (drawn by
    :func:`probe_indices` from ``seed``) split into ``chunks`` chunks each, leaving training
    untouched (see the module docstring). ``encoder``: a :class:`SentenceEncoder` or any
    module with ``tokenize(texts) -> features`` (or ``training_features``),
    ``forward(features) -> (n, d)`` and ``device``; ``objective``: an :class:`Objective`
    (``objective(embeddings, labels)``); ``false_negatives(rows)``: the false-negative ids
    of a batch of rows (as training masks them), passed to the objective.

    One process only: under torchrun the objective's collectives would wait for every rank,
    while only rank 0 evaluates."""
    if is_distributed():
        raise RuntimeError("measure_noise_scale runs in one process; under torch.distributed "
                           "the objective's collectives would need every rank")
    if batches < 1:
        raise ValueError(f"`batches` must be >= 1, got {batches}")
    if chunks < 2 or batch_size % chunks:
        raise ValueError(f"batch_size {batch_size} cannot be split into {chunks} equal chunks "
                         "(need chunks >= 2 dividing the batch size)")
    params = [p for p in encoder.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the encoder has no parameter that requires grad")
    if getattr(objective, "needs_labels", False) and data.labels is None:
        raise ValueError("the objective needs a graded label on every pair; the data has none")
    indices = probe_indices(len(data), batch_size, batches, seed)

    device = encoder.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    was_training = encoder.training
    grads = [p.grad for p in params]
    stats = getattr(objective, "_stats", None)
    saved_stats = copy.deepcopy(stats) if stats is not None else None
    frozen = getattr(objective, "frozen_state", nullcontext)
    acc = NoiseScaleAccumulator()
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"), torch.enable_grad(), \
                frozen():
            encoder.train()
            for rows in indices:
                sides, labels = data.batch(rows.tolist())
                ids = false_negatives(rows.tolist()) if false_negatives is not None else None
                probe = probe_gradients(encoder, objective, sides, labels, chunks, params, ids,
                                        rows.tolist())
                acc.add_norms(probe.small_sq_norms, probe.big_sq_norm, probe.b_small,
                              probe.b_big)
                del probe
    finally:
        encoder.train(was_training)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if saved_stats is not None:
            objective._stats = saved_stats
    return acc.result()
