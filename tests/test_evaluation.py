"""Evaluation: STS and retrieval agree with sentence-transformers' evaluators; exact top-k;
pytrec_eval metrics; pair geometry."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from batchscale.data import BeirDataset, load_stsb
from batchscale.evaluation import (
    TopK,
    evaluate_retrieval,
    evaluate_sts,
    pair_geometry,
    retrieval_metrics,
    search,
    sts_correlations,
    to_run,
    uniformity,
)


def _st_evaluator(name: str):
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import evaluation
    except ImportError:
        from sentence_transformers import evaluation
    return getattr(evaluation, name)


def test_sts_spearman_equals_embedding_similarity_evaluator(shared_data, default_encoder
                                                            ) -> None:
    EmbeddingSimilarityEvaluator = _st_evaluator("EmbeddingSimilarityEvaluator")

    pairs = load_stsb(shared_data / "stsbenchmark", "dev")[::7][:200]
    ours = evaluate_sts(default_encoder, pairs, show_progress=False)
    evaluator = EmbeddingSimilarityEvaluator([p.text1 for p in pairs], [p.text2 for p in pairs],
                                             [p.score for p in pairs], name="dev",
                                             write_csv=False, batch_size=128)
    theirs = evaluator(default_encoder.st)
    assert ours["pairs"] == 200
    assert ours["spearman"] == pytest.approx(100 * theirs["dev_spearman_cosine"], abs=1e-4)
    assert ours["pearson"] == pytest.approx(100 * theirs["dev_pearson_cosine"], abs=1e-4)


def _scifact_subset(shared_data, tmp_path, n_queries=40, n_noise=400):
    """A small BEIR folder: some SciFact test queries, their documents and random others."""
    src = BeirDataset(shared_data / "scifact")
    split = src.split("test")
    qids = sorted(split.qrels)[:n_queries]
    wanted = {d for q in qids for d in split.qrels[q]}
    docs = list(src.iter_corpus())
    random.Random(0).shuffle(docs)
    keep = [d for d in docs if d.id in wanted] + [d for d in docs if d.id not in wanted][:n_noise]
    root = tmp_path / "scifact-small"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(
        {"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in keep), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(
        {"_id": q, "text": split.queries[q]}) + "\n" for q in qids), encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q in qids for d, s in split.qrels[q].items()), encoding="utf-8")
    return root


def test_ndcg_equals_information_retrieval_evaluator(shared_data, tmp_path) -> None:
    from batchscale.encoders import SentenceEncoder

    InformationRetrievalEvaluator = _st_evaluator("InformationRetrievalEvaluator")
    encoder = SentenceEncoder.static("default")  # fast, and good enough to rank
    root = _scifact_subset(shared_data, tmp_path)
    ds = BeirDataset(root)
    ours = evaluate_retrieval(encoder, ds, "test", show_progress=False, corpus_chunk_size=97)
    split = ds.split("test")
    evaluator = InformationRetrievalEvaluator(
        split.queries, {d.id: d.full_text for d in ds.iter_corpus()},
        {q: {d for d, s in judged.items() if s > 0} for q, judged in split.qrels.items()},
        name="sub", write_csv=False, corpus_chunk_size=128)
    theirs = evaluator(encoder.st)
    assert ours["queries"] == 40 and ours["documents"] > 400
    assert 5 < ours["ndcg@10"] < 100
    assert ours["ndcg@10"] == pytest.approx(100 * theirs["sub_cosine_ndcg@10"], abs=1e-4)
    assert ours["mrr@10"] == pytest.approx(100 * theirs["sub_cosine_mrr@10"], abs=1e-4)
    assert ours["recall@10"] == pytest.approx(100 * theirs["sub_cosine_recall@10"], abs=1e-4)


@pytest.mark.parametrize(("chunks", "k"), [((50, 50, 50), 10), ((7, 1, 130, 12), 25),
                                           ((3,), 10)])
def test_chunked_search_is_exact(chunks, k) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(13, 8, generator=g)
    corpus = [torch.randn(n, 8, generator=g) for n in chunks]
    scores, index = search(q, iter(corpus), k, block_elements=13 * 5)
    full = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(
        torch.cat(corpus), dim=-1).T
    ref_s, ref_i = torch.topk(full, min(k, full.shape[1]), dim=1)
    torch.testing.assert_close(scores, ref_s)
    assert torch.equal(index, ref_i)


def test_topk_merges_blocks() -> None:
    top = TopK(1, 3)
    top.update(torch.tensor([[0.1, 0.9]]), 0)
    top.update(torch.tensor([[0.5, 0.95, 0.2]]), 2)
    assert top.index.tolist() == [[3, 1, 2]]


def test_metrics_by_hand() -> None:
    qrels = {"q1": {"a": 1, "b": 1, "z": 0}, "q2": {"c": 2}}
    run = {"q1": {"x": 0.9, "a": 0.8, "y": 0.7, "b": 0.1},
           "q2": {f"n{i}": 1.0 - i / 100 for i in range(10)} | {"c": 0.5}}
    m = retrieval_metrics(qrels, run)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(100 * (dcg / idcg + 0) / 2)
    assert m["mrr@10"] == pytest.approx(100 * (1 / 2 + 0) / 2)  # c is 11th: not in the top 10
    assert m["recall@10"] == pytest.approx(100 * (1 + 0) / 2)
    assert m["recall@100"] == pytest.approx(100.0)
    ap1 = (1 / 2 + 2 / 4) / 2
    assert m["map@100"] == pytest.approx(100 * (ap1 + 1 / 11) / 2)


def test_identical_ids_are_dropped() -> None:
    run = to_run(["1", "2"], ["1", "2", "3"], torch.tensor([[0.9, 0.5], [0.8, 0.7]],
                                                         dtype=torch.float64),
                 torch.tensor([[0, 2], [1, 0]]), top_k=1)
    assert run == {"1": {"3": 0.5}, "2": {"1": 0.7}}
    kept = to_run(["1"], ["1", "2"], torch.tensor([[0.9, 0.5]], dtype=torch.float64),
                  torch.tensor([[0, 1]]),
                  top_k=2, ignore_identical_ids=False)
    assert kept == {"1": {"1": 0.9, "2": 0.5}}


def test_sts_correlations_of_known_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    r = sts_correlations(a, b, [5.0, 2.5, 0.0])
    from scipy.stats import pearsonr

    cosines = [1.0, 1.0 / math.sqrt(2.0), 0.0]
    assert r["spearman"] == pytest.approx(100.0)
    assert r["pearson"] == pytest.approx(100.0 * pearsonr(cosines, [5.0, 2.5, 0.0])[0])


def test_pair_geometry_against_direct_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 16, generator=g, dtype=torch.float64)
    a = q + 0.5 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    geo = pair_geometry(q, a, block=10)
    qn, an = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(a, dim=-1)
    assert geo["alignment"] == pytest.approx(float((qn - an).norm(dim=1).pow(2).mean()))

    def wang_isola(x):
        return float(torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log())

    assert geo["uniformity"] == pytest.approx((wang_isola(qn) + wang_isola(an)) / 2)
    assert uniformity(qn, block=7) == pytest.approx(wang_isola(qn))
    sims = qn @ an.T
    off = sims[~torch.eye(64, dtype=torch.bool)]
    assert geo["pos_cos_mean"] == pytest.approx(float(sims.diag().mean()))
    assert geo["pos_cos_var"] == pytest.approx(float(sims.diag().var(unbiased=False)))
    assert geo["neg_cos_mean"] == pytest.approx(float(off.mean()))
    assert geo["neg_cos_var"] == pytest.approx(float(off.var(unbiased=False)))
    # WEINCE's tail statistics, from the loop-by-loop reference of the spec (float64): the
    # mean lambda over both directions' anchors, and the share whose AIC favours Weibull
    from loss_reference import weince_anchor_fit, weince_lambdas

    m = sims.shape[0]
    rows = [[float(sims[i, j]) for j in range(m) if j != i] for i in range(m)]
    cols = [[float(sims[j, i]) for j in range(m) if j != i] for i in range(m)]
    lambdas = weince_lambdas(rows, [True] * m) + weince_lambdas(cols, [True] * m)
    assert geo["weince_mean_lambda"] == pytest.approx(sum(lambdas) / len(lambdas), rel=1e-9)
    weibull = [weince_anchor_fit(r)[1] > 0 for r in rows + cols]
    assert geo["weince_weibull_share"] == pytest.approx(sum(weibull) / len(weibull))
    assert "weince_mean_lambda" not in pair_geometry(q, a, weince=False)


@pytest.mark.parametrize("block", [1, 7, 64, 2048])
def test_pair_geometry_hardest_negative_against_brute_force(block: int) -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(37, 8, generator=g, dtype=torch.float64)
    a = q + 0.7 * torch.randn(37, 8, generator=g, dtype=torch.float64)
    # a close to q: each row's largest cosine is its positive, which the max must skip
    got = pair_geometry(q, a, weince=False, block=block)["hardest_neg_cos_mean"]
    hardest = []
    for i in range(37):
        cos = [float(torch.dot(q[i], a[j]) / (q[i].norm() * a[j].norm()))
               for j in range(37) if j != i]
        hardest.append(max(cos))
    assert got == pytest.approx(sum(hardest) / len(hardest), abs=1e-12)
    two = pair_geometry(q[:2], a[:2], weince=False)
    cos01 = torch.nn.functional.cosine_similarity(q[:2], a[[1, 0]], dim=-1)
    assert two["hardest_neg_cos_mean"] == pytest.approx(float(cos01.mean()), abs=1e-12)
