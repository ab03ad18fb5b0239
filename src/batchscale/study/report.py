"""The study report: what the batch size does to convergence and quality, from a store.

:func:`compute` turns the store's finished runs into numbers (a JSON-able dict, also written
as ``report.json``); :func:`render_markdown` and :func:`render_html` lay the same numbers
out (the HTML is self-contained: plots embedded as PNG data, every text from the data
escaped); :func:`write_report` does all of it.

Definitions (also printed in the report):

* a run's *dev* score is that of its selected checkpoint (the best dev point), and its *test*
  score that checkpoint's test score;
* *examples (seconds) to 95%* is the first evaluation point at which the run's dev score
  reaches 95% of its own best dev score; the *fixed target* is ``report.target`` of the sweep
  or, without one, 95% of the best dev score of the whole study;
* means over seeds carry a 95% Student-t interval; paired differences (same seed and
  settings, one factor changed) a 95% percentile bootstrap interval; the trend is the
  least-squares slope of the score against log2(batch size) over all runs of a loss, with
  its 95% t interval. One seed: intervals are "n/a".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import Interval, bootstrap_interval, first_reach, t_interval, trend
from .store import Store, StoreError

Arm = tuple[str, float, str]  # (loss variant, VRNS weight, lr rule)


# -- loading ---------------------------------------------------------------------------------
def load_runs(store_path: str | Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(meta, finished runs each with its ``curve``)."""
    with Store(store_path, create=False) as store:
        meta = store.all_meta()
        if "sweep_config" not in meta:
            raise StoreError(f"{store_path}: an empty store (no sweep was started in it)")
        runs = store.runs()
        for r in runs:
            r["curve"] = store.curve(r["id"])
        meta["_failures"] = json.dumps(store.failures())
    return meta, runs


# -- numbers ---------------------------------------------------------------------------------
def _iv(i: Interval | None) -> dict[str, Any] | None:
    return None if i is None else {"mean": i.mean, "lo": i.lo, "hi": i.hi, "n": i.n}


def arm_label(arm: Arm, vrns_weights: set[float], rules: set[str]) -> str:
    loss, w, rule = arm
    label = loss
    if w > 0:
        label += "+vrns" if len([x for x in vrns_weights if x > 0]) <= 1 else f"+vrns{w:g}"
    if len(rules) > 1:
        label += f" (lr {rule})"
    return label


def _reach(run: dict[str, Any], threshold: float) -> tuple[int, float] | None:
    c = run["curve"]
    return first_reach([p["examples"] for p in c], [p["seconds"] for p in c],
                       [p["dev"] for p in c], threshold)


