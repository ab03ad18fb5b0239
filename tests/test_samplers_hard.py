"""Hard-batch samplers (BSC special shuffling, k-means fast variant, teacher-mined batches)
against brute-force numpy references written here: kNN by a full similarity matrix, the greedy
grouping replayed by hand, nearest centroids by argmax."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from batchscale.batching import grouping
from batchscale.batching.batch_stats import epoch_hardest_negative
from batchscale.batching.hard_batches import BSCShuffleSampler, TeacherHardBatchSampler
from batchscale.batching.samplers import RandomBatchSampler
from batchscale.batching.text_keys import text_keys


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_embeddings(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def blobs(n_blobs: int, per_blob: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (q, a) around blob centres: similar examples exist, random batches miss them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, d))
    base = np.repeat(centres, per_blob, axis=0) + 0.35 * rng.standard_normal(
        (n_blobs * per_blob, d)
    )
    q = unit(base + 0.1 * rng.standard_normal(base.shape))
    a = unit(base + 0.1 * rng.standard_normal(base.shape))
    return q, a


def brute_knn(x: np.ndarray, k: int) -> np.ndarray:
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def replay_groups(groups: list[np.ndarray], x: np.ndarray, k: int, s: int) -> None:
    """Each group, in creation order, is its opener plus the opener's first s - 1 unused
    neighbours among its k nearest (brute force)."""
    nb = brute_knn(x, k)
    used: set[int] = set()
    for group in groups:
        opener = int(group[0])
        assert opener not in used
        expected = [opener, *[int(j) for j in nb[opener] if int(j) not in used][: s - 1]]
        assert group.tolist() == expected
        used.update(expected)
    assert used == set(range(len(x)))


# -- kNN and the example-based grouping ----------------------------------------------------


def test_nearest_neighbours_match_brute_force() -> None:
    x = random_embeddings(300)
    got = grouping.nearest_neighbours(x, 20)
    assert got.shape == (300, 20)
    assert np.array_equal(got, brute_knn(x, 20))
    # k capped at N-1
    assert np.array_equal(grouping.nearest_neighbours(x[:5], 50), brute_knn(x[:5], 4))


def test_approximate_neighbours_are_mostly_right() -> None:
    x, _ = blobs(20, 60)
    got = grouping.nearest_neighbours(x, 10, exact=False)
    ref = brute_knn(x, 10)
    recall = np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, ref, strict=True)])
    assert recall > 0.8
    assert (got != np.arange(len(x))[:, None]).all()


@pytest.mark.parametrize(("k", "s"), [(20, 8), (5, 4), (299, 8)])
def test_knn_groups_match_brute_force_greedy(k: int, s: int) -> None:
    x = random_embeddings(300, seed=1)
    order = np.random.default_rng(3).permutation(300)
    groups = grouping.knn_groups(grouping.nearest_neighbours(x, k), s, order)
    assert all(len(g) <= s for g in groups)
    replay_groups(groups, x, k, s)
    # The openers are visited in the given order.
    openers = [int(g[0]) for g in groups]
    position = {int(i): p for p, i in enumerate(order)}
    assert openers == sorted(openers, key=position.__getitem__)


def test_knn_groups_with_missing_neighbours_still_partition() -> None:
    """Approximate search pads a row with -1: the opener must not join its own group twice."""
    neighbours = np.array([[-1, 1], [0, -1], [0, 1]])
    groups = grouping.knn_groups(neighbours, 3, np.arange(3))
    assert [g.tolist() for g in groups] == [[0, 1], [2]]


def test_knn_groups_with_keys_take_no_copies() -> None:
    """With text keys, a group takes the nearest unused neighbours that share no text with the
    members before them (replayed here with sets); without keys, copies of a text (each
    other's nearest neighbours) fill most groups."""
    rng = np.random.default_rng(5)
    x = unit(np.repeat(random_embeddings(60, seed=4), 3, axis=0)
             + 1e-3 * rng.standard_normal((180, 16)))
    keys = np.stack([np.repeat(np.arange(60), 3), 1000 + rng.integers(0, 150, 180)], axis=1)
    s = 4
    nb = grouping.nearest_neighbours(x, 30)
    order = rng.permutation(180)
    groups = grouping.knn_groups(nb, s, order, keys)
    used: set[int] = set()
    for group in groups:
        opener = int(group[0])
        texts, expected = set(keys[opener].tolist()), [opener]
        for j in nb[opener].tolist():
            if len(expected) < s and j not in used | {opener} and texts.isdisjoint(keys[j]):
                expected.append(j)
                texts.update(keys[j].tolist())
        assert group.tolist() == expected
        used.update(expected)
    assert used == set(range(180))
    assert all(len(np.unique(keys[g])) == keys[g].size for g in groups)
    plain = grouping.knn_groups(nb, s, order)
    assert sum(len(np.unique(keys[g, 0])) < len(g) for g in plain) > len(plain) / 2


def test_bsc_sampler_groups_have_requested_size_and_reverse() -> None:
    n, s = 203, 8
    x = random_embeddings(n, seed=2)
    sampler = BSCShuffleSampler(n, 32, group_size=s, knn_candidates=n - 1, seed=1)
    sampler.set_embeddings(x)
    batches = list(sampler)
    groups = sampler.groups
    # With every example a candidate, only the last group created is short: n % s.
    assert [len(g) for g in groups] == [s] * (n // s) + [n % s]
    replay_groups(groups, x, n - 1, s)
    # The batch order is the reversed group sequence (small leftover group first), cut at 32.
    assert np.array_equal(np.concatenate(batches), np.concatenate(groups[::-1]))
    assert [len(b) for b in batches] == [32] * 6 + [11]


def test_bsc_small_groups_come_first() -> None:
    x = random_embeddings(600, seed=4)
    sampler = BSCShuffleSampler(600, 64, group_size=8, knn_candidates=30, seed=0)
    sampler.set_embeddings(x)
    list(sampler)
    sizes = np.array([len(g) for g in sampler.groups[::-1]])
    assert sizes.min() < 8  # some candidates ran out
    tenth = len(sizes) // 10
    assert sizes[:tenth].mean() < sizes[-tenth:].mean()
    replay_groups(sampler.groups, x, 30, 8)


# -- k-means fast variant -------------------------------------------------------------------


def test_kmeans_labels_are_nearest_centroids() -> None:
    x, _ = blobs(10, 40, seed=5)
    labels, centroids = grouping.kmeans(x, 10, seed=0)
    assert centroids.shape == (10, 16)
    assert np.array_equal(labels, np.argmax(x @ centroids.T, axis=1))
    again, _ = grouping.kmeans(x, 10, seed=0)
    assert np.array_equal(labels, again)


def test_cluster_groups_split_each_cluster_at_size() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    groups = grouping.cluster_groups(labels, 6, np.random.default_rng(1))
    assert sorted(np.concatenate(groups).tolist()) == list(range(200))
    for g in groups:
        assert len(set(labels[g].tolist())) == 1
    for c in range(7):
        count = int((labels == c).sum())
        sizes = sorted(len(g) for g in groups if labels[g[0]] == c)
        assert sizes == sorted([6] * (count // 6) + ([count % 6] if count % 6 else []))
    full = [len(g) == 6 for g in groups]
    assert full == sorted(full)  # leftover (smaller) groups first


def test_kmeans_variant_sampler() -> None:
    q, _ = blobs(12, 40, seed=6)
    sampler = BSCShuffleSampler(len(q), 40, group_size=8, variant="kmeans", n_clusters=12, seed=0)
    sampler.set_embeddings(q)
    batches = list(sampler)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(q)))
    labels = sampler.labels
    assert labels is not None and len(np.unique(labels)) > 1
    for g in sampler.groups:
        assert len(g) <= 8 and len(set(labels[g].tolist())) == 1
    assert np.array_equal(np.concatenate(batches), grouping.pack_groups(sampler.groups))


# -- hardness, determinism, resume ----------------------------------------------------------


def test_hard_samplers_raise_the_hardest_negative() -> None:
    q, a = blobs(30, 40, seed=7)
    n = len(q)
    random_value = np.median(
        [epoch_hardest_negative(list(RandomBatchSampler(n, 40, seed=s)), q, a) for s in range(5)]
    )
    for variant in ("knn", "kmeans"):
        sampler = BSCShuffleSampler(n, 40, group_size=8, variant=variant, n_clusters=30)
        sampler.set_embeddings(q)
        assert epoch_hardest_negative(list(sampler), q, a) > random_value + 0.1, variant
    teacher = TeacherHardBatchSampler(q, 40)
    assert epoch_hardest_negative(list(teacher), q, a) > random_value + 0.1


@pytest.mark.parametrize("variant", ["knn", "kmeans"])
def test_bsc_deterministic_for_seed_and_differs_across_seeds_and_epochs(variant: str) -> None:
    x = random_embeddings(400, seed=8)

    def run(seed: int, epoch: int) -> list[list[int]]:
        sampler = BSCShuffleSampler(400, 32, variant=variant, n_clusters=20, seed=seed)
        sampler.set_epoch(epoch)
        sampler.set_embeddings(x)
        return list(sampler)

    assert run(3, 0) == run(3, 0)
    assert run(3, 0) != run(4, 0)
    assert run(3, 0) != run(3, 1)


def test_teacher_deterministic_and_covers() -> None:
    q, _ = blobs(10, 37, seed=9)

    def make(seed: int) -> TeacherHardBatchSampler:
        return TeacherHardBatchSampler(q, 32, seed=seed)

    a, b = make(0), make(0)
    first = list(a)
    assert first == list(b)
    assert len(first) == len(a) == -(-len(q) // 32)
    assert sorted(i for batch in first for i in batch) == list(range(len(q)))
    assert first != list(make(1))
    a.set_epoch(1)
    assert list(a) != first


def test_teacher_batches_fill_from_single_clusters() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), [70, 10, 33, 64, 5, 18])
    chain = np.array([2, 0, 5, 1, 4, 3])
    batches = grouping.teacher_batches(labels, chain, 32, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(labels)))
    pure = sum(len(set(labels[b].tolist())) == 1 and len(b) == 32 for b in batches)
    assert pure >= 70 // 32 + 33 // 32 + 64 // 32
    # Leftovers mix only clusters adjacent in the (cyclic) chain.
    place = {int(c): p for p, c in enumerate(chain)}
    for b in batches:
        spots = sorted({place[int(c)] for c in labels[b]})
        gaps = np.diff([*spots, spots[0] + len(chain)])
        assert (gaps > 1).sum() <= 1  # one contiguous arc of the cycle
    assert len(batches[-1]) == len(labels) % 32


