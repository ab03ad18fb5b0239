"""Generic pair / triplet files: JSONL, CSV, TSV, Parquet, datasets directories; default and
configurable columns; groups; corrupted copies."""

from __future__ import annotations

import json

import pytest

from batchscale.data import (
    DataError,
    Pair,
    Triplet,
    _tables,
    detect_kind,
    load_pairs,
    load_training_file,
    load_triplets,
)
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
        load_pairs(path, fmt="xml")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        load_pairs(path, fmt="parquet")
    other = tmp_path / "p.xml"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="suffix"):
        load_pairs(other)
    with pytest.raises(ValueError, match="not one that datasets' save_to_disk wrote"):
        load_pairs(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_pairs(path, score_column="a", label_column="b")


# --- default columns (sentence-transformers' names first) -------------------------------

ST_ROWS = [("q1", "p1", "n1"), ("q2", "p2", "n2")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_st_names_are_the_default(tmp_path, fmt) -> None:
    path = write(tmp_path, fmt, rows=ST_ROWS, names=("anchor", "positive", "negative"))
    assert detect_kind(path) == "triplets"
    assert load_training_file(path) == [Triplet(*r) for r in ST_ROWS]
    assert load_pairs(path) == [Pair(a, p) for a, p, _ in ST_ROWS]  # asked for pairs
    (tmp_path / "p").mkdir()
    pairs = write(tmp_path / "p", fmt, rows=[r[:2] for r in ST_ROWS],
                  names=("anchor", "positive"))
    assert detect_kind(pairs) == "pairs"
    assert load_training_file(pairs) == [Pair(a, p) for a, p, _ in ST_ROWS]


def test_sentence1_sentence2_still_the_fallback(tmp_path) -> None:
    path = write(tmp_path, "jsonl", names=("sentence1", "sentence2", "score"))
    assert load_pairs(path) == [Pair(a, b) for a, b, _ in ROWS]
    assert load_training_file(path) == [Pair(a, b) for a, b, _ in ROWS]
    # anchor/positive win when a file has both conventions
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"sentence1": "s", "sentence2": "t", "anchor": "a",
                                "positive": "p"}) + "\n", encoding="utf-8")
    assert load_pairs(both) == [Pair("a", "p")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_neither_convention_names_the_columns_found(tmp_path, fmt) -> None:
    path = write(tmp_path, fmt)  # columns s1, s2, score
    with pytest.raises(DataError, match=rf"^{path}: no text columns: the file has columns "
                                        r"\['s1', 's2', 'score'\]") as e:
        load_training_file(path)
    assert "'anchor'/'positive'" in str(e.value) and "'sentence1'/'sentence2'" in str(e.value)
    headerless = tmp_path / "h.tsv"
    headerless.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has_header=False"):
        load_pairs(headerless, has_header=False)


# --- groups ------------------------------------------------------------------------------

def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_group_column(tmp_path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"anchor": "a1", "positive": "p1", "group": "img1"},
        {"anchor": "a2", "positive": "p2", "group": 17},
        {"anchor": "a3", "positive": "p3", "negative": "n3", "group": "img1"}])
    assert load_pairs(path) == [Pair("a1", "p1", group="img1"), Pair("a2", "p2", group="17"),
                                Pair("a3", "p3", group="img1")]
    assert load_pairs(path, groups=False) == [Pair(f"a{i}", f"p{i}") for i in (1, 2, 3)]
    triplets = write_jsonl(tmp_path / "t.jsonl", [
        {"anchor": "a", "positive": "p", "negative": "n", "unit": 4}])
    assert load_training_file(triplets, group_column="unit") == [Triplet("a", "p", "n", "4")]
    assert load_training_file(triplets) == [Triplet("a", "p", "n")]  # no 'group' column
    with pytest.raises(DataError, match=rf"^{triplets}:1: missing column: 'group'"):
        load_triplets(triplets, group_column="group")  # named: the file must have it
    with pytest.raises(ValueError, match="groups=False"):
        load_pairs(path, group_column="unit", groups=False)


@pytest.mark.parametrize(("value", "shown"), [(1.5, "1.5"), ("", "is empty"), (None, "null"),
                                              (True, "True"), (["x"], "list")])
def test_bad_group_is_a_bad_row(tmp_path, value, shown) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"anchor": "a1", "positive": "p1", "group": "g"},
        {"anchor": "a2", "positive": "p2", "group": value}])
    kept = rejected_then_skipped(path, f"2: bad group: column 'group' .*{shown}")
    assert kept == [Pair("a1", "p1", group="g")]
    assert kept.report.rows_read == 2 and dict(kept.report.skipped) == {"bad group": 1}


def test_shared_pair_files_load_with_the_defaults(shared_data) -> None:
    counts = json.loads((shared_data / "pairs" / "counts.json").read_text())
    assert "mrpc-paraphrases" in counts
    for name, c in counts.items():
        path = shared_data / "pairs" / f"{name}.jsonl"
        pairs = load_training_file(path)
        assert len(pairs) == c["pairs"] and pairs.report.rows_skipped == 0, name
        assert all(isinstance(p, Pair) and p.group for p in pairs), name
    mrpc = load_pairs(shared_data / "pairs" / "mrpc-paraphrases.jsonl")
    first = json.loads((shared_data / "pairs" / "mrpc-paraphrases.jsonl").open().readline())
    assert mrpc[0] == Pair(first["anchor"], first["positive"], group=first["group"])


