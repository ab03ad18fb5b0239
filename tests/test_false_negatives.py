"""False-negative ids (groups and shared texts), the group rule of the no-duplicates sampler,
and the trainer's use of both, against brute-force references written here."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from batchscale.batching import NoDuplicatesBatchSampler
from batchscale.batching.false_negatives import unit_ids
from batchscale.training import config_from_dict


def _brute_units(columns, groups, mode) -> list[set[int]]:
    """Same-unit sets by a fixed point: i ~ j when they share a group (mode group) or any
    text of their first two columns, closed transitively."""
    n = len(columns[0])
    texts = [{columns[0][i], columns[1][i]} for i in range(n)]
    linked = [[j for j in range(n)
               if texts[i] & texts[j]
               or (mode == "group" and groups is not None and groups[i] is not None
                   and groups[i] == groups[j])] for i in range(n)]
    if mode == "none":
        return [{i} for i in range(n)]
    out = []
    for i in range(n):
        seen, todo = {i}, [i]
        while todo:
            for j in linked[todo.pop()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        out.append(seen)
    return out


def _random_data(rng: random.Random, n: int):
    vocab = [f"text {k}" for k in range(int(1.4 * n))]
    q = [rng.choice(vocab) for _ in range(n)]
    a = [rng.choice(vocab) for _ in range(n)]
    negatives = [rng.choice(vocab) for _ in range(n)]
    groups = [rng.choice([None, None, *[f"g{k}" for k in range(n // 3)]]) for _ in range(n)]
    return q, a, negatives, groups


@pytest.mark.parametrize("mode", ["group", "text", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_unit_ids_partition_equals_the_transitive_closure(mode, seed):
    rng = random.Random(seed)
    q, a, neg, groups = _random_data(rng, 60)
    ids = unit_ids([q, a], groups, mode)
    truth = _brute_units([q, a], groups, mode)
    assert ids.shape == (60, 2) and (ids[:, 0] == ids[:, 1]).all()
    for i in range(60):
        assert set(np.flatnonzero(ids[:, 0] == ids[i, 0]).tolist()) == truth[i]
    # a hard negative takes the unit that holds its text, else an id no pair has
    ids3 = unit_ids([q, a, neg], groups, mode)
    assert (ids3[:, :2] == ids).all()
    for i in range(60):
        owners = [j for j in range(60) if neg[i] in (q[j], a[j])]
        if owners and mode != "none":
            assert ids3[i, 2] == ids[owners[0], 0]
        elif not owners:
            assert ids3[i, 2] not in set(ids[:, 0].tolist())
            same_text = [j for j in range(60) if neg[j] == neg[i]]
            assert {ids3[j, 2] for j in same_text} == {ids3[i, 2]}


def test_groups_join_pairs_that_share_no_text():
    ids = unit_ids([["a", "b", "c"], ["x", "y", "z"]], ["img1", "img1", None], "group")
    assert ids[0, 0] == ids[1, 0] != ids[2, 0]
    text_only = unit_ids([["a", "b", "c"], ["x", "y", "z"]], ["img1", "img1", None], "text")
    assert len(set(text_only[:, 0].tolist())) == 3


@pytest.mark.parametrize("batch_size", [4, 7, 16])
def test_group_rule_keeps_two_pairs_of_one_unit_out_of_a_batch(batch_size):
    rng = random.Random(batch_size)
    n = 120
    # 30 images, 4 pairs each: consecutive captions (a text shared within the image), and
    # a fifth pair of every image with no shared text, joined by its group alone.
    rows = [(f"img{g} caption {k}", f"img{g} caption {k + 1}", f"img{g}")
            for g in range(30) for k in range(3)]
    rows += [(f"img{g} alt one", f"img{g} alt two", f"img{g}") for g in range(30)]
    rng.shuffle(rows)
    q, a, groups = (list(c) for c in zip(*rows, strict=True))
    keys = unit_ids([q, a], groups, "group")
    sampler = NoDuplicatesBatchSampler(keys, batch_size, seed=1)
    truth = _brute_units([q, a], groups, "group")
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = [list(b) for b in sampler]
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))  # every example once per epoch
        # 30 units of 4 pairs, batches of at most 16: no batch needs two of one unit.
        clashes = sum(1 for b in batches for x in b for y in b if x < y and y in truth[x])
        assert clashes == 0


def _masked_infonce(q: torch.Tensor, a: torch.Tensor, units: list[int], tau: float) -> float:
    """InfoNCE (q->a) with each query's softmax over its positive and the answers of other
    units, written as a loop in float64."""
    q = torch.nn.functional.normalize(q.double(), dim=1)
    a = torch.nn.functional.normalize(a.double(), dim=1)
    total = 0.0
    for i in range(len(units)):
        cands = [j for j in range(len(units)) if j == i or units[j] != units[i]]
        logits = torch.stack([q[i] @ a[j] for j in cands]) / tau
        total += float(torch.logsumexp(logits, 0) - logits[cands.index(i)])
    return total / len(units)


@pytest.mark.parametrize("mode", ["group", "none"])
def test_the_trainer_masks_a_batch_by_units(tmp_path, mode):
    from batchscale.encoders import SentenceEncoder
    from batchscale.study.run import train_run

    rows = [("a man plays a guitar", "a person plays music", "g1"),
            ("a person plays music", "someone plays an instrument", "g1"),
            ("a dog runs on the beach", "an animal runs by the water", "g2"),
            ("an animal runs by the water", "a dog is running", "g2"),
            ("a woman slices an onion", "someone cuts a vegetable", "g4"),
            ("a child rides a bike", "a kid on a bicycle", "g3"),
            ("a kid on a bicycle", "a young boy cycling", "g3"),
            ("two men cook food", "people cooking in a kitchen", "g5")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": x, "positive": y, "group": g})
                            + "\n" for x, y, g in rows), encoding="utf-8")
    config = config_from_dict({
        "model": {"name": "static:default"},
        "data": {"train": str(path)},
        "loss": {"name": "infonce", "temperature": 0.05},
        "optim": {"lr": 1e-9, "warmup": 0.0},
        "train": {"batch_size": 8, "max_steps": 1, "seed": 0, "false_negatives": mode},
        "eval": {"test": None, "every_examples": 8, "geometry": False},
    })
    result = train_run(config, tmp_path / f"run-{mode}", show_progress=False,
                       evaluate_test=False)
    loss = result.fit.curve[-1]["train_loss"]
    enc = SentenceEncoder.static("default")
    q = enc.encode([r[0] for r in rows], show_progress=False)
    a = enc.encode([r[1] for r in rows], show_progress=False)
    units = unit_ids([[r[0] for r in rows], [r[1] for r in rows]], [r[2] for r in rows],
                     mode)[:, 0].tolist()
    # The sampler shuffles the batch; the loss is a mean over anchors, order-free.
    assert loss == pytest.approx(_masked_infonce(q, a, units, 0.05), rel=1e-5)
    plain = _masked_infonce(q, a, list(range(8)), 0.05)
    assert mode == "none" or not math.isclose(loss, plain, rel_tol=1e-3)


@pytest.mark.parametrize("rule", ["text", "group"])
def test_the_trainer_sampler_follows_the_duplicates_rule(rule):
    from batchscale.encoders import SentenceEncoder
    from batchscale.training import TrainingSet
    from batchscale.training.composition import BatchComposition

    # 12 images with 4 captions each; captions never repeat, so only the group joins them.
    rows = [(f"img{g} caption {k}", f"img{g} other {k}", f"img{g}")
            for g in range(12) for k in range(4)]
    random.Random(0).shuffle(rows)
    q, a, groups = (tuple(c) for c in zip(*rows, strict=True))
    data = TrainingSet((q, a), groups=groups)
    config = config_from_dict({"train": {"batch_size": 12, "sampler": "no_duplicates",
                                         "duplicates": rule, "seed": 0}})
    comp = BatchComposition(config, data, SentenceEncoder.static("default"))
    comp.plan(0)
    batches = comp.sampler.global_batches()
    assert sorted(i for b in batches for i in b) == list(range(48))
    same_group = sum(1 for b in batches for x in b for y in b if x < y and groups[x] == groups[y])
    if rule == "group":
        assert same_group == 0
    else:  # the text rule sees no duplicate: random batches of 12 from 12 x 4 hold some
        assert same_group > 0
    # the ids a batch hands the loss: one per pair, equal within a group
    query_ids, answer_ids = comp.false_negative_ids(list(batches[0]))
    assert torch.equal(query_ids, answer_ids)
    firsts = {groups[i]: int(query_ids[k]) for k, i in enumerate(batches[0])}
    assert all(int(query_ids[k]) == firsts[groups[i]] for k, i in enumerate(batches[0]))
    assert len(set(firsts.values())) == len(firsts)
