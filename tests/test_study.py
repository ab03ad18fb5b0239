"""The study: sweep config, results store, shard + merge, kill -9 and rerun, report.

Runs use a static encoder over the tiny BERT's 200-token vocabulary and a synthetic STS-B
folder (a few hundred pairs), so a whole sweep takes seconds. The report's numbers are
checked against values recomputed here straight from the SQLite rows with numpy / scipy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from batchscale.cli import main
from batchscale.study.grid import load_sweep, sweep_from_dict
from batchscale.study.report import compute, load_runs, render_html, write_report
from batchscale.study.store import Store
from batchscale.training import ConfigError
from batchscale.training.schedule import log_points
from conftest import _WORDS, _vocab

SRC = Path(__file__).resolve().parents[1] / "src"


# -- fixtures -------------------------------------------------------------------------------
def _sts_rows(rng: random.Random, n: int) -> list[str]:
    """Pairs of 6-word sentences: each word of the second is the first's word, its
    "synonym" (a fixed partner word, unrelated for the untrained encoder) or a random word;
    the score counts the words kept or replaced by their synonym, so training helps."""
    words = sorted(set(_WORDS))
    order = words[:]
    random.Random(42).shuffle(order)
    partner = {a: b for a, b in zip(order[0::2], order[1::2], strict=False)}
    partner |= {b: a for a, b in partner.items()}
    rows = []
    for i in range(n):
        s1 = [rng.choice(words) for _ in range(6)]
        s2, same = [], 0
        for w in s1:
            r = rng.random()
            if r < 0.3:
                s2.append(w)
                same += 1
            elif r < 0.65 and w in partner:
                s2.append(partner[w])
                same += 1
            else:
                s2.append(rng.choice(words))
        score = 5.0 * same / 6
        rows.append(f"main-captions\tMSRvid\t2012\t{i:04d}\t{score:.3f}\t"
                    f"{' '.join(s1)}.\t{' '.join(s2)}.")
    return rows


@pytest.fixture(scope="module")
def tiny_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT directory whose word-piece tokenizer knows the test words, as the source
    of a static encoder (32 dimensions, ~200 tokens)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-static")
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic STS-B folder: 256 train, 64 dev and 64 test pairs."""
    root = tmp_path_factory.mktemp("study-data")
    sts = root / "stsbenchmark"
    sts.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 256), ("dev", 64), ("test", 64)):
        (sts / f"sts-{split}.csv").write_text("\n".join(_sts_rows(rng, n)) + "\n",
                                              encoding="utf-8")
    return root


def _sweep_dict(tiny_static: Path, data_dir: Path, **grid: object) -> dict:
    return {
        "name": "tiny",
        "base": {
            "model": {"name": f"static:{tiny_static}"},
            "data": {"train": "stsb", "data_dir": str(data_dir)},
            "loss": {"label_threshold": 0.6},
            "optim": {"lr": 0.05, "warmup": 0.0},
            "eval": {"every_examples": 64, "geometry": False, "dtype": "float32"},
        },
        "grid": {"batch_sizes": [8, 32],
                 "losses": {"infonce": {"name": "infonce"}, "weince": {"name": "weince"}},
                 "seeds": [0, 1], **grid},
        "budget": {"examples": 192},
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory, tiny_static: Path,
               data_dir: Path) -> Path:
    return _write(tmp_path_factory.mktemp("sweep") / "tiny.yaml",
                  _sweep_dict(tiny_static, data_dir))


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory, sweep_file: Path) -> Path:
    """The unsharded sweep: 2 losses x 2 batch sizes x 2 seeds."""
    store = tmp_path_factory.mktemp("full") / "study.sqlite"
    assert main(["sweep", str(sweep_file), "--store", str(store)]) == 0
    return store