def compute(meta: dict[str, str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of the report (see the module docstring for the definitions)."""
    sweep = json.loads(meta["sweep_config"])
    settings = sweep.get("report", {})
    metric = sweep["base"]["eval"]["metric"]
    vrns = {float(r["vrns_weight"]) for r in runs}
    rules = {r["lr_scaling"] for r in runs}
    order: dict[Arm, int] = {}
    for r in runs:
        order.setdefault((r["loss"], float(r["vrns_weight"]), r["lr_scaling"]), r["idx"])
    arms = sorted(order, key=lambda a: (list(sweep["grid"]["losses"]).index(a[0])
                                        if a[0] in sweep["grid"]["losses"] else 99, a[1], a[2]))
    labels = {a: arm_label(a, vrns, rules) for a in arms}
    batches = sorted({r["batch_size"] for r in runs})
    by: dict[tuple[Arm, int], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(((r["loss"], float(r["vrns_weight"]), r["lr_scaling"]),
                       r["batch_size"]), []).append(r)
    for group in by.values():
        group.sort(key=lambda r: r["seed"])
    # (arm, batch size, its runs) in table order: the rows and the curves walk the same cells
    cells = [(arm, b, by[(arm, b)]) for arm in arms for b in batches if by.get((arm, b))]
    best_all = max((r["best_dev"] for r in runs if r["best_dev"] is not None), default=None)
    target = settings.get("target")
    target_rule = "report.target of the sweep"
    if target is None and best_all is not None:
        target = 0.95 * best_all
        target_rule = "95% of the best dev score of the study"

    rows = []
    for arm, b, group in cells:
        row: dict[str, Any] = {"loss": labels[arm], "batch_size": b, "seeds": len(group),
                               "dev": _iv(t_interval([r["best_dev"] for r in group])),
                               "test": _iv(t_interval([r["test"] for r in group
                                                       if r["test"] is not None]))}
        for frac in (0.95, 0.99):
            hits = [_reach(r, frac * r["best_dev"]) for r in group
                    if r["best_dev"] is not None]
            key = f"{round(frac * 100)}"
            row[f"examples_to_{key}"] = _iv(t_interval([h[0] for h in hits if h]))
            row[f"seconds_to_{key}"] = _iv(t_interval([h[1] for h in hits if h]))
        if target is not None:
            hits = [_reach(r, target) for r in group]
            row["target_reached"] = sum(h is not None for h in hits)
            row["examples_to_target"] = _iv(t_interval([h[0] for h in hits if h]))
            row["seconds_to_target"] = _iv(t_interval([h[1] for h in hits if h]))
        row["throughput"] = _iv(t_interval([r["throughput"] for r in group]))
        row["peak_memory_mb"] = _iv(t_interval([r["peak_memory_mb"] for r in group
                                                if r["peak_memory_mb"] is not None]))
        row["memory_kind"] = group[0]["memory_kind"]
        row["train_seconds"] = _iv(t_interval([r["train_seconds"] for r in group]))
        rows.append(row)

    trends = []
    for arm in arms:
        members = [r for (a, _), g in by.items() if a == arm for r in g]
        entry: dict[str, Any] = {"loss": labels[arm]}
        for split, key in (("dev", "best_dev"), ("test", "test")):
            pts = [(r["batch_size"], r[key]) for r in members if r[key] is not None]
            t = trend([p[0] for p in pts], [p[1] for p in pts]) if pts else None
            entry[split] = None if t is None else dict(t.__dict__)
        trends.append(entry)

    resamples = int(settings.get("bootstrap_resamples", 9999))
    seed = int(settings.get("seed", 0))
    diffs = []

    def paired(name: str, a: Arm, b: Arm) -> None:
        for bs in batches:
            ga = {r["seed"]: r for r in by.get((a, bs), [])}
            gb = {r["seed"]: r for r in by.get((b, bs), [])}
            seeds = sorted(set(ga) & set(gb))
            if not seeds:
                continue
            entry: dict[str, Any] = {"comparison": name, "batch_size": bs, "pairs": len(seeds)}
            for split, key in (("dev", "best_dev"), ("test", "test")):
                d = [ga[s][key] - gb[s][key] for s in seeds
                     if ga[s][key] is not None and gb[s][key] is not None]
                entry[split] = _iv(bootstrap_interval(d, resamples=resamples, seed=seed))
            diffs.append(entry)

    compare = settings.get("compare")
    if compare is None:
        compare = [("weince", "infonce")]
    for a_name, b_name in compare:
        for w in sorted(vrns):
            for rule in sorted(rules):
                a, b = (a_name, w, rule), (b_name, w, rule)
                if a in order and b in order:
                    paired(f"{labels[a]} − {labels[b]}", a, b)
    for arm in arms:
        loss, w, rule = arm
        if w > 0 and (loss, 0.0, rule) in order:
            paired(f"{labels[arm]} − {labels[(loss, 0.0, rule)]}", arm, (loss, 0.0, rule))

    curves = []
    for arm, b, group in cells:
        n = min(len(r["curve"]) for r in group)
        points = []
        for i in range(n):
            devs = [r["curve"][i]["dev"] for r in group if r["curve"][i]["dev"] is not None]
            secs = [r["curve"][i]["seconds"] for r in group]
            if not devs:  # a NaN score (a collapsed encoder) at this point in every seed
                continue
            points.append({"examples": group[0]["curve"][i]["examples"],
                           "seconds": sum(secs) / len(secs),
                           "dev": sum(devs) / len(devs), "lo": min(devs), "hi": max(devs)})
        curves.append({"loss": labels[arm], "batch_size": b, "points": points})

    failures: dict[tuple[str, int], int] = {}
    for f in json.loads(meta.get("_failures", "[]")):
        arm = (f["loss"], float(f["vrns_weight"]), f["lr_scaling"])
        key = (labels.get(arm) or arm_label(arm, vrns, rules), f["batch_size"])
        failures[key] = failures.get(key, 0) + 1
    return {"sweep": sweep.get("name", meta.get("sweep_name")), "metric": metric,
            "failures": [{"loss": k[0], "batch_size": k[1], "attempts": v}
                         for k, v in sorted(failures.items())],
            "store": {"sweep_hash": meta.get("sweep_hash"),
                      "package_version": meta.get("package_version"),
                      "created_at": meta.get("created_at")},
            "runs": len(runs), "losses": [labels[a] for a in arms],
            "batch_sizes": batches, "target": target, "target_rule": target_rule,
            "rows": rows, "trends": trends, "differences": diffs, "curves": curves}


# -- formatting ------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}" if digits == 0 else f"{x:.{digits}f}"


def fmt_iv(iv: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean [lo, hi]``; ``mean [n/a]`` without an interval; ``n/a`` without values."""
    if iv is None:
        return "n/a"
    ci = "n/a" if iv["lo"] is None else f"{fmt(iv['lo'], digits)}, {fmt(iv['hi'], digits)}"
    return f"{fmt(iv['mean'], digits)} [{ci}]"


def fmt_trend(t: dict[str, Any] | None) -> str:
    if t is None:
        return "n/a"
    ci = "n/a" if t["lo"] is None else f"{t['lo']:+.2f}, {t['hi']:+.2f}"
    return f"{t['slope']:+.2f} [{ci}] (r = {t['r']:.2f}, n = {t['n']})"


def tables(data: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(anchor, title, header, rows) of every table, text not yet escaped."""
    m = data["metric"]
    out = []
    out.append(("quality", "Final quality per loss and batch size (mean [95% CI] over seeds)",
                ["loss", "batch", "seeds", f"dev {m}", f"test {m}",
                 "examples to 95% of best dev"],
                [[r["loss"], str(r["batch_size"]), str(r["seeds"]), fmt_iv(r["dev"]),
                  fmt_iv(r["test"]), fmt_iv(r["examples_to_95"], 0)] for r in data["rows"]]))
    target = "n/a" if data["target"] is None else f"{data['target']:.2f}"
    out.append(("convergence", "Convergence speed (mean [95% CI] over seeds)",
                ["loss", "batch", "examples to 95%", "examples to 99%", "seconds to 95%",
                 "seconds to 99%", f"reached {target}", f"examples to {target}",
                 f"seconds to {target}"],
                [[r["loss"], str(r["batch_size"]), fmt_iv(r["examples_to_95"], 0),
                  fmt_iv(r["examples_to_99"], 0), fmt_iv(r["seconds_to_95"], 1),
                  fmt_iv(r["seconds_to_99"], 1),
                  f"{r.get('target_reached', 0)}/{r['seeds']}",
                  fmt_iv(r.get("examples_to_target"), 0), fmt_iv(r.get("seconds_to_target"), 1)]
                 for r in data["rows"]]))
    out.append(("cost", "Throughput and peak memory (mean [95% CI] over seeds)",
                ["loss", "batch", "pairs / s", "peak memory (MiB)", "memory measure",
                 "train seconds"],
                [[r["loss"], str(r["batch_size"]), fmt_iv(r["throughput"], 0),
                  fmt_iv(r["peak_memory_mb"], 0), str(r["memory_kind"]),
                  fmt_iv(r["train_seconds"], 1)] for r in data["rows"]]))
    out.append(("trend", f"Trend: {m} per doubling of the batch size (slope vs log2 B "
                         "[95% CI])",
                ["loss", "dev slope", "test slope"],
                [[t["loss"], fmt_trend(t["dev"]), fmt_trend(t["test"])]
                 for t in data["trends"]]))
    out.append(("differences", "Paired differences over seeds (mean [95% bootstrap CI])",
                ["comparison", "batch", "pairs", f"dev {m}", f"test {m}"],
                [[d["comparison"], str(d["batch_size"]), str(d["pairs"]), fmt_iv(d["dev"]),
                  fmt_iv(d["test"])] for d in data["differences"]]))
    return out


def _notes(data: dict[str, Any]) -> list[str]:
    target = "n/a" if data["target"] is None else f"{data['target']:.2f}"
    return [
        f"Sweep {data['sweep']}: {data['runs']} finished runs; losses "
        f"{', '.join(data['losses'])}; batch sizes "
        f"{', '.join(str(b) for b in data['batch_sizes'])}.",
        "Dev: the dev score of each run's selected checkpoint (its best dev point); test: "
        "that checkpoint's test score.",
        "Examples / seconds to X%: the first evaluation point whose dev score reaches X% of "
        f"the run's own best dev score. Fixed target: {target} ({data['target_rule']}); "
        "means over the seeds that reached it.",
        "Intervals: 95% Student-t over seeds; paired differences: 95% percentile bootstrap "
        "over seeds; trend: least-squares slope against log2(batch size) over every run, 95% "
        "t interval. n/a: too few seeds or points.",
        "Seconds are training seconds (evaluation excluded); peak memory is CUDA's peak "
        "allocation on a GPU, else the peak resident set of the process during the run, "
        "which includes the process's baseline and heap kept from earlier runs (read CPU "
        "differences between batch sizes as rough).",
    ] + (["Diverged (NaN / Inf, not in the tables): " + "; ".join(
        f"{f['loss']} batch {f['batch_size']} ({f['attempts']} attempts)"
        for f in data.get("failures", []))] if data.get("failures") else [])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict[str, Any], plots: dict[str, str]) -> str:
    """Markdown; ``plots`` maps a plot name to its path relative to the report."""
    lines = [f"# Batch-size study: {data['sweep']}", ""]
    lines += [f"- {n}" for n in _notes(data)] + [""]
    titles = dict(_PLOT_TITLES)
    for anchor, title, header, rows in tables(data):
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        if not rows:
            lines.append("_(no data)_")
        lines.append("")
        for name in _PLOTS_AFTER.get(anchor, []):
            if name in plots:
                lines += [f"![{titles[name]}]({plots[name]})", ""]
    return "\n".join(lines)


def render_html(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    """One self-contained HTML page; every text taken from the data is escaped."""
    e = html.escape
    titles = dict(_PLOT_TITLES)
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>Batch-size study: {e(str(data['sweep']))}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Batch-size study: {e(str(data['sweep']))}</h1>", "<ul>"]
    parts += [f"<li>{e(n)}</li>" for n in _notes(data)]
    parts.append("</ul>")
    for anchor, title, header, rows in tables(data):
        parts.append(f"<h2 id='{e(anchor)}'>{e(title)}</h2>")
        if not rows:
            parts.append("<p><em>(no data)</em></p>")
        else:
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header)
                         + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                      for row in rows]
            parts.append("</tbody></table>")
        for name in _PLOTS_AFTER.get(anchor, []):
            if name in plots:
                b64 = base64.b64encode(plots[name]).decode("ascii")
                parts.append(f"<figure><img alt='{e(titles[name])}' "
                             f"src='data:image/png;base64,{b64}'><figcaption>"
                             f"{e(titles[name])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- plots -----------------------------------------------------------------------------------
_PLOT_TITLES = [
    ("curves_examples", "Dev score vs examples seen (mean over seeds, band: min-max)"),
    ("curves_seconds", "Dev score vs training seconds (mean over seeds, band: min-max)"),
    ("quality", "Final quality vs batch size (mean, 95% CI)"),
    ("cost", "Throughput and peak memory vs batch size"),
]
_PLOTS_AFTER = {"quality": ["curves_examples", "curves_seconds", "quality"],
                "cost": ["cost"]}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def make_plots(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every plot (matplotlib's object API: no global pyplot state)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    out: dict[str, bytes] = {}
    losses, batches, m = data["losses"], data["batch_sizes"], data["metric"]
    if not losses:
        return out
    cmap = colormaps["viridis"]
    color = {b: cmap(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    for name, key in (("curves_examples", "examples"), ("curves_seconds", "seconds")):
        rows, cols = _grid(len(losses))
        fig = Figure(figsize=(5 * cols, 3.6 * rows))
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, loss in zip(axes, losses, strict=False):
            for c in data["curves"]:
                if c["loss"] != loss:
                    continue
                pts = [p for p in c["points"] if key == "examples" or p["seconds"] > 0]
                if not pts:
                    continue
                x = [p[key] for p in pts]
                ax.plot(x, [p["dev"] for p in pts], color=color[c["batch_size"]],
                        label=f"B={c['batch_size']}", marker=".")
                ax.fill_between(x, [p["lo"] for p in pts], [p["hi"] for p in pts],
                                color=color[c["batch_size"]], alpha=0.2, linewidth=0)
            ax.set_title(loss)
            ax.set_xlabel("examples seen" if key == "examples" else "training seconds")
            if key == "seconds":
                ax.set_xscale("log")
            ax.set_ylabel(f"dev {m}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(losses):]:
            ax.set_visible(False)
        out[name] = _png(fig)

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, split in zip(axes, ("dev", "test"), strict=True):
        for loss in losses:
            rows_l = [r for r in data["rows"] if r["loss"] == loss and r[split] is not None]
            if not rows_l:
                continue
            x = [r["batch_size"] for r in rows_l]
            y = [r[split]["mean"] for r in rows_l]
            err = [[r[split]["mean"] - r[split]["lo"] if r[split]["lo"] is not None else 0
                    for r in rows_l],
                   [r[split]["hi"] - r[split]["mean"] if r[split]["hi"] is not None else 0
                    for r in rows_l]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{split} {m}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["quality"] = _png(fig)

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("throughput", "peak_memory_mb"),
                              ("pairs / s (training)", "peak memory (MiB)"), strict=True):
        for loss in losses:
            rows_l = [r for r in data["rows"] if r["loss"] == loss and r[key] is not None]
            if rows_l:
                ax.plot([r["batch_size"] for r in rows_l], [r[key]["mean"] for r in rows_l],
                        marker="o", label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out["cost"] = _png(fig)
    return out


# -- all of it -------------------------------------------------------------------------------
def write_report(store_path: str | Path, out_dir: str | Path | None = None,
                 *, plots: bool = True) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``plots/*.png``), ``report.html`` and ``report.json`` into
    ``out_dir`` (default: ``<store stem>-report`` beside the store); returns (md, html)."""
    from ..training.checkpoint import atomic_write_text

    store_path = Path(store_path)
    out = Path(out_dir) if out_dir is not None else \
        store_path.parent / f"{store_path.stem}-report"
    meta, runs = load_runs(store_path)
    data = compute(meta, runs)
    images = make_plots(data) if plots and runs else {}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    rel = {}
    for name, png in images.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
        rel[name] = f"plots/{name}.png"
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(out / "report.json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(md, render_markdown(data, rel) + "\n")
    atomic_write_text(page, render_html(data, images) + "\n")
    return md, page


def summary_rows(data: dict[str, Any]) -> Sequence[Sequence[str]]:
    """The quality table's rows (for printing)."""
    return tables(data)[0][3]