def test_centroid_chain_is_a_permutation() -> None:
    c = random_embeddings(50, seed=10)
    chain = grouping.centroid_chain(c, seed=0)
    assert sorted(chain.tolist()) == list(range(50))
    assert np.array_equal(chain, grouping.centroid_chain(c, seed=0))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_bsc_resume_replays_the_stored_plan_without_embeddings() -> None:
    x = random_embeddings(300, seed=11)
    sampler = BSCShuffleSampler(300, 32, seed=2)
    sampler.set_epoch(1)
    sampler.set_embeddings(x)
    it = iter(sampler)
    done = [next(it) for _ in range(4)]
    state = roundtrip(sampler.state_dict())
    resumed = BSCShuffleSampler(300, 32, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)  # no embeddings given: the plan comes from the state
    assert done + rest == list(sampler)
    resumed.set_epoch(2)
    with pytest.raises(ValueError, match="set_embeddings"):
        list(resumed)


def test_teacher_resume_keeps_the_clustering() -> None:
    q, _ = blobs(8, 30, seed=12)
    sampler = TeacherHardBatchSampler(q, 24, seed=1)
    it = iter(sampler)
    done = [next(it) for _ in range(3)]
    other = TeacherHardBatchSampler(random_embeddings(len(q), seed=99), 24, seed=1)
    other.load_state_dict(roundtrip(sampler.state_dict()))
    assert done + list(other) == list(sampler)


