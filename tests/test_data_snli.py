"""SNLI (SentEval layout): pairs, triplets, and corrupted copies of each file."""

from __future__ import annotations

import shutil

import pytest

from batchscale.data import DataError, Pair, Triplet, load_snli_pairs, load_snli_triplets


def test_dev_pairs_and_triplets(shared_data) -> None:
    root = shared_data / "snli"
    labels = (root / "labels.dev").read_text(encoding="utf-8").split("\n")
    pairs = load_snli_pairs(root, "dev")
    assert len(pairs) == sum(lab.strip() == "entailment" for lab in labels) == 3329
    assert pairs[0] == Pair("Two women are embracing while holding to go packages .",
                            "Two woman are holding packages .")
    assert pairs.report.rows_read == 9842 and pairs.report.rows_skipped == 0
    triplets = load_snli_triplets(root, "test")
    assert len(triplets) == 3247
    assert triplets[0] == Triplet(
        "This church choir sings to the masses as they sing joyous songs from the book at "
        "a church .", "The church is filled with song .", "A choir singing at a baseball game .")
    assert all(t.anchor and t.positive != t.negative for t in triplets)


def _tiny(tmp_path):
    (tmp_path / "s1.dev").write_text("P one .\nP one .\nP one .\nP two .\n", encoding="utf-8")
    (tmp_path / "s2.dev").write_text("E1 .\nC1 .\nE2 .\nN .\n", encoding="utf-8")
    (tmp_path / "labels.dev").write_text("entailment\ncontradiction\nentailment\nneutral\n",
                                         encoding="utf-8")
    return tmp_path


def test_triplets_combine_every_entailment_with_every_contradiction(tmp_path) -> None:
    root = _tiny(tmp_path)
    assert load_snli_triplets(root) == [Triplet("P one .", "E1 .", "C1 ."),
                                        Triplet("P one .", "E2 .", "C1 .")]
    assert load_snli_pairs(root) == [Pair("P one .", "E1 ."), Pair("P one .", "E2 .")]


CORRUPTIONS = {  # name -> (file, edit, reason)
    "empty premise": ("s1", lambda line: b"  ", "empty text: premise"),
    "empty hypothesis": ("s2", lambda line: b"", "empty text: hypothesis"),
    "invalid UTF-8": ("s2", lambda line: line + b"\xe2\x28\xa1", "invalid UTF-8"),
    "bad label": ("labels", lambda line: b"entails", "bad label"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_copy_is_rejected(shared_data, tmp_path, corrupt, name) -> None:
    for f in ("s1", "s2", "labels"):
        shutil.copy(shared_data / "snli" / f"{f}.dev", tmp_path / f"{f}.dev")
    which, edit, reason = CORRUPTIONS[name]
    bad = corrupt(tmp_path / f"{which}.dev", tmp_path / f"{which}.dev", 12, edit)
    with pytest.raises(DataError, match=rf"^{bad}:12: {reason}"):
        load_snli_pairs(tmp_path, "dev")
    kept = load_snli_triplets(tmp_path, "dev", skip_bad_rows=True)
    assert kept.report.rows_read == 9842 and kept.report.rows_skipped == 1


def test_files_of_different_lengths(tmp_path) -> None:
    root = _tiny(tmp_path)
    (root / "labels.dev").write_text("entailment\ncontradiction\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{root / 'labels.dev'}:3: missing line"):
        load_snli_pairs(root, skip_bad_rows=True)  # alignment lost: never skipped
