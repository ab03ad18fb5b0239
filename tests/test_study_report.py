"""The study report v2: every number of the Answer recomputed straight from the SQLite rows
with numpy / scipy / statsmodels; the lr gate of ``lr_tuning: first_seed``; the softmax-block
axis; the mechanisms in the store; the budget check.

One small sweep (static encoder over a tiny vocabulary, synthetic STS-B): 3 batch sizes x
InfoNCE / WEINCE x 3 seeds x 2 lr multipliers (first seed tunes) x a softmax block of 8.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

from batchscale.cli import main
from batchscale.study.report import compute, load_runs, tables, write_report
from test_study import _rows, _sweep_dict, _write, data_dir, tiny_static  # noqa: F401

SEEDS = (0, 1, 2)
BATCHES = (8, 16, 32)


@pytest.fixture(scope="module")
def design_store(tmp_path_factory: pytest.TempPathFactory, tiny_static: Path,  # noqa: F811
                 data_dir: Path) -> Path:  # noqa: F811
    raw = _sweep_dict(tiny_static, data_dir, batch_sizes=list(BATCHES), seeds=list(SEEDS),
                      lr_multipliers=[0.5, 1.0], lr_tuning="first_seed", softmax_batches=[8])
    raw["base"]["eval"] = {"schedule": "log", "points": 8, "geometry": True,
                           "noise_scale": {"batches": 2, "chunks": 2}, "dtype": "float32"}
    folder = tmp_path_factory.mktemp("design")
    sweep = _write(folder / "design.yaml", raw)
    store = folder / "design.sqlite"
    assert main(["sweep", str(sweep), "--store", str(store)]) == 0
    return store


# -- independent recomputation --------------------------------------------------------------
def _runs(store: Path) -> list[dict]:
    rows = _rows(store, "SELECT r.id, r.best_dev, r.test, r.examples, r.steps, c.loss, "
                        "c.batch_size, c.softmax_batch, c.seed, c.lr_multiplier "
                        "FROM runs r JOIN cells c USING (cell_id)")
    return [dict(r) for r in rows]


def _tuned(store: Path) -> list[dict]:
    """The runs at the multiplier with the best seed-0 dev score of their setting."""
    runs = _runs(store)
    chosen = {}
    for r in runs:
        if r["seed"] == 0:
            key = (r["loss"], r["batch_size"], r["softmax_batch"])
            if key not in chosen or r["best_dev"] > chosen[key][1]:
                chosen[key] = (r["lr_multiplier"], r["best_dev"])
    return [r for r in runs
            if chosen[(r["loss"], r["batch_size"], r["softmax_batch"])][0] == r["lr_multiplier"]]


def _cell(tuned: list[dict], loss: str, b: int, n: int | None = None) -> dict[int, dict]:
    n = b if n is None else n
    return {r["seed"]: r for r in tuned
            if r["loss"] == loss and r["batch_size"] == b and r["softmax_batch"] == n}


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _exact(d: np.ndarray) -> float:
    """Two-sided sign-flip p by enumerating every flip."""
    obs = abs(d.mean())
    flips = [abs((d * np.array(s)).mean()) for s in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean([f >= obs - 1e-12 for f in flips]))


def _paired_text(a: list[float], b: list[float], digits: int = 2,
                 holm: float | None = None) -> str:
    d = np.asarray(a) - np.asarray(b)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    ps = [f"n = {len(d)}", f"p = {_p(stats.ttest_1samp(d, 0.0).pvalue)}"]
    if holm is not None:
        ps.append(f"Holm p = {_p(holm)}")
    ps.append(f"exact p = {_p(_exact(d))}")
    return f"{d.mean():+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({', '.join(ps)})"


def _iv_text(x: list[float], digits: int = 2) -> str:
    a = np.asarray(x)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    return f"{a.mean():.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _steps_to(store: Path, run_id: int, target: float) -> int | None:
    row = _rows(store, "SELECT MIN(steps) FROM curve WHERE run_id = ? AND dev >= ?",
                (run_id, target))[0][0]
    return row


# -- the Answer -----------------------------------------------------------------------------
def test_every_number_of_the_answer_is_recomputed_from_the_store(design_store, tmp_path):
    md, _ = write_report(design_store, tmp_path / "rep")
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    answer = [a["text"] for a in data["answer"]]
    text = md.read_text(encoding="utf-8")
    assert all(a in text for a in answer)
    tuned = _tuned(design_store)

    # 1. the best batch size per loss on dev, its test score, the extremes against it
    for loss in ("infonce", "weince"):
        means = {b: np.mean([r["best_dev"] for r in _cell(tuned, loss, b).values()])
                 for b in BATCHES}
        best = max(BATCHES, key=lambda b: means[b])
        top = _cell(tuned, loss, best)
        sentence = next(a for a in answer if a.startswith(f"**{loss}**: the best batch"))
        assert (f"is **{best}** (dev spearman {_iv_text([top[s]['best_dev'] for s in SEEDS])}, "
                f"test {_iv_text([top[s]['test'] for s in SEEDS])}, n = 3 seeds)") in sentence
        for b in sorted({BATCHES[0], BATCHES[-1]} - {best}):
            other = _cell(tuned, loss, b)
            want = _paired_text([other[s]["test"] for s in SEEDS],
                                [top[s]["test"] for s in SEEDS])
            assert f"batch {b} scores {want} on test" in sentence

    # 2. the trend: per-seed slopes (and quadratic curvatures) of test on log2 B
    for loss in ("infonce", "weince"):
        slopes, curvs = [], []
        for s in SEEDS:
            x = np.log2(BATCHES)
            y = [_cell(tuned, loss, b)[s]["test"] for b in BATCHES]
            slopes.append(np.polyfit(x, y, 1)[0])
            curvs.append(np.polyfit(x - x.mean(), y, 2)[0])
        sentence = next(a for a in answer if a.startswith(f"**{loss}**: per doubling"))
        assert f"changes by {_paired_text(slopes, [0.0] * 3)}" in sentence
        assert f"curvature {_paired_text(curvs, [0.0] * 3, 3)}" in sentence

    # 3. B_crit per loss and target: targets from the start and best tuned scores
    starts = [_rows(design_store, "SELECT dev FROM curve WHERE run_id = ? AND point = 0",
                    (r["id"],))[0][0] for r in tuned]
    settings = {(r["loss"], r["batch_size"], r["softmax_batch"]) for r in tuned}
    best_mean = max(np.mean([r["best_dev"] for r in _cell(tuned, *k).values()])
                    for k in settings)
    start = np.mean(starts)
    for frac in (0.5, 0.8, 0.9):
        target = start + frac * (best_mean - start)
        name = f"{round(frac * 100)}% of the gain"
        for loss in ("infonce", "weince"):
            head = f"**{loss}**, dev target {target:.2f} ({name})"
            sentence = next(a for a in answer if a.startswith(head))
            steps = {s: {b: _steps_to(design_store, _cell(tuned, loss, b)[s]["id"], target)
                         for b in BATCHES} for s in SEEDS}
            fits = []
            for s in SEEDS:
                pts = [(b, st) for b, st in steps[s].items() if st]
                if len(pts) >= 3:
                    bs, ss = np.array(pts, dtype=float).T
                    (ls, le), _ = optimize.curve_fit(
                        lambda b, ls, le: np.log(np.exp(ls) + np.exp(le) / b), bs, np.log(ss),
                        p0=[np.log(ss.min()), np.log(ss.max() * bs.min())], maxfev=20000)
                    fits.append((np.exp(ls), np.exp(le)))
            if not fits:
                assert "B_crit is not fitted" in sentence
                for b in BATCHES:
                    hit = sum(steps[s][b] is not None and steps[s][b] > 0 for s in SEEDS)
                    assert f"B={b}: {hit}/3" in sentence
                continue
            logs = np.log([e / s_ for s_, e in fits])
            b_crit = math.exp(logs.mean())
            got = next(c for c in data["critical"]
                       if c["loss"] == loss and c["target"] == name)["b_crit"]
            plural = "s" if len(fits) != 1 else ""
            assert f"geometric mean of {len(fits)} per-seed fit{plural}:" in sentence
            if got["mean"] > BATCHES[-1]:  # no floor in the range: only a bound is claimed
                assert b_crit > BATCHES[-1] and f"B_crit > {BATCHES[-1]}," in sentence
                e_min = math.exp(np.log([f[1] for f in fits]).mean())
                assert (f"E_min = {e_min:,.0f}" in sentence and "S_min = " not in sentence
                        and f"S_min < E_min / {BATCHES[-1]} = {e_min / BATCHES[-1]:,.1f} steps"
                        in sentence)
                row = next(r for t in tables(data) if t[0] == "critical" for r in t[3]
                           if r[0] == loss and r[1] == name)
                assert row[4:6] == [f"> {BATCHES[-1]}", f"< {e_min / BATCHES[-1]:,.1f}"]
                continue
            if got["mean"] < BATCHES[0]:
                assert b_crit < BATCHES[0] and f"B_crit < {BATCHES[0]}," in sentence
                s_min = math.exp(np.log([f[0] for f in fits]).mean())
                assert (f"S_min = {s_min:,.1f}" in sentence and "E_min = " not in sentence
                        and f"E_min < S_min x {BATCHES[0]} = {s_min * BATCHES[0]:,.0f} "
                        "examples" in sentence)
                continue
            assert got["mean"] == pytest.approx(b_crit, rel=1e-4)
            if len(fits) > 1:
                lo, hi = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(),
                                          scale=stats.sem(logs))
                assert (got["lo"], got["hi"]) == pytest.approx((math.exp(lo), math.exp(hi)),
                                                               rel=1e-4)
            assert f"B_crit = {got['mean']:,.0f} [" in sentence
            for key, k in (("S_min", 0), ("E_min", 1)):
                logs_k = np.log([f[k] for f in fits])
                shown = f"{math.exp(logs_k.mean()):,.{1 - k}f}"
                assert f"{key} = {shown} [" in sentence
            # the pooled fit: what doubling the batch buys at the smallest batch
            pooled = [(b, steps[s][b]) for s in SEEDS for b in BATCHES if steps[s][b]]
            bs, ss = np.array(pooled, dtype=float).T
            (ls, le), _ = optimize.curve_fit(
                lambda b, ls, le: np.log(np.exp(ls) + np.exp(le) / b), bs, np.log(ss),
                p0=[np.log(ss.min()), np.log(ss.max() * bs.min())], maxfev=20000)
            s0, e0, b0 = math.exp(ls), math.exp(le), BATCHES[0]
            if 2 * b0 <= e0 / s0:
                saved = 1 - (s0 + e0 / (2 * b0)) / (s0 + e0 / b0)
                assert f"doubling B at {BATCHES[0]} saves {100 * saved:.0f}% of the steps" \
                    in sentence
            # B_simple where the runs first reach the target: ratio of the averages
            noise = []
            for s in SEEDS:
                for b in BATCHES:
                    if steps[s][b]:
                        run_id = _cell(tuned, loss, b)[s]["id"]
                        point = _rows(design_store, "SELECT point FROM curve WHERE run_id = ? "
                                      "AND steps = ?", (run_id, steps[s][b]))[0][0]
                        vals = dict(_rows(design_store, "SELECT name, value FROM point_metrics "
                                          "WHERE run_id = ? AND point = ?", (run_id, point)))
                        noise.append((vals["noise_scale/trace_sigma"],
                                      vals["noise_scale/grad_sq"]))
            trace, grad = np.mean(noise, axis=0)
            if grad > 0:
                assert (f"B_simple = {trace / grad:,.0f} (ratio of averages over {len(noise)} "
                        "runs)") in sentence

    # 4. the negatives' share: B_small = 8 -> B_large at N = 8
    for loss in ("infonce", "weince"):
        small = _cell(tuned, loss, 8)
        for large in (16, 32):
            whole, mid = _cell(tuned, loss, large), _cell(tuned, loss, large, 8)
            sentence = next(a for a in answer if a.startswith(f"**{loss}**, batch 8 -> {large}"))
            t = lambda c: [c[s]["test"] for s in SEEDS]  # noqa: E731
            assert f"test spearman {_paired_text(t(whole), t(small))} in all" in sentence
            assert (f"alone (negatives held at N = 8; fewer, larger steps at this budget) "
                    f"{_paired_text(t(mid), t(small))}") in sentence
            assert f"the extra negatives {_paired_text(t(whole), t(mid))}" in sentence
            # the share only of a total whose interval excludes zero, in the Answer and table
            total = np.asarray(t(whole)) - np.asarray(t(small))
            lo, hi = stats.t.interval(0.95, 2, loc=total.mean(), scale=stats.sem(total))
            row = next(r for r in text.splitlines() if r.startswith(f"| {loss} | 8 -> {large} |"))
            if lo <= 0 <= hi:
                assert sentence.endswith("so no share is claimed.")
                assert row.endswith("| none claimed: total not resolved |")
            else:
                share = (np.mean(t(whole)) - np.mean(t(mid))) / total.mean()
                assert row.endswith(f"| {100 * share:.0f}% |")
                if share > 1:
                    assert "the extra negatives account for more than all" in sentence
                elif share >= 0:
                    assert f"the negatives carry {100 * share:.0f}% of the effect" in sentence
                else:
                    assert "the optimisation batch accounts for more" in sentence

    # 5. WEINCE - InfoNCE per batch size, Holm over the table's three paired t tests
    w = {b: _cell(tuned, "weince", b) for b in BATCHES}
    i = {b: _cell(tuned, "infonce", b) for b in BATCHES}
    ps = [stats.ttest_rel([w[b][s]["test"] for s in SEEDS],
                          [i[b][s]["test"] for s in SEEDS]).pvalue for b in BATCHES]
    holm = multipletests(ps, method="holm")[1]
    sentence = next(a for a in answer if a.startswith("**weince − infonce**"))
    for b, h in zip(BATCHES, holm, strict=True):
        want = _paired_text([w[b][s]["test"] for s in SEEDS], [i[b][s]["test"] for s in SEEDS],
                            holm=h)
        assert f"B={b}: {want}" in sentence

    # 6. the regime: budget, seeds, lr
    regime = answer[-1]
    assert "a budget of 192 examples per run" in regime and "3 seeds per cell" in regime
    assert "lr = 0.05 x rule none x the best of 0.5, 1 on dev (first_seed)" in regime


def test_first_seed_tuning_runs_later_seeds_at_the_winner_only(design_store):
    runs = _runs(design_store)
    tuned = _tuned(design_store)
    assert len(runs) == 2 * 5 * (2 + 1 + 1)  # 2 losses x 5 settings x (2 mults + 2 seeds)
    for r in runs:
        if r["seed"] != 0:
            assert r in tuned
    # the (B, N) axis: N = 8 beside N = B at 16 and 32, none at 8
    blocks = {(r["batch_size"], r["softmax_batch"]) for r in runs}
    assert blocks == {(8, 8), (16, 16), (16, 8), (32, 32), (32, 8)}
    # every run met the budget exactly, in whole steps
    assert {(r["batch_size"], r["examples"], r["steps"]) for r in runs} == \
        {(8, 192, 24), (16, 192, 12), (32, 192, 6)}


def test_a_rerun_counts_the_cells_the_lr_gate_skips_apart(design_store, capsys):
    """60 cells: 40 ran (every multiplier on seed 0, the winner on seeds 1 and 2); the other
    20 are the losers' cells of seeds 1 and 2, which no rerun runs."""
    sweep = design_store.parent / "design.yaml"
    assert main(["sweep", str(sweep), "--store", str(design_store)]) == 0
    assert ("60 cells, 40 finished already, 0 to run, 20 not to run (another lr multiplier "
            "won, or will win, their setting on the first seed)") in capsys.readouterr().out


