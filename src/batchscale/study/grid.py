"""The sweep configuration: a base run, a grid and a budget, expanded into cells.

A sweep file is YAML, validated strictly (an unknown key is an error naming the file and the
key path)::

    name: study-demo
    base: {model: ..., data: ..., loss: ..., optim: ..., eval: ...}   # or a path to a run config
    grid:
      batch_sizes: [16, 64, 256]
      losses:                       # named LossConfig variants, merged over base.loss
        bsc: {name: bsc}
        weince: {name: weince}
      vrns_weights: [0.0, 0.1]      # each loss without and with VRNS (optional)
      seeds: [0, 1, 2]
      lr_scaling: [sqrt]            # none | linear | sqrt (optim.reference_batch_size)
      lr_multipliers: [0.5, 1, 2]   # optim.lr x each, on top of the scaling rule
      lr_tuning: first_seed         # all_seeds: the best mean dev over seeds; first_seed: the
                                    # best dev of the first seed, the other seeds run it only
      softmax_batches: [16, 64]     # softmax blocks of N < B pairs, besides N = B
      restrict:                     # optional: cells a rule matches keep only listed values
        - {where: {losses: [bsc]}, batch_sizes: [16]}   # bsc at B = 16 only
        - {where: {vrns: true}, batch_sizes: [16]}      # VRNS only at B = 16
    budget: {examples: 20000}       # or {steps: 500} or {epochs: 2}: the same for every cell
    report: {targets: [75.0]}       # optional: dev targets (default: 50/80/90% of the gain)

Every cell is one training run; its identity is a hash of its resolved :class:`RunConfig`
(so the same run is recognised across shards, stores and reruns), and the sweep's identity
is the hash of its sorted cell ids (two stores can be merged only when these agree).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..training.config import ConfigError, RunConfig, load_config

LrRule = Literal["none", "linear", "sqrt"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The list axes of a grid: how a message names each, and the values it allows.
_AXES: dict[str, tuple[str, Any, str]] = {
    "batch_sizes": ("batch sizes", lambda x: x >= 2, ">= 2"),
    "seeds": ("seeds", lambda x: x >= 0, ">= 0"),
    "lr_multipliers": ("lr multipliers", lambda x: x > 0, "> 0"),
    "softmax_batches": ("softmax batch sizes", lambda x: x >= 2, ">= 2"),
    "vrns_weights": ("VRNS weights", lambda x: x >= 0, ">= 0"),
}


class Match(_Strict):
    """Which cells a restriction applies to (every given field must hold)."""

    losses: list[str] | None = None
    #: True: cells with a VRNS weight > 0; False: cells without VRNS.
    vrns: bool | None = None
    #: True: softmax-block cells (N < B); False: whole-batch cells.
    blocks: bool | None = None


class Restriction(_Strict):
    """Among the cells that ``where`` matches, keep only those whose values are listed (an
    unlisted axis is not restricted). ``softmax_batches`` lists the block sizes kept (``[]``:
    none); whole-batch cells always pass it. Lets a full cross product carry an arm that is
    only affordable, or only meaningful, at some batch sizes (SogCLR at small batches, VRNS
    at the extremes)."""

    where: Match = Match()
    losses: list[str] | None = None
    batch_sizes: list[int] | None = None
    vrns_weights: list[float] | None = None
    softmax_batches: list[int] | None = None
    lr_multipliers: list[float] | None = None

    @model_validator(mode="after")
    def _keeps(self) -> Restriction:
        if all(getattr(self, k) is None for k in _KEEPS):
            raise ValueError(f"a restriction lists what it keeps: one or more of "
                             f"{', '.join(_KEEPS)}")
        return self

    def allows(self, cell: Cell) -> bool:
        w = self.where
        blocks = cell.softmax_batch != cell.batch_size
        if ((w.losses is not None and cell.loss not in w.losses)
                or (w.vrns is not None and (cell.vrns_weight > 0) != w.vrns)
                or (w.blocks is not None and blocks != w.blocks)):
            return True
        return ((self.losses is None or cell.loss in self.losses)
                and (self.batch_sizes is None or cell.batch_size in self.batch_sizes)
                and (self.vrns_weights is None or cell.vrns_weight in self.vrns_weights)
                and (self.softmax_batches is None or not blocks
                     or cell.softmax_batch in self.softmax_batches)
                and (self.lr_multipliers is None or cell.lr_multiplier in self.lr_multipliers))


#: The axes a restriction keeps values of, each named as the grid names it.
_KEEPS = ("losses", "batch_sizes", "vrns_weights", "softmax_batches", "lr_multipliers")


class Grid(_Strict):
    batch_sizes: list[int] = Field(min_length=1)
    #: Named loss variants: LossConfig fields merged over ``base.loss``.
    losses: dict[str, dict[str, Any]] = Field(min_length=1)
    #: VRNS weights crossed with every loss (None: each variant's own ``vrns_weight``).
    vrns_weights: list[float] | None = None
    seeds: list[int] = Field(default=[0], min_length=1)
    lr_scaling: list[LrRule] = Field(default=["none"], min_length=1)
    #: optim.lr times each multiplier; the report keeps the best per (loss, B, N) on dev.
    lr_multipliers: list[float] = Field(default=[1.0], min_length=1)
    lr_tuning: Literal["all_seeds", "first_seed"] = "all_seeds"
    #: Softmax block sizes N (loss.softmax_batch) crossed with every batch size B that N
    #: divides, N < B; the whole batch (N = B) is always a cell.
    softmax_batches: list[int] | None = None
    #: Rules that drop cells of the cross product (see :class:`Restriction`).
    restrict: list[Restriction] = []

    @field_validator(*_AXES)
    @classmethod
    def _axis(cls, v: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if v is None:
            return v
        what, ok, rule = _AXES[info.field_name]
        if not v or not all(ok(x) for x in v) or len(set(v)) != len(v):
            raise ValueError(f"{what} must be a non-empty list of distinct values {rule}, "
                             f"got {v}")
        return v

    @field_validator("lr_scaling")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"rules repeat: {v}")
        return v

    @field_validator("losses")
    @classmethod
    def _names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, fields in v.items():
            if not name.strip() or not isinstance(fields, dict):
                raise ValueError(f"{name!r}: a loss variant is a name and a mapping of "
                                 "loss fields")
        return v

    @model_validator(mode="after")
    def _restrictions(self) -> Grid:
        axes: dict[str, list[Any] | None] = {
            "losses": list(self.losses), "batch_sizes": self.batch_sizes,
            "vrns_weights": self.vrns_weights, "softmax_batches": self.softmax_batches or [],
            "lr_multipliers": self.lr_multipliers}
        for i, rule in enumerate(self.restrict):
            named = [("where.losses", rule.where.losses, "losses")] + [
                (k, getattr(rule, k), k) for k in _KEEPS]
            for key, values, axis in named:
                if axes[axis] is None:  # the variants set their own VRNS weights
                    continue
                unknown = [v for v in values or [] if v not in axes[axis]]
                if unknown:
                    raise ValueError(f"restrict.{i}.{key}: {unknown} not in grid.{axis} "
                                     f"{axes[axis]}")
        return self


class Budget(_Strict):
    """The same training budget for every cell: examples seen, optimiser steps, or epochs.
    Under examples or steps every step takes a whole batch, so each cell meets it exactly."""

    examples: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if sum(x is not None for x in (self.examples, self.steps, self.epochs)) != 1:
            raise ValueError("give examples, steps or epochs (exactly one)")
        return self


class ReportSettings(_Strict):
    #: Dev scores every run is timed to (steps / examples to each, B_crit per target; None:
    #: 50%, 80% and 90% of the way from the start score to the best tuned mean dev score).
    targets: list[float] | None = None
    #: Paired differences (A minus B) between loss variants, by name (None: weince minus
    #: infonce where the grid has both).
    compare: list[tuple[str, str]] | None = None
    #: Does A at each of its batch sizes reach B at B's largest batch size? Paired
    #: differences A@B - B@B_large (and A@B - B@B), by name (None: sogclr against infonce
    #: where the grid has both).
    reach: list[tuple[str, str]] | None = None


class SweepConfig(_Strict):
    name: str = Field(min_length=1)
    #: A run config: inline, or the path of a YAML run config (relative to the sweep file).
    base: dict[str, Any] | str = {}
    grid: Grid
    budget: Budget
    report: ReportSettings = ReportSettings()


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``index`` orders the grid (seeds outermost, so that a partial
    sweep holds whole seeds); ``id`` is the hash of ``config``."""

    index: int
    loss: str
    vrns_weight: float
    batch_size: int
    seed: int
    lr_scaling: str
    config: RunConfig
    lr_multiplier: float = 1.0
    #: Pairs per softmax block (the batch size when the whole batch is one block).
    softmax_batch: int = 0

    @property
    def id(self) -> str:
        return config_hash(self.config)

    @property
    def setting(self) -> tuple[str, float, str, int, int]:
        """The cell without its seed and lr multiplier (what the lr is tuned for)."""
        return (self.loss, self.vrns_weight, self.lr_scaling, self.batch_size,
                self.softmax_batch)

    def label(self) -> str:
        vrns = f"+vrns{self.vrns_weight:g}" if self.vrns_weight > 0 else ""
        blocks = f" N={self.softmax_batch}" if self.softmax_batch != self.batch_size else ""
        lr = f"x{self.lr_multiplier:g}" if self.lr_multiplier != 1.0 else ""
        return (f"{self.loss}{vrns} B={self.batch_size}{blocks} seed={self.seed} "
                f"lr={self.lr_scaling}{lr}")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its config (with the base resolved) and its cells in grid order."""

    config: SweepConfig
    base: RunConfig
    cells: tuple[Cell, ...]
    source: str

    @property
    def hash(self) -> str:
        """The sweep's identity: the hash of its sorted cell ids."""
        ids = sorted(c.id for c in self.cells)
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]

    def resolved(self) -> dict[str, Any]:
        """The sweep config with the base inlined (what the store keeps)."""
        out = self.config.model_dump(mode="json")
        out["base"] = self.base.model_dump(mode="json")
        return out

    def shard(self, i: int, n: int) -> list[Cell]:
        """The cells of shard ``i`` of ``n`` (0-based): grid indices congruent to i mod n,
        so every shard gets a mix of batch sizes and losses. Under ``lr_tuning:
        first_seed`` whole settings go to one shard instead (each, costliest first, to the
        shard whose estimated cost is lowest so far: :func:`balanced_settings`), so that a
        shard's own store holds the first seed's lr choice."""
        check_shard(i, n, f"{i}/{n}")
        g = self.config.grid
        if g.lr_tuning == "first_seed" and len(g.lr_multipliers) > 1:
            mine = balanced_settings(self.cells, n)[i]
            return [c for c in self.cells if c.setting in mine]
        return [c for c in self.cells if c.index % n == i]


