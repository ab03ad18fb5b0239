"""Generic pair and triplet files: JSONL, CSV, TSV, Parquet and ``datasets`` directories.

Columns are named (a JSONL key, a CSV/TSV header field, a Parquet / Arrow column) or given by
0-based position (CSV/TSV, with or without a header; Parquet / Arrow). By default
(``columns=None``) the file's names decide: sentence-transformers' ``anchor`` / ``positive``
(and ``negative`` for triplets), else ``sentence1`` / ``sentence2``. A ``group`` column, read
when present, names the unit whose texts paraphrase each other (:attr:`Pair.group`).
:func:`load_training_file` loads pairs or triplets, as the file's columns say. How the
format is told and how each format is read: :mod:`._tables`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from . import _reader
from ._tables import Column, Format, Table, infer_format, open_table
from .records import Pair, Triplet

__all__ = ["GROUP_COLUMN", "PAIR_COLUMNS", "TRIPLET_COLUMNS", "Column", "Format", "Kind",
           "detect_kind", "infer_format", "load_pairs", "load_training_file", "load_triplets"]

Kind = Literal["pairs", "triplets"]
R = TypeVar("R")

#: The text columns a pair file may name, in order of preference: sentence-transformers'
#: names, then the names this loader defaulted to before.
PAIR_COLUMNS: tuple[tuple[str, str], ...] = (("anchor", "positive"), ("sentence1", "sentence2"))
TRIPLET_COLUMNS = ("anchor", "positive", "negative")
#: The group column read when present (``group_column=None``).
GROUP_COLUMN = "group"


def _file_names(table: Table) -> list[str]:
    names = table.names()
    if names is None:
        raise ValueError(f"{table.path}: columns=None takes the names from the header; the "
                         "file is read without one (has_header=False): give 0-based positions")
    return names


def _pair_columns(table: Table, names: list[str]) -> tuple[str, str]:
    """The first of :data:`PAIR_COLUMNS` the file has (a file with no rows: the first)."""
    if not names:
        return PAIR_COLUMNS[0]
    for pair in PAIR_COLUMNS:
        if all(c in names for c in pair):
            return pair
    known = " or ".join(f"{a!r}/{b!r}" for a, b in PAIR_COLUMNS)
    raise _reader.DataError(table.path, None,
                            f"no text columns: the file has columns {names}; a pair file names "
                            f"its texts {known} (sentence-transformers' names first, with "
                            f"{TRIPLET_COLUMNS[2]!r} for triplets), or pass columns=")


def _group(table: Table, group_column: Column | None, groups: bool) -> Column | None:
    """The group column to read: none with ``groups=False``; ``group_column`` if given (the
    file must have it); else :data:`GROUP_COLUMN` when the file has it."""
    if not groups:
        if group_column is not None:
            raise ValueError("group_column is ignored with groups=False; give one of them")
        return None
    if group_column is not None:
        return group_column
    names = table.names()
    return GROUP_COLUMN if names and GROUP_COLUMN in names else None


def _read(table: Table, columns: Sequence[Column], make: Callable[[list[object]], R]
          ) -> _reader.Records[R]:
    """``make(values of columns)`` for every row; a RowError is a bad row."""
    v = table.v
    out: list[R] = []
    get = None
    for number, row in table.rows(columns):
        if get is None:  # after the first row: a CSV / TSV header is read by then
            get = table.getter(columns)
        try:
            out.append(make(get(row)))
        except _reader.RowError as e:
            v.bad(number, e)
    v.report.rows_kept = len(out)
    return _reader.Records(out, v.finish())


def _check_pair_options(columns: Sequence[Column] | None, score_column: Column | None,
                        score_range: tuple[float, float] | None,
                        label_column: Column | None) -> tuple[float, float] | None:
    """The arguments' consistency; returns ``score_range`` as floats."""
    if columns is not None and len(columns) != 2:
        raise ValueError(f"columns: two text columns, got {columns!r}")
    if score_column is not None and label_column is not None:
        raise ValueError("give score_column or label_column, not both")
    if score_range is None:
        return None
    if score_column is None:
        raise ValueError("score_range needs score_column")
    lo, hi = map(float, score_range)
    if not hi > lo:
        raise ValueError(f"score_range: need lo < hi, got {score_range!r}")
    return lo, hi


