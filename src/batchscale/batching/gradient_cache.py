r"""Gradient cache: the exact gradient of a batch-level contrastive loss with the activation
memory of one chunk (Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", RepL4NLP 2021).

A contrastive loss couples every example of the batch, so the batch cannot be split into
independent micro-batches. It factors through the embeddings, though:
dL/dtheta = sum_i (dL/de_i) (de_i/dtheta). Hence, for one optimiser step:

1. encode every chunk without a graph, saving the RNG state before each chunk;
2. compute the loss on all embeddings (made leaf tensors) and back-propagate into them:
   the cached gradients dL/de_i;
3. re-encode each chunk with a graph under its saved RNG state (same dropout masks, so the
   same embeddings) and back-propagate the cached gradients through it.

Parameter gradients accumulate into ``.grad`` as usual. Parameters used only by the loss
(e.g. a learnable temperature) get theirs in step 2. Across ranks, ``loss_fn`` may all-gather
the embeddings (:func:`batchscale.batching.distributed.gathered_pair_loss`): step 2 then holds
the only collectives, and every rank may have a different number of chunks.

Steps 1 and 3 are a small core, after GradCache's: :func:`cached_encode` (or
:func:`split_side` then :func:`encode_chunks`) encodes one side chunk by chunk without a graph,
capturing the RNG state per chunk, and returns a :class:`CachedEncoding`, whose ``replay``
re-encodes each chunk under its state and back-propagates its slice of dL/d(embeddings);
:func:`replay_all` replays several sides so that only the very last chunk synchronises.

A side's inputs are tensors sharing the batch dimension, or an embedding bag's inputs (a
static encoder's, as sentence-transformers' ``StaticEmbedding`` takes them): 1-D
``input_ids`` holding every row's tokens end to end and ``offsets``, where each row starts.
These are split by the same rules, a row's length being its token count
(:func:`split_bags`).
:func:`cached_backward` runs the three steps; the sentence-transformers integration runs steps 1
and 3 around the Trainer's own backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .chunking import Chunk, Inputs, batch_rows, check_rule, split_inputs
from .rng_state import RngState

Encoder = Callable[[dict[str, Tensor]], Tensor]
Devices = Iterable[torch.device | str]
SideInputs = Inputs | Sequence[Inputs]
NoSync = Callable[[], AbstractContextManager[object]]


def is_bag(inputs: Inputs) -> bool:
    """Whether ``inputs`` are an embedding bag's: 1-D ``input_ids`` and ``offsets``."""
    ids, offsets = inputs.get("input_ids"), inputs.get("offsets")
    return isinstance(ids, Tensor) and isinstance(offsets, Tensor) and ids.ndim == 1 \
        and offsets.ndim == 1


def input_rows(inputs: Inputs) -> int:
    """The number of examples of a side's inputs (padded tensors or an embedding bag's)."""
    if isinstance(inputs, Mapping) and is_bag(inputs):
        return int(inputs["offsets"].numel())
    return batch_rows(inputs)


def _bag_lengths(inputs: Inputs) -> Tensor:
    ids, offsets = inputs["input_ids"], inputs["offsets"]
    end = torch.tensor([ids.numel()], dtype=offsets.dtype, device=offsets.device)
    return torch.diff(offsets, append=end).cpu()


def take_bags(inputs: Inputs, rows: Tensor) -> dict[str, Tensor]:
    """Rows ``rows`` of an embedding bag's inputs, as a bag of their own (other entries,
    which have no rows, pass as they are)."""
    ids, offsets = inputs["input_ids"], inputs["offsets"]
    lengths = _bag_lengths(inputs).index_select(0, rows)
    starts = offsets.cpu().index_select(0, rows)
    new_offsets = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - new_offsets, lengths)
    positions = shift + torch.arange(int(lengths.sum()), dtype=shift.dtype)
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "offsets")}
    out["input_ids"] = ids.index_select(0, positions.to(ids.device))
    out["offsets"] = new_offsets.to(offsets.device, offsets.dtype)
    return out


def split_bags(
    inputs: Inputs,
    *,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
) -> list[Chunk]:
    """:func:`~batchscale.batching.chunking.split_inputs` for an embedding bag's inputs:
    the rows go into the chunks that the padded tensors of the same texts would give (a
    mask of each row's token count decides), each chunk a bag of its own."""
    lengths = _bag_lengths(inputs)
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width)[None, :] < lengths[:, None]
    groups = split_inputs({"attention_mask": mask}, chunk_size=chunk_size,
                          max_tokens=max_tokens, sort_by_length=sort_by_length)
    return [Chunk(take_bags(inputs, g.index), g.index) for g in groups]


