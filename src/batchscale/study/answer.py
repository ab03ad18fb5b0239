"""The report's Answer: sentences generated from the computed numbers, nothing written by hand.

Each sentence says what the numbers show at the seed count used (intervals included), links
the table or plot it comes from, and claims a direction only where its 95% interval excludes
zero. A sentence whose numbers the grid does not have says so instead.
"""

from __future__ import annotations

from typing import Any

from .formatting import fmt, fmt_iv, fmt_pd, fmt_spread, percent


def excludes_zero(d: dict[str, Any] | None) -> bool:
    return d is not None and d["lo"] is not None and (d["lo"] > 0 or d["hi"] < 0)


def _direction(d: dict[str, Any] | None, more: str, less: str) -> str:
    """A claim only where the interval excludes zero."""
    if not excludes_zero(d):
        return "no difference that this many seeds can resolve"
    return more if d["mean"] > 0 else less  # type: ignore[index]


def best_batch(data: dict[str, Any]) -> list[dict[str, Any]]:
    m = data["metric"]
    out = []
    for b in data["best"]:
        n = (b["test"] or b["dev"] or {}).get("n", 0)
        parts = [f"**{b['loss']}**: the best batch size on dev (tuned lr) is **{b['batch_size']}** "
                 f"(dev {m} {fmt_iv(b['dev'])}, test {fmt_iv(b['test'])}, n = {n} "
                 f"seed{'' if n == 1 else 's'})"]
        for e in b["extremes"]:
            parts.append(f"batch {e['batch_size']} scores {fmt_pd(e['test'])} on test against "
                         f"it ({_direction(e['test'], 'better', 'worse')})")
        out.append({"text": "; ".join(parts) + ".", "link": "quality"})
    return out


def trend(data: dict[str, Any]) -> list[dict[str, Any]]:
    m = data["metric"]
    out = []
    for t in data["trends"]:
        if t["test"] is None:
            continue
        slope, curv = t["test"]["slope"], t["test"]["curvature"]
        text = (f"**{t['loss']}**: per doubling of the batch size, test {m} changes by "
                f"{fmt_pd(slope)} (mean of per-seed slopes; "
                f"{_direction(slope, 'it rises', 'it falls')})")
        if curv is not None:
            # the slope's own sign is stated above: say how the change per doubling moves,
            # not whether a "gain" (which may be a loss) grows
            shape = _direction(curv, "the change per doubling rises as B grows",
                               "the change per doubling falls as B grows")
            text += f"; curvature {fmt_pd(curv, 3)} ({shape})"
        out.append({"text": text + ".", "link": "trend"})
    return out


def _same_steps_as(entries: list[dict[str, Any]]) -> dict[int, str]:
    """Index of each entry -> the first earlier loss that reached the same target at the
    same steps for every seed and batch size (its fit is then the same fit)."""
    first: dict[tuple[Any, ...], str] = {}
    out: dict[int, str] = {}
    for i, c in enumerate(entries):
        if not c.get("steps_by_seed"):
            continue
        key = (c["target"], c["value"], *map(tuple, c["steps_by_seed"]))
        if key in first:
            out[i] = first[key]
        else:
            first[key] = c["loss"]
    return out