def _rows(store: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(store)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _results(store: Path) -> dict[str, dict]:
    """Per cell id: the run's final figures and its curve of dev scores."""
    out = {}
    for r in _rows(store, "SELECT * FROM runs"):
        curve = [(c["examples"], c["dev"]) for c in _rows(
            store, "SELECT examples, dev FROM curve WHERE run_id = ? ORDER BY point", (r["id"],))]
        metrics = {(m["split"], m["name"]): m["value"] for m in _rows(
            store, "SELECT split, name, value FROM metrics WHERE run_id = ?", (r["id"],))}
        out[r["cell_id"]] = {"best_dev": r["best_dev"], "test": r["test"],
                             "examples": r["examples"], "curve": curve, "metrics": metrics}
    return out


# -- config ---------------------------------------------------------------------------------
def test_sweep_config_errors_name_file_and_key(tmp_path, tiny_static, data_dir):
    raw = _sweep_dict(tiny_static, data_dir)
    bad = _write(tmp_path / "typo.yaml", {**raw, "grid": {**raw["grid"], "batch_size": [8]}})
    with pytest.raises(ConfigError, match=r"typo\.yaml: grid\.batch_size: unknown key"):
        load_sweep(bad)
    raw2 = _sweep_dict(tiny_static, data_dir, losses={"odd": {"name": "infonce", "temp": 1}})
    with pytest.raises(ConfigError, match=r"grid\.losses\.odd.*loss\.temp: unknown key"):
        sweep_from_dict(raw2, "s.yaml")
    with pytest.raises(ConfigError, match=r"budget.*exactly one"):
        sweep_from_dict({**raw, "budget": {"examples": 10, "epochs": 1}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"grid\.batch_sizes.*>= 2"):
        sweep_from_dict(_sweep_dict(tiny_static, data_dir, batch_sizes=[1, 8]), "s.yaml")
    with pytest.raises(ConfigError, match=r"report\.compare: 'bsc' is not a loss"):
        sweep_from_dict({**raw, "report": {"compare": [["bsc", "infonce"]]}}, "s.yaml")


@pytest.mark.parametrize("preset", ["study-stsb-minilm.yaml", "study-scifact-minilm.yaml"])
def test_unrestricted_presets_are_the_full_cross_product(preset):
    sweep = load_sweep(SRC.parent / "configs" / preset)
    g = sweep.config.grid
    sizes = g.batch_sizes
    # every B at N = B, plus each softmax block N that divides a larger B
    settings = sum(1 + sum(n < b and b % n == 0 for n in g.softmax_batches or []) for b in sizes)
    assert len(sweep.cells) == (settings * len(g.losses) * len(g.seeds) * len(g.lr_multipliers)
                                * len(g.vrns_weights or [0]) * len(g.lr_scaling))
    assert (min(sizes), max(sizes)) == (8, 1024) and sweep.base.model.name == "default"


def _settings(sweep) -> dict[str, set[tuple[int, int]]]:
    """Per arm (loss, +vrns): its (B, N) settings."""
    out: dict[str, set[tuple[int, int]]] = {}
    for c in sweep.cells:
        arm = c.loss + ("+vrns" if c.vrns_weight > 0 else "")
        out.setdefault(arm, set()).add((c.batch_size, c.softmax_batch))
    return out


# The reference studies' designs, as issue 20 asks for them: (largest B at least, its steps,
# losses at every B, SogCLR's batch sizes, VRNS's batch sizes, the B with softmax blocks)
_DESIGNS = {
    "study-static-mix.yaml": (16384, 50, {"bsc", "infonce", "weince"}, {16, 64, 256},
                              {16, 16384}, {1024, 4096, 16384}),
    "study-static-scifact.yaml": (4096, 50, {"bsc", "infonce", "weince"}, set(), set(),
                                  {1024, 4096}),
    "study-minilm-gpu.yaml": (4096, 100, {"bsc", "infonce", "weince"}, {16, 64, 256},
                              {16, 4096}, {1024, 4096}),
    "study-minilm-cpu.yaml": (1024, 8, {"bsc", "infonce"}, set(), set(), set()),
    "study-demo.yaml": (1024, 16, {"infonce", "weince"}, {16, 64}, set(), {256, 1024}),
}


@pytest.mark.parametrize("preset", sorted(_DESIGNS))
def test_reference_study_presets_have_the_designed_cells(preset):
    largest, steps, everywhere, sogclr, vrns, blocks = _DESIGNS[preset]
    sweep = load_sweep(SRC.parent / "configs" / preset)
    g, sizes = sweep.config.grid, set(sweep.config.grid.batch_sizes)
    arms = _settings(sweep)
    assert max(sizes) >= largest and max(sizes) / min(sizes) >= 64
    for loss in everywhere:
        assert {b for b, n in arms[loss] if n == b} == sizes
    assert {b for b, n in arms.get("sogclr", set())} == sogclr
    assert {(b, n) for b, n in arms.get("infonce+vrns", set())} == {(b, b) for b in vrns}
    assert {b for arm in arms for b, n in arms[arm] if n < b} == blocks
    assert {c.loss for c in sweep.cells if c.softmax_batch < c.batch_size} <= {"infonce"}
    # >= 3 seeds, the lr tuned per setting on the first seed, the same example budget
    assert len(g.seeds) >= 3 and len(g.lr_multipliers) >= 3 and g.lr_tuning == "first_seed"
    budgets = {c.config.train.max_examples for c in sweep.cells}
    assert len(budgets) == 1 and budgets.pop() // max(sizes) == steps
    assert sweep.base.eval.schedule == "log"


def test_study_one_takes_fifty_steps_at_its_largest_batch():
    sweep = load_sweep(SRC.parent / "configs" / "study-static-mix.yaml")
    big = [c for c in sweep.cells if c.batch_size == 16384]
    assert big and all(c.config.train.max_examples // 16384 >= 50 for c in big)
    assert sweep.base.model.name == "static:default" and sweep.base.data.train == "mix"
    assert sweep.base.eval.noise_scale is not None and sweep.base.eval.geometry


def test_cells_hash_their_resolved_config(tiny_static, data_dir):
    sweep = sweep_from_dict(_sweep_dict(tiny_static, data_dir, vrns_weights=[0.0, 1.0]))
    assert len(sweep.cells) == 2 * 2 * 2 * 2
    assert len({c.id for c in sweep.cells}) == len(sweep.cells)
    c = sweep.cells[0]
    assert (c.seed, c.config.train.seed, c.config.train.max_examples) == (0, 0, 192)
    assert {x.config.loss.vrns_weight for x in sweep.cells} == {0.0, 1.0}
    again = sweep_from_dict(_sweep_dict(tiny_static, data_dir, vrns_weights=[0.0, 1.0]))
    assert [x.id for x in again.cells] == [x.id for x in sweep.cells]
    # Shards partition the grid.
    parts = [sweep.shard(i, 3) for i in range(3)]
    assert sorted(x.index for p in parts for x in p) == list(range(len(sweep.cells)))


def test_a_grid_extended_by_a_larger_batch_keeps_its_cells_when_the_points_are_pinned(
        tiny_static, data_dir):
    def sweep(sizes: list[int], align: list[int] | None = None):
        raw = _sweep_dict(tiny_static, data_dir, batch_sizes=sizes)
        raw["base"]["eval"] |= {"schedule": "log", "points": 8}
        if align is not None:
            raw["base"]["eval"]["align_points"] = align
        return sweep_from_dict(raw)

    first, extended = sweep([8, 16]), sweep([8, 16, 32])
    ids = {c.id for c in first.cells}
    # unpinned, the points align on every batch size: the new size makes every cell new
    assert all(c.config.eval.align_points == [8, 16, 32] for c in extended.cells)
    assert ids.isdisjoint(c.id for c in extended.cells)
    pinned = sweep([8, 16, 32], align=[8, 16])
    assert ids == {c.id for c in pinned.cells if c.batch_size < 32}
    # B = 32's points are whole steps either way: geomspace(1, 192, 8) = 1, 2.1, 4.5, 9.5,
    # 20, 43, 91, 192, rounded up to multiples of 32
    for c in (c for c in pinned.cells if c.batch_size == 32):
        assert log_points(192, 8, 32, c.config.eval.align_points) == [32, 64, 96, 192]
        assert log_points(192, 8, 32, [8, 16, 32]) == [32, 64, 96, 192]


def test_restrictions_keep_exactly_the_cells_their_rules_allow(tiny_static, data_dir):
    axes = {"batch_sizes": [8, 16, 32], "seeds": [0], "lr_multipliers": [1, 2],
            "vrns_weights": [0.0, 1.0], "softmax_batches": [4, 8],
            "losses": {"infonce": {"name": "infonce"}, "weince": {"name": "weince"},
                       "sogclr": {"name": "sogclr"}}}
    full = sweep_from_dict(_sweep_dict(tiny_static, data_dir, **axes))
    rules = [{"where": {"losses": ["sogclr"]}, "batch_sizes": [8], "vrns_weights": [0.0],
              "softmax_batches": []},
             {"where": {"vrns": True}, "losses": ["infonce"], "batch_sizes": [8, 32]},
             {"where": {"blocks": True}, "softmax_batches": [8], "lr_multipliers": [1]}]
    cut = sweep_from_dict(_sweep_dict(tiny_static, data_dir, **axes, restrict=rules))

    def kept(c) -> bool:  # the three rules, written out
        blocks = c.softmax_batch < c.batch_size
        if c.loss == "sogclr" and (c.batch_size != 8 or c.vrns_weight or blocks):
            return False
        if c.vrns_weight > 0 and (c.loss != "infonce" or c.batch_size not in (8, 32)):
            return False
        return not blocks or (c.softmax_batch == 8 and c.lr_multiplier == 1)

    want = [c.id for c in full.cells if kept(c)]
    assert [c.id for c in cut.cells] == want and 0 < len(want) < len(full.cells)
    assert [c.index for c in cut.cells] == list(range(len(want)))
    assert {(c.loss, c.batch_size) for c in cut.cells if c.loss == "sogclr"} == {("sogclr", 8)}
    with pytest.raises(ConfigError, match=r"restrict\.0\.batch_sizes.*\[64\] not in grid"):
        sweep_from_dict(_sweep_dict(tiny_static, data_dir, **axes,
                                    restrict=[{"batch_sizes": [64]}]), "s.yaml")
    with pytest.raises(ConfigError, match=r"restrict\.0.*lists what it keeps"):
        sweep_from_dict(_sweep_dict(tiny_static, data_dir, **axes,
                                    restrict=[{"where": {"vrns": True}}]), "s.yaml")
    with pytest.raises(ConfigError, match=r"leave no cells"):
        sweep_from_dict(_sweep_dict(tiny_static, data_dir, **axes, restrict=[
            {"losses": ["sogclr"]}, {"losses": ["infonce"]}]), "s.yaml")


# -- shard + merge --------------------------------------------------------------------------
def test_shard_and_merge_equal_the_unsharded_sweep(tmp_path, sweep_file, full_store, capsys):
    shards = [tmp_path / f"s{i}.sqlite" for i in range(2)]
    for i, store in enumerate(shards):
        assert main(["sweep", str(sweep_file), "--store", str(store), "--shard", f"{i}/2"]) == 0
    merged = tmp_path / "merged.sqlite"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    assert "merged 8 runs" in capsys.readouterr().out
    want, got = _results(full_store), _results(merged)
    assert sorted(got) == sorted(want) and len(want) == 8
    for cell, w in want.items():
        g = got[cell]
        assert g["examples"] == w["examples"]
        assert g["best_dev"] == pytest.approx(w["best_dev"], abs=1e-9)
        assert g["test"] == pytest.approx(w["test"], abs=1e-9)
        assert [e for e, _ in g["curve"]] == [e for e, _ in w["curve"]]
        assert [d for _, d in g["curve"]] == pytest.approx([d for _, d in w["curve"]], abs=1e-9)
        assert g["metrics"].keys() == w["metrics"].keys()
    # The merged store reports the same table as the unsharded one.
    a = compute(*load_runs(full_store))["rows"]
    b = compute(*load_runs(merged))["rows"]
    assert [(r["loss"], r["batch_size"], r["seeds"]) for r in a] == \
        [(r["loss"], r["batch_size"], r["seeds"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("dev", "test"):
            assert (ra[key]["mean"], ra[key]["lo"], ra[key]["hi"]) == pytest.approx(
                (rb[key]["mean"], rb[key]["lo"], rb[key]["hi"]), abs=1e-9)
        assert [{k: v for k, v in t.items() if k != "seconds"} for t in ra["to_target"]] == \
            [{k: v for k, v in t.items() if k != "seconds"} for t in rb["to_target"]]


def test_merge_refuses_another_sweep(tmp_path, tiny_static, data_dir, full_store, capsys):
    other = _write(tmp_path / "other.yaml", _sweep_dict(tiny_static, data_dir, seeds=[0]))
    sweep = load_sweep(other)
    store = tmp_path / "other.sqlite"
    with Store(store) as s:  # bound to the other grid; no run needed
        s.initialise(sweep.hash, "tiny", sweep.resolved(), "0", [])
    assert main(["merge", str(tmp_path / "m.sqlite"), str(full_store), str(store)]) == 1
    err = capsys.readouterr().err
    assert "holds another sweep" in err and "refusing to merge" in err
    # A sweep run into a store of another grid is refused as well.
    assert main(["sweep", str(other), "--store", str(full_store)]) == 1
    assert "holds another sweep" in capsys.readouterr().err


def test_reuse_takes_the_runs_of_shared_cells_from_another_grid(tmp_path, tiny_static,
                                                                 data_dir, full_store, capsys):
    # Seeds 1 and 2: seed 1's four cells are full_store's (the same resolved configs), seed
    # 0's are not in this grid, seed 2's are new.
    cfg = _write(tmp_path / "more.yaml", _sweep_dict(tiny_static, data_dir, seeds=[1, 2]))
    sweep = load_sweep(cfg)
    old = _results(full_store)
    shared = {c.id for c in sweep.cells if c.seed == 1}
    assert len(shared) == 4 and shared <= old.keys()
    store = tmp_path / "more.sqlite"
    assert main(["sweep", str(cfg), "--store", str(store), "--reuse", str(full_store)]) == 0
    out = capsys.readouterr().out
    assert "reused 4 finished runs" in out and "4 finished already, 4 to run" in out
    got = _results(store)
    assert got.keys() == {c.id for c in sweep.cells}
    for cid in shared:  # copied as they were: figures, curve, metrics
        assert got[cid] == old[cid]
    # Only seed 2's cells ran: one attempt each; seed 1's attempts are full_store's.
    attempts = _rows(store, "SELECT cell_id, started_at FROM attempts")
    assert sorted(a["cell_id"] for a in attempts if a["cell_id"] not in shared) == \
        sorted(c.id for c in sweep.cells if c.seed == 2)
    old_starts = {(a["cell_id"], a["started_at"]) for a in _rows(
        full_store, "SELECT cell_id, started_at FROM attempts")}
    assert {(a["cell_id"], a["started_at"]) for a in attempts if a["cell_id"] in shared} == \
        {s for s in old_starts if s[0] in shared}
    # The store records where they came from; a rerun with --reuse counts them again, not twice.
    want = [{"store": str(full_store), "sweep": "tiny", "grid_hash": load_sweep(
        _write(tmp_path / "full.yaml", _sweep_dict(tiny_static, data_dir))).hash, "runs": 4}]
    with Store(store) as s:
        assert s.reused_from() == want
    assert main(["sweep", str(cfg), "--store", str(store), "--reuse", str(full_store)]) == 0
    assert "reused 0 finished runs" in capsys.readouterr().out
    with Store(store) as s:
        assert s.reused_from() == want
    # Shards each copy their own shared cells; the merge sums their records.
    shards = [tmp_path / f"more-{i}.sqlite" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(["sweep", str(cfg), "--store", str(shard), "--shard", f"{i}/2",
                     "--reuse", str(full_store)]) == 0
    with Store(shards[0]) as a, Store(shards[1]) as b:
        assert a.reused_from()[0]["runs"] + b.reused_from()[0]["runs"] == 4
    merged = tmp_path / "more-merged.sqlite"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    with Store(merged) as s:
        assert s.reused_from() == want


def test_reuse_refuses_a_run_whose_config_is_not_its_cells(tmp_path, tiny_static, data_dir,
                                                           full_store, capsys):
    bad = tmp_path / "bad.sqlite"
    shutil.copy(full_store, bad)
    cfg = _write(tmp_path / "more.yaml", _sweep_dict(tiny_static, data_dir, seeds=[1, 2]))
    victim = next(c.id for c in load_sweep(cfg).cells if c.seed == 1)
    db = sqlite3.connect(bad)
    db.execute("UPDATE runs SET config = replace(config, '\"lr\": 0.05', '\"lr\": 0.07') "
               "WHERE cell_id = ?", (victim,))
    db.commit()
    db.close()
    store = tmp_path / "more.sqlite"
    assert main(["sweep", str(cfg), "--store", str(store), "--reuse", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and victim in err and "refusing to reuse" in err
    assert _rows(store, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0  # nothing half-copied
    assert main(["sweep", str(cfg), "--store", str(store),
                 "--reuse", str(tmp_path / "missing.sqlite")]) == 1
    assert "missing.sqlite: no such store" in capsys.readouterr().err


# -- kill -9 and rerun ----------------------------------------------------------------------
def test_kill_9_loses_only_the_run_in_progress(tmp_path, tiny_static, data_dir):
    cfg = _write(tmp_path / "kill.yaml", _sweep_dict(tiny_static, data_dir))
    store = tmp_path / "kill.sqlite"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "batchscale.cli", "sweep", str(cfg), "--store", str(store)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while True:  # kill once 2 runs are finished and a third is under way
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep made no progress"
            if store.is_file():
                try:
                    runs = _rows(store, "SELECT COUNT(*) FROM runs")[0][0]
                    attempts = _rows(store, "SELECT COUNT(*) FROM attempts")[0][0]
                except sqlite3.OperationalError:  # tables not there yet
                    runs = attempts = 0
                if runs >= 2 and attempts > runs:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r["cell_id"]: (r["id"], r["started_at"], r["finished_at"])
              for r in _rows(store, "SELECT * FROM runs")}
    assert 2 <= len(before) < 8
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} finished already, {8 - len(before)} to run" in done.stdout
    after = {r["cell_id"]: (r["id"], r["started_at"], r["finished_at"])
             for r in _rows(store, "SELECT * FROM runs")}
    assert len(after) == 8
    assert {k: after[k] for k in before} == before  # finished runs untouched
    cells = {r[0] for r in _rows(store, "SELECT cell_id FROM cells")}
    assert set(after) == cells
    # The interrupted run was started twice; every other run once.
    counts = dict(_rows(store, "SELECT cell_id, COUNT(*) FROM attempts GROUP BY cell_id"))
    assert sorted(counts.values()).count(2) == 1 and sum(counts.values()) == 9
    assert _rows(store, "SELECT COUNT(*) FROM curve WHERE run_id NOT IN "
                        "(SELECT id FROM runs)")[0][0] == 0
    # Run directories of finished runs are cleaned up.
    assert not any((tmp_path / "kill-runs").iterdir())


# -- report ---------------------------------------------------------------------------------
def _t_ci(x: list[float]) -> tuple[float, float, float]:
    a = np.array(x)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    return a.mean(), lo, hi


def _table(md: str, title: str) -> list[list[str]]:
    section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    body = []
    for ln in rows[2:]:
        body.append([c.strip() for c in ln.strip("|").split("|")])
    return body


def test_report_numbers_equal_those_recomputed_from_the_store(full_store, tmp_path, capsys):
    assert main(["report", str(full_store), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    md_path = Path(printed[-1])
    assert md_path == tmp_path / "rep" / "report.md"
    md = md_path.read_text(encoding="utf-8")
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (tmp_path / "rep" / "plots").iterdir())
    assert html.count("data:image/png;base64,") == len(pngs) >= 5 and "src='plots/" not in html
    assert md.index("## Answer") < md.index("## Design") < md.index("## Final quality")
    table = _table(md, "Final quality per loss and batch size")
    assert len(table) == 4  # (infonce, weince) x (8, 32)
    for loss, batch, seeds, mult, dev, test, steps, examples in table:
        runs = _rows(full_store, "SELECT r.* FROM runs r JOIN cells c USING (cell_id) "
                                 "WHERE c.loss = ? AND c.batch_size = ?", (loss, int(batch)))
        assert int(seeds) == len(runs) == 2 and mult == "1"
        for cell, key in ((dev, "best_dev"), (test, "test")):
            m, lo, hi = _t_ci([r[key] for r in runs])
            assert cell == f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
        assert examples == "192 [192, 192]"  # the budget, exactly
        assert steps == f"{192 // int(batch)} [{192 // int(batch)}, {192 // int(batch)}]"
    # The training data every run recorded: STS-B train less the pairs sharing a sentence
    # (case and whitespace folded) with dev / test; the Design note says it.
    root = Path(json.loads(_rows(full_store, "SELECT config FROM runs")[0][0])["data"]["data_dir"])
    split_rows = {split: [line.split("\t")[5:7] for line in (
        root / "stsbenchmark" / f"sts-{split}.csv").read_text().splitlines()]
        for split in ("train", "dev", "test")}
    held = {" ".join(t.casefold().split()) for split in ("dev", "test")
            for row in split_rows[split] for t in row}
    kept = sum(1 for row in split_rows["train"]
               if not any(" ".join(t.casefold().split()) in held for t in row))
    recorded = _rows(full_store, "SELECT name, value FROM metrics WHERE split = 'data'")
    assert len(recorded) == 4 * 8  # pairs, contaminated, and each per source, for 8 runs
    assert {(r[0], r[1]) for r in recorded} == {
        ("pairs", kept), ("contaminated", 256 - kept), ("pairs/stsb", kept),
        ("contaminated/stsb", 256 - kept)}
    assert (f"Training pairs per run {kept} [{kept}, {kept}], after dropping {256 - kept} "
            f"[{256 - kept}, {256 - kept}] that share a text") in md
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    # Trend: per seed, the slope of the test score on log2(batch size); t interval over seeds.
    for t in data["trends"]:
        rows = _rows(full_store, "SELECT c.seed, c.batch_size, r.test FROM runs r JOIN cells c "
                                 "USING (cell_id) WHERE c.loss = ?", (t["loss"],))
        slopes = []
        for seed in (0, 1):
            pts = sorted((r[1], r[2]) for r in rows if r[0] == seed)
            slopes.append(np.polyfit(np.log2([p[0] for p in pts]), [p[1] for p in pts], 1)[0])
        m, lo, hi = _t_ci(slopes)
        got = t["test"]["slope"]
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((m, lo, hi), abs=1e-9)
        assert got["p_t"] == pytest.approx(stats.ttest_1samp(slopes, 0.0).pvalue, abs=1e-9)
    # Paired differences: weince minus infonce per batch size, paired by seed (paired t).
    diffs = [d for d in data["differences"] if d["comparison"] == "weince − infonce"]
    assert [d["batch_size"] for d in diffs] == [8, 32]
    for d in diffs:
        rows = _rows(full_store, "SELECT c.loss, c.seed, r.best_dev FROM runs r JOIN cells c "
                                 "USING (cell_id) WHERE c.batch_size = ?", (d["batch_size"],))
        by = {(r[0], r[1]): r[2] for r in rows}
        delta = [by[("weince", s)] - by[("infonce", s)] for s in (0, 1)]
        m, lo, hi = _t_ci(delta)
        assert (d["dev"]["mean"], d["dev"]["lo"], d["dev"]["hi"]) == pytest.approx(
            (m, lo, hi), abs=1e-9)
        ref = stats.ttest_rel([by[("weince", s)] for s in (0, 1)],
                              [by[("infonce", s)] for s in (0, 1)]).pvalue
        assert d["dev"]["p_t"] == pytest.approx(ref, abs=1e-9)


def _fake_store(path: Path, name: str, losses: list[str], seeds: list[int]) -> Path:
    """A store filled by hand (no training): one run per (loss, batch, seed)."""
    rng = random.Random(1)
    resolved = {"name": name, "base": {"eval": {"metric": "spearman"}},
                "grid": {"losses": {x: {} for x in losses}}, "report": {}}
    with Store(path) as s:
        cells = []
        for i, (loss, b, seed) in enumerate(
                (x, b, s) for s in seeds for x in losses for b in (16, 64)):
            cells.append({"cell_id": f"c{i}", "idx": i, "loss": loss, "loss_name": "bsc",
                          "vrns_weight": 0.0, "batch_size": b, "seed": seed,
                          "lr_scaling": "none", "lr_multiplier": 1.0, "softmax_batch": b,
                          "config": "{}"})
        s.initialise("h", name, resolved, "0.1.0", cells)
        for c in cells:
            curve = [{"point": k, "examples": 100 * k, "steps": k, "seconds": float(k),
                      "dev": 50 + 5 * k + rng.random(), "train_loss": None, "lr": None}
                     for k in range(4)]
            best = max(p["dev"] for p in curve)
            s.add_run({"cell_id": c["cell_id"], "started_at": "t", "finished_at": "t",
                       "package_version": "0.1.0", "metric": "spearman", "examples": 300,
                       "steps": 3, "train_seconds": 3.0, "wall_seconds": 4.0,
                       "throughput": 100.0, "peak_memory_mb": 10.0, "memory_kind": "peak_rss",
                       "best_dev": best, "best_examples": 300, "last_dev": best,
                       "test": best - 1, "config": "{}"}, curve,
                      {"dev": {"spearman": best}, "test": {"spearman": best - 1}})
    return path


def test_html_escapes_text_from_the_data(tmp_path):
    evil = "<script>alert('x')</script>"
    store = _fake_store(tmp_path / "evil.sqlite", "<b>&study", [evil, "plain"], [0, 1, 2])
    md, page = write_report(store, tmp_path / "rep")
    html = page.read_text(encoding="utf-8")
    assert "<script>" not in html and "<b>&study" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;&amp;study" in html
    assert evil in md.read_text(encoding="utf-8")  # Markdown keeps the text as it is
    direct = render_html({**compute(*load_runs(store)), "sweep": "a<b"}, {})
    assert "a&lt;b" in direct and "a<b" not in direct


def test_one_seed_gives_na_intervals_not_a_crash(tmp_path):
    store = _fake_store(tmp_path / "one.sqlite", "one", ["weince", "infonce"], [0])
    md, _ = write_report(store, tmp_path / "rep")
    table = _table(md.read_text(encoding="utf-8"), "Final quality per loss and batch size")
    assert len(table) == 4
    assert all(row[4].endswith("[n/a]") and row[5].endswith("[n/a]") for row in table)
    diffs = _table(md.read_text(encoding="utf-8"), "Paired differences over seeds")
    assert diffs and all("[n/a] (n = 1)" in row[3] for row in diffs)
    answer = md.read_text(encoding="utf-8").split("## Design")[0]
    assert answer.count("[n/a], n = 1 seed)") == 2 and "n = 1 seeds" not in answer  # per loss


# -- data: several training sources ---------------------------------------------------------
def test_training_on_stsb_plus_snli(shared_data):
    from batchscale.data import load_snli_pairs, load_stsb
    from batchscale.study.run import load_training_data
    from batchscale.training import config_from_dict

    config = config_from_dict({"data": {"train": ["stsb", "snli"], "data_dir": str(shared_data),
                                        "decontaminate": False}})
    data, held, _ = load_training_data(config)
    stsb = list(load_stsb(shared_data / "stsbenchmark", "train"))
    snli = [p for s in ("dev", "test") for p in load_snli_pairs(shared_data / "snli", s)]
    assert held is None and len(data) == len(stsb) + len(snli)
    assert data.labels is not None and data.labels[len(stsb):] == (1.0,) * len(snli)
    assert data.columns[0][len(stsb)] == snli[0].text1
    with pytest.raises(ConfigError, match=r"data\.train"):
        config_from_dict({"data": {"train": []}})


def test_a_diverged_run_is_recorded_and_retried(tmp_path, tiny_static, data_dir, monkeypatch):
    import batchscale.study.sweep as sweep_module
    from batchscale.training import TrainingDiverged

    raw = _sweep_dict(tiny_static, data_dir, seeds=[0],
                      losses={"infonce": {"name": "infonce"}})
    sweep = sweep_from_dict(raw)
    real = sweep_module.train_run

    def flaky(config, out, **kw):
        if config.train.batch_size == 32:
            raise TrainingDiverged("step 3 (after 96 examples): the loss is nan")
        return real(config, out, **kw)

    monkeypatch.setattr(sweep_module, "train_run", flaky)
    store = tmp_path / "d.sqlite"
    summary = sweep_module.run_sweep(sweep, store, log=lambda _: None)
    assert (summary.ran, summary.failed) == (1, 1)
    md, _ = write_report(store, tmp_path / "rep")
    assert ("Diverged (NaN / Inf; scored -inf in the lr choice, not in the tables): infonce "
            "B=32 N=32 lr x1 (1 attempts)") in md.read_text(encoding="utf-8")
    monkeypatch.setattr(sweep_module, "train_run", real)
    summary = sweep_module.run_sweep(sweep, store, log=lambda _: None)
    assert (summary.skipped, summary.ran, summary.failed) == (1, 1, 0)
    md, _ = write_report(store, tmp_path / "rep")
    assert "Diverged" not in md.read_text(encoding="utf-8")
