"""Groups of mutually similar examples from an embedding matrix, for hard batches.

BSC's "special shuffling" (Chernyavskiy, Ilvovsky, Kalinin, Nakov, "Batch-Softmax Contrastive
Loss for Pairwise Sentence Scoring Tasks", NAACL 2022, arXiv 2110.15725): put similar examples
in the same batch, so that the in-batch negatives are hard.

* Example-based (:func:`knn_groups`): visit the examples in a random order; each example not
  yet used opens a group with its nearest unused neighbours among its ``k`` nearest ones, up to
  ``s`` members. Late groups find most neighbours used and stay small (easy).
* Fast variant (:func:`cluster_groups`): group by k-means cluster id, split at size ``s``.
* :func:`pack_groups`: concatenate the groups in reverse order of creation, so the small
  leftover groups (easy batches) come first, as the paper does.
* Teacher-mined batches (:func:`teacher_batches`): k-means with about ``N / batch_size``
  clusters of a fixed model's embeddings; a cluster fills batches, and the leftovers of
  neighbouring clusters (a nearest-centroid chain) share batches.

Nearest neighbours and k-means use Faiss (inner product on L2-normalised rows = cosine).
"""

from __future__ import annotations

import faiss
import numpy as np

from .samplers import check_int


def check_embeddings(embeddings: np.ndarray, num_examples: int | None = None) -> np.ndarray:
    """An (N, d) finite float32 C-contiguous array (what Faiss takes)."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"`embeddings` must be an (N, d) float array, got shape {arr.shape} dtype {arr.dtype}"
        )
    if num_examples is not None and arr.shape[0] != num_examples:
        raise ValueError(f"`embeddings` has {arr.shape[0]} rows for {num_examples} examples")
    if not np.isfinite(arr).all():
        raise ValueError("`embeddings` holds NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    arr = check_embeddings(embeddings)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.ascontiguousarray(arr / np.maximum(norms, 1e-12), dtype=np.float32)


def nearest_neighbours(embeddings: np.ndarray, k: int, *, exact: bool = True) -> np.ndarray:
    """(N, k) int64: each row's ``k`` most similar other rows by inner product, most similar
    first (``k`` is capped at N - 1). ``exact`` uses ``IndexFlatIP`` (O(N^2 d)); otherwise an
    inverted-file index (``IndexIVFFlat``, about 4 sqrt(N) lists, 16 probed), approximate, for
    large N; its missing neighbours are -1."""
    x = check_embeddings(embeddings)
    n, d = x.shape
    k = min(check_int("k", k, 1), n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    if exact:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # fixed: the grouping's randomness comes from the visit order
        index.train(x)
        index.nprobe = min(16, nlist)
    index.add(x)
    _, found = index.search(x, k + 1)
    found = found.astype(np.int64)
    # Drop each row's own id; where it is not among the results (ties, approximate search),
    # drop the last result instead.
    is_self = found == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return found[~is_self].reshape(n, k)


def knn_groups(
    neighbours: np.ndarray,
    group_size: int,
    visit_order: np.ndarray,
    keys: np.ndarray | None = None,
) -> list[np.ndarray]:
    """BSC's example-based groups, in order of creation: for each example of ``visit_order``
    not yet used, the example and its first ``group_size - 1`` unused neighbours (from its
    row of ``neighbours``, most similar first). Every example is in exactly one group; a
    group is smaller than ``group_size`` only when its example's candidates ran out.

    With ``keys`` (N, C) text keys, a group takes only neighbours that share no text with
    the members before them: an example's nearest neighbours are often copies of its own
    text, which the no-duplicates cut would move out of the batch, splitting the group."""
    s = check_int("group_size", group_size, 1)
    nb = np.asarray(neighbours, dtype=np.int64)
    n = len(nb)
    order = np.asarray(visit_order, dtype=np.int64)
    if nb.ndim != 2:
        raise ValueError(f"`neighbours` must be (N, k), got shape {nb.shape}")
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"`visit_order` must be a permutation of range({n})")
    if keys is not None and (keys.ndim != 2 or len(keys) != n):
        raise ValueError(f"`keys` must be ({n}, C), got shape {keys.shape}")
    # A missing neighbour (-1) becomes the row's own id, which is always used by then.
    nb = np.where(nb < 0, np.arange(n)[:, None], nb)
    used = np.zeros(n, dtype=bool)
    groups: list[np.ndarray] = []
    for i in order.tolist():
        if used[i]:
            continue
        used[i] = True
        row = nb[i]
        free = row[~used[row]]
        if keys is not None:
            free = _text_free(keys, i, free, s - 1)
        group = np.concatenate(([i], free[: s - 1]))
        used[group] = True
        groups.append(group)
    return groups


def _text_free(keys: np.ndarray, anchor: int, candidates: np.ndarray, wanted: int
               ) -> np.ndarray:
    """The first ``wanted`` candidates, in order, that share no key with the anchor or with
    the candidates taken before them."""
    taken = set(keys[anchor].tolist())
    chosen = []
    for c, ks in zip(candidates.tolist(), keys[candidates].tolist(), strict=True):
        if len(chosen) == wanted:
            break
        if taken.isdisjoint(ks):
            chosen.append(c)
            taken.update(ks)
    return np.asarray(chosen, dtype=np.int64)


def kmeans(
    embeddings: np.ndarray, n_clusters: int, *, seed: int, iterations: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (Faiss): (labels (N,) int64, centroids (K, d) float32); K is capped
    at N."""
    x = check_embeddings(embeddings)
    k = min(check_int("n_clusters", n_clusters, 1), len(x))
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=check_int("iterations", iterations, 1),
        seed=check_int("seed", seed, 0) % (2**31 - 1),
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,  # small data sets are fine: no warning
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), np.ascontiguousarray(km.centroids, dtype=np.float32)


