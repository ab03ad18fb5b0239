"""The training configuration: one validated pydantic model, read from YAML.

Unknown keys and bad values are errors that name their path (``optim.lr: ...``), so a typo
never silently trains the wrong thing. ``--set key.path=value`` overrides are parsed as YAML
scalars and validated the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    #: ``default`` (the packaged all-MiniLM-L6-v2), a model directory, or ``static:SOURCE``
    #: (a static-embedding encoder initialised from SOURCE's token embeddings).
    name: str = "default"
    pooling: Literal["mean", "cls"] | None = None
    max_seq_length: int | None = Field(default=None, ge=1)


class SourceConfig(_Strict):
    """A training source with its share: ``weight`` w takes round(w x n) of its n pairs (a
    fixed-seed sample below 1; whole copies plus a sample above), then ``max_pairs`` caps."""

    source: str
    weight: float = Field(default=1.0, gt=0.0)
    max_pairs: int | None = Field(default=None, ge=1)


class DataConfig(_Strict):
    #: ``stsb``, ``scifact``, ``beir:PATH`` (train judgements), ``snli`` (entailment pairs of
    #: SNLI dev + test, label 1), ``pairs:NAME`` (``DATA/pairs/NAME.jsonl``, label 1),
    #: ``mix`` (STS-B, SNLI and every pair set), or a file (JSONL / CSV / TSV / Parquet /
    #: a ``datasets`` directory); or a list of pair sources, concatenated in order (e.g.
    #: ``[stsb, snli]``), each a name or ``{source, weight, max_pairs}``.
    train: str | list[str | SourceConfig] = "stsb"
    #: Drop training pairs with a text equal (case and whitespace folded) to a text of the
    #: dev or test set the run scores on (STS: both sentences; retrieval: the queries).
    decontaminate: bool = True
    #: For files: ``pairs`` (two text columns, optional score) or ``triplets``.
    kind: Literal["pairs", "triplets"] = "pairs"
    columns: list[str] | None = None
    score_column: str | None = None
    score_range: tuple[float, float] | None = None
    #: Fraction of the training queries held out as the dev set (retrieval sets without one).
    dev_holdout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: Folder with stsbenchmark/ and scifact/ (default: $BATCHSCALE_DATA or ../shared/data).
    data_dir: Path | None = None

    @field_validator("train")
    @classmethod
    def _sources(cls, v: str | list[str | SourceConfig]) -> str | list[str | SourceConfig]:
        names = [s if isinstance(s, str) else s.source for s in (v if isinstance(v, list)
                                                                  else [v])]
        if not names or not all(n.strip() for n in names):
            raise ValueError("a list of training sources must be non-empty, without empty names")
        return v


#: Losses that regress the pairs' graded labels and so need them on every pair.
SCORE_LOSSES = frozenset({"bsc_mse", "cosine_mse", "cosent"})


def term_key(index: int, field: str) -> str:
    """The config key of a field of loss term ``index`` (0: the main loss, then loss.plus)."""
    return f"loss.{field}" if index == 0 else f"loss.plus.{index - 1}.{field}"


class LossConfig(_Strict):
    name: Literal["bsc", "infonce", "weince", "bsc_mse", "cosine_mse", "cosent", "triplet",
                  "sogclr"] = "bsc"
    temperature: float = Field(default=0.05, gt=0.0)
    learnable_temperature: bool = False
    temperature_lr: float = Field(default=1e-3, gt=0.0)
    directions: Literal["both", "q->a", "a->q"] = "both"
    normalization: Literal["l2", "coord", "none"] = "l2"
    #: Label-aware masking (BSC eq. 5): pairs with label <= threshold are never anchors.
    label_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    mu: float = Field(default=0.1, ge=0.0, le=1.0)
    cosent_scale: float = Field(default=20.0, gt=0.0)
    triplet_margin: float = Field(default=5.0, ge=0.0)
    #: Weight of the VRNS penalty (0: off); its n is the number of training examples.
    vrns_weight: float = Field(default=0.0, ge=0.0)
    tile_size: Literal["auto"] | int | None = "auto"
    #: Softmax block size N: the batch of B pairs is split into B / N independent
    #: batch-softmax blocks (each anchor sees the N - 1 other pairs of its block, and the hard
    #: negatives of its block), averaged over the batch. None: N = B (one block).
    softmax_batch: int | None = Field(default=None, ge=2)
    #: Further terms added to this loss, each with its weight: L = L_name + sum_k w_k L_k
    #: (e.g. CoSENT + 10 x BSC+MSE). A term has its own fixed temperature.
    plus: list[AddedLoss] = []
    #: SogCLR (``name: sogclr``): the weight gamma of the batch's estimate in each example's
    #: moving average u_i <- (1 - gamma) u_i + gamma g_i (the authors' default 0.9; 1: the
    #: mini-batch loss). Dense, fixed temperature, the main loss only.
    sogclr_gamma: float = Field(default=0.9, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _sogclr(self) -> LossConfig:
        if any(t.name == "sogclr" for t in self.plus):
            raise ValueError("sogclr keeps a state per training example: use it as the main "
                             "loss, not under plus")
        if self.name == "sogclr":
            if self.learnable_temperature:
                raise ValueError("sogclr: the temperature is fixed (SogCLR's Algorithm 1); set "
                                 "learnable_temperature: false")
            if isinstance(self.tile_size, int):
                raise ValueError("sogclr has no tiled path; set tile_size: auto or null (dense)")
        return self

    @field_validator("tile_size")
    @classmethod
    def _tile(cls, v: object) -> object:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto', null or a positive integer")
        return v

    def terms(self) -> list[LossConfig]:
        """This loss and its added terms, the main one first."""
        return [self, *self.plus]

    @property
    def scored_terms(self) -> list[str]:
        """Names of the terms that regress graded labels (empty: labels are optional)."""
        return [t.name for t in self.terms() if t.name in SCORE_LOSSES]


class AddedLoss(LossConfig):
    weight: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _simple(self) -> AddedLoss:
        if self.plus:
            raise ValueError("an added loss term cannot have terms of its own")
        if self.learnable_temperature:
            raise ValueError("only the main loss may learn its temperature")
        if self.vrns_weight:
            raise ValueError("set vrns_weight on the main loss")
        return self


LossConfig.model_rebuild()


class OptimConfig(_Strict):
    lr: float = Field(default=2e-5, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-6, gt=0.0)
    #: Scale ``lr`` with the batch size B: ``linear`` lr * B / ref, ``sqrt`` lr * sqrt(B / ref).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: int = Field(default=16, ge=1)
    #: Warmup as a fraction of all optimiser steps, then linear decay to 0.
    warmup: float = Field(default=0.1, ge=0.0, le=1.0)
    #: Gradient-norm clipping (null: none).
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    #: Static encoder only: sparse embedding gradients (the rows of the batch's tokens) and
    #: lazy AdamW, which updates and decays only those rows (batchscale.training.sparse);
    #: false: dense gradients and AdamW over the whole table. One process (not torchrun).
    sparse: bool = False


class GradientCacheConfig(_Strict):
    chunk_size: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    sort_by_length: bool = True

    @model_validator(mode="after")
    def _one_rule(self) -> GradientCacheConfig:
        if self.chunk_size is not None and self.max_tokens is not None:
            raise ValueError("give chunk_size or max_tokens, not both")
        return self


class HardBatchConfig(_Strict):
    """Options of the samplers that group similar examples (``train.sampler``: ``bsc_knn``,
    ``bsc_kmeans``, ``teacher``)."""

    #: BSC: examples per group (s); must divide train.batch_size.
    group_size: int = Field(default=8, ge=1)
    #: BSC kNN variant: neighbours searched per example (200-500 in the paper).
    knn_candidates: int = Field(default=300, ge=1)
    #: BSC k-means variant: number of clusters (about 300 in the paper).
    n_clusters: int = Field(default=300, ge=1)
    #: Cut the grouped order by the no-duplicates rule (near neighbours are often copies of
    #: the same text: false negatives).
    no_duplicates: bool = True
    #: BSC shingle variant: words per shingle (MinHash over word n-grams of both texts).
    shingle_size: int = Field(default=2, ge=1)
    #: Teacher-mined batches: the fixed model whose embeddings are clustered (``default``, a
    #: model directory); null: the model being trained, as it is at the start.
    teacher: str | None = None


class TrainConfig(_Strict):
    batch_size: int = Field(default=32, ge=2)
    epochs: float = Field(default=1.0, gt=0.0)
    #: Stop after exactly this many examples instead (overrides epochs); under a budget the
    #: short last batch of an epoch is filled from the rest of it, so every step takes a
    #: whole batch.
    max_examples: int | None = Field(default=None, ge=1)
    #: Stop after exactly this many optimiser steps instead (overrides epochs).
    max_steps: int | None = Field(default=None, ge=1)
    #: Batch composition: ``random``, ``no_duplicates`` (no text twice in a batch),
    #: ``bsc_knn`` / ``bsc_kmeans`` (BSC's shuffling, recomputed each epoch from the current
    #: model's embeddings), ``bsc_shingle`` (its model-free variant: groups sharing a random
    #: word shingle), ``teacher`` (hard batches mined once from a fixed model).
    sampler: Literal["random", "no_duplicates", "bsc_knn", "bsc_kmeans", "bsc_shingle",
                     "teacher"] = "random"
    hard_batches: HardBatchConfig = HardBatchConfig()
    drop_last: bool = False
    #: Gradient caching: exact large-batch gradients with one chunk's activation memory.
    gradient_cache: GradientCacheConfig | None = None
    #: Under torchrun: ``local`` (OpenCLIP's local loss: each rank scores its own anchors
    #: against every rank's candidates) or ``global`` (every rank computes the whole loss).
    distributed_loss: Literal["local", "global"] = "local"
    #: Pairs that are never each other's negatives (:mod:`batchscale.batching.false_negatives`):
    #: ``group`` (one group, or a shared text, transitively), ``text`` (a shared text),
    #: ``none``.
    false_negatives: Literal["group", "text", "none"] = "group"
    #: What the no-duplicates rule keeps out of a batch (``sampler: no_duplicates`` and the
    #: hard-batch samplers' cut): a second copy of a ``text`` (sentence-transformers' rule)
    #: or a second pair of one ``group`` (as ``false_negatives: group`` joins them).
    duplicates: Literal["text", "group"] = "text"
    bf16: bool = False
    seed: int = Field(default=0, ge=0)
    deterministic: bool = False
    device: str | None = None


class SplitRef(_Strict):
    task: str = "stsb"
    split: str = "dev"


class NoiseScaleConfig(_Strict):
    """McCandlish et al.'s two-batch estimate of B_simple = tr(Sigma) / |G|^2, from probe
    batches of the training batch size drawn apart from training."""

    #: Probe batches per evaluation point.
    batches: int = Field(default=4, ge=1)
    #: Equal chunks each probe batch is split into (the small batches of the estimator).
    chunks: int = Field(default=4, ge=2)


class EvalConfig(_Strict):
    #: The model-selection set. ``split: holdout`` is the part of the training data held out
    #: by ``data.dev_holdout``.
    dev: SplitRef = SplitRef(task="stsb", split="dev")
    test: SplitRef | None = SplitRef(task="stsb", split="test")
    #: The dev metric that selects the checkpoint (higher is better).
    metric: str = "spearman"
    #: ``linear``: a point every ``every_examples``; ``log``: ``points`` points log-spaced in
    #: examples from the first step to the budget (the same example counts at every batch
    #: size where its steps allow).
    schedule: Literal["linear", "log"] = "linear"
    every_examples: int = Field(default=2000, ge=1)
    points: int = Field(default=16, ge=2)
    #: Batch sizes whose runs share the log schedule's points (a sweep sets its own): each
    #: target is rounded up to a multiple of the largest of them not above it.
    align_points: list[int] | None = None
    at_start: bool = True
    batch_size: int = Field(default=256, ge=1)
    #: Evaluation dtype, as ``batchscale eval --dtype`` (auto: bf16 on CPUs with native bf16).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    geometry: bool = True
    #: The gradient noise scale B_simple at each evaluation point (None: not measured).
    noise_scale: NoiseScaleConfig | None = None
    #: Also write each evaluation point as TensorBoard events under OUT/tensorboard.
    tensorboard: bool = False


class CheckpointConfig(_Strict):
    #: Training-state checkpoints kept (the newest); the selected model is kept apart.
    keep: int = Field(default=1, ge=1)


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for i, term in enumerate(self.loss.terms()):
            key = term_key(i, "name")
            if term.name in SCORE_LOSSES and self.data.kind == "triplets":
                raise ValueError(f"{key}: {term.name} needs scored pairs, not triplets")
            if term.name == "triplet" and self.data.kind != "triplets":
                raise ValueError(f"{key}: triplet needs data.kind: triplets")
        t = self.train
        if (t.sampler in ("bsc_knn", "bsc_kmeans", "bsc_shingle")
                and t.batch_size % t.hard_batches.group_size):
            raise ValueError(f"train.hard_batches.group_size ({t.hard_batches.group_size}) must "
                             f"divide train.batch_size ({t.batch_size}): whole groups fill a "
                             "batch")
        for i, term in enumerate(self.loss.terms()):
            n = term.softmax_batch
            if n is not None and t.batch_size % n:
                raise ValueError(f"{term_key(i, 'softmax_batch')} ({n}) must divide "
                                 f"train.batch_size ({t.batch_size}): the batch splits into "
                                 "equal softmax blocks")
        ns = self.eval.noise_scale
        if ns is not None and t.batch_size % ns.chunks:
            raise ValueError(f"eval.noise_scale.chunks ({ns.chunks}) must divide "
                             f"train.batch_size ({t.batch_size}): equal chunks")
        if t.max_examples is not None and t.max_steps is not None:
            raise ValueError("train.max_examples and train.max_steps: give one budget, not both")
        if self.eval.dev.split == "holdout" and self.data.dev_holdout == 0.0:
            raise ValueError("eval.dev.split: holdout needs data.dev_holdout > 0")
        return self


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        lines.append(f"{source}: {_path(err['loc'])}: {msg}{value}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = dict(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def config_from_dict(raw: object, source: str = "config") -> RunConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML; None: all defaults), apply ``key.path=value`` overrides, validate."""
    raw: object = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the config must be a mapping")
        raw = apply_overrides(raw, overrides)
        source += " (with --set)"
    return config_from_dict(raw, source)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


#: Keys that each rank sets for itself (the CLI gives each NCCL rank ``cuda:LOCAL_RANK``)
#: and that a resume may change: they do not make a run another run.
PER_RANK_KEYS: tuple[tuple[str, str], ...] = (("train", "device"),)


def run_identity(dumped: str) -> Any:
    """A dumped config (:func:`dump_config`) as the data that decides whether a resume
    continues the same run: everything but :data:`PER_RANK_KEYS`."""
    data = yaml.safe_load(dumped)
    for section, key in PER_RANK_KEYS:
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return data
