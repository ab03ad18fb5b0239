"""The report's reach section (``report.reach``; default SogCLR against InfoNCE): A at each of
its batch sizes against B at B's largest batch size and at the same one, paired by seed.

Checked against scipy / statsmodels on a hand-built store whose scores the test chooses, and
against the SogCLR benchmark's printed table (benchmarks/results/sogclr_small_batch.txt),
computed from the same store by its own script.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from batchscale.study.formatting import fmt_pd
from batchscale.study.grid import sweep_from_dict
from batchscale.study.report import compute, load_runs, write_report
from batchscale.training import ConfigError
from study_stores import Scores, make_store
from test_study import _sweep_dict, data_dir, tiny_static  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# infonce at 16, 64, 256; sogclr at 16 and 64 only. Against infonce@256: sogclr@16 is ~3
# points lower on test (interval below zero) and ~2 higher on dev; sogclr@64 straddles zero.
BASE = {16: (75.0, 66.0), 64: (77.0, 68.0), 256: (78.0, 69.0)}
JITTER = {0: 0.0, 1: 0.4, 2: -0.3}
SOG = {16: ([2.0, 2.2, 1.9], [-3.1, -2.9, -3.0]), 64: ([-0.5, 0.6, 0.1], [1.0, -1.0, 0.2])}


def scores() -> Scores:
    out: Scores = {}
    for s in SEEDS:
        for b, (dev, test) in BASE.items():
            out[("infonce", b, s)] = (dev + JITTER[s], test - JITTER[s])
        for b, (ddev, dtest) in SOG.items():
            dev, test = out[("infonce", 256, s)]
            out[("sogclr", b, s)] = (dev + ddev[s], test + dtest[s])
    return out


def _reference(a: str, ba: int, b: str, bb: int, split: int) -> tuple[float, float, float, float]:
    """mean, lo, hi, paired-t p of a@ba - b@bb (independently of the report's code)."""
    sc = scores()
    x = np.array([sc[(a, ba, s)][split] for s in SEEDS])
    y = np.array([sc[(b, bb, s)][split] for s in SEEDS])
    d = x - y
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    return float(d.mean()), float(lo), float(hi), float(stats.ttest_rel(x, y).pvalue)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("reach") / "reach.sqlite", scores())


def test_reach_rows_equal_scipy_paired_t_and_holm(store):
    data = compute(*load_runs(store))
    rows = data["reach"]
    assert [(r["comparison"], r["batch_size"], r["reference_batch_size"]) for r in rows] == \
        [("sogclr − infonce", 16, 256), ("sogclr − infonce", 64, 256)]
    for kind, ref_b in (("large", lambda b: 256), ("same", lambda b: b)):
        for split, i in (("dev", 0), ("test", 1)):
            refs = [_reference("sogclr", r["batch_size"], "infonce", ref_b(r["batch_size"]), i)
                    for r in rows]
            holm = multipletests([p for *_, p in refs], method="holm")[1]
            for r, (m, lo, hi, p), q in zip(rows, refs, holm, strict=True):
                got = r[kind][split]
                assert r[kind]["pairs"] == got["n"] == 3
                assert (got["mean"], got["lo"], got["hi"], got["p_t"]) == \
                    pytest.approx((m, lo, hi, p), abs=1e-9)
                assert r[kind][f"{split}_p_holm"] == pytest.approx(q, abs=1e-9)


def test_reach_answer_claims_a_direction_only_where_the_interval_excludes_zero(store):
    data = compute(*load_runs(store))
    texts = [a["text"] for a in data["answer"] if a["link"] == "reach"]
    assert len(texts) == 1
    text = texts[0]
    assert "**sogclr** at a small batch reach **infonce** at its largest batch (256)" in text
    lo16, hi16 = _reference("sogclr", 16, "infonce", 256, 1)[1:3]
    lo64, hi64 = _reference("sogclr", 64, "infonce", 256, 1)[1:3]
    assert hi16 < 0 < hi64 and lo64 < 0  # the design: 16 resolved below, 64 not
    assert f"{lo16:+.2f}, {hi16:+.2f}] (n = 3" in text
    assert "On test it is below (falls short) at B = 16, indistinguishable at this many " \
           "seeds at B = 64;" in text
    dev_lo = _reference("sogclr", 16, "infonce", 256, 0)[1]
    assert dev_lo > 0 and "on dev (selection) it is above at B = 16, indistinguishable" in text