def split_side(
    side: SideInputs,
    *,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
    name: str = "features",
) -> list[Chunk]:
    """One mapping is split by the rule; a sequence of mappings is taken as the chunks."""
    if isinstance(side, Mapping) and is_bag(side):
        return split_bags(side, chunk_size=chunk_size, max_tokens=max_tokens,
                          sort_by_length=sort_by_length)
    if isinstance(side, Mapping):
        return split_inputs(
            side, chunk_size=chunk_size, max_tokens=max_tokens, sort_by_length=sort_by_length
        )
    if not isinstance(side, Sequence) or isinstance(side, str) or not side:
        raise ValueError(
            f"`{name}` must be a mapping of tensors or a non-empty sequence of them, "
            f"got {type(side).__name__}"
        )
    chunks, start = [], 0
    for inputs in side:
        rows = input_rows(inputs)
        chunks.append(Chunk(dict(inputs), torch.arange(start, start + rows)))
        start += rows
    return chunks


def _encode(encode: Encoder, chunk: Chunk) -> Tensor:
    # A fresh copy each pass: encoders may write into their inputs (sentence-transformers
    # stores its outputs in the features dict, some poolings edit the mask in place), and
    # the replay must see what the first pass saw. Token tensors are tiny next to activations.
    return encode({k: v.clone() if isinstance(v, Tensor) else v for k, v in chunk.inputs.items()})


def _in_batch_order(chunks: list[Chunk], embeddings: list[Tensor]) -> Tensor:
    """Chunk embeddings scattered back to the rows' original positions."""
    index = torch.cat([c.index for c in chunks])
    flat = torch.cat(embeddings)
    out = flat.new_empty(flat.shape)
    out[index.to(flat.device)] = flat
    return out


@dataclass(frozen=True)
class CachedEncoding:
    """One side encoded chunk by chunk without a graph (step 1), ready to be replayed."""

    encode: Encoder
    chunks: list[Chunk]
    states: list[RngState]  # the RNG state before each chunk's first pass
    embeddings: Tensor  # (n, d) in the batch's order, no graph

    def replayed(self, i: int) -> Tensor:
        """Chunk ``i`` re-encoded with a graph under its saved RNG state (the same dropout
        masks, so the same embeddings as the first pass); its rows are ``chunks[i].index``."""
        with self.states[i].replay():
            return _encode(self.encode, self.chunks[i])

    def replay(self, grad: Tensor, *, no_sync: NoSync | None = None, last: bool = True) -> None:
        """Step 3: re-encode each chunk with a graph under its saved RNG state (the same
        dropout masks, so the same embeddings) and back-propagate its rows of ``grad``
        (dL/d(embeddings), the batch's order) through it. Every re-encoding runs under
        ``no_sync()`` when given, except the final one when ``last``."""
        for step, chunk in enumerate(self.chunks):
            sync = last and step == len(self.chunks) - 1
            with nullcontext() if no_sync is None or sync else no_sync():
                emb = self.replayed(step)
                if not emb.requires_grad:  # a frozen encoder: nothing to train
                    continue
                torch.autograd.backward(emb, grad.index_select(0, chunk.index.to(grad.device)))


def rng_devices(chunks: Sequence[Chunk], devices: Devices | None = None) -> list[torch.device]:
    """The devices whose generators a chunk's encoding may draw from: ``devices`` when given
    (the encoder's, when its inputs stay on the host), else the chunks' own devices and the
    current CUDA device once CUDA is in use (where a module moves host inputs by default)."""
    if devices is not None:
        return [torch.device(d) for d in devices]
    out = {v.device for c in chunks for v in c.inputs.values() if isinstance(v, Tensor)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.add(torch.device("cuda", torch.cuda.current_device()))
    return sorted(out, key=str)


def encode_chunks(encode: Encoder, chunks: list[Chunk], *,
                  devices: Devices | None = None) -> CachedEncoding:
    """Step 1 for chunks already split: ``encode`` each without a graph, capturing the RNG
    state before it (what the replay needs to draw the same dropout masks): the CPU's and
    that of the CUDA devices of :func:`rng_devices`."""
    states, embeddings = [], []
    where = rng_devices(chunks, devices)
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture(where))
            embeddings.append(_encode(encode, chunk))
    return CachedEncoding(encode, chunks, states, _in_batch_order(chunks, embeddings))


def cached_encode(
    encode: Encoder,
    features: SideInputs,
    *,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
    name: str = "features",
    devices: Devices | None = None,
) -> CachedEncoding:
    """Step 1 for one side: :func:`split_side` then :func:`encode_chunks`."""
    chunks = split_side(features, chunk_size=chunk_size, max_tokens=max_tokens,
                        sort_by_length=sort_by_length, name=name)
    return encode_chunks(encode, chunks, devices=devices)