def estimated_cost(cell: Cell) -> float:
    """A rough cost of a cell in units of a small step: its steps, each costing more with
    the batch (linearly for the encoder, quadratically for the B x B similarities, which
    dominate a static encoder's step from B ~ 8,000), plus its evaluation points (for
    balancing shards only)."""
    t, b = cell.config.train, cell.batch_size
    if t.max_steps is not None:
        steps = t.max_steps
    elif t.max_examples is not None:
        steps = -(-t.max_examples // b)
    else:
        steps = math.ceil(t.epochs * 10_000 / b)
    return steps * (1 + b / 64 + b * b / 2**17) + 20 * cell.config.eval.points


def balanced_settings(cells: Sequence[Cell], n: int) -> list[set[tuple]]:
    """The cells' settings dealt to ``n`` shards, costliest first, each to the shard with the
    lowest estimated cost so far (deterministic: ties go to the lower shard)."""
    cost: dict[tuple, float] = {}
    for c in cells:
        cost[c.setting] = cost.get(c.setting, 0.0) + estimated_cost(c)
    shards: list[set[tuple]] = [set() for _ in range(n)]
    load = [0.0] * n
    for setting in sorted(cost, key=lambda k: (-cost[k], str(k))):
        k = min(range(n), key=lambda j: (load[j], j))
        shards[k].add(setting)
        load[k] += cost[setting]
    return shards


def config_hash(config: RunConfig) -> str:
    """A stable hash of a resolved run config (canonical JSON, sorted keys)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    return check_shard(i, n, text)


def check_shard(i: int, n: int, text: str) -> tuple[int, int]:
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {where}: unknown key")
        else:
            lines.append(f"{source}: {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_file(base: str, sweep_file: Path | None) -> Path:
    """The run config a sweep's ``base`` names, relative to the sweep file."""
    p = Path(base)
    return p if p.is_absolute() or sweep_file is None else sweep_file.parent / p


def _resolve_base(config: SweepConfig, path: Path | None, source: str) -> RunConfig:
    if isinstance(config.base, str):
        return load_config(base_file(config.base, path))
    from ..training.config import config_from_dict

    return config_from_dict(config.base, f"{source}: base")


def expand(config: SweepConfig, base: RunConfig, source: str) -> list[Cell]:
    """Every cell of the grid, each config validated (errors name the variant)."""
    g = config.grid
    raw = base.model_dump(mode="json")
    cells: list[Cell] = []
    for name, fields in g.losses.items():
        if g.vrns_weights is not None and "vrns_weight" in fields:
            raise ConfigError(f"{source}: grid.losses.{name}.vrns_weight: set VRNS weights in "
                              "grid.vrns_weights or in the variants, not both")
    # Every cell evaluates at the same example counts. A base that pins align_points keeps
    # them: a grid extended by a larger batch then keeps its earlier cells (and their runs).
    if raw["eval"]["schedule"] == "log" and raw["eval"]["align_points"] is None:
        raw["eval"]["align_points"] = sorted(g.batch_sizes)
    factors = itertools.product(
        g.seeds, g.losses.items(), g.vrns_weights if g.vrns_weights is not None else [None],
        g.lr_scaling, g.lr_multipliers, g.batch_sizes)
    for seed, (name, fields), w, rule, mult, b in factors:
        for n in [None, *(n for n in g.softmax_batches or [] if n < b and b % n == 0)]:
            loss = _merge(raw["loss"], fields)
            if n is not None:
                loss["softmax_batch"] = n
            if w is not None:
                loss["vrns_weight"] = w
            run = _merge(raw, {"loss": loss,
                               "optim": {"lr_scaling": rule, "lr": raw["optim"]["lr"] * mult},
                               "train": {"batch_size": b, "seed": seed, "max_examples": None,
                                         "max_steps": None}})
            if config.budget.epochs is not None:
                run["train"]["epochs"] = config.budget.epochs
            else:
                run["train"]["max_examples"] = config.budget.examples
                run["train"]["max_steps"] = config.budget.steps
            try:
                rc = RunConfig.model_validate(run)
            except ValidationError as e:
                raise ConfigError(_format(e, f"{source}: grid.losses.{name}")) from None
            cell = Cell(len(cells), name, float(rc.loss.vrns_weight), b, seed, rule, rc,
                        float(mult), rc.loss.softmax_batch or b)
            if all(r.allows(cell) for r in g.restrict):
                cells.append(cell)
    if not cells:
        raise ConfigError(f"{source}: grid.restrict: the restrictions leave no cells")
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: grid: two cells resolve to the same run config "
                          "(two loss variants with the same fields?)")
    return cells