def test_the_answer_names_every_setting_whose_tuned_lr_is_at_the_grids_edge(design_store):
    """The grid is x0.5 and x1, so every choice is one of its two ends: the Answer lists each
    setting with the seed-0 winner recomputed from the rows (lowest = 0.5, highest = 1)."""
    tuned = _tuned(design_store)
    expected = set()
    for r in tuned:
        if r["seed"] == 0:
            block = "" if r["softmax_batch"] == r["batch_size"] else f", N={r['softmax_batch']}"
            side = "lowest" if r["lr_multiplier"] == 0.5 else "highest"
            expected.add(f"{r['loss']} B={r['batch_size']}{block}: "
                         f"x{r['lr_multiplier']:g} ({side})")
    data = compute(*load_runs(design_store))
    (text,) = [a["text"] for a in data["answer"] if a["link"] == "lr"]
    assert text.startswith(f"The chosen lr is at the edge of the multiplier grid for "
                           f"{len(expected)} of {len(expected)} settings (")
    listed = text.split(" settings (", 1)[1].split("):", 1)[0]
    assert set(listed.split("; ")) == expected


def test_the_answer_says_when_every_tuned_lr_is_inside_its_grid():
    """A chosen multiplier strictly between the grid's ends is no caveat; one at an end is."""
    from batchscale.study.answer import lr_edges

    def row(b: int, chosen: float) -> dict:
        return {"loss": "bsc", "batch_size": b, "softmax_batch": b, "chosen": chosen,
                "multipliers": [{"multiplier": m, "dev": None} for m in (0.5, 1.0, 2.0)]}

    (inside,) = lr_edges({"lr": [row(16, 1.0), row(64, 1.0)]})
    assert inside["text"] == ("The chosen lr is inside the multiplier grid for every setting "
                              "(2 of 2).")
    (edge,) = lr_edges({"lr": [row(16, 2.0), row(64, 1.0), row(256, 0.5)]})
    assert "for 2 of 3 settings (bsc B=16: x2 (highest); bsc B=256: x0.5 (lowest))" in edge["text"]
    assert lr_edges({"lr": [{**row(16, 1.0), "multipliers": [{"multiplier": 1.0}]}]}) == []


