"""Validation plumbing shared by the loaders: the error type, the skip report, line reading.

Every loader reads its file line by line (bytes, decoded as strict UTF-8 per line), turns each
row into a record or a :class:`RowError`, and hands bad rows to a :class:`Validator`, which
either raises :class:`DataError` (``path:line: reason``) or, with ``skip_bad_rows=True``,
counts the row in a :class:`LoadReport` and logs a warning at the end. Nothing is dropped
silently: blank lines, the only rows skipped without an error, are counted too. Columnar
files (Parquet, ``datasets`` directories) have rows, not lines: ``path: row N: reason``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

log = logging.getLogger("batchscale.data")

T = TypeVar("T")

#: How many full messages of skipped rows a report keeps (the counts are always complete).
MAX_EXAMPLES = 10

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in CSV / TSV cells


class DataError(ValueError):
    """A bad row: the message is ``path:line: reason``, or ``path: row N: reason`` for a
    columnar file (``unit="row"``; ``line`` is then the 1-based row), or ``path: reason``
    for a fault of the whole file (``line=None``, e.g. a column its schema lacks)."""

    def __init__(self, path: str | Path, line: int | None, reason: str, *,
                 unit: Literal["line", "row"] = "line") -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.unit = unit
        if line is None:
            where = self.path
        elif unit == "row":
            where = f"{self.path}: row {line}"
        else:
            where = f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


class RowError(Exception):
    """Raised by a row parser: ``kind`` is the reason's category (what a report counts by),
    ``detail`` the specifics."""

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class LoadReport:
    """What a load read and what it skipped (only ``skip_bad_rows=True`` skips rows)."""

    path: str
    rows_read: int = 0        # non-blank rows seen
    rows_kept: int = 0        # rows that passed (SNLI then keeps the entailment ones)
    blank_lines: int = 0      # empty lines passed over (not errors)
    skipped: Counter[str] = field(default_factory=Counter)   # reason category -> rows
    examples: list[str] = field(default_factory=list)        # first messages, path:line: reason

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def record(self, error: DataError, kind: str) -> None:
        self.skipped[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(error))

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {kind}" for kind, n in self.skipped.most_common())
        return (f"{self.path}: kept {self.rows_kept} of {self.rows_read} rows, "
                f"skipped {self.rows_skipped}" + (f" ({reasons})" if reasons else ""))

    def merge(self, other: LoadReport) -> None:
        """Add another file's counts (a loader that reads several files reports once)."""
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.blank_lines += other.blank_lines
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: max(0, MAX_EXAMPLES - len(self.examples))])


class Records(list[T], Generic[T]):
    """A list of records that carries the :class:`LoadReport` of the load that made it."""

    def __init__(self, items: list[T], report: LoadReport) -> None:
        super().__init__(items)
        self.report = report


class Validator:
    """Raises on a bad row, or counts it when ``skip_bad_rows`` is set."""

    def __init__(self, path: str | Path, skip_bad_rows: bool,
                 report: LoadReport | None = None, *,
                 unit: Literal["line", "row"] = "line") -> None:
        self.path = str(path)
        self.skip_bad_rows = skip_bad_rows
        self.report = report if report is not None else LoadReport(self.path)
        self.unit = unit  # what ``bad``'s number counts: file lines or table rows

    def bad(self, line: int, error: RowError) -> None:
        exc = DataError(self.path, line, error.message, unit=self.unit)
        if not self.skip_bad_rows:
            raise exc
        self.report.record(exc, error.kind)

    def finish(self) -> LoadReport:
        if self.report.rows_skipped:
            log.warning("%s; first: %s", self.report.summary(), self.report.examples[0])
        return self.report


def open_checked(path: str | Path, what: str = "file") -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such {what}")
    return p


def utf8_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text with its line end, valid) for each line of the file; a line that
    is not valid UTF-8 comes decoded with replacement characters and ``valid=False``. A
    UTF-8 byte-order mark on line 1 is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text, valid = raw.decode("utf-8"), True
            except UnicodeDecodeError:
                text, valid = raw.decode("utf-8", errors="replace"), False
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield lineno, text, valid


def decoded_lines(path: Path, validator: Validator, *, keep_ends: bool = False,
                  count_blank: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line that is valid UTF-8; a line that is not is a bad
    row (``invalid UTF-8``). With ``count_blank``, blank lines are counted in the report
    and not yielded."""
    report = validator.report
    for lineno, text, valid in utf8_lines(path):
        if not valid:
            report.rows_read += 1
            validator.bad(lineno, RowError("invalid UTF-8", "the line is not valid UTF-8"))
            continue
        body = text.rstrip("\r\n")
        if count_blank and not body.strip():
            report.blank_lines += 1
            continue
        yield lineno, (text if keep_ends else body)


def json_object(line: str) -> dict[str, object]:
    """One JSONL line, which must hold an object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError("invalid JSON", e.msg) from None
    if not isinstance(obj, dict):
        raise RowError("invalid JSON", f"expected an object, got {type(obj).__name__}")
    return obj


def check_text(value: object, column: str) -> str:
    """A non-empty string (whitespace alone counts as empty)."""
    if value is None:  # JSON null; in Parquet / Arrow also a row written without the column
        raise RowError("missing value", f"column {column!r} is null")
    if not isinstance(value, str):
        raise RowError("non-string text", f"column {column!r} holds {type(value).__name__}")
    if not value.strip():
        raise RowError("empty text", f"column {column!r}")
    return value


def check_number(value: object, column: str, what: str = "score",
                 lo: float | None = None, hi: float | None = None) -> float:
    """A finite float parsed from a number or a numeric string, optionally within [lo, hi]."""
    if isinstance(value, bool):
        raise RowError(f"non-numeric {what}", f"column {column!r} holds {value!r}")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise RowError(f"non-numeric {what}", f"column {column!r} holds {value!r}") from None
    else:
        raise RowError(f"non-numeric {what}", f"column {column!r} holds {type(value).__name__}")
    if not math.isfinite(x):
        raise RowError(f"non-finite {what}", f"column {column!r} holds {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise RowError(f"{what} out of range",
                       f"column {column!r} holds {x:g}, not in [{lo}, {hi}]")
    return x


def check_group(value: object, column: str) -> str:
    """A group name: a non-empty string, or an integer (kept as its decimal string, so that
    a file of numeric ids groups as one of string ids)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
        raise RowError("bad group", f"column {column!r} holds {shown}; need a string or int")
    if not value.strip():
        raise RowError("bad group", f"column {column!r} is empty")
    return value
