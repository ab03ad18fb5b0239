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
    stsb = config_from_dict({"data": {"data_dir": str(shared_data), "decontaminate": False}})
    data, holdout, _ = load_training_data(stsb)
    train = load_stsb(shared_data / "stsbenchmark", "train")
    assert holdout is None and len(data) == len(train) == 5749
    assert data.labels[0] == pytest.approx(train[0].score / 5)
    held = config_from_dict({"data": {"data_dir": str(shared_data), "dev_holdout": 0.2,
                                      "decontaminate": False},
                             "eval": {"dev": {"task": "stsb", "split": "holdout"}}})
    data, pairs, _ = load_training_data(held)
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
    data, (ds, split), _ = load_training_data(sci)
    assert data.labels is None and len(split.qrels) == 81
    assert len(data) == sum(len(d) for d in ds.holdout("train", 0.1)[0].qrels.values())


# -- sources: pair sets, mix, weights, decontamination ---------------------------------------
def _counts(shared_data) -> dict:
    import json

    return json.loads((shared_data / "pairs" / "counts.json").read_text())


def test_a_pair_set_by_name_loads_with_groups_and_label_one(shared_data):
    config = config_from_dict({"data": {"train": "pairs:mrpc-paraphrases",
                                        "data_dir": str(shared_data)}})
    data, held, report = load_training_data(config)
    lines = (shared_data / "pairs" / "mrpc-paraphrases.jsonl").read_text().splitlines()
    import json

    first = json.loads(lines[0])
    assert held is None and len(data) == _counts(shared_data)["mrpc-paraphrases"]["pairs"]
    assert (data.columns[0][0], data.columns[1][0], data.groups[0]) == (
        first["anchor"], first["positive"], first["group"])
    assert data.labels == (1.0,) * len(data)
    # the set was decontaminated by its publisher against STS-B dev / test: nothing drops
    assert report.contaminated == 0 and report.held_out_texts > 2000
    with pytest.raises(FileNotFoundError, match="mrpc-paraphrases"):
        load_training_data(config_from_dict({"data": {"train": "pairs:nope",
                                                      "data_dir": str(shared_data)}}))


def test_mix_is_every_source_decontaminated_against_the_eval_sets(shared_data):
    from batchscale.data import load_snli_pairs
    from batchscale.data.decontaminate import fold

    data, _, report = load_training_data(config_from_dict(
        {"data": {"train": "mix", "data_dir": str(shared_data)}}))
    counts = _counts(shared_data)
    stsb = load_stsb(shared_data / "stsbenchmark", "train")
    snli = [p for s in ("dev", "test") for p in load_snli_pairs(shared_data / "snli", s)]
    eval_texts = {fold(t) for split in ("dev", "test")
                  for p in load_stsb(shared_data / "stsbenchmark", split)
                  for t in (p.text1, p.text2)}

    def clean(pairs) -> int:
        return sum(1 for p in pairs if fold(p.text1) not in eval_texts
                   and fold(p.text2) not in eval_texts)

    expected = {"stsb": (len(stsb), clean(stsb)), "snli": (len(snli), clean(snli))}
    expected |= {f"pairs:{k}": (v["pairs"], v["pairs"]) for k, v in counts.items()}
    got = {s.source: (s.read, s.pairs) for s in report.sources}
    assert got == expected and len(data) == sum(v[1] for v in expected.values())
    assert report.contaminated == sum(r - k for r, k in expected.values()) > 600
    kept = {fold(t) for col in data.columns for t in col}
    assert not kept & eval_texts
    # graded STS-B labels, 1.0 for the positive pairs of the other sources
    assert data.labels[: expected["stsb"][1]] == tuple(
        p.score / 5 for p in stsb if fold(p.text1) not in eval_texts
        and fold(p.text2) not in eval_texts)
    assert set(data.labels[expected["stsb"][1]:]) == {1.0}


def test_planted_eval_sentences_are_dropped_and_counted(shared_data, tmp_path):
    import json

    dev = load_stsb(shared_data / "stsbenchmark", "dev")
    test = load_stsb(shared_data / "stsbenchmark", "test")
    planted = [("  " + dev[0].text1.upper() + " ", "a clean sentence one"),
               ("a clean sentence two", dev[5].text2.replace(" ", "   ")),
               (test[3].text1.lower(), "a clean sentence three")]
    clean = [(f"clean anchor {i}", f"clean positive {i}") for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n"
                            for a, p in clean[:2] + planted + clean[2:]), encoding="utf-8")
    on = config_from_dict({"data": {"train": str(path), "data_dir": str(shared_data)}})
    data, _, report = load_training_data(on)
    assert list(zip(*data.columns, strict=True)) == clean
    assert [(s.source, s.read, s.contaminated, s.pairs) for s in report.sources] == [
        (str(path), 8, 3, 5)]
    off = config_from_dict({"data": {"train": str(path), "data_dir": str(shared_data),
                                     "decontaminate": False}})
    assert len(load_training_data(off)[0]) == 8
    # only the sets the run scores on count: scored on SciFact, STS-B's sentences stay
    sci = config_from_dict({"data": {"train": str(path), "data_dir": str(shared_data)},
                            "loss": {"name": "infonce"},
                            "eval": {"dev": {"task": "scifact", "split": "test"},
                                     "test": None, "metric": "ndcg@10"}})
    assert len(load_training_data(sci)[0]) == 8


def test_source_weights_and_caps_take_exact_fixed_seed_shares(shared_data):
    n = _counts(shared_data)["mrpc-paraphrases"]["pairs"]

    def load(spec: dict, seed: int = 0):
        return load_training_data(config_from_dict(
            {"data": {"train": [{"source": "pairs:mrpc-paraphrases", **spec}],
                      "data_dir": str(shared_data)}, "train": {"seed": seed}}))[0]

    full = list(zip(*load({}).columns, strict=True))
    half = list(zip(*load({"weight": 0.5}).columns, strict=True))
    assert len(half) == round(0.5 * n) and len(set(half)) == len(half)
    assert set(half) <= set(full) and half == [p for p in full if p in set(half)]  # file order
    assert list(zip(*load({"weight": 0.5}, seed=7).columns, strict=True)) == half
    more = Counter(zip(*load({"weight": 2.5}).columns, strict=True))
    assert sum(more.values()) == round(2.5 * n) and set(more) == set(full)
    assert sorted(Counter(more.values()).items()) == [(2, n - (round(2.5 * n) - 2 * n)),
                                                       (3, round(2.5 * n) - 2 * n)]
    assert len(load({"max_pairs": 100})) == 100
    assert len(load({"weight": 0.5, "max_pairs": 5000})) == round(0.5 * n)