def test_bsc_with_keys_keeps_copies_apart() -> None:
    # Every text twice, with identical embeddings: kNN groups the copies together.
    base = random_embeddings(150, seed=13)
    x = np.concatenate([base, base])
    texts = [f"t{i % 150}" for i in range(300)]
    answers = [f"a{i}" for i in range(300)]
    keys = text_keys([texts, answers])

    def duplicated(batches: list[list[int]]) -> int:
        return sum(len({texts[i] for i in b}) < len(b) for b in batches)

    plain = BSCShuffleSampler(300, 20, group_size=4, seed=0)
    plain.set_embeddings(x)
    assert duplicated(list(plain)) > 5
    guarded = BSCShuffleSampler(300, 20, group_size=4, seed=0, keys=keys)
    guarded.set_embeddings(x)
    batches = list(guarded)
    assert duplicated(batches) == 0
    assert sorted(i for b in batches for i in b) == list(range(300))


def test_bsc_sharding_splits_global_batches() -> None:
    x = random_embeddings(200, seed=14)
    shares = []
    for rank in range(2):
        s = BSCShuffleSampler(200, 32, seed=0, rank=rank, world_size=2)
        s.set_embeddings(x)
        shares.append(list(s))
    single = BSCShuffleSampler(200, 32, seed=0)
    single.set_embeddings(x)
    for step, batch in enumerate(single):
        assert shares[0][step] + shares[1][step] == batch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 6}, "group_size"),
        ({"variant": "shingle"}, "variant"),
        ({"knn_candidates": 0}, "knn_candidates"),
        ({"keys": np.zeros((3, 2), dtype=np.int64)}, "keys"),
    ],
)
def test_bsc_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BSCShuffleSampler(100, 32, **kwargs)


