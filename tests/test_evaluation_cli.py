"""`batchscale eval`: table and JSON output, task resolution, fast --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from batchscale.cli import build_parser, main
from batchscale.evaluation import task_path


def test_eval_stsb_json(shared_data, tiny_st_dir, tmp_path, capsys) -> None:
    out = tmp_path / "res" / "stsb.json"
    code = main(["eval", "--model", str(tiny_st_dir), "--task", "stsb", "--split", "test",
                 "--data-dir", str(shared_data), "--json", str(out), "--no-progress",
                 "--dtype", "float32"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "stsb" and result["split"] == "test" and result["pairs"] == 1379
    # the same figures from sentence-transformers' own encode and scipy
    from scipy.stats import pearsonr, spearmanr
    from sentence_transformers import SentenceTransformer

    from batchscale.data import load_stsb

    pairs = list(load_stsb(shared_data / "stsbenchmark", "test"))
    model = SentenceTransformer(str(tiny_st_dir), device="cpu")
    # The random model's embeddings are close to each other (cosines near 1), so float32
    # noise of 2e-7 between the two encoders' batchings reorders some ranks: 0.25 points here.
    # The tolerance still tells Spearman from Pearson (4.8 and 6.1) and either from zero.
    e1, e2 = (torch.nn.functional.normalize(model.encode(t, convert_to_tensor=True).double(),
                                            dim=1)
              for t in ([p.text1 for p in pairs], [p.text2 for p in pairs]))
    cos = (e1 * e2).sum(dim=1).tolist()
    gold = [p.label for p in pairs]
    assert result["spearman"] == pytest.approx(100 * spearmanr(gold, cos)[0], abs=0.5)
    assert result["pearson"] == pytest.approx(100 * pearsonr(gold, cos)[0], abs=0.5)
    table = capsys.readouterr().out
    assert "spearman" in table and f"{result['spearman']:.2f}" in table


def test_eval_beir_path_to_stdout(tmp_path, tiny_st_dir, capsys) -> None:
    root = tmp_path / "mini"
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"Doc {i}", "text": t} for i, t in enumerate(
        ["cells and genes", "a dog on the beach", "cancer risk in mice", "music and dancing"])]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "dog beach"}) + "\n")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq\td1\t1\n")
    code = main(["eval", "--model", str(tiny_st_dir), "--task", f"beir:{root}",
                 "--split", "dev", "--json", "-", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"ndcg@10", "map@100", "recall@10", "recall@100", "mrr@10"} <= set(result)
    assert result["recall@100"] == 100.0 and result["documents"] == 4


def test_eval_reports_data_errors(tmp_path, tiny_st_dir, capsys) -> None:
    (tmp_path / "stsbenchmark").mkdir()
    (tmp_path / "stsbenchmark" / "sts-dev.csv").write_text("g\tf\t2012\t1\tx\ta\tb\n")
    code = main(["eval", "--model", str(tiny_st_dir), "--task", "stsb", "--split", "dev",
                 "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 1
    assert "sts-dev.csv:1: non-numeric score" in capsys.readouterr().err


def test_task_resolution(tmp_path) -> None:
    assert task_path("stsb", tmp_path) == ("sts", tmp_path / "stsbenchmark")
    assert task_path("scifact", tmp_path) == ("retrieval", tmp_path / "scifact")
    assert task_path("beir:/x/scidocs", None) == ("retrieval", tmp_path.__class__("/x/scidocs"))
    with pytest.raises(ValueError, match="unknown task"):
        task_path("mteb", tmp_path)


def test_parser_has_eval_and_help_imports_nothing_heavy() -> None:
    args = build_parser().parse_args(["eval", "--task", "stsb"])
    assert args.model == "default" and args.split == "test" and callable(args.run)
    code = ("import sys, batchscale.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
