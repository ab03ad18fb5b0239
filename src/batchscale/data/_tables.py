"""Row readers for the generic pair / triplet files: JSONL, CSV, TSV, Parquet and
``datasets`` directories (``Dataset.save_to_disk``).

Every reader gives the file's column names (``names``), its rows in file order (``rows``:
(number, row), a line number for the text formats, a 1-based row for the columnar ones) and a
``getter`` that picks columns out of a row, raising :class:`_reader.RowError` when a row lacks
one. Bad rows go to the reader's :class:`_reader.Validator`.

Format rules (:func:`infer_format`): ``fmt=`` if given; a directory that ``save_to_disk``
wrote (it holds ``state.json`` and ``dataset_info.json``, or ``dataset_dict.json`` for a
``DatasetDict``) is ``datasets``; otherwise the suffix: ``.jsonl`` / ``.ndjson``, ``.csv``,
``.tsv`` / ``.txt``, ``.parquet`` / ``.pq``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from . import _reader

Format = Literal["jsonl", "csv", "tsv", "parquet", "datasets"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "tsv", "parquet", "datasets")
Column = str | int
Row = dict[str, object] | list[str]
Getter = Callable[[Row], list[object]]

_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                                ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet",
                                ".pq": "parquet"}
#: Files ``save_to_disk`` writes at the top of its directory (datasets 2.x to 5.x).
DATASET_MARKERS = ("state.json", "dataset_info.json")
DATASET_DICT_MARKER = "dataset_dict.json"
#: Rows per batch read from a columnar file (only one batch is held as Python objects).
BATCH_ROWS = 1024


def infer_format(path: Path, fmt: Format | None) -> Format:
    """``fmt`` checked, or the format the path shows (see the module docstring)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, "
                             f"got {fmt!r}")
        return fmt
    if path.is_dir():
        if is_datasets_dir(path):
            return "datasets"
        raise ValueError(f"{path}: a directory, but not one that datasets' save_to_disk wrote "
                         f"(no {', '.join((*DATASET_MARKERS, DATASET_DICT_MARKER))})")
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                         f"pass fmt= one of {', '.join(map(repr, FORMATS))}") from None


def is_datasets_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in (*DATASET_MARKERS, DATASET_DICT_MARKER))


