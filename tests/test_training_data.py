"""Training data for a run: held-out dev queries / pairs, training sets from each source."""

from __future__ import annotations

from collections import Counter

import pytest

from batchscale.data import BeirDataset, load_stsb
from batchscale.study.run import load_training_data
from batchscale.training import config_from_dict


def test_beir_holdout_splits_queries_disjointly_and_reproducibly(shared_data):
    ds = BeirDataset(shared_data / "scifact")
    kept, held = ds.holdout("train", 0.1, seed=0)
    train = ds.split("train")
    assert len(held.qrels) == round(0.1 * len(train.qrels)) == 81
    assert set(kept.qrels) | set(held.qrels) == set(train.qrels)
    assert not set(kept.qrels) & set(held.qrels)
    assert all(held.qrels[q] == train.qrels[q] for q in held.qrels)
    again = ds.holdout("train", 0.1, seed=0)[1]
    assert again.qrels == held.qrels and ds.holdout("train", 0.1, seed=1)[1].qrels != held.qrels
    pairs = ds.training_pairs(kept)
    held_texts = {train.queries[q] for q in held.qrels}
    assert len(pairs) == sum(len(d) for d in kept.qrels.values())
    assert not {p.text1 for p in pairs} & held_texts
    with pytest.raises(ValueError, match=r"holdout fraction must be in \(0, 1\)"):
        ds.holdout("train", 1.0)


def test_run_data_for_stsb_and_scifact(shared_data):
    stsb = config_from_dict({"data": {"data_dir": str(shared_data)}})
    data, holdout = load_training_data(stsb)
    train = load_stsb(shared_data / "stsbenchmark", "train")
    assert holdout is None and len(data) == len(train) == 5749
    assert data.labels[0] == pytest.approx(train[0].score / 5)
    held = config_from_dict({"data": {"data_dir": str(shared_data), "dev_holdout": 0.2},
                             "eval": {"dev": {"task": "stsb", "split": "holdout"}}})
    data, pairs = load_training_data(held)
    assert len(pairs) == round(0.2 * 5749) and len(data) + len(pairs) == 5749
    # every training row lands in exactly one part (STS-B repeats some pairs: count them)
    kept = Counter(zip(data.columns[0], data.columns[1], strict=True))
    assert kept + Counter((p.text1, p.text2) for p in pairs) == Counter(
        (p.text1, p.text2) for p in train)
    sci = config_from_dict({"data": {"train": "scifact", "data_dir": str(shared_data),
                                     "dev_holdout": 0.1},
                            "loss": {"name": "infonce"},
                            "eval": {"dev": {"task": "scifact", "split": "holdout"},
                                     "metric": "ndcg@10"}})
    data, (ds, split) = load_training_data(sci)
    assert data.labels is None and len(split.qrels) == 81
    assert len(data) == sum(len(d) for d in ds.holdout("train", 0.1)[0].qrels.values())