def test_reach_table_in_markdown_and_html(store, tmp_path):
    md, page = write_report(store, tmp_path / "rep", plots=False)
    text = md.read_text(encoding="utf-8")
    data = compute(*load_runs(store))
    r = data["reach"][0]
    row = (f"| sogclr − infonce | 16 | 256 | 3 | "
           f"{fmt_pd(r['large']['dev'], p_holm=r['large']['dev_p_holm'])} | "
           f"{fmt_pd(r['large']['test'], p_holm=r['large']['test_p_holm'])} | 3 |")
    assert row in text
    assert "<h2 id='reach'>" in page.read_text(encoding="utf-8")


def test_reach_setting_picks_the_pairs(tmp_path):
    sc = {k: v for k, v in scores().items() if k[0] == "infonce"}
    sc |= {("weince", 16, s): (70.0 + s, 60.0 - s) for s in SEEDS}
    plain = compute(*load_runs(make_store(tmp_path / "a.sqlite", sc)))
    assert plain["reach"] == []  # the default names sogclr, which this grid lacks
    assert not any(a["link"] == "reach" for a in plain["answer"])
    chosen = compute(*load_runs(make_store(tmp_path / "b.sqlite", sc,
                                           report={"reach": [["weince", "infonce"]]})))
    assert [(r["comparison"], r["batch_size"], r["reference_batch_size"], r["same"]["pairs"])
            for r in chosen["reach"]] == [("weince − infonce", 16, 256, 3)]


def test_reach_names_are_validated(tiny_static, data_dir):  # noqa: F811
    raw = _sweep_dict(tiny_static, data_dir)
    with pytest.raises(ConfigError, match=r"s\.yaml: report\.reach: 'sogclr' is not a loss"):
        sweep_from_dict({**raw, "report": {"reach": [["sogclr", "infonce"]]}}, "s.yaml")
    ok = sweep_from_dict({**raw, "report": {"reach": [["weince", "infonce"]]}}, "s.yaml")
    assert ok.config.report.reach == [("weince", "infonce")]


# -- the real SogCLR store against the benchmark's own printout ------------------------------
BENCH_STORE = ROOT / "benchmarks" / "results" / "sogclr_small_batch.sqlite"
BENCH_TEXT = ROOT / "benchmarks" / "results" / "sogclr_small_batch.txt"
LINE = re.compile(r"B = +(\d+): test: SogCLR - InfoNCE@(\d+) (\S+ \[\S+, \S+\] \(n = \d+)\).*"
                  r"SogCLR - InfoNCE@\d+ (\S+ \[\S+, \S+\] \(n = \d+)\); dev \(selection\): "
                  r"SogCLR - InfoNCE@\d+ (\S+ \[\S+, \S+\] \(n = \d+)\)")


def test_reach_on_the_sogclr_benchmark_store_equals_its_printed_table():
    printed = [LINE.search(line) for line in BENCH_TEXT.read_text().splitlines()]
    printed = [m for m in printed if m]
    assert len(printed) == 4
    data = compute(*load_runs(BENCH_STORE))
    rows = {r["batch_size"]: r for r in data["reach"]}
    assert sorted(rows) == [16, 64, 256, 4096]
    for m in printed:
        r = rows[int(m[1])]
        assert r["reference_batch_size"] == int(m[2])
        assert fmt_pd(r["large"]["test"]).startswith(m[3])
        assert fmt_pd(r["same"]["test"]).startswith(m[4])
        assert fmt_pd(r["large"]["dev"]).startswith(m[5])