def open_table(path: str | Path, fmt: Format | None, *, split: str | None = None,
               has_header: bool = True, skip_bad_rows: bool = False) -> Table:
    """The reader for ``path`` (which must exist), with a fresh validator."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    kind = infer_format(p, fmt)
    if split is not None and kind != "datasets":
        raise ValueError(f"{p}: split={split!r} is for a datasets directory, not a {kind} file")
    if kind == "datasets":
        return DatasetTable(p, split, skip_bad_rows)
    _reader.open_checked(p)
    if kind == "parquet":
        return ParquetTable(p, skip_bad_rows)
    return TextTable(p, kind, _reader.Validator(p, skip_bad_rows), has_header)


class Table:
    """The reader interface (see the module docstring)."""

    path: Path
    fmt: Format
    v: _reader.Validator

    def names(self) -> list[str] | None:
        """The column names (``[]`` for a file with no rows), or None when columns have
        no names (CSV / TSV without a header)."""
        raise NotImplementedError

    def rows(self, columns: Sequence[Column]) -> Iterator[tuple[int, Row]]:
        """(number, row) in file order; ``columns``: those the caller will get (a columnar
        reader reads only these)."""
        raise NotImplementedError

    def getter(self, columns: Sequence[Column]) -> Getter:
        """A function row -> the values of ``columns``, raising RowError('missing column')."""
        raise NotImplementedError


def _dict_getter(columns: Sequence[str]) -> Getter:
    def get(row: Row) -> list[object]:
        assert isinstance(row, dict)
        missing = [c for c in columns if c not in row]
        if missing:
            raise _reader.RowError("missing column", ", ".join(map(repr, missing)))
        return [row[c] for c in columns]

    return get


class TextTable(Table):
    """Rows of a JSONL / CSV / TSV file: a dict per JSONL line or a list of fields per CSV /
    TSV record; ``header`` and ``header_line`` are set once the header (CSV / TSV with
    ``has_header``) has been read. CSV follows the usual quoting rules (a quoted field may
    span lines; its row is numbered by its first line); TSV has no quoting."""

    def __init__(self, path: Path, fmt: Format, v: _reader.Validator, has_header: bool) -> None:
        self.path, self.fmt, self.v, self.has_header = path, fmt, v, has_header
        self.header: list[str] | None = None
        self.header_line = 0

    def names(self) -> list[str] | None:
        # A separate short read: the first JSON object's keys, or the CSV / TSV header
        # (``rows`` reads the header again and checks it).
        if self.fmt == "jsonl":
            for _, line, valid in _reader.utf8_lines(self.path):
                if not valid or not line.strip():
                    continue
                try:
                    return list(_reader.json_object(line))
                except _reader.RowError:  # ``rows`` reports it
                    continue
            return []
        if not self.has_header:
            return None
        try:
            for row in self._records(text for _, text, _ in _reader.utf8_lines(self.path)):
                if any(cell.strip() for cell in row):
                    return [h.strip() for h in row]
        except csv.Error:  # ``rows`` reports it
            pass
        return []

    def rows(self, columns: Sequence[Column] = ()) -> Iterator[tuple[int, Row]]:
        return self._jsonl() if self.fmt == "jsonl" else self._delimited()

    def _records(self, lines: Iterator[str]) -> Iterator[list[str]]:
        if self.fmt == "csv":
            return csv.reader(lines, strict=True)
        return csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)

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

        reader = self._records(lines())
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

    def getter(self, columns: Sequence[Column]) -> Getter:
        if self.fmt == "jsonl":
            for c in columns:
                if not isinstance(c, str):
                    raise ValueError(f"{self.path}: JSONL columns are keys (str), got {c!r}")
            return _dict_getter([str(c) for c in columns])

        index: list[int] = []
        for c in columns:
            if isinstance(c, int):
                index.append(c)
            elif self.header is None:
                raise ValueError(f"{self.path}: column {c!r} is a name but the file is read "
                                 "without a header; give 0-based positions or has_header=True")
            elif c not in self.header:
                raise _reader.DataError(self.path, self.header_line,
                                        f"missing column: {c!r} is not in the header "
                                        f"{self.header}")
            else:
                index.append(self.header.index(c))

        def get_row(row: Row) -> list[object]:
            missing = [repr(c) for c, i in zip(columns, index, strict=True) if i >= len(row)]
            if missing:
                raise _reader.RowError("missing column",
                                       f"{', '.join(missing)} (the row has {len(row)} fields)")
            return [row[i] for i in index]

        return get_row


class _ColumnarTable(Table):
    """A table with a schema: every row has every column (a value may be null); rows are
    numbered from 1 in the file's order and read in batches of :data:`BATCH_ROWS`."""

    _names: list[str]

    def names(self) -> list[str]:
        return list(self._names)

    def _selected(self, columns: Sequence[Column]) -> list[str]:
        """``columns`` as names; a name the schema lacks is an error of the whole file."""
        out = []
        for c in columns:
            if isinstance(c, int):
                if not 0 <= c < len(self._names):
                    raise _reader.DataError(self.path, None, f"missing column: position {c} "
                                            f"(the file has {len(self._names)} columns)")
                c = self._names[c]
            elif c not in self._names:
                raise _reader.DataError(self.path, None, f"missing column: {c!r} is not among "
                                        f"the file's columns {self._names}")
            out.append(c)
        return out

    def getter(self, columns: Sequence[Column]) -> Getter:
        return _dict_getter(self._selected(columns))

    def rows(self, columns: Sequence[Column]) -> Iterator[tuple[int, Row]]:
        number = 0
        for batch in self._batches(list(dict.fromkeys(self._selected(columns)))):
            for row in batch.to_pylist():
                number += 1
                self.v.report.rows_read += 1
                yield number, row

    def _batches(self, names: list[str]) -> Iterator:
        raise NotImplementedError


class ParquetTable(_ColumnarTable):
    """A Parquet file, read with pyarrow one batch of the needed columns at a time."""

    def __init__(self, path: Path, skip_bad_rows: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.fmt = path, "parquet"
        self.v = _reader.Validator(path, skip_bad_rows, unit="row")
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise _reader.DataError(path, None, f"not a readable Parquet file: {e}") from None
        self._names = list(self._file.schema_arrow.names)

    def _batches(self, names: list[str]) -> Iterator:
        return self._file.iter_batches(batch_size=BATCH_ROWS, columns=names)


class DatasetTable(_ColumnarTable):
    """A directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``,
    with ``split``), opened with ``datasets.load_from_disk`` (memory-mapped Arrow files).
    Errors name the split's directory and the row in the dataset's order (``ds[N - 1]``)."""

    def __init__(self, path: Path, split: str | None, skip_bad_rows: bool) -> None:
        import datasets

        self.fmt = "datasets"
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if split is None or split not in loaded:
                got = "no split given" if split is None else f"no split {split!r}"
                raise ValueError(f"{path}: a DatasetDict; {got}: pass split= one of {splits}")
            loaded, path = loaded[split], path / split  # save_to_disk's directory per split
        elif split is not None:
            raise ValueError(f"{path}: a single Dataset (no splits), got split={split!r}")
        self.path, self._ds = path, loaded
        self.v = _reader.Validator(path, skip_bad_rows, unit="row")
        self._names = list(loaded.column_names)

    def _batches(self, names: list[str]) -> Iterator:
        # The arrow format yields pyarrow tables sliced from the memory-mapped files.
        arrow = self._ds.select_columns(names).with_format("arrow")
        return arrow.iter(batch_size=BATCH_ROWS)
