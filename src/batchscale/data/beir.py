"""BEIR layout: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``), ``qrels/{split}.tsv`` (``query-id corpus-id score``, header line optional).

The corpus is streamed (:meth:`BeirDataset.iter_corpus`): a user's corpus may hold millions
of documents, so it is never held in memory as text; checking qrels against it needs only
its ids. Extra fields (``metadata``, ...) are ignored, so SciFact, SciDocs and the other BEIR
sets load unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import _reader
from ._reader import DataError  # re-exported
from .records import Document, Pair

Qrels = dict[str, dict[str, int]]
_HEADER_FIRST = {"query-id", "query_id", "qid", "query"}
T = TypeVar("T")


def _id(obj: dict[str, object]) -> str:
    if "_id" not in obj:
        raise _reader.RowError("missing column", "'_id'")
    value = obj["_id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise _reader.RowError("bad id", f"'_id' holds {value!r}")
    return str(value)


def _optional_str(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _reader.RowError("non-string text", f"column {key!r} holds {type(value).__name__}")
    return value


def _id_text_rows(path: Path, v: _reader.Validator, parse: Callable[[dict[str, object]], T],
                  seen: set[str] | None = None) -> Iterator[tuple[str, T]]:
    """The valid rows of a JSONL file of ``_id`` + ``text`` objects (corpus or queries), as
    (id, ``parse(object)``); a bad row (``parse`` raising included, or an id seen before,
    collected in ``seen``) goes to ``v``. Counts the rows read and kept."""
    seen = set() if seen is None else seen
    for lineno, line in _reader.decoded_lines(path, v):
        v.report.rows_read += 1
        try:
            obj = _reader.json_object(line)
            row_id = _id(obj)
            if "text" not in obj:
                raise _reader.RowError("missing column", "'text'")
            value = parse(obj)
            if row_id in seen:
                raise _reader.RowError("duplicate id", repr(row_id))
        except _reader.RowError as e:
            v.bad(lineno, e)
            continue
        seen.add(row_id)
        v.report.rows_kept += 1
        yield row_id, value


@dataclass(frozen=True)
class BeirSplit:
    """What retrieval evaluation needs besides the corpus: the judged queries and qrels."""

    name: str
    queries: dict[str, str]   # only the queries that have judgements in this split
    qrels: Qrels


class BeirDataset:
    """A BEIR folder. Each read validates; ``skip_bad_rows=True`` skips and counts bad rows
    (see the ``*_report`` attributes). ``allow_empty_documents=True`` keeps corpus entries
    whose title and text are both empty (FiQA has a few) instead of rejecting them."""

    def __init__(self, root: str | Path, *, skip_bad_rows: bool = False,
                 allow_empty_documents: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such BEIR folder")
        self.corpus_path = self.root / "corpus.jsonl"
        self.queries_path = self.root / "queries.jsonl"
        self.skip_bad_rows = skip_bad_rows
        self.allow_empty_documents = allow_empty_documents
        self.corpus_report: _reader.LoadReport | None = None
        self.queries_report: _reader.LoadReport | None = None
        self.qrels_reports: dict[str, _reader.LoadReport] = {}
        self._queries: dict[str, str] | None = None
        self._corpus_ids: set[str] | None = None

    @property
    def name(self) -> str:
        return self.root.name

    def qrels_path(self, split: str) -> Path:
        return self.root / "qrels" / f"{split}.tsv"

    # -- corpus -------------------------------------------------------------------------
    def iter_corpus(self) -> Iterator[Document]:
        """Stream the corpus, validating each line (ids unique, text present)."""
        path = _reader.open_checked(self.corpus_path, "BEIR corpus")
        v = _reader.Validator(path, self.skip_bad_rows)
        seen: set[str] = set()
        for doc_id, (title, text) in _id_text_rows(path, v, self._title_text, seen):
            yield Document(doc_id, title, text)
        self.corpus_report = v.finish()
        self._corpus_ids = seen

    def _title_text(self, obj: dict[str, object]) -> tuple[str, str]:
        title, text = _optional_str(obj, "title"), _optional_str(obj, "text")
        if not (title.strip() or text.strip()) and not self.allow_empty_documents:
            raise _reader.RowError("empty text", "both 'title' and 'text' are empty")
        return title, text

    def corpus_ids(self) -> set[str]:
        """The ids of the valid documents (one streaming pass, then cached)."""
        if self._corpus_ids is None:
            for _ in self.iter_corpus():
                pass
        assert self._corpus_ids is not None
        return self._corpus_ids

    def count_documents(self) -> int:
        return len(self.corpus_ids())

    # -- queries ------------------------------------------------------------------------
    def queries(self) -> dict[str, str]:
        """All queries, id -> text (cached)."""
        if self._queries is None:
            path = _reader.open_checked(self.queries_path, "BEIR queries file")
            v = _reader.Validator(path, self.skip_bad_rows)
            out = dict(_id_text_rows(path, v, lambda obj: _reader.check_text(obj["text"], "text")))
            self.queries_report = v.finish()
            self._queries = out
        return self._queries

    # -- judgements ---------------------------------------------------------------------
    def qrels(self, split: str = "test") -> Qrels:
        """query id -> {document id -> integer relevance}, every id checked against the
        queries and the corpus."""
        path = _reader.open_checked(self.qrels_path(split), f"BEIR qrels file for split {split!r}")
        queries = self.queries()
        docs = self.corpus_ids()
        v = _reader.Validator(path, self.skip_bad_rows)
        out: Qrels = {}
        first = True
        for lineno, line in _reader.decoded_lines(path, v):
            cols = line.split("\t")
            if first and cols[0].strip().lower() in _HEADER_FIRST:
                first = False
                continue
            first = False
            v.report.rows_read += 1
            try:
                if len(cols) < 3:
                    raise _reader.RowError("missing column", f"{len(cols)} tab-separated "
                                           "fields, expected 3 (query-id, corpus-id, score)")
                if len(cols) > 3:
                    raise _reader.RowError("extra column",
                                           f"{len(cols)} tab-separated fields, expected 3")
                qid, did, raw = cols[0].strip(), cols[1].strip(), cols[2].strip()
                try:
                    score = int(raw)
                except ValueError:
                    raise _reader.RowError("non-integer score", f"{raw!r}") from None
                if qid not in queries:
                    raise _reader.RowError("unknown query",
                                           f"{qid!r} is not in {self.queries_path.name}")
                if did not in docs:
                    raise _reader.RowError("unknown document",
                                           f"{did!r} is not in {self.corpus_path.name}")
                previous = out.get(qid, {}).get(did)
                if previous is not None and previous != score:
                    raise _reader.RowError("conflicting judgement",
                                   f"({qid!r}, {did!r}) judged {previous} earlier, {score} here")
            except _reader.RowError as e:
                v.bad(lineno, e)
                continue
            out.setdefault(qid, {})[did] = score
        v.report.rows_kept = sum(len(d) for d in out.values())
        self.qrels_reports[split] = v.finish()
        return out

    def split(self, split: str = "test") -> BeirSplit:
        qrels = self.qrels(split)
        queries = self.queries()
        return BeirSplit(split, {q: queries[q] for q in qrels}, qrels)

    def holdout(self, split: str = "train", fraction: float = 0.1, seed: int = 0
                ) -> tuple[BeirSplit, BeirSplit]:
        """``split`` cut by query into (kept, held out): a seeded random ``fraction`` of its
        judged queries (at least one) is held out, e.g. as a dev set where the data set has
        none. Both parts keep their queries' full judgements."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
        part = self.split(split)
        ids = sorted(part.qrels)
        if len(ids) < 2:
            raise ValueError(f"{self.qrels_path(split)}: too few queries to hold some out")
        rng = random.Random(seed)
        held = set(rng.sample(ids, max(1, round(fraction * len(ids)))))

        def sub(name: str, keep: set[str]) -> BeirSplit:
            return BeirSplit(name, {q: part.queries[q] for q in ids if q in keep},
                             {q: part.qrels[q] for q in ids if q in keep})

        return sub(f"{split}-kept", set(ids) - held), sub(f"{split}-holdout", held)

    def training_pairs(self, split: str | BeirSplit = "train", min_score: int = 1
                       ) -> _reader.Records[Pair]:
        """(query, positive document) pairs from the judgements with score >= ``min_score``,
        the document as :attr:`Document.full_text`, in qrels order. ``split`` is a split
        name or a :class:`BeirSplit` (e.g. the kept part of :meth:`holdout`)."""
        if isinstance(split, BeirSplit):
            qrels, split = split.qrels, split.name.removesuffix("-kept")
        else:
            qrels = self.qrels(split)
        queries = self.queries()
        wanted = {d for judged in qrels.values() for d, s in judged.items() if s >= min_score}
        texts = {doc.id: doc.full_text for doc in self.iter_corpus() if doc.id in wanted}
        pairs = [Pair(queries[q], texts[d]) for q, judged in qrels.items()
                 for d, s in judged.items() if s >= min_score]
        report = _reader.LoadReport(str(self.qrels_path(split)))
        if split in self.qrels_reports:
            report.merge(self.qrels_reports[split])
        report.rows_kept = len(pairs)
        return _reader.Records(pairs, report)


def load_beir(root: str | Path, split: str = "test", *,
              skip_bad_rows: bool = False) -> tuple[BeirDataset, BeirSplit]:
    """The dataset (for streaming its corpus) and one split's queries and qrels."""
    ds = BeirDataset(root, skip_bad_rows=skip_bad_rows)
    return ds, ds.split(split)


__all__ = ["BeirDataset", "BeirSplit", "DataError", "Qrels", "load_beir"]