def test_the_store_keeps_every_mechanism_at_every_point(design_store):
    names = {r[0] for r in _rows(design_store, "SELECT DISTINCT name FROM point_metrics")}
    for name in ("geometry/neg_cos_mean", "geometry/neg_cos_var",
                 "geometry/hardest_neg_cos_mean", "geometry/alignment", "geometry/uniformity",
                 "geometry/weince_mean_lambda", "noise_scale/grad_sq",
                 "noise_scale/trace_sigma", "dev/pearson"):
        assert name in names
    counts = _rows(design_store, "SELECT c.run_id, COUNT(DISTINCT c.point), "
                                 "COUNT(DISTINCT m.point) FROM curve c LEFT JOIN point_metrics m "
                                 "ON m.run_id = c.run_id AND m.point = c.point AND "
                                 "m.name = 'geometry/neg_cos_var' GROUP BY c.run_id")
    assert all(r[1] == r[2] for r in counts)
    # the log schedule: points at the same example counts for every batch size that has them
    by_batch = {}
    for r in _rows(design_store, "SELECT c2.batch_size, c.examples FROM curve c JOIN runs r "
                                 "ON r.id = c.run_id JOIN cells c2 USING (cell_id)"):
        by_batch.setdefault(r[0], set()).add(r[1])
    assert by_batch[32] <= by_batch[16] <= by_batch[8]