def cluster_groups(
    labels: np.ndarray, group_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """BSC's fast variant: each cluster's members in random order, split into groups of
    ``group_size`` (the last group of a cluster holds the remainder). The groups come in random
    order, the smaller (leftover, easier) ones first, matching the example-based ordering."""
    s = check_int("group_size", group_size, 1)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.ndim != 1:
        raise ValueError(f"`labels` must be 1-D, got shape {lab.shape}")
    n = len(lab)
    if n == 0:
        return []
    perm = rng.permutation(n)
    members = perm[np.argsort(lab[perm], kind="stable")]
    sorted_labels = lab[members]
    run_start = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    run_id = np.cumsum(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) - 1
    within = np.arange(n) - run_start[run_id]
    # A new group where the cluster changes or the position in the cluster reaches s, 2s, ...
    cut = np.flatnonzero((within % s == 0)[1:]) + 1
    groups = np.split(members, cut)
    shuffled = rng.permutation(len(groups))
    full = np.array([len(groups[g]) == s for g in shuffled], dtype=bool)
    return [groups[g] for g in shuffled[np.argsort(full, kind="stable")]]


def pack_groups(groups: list[np.ndarray]) -> np.ndarray:
    """The batch order: the groups concatenated in reverse order of creation (BSC reverses the
    sequence so the small leftover groups, easy batches, come first). Cutting it into batches
    splits a group only where it crosses a batch boundary."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(groups[::-1]).astype(np.int64)


def centroid_chain(centroids: np.ndarray, *, seed: int, k: int = 32) -> np.ndarray:
    """An order of the clusters in which consecutive ones tend to be close: a greedy walk to
    the nearest unvisited centroid among each one's ``k`` nearest, jumping to a random
    unvisited one when those are all visited (O(K k) after the kNN search, not O(K^2))."""
    c = check_embeddings(centroids)
    n = len(c)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    nb = nearest_neighbours(l2_normalize(c), k) if n > 1 else np.zeros((n, 0), dtype=np.int64)
    visited = np.zeros(n, dtype=bool)
    jumps = rng.permutation(n).tolist()
    chain: list[int] = []
    current = jumps.pop()
    while True:
        visited[current] = True
        chain.append(current)
        row = nb[current]
        free = row[~visited[row]]
        if len(free):
            current = int(free[0])
            continue
        while jumps and visited[jumps[-1]]:
            jumps.pop()
        if not jumps:
            break
        current = jumps.pop()
    return np.asarray(chain, dtype=np.int64)


def teacher_batches(
    labels: np.ndarray, chain: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Hard batches from fixed clusters: each cluster (members in random order) gives
    ``len // batch_size`` whole batches; the remainders, taken cluster by cluster along
    ``chain`` (rotated to a random start), fill the other batches, so a batch mixes only
    neighbouring clusters. Batches in random order; the last, partial one stays last."""
    b = check_int("batch_size", batch_size, 1)
    lab = np.asarray(labels, dtype=np.int64)
    n = len(lab)
    if n == 0:
        return []
    chain = np.asarray(chain, dtype=np.int64)
    rank_of = np.full(max(int(lab.max()), int(chain.max(initial=-1))) + 1, len(chain))
    start = int(rng.integers(len(chain)))
    rank_of[np.roll(chain, -start)] = np.arange(len(chain))
    perm = rng.permutation(n)
    members = perm[np.argsort(rank_of[lab[perm]], kind="stable")]
    sorted_labels = lab[members]
    new_run = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    run_id = np.cumsum(new_run) - 1
    within = np.arange(n) - np.flatnonzero(new_run)[run_id]
    run_len = np.bincount(run_id)[run_id]
    in_whole = within < (run_len // b) * b
    whole = np.split(members[in_whole], range(b, int(in_whole.sum()), b))
    rest = members[~in_whole]
    mixed = np.split(rest, range(b, len(rest), b))
    batches = [x for x in whole + mixed if len(x)]
    partial = [x for x in batches if len(x) < b]
    full = [x for x in batches if len(x) == b]
    return [full[i] for i in rng.permutation(len(full))] + partial
