"""Generic pair and triplet files: JSONL, CSV, TSV.

Columns are named (a JSONL key, or a CSV/TSV header field) or given by 0-based position
(CSV/TSV, with or without a header). CSV follows the usual quoting rules (a quoted field
may span lines; its row is numbered by its first line); TSV has no quoting.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from . import _reader
from .records import Pair, Triplet

Format = Literal["jsonl", "csv", "tsv"]
Column = str | int
_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                                ".tsv": "tsv", ".txt": "tsv"}


def infer_format(path: Path, fmt: Format | None) -> Format:
    if fmt is not None:
        if fmt not in ("jsonl", "csv", "tsv"):
            raise ValueError(f"format must be 'jsonl', 'csv' or 'tsv', got {fmt!r}")
        return fmt
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                         "pass fmt='jsonl' | 'csv' | 'tsv'") from None


class _Table:
    """Rows of a JSONL / CSV / TSV file: ``rows()`` yields (line, row), a dict per JSONL
    line or a list of fields per CSV / TSV record; ``header`` and ``header_line`` are set
    once the header (CSV / TSV with ``has_header``) has been read."""

    def __init__(self, path: Path, fmt: Format, v: _reader.Validator, has_header: bool) -> None:
        self.path, self.fmt, self.v, self.has_header = path, fmt, v, has_header
        self.header: list[str] | None = None
        self.header_line = 0

    def rows(self) -> Iterator[tuple[int, dict[str, object] | list[str]]]:
        return self._jsonl() if self.fmt == "jsonl" else self._delimited()

    def _jsonl(self) -> Iterator[tuple[int, dict[str, object]]]:
        v = self.v
        for lineno, line in _reader.decoded_lines(self.path, v):
            v.report.rows_read += 1
            try:
                obj = _reader.json_object(line)
            except _reader.RowError as e:
                v.bad(lineno, e)
                continue
            yield lineno, obj

    def _delimited(self) -> Iterator[tuple[int, list[str]]]:
        # The csv module reads decoded lines; remember where each record starts and which
        # lines were not valid UTF-8 (a quoted field may span several lines).
        v = self.v
        position = 0
        bad_lines: set[int] = set()

        def lines() -> Iterator[str]:
            nonlocal position
            for lineno, text, valid in _reader.utf8_lines(self.path):
                position = lineno
                if not valid:
                    bad_lines.add(lineno)
                yield text

        if self.fmt == "csv":
            reader = csv.reader(lines(), strict=True)
        else:
            reader = csv.reader(lines(), delimiter="\t", quoting=csv.QUOTE_NONE)
        while True:
            start = position + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                v.report.rows_read += 1
                v.bad(start, _reader.RowError("malformed CSV", str(e)))
                continue
            if not any(cell.strip() for cell in row):
                v.report.blank_lines += 1
                continue
            broken = sorted(n for n in bad_lines if start <= n <= position)
            bad_lines.difference_update(broken)
            if self.has_header and self.header is None:
                if broken:  # no header, no columns: this cannot be skipped
                    raise _reader.DataError(self.path, broken[0], "invalid UTF-8 in the header")
                self.header = [h.strip() for h in row]
                self.header_line = start
                continue
            v.report.rows_read += 1
            if broken:
                v.bad(broken[0], _reader.RowError("invalid UTF-8", "the line is not valid UTF-8"))
                continue
            yield start, row

    def getter(self, columns: Sequence[Column]):
        """A function row -> the values of ``columns``, raising RowError('missing column')."""
        if self.fmt == "jsonl":
            for c in columns:
                if not isinstance(c, str):
                    raise ValueError(f"{self.path}: JSONL columns are keys (str), got {c!r}")

            def get_obj(row: dict[str, object]) -> list[object]:
                missing = [c for c in columns if c not in row]
                if missing:
                    raise _reader.RowError("missing column", ", ".join(map(repr, missing)))
                return [row[c] for c in columns]

            return get_obj

        index: list[int] = []
        for c in columns:
            if isinstance(c, int):
                index.append(c)
            elif self.header is None:
                raise ValueError(f"{self.path}: column {c!r} is a name but the file is read "
                                 "without a header; give 0-based positions or has_header=True")
            elif c not in self.header:
                raise _reader.DataError(self.path, self.header_line,
                                f"missing column: {c!r} is not in the header {self.header}")
            else:
                index.append(self.header.index(c))

        def get_row(row: list[str]) -> list[object]:
            missing = [repr(c) for c, i in zip(columns, index, strict=True) if i >= len(row)]
            if missing:
                raise _reader.RowError("missing column",
                               f"{', '.join(missing)} (the row has {len(row)} fields)")
            return [row[i] for i in index]

        return get_row


def _load(path: str | Path, fmt: Format | None, has_header: bool, skip_bad_rows: bool,
          columns: Sequence[Column], make) -> _reader.Records:
    file = _reader.open_checked(path)
    table = _Table(file, infer_format(file, fmt), _reader.Validator(file, skip_bad_rows),
                   has_header)
    v = table.v
    out = []
    get = None
    for lineno, row in table.rows():
        if get is None:
            get = table.getter(columns)
        try:
            out.append(make(get(row), columns))
        except _reader.RowError as e:
            v.bad(lineno, e)
    v.report.rows_kept = len(out)
    return _reader.Records(out, v.finish())


def load_pairs(path: str | Path, *, columns: Sequence[Column] = ("sentence1", "sentence2"),
               score_column: Column | None = None,
               score_range: tuple[float, float] | None = None,
               label_column: Column | None = None, fmt: Format | None = None,
               has_header: bool = True, skip_bad_rows: bool = False) -> _reader.Records[Pair]:
    """Pairs from a JSONL / CSV / TSV file.

    ``columns``: the two text columns. ``score_column``: an optional graded score; with
    ``score_range=(lo, hi)`` it must lie in the range and ``Pair.label`` is it scaled to
    [0, 1]. ``label_column``: an optional numeric label, stored in ``Pair.label`` as is.
    """
    if len(columns) != 2:
        raise ValueError(f"columns: two text columns, got {columns!r}")
    if score_column is not None and label_column is not None:
        raise ValueError("give score_column or label_column, not both")
    if score_range is not None:
        if score_column is None:
            raise ValueError("score_range needs score_column")
        lo, hi = map(float, score_range)
        if not hi > lo:
            raise ValueError(f"score_range: need lo < hi, got {score_range!r}")
    extra = [c for c in (score_column, label_column) if c is not None]

    def make(values: list[object], cols: Sequence[Column]) -> Pair:
        t1 = _reader.check_text(values[0], str(cols[0]))
        t2 = _reader.check_text(values[1], str(cols[1]))
        if score_column is not None:
            if score_range is None:
                return Pair(t1, t2, score=_reader.check_number(values[2], str(score_column)))
            s = _reader.check_number(values[2], str(score_column), lo=lo, hi=hi)
            return Pair(t1, t2, score=s, label=(s - lo) / (hi - lo))
        if label_column is not None:
            label = _reader.check_number(values[2], str(label_column), what="label")
            return Pair(t1, t2, label=label)
        return Pair(t1, t2)

    return _load(path, fmt, has_header, skip_bad_rows, [*columns, *extra], make)


def load_triplets(path: str | Path, *,
                  columns: Sequence[Column] = ("anchor", "positive", "negative"),
                  fmt: Format | None = None, has_header: bool = True,
                  skip_bad_rows: bool = False) -> _reader.Records[Triplet]:
    """(anchor, positive, negative) triplets from a JSONL / CSV / TSV file."""
    if len(columns) != 3:
        raise ValueError(f"columns: three text columns, got {columns!r}")

    def make(values: list[object], cols: Sequence[Column]) -> Triplet:
        return Triplet(*(_reader.check_text(x, str(c)) for x, c in zip(values, cols, strict=True)))

    return _load(path, fmt, has_header, skip_bad_rows, columns, make)