def test_the_report_flags_a_run_that_missed_the_budget(design_store, tmp_path):
    store = tmp_path / "edited.sqlite"
    shutil.copy(design_store, store)
    db = sqlite3.connect(store)
    run_id = db.execute("SELECT MIN(id) FROM runs").fetchone()[0]
    db.execute("UPDATE runs SET examples = 188 WHERE id = ?", (run_id,))
    db.commit()
    db.close()
    data = compute(*load_runs(store))
    flagged = data["design"]["flagged"]
    assert len(flagged) == 1 and flagged[0]["examples"] == 188
    assert "1 runs did not meet the budget exactly" in data["answer"][-1]["text"]


def test_a_target_reached_only_at_the_budgets_end_is_not_fitted(tmp_path):
    """Every run's curve (tests/study_stores.py) ends at its dev score, one point earlier 1
    below it: a target 0.5 below is reached at the last point only (steps = the budget's,
    whatever B, so a hyperbola would measure the schedule); 2 below, one point earlier."""
    from study_stores import make_store

    scores = {("infonce", b, s): (80.0, 70.0) for b in (16, 64, 256) for s in (0, 1, 2)}
    store = make_store(tmp_path / "s.sqlite", scores, report={"targets": [79.5, 78.0]})
    data = compute(*load_runs(store))
    last, earlier = data["critical"]
    assert (last["value"], earlier["value"]) == (79.5, 78.0)
    assert last["only_at_last_point"] and not earlier["only_at_last_point"]
    # step 8 at every B: S(B) constant, so B_crit lies below the batch sizes measured
    assert (last["finding"], earlier["finding"]) == ("last_point", "below")
    texts = [a["text"] for a in data["answer"] if a["link"] == "critical"]
    assert len(texts) == 2
    assert "only at its last evaluation point" in texts[0]
    assert "B_crit is not measured" in texts[0]
    assert "only at its last evaluation point" not in texts[1]
    (rows,) = [t[3] for t in tables(data) if t[0] == "critical"]
    assert rows[0][4:7] == ["not measured (last point)", "-", "-"]
    assert rows[1][4] not in ("not measured (last point)", "n/a")


