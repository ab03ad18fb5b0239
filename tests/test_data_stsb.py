"""STS-B loader: the official CSVs, and corrupted copies rejected with path:line: reason."""

from __future__ import annotations

import logging
import shutil

import pytest

from batchscale.data import DataError, load_stsb
from conftest import DROP, field_edit


@pytest.mark.parametrize(("split", "rows"), [("train", 5749), ("dev", 1500), ("test", 1379)])
def test_official_splits(shared_data, split, rows) -> None:
    pairs = load_stsb(shared_data / "stsbenchmark", split)
    assert len(pairs) == rows
    assert pairs.report.rows_kept == rows and pairs.report.rows_skipped == 0
    assert all(0.0 <= p.score <= 5.0 and p.label == pytest.approx(p.score / 5) for p in pairs)
    assert all(p.text1.strip() and p.text2.strip() for p in pairs)


def test_extra_trailing_columns_are_ignored(shared_data) -> None:
    path = shared_data / "stsbenchmark" / "sts-test.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    wide = [i for i, line in enumerate(lines) if len(line.split("\t")) > 7]
    assert wide, "the official test file has rows with source notes"
    pairs = load_stsb(path)
    i = wide[0]
    cols = lines[i].split("\t")
    assert (pairs[i].text1, pairs[i].text2, pairs[i].score) == (cols[5], cols[6], float(cols[4]))


def test_quotes_are_text(tmp_path) -> None:
    f = tmp_path / "sts-dev.csv"
    f.write_text('g\tf\t2012\t1\t3.0\t"Quoted" start\tand an "inner" one\n', encoding="utf-8")
    (p,) = load_stsb(tmp_path, "dev")
    assert (p.text1, p.text2) == ('"Quoted" start', 'and an "inner" one')


CORRUPTIONS = {
    "missing column": (field_edit(6, DROP), "missing column"),
    "non-numeric score": (field_edit(4, b"high"), "non-numeric score"),
    "NaN score": (field_edit(4, b"nan"), "non-finite score"),
    "score out of range": (field_edit(4, b"5.5"), "score out of range"),
    "empty text": (field_edit(6, b"  "), "empty text"),
    "invalid UTF-8": (lambda line: line.replace(b"a", b"\xff\xfe", 1), "invalid UTF-8"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_copy_is_rejected(shared_data, tmp_path, corrupt, name) -> None:
    edit, reason = CORRUPTIONS[name]
    bad = corrupt(shared_data / "stsbenchmark" / "sts-dev.csv", tmp_path / "sts-dev.csv", 37, edit)
    with pytest.raises(DataError, match=rf"^{bad}:37: {reason}") as info:
        load_stsb(tmp_path, "dev")
    assert info.value.path == str(bad) and info.value.line == 37


def test_skip_bad_rows_counts_by_reason(shared_data, tmp_path, corrupt, caplog) -> None:
    path = tmp_path / "sts-dev.csv"
    shutil.copy(shared_data / "stsbenchmark" / "sts-dev.csv", path)
    for line, name in [(5, "NaN score"), (9, "NaN score"), (20, "empty text"),
                       (30, "invalid UTF-8")]:
        corrupt(path, path, line, CORRUPTIONS[name][0])
    with caplog.at_level(logging.WARNING, logger="batchscale.data"):
        pairs = load_stsb(tmp_path, "dev", skip_bad_rows=True)
    assert len(pairs) == 1496
    report = pairs.report
    assert report.rows_read == 1500 and report.rows_kept == 1496 and report.rows_skipped == 4
    assert dict(report.skipped) == {"non-finite score": 2, "empty text": 1, "invalid UTF-8": 1}
    assert report.examples[0].startswith(f"{path}:5: non-finite score")
    assert "skipped 4" in caplog.text


def test_blank_lines_are_counted(tmp_path) -> None:
    f = tmp_path / "sts-test.csv"
    f.write_text("g\tf\t2012\t1\t3.0\tA b.\tC d.\n\n", encoding="utf-8")
    pairs = load_stsb(f)
    assert len(pairs) == 1 and pairs.report.blank_lines == 1


def test_missing_file_and_bad_split(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_stsb(tmp_path, "dev")
    with pytest.raises(ValueError, match="split"):
        load_stsb(tmp_path, "validation")
