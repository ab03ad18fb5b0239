"""Dense retrieval on BEIR data: exact cosine top-k by chunked matrix products, metrics from
pytrec_eval (the engine BEIR and MTEB use), so the numbers are theirs.

The corpus is streamed in chunks (:meth:`BeirDataset.iter_corpus`): each chunk is encoded,
scored against every query and folded into a running top-k, so neither the corpus text nor
its embeddings are held in memory at once; memory is O(queries x top_k + chunk).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..data.beir import BeirDataset, BeirSplit, Qrels
from ..data.records import Document

Run = dict[str, dict[str, float]]

#: pytrec_eval measures behind the reported metrics (MTEB's names on the left).
METRICS = {"ndcg@10": ("ndcg_cut_10", "ndcg_cut.10"),
           "map@100": ("map_cut_100", "map_cut.100"),
           "recall@10": ("recall_10", "recall.10"),
           "recall@100": ("recall_100", "recall.100")}
# MRR@10 = pytrec_eval's recip_rank on the run cut to its top 10.
MRR_AT = 10


class TopK:
    """Running exact top-k over column blocks of a (queries x documents) score matrix."""

    def __init__(self, n_queries: int, k: int, device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = torch.full((n_queries, 0), float("-inf"), device=device)
        self.index = torch.zeros((n_queries, 0), dtype=torch.long, device=device)

    def update(self, scores: Tensor, first_column: int) -> None:
        """Fold in ``scores`` (queries x block) whose columns are documents
        ``first_column ...``."""
        k = min(self.k, scores.shape[1])
        s, i = torch.topk(scores, k, dim=1)
        merged_s = torch.cat([self.scores, s], dim=1)
        merged_i = torch.cat([self.index, i + first_column], dim=1)
        k = min(self.k, merged_s.shape[1])
        s, pos = torch.topk(merged_s, k, dim=1)
        self.scores, self.index = s, torch.gather(merged_i, 1, pos)


def search(query_emb: Tensor, corpus_chunks: Iterable[Tensor], top_k: int, *,
           block_elements: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """Exact cosine top-k of each query over the concatenated corpus chunks.

    Returns (scores, document positions), each ``(n_queries, <= top_k)``, best first. Each
    chunk is scored in column blocks of at most ``block_elements`` scores.
    """
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    top = TopK(q.shape[0], top_k, q.device)
    offset = 0
    block = max(1, block_elements // max(1, q.shape[0]))
    for chunk in corpus_chunks:
        c = torch.nn.functional.normalize(chunk.float().to(q.device), dim=-1)
        for start in range(0, c.shape[0], block):
            top.update(q @ c[start : start + block].T, offset + start)
        offset += c.shape[0]
    return top.scores, top.index


def retrieval_metrics(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10, MAP@100, Recall@10, Recall@100, MRR@10 (x100, mean over the judged
    queries that the run answers, as MTEB averages), computed by pytrec_eval."""
    import pytrec_eval

    measures = {m for _, m in METRICS.values()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))[:MRR_AT])
             for q, docs in run.items()}
    per_query_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    if not per_query:
        raise ValueError("no judged query in the run")
    out = {name: 100.0 * sum(r[key] for r in per_query.values()) / len(per_query)
           for name, (key, _) in METRICS.items()}
    out[f"mrr@{MRR_AT}"] = 100.0 * sum(r["recip_rank"] for r in per_query_rr.values()) / len(
        per_query_rr)
    return out


def _chunks(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: Tensor, index: Tensor,
           top_k: int, ignore_identical_ids: bool = True) -> Run:
    """Top-k positions to a pytrec_eval run, dropping a document whose id equals the query's
    (as BEIR's and MTEB's evaluators do: some sets, e.g. Quora, share the id space)."""
    run: Run = {}
    s_list, i_list = scores.tolist(), index.tolist()
    for qid, s_row, i_row in zip(query_ids, s_list, i_list, strict=True):
        hits: dict[str, float] = {}
        for s, i in zip(s_row, i_row, strict=True):
            did = doc_ids[i]
            if ignore_identical_ids and did == qid:
                continue
            hits[did] = float(s)
            if len(hits) == top_k:
                break
        run[qid] = hits
    return run


def evaluate_retrieval(encoder, dataset: BeirDataset, split: str | BeirSplit = "test", *,
                       top_k: int = 100, batch_size: int = 256,
                       max_length: int | None = None, corpus_chunk_size: int = 50_000,
                       ignore_identical_ids: bool = True, show_progress: bool = True
                       ) -> dict[str, float]:
    """Encode the split's judged queries and the streamed corpus (documents as
    ``(title + " " + text).strip()``, no prompts, same encoder for both), retrieve the exact
    cosine top-k and score it: the metrics of :func:`retrieval_metrics` plus counts and
    timings."""
    if top_k < 100:
        raise ValueError(f"top_k must be >= 100 for MAP@100 and Recall@100, got {top_k}")
    t0 = time.perf_counter()
    part = split if isinstance(split, BeirSplit) else dataset.split(split)
    query_ids = list(part.queries)
    q_emb = encoder.encode([part.queries[q] for q in query_ids], batch_size=batch_size,
                           max_length=max_length, show_progress=show_progress, desc="queries")
    doc_ids: list[str] = []
    total = dataset.count_documents() if show_progress else None

    def corpus_embeddings() -> Iterator[Tensor]:
        for n, chunk in enumerate(_chunks(dataset.iter_corpus(), corpus_chunk_size)):
            doc_ids.extend(d.id for d in chunk)
            desc = "corpus" if total is None or total <= corpus_chunk_size else (
                f"corpus {n * corpus_chunk_size}/{total}")
            yield encoder.encode([d.full_text for d in chunk], batch_size=batch_size,
                                 max_length=max_length, show_progress=show_progress, desc=desc)

    keep = top_k + 1 if ignore_identical_ids else top_k
    scores, index = search(q_emb, corpus_embeddings(), keep)
    run = to_run(query_ids, doc_ids, scores, index, top_k, ignore_identical_ids)
    out = retrieval_metrics(part.qrels, run)
    out.update(queries=len(query_ids), documents=len(doc_ids),
               seconds=time.perf_counter() - t0)
    return out