def test_bad_embeddings() -> None:
    sampler = BSCShuffleSampler(10, 4, group_size=2)
    with pytest.raises(ValueError, match="embeddings"):
        sampler.set_embeddings(np.zeros((9, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        sampler.set_embeddings(np.full((10, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        TeacherHardBatchSampler(np.zeros(10), 4)


# -- the random-word-shingle variant (MinHash) --------------------------------------------------


def test_minhash_collides_with_the_jaccard_probability() -> None:
    """P(same id) = |A & B| / |A | B| over random hash functions (Broder 1997)."""
    from batchscale.batching.shingles import ShingleSets

    # unigram shingle sets {a..f} and {d..i}: 3 shared of 9 -> J = 1/3
    sets = ShingleSets([["a b c d e f", "d e f g h i"]], n=1)
    rng = np.random.default_rng(0)
    trials = 3000
    same = sum(int(len(np.unique(sets.minhash(rng))) == 1) for _ in range(trials))
    sigma = (1 / 3 * 2 / 3 / trials) ** 0.5
    assert abs(same / trials - 1 / 3) < 4 * sigma


def test_shingle_sets_are_word_ngrams_of_all_columns() -> None:
    from batchscale.batching.shingles import ShingleSets, _hash

    sets = ShingleSets([["The cat sat.", "x"], ["cat sat down", ""]], n=2)
    want = {_hash(s) for s in ("the cat", "cat sat", "sat down")}
    assert set(sets.values[sets.offsets[0] : sets.offsets[1]].tolist()) == want
    assert sets.values[sets.offsets[1] : sets.offsets[2]].tolist() == [_hash("x")]


def _shingle_texts(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    topics = [[f"w{6 * t + i}" for i in range(6)] for t in range(12)]  # disjoint vocabularies
    q, a = [], []
    for i in range(n):
        t = topics[i % len(topics)]
        q.append(" ".join(rng.choice(t, 5)))
        a.append(" ".join(rng.choice(t, 5)))
    return [q, a]


def test_shingle_sampler_groups_deterministic_and_harder() -> None:
    from batchscale.batching import ShingleShuffleSampler

    cols = _shingle_texts(480, 1)
    # unigram shingles: same-topic examples share most words, so MinHash ids often agree
    make = lambda seed: ShingleShuffleSampler(cols, 48, group_size=8, shingle_size=1,  # noqa: E731
                                              seed=seed)
    s1, s2 = make(3), make(3)
    plan = s1.global_batches()
    assert [b.tolist() for b in plan] == [b.tolist() for b in s2.global_batches()]
    s1.set_epoch(1)
    assert [b.tolist() for b in s1.global_batches()] != [b.tolist() for b in plan]
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(480))
    # groups hold one id each and at most 8 examples: batches of 48 are runs of them
    labels = s2.labels
    assert np.unique(labels, return_counts=True)[1].max() > 8  # ids are split into groups
    # same-topic pairs share batches far more often than in random batches
    topic = np.arange(480) % 12

    def same_topic_share(batches: list[np.ndarray]) -> float:
        return float(np.mean([np.mean(topic[b][:, None] == topic[b][None, :]) for b in batches]))

    random_plan = RandomBatchSampler(480, 48, seed=3).global_batches()
    # measured 0.19 against 0.10: a batch of 48 holds about 6 single-topic groups of 8
    assert same_topic_share(plan) > 1.7 * same_topic_share(random_plan)