def _pairs(table: Table, columns: Sequence[Column] | None, score_column: Column | None,
           score_range: tuple[float, float] | None, label_column: Column | None,
           group_column: Column | None, groups: bool) -> _reader.Records[Pair]:
    texts = list(columns) if columns is not None else _pair_columns(table, _file_names(table))
    group = _group(table, group_column, groups)
    extra = [c for c in (score_column, label_column, group) if c is not None]
    c1, c2 = str(texts[0]), str(texts[1])

    def make(values: list[object]) -> Pair:
        t1, t2 = _reader.check_text(values[0], c1), _reader.check_text(values[1], c2)
        g = _reader.check_group(values[-1], str(group)) if group is not None else None
        if score_column is not None:
            if score_range is None:
                score = _reader.check_number(values[2], str(score_column))
                return Pair(t1, t2, score=score, group=g)
            lo, hi = score_range
            s = _reader.check_number(values[2], str(score_column), lo=lo, hi=hi)
            return Pair(t1, t2, score=s, label=(s - lo) / (hi - lo), group=g)
        if label_column is not None:
            label = _reader.check_number(values[2], str(label_column), what="label")
            return Pair(t1, t2, label=label, group=g)
        return Pair(t1, t2, group=g)

    return _read(table, [*texts, *extra], make)


def _triplets(table: Table, columns: Sequence[Column], group_column: Column | None,
              groups: bool) -> _reader.Records[Triplet]:
    group = _group(table, group_column, groups)
    names = [str(c) for c in columns]

    def make(values: list[object]) -> Triplet:
        texts = [_reader.check_text(x, c) for x, c in zip(values[:3], names, strict=True)]
        g = _reader.check_group(values[3], str(group)) if group is not None else None
        return Triplet(*texts, group=g)

    return _read(table, [*columns, *([group] if group is not None else [])], make)


def load_pairs(path: str | Path, *, columns: Sequence[Column] | None = None,
               score_column: Column | None = None,
               score_range: tuple[float, float] | None = None,
               label_column: Column | None = None, group_column: Column | None = None,
               groups: bool = True, fmt: Format | None = None, split: str | None = None,
               has_header: bool = True, skip_bad_rows: bool = False) -> _reader.Records[Pair]:
    """Pairs from a JSONL / CSV / TSV / Parquet file or a ``datasets`` directory.

    ``columns``: the two text columns; None: ``anchor``/``positive`` if the file has them,
    else ``sentence1``/``sentence2``, else an error naming the file's columns.
    ``score_column``: an optional graded score; with ``score_range=(lo, hi)`` it must lie in
    the range and ``Pair.label`` is it scaled to [0, 1]. ``label_column``: an optional
    numeric label, stored in ``Pair.label`` as is. ``group_column``: the column of
    ``Pair.group`` (a string, or an int kept as its string), which the file must have; None:
    ``group`` when the file has it; ``groups=False`` reads no group. ``split``: the split of
    a directory that ``DatasetDict.save_to_disk`` wrote. ``has_header``: CSV / TSV only.
    """
    lo_hi = _check_pair_options(columns, score_column, score_range, label_column)
    table = open_table(path, fmt, split=split, has_header=has_header,
                       skip_bad_rows=skip_bad_rows)
    return _pairs(table, columns, score_column, lo_hi, label_column, group_column, groups)


def load_triplets(path: str | Path, *, columns: Sequence[Column] = TRIPLET_COLUMNS,
                  group_column: Column | None = None, groups: bool = True,
                  fmt: Format | None = None, split: str | None = None,
                  has_header: bool = True, skip_bad_rows: bool = False
                  ) -> _reader.Records[Triplet]:
    """(anchor, positive, negative) triplets from a file as :func:`load_pairs` reads;
    ``group_column`` / ``groups`` as there."""
    if len(columns) != 3:
        raise ValueError(f"columns: three text columns, got {columns!r}")
    table = open_table(path, fmt, split=split, has_header=has_header,
                       skip_bad_rows=skip_bad_rows)
    return _triplets(table, columns, group_column, groups)


def _kind(table: Table) -> Kind:
    return "triplets" if TRIPLET_COLUMNS[2] in _file_names(table) else "pairs"


def detect_kind(path: str | Path, *, fmt: Format | None = None,
                split: str | None = None) -> Kind:
    """``"triplets"`` if the file has a ``negative`` column, else ``"pairs"`` (CSV / TSV: by
    the header)."""
    return _kind(open_table(path, fmt, split=split))


def load_training_file(path: str | Path, *, group_column: Column | None = None,
                       groups: bool = True, fmt: Format | None = None,
                       split: str | None = None, skip_bad_rows: bool = False
                       ) -> _reader.Records[Pair] | _reader.Records[Triplet]:
    """Triplets (``anchor``, ``positive``, ``negative``) if the file has a ``negative``
    column (:func:`detect_kind`), else pairs with the default columns of :func:`load_pairs`;
    groups as there. No configuration: the file's column names decide."""
    table = open_table(path, fmt, split=split, skip_bad_rows=skip_bad_rows)
    if _kind(table) == "triplets":
        return _triplets(table, TRIPLET_COLUMNS, group_column, groups)
    return _pairs(table, None, None, None, None, group_column, groups)