def test_the_answer_says_when_two_losses_reached_a_target_at_the_same_points(tmp_path):
    """Every curve (tests/study_stores.py) is dev - 9, - 4, - 1, dev at steps 0, 4, 8, 12.
    BSC and InfoNCE end at 80, WEINCE at 78: a target of 76 is reached at step 4 by the
    first two (the same steps for every seed and batch: one fit, said so once, on InfoNCE)
    and at step 8 by WEINCE (a fit of its own)."""
    from study_stores import make_store

    scores = {(loss, b, s): (dev, 70.0) for loss, dev in (("bsc", 80.0), ("infonce", 80.0),
                                                          ("weince", 78.0))
              for b in (16, 64, 256) for s in (0, 1, 2)}
    store = make_store(tmp_path / "s.sqlite", scores, report={"targets": [76.0]})
    data = compute(*load_runs(store))
    by_loss = {c["loss"]: c for c in data["critical"]}
    assert by_loss["bsc"]["steps_by_seed"] == [[s, b, 4.0] for s in (0, 1, 2)
                                               for b in (16, 64, 256)]
    assert by_loss["weince"]["steps_by_seed"] == [[s, b, 8.0] for s in (0, 1, 2)
                                                  for b in (16, 64, 256)]
    texts = {a["text"].split("**")[1]: a["text"] for a in data["answer"]
             if a["link"] == "critical"}
    assert "the same evaluation points as **bsc**" in texts["infonce"]
    assert "same evaluation points as" not in texts["bsc"]
    assert "same evaluation points as" not in texts["weince"]