def replay_all(
    encodings: Sequence[CachedEncoding],
    grads: Sequence[Tensor | None],
    *,
    no_sync: NoSync | None = None,
) -> None:
    """Step 3 for several sides: each with a gradient is replayed (a side the loss did not use
    has none and is not re-encoded); all re-encodings but the very last run under
    ``no_sync()``, so that e.g. DistributedDataParallel reduces the gradients once."""
    work = [(e, g) for e, g in zip(encodings, grads, strict=True) if g is not None and e.chunks]
    for i, (encoding, grad) in enumerate(work):
        encoding.replay(grad, no_sync=no_sync, last=i == len(work) - 1)


def checked_encoder(encode: Encoder, name: str) -> Encoder:
    """``encode``, failing clearly unless it returns one (rows, d) embedding per row."""

    def checked(inputs: dict[str, Tensor]) -> Tensor:
        rows = input_rows(inputs)
        emb = encode(inputs)
        if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != rows:
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(
                f"the encoder of `{name}` must return a ({rows}, d) tensor for a chunk of "
                f"{rows} examples, got {shape}"
            )
        return emb

    return checked


def cached_backward(
    encode: Encoder | Sequence[Encoder],
    sides: Sequence[SideInputs],
    loss_fn: Callable[..., Tensor],
    *,
    chunk_size: int | None = None,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
    no_sync: NoSync | None = None,
    devices: Devices | None = None,
) -> Tensor:
    """Compute ``loss_fn(*embeddings)`` over the whole batch and accumulate its exact parameter
    gradients into ``.grad``, encoding one chunk at a time; returns the loss, detached.

    Args:
        encode: ``encode(inputs) -> (n, d)`` embeddings of a chunk, e.g. a module's forward on
            a dict of token tensors; or one encoder per side (asymmetric towers).
        sides: the inputs of each side of the loss, e.g. ``[queries, answers]`` or
            ``[queries, answers, hard_negatives]``. Each is a mapping of tensors sharing
            the batch dimension or an embedding bag's inputs (split by the rule), or a
            list of such mappings (taken as the chunks, in order).
        loss_fn: ``loss_fn(*embeddings) -> 0-dim tensor``, embeddings in the batch's order,
            one (n_side, d) tensor per side. What it returns is what is back-propagated (scale
            it there for mixed precision or gradient accumulation).
        chunk_size: examples per chunk, in the batch's order or, with ``sort_by_length``,
            longest first (less padding; the embeddings return to the batch's order); or
        max_tokens: padded tokens per chunk (rows x longest row), examples sorted by length.
        no_sync: a context factory under which every re-encoding but the last runs, e.g.
            ``ddp_model.no_sync`` so that DistributedDataParallel reduces the gradients once.
        devices: the devices the encoder draws random numbers on (its dropout), whose
            generators each chunk's replay restores; default: see :func:`rng_devices`.

    Without gradients enabled (evaluation) only steps 1 and 2's loss are computed.
    """
    check_rule(chunk_size, max_tokens)
    if isinstance(sides, Mapping) or not isinstance(sides, Sequence) or not sides:
        raise ValueError(
            f"`sides` must be a non-empty sequence of per-side inputs, got {type(sides).__name__}"
        )
    encoders = list(encode) if isinstance(encode, Sequence) else [encode] * len(sides)
    if len(encoders) != len(sides) or not all(callable(e) for e in encoders):
        raise ValueError(
            f"`encode` must be a callable or one callable per side ({len(sides)}), got {encode!r}"
        )
    names = [f"sides[{i}]" for i in range(len(sides))]
    chunks = [
        split_side(s, chunk_size=chunk_size, max_tokens=max_tokens,
                   sort_by_length=sort_by_length, name=n)
        for n, s in zip(names, sides, strict=True)
    ]

    # Step 1: embeddings without a graph, the RNG state saved before each chunk.
    encodings = [
        encode_chunks(checked_encoder(enc, name), side_chunks, devices=devices)
        for enc, side_chunks, name in zip(encoders, chunks, names, strict=True)
    ]
    leaves = [e.embeddings for e in encodings]
    if not torch.is_grad_enabled():
        return loss_fn(*leaves).detach()

    # Step 2: the loss on leaf embeddings; its backward stops at them (and at any parameter of
    # the loss itself).
    leaves = [e.requires_grad_() for e in leaves]
    loss = loss_fn(*leaves)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a 0-dim tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError("`loss_fn` returned a loss that does not depend on the embeddings")
    loss.backward()

    # Step 3: replay each chunk with a graph and push its cached gradient in.
    replay_all(encodings, [leaf.grad for leaf in leaves], no_sync=no_sync)
    return loss.detach()