# --- Parquet and datasets directories ----------------------------------------------------

COLUMNAR_ROWS = [{"anchor": f"anchor {i}", "positive": f"positive {i}", "group": f"g{i % 2}"}
                 for i in range(5)]


def write_columnar(path, fmt: str, rows: list[dict], split: str | None = None):
    """``rows`` as a Parquet file (row groups of 2) or a datasets directory (a DatasetDict
    with ``split``); a key a row lacks is null there, as Arrow writes it."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
        return path
    import datasets

    ds = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: ds, "other": ds}) if split else ds).save_to_disk(str(path))
    return path


@pytest.fixture
def small_batches(monkeypatch):
    """Columnar reads in batches of 2 rows, so that row numbers cross batches."""
    monkeypatch.setattr(_tables, "BATCH_ROWS", 2)


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_columnar_files_load_as_written(tmp_path, small_batches, fmt) -> None:
    path = write_columnar(tmp_path / "pairs", fmt, COLUMNAR_ROWS)
    assert _tables.infer_format(path, None) == fmt
    expected = [Pair(r["anchor"], r["positive"], group=r["group"]) for r in COLUMNAR_ROWS]
    pairs = load_training_file(path)
    assert pairs == expected and pairs.report.rows_read == 5
    assert load_pairs(path, columns=(1, 0), groups=False) == [
        Pair(r["positive"], r["anchor"]) for r in COLUMNAR_ROWS]
    triplet_rows = [{**r, "negative": f"negative {i}"} for i, r in enumerate(COLUMNAR_ROWS)]
    tri = write_columnar(tmp_path / "triplets", fmt, triplet_rows)
    assert detect_kind(tri) == "triplets"
    assert load_training_file(tri) == [Triplet(r["anchor"], r["positive"], r["negative"],
                                               r["group"]) for r in triplet_rows]


COLUMNAR_CASES = {  # name -> (edit of row 4, reason)
    "None text": (lambda r: r.update(positive=None), "missing value: column 'positive' is null"),
    "missing column": (lambda r: r.pop("anchor"), "missing value: column 'anchor' is null"),
    "empty text": (lambda r: r.update(anchor="  "), "empty text: column 'anchor'"),
    "bad group": (lambda r: r.update(group=""), "bad group: column 'group' is empty"),
}


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
@pytest.mark.parametrize("name", list(COLUMNAR_CASES))
def test_columnar_bad_row(tmp_path, small_batches, fmt, name) -> None:
    edit, reason = COLUMNAR_CASES[name]
    rows = [dict(r) for r in COLUMNAR_ROWS]
    edit(rows[3])
    path = write_columnar(tmp_path / "bad", fmt, rows)
    kept = rejected_then_skipped(path, rf" row 4: {reason}$")
    assert kept == [Pair(r["anchor"], r["positive"], group=r["group"])
                    for i, r in enumerate(COLUMNAR_ROWS) if i != 3]
    assert kept.report.rows_read == 5 and kept.report.rows_skipped == 1


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_columnar_number_as_text_and_missing_columns(tmp_path, fmt) -> None:
    # Arrow types a column as a whole: a number as text makes every row of it bad.
    rows = [{"anchor": "a", "positive": i, "group": i} for i in range(3)]
    path = write_columnar(tmp_path / "numbers", fmt, rows)
    kept = rejected_then_skipped(path, " row 1: non-string text: column 'positive' holds int$")
    assert kept == [] and dict(kept.report.skipped) == {"non-string text": 3}
    # A column the whole file lacks is no row's fault: an error even with skip_bad_rows.
    path = write_columnar(tmp_path / "nopositive", fmt, [{"anchor": "a", "group": "g"}])
    with pytest.raises(DataError, match=rf"^{path}: no text columns: the file has columns "
                                        r"\['anchor', 'group'\]"):
        load_pairs(path, skip_bad_rows=True)
    with pytest.raises(DataError, match=rf"^{path}: missing column: 'text' is not among"):
        load_pairs(path, columns=("anchor", "text"), skip_bad_rows=True)


def test_datasets_dict_needs_a_split(tmp_path) -> None:
    path = write_columnar(tmp_path / "dict", "datasets", COLUMNAR_ROWS, split="train")
    with pytest.raises(ValueError, match=r"DatasetDict; no split given: .*\['train', 'other'\]"):
        load_pairs(path)
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_pairs(path, split="dev")
    pairs = load_training_file(path, split="train")
    assert pairs == [Pair(r["anchor"], r["positive"], group=r["group"]) for r in COLUMNAR_ROWS]
    assert pairs.report.path == str(path / "train")
    single = write_columnar(tmp_path / "single", "datasets", COLUMNAR_ROWS)
    with pytest.raises(ValueError, match="single Dataset"):
        load_pairs(single, split="train")
