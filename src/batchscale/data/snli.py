"""SNLI in SentEval layout: ``s1.{split}`` premises, ``s2.{split}`` hypotheses,
``labels.{split}`` (entailment / neutral / contradiction), line-aligned.

Pairs are (premise, entailed hypothesis); triplets are (premise, entailed hypothesis,
contradicted hypothesis) for every premise that has both, one triplet per combination
(SNLI's dev and test sets have one of each for almost every premise). Texts are stripped
(the files are tokenised and end with a space).
"""

from __future__ import annotations

from pathlib import Path

from . import _reader
from .records import Pair, Triplet

SNLI_LABELS = ("entailment", "neutral", "contradiction")


def _read_all(path: Path) -> list[str | None]:
    """The file's lines without their ends; None for a line that is not valid UTF-8."""
    return [text.rstrip("\r\n") if valid else None for _, text, valid in _reader.utf8_lines(path)]


def _aligned(root: Path, split: str, skip_bad_rows: bool
             ) -> tuple[list[tuple[int, str, str, str]], _reader.LoadReport]:
    """(line, premise, hypothesis, label) for each valid line triple, and the report."""
    files = [_reader.open_checked(root / f"{name}.{split}", "SNLI file")
             for name in ("s1", "s2", "labels")]
    report = _reader.LoadReport(str(root / f"{{s1,s2,labels}}.{split}"))
    validators = [_reader.Validator(f, skip_bad_rows, report) for f in files]
    columns = [_read_all(f) for f in files]
    n = max(len(c) for c in columns)
    for f, c in zip(files, columns, strict=True):
        if len(c) < n:  # alignment is lost: never skippable
            raise _reader.DataError(f, len(c) + 1, f"missing line: the file has {len(c)} lines, "
                            f"another of s1/s2/labels.{split} has {n}")
    rows = []
    for i, (premise, hypothesis, label) in enumerate(zip(*columns, strict=True)):
        lineno = i + 1
        report.rows_read += 1
        try:
            for k, (name, value) in enumerate(
                    (("premise", premise), ("hypothesis", hypothesis), ("label", label))):
                if value is None:
                    raise _InFile(k, _reader.RowError("invalid UTF-8", f"the {name} line"))
                if k < 2 and not value.strip():
                    raise _InFile(k, _reader.RowError("empty text", name))
            if label.strip() not in SNLI_LABELS:
                raise _InFile(2, _reader.RowError("bad label",
                                                  f"{label!r}, expected one of {SNLI_LABELS}"))
        except _InFile as e:
            validators[e.file].bad(lineno, e.error)
            continue
        rows.append((lineno, premise.strip(), hypothesis.strip(), label.strip()))
    validators[0].finish()  # one shared report: log once
    return rows, report


class _InFile(Exception):
    def __init__(self, file: int, error: _reader.RowError) -> None:
        self.file, self.error = file, error


def load_snli_pairs(root: str | Path, split: str = "dev", *,
                    skip_bad_rows: bool = False) -> _reader.Records[Pair]:
    """(premise, entailed hypothesis) pairs."""
    rows, report = _aligned(Path(root), split, skip_bad_rows)
    pairs = [Pair(p, h) for _, p, h, label in rows if label == "entailment"]
    report.rows_kept = len(rows)
    return _reader.Records(pairs, report)


def load_snli_triplets(root: str | Path, split: str = "dev", *,
                       skip_bad_rows: bool = False) -> _reader.Records[Triplet]:
    """(premise, entailed, contradicted) triplets, premises in order of first appearance."""
    rows, report = _aligned(Path(root), split, skip_bad_rows)
    groups: dict[str, dict[str, list[str]]] = {}
    for _, premise, hypothesis, label in rows:
        groups.setdefault(premise, {k: [] for k in SNLI_LABELS})[label].append(hypothesis)
    triplets = [Triplet(p, e, c) for p, g in groups.items()
                for e in g["entailment"] for c in g["contradiction"]]
    report.rows_kept = len(rows)
    return _reader.Records(triplets, report)
