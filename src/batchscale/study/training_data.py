"""The training set of a run: its sources read, weighted, decontaminated and counted.

``data.train`` names one source or a list (``mix`` expands to STS-B train, SNLI's entailment
pairs and every pair set of ``DATA/pairs/``; :mod:`batchscale.data.sources`). A source in a
list may carry ``weight`` and ``max_pairs`` (:class:`~batchscale.training.config.SourceConfig`):
its pairs are drawn with a fixed seed (:data:`DATA_SEED`, not the run's), so every seed and
every batch size of a study trains on the same set. With ``data.decontaminate`` (the
default) pairs sharing a text with the dev or test set the run scores on are dropped
(:mod:`batchscale.data.decontaminate`), counted per source in :class:`DataReport`, which the
run's ``summary.json`` and the study store keep.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data import BeirDataset, Pair, Triplet, load_pairs, load_snli_pairs, load_stsb, load_triplets
from ..data.decontaminate import drop_contaminated, folded_set
from ..data.sources import expand, is_pair_set, pair_set_path
from ..evaluation import task_path
from ..evaluation.tasks import default_data_dir
from ..training import RunConfig, TrainingSet
from ..training.config import SourceConfig, SplitRef

#: The seed of source weighting (a study's training set does not change with the run seed).
DATA_SEED = 0
#: SNLI splits that ``snli`` trains on (the shared copy has no train split).
SNLI_TRAIN_SPLITS = ("dev", "test")


@dataclass
class SourceCount:
    """One source: pairs read, kept after weighting, dropped as contaminated, trained on."""

    source: str
    read: int
    weighted: int
    contaminated: int
    pairs: int


@dataclass
class DataReport:
    sources: list[SourceCount] = field(default_factory=list)
    decontaminated: bool = True
    held_out_texts: int = 0

    @property
    def pairs(self) -> int:
        return sum(s.pairs for s in self.sources)

    @property
    def contaminated(self) -> int:
        return sum(s.contaminated for s in self.sources)

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "contaminated": self.contaminated,
                "decontaminated": self.decontaminated, "held_out_texts": self.held_out_texts,
                "sources": [asdict(s) for s in self.sources]}

    def summary(self) -> str:
        parts = ", ".join(f"{s.source} {s.pairs}" + (f" (-{s.contaminated})"
                                                     if s.contaminated else "")
                          for s in self.sources)
        return f"{self.pairs} training pairs: {parts}"


def _data_dir(config: RunConfig) -> Path:
    return config.data.data_dir or default_data_dir()


def _is_snli(source: str) -> bool:
    return source == "snli" or source.startswith("snli:")


def _snli_pairs(config: RunConfig, source: str) -> list[Pair]:
    """(premise, entailed hypothesis) pairs with label 1.0 (a positive pair), so that they
    can join graded pairs under label-aware masking. ``snli``: dev + test; ``snli:SPLIT``."""
    splits = SNLI_TRAIN_SPLITS if source == "snli" else (source[len("snli:"):],)
    return [Pair(p.text1, p.text2, label=1.0) for split in splits
            for p in load_snli_pairs(_data_dir(config) / "snli", split)]


def held_out_texts(config: RunConfig) -> frozenset[str]:
    """The folded texts of the dev and test sets the run scores on: both sentences of an
    STS split, the queries of a retrieval split (its corpus is shared with training by
    design). A holdout dev set comes out of the training data and needs none."""
    texts: list[str] = []
    refs: list[SplitRef] = [r for r in (config.eval.dev, config.eval.test)
                            if r is not None and r.split != "holdout"]
    for ref in refs:
        kind, path = task_path(ref.task, config.data.data_dir)
        if kind == "sts":
            texts += [t for p in load_stsb(path, ref.split) for t in (p.text1, p.text2)]
        else:
            texts += list(BeirDataset(path).split(ref.split).queries.values())
    return folded_set(texts)


def _file_records(config: RunConfig, path: Path) -> list[Pair] | list[Triplet]:
    d = config.data
    if d.kind == "triplets":
        return list(load_triplets(path, columns=d.columns or ("anchor", "positive",
                                                              "negative")))
    return list(load_pairs(path, columns=d.columns, score_column=d.score_column,
                           score_range=d.score_range))


def _source_records(config: RunConfig, source: str, in_list: bool
                    ) -> list[Pair] | list[Triplet]:
    """The records of one source of a list (retrieval sources: their train judgements)."""
    if source in ("stsb", "scifact") or source.startswith("beir:"):
        kind, path = task_path(source, config.data.data_dir)
        if kind == "sts":
            return list(load_stsb(path, "train"))
        if in_list and config.data.dev_holdout > 0:
            raise ValueError(f"data.train: {source} in a list of sources cannot have "
                             "data.dev_holdout (hold out from a single retrieval source)")
        return list(BeirDataset(path).training_pairs("train"))
    if _is_snli(source):
        return _snli_pairs(config, source)
    if is_pair_set(source):
        # Positive pairs: label 1.0, as SNLI's, so that they can join graded sources.
        return [Pair(p.text1, p.text2, label=1.0, group=p.group)
                for p in load_pairs(pair_set_path(source, _data_dir(config)))]
    return _file_records(config, Path(source))


def weighted(records: list, weight: float, max_pairs: int | None, source: str) -> list:
    """round(weight x n) of the n records (whole copies, then a fixed-seed sample in file
    order), capped at ``max_pairs`` (a fixed-seed sample)."""
    n = len(records)
    want = round(weight * n)
    if want < 1 and n:
        raise ValueError(f"data.train: {source}: weight {weight} keeps no pair of {n}")
    copies, rest = divmod(want, n) if n else (0, 0)
    rng = random.Random(f"{DATA_SEED}:{source}")
    out = records * copies + [records[i] for i in sorted(rng.sample(range(n), rest))]
    if max_pairs is not None and len(out) > max_pairs:
        out = [out[i] for i in sorted(rng.sample(range(len(out)), max_pairs))]
    return out


def _spec(item: str | SourceConfig) -> SourceConfig:
    return SourceConfig(source=item) if isinstance(item, str) else item


def _specs(train: str | list[str | SourceConfig]) -> list[SourceConfig]:
    items = train if isinstance(train, list) else [train]
    out: list[SourceConfig] = []
    for item in items:
        spec = _spec(item)
        out += [SourceConfig(source=s, weight=spec.weight, max_pairs=spec.max_pairs)
                for s in expand([spec.source])]
    return out


def _check_labels(parts: dict[str, list]) -> None:
    """Every pair labelled or none (else label-aware masking would silently turn off)."""
    labelled = {s: all(getattr(r, "label", None) is not None for r in recs)
                for s, recs in parts.items()}
    if len(set(labelled.values())) > 1:
        raise ValueError("data.train: some sources have a label on every pair "
                         f"({', '.join(k for k, v in labelled.items() if v)}) and some do not "
                         f"({', '.join(k for k, v in labelled.items() if not v)}); combine "
                         "sources of one kind")
    kinds = {type(r) for recs in parts.values() for r in recs}
    if len(kinds) > 1:
        raise ValueError("data.train: a list of sources mixes pairs and triplets")


def load_training_data(config: RunConfig) -> tuple[TrainingSet, Any, DataReport]:
    """The training set, the held-out dev part (``data.dev_holdout``: an STS pair list or a
    BEIR dataset and split; else None) and the per-source counts."""
    d = config.data
    specs = _specs(d.train)
    in_list = isinstance(d.train, list) or len(specs) > 1
    single = specs[0].source if not in_list else None
    if single is not None and d.dev_holdout > 0 and (
            single == "scifact" or single.startswith("beir:")):
        return _retrieval_holdout(config, single)
    held = held_out_texts(config) if d.decontaminate else frozenset()
    report = DataReport(decontaminated=d.decontaminate, held_out_texts=len(held))
    parts: dict[str, list] = {}
    for spec in specs:
        records = _source_records(config, spec.source, in_list)
        kept = weighted(records, spec.weight, spec.max_pairs, spec.source)
        clean, dropped = drop_contaminated(kept, held) if held else (kept, 0)
        parts[spec.source] = parts.get(spec.source, []) + clean
        report.sources.append(SourceCount(spec.source, len(records), len(kept), dropped,
                                          len(clean)))
    _check_labels(parts)
    records = [r for recs in parts.values() for r in recs]
    data, holdout = _holdout_pairs(records, d.dev_holdout, config.train.seed)
    return data, holdout, report


def _retrieval_holdout(config: RunConfig, source: str) -> tuple[TrainingSet, Any, DataReport]:
    """A retrieval source whose dev set is a held-out part of its training queries (the
    training pairs are the kept queries'; nothing else is held out)."""
    _, path = task_path(source, config.data.data_dir)
    ds = BeirDataset(path)
    kept, held = ds.holdout("train", config.data.dev_holdout, seed=config.train.seed)
    pairs = list(ds.training_pairs(kept))
    d = config.data
    texts = held_out_texts(config) if d.decontaminate else frozenset()
    clean, dropped = drop_contaminated(pairs, texts) if texts else (pairs, 0)
    report = DataReport(decontaminated=d.decontaminate, held_out_texts=len(texts))
    report.sources.append(SourceCount(source, len(pairs), len(pairs), dropped, len(clean)))
    return TrainingSet.from_records(clean), (ds, held), report


def _holdout_pairs(records: list, fraction: float, seed: int
                   ) -> tuple[TrainingSet, list[Pair] | None]:
    if fraction <= 0:
        return TrainingSet.from_records(records), None
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(fraction * len(records)))
    held = sorted(order[:cut])
    kept = sorted(order[cut:])
    return (TrainingSet.from_records([records[i] for i in kept]),
            [records[i] for i in held])