def test_where_the_steps_do_not_fall_with_b_only_a_bound_on_e_min_is_given(tmp_path):
    """Every curve (tests/study_stores.py) reaches dev - 4 at step 4 whatever B: S(B) = 4, so
    the hyperbola has S_min = 4 and E_min at its floor; the Answer claims B_crit < 16 and
    E_min < S_min x 16 = 64 examples, not the floor's value."""
    from study_stores import make_store

    scores = {("infonce", b, s): (80.0, 70.0) for b in (16, 64, 256) for s in (0, 1, 2)}
    store = make_store(tmp_path / "s.sqlite", scores, report={"targets": [76.0]})
    data = compute(*load_runs(store))
    (text,) = [a["text"] for a in data["answer"] if a["link"] == "critical"]
    assert "B_crit < 16, the smallest batch measured" in text
    assert ("geometric mean of 3 per-seed fits: S_min = 4.0 [4.0, 4.0] steps, so "
            "E_min < S_min x 16 = 64 examples)") in text
    assert "E_min = " not in text
    (rows,) = [t[3] for t in tables(data) if t[0] == "critical"]
    assert rows[0][4:7] == ["< 16", "4.0 [4.0, 4.0]", "< 64"]  # B_crit, S_min, E_min


def test_a_bound_and_a_doubling_name_batch_sizes_the_loss_was_run_at(tmp_path):
    """InfoNCE runs at 16..1,024, SogCLR at 64..1,024 only, WEINCE at 16..256 only; every curve
    (tests/study_stores.py) reaches dev - 4 at step 4 whatever B, so each fit puts B_crit below
    its loss's smallest batch (E_min < S_min x that batch = 4 x B), and the pooled fit's
    doubling is quoted at the loss's largest batch, not at the study's."""
    from study_stores import make_store

    runs_at = {"infonce": (16, 64, 256, 1024), "sogclr": (64, 256, 1024),
               "weince": (16, 64, 256)}
    scores = {(loss, b, s): (80.0, 70.0) for loss, sizes in runs_at.items() for b in sizes
              for s in (0, 1, 2)}
    data = compute(*load_runs(make_store(tmp_path / "s.sqlite", scores,
                                         report={"targets": [76.0]})))
    by_loss = {c["loss"]: c for c in data["critical"]}
    texts = {a["text"].split("**")[1]: a["text"] for a in data["answer"]
             if a["link"] == "critical"}
    for loss, sizes in runs_at.items():
        lo, hi = sizes[0], sizes[-1]
        assert by_loss[loss]["measured"] == [lo, hi]
        assert f"B_crit < {lo}, the smallest batch measured" in texts[loss]
        assert f"E_min < S_min x {lo} = {4 * lo} examples" in texts[loss]
        assert by_loss[loss]["doubling"]["above"]["batch_size"] == hi
        assert f"at {hi}, " in texts[loss]
    assert "1024" not in texts["weince"]


def test_the_answer_says_why_b_crit_is_not_fitted(tmp_path):
    """A fit is per seed and needs 3 batch sizes. Every curve (tests/study_stores.py) is
    dev - 9, - 4, - 1, dev: a target of 76 is reached where dev >= 76. InfoNCE: seed s reaches
    it at the s-th batch size only, so every batch size has a run reaching it and no seed has
    three; WEINCE reaches it everywhere but was run at 2 batch sizes."""
    from study_stores import make_store

    batches = (16, 64, 256)
    scores = {("infonce", b, s): (80.0 if k == s else 70.0, 70.0)
              for k, b in enumerate(batches) for s in (0, 1, 2)}
    scores |= {("weince", b, s): (80.0, 70.0) for b in batches[:2] for s in (0, 1, 2)}
    store = make_store(tmp_path / "s.sqlite", scores, report={"targets": [76.0]})
    data = compute(*load_runs(store))
    assert [c["finding"] for c in data["critical"]] == ["not_fitted", "not_fitted"]
    texts = {a["text"].split("**")[1]: a["text"]
             for a in data["answer"] if a["link"] == "critical"}
    assert texts["infonce"] == (
        "**infonce**, dev target 76.00 (76): no single seed reached it at 3 or more batch "
        "sizes (a per-seed fit needs that many), so B_crit is not fitted (runs reaching it: "
        "B=16: 1/3, B=64: 1/3, B=256: 1/3).")
    assert texts["weince"] == (
        "**weince**, dev target 76.00 (76): this loss was run at 2 batch sizes and a fit "
        "needs 3, so B_crit is not fitted (runs reaching it: B=16: 3/3, B=64: 3/3).")


