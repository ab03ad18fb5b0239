"""Generic pair / triplet files: JSONL, CSV, TSV; configurable columns; corrupted copies."""

from __future__ import annotations

import json

import pytest

from batchscale.data import DataError, Pair, Triplet, load_pairs, load_triplets
from conftest import DROP, field_edit, json_edit

ROWS = [("A man plays guitar.", "Someone plays an instrument.", 4.2),
        ("A dog runs.", "A cat sleeps.", 0.4),
        ('She said "hi", then left.', "She greeted and left.", 3.0)]


def write(tmp_path, fmt: str, rows=ROWS, names=("s1", "s2", "score")):
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(names, r, strict=True))) + "\n"
                                for r in rows), encoding="utf-8")
    elif fmt == "csv":
        def q(x):
            return '"' + str(x).replace('"', '""') + '"' if isinstance(x, str) else str(x)
        path.write_text(",".join(names) + "\n" + "".join(",".join(q(x) for x in r) + "\n"
                                                          for r in rows), encoding="utf-8")
    else:
        path.write_text("\t".join(names) + "\n" + "".join("\t".join(map(str, r)) + "\n"
                                                           for r in rows), encoding="utf-8")
    return path


def rejected_then_skipped(path, error: str, **options):
    """``load_pairs(path, **options)`` fails with ``path:error``; returns what it keeps with
    ``skip_bad_rows``."""
    with pytest.raises(DataError, match=rf"^{path}:{error}"):
        load_pairs(path, **options)
    return load_pairs(path, skip_bad_rows=True, **options)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_pairs_with_scores(tmp_path, fmt) -> None:
    path = write(tmp_path, fmt)
    pairs = load_pairs(path, columns=("s1", "s2"), score_column="score", score_range=(0, 5))
    assert pairs == [Pair(a, b, score=s, label=s / 5) for a, b, s in ROWS]
    assert pairs.report.rows_kept == 3
    plain = load_pairs(path, columns=("s1", "s2"))
    assert plain == [Pair(a, b) for a, b, _ in ROWS]


def test_label_column_and_positions(tmp_path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("x\ty\t1\nu\tv\t0\n", encoding="utf-8")
    pairs = load_pairs(path, columns=(0, 1), label_column=2, has_header=False)
    assert pairs == [Pair("x", "y", label=1.0), Pair("u", "v", label=0.0)]


def test_csv_quoted_newline_keeps_line_numbers(tmp_path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('a,b\n"first\nspans two lines",x\n"ok",\n', encoding="utf-8")
    good = rejected_then_skipped(path, "4: empty text: column 'b'", columns=("a", "b"))
    assert good == [Pair("first\nspans two lines", "x")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_triplets(tmp_path, fmt) -> None:
    rows = [("q1", "p1", "n1"), ("q2", "p2", "n2")]
    path = write(tmp_path, fmt, rows=rows, names=("anchor", "positive", "negative"))
    assert load_triplets(path) == [Triplet(*r) for r in rows]


CASES = {  # name -> (reason, {fmt: edit})
    "missing column": ("missing column", {"jsonl": json_edit("score", DROP),
                                          "csv": field_edit(2, DROP, b","),
                                          "tsv": field_edit(2, DROP, b"\t")}),
    "non-numeric score": ("non-numeric score", {"jsonl": json_edit("score", "x"),
                                                "csv": field_edit(2, b"x", b","),
                                                "tsv": field_edit(2, b"x", b"\t")}),
    "NaN": ("non-finite score", {"jsonl": lambda line: line.replace(b"4.2", b"NaN"),
                                 "csv": field_edit(2, b"nan", b","),
                                 "tsv": field_edit(2, b"NaN", b"\t")}),
    "empty text": ("empty text", {"jsonl": json_edit("s2", " "),
                                  "csv": field_edit(1, b'""', b","),
                                  "tsv": field_edit(1, b"", b"\t")}),
    "invalid UTF-8": ("invalid UTF-8", {f: (lambda line: line.replace(b"man", b"m\xc3n"))
                                        for f in ("jsonl", "csv", "tsv")}),
}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
@pytest.mark.parametrize("name", list(CASES))
def test_corrupted_copy_is_rejected(tmp_path, corrupt, fmt, name) -> None:
    reason, edits = CASES[name]
    good = write(tmp_path, fmt)
    line = 1 if fmt == "jsonl" else 2  # the first data row
    bad = corrupt(good, tmp_path / "bad" / good.name, line, edits[fmt])
    kept = rejected_then_skipped(bad, f"{line}: {reason}", columns=("s1", "s2"),
                                 score_column="score")
    assert len(kept) == 2 and dict(kept.report.skipped) == {reason: 1}


def test_header_without_the_column(tmp_path) -> None:
    path = write(tmp_path, "csv")
    with pytest.raises(DataError, match=rf"^{path}:1: missing column: 'text'"):
        load_pairs(path, columns=("s1", "text"))


def test_invalid_json_and_arguments(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"s1": "a", "s2": "b"}\n{"s1": "a", \n["x"]\n', encoding="utf-8")
    kept = rejected_then_skipped(path, "2: invalid JSON", columns=("s1", "s2"))
    assert len(kept) == 1 and kept.report.skipped["invalid JSON"] == 2
    with pytest.raises(ValueError, match="format must be"):
        load_pairs(path, fmt="parquet")  # type: ignore[arg-type]
    other = tmp_path / "p.parquet"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="suffix"):
        load_pairs(other)
    with pytest.raises(ValueError, match="not both"):
        load_pairs(path, score_column="a", label_column="b")