def sweep_from_dict(raw: object, source: str = "sweep", path: Path | None = None) -> Sweep:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep config must be a mapping, got "
                          f"{type(raw).__name__}")
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    examples = config.budget.examples
    uneven = [b for b in config.grid.batch_sizes if examples is not None and examples % b]
    if uneven:
        b = uneven[0]
        raise ConfigError(
            f"{source}: budget.examples: {examples} is not a multiple of batch size {b}; the "
            f"trainer takes whole batches, so that run would see {-(-examples // b) * b} "
            "examples. Use a common multiple of grid.batch_sizes")
    base = _resolve_base(config, path, source)
    for field in ("compare", "reach"):
        for a, b in getattr(config.report, field) or []:
            for name in (a, b):
                if name not in config.grid.losses:
                    raise ConfigError(f"{source}: report.{field}: {name!r} is not a loss of "
                                      f"grid.losses ({', '.join(config.grid.losses)})")
    return Sweep(config, base, tuple(expand(config, base, source)), source)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; ``overrides`` (``key.path=value``) apply to it, e.g.
    ``budget.examples=2000`` or ``base.data.data_dir=/data``."""
    from ..training.config import apply_overrides

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    source = str(path)
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a sweep config must be a mapping")
        if isinstance(raw.get("base"), str) and any(o.startswith("base.") for o in overrides):
            base = base_file(raw["base"], path)
            raw = dict(raw, base=yaml.safe_load(base.read_text(encoding="utf-8")) or {})
        raw = apply_overrides(raw, overrides)
        source += " (with --set)"
    return sweep_from_dict(raw, source, path)