def critical(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    same_as = _same_steps_as(data["critical"])
    for i, c in enumerate(data["critical"]):
        head = f"**{c['loss']}**, dev target {fmt(c['value'])} ({c['target']})"
        if c["finding"] == "not_fitted":
            reached = ", ".join(f"B={p['batch_size']}: {p['reached']}/{p['runs']}"
                                for p in c["per_batch"])
            need, have = c["min_batch_sizes"], len(c["per_batch"])
            # A fit is per seed: runs of different seeds reaching it at 3 batch sizes between
            # them do not make one, which the bare counts below would suggest.
            why = (f"this loss was run at {have} batch sizes and a fit needs {need}"
                   if have < need else
                   f"no single seed reached it at {need} or more batch sizes (a per-seed "
                   "fit needs that many)")
            out.append({"text": f"{head}: {why}, so B_crit is not fitted (runs reaching it: "
                                f"{reached}).", "link": "critical"})
            continue
        if c["finding"] == "last_point":
            out.append({"text": f"{head}: every run that reached it did so only at its last "
                                "evaluation point (the end of the budget), so its steps are "
                                "the budget / B at every batch size and B_crit is not "
                                "measured.", "link": "critical"})
            continue
        fits = f"geometric mean of {c['n']} per-seed fit{'s' if c['n'] != 1 else ''}"
        e_min = f"E_min = {fmt_iv(c['e_min'], 0)} examples"
        bound = c["bound"]
        if c["finding"] == "above":
            hi = bound["b_crit_above"]
            text = (f"{head}: B_crit > {hi}, the largest batch measured: the steps still fall "
                    f"as 1/B there (no floor), so only this bound is measured ({fits}: "
                    f"{e_min}, so S_min < E_min / {hi} = {fmt(bound['s_min_below'], 1)} "
                    "steps)")
        elif c["finding"] == "below":
            lo = bound["b_crit_below"]
            text = (f"{head}: B_crit < {lo}, the smallest batch measured: the steps hardly "
                    f"fall with B ({fits}: S_min = {fmt_iv(c['s_min'], 1)} steps, so E_min < "
                    f"S_min x {lo} = {fmt(bound['e_min_below'], 0)} examples)")
        else:
            text = (f"{head}: B_crit = {fmt_iv(c['b_crit'], 0)} ({fits}: S_min = "
                    f"{fmt_iv(c['s_min'], 1)} steps, {e_min})")
        d = c.get("doubling") or {}
        gains = []
        if d.get("below"):
            gains.append(f"doubling B at {d['below']['batch_size']} saves "
                         f"{percent(d['below']['steps_saved'])} of the steps")
        if d.get("above"):
            gains.append(f"at {d['above']['batch_size']}, {percent(d['above']['steps_saved'])}")
        if gains:
            text += "; " + ", ".join(gains) + " (pooled fit)"
        if c["b_simple"] is not None and c["b_simple"]["value"] is not None:
            text += (f"; the gradient noise scale where runs reach the target: B_simple = "
                     f"{fmt(c['b_simple']['value'], 0)} (ratio of averages over "
                     f"{c['b_simple']['n']} runs)")
        if i in same_as:
            text += (f"; every seed reached it at the same evaluation points as **"
                     f"{same_as[i]}**, so this is that loss's fit: the schedule (eval.points) "
                     "does not separate the two here")
        if c["b_crit"]["lo"] is not None and c["b_crit"]["lo"] == c["b_crit"]["hi"]:
            text += ("; the seeds reached the target at the same evaluation points, so the "
                     "interval has no width at the schedule's resolution (eval.points)")
        out.append({"text": text + ".", "link": "critical"})
    return out


def negatives(data: dict[str, Any]) -> list[dict[str, Any]]:
    m = data["metric"]
    out = []
    for n in data["negatives"]:
        t = n["test"]
        text = (f"**{n['loss']}**, batch {n['b_small']} -> {n['b_large']}: test {m} "
                f"{fmt_pd(t['total'])} in all; the optimisation batch alone (negatives held "
                f"at N = {n['b_small']}; fewer, larger steps at this budget) "
                f"{fmt_pd(t['optimisation'])}, the extra negatives "
                f"{fmt_pd(t['negatives'])}")
        share = t["negatives_share"]
        if share is None:
            text += ": the total is not distinguishable from zero, so no share is claimed"
        elif share > 1:
            text += (": the optimisation batch moves the score the other way, so the extra "
                     "negatives account for more than all of the effect (point estimates)")
        elif share >= 0:
            text += (f": the negatives carry {percent(share)} of the effect (point "
                     "estimates)")
        else:
            text += (": the negatives move the score the other way, so the optimisation "
                     "batch accounts for more than all of the effect (point estimates)")
        out.append({"text": text + ".", "link": "blocks"})
    if not out:
        out.append({"text": "The grid has no softmax-block cells (grid.softmax_batches), so "
                            "the negatives and the optimisation batch are not separated.",
                    "link": "blocks"})
    return out


def differences(data: dict[str, Any]) -> list[dict[str, Any]]:
    m = data["metric"]
    by: dict[str, list[dict[str, Any]]] = {}
    for d in data["differences"]:
        by.setdefault(d["comparison"], []).append(d)
    out = []
    for name, rows in by.items():
        cells = [f"B={d['batch_size']}: {fmt_pd(d['test'], p_holm=d['test_p_holm'])}"
                 for d in rows]
        out.append({"text": f"**{name}** on test {m}, by batch size: " + "; ".join(cells)
                            + ".", "link": "differences"})
    if not any("vrns" in name for name in by):
        weights = data["design"].get("vrns_weights") or []
        text = "VRNS is not in this grid (grid.vrns_weights)." if not any(weights) else \
            ("VRNS is in this grid, but no batch size has test scores with and without it "
             "yet (the comparison needs both).")
        out.append({"text": text, "link": "differences"})
    return out


def _sides(diffs: list[tuple[int, dict[str, Any] | None]], below: str = "below") -> str:
    """Where each difference lies: above zero, below it, or not resolved (the interval
    includes zero, or there is none)."""
    groups: dict[str, list[str]] = {"below": [], "above": [], "open": []}
    for bs, d in diffs:
        side = "open" if d is None or not excludes_zero(d) else \
            "above" if d["mean"] > 0 else "below"
        groups[side].append(str(bs))
    words = {"above": "above at B = {}", "below": below + " at B = {}",
             "open": "indistinguishable at this many seeds at B = {}"}
    return ", ".join(words[k].format(", ".join(v)) for k, v in groups.items() if v)


def reach(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ``report.reach`` pair: A at each smaller batch size against B at B's largest."""
    m = data["metric"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in data["reach"]:
        by.setdefault(r["comparison"], []).append(r)
    out = []
    for rows in by.values():
        a, b, large = rows[0]["loss"], rows[0]["reference"], rows[0]["reference_batch_size"]
        small = [r for r in rows if r["batch_size"] < large]
        if not small:
            out.append({"text": f"**{a}** has no runs below the largest batch size of {b} "
                                f"({large}), so whether it reaches {b} there from a small "
                                "batch is not measured.", "link": "reach"})
            continue
        cells = [f"B={r['batch_size']}: "
                 + fmt_pd(r["large"]["test"], p_holm=r["large"]["test_p_holm"]) for r in small]
        text = (f"Does **{a}** at a small batch reach **{b}** at its largest batch "
                f"({large})? Test {m}, {a}@B − {b}@{large} (paired by seed): "
                + "; ".join(cells) + ". On test it is "
                + _sides([(r["batch_size"], r["large"]["test"]) for r in small],
                         "below (falls short)")
                + "; on dev (selection) it is "
                + _sides([(r["batch_size"], r["large"]["dev"]) for r in small]))
        same = [(r["batch_size"], r["same"]["test"]) for r in small if r["same"]]
        if same:
            text += f"; against {b} at the same batch size, on test it is " + _sides(same)
        out.append({"text": text + ".", "link": "reach"})
    return out


def lr_edges(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Whether each setting's chosen lr multiplier is inside the grid. At the grid's edge it
    may not be the best lr (Shallue et al. 2018, arXiv 1811.03600, check that the best
    hyperparameters are not on the search space's boundary), so that setting's scores are
    what the grid found, not its tuned quality."""
    rows = [r for r in data["lr"] if r["chosen"] is not None and len(r["multipliers"]) > 1]
    if not rows:
        return []
    edges = []
    for r in rows:
        grid = [x["multiplier"] for x in r["multipliers"]]
        side = ("lowest" if r["chosen"] == grid[0] else
                "highest" if r["chosen"] == grid[-1] else None)
        if side:
            block = "" if r["softmax_batch"] == r["batch_size"] else f", N={r['softmax_batch']}"
            edges.append(f"{r['loss']} B={r['batch_size']}{block}: x{r['chosen']:g} ({side})")
    if not edges:
        text = (f"The chosen lr is inside the multiplier grid for every setting "
                f"({len(rows)} of {len(rows)}).")
    else:
        text = (f"The chosen lr is at the edge of the multiplier grid for {len(edges)} of "
                f"{len(rows)} settings ({'; '.join(edges)}): a better lr may lie outside the "
                "grid there, so those settings' scores are what the grid found, not their "
                "tuned quality.")
    return [{"text": text, "link": "lr"}]


def _seeds_per_cell(d: dict[str, Any]) -> str:
    """The seeds each tuned cell has finished, against the grid's where they differ (a study
    under way, a diverged run)."""
    grid = len(d["seeds"] or [])
    lo, hi = d.get("seeds_per_cell") or (0, 0)
    if lo == hi == grid:
        return f"{grid} seeds per cell"
    count = f"{lo} seed{'s' * (lo != 1)}" if lo == hi else f"{lo}-{hi} seeds"
    return f"{count} per cell ({grid} in the grid)"


def regime(data: dict[str, Any]) -> dict[str, Any]:
    d = data["design"]
    budget = d["budget"]
    epochs = d.get("epochs_seen")
    data_ = " + ".join(d["data"]) if isinstance(d["data"], list) else d["data"]
    text = (f"These conclusions hold for: model {d['model']}, trained on {data_}, a budget "
            f"of {fmt(budget['value'], 0) if budget['value'] is not None else 'n/a'} "
            f"{budget['kind']} per run"
            + (f" ({fmt_spread(epochs, 2)} epochs)" if epochs else "")
            + f", {_seeds_per_cell(d)}, lr = {d['base_lr']} x rule "
            f"{'/'.join(d['lr_scaling'] or [])} x the best of "
            f"{', '.join(f'{m:g}' for m in d['lr_multipliers'])} on dev ({d['lr_tuning']}), "
            f"selection on {(d['dev'] or {}).get('task')} {(d['dev'] or {}).get('split')}, "
            "test on "
            f"{(d['test'] or {}).get('task')} {(d['test'] or {}).get('split')}.")
    if d["flagged"]:
        text += f" {len(d['flagged'])} runs did not meet the budget exactly (see Design)."
    return {"text": text, "link": "design"}


def answer(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The Answer's sentences, in order: the best batch size and the extremes' cost, the
    trend, B_crit, the negatives' share, the loss comparisons, whether a loss at a small
    batch reaches another at its largest (``report.reach``), whether the tuned lr is inside
    its grid, the regime."""
    return [*best_batch(data), *trend(data), *critical(data), *negatives(data),
            *differences(data), *reach(data), *lr_edges(data), regime(data)]