def test_a_grid_with_vrns_but_no_vrns_runs_yet_says_so(tmp_path):
    """A partial store (a study under way) must not claim that VRNS is absent from its grid."""
    from study_stores import make_store

    scores = {("infonce", b, s): (80.0, 70.0) for b in (16, 64) for s in (0, 1)}
    texts = {}
    for weights in ([0.0], [0.0, 30.0]):
        store = make_store(tmp_path / f"{len(weights)}.sqlite", scores,
                           grid={"vrns_weights": weights})
        (texts[len(weights)],) = [a["text"] for a in compute(*load_runs(store))["answer"]
                                  if "VRNS" in a["text"]]
    assert texts[1] == "VRNS is not in this grid (grid.vrns_weights)."
    assert texts[2] == ("VRNS is in this grid, but no batch size has test scores with and "
                        "without it yet (the comparison needs both).")


def test_the_lr_table_keeps_its_columns_when_a_multiplier_has_no_run(design_store, tmp_path):
    """A study under way (a seed-0 run not finished yet) or a diverged run leaves a hole in
    the lr table: it says which, and every other score stays under its own multiplier."""
    partial = tmp_path / "partial.sqlite"
    shutil.copy(design_store, partial)
    tuned = _tuned(design_store)
    # settings tuned to x1: their x0.5 run exists for seed 0 only
    at_one = sorted({(r["loss"], r["batch_size"], r["softmax_batch"]) for r in tuned
                     if r["lr_multiplier"] == 1.0})
    assert len(at_one) >= 2
    gone, failed = at_one[:2]
    db = sqlite3.connect(partial)
    for loss, b, n in (gone, failed):
        (run_id, cell_id), = db.execute(
            "SELECT r.id, r.cell_id FROM runs r JOIN cells c USING (cell_id) WHERE c.loss = ? "
            "AND c.batch_size = ? AND c.softmax_batch = ? AND c.lr_multiplier = 0.5",
            (loss, b, n)).fetchall()
        for table in ("curve", "point_metrics", "metrics"):
            db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        if (loss, b, n) == failed:
            db.execute("INSERT INTO failures (cell_id, failed_at, error) VALUES (?, ?, ?)",
                       (cell_id, "2026-01-01T00:00:00+00:00", "loss is NaN"))
    db.commit()
    db.close()
    (header, body), = [(t[2], t[3]) for t in tables(compute(*load_runs(partial)))
                       if t[0] == "lr"]
    assert header[3:] == ["x0.5", "x1"]
    rows = {(r[0], int(r[1]), r[2]): r[3:] for r in body}
    for (loss, b, n), why in ((gone, "not run"), (failed, "diverged")):
        x1 = [r["best_dev"] for r in _cell(tuned, loss, b, n).values()]
        assert rows[(loss, b, "B" if n == b else str(n))] == [why, _iv_text(x1) + " *"]


def test_the_negatives_share_is_claimed_only_of_a_resolved_total(tmp_path):
    """Hand-made test scores at B = 8, at B = 32 whole and at B = 32 in blocks of N = 8.
    InfoNCE: totals 4.0, 4.2, 3.9 (resolved), negatives 3.0, 3.1, 2.7: share 2.933 / 4.033.
    WEINCE: the same total, negatives -2.0, -1.8, -2.1 (the other way). SogCLR: the same
    total, the optimisation batch -1 at every seed (the other way), negatives 5.0, 5.2, 4.9.
    BSC: totals +3, -2, +1, whose t interval holds zero: no share, whatever the point
    estimates."""
    from study_stores import make_store

    small, whole = (60.0, 61.0, 62.0), (64.0, 65.2, 65.9)
    mids = {"infonce": (61.0, 62.1, 63.2), "weince": (66.0, 67.0, 68.0),
            "bsc": (61.0, 62.0, 63.0), "sogclr": (59.0, 60.0, 61.0)}
    scores = {}
    for loss, mid in mids.items():
        top = (63.0, 59.0, 63.0) if loss == "bsc" else whole
        for s in range(3):
            scores[(loss, 8, s)] = (70.0, small[s])
            scores[(loss, 32, s)] = (70.0, top[s])
            scores[(loss, 32, s, 8)] = (70.0, mid[s])
    data = compute(*load_runs(make_store(tmp_path / "s.sqlite", scores)))
    share = {n["loss"]: n["test"]["negatives_share"] for n in data["negatives"]}
    assert share["infonce"] == pytest.approx((3.0 + 3.1 + 2.7) / (4.0 + 4.2 + 3.9))
    assert share["weince"] == pytest.approx((-2.0 - 1.8 - 2.1) / (4.0 + 4.2 + 3.9))
    assert share["sogclr"] == pytest.approx((5.0 + 5.2 + 4.9) / (4.0 + 4.2 + 3.9))
    assert share["bsc"] is None
    texts = {a["text"].split("**")[1]: a["text"] for a in data["answer"]
             if a["link"] == "blocks"}
    assert "the negatives carry 73% of the effect" in texts["infonce"]
    assert "the optimisation batch accounts for more than all" in texts["weince"]
    assert texts["sogclr"].endswith(
        "the optimisation batch moves the score the other way, so the extra negatives "
        "account for more than all of the effect (point estimates).")
    assert texts["bsc"].endswith("not distinguishable from zero, so no share is claimed.")
    (rows,) = [t[3] for t in tables(data) if t[0] == "negatives"]
    assert {r[0]: r[-1] for r in rows} == {"infonce": "73%", "weince": "-49%",
                                           "sogclr": "125%",
                                           "bsc": "none claimed: total not resolved"}


