"""`batchscale train` end to end on STS-B with the static encoder: the selected model lands in
OUT/final and `batchscale eval --model OUT/final` reproduces the run's test figure."""

from __future__ import annotations

import json

from batchscale.cli import main


def test_train_then_eval_reproduces_the_test_figure(shared_data, tmp_path, capsys):
    config = tmp_path / "static.yaml"
    config.write_text(
        "model: {name: 'static:default'}\n"
        "loss: {name: bsc_mse, mu: 0.1}\n"
        "optim: {lr: 0.05}\n"
        "train: {batch_size: 64, max_examples: 640, seed: 0}\n"
        "eval: {every_examples: 320, geometry: false}\n", encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", str(config), "--out", str(out), "--no-progress",
                 "--set", f"data.data_dir={shared_data}"])
    assert code == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in curve] == [0, 320, 640]
    dev = [r["dev"]["spearman"] for r in curve]
    assert summary["best_dev"] == max(dev) and max(dev) > dev[0]  # training helped on dev
    assert (out / "final" / "modules.json").is_file()
    test = summary["test"]["spearman"]
    assert f"spearman {test:.2f}" in table
    assert main(["eval", "--model", str(out / "final"), "--task", "stsb", "--split", "test",
                 "--data-dir", str(shared_data), "--no-progress", "--json", "-"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["spearman"] == test and again["dtype"] == summary["test"]["dtype"]
