"""BEIR loader: SciFact, a SciDocs-shaped folder, streaming, corrupted copies."""

from __future__ import annotations

import json
import shutil

import pytest

from batchscale.data import BeirDataset, DataError, Document, Pair, load_beir
from conftest import DROP, field_edit, json_edit


def test_scifact(shared_data) -> None:
    ds, test = load_beir(shared_data / "scifact", "test")
    assert ds.count_documents() == 5183
    assert len(ds.queries()) == 1109
    assert len(test.queries) == 300 and sum(map(len, test.qrels.values())) == 339
    assert set(test.queries) == set(test.qrels)
    train = ds.split("train")
    assert len(train.queries) == 809 and sum(map(len, train.qrels.values())) == 919
    docs = ds.iter_corpus()
    first = next(docs)
    assert first.id == "4983" and first.full_text.startswith(
        "Microstructural development of human newborn cerebral white matter")
    assert first.full_text == (first.title + " " + first.text).strip()


def test_training_pairs(shared_data) -> None:
    ds = BeirDataset(shared_data / "scifact")
    pairs = ds.training_pairs("train")
    assert len(pairs) == 919
    queries = ds.queries()
    qid, judged = next(iter(ds.qrels("train").items()))
    doc = next(d for d in ds.iter_corpus() if d.id == next(iter(judged)))
    assert pairs[0] == Pair(queries[qid], doc.full_text)


def _scidocs_like(root):
    """SciDocs' shape: metadata fields, a title-only document, score-0 judgements."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    docs = [{"_id": "d1", "title": "Deep nets", "text": "We train.", "metadata": {"year": 1}},
            {"_id": "d2", "title": "Only a title", "text": "", "metadata": {}},
            {"_id": "d3", "title": "", "text": "No title here."},
            {"_id": "d4", "text": "No title key at all."}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs),
                                       encoding="utf-8")
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "deep nets", "metadata": {"authors": []}}) + "\n"
        + json.dumps({"_id": "q2", "text": "titles"}) + "\n", encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td2\t1\n", encoding="utf-8")
    return root


def test_scidocs_layout_loads_unchanged(tmp_path) -> None:
    ds, split = load_beir(_scidocs_like(tmp_path / "scidocs"), "test")
    assert split.qrels == {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 1}}
    assert list(ds.iter_corpus()) == [Document("d1", "Deep nets", "We train."),
                                      Document("d2", "Only a title", ""),
                                      Document("d3", "", "No title here."),
                                      Document("d4", "", "No title key at all.")]
    assert [d.full_text for d in ds.iter_corpus()][1:3] == ["Only a title", "No title here."]
    assert ds.training_pairs("test") == [Pair("deep nets", "Deep nets We train."),
                                         Pair("titles", "Only a title")]


def test_corpus_is_streamed(tmp_path) -> None:
    root = _scidocs_like(tmp_path / "b")
    with open(root / "corpus.jsonl", "ab") as f:
        f.write(b"{broken\n")
    docs = BeirDataset(root).iter_corpus()
    assert next(docs).id == "d1"  # read lazily: the broken last line is not reached yet
    with pytest.raises(DataError, match=rf"^{root / 'corpus.jsonl'}:5: invalid JSON"):
        list(docs)


CORRUPTIONS = {  # name -> (file, line, edit, reason)
    "corpus missing _id": ("corpus.jsonl", 3, json_edit("_id", DROP), "missing column"),
    "corpus missing text": ("corpus.jsonl", 3, json_edit("text", DROP), "missing column"),
    "corpus empty text": ("corpus.jsonl", 3, lambda line: json.dumps(
        {"_id": json.loads(line)["_id"], "title": " ", "text": ""}).encode(), "empty text"),
    "corpus invalid UTF-8": ("corpus.jsonl", 3, lambda line: line.replace(b"a", b"\xff", 1),
                             "invalid UTF-8"),
    "corpus duplicate id": ("corpus.jsonl", 3, lambda line: json.dumps(
        {"_id": "4983", "title": "t", "text": "x"}).encode(), "duplicate id"),
    "queries empty text": ("queries.jsonl", 3, json_edit("text", ""), "empty text"),
    "queries invalid JSON": ("queries.jsonl", 3, lambda line: line[:-1], "invalid JSON"),
    "qrels missing column": ("qrels/test.tsv", 3, lambda line: line.rsplit(b"\t", 1)[0],
                             "missing column"),
    "qrels non-numeric score": ("qrels/test.tsv", 3, field_edit(2, b"high"),
                                "non-integer score"),
    "qrels NaN score": ("qrels/test.tsv", 3, field_edit(2, b"nan"), "non-integer score"),
    "qrels unknown document": ("qrels/test.tsv", 3, field_edit(1, b"99999999999"),
                               "unknown document"),
    "qrels unknown query": ("qrels/test.tsv", 3, field_edit(0, b"q-none"), "unknown query"),
    "qrels invalid UTF-8": ("qrels/test.tsv", 3, lambda line: line + b"\xc0", "invalid UTF-8"),
}


@pytest.fixture
def scifact_copy(shared_data, tmp_path):
    root = tmp_path / "scifact"
    shutil.copytree(shared_data / "scifact", root)
    return root


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_copy_is_rejected(scifact_copy, corrupt, name) -> None:
    file, line, edit, reason = CORRUPTIONS[name]
    bad = corrupt(scifact_copy / file, scifact_copy / file, line, edit)
    with pytest.raises(DataError, match=rf"^{bad}:{line}: {reason}"):
        BeirDataset(scifact_copy).split("test")
    ds = BeirDataset(scifact_copy, skip_bad_rows=True)
    split = ds.split("test")
    reports = [ds.corpus_report, ds.queries_report, ds.qrels_reports["test"]]
    assert sum(r.rows_skipped for r in reports) == 1
    assert sum(map(len, split.qrels.values())) >= 338


def test_fiqa_style_empty_documents_can_be_kept(tmp_path) -> None:
    root = _scidocs_like(tmp_path / "fiqa")
    with open(root / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "d5", "title": "", "text": ""}) + "\n")
    with pytest.raises(DataError, match=":5: empty text"):
        BeirDataset(root).count_documents()
    assert BeirDataset(root, allow_empty_documents=True).count_documents() == 5