def test_the_frontier_plot_stars_b_crit_only_where_the_table_gives_it_a_value(design_store,
                                                                              tmp_path):
    """The star at (2 E_min, 2 S_min) is drawn for a fitted B_crit inside the batch range,
    never for a bound (B_crit > the largest batch) or a target reached only at the budget's
    end, whose table cell is not a number; a bound's curve is dashed, and only a bound's."""
    from batchscale.study.plots import fit_marks
    from study_stores import make_store

    scores = {("infonce", b, s): (80.0, 70.0) for b in (16, 64, 256) for s in (0, 1, 2)}
    last = make_store(tmp_path / "s.sqlite", scores, report={"targets": [79.5, 78.0]})
    seen = []
    for store in (design_store, last):
        data = compute(*load_runs(store))
        (rows,) = [t[3] for t in tables(data) if t[0] == "critical"]
        for c, row in zip(data["critical"], rows, strict=True):
            number = row[4].split(" [")[0].replace(",", "").isdigit()
            _, star, dashed = fit_marks(c)
            assert star == number, (c["loss"], c["target"], row[4])
            assert dashed == row[4].startswith(("> ", "< ")), (c["loss"], c["target"], row[4])
            if c["pooled"] is not None:
                seen.append((number, dashed))
    assert {(True, False), (False, True)} <= set(seen)


def test_the_frontier_plot_draws_no_hyperbola_through_last_points_only(tmp_path):
    """Seed s ends at dev 80 at the s-th batch size only (70 elsewhere; tests/study_stores.py
    curves end 1 below it one point earlier): a target of 79.5 is reached at the budget's end
    at each batch size by one seed. The pooled fit exists (3 batch sizes between the seeds)
    but would draw the schedule (a vertical line at the budget), so neither curve nor star."""
    from batchscale.study.plots import fit_marks
    from study_stores import make_store

    scores = {("infonce", b, s): (80.0 if k == s else 70.0, 70.0)
              for k, b in enumerate((16, 64, 256)) for s in (0, 1, 2)}
    store = make_store(tmp_path / "s.sqlite", scores, report={"targets": [79.5]})
    (c,) = compute(*load_runs(store))["critical"]
    assert c["pooled"] is not None and c["finding"] == "not_fitted"
    assert fit_marks(c) == (False, False, False)


def test_the_regime_counts_the_seeds_each_cell_finished(tmp_path):
    """The grid has seeds 0-2; the regime sentence says how many each tuned cell has: all
    three, then one run (InfoNCE, B = 64, seed 2) missing, then only seed 0 anywhere."""
    from study_stores import make_store

    full = {(loss, b, s): (80.0, 70.0) for loss in ("bsc", "infonce") for b in (16, 64)
            for s in (0, 1, 2)}

    def regime(scores: dict, name: str, grid: dict | None = None) -> str:
        data = compute(*load_runs(make_store(tmp_path / name, scores, grid=grid)))
        return data["answer"][-1]["text"]

    assert ", 3 seeds per cell, " in regime(full, "a.sqlite")
    partial = {k: v for k, v in full.items() if k != ("infonce", 64, 2)}
    assert ", 2-3 seeds per cell (3 in the grid), " in regime(partial, "b.sqlite")
    first = {k: v for k, v in full.items() if k[2] == 0}
    assert ", 1 seed per cell (3 in the grid), " in regime(first, "c.sqlite",
                                                           grid={"seeds": [0, 1, 2]})
