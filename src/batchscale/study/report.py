"""The study report: what the batch size does to convergence and quality, from a store.

:func:`~batchscale.study.analysis.compute` turns the store's finished runs into numbers (a
JSON-able dict, written as ``report.json``; the definitions are in its module docstring);
:func:`render_markdown` and :func:`render_html` lay the same numbers out, the Answer first
(:mod:`batchscale.study.answer`), then the tables and plots each sentence links to; the HTML
is self-contained (plots embedded as PNG data, every text from the data escaped).
:func:`write_report` does all of it.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from ..training.checkpoint import atomic_write_bytes, atomic_write_text
from .analysis import compute
from .formatting import fmt, fmt_iv, fmt_pd, fmt_spread, percent
from .plots import PLOT_TITLES, PLOTS_AFTER, make_plots
from .store import Store, StoreError

__all__ = ["answer_quote", "compute", "load_runs", "render_html", "render_markdown",
           "shipped_answer_quote", "tables", "write_report"]


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


# -- tables ----------------------------------------------------------------------------------
Table = tuple[str, str, list[str], list[list[str]]]


def _lr_cell(x: dict[str, Any], chosen: float | None) -> str:
    """One multiplier's dev score in the lr table; without a finished run, why."""
    if x["dev"] is None:
        return "diverged" if x.get("diverged") else "not run"
    return fmt_iv(x["dev"]) + (" *" if x["multiplier"] == chosen else "")


def _block(n: int, b: int) -> str:
    return "B" if n == b else str(n)


def _share(split: dict[str, Any]) -> str:
    if split["negatives_share"] is None and split["total"] is not None:
        return "none claimed: total not resolved"
    return percent(split["negatives_share"])


def _target_cells(r: dict[str, Any]) -> list[str]:
    return [f"{t['reached']}/{r['seeds']}: {fmt_spread(t['steps'])} steps, "
            f"{fmt_spread(t['examples'])} ex." for t in r["to_target"]]


def _critical_cells(c: dict[str, Any]) -> list[str]:
    """B_crit, S_min, E_min as the Answer states them (by the target's ``finding``): the fit
    inside the measured range, a bound outside it, none where every run reached the target
    only at the budget's end (report.json keeps the raw fits)."""
    b, s_min, e_min, bound = c["b_crit"], c["s_min"], c["e_min"], c["bound"]
    if c["finding"] == "last_point":
        return ["not measured (last point)", "-", "-"]
    if c["finding"] == "above":
        return [f"> {bound['b_crit_above']}", f"< {fmt(bound['s_min_below'], 1)}",
                fmt_iv(e_min, 0)]
    if c["finding"] == "below":
        return [f"< {bound['b_crit_below']}", fmt_iv(s_min, 1),
                f"< {fmt(bound['e_min_below'], 0)}"]
    return [fmt_iv(b, 0), fmt_iv(s_min, 1), fmt_iv(e_min, 0)]


def tables(data: dict[str, Any]) -> list[Table]:
    """(anchor, title, header, rows) of every table, text not yet escaped."""
    m = data["metric"]
    names = [t["name"] for t in data["targets"]]
    out: list[Table] = []
    out.append(("quality", "Final quality per loss and batch size (tuned lr, whole-batch "
                           "softmax; mean [95% t CI] over seeds)",
                ["loss", "batch", "seeds", "lr x", f"dev {m}", f"test {m}", "steps",
                 "examples"],
                [[r["loss"], str(r["batch_size"]), str(r["seeds"]), f"{r['lr_multiplier']:g}",
                  fmt_iv(r["dev"]), fmt_iv(r["test"]), fmt_spread(r["steps"]),
                  fmt_spread(r["examples"])] for r in data["rows"]]))
    out.append(("convergence", "Convergence: steps and examples to each dev target "
                               "(seeds reached: median [min, max])",
                ["loss", "batch", *[f"to {n}" for n in names]],
                [[r["loss"], str(r["batch_size"]), *_target_cells(r)] for r in data["rows"]]))
    out.append(("critical", "Critical batch size per loss and target (McCandlish et al. "
                            "2018: S(B) = S_min + E_min / B)",
                ["loss", "target", "dev", "seeds fitted", "B_crit", "S_min (steps)",
                 "E_min (examples)", "B_simple at target", "steps by batch (median)"],
                [[c["loss"], c["target"], fmt(c["value"]), str(c["n"]), *_critical_cells(c),
                  fmt((c["b_simple"] or {}).get("value"), 0),
                  ", ".join(f"{p['batch_size']}: "
                            + (fmt(p["steps"]["median"], 0) if p["steps"] else "-")
                            for p in c["per_batch"])]
                 for c in data["critical"]]))
    out.append(("lr", "Learning rate per setting: dev score per lr multiplier (mean [95% t "
                      "CI]); * the chosen one",
                ["loss", "batch", "N", *[f"x{m_['multiplier']:g}" for m_ in
                                          (data["lr"][0]["multipliers"] if data["lr"] else [])]],
                [[r["loss"], str(r["batch_size"]), _block(r["softmax_batch"], r["batch_size"]),
                  *[_lr_cell(x, r["chosen"]) for x in r["multipliers"]]] for r in data["lr"]]))
    out.append(("blocks", "Negatives vs batch: quality on the (B, N) grid (N: pairs per "
                          "softmax block; tuned lr)",
                ["loss", "batch B", "block N", "seeds", "lr x", f"dev {m}", f"test {m}"],
                [[b["loss"], str(b["batch_size"]), _block(b["softmax_batch"], b["batch_size"]),
                  str(b["seeds"]), f"{b['lr_multiplier']:g}", fmt_iv(b["dev"]),
                  fmt_iv(b["test"])] for b in data["blocks"]]))
    out.append(("negatives", "The batch-size effect split: optimisation batch vs negatives "
                             "(test; paired by seed)",
                ["loss", "B_small -> B_large", "total", "optimisation batch (N = B_small)",
                 "negatives (at B_large)", "negatives' share"],
                [[n["loss"], f"{n['b_small']} -> {n['b_large']}", fmt_pd(n["test"]["total"]),
                  fmt_pd(n["test"]["optimisation"]), fmt_pd(n["test"]["negatives"]),
                  _share(n["test"])] for n in data["negatives"]]))
    out.append(("trend", f"Trend: {m} per doubling of the batch size (per-seed slopes on "
                         "log2 B, t interval over seeds; curvature of per-seed quadratics)",
                ["loss", "dev slope", "test slope", "test curvature"],
                [[t["loss"], fmt_pd((t["dev"] or {}).get("slope")),
                  fmt_pd((t["test"] or {}).get("slope")),
                  fmt_pd((t["test"] or {}).get("curvature"), 3)] for t in data["trends"]]
                + [[f"interaction: {i['comparison']}",
                    fmt_pd(i["dev"], p_holm=i["dev_p_holm"]),
                    fmt_pd(i["test"], p_holm=i["test_p_holm"]), ""]
                   for i in data["interactions"]]))
    out.append(("differences", "Paired differences over seeds (mean [95% paired-t CI]; p: "
                               "paired t, Holm over the table; exact: sign-flip)",
                ["comparison", "batch", "pairs", f"dev {m}", f"test {m}"],
                [[d["comparison"], str(d["batch_size"]), str(d["pairs"]),
                  fmt_pd(d["dev"], p_holm=d["dev_p_holm"]),
                  fmt_pd(d["test"], p_holm=d["test_p_holm"])] for d in data["differences"]]))
    out.append(_reach_table(data))
    out.append(("mechanisms", "Mechanisms at the last point, on a fixed probe set of "
                              "training pairs (mean [95% t CI] over seeds)",
                ["loss", "batch", "neg cos mean", "neg cos var", "hardest neg cos",
                 "alignment", "uniformity", "WEINCE lambda", "temperature", "B_simple"],
                [[r["loss"], str(r["batch_size"]), fmt_iv(r["neg_cos_mean"], 4),
                  fmt_iv(r["neg_cos_var"], 4), fmt_iv(r["hardest_neg_cos_mean"], 3),
                  fmt_iv(r["alignment"], 3), fmt_iv(r["uniformity"], 3),
                  fmt_iv(r["weince_mean_lambda"], 3), fmt_iv(r["temperature"], 4),
                  fmt((r["b_simple"] or {}).get("value"), 0)] for r in data["mechanisms"]]))
    out.append(("cost", "Throughput and peak memory (mean [95% t CI] over seeds)",
                ["loss", "batch", "pairs / s", "peak memory (MiB)", "memory measure",
                 "train seconds"],
                [[r["loss"], str(r["batch_size"]), fmt_iv(r["throughput"], 0),
                  fmt_iv(r["peak_memory_mb"], 0), str(r["memory_kind"]),
                  fmt_iv(r["train_seconds"], 1)] for r in data["rows"]]))
    return out


def _pd_cell(entry: dict[str, Any] | None, split: str) -> str:
    if entry is None:
        return "n/a"
    return fmt_pd(entry[split], p_holm=entry[f"{split}_p_holm"])


def _reach_table(data: dict[str, Any]) -> Table:
    """A at each batch size B against B's reference at its largest batch (and at B)."""
    m = data["metric"]
    return ("reach", "Reaching the large batch: A at batch B against the reference at its "
                     "largest batch B_large and at B (mean [95% paired-t CI] over seeds; p: "
                     "paired t, Holm over each column; exact: sign-flip)",
            ["comparison", "batch B", "B_large", "pairs", f"dev {m}: A@B − ref@B_large",
             f"test {m}: A@B − ref@B_large", "pairs at B", f"dev {m}: A@B − ref@B",
             f"test {m}: A@B − ref@B"],
            [[r["comparison"], str(r["batch_size"]), str(r["reference_batch_size"]),
              str(r["large"]["pairs"]), _pd_cell(r["large"], "dev"),
              _pd_cell(r["large"], "test"), str((r["same"] or {}).get("pairs", 0)),
              _pd_cell(r["same"], "dev"), _pd_cell(r["same"], "test")]
             for r in data["reach"]])


def _data_note(d: dict[str, Any]) -> str:
    """The training set's size and what decontamination dropped (runs of older versions
    recorded neither)."""
    if d.get("training_pairs") is None:
        return ""
    return (f" Training pairs per run {fmt_spread(d['training_pairs'], 0)}, after dropping "
            f"{fmt_spread(d['contaminated'], 0)} that share a text with the dev / test sets.")


def _notes(data: dict[str, Any]) -> list[str]:
    d = data["design"]
    notes = [
        f"Sweep {data['sweep']}: {data['runs']} finished runs, {data['tuned_runs']} at the "
        f"tuned lr; losses {', '.join(data['losses'])}; batch sizes "
        f"{', '.join(str(b) for b in data['batch_sizes'])}; seeds "
        f"{', '.join(str(s) for s in d['seeds'] or [])}.",
        f"Model {d['model']}; training data {d['data']}; budget {fmt(d['budget']['value'], 0)} "
        f"{d['budget']['kind']} per run (every step a whole batch); epochs seen "
        f"{fmt_spread(d['epochs_seen'], 2)}." + _data_note(d),
        f"Learning rate: {d['base_lr']} x rule {'/'.join(d['lr_scaling'] or [])} (reference "
        f"batch {d['reference_batch_size']}) x the multiplier with the best dev score among "
        f"{', '.join(f'{m:g}' for m in d['lr_multipliers'])} ({d['lr_tuning']}); the tables "
        "use the tuned lr. Test scores choose nothing.",
        "Dev: the score of each run's selected checkpoint (its best dev point); test: that "
        "checkpoint's test score. Targets: " + "; ".join(
            f"{t['name']} = {fmt(t['value'])} ({t['rule']})" for t in data["targets"]) + ".",
        "Intervals: 95% Student-t over seeds (n is the seed count: with 3 seeds a t interval "
        "is wide, and the exact sign-flip p cannot go below 0.25); paired differences pair "
        "runs of the same seed; counts (steps, examples) are median [min, max].",
        "B_simple: the gradient noise scale tr(Sigma)/|G|^2 (McCandlish et al. appendix A), "
        "from probe batches of the run's batch size with the negatives fixed: the noise of "
        "which anchors carry the gradient, not of the negatives; the ratio of the averaged "
        "tr(Sigma) and |G|^2 estimates over the seeds' (or runs') points. Far below B_simple "
        "the |G|^2 estimate is noise, so read small-batch values as rough.",
        "Seconds are training seconds (evaluation excluded); peak memory is CUDA's peak "
        "allocation on a GPU, else the process's peak resident set during the run (rough on "
        "a CPU).",
    ]
    if d["flagged"]:
        notes.append("Budget not met exactly: " + "; ".join(
            f"{f['loss']} B={f['batch_size']} seed {f['seed']}: "
            + ", ".join(f"{k} {v}" for k, v in f.items() if k in ("examples", "steps"))
            for f in d["flagged"]))
    else:
        notes.append("Every run met the budget exactly.")
    if data.get("failures"):
        notes.append("Diverged (NaN / Inf; scored -inf in the lr choice, not in the tables): "
                     + "; ".join(f"{f['loss']} B={f['batch_size']} N={f['softmax_batch']} "
                                 f"lr x{f['lr_multiplier']:g} ({f['attempts']} attempts)"
                                 for f in data["failures"]))
    return notes


# -- Markdown and HTML -----------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict[str, Any], plots: dict[str, str]) -> str:
    """Markdown; ``plots`` maps a plot name to its path relative to the report."""
    titles = dict(PLOT_TITLES)
    lines = [f"# Batch-size study: {data['sweep']}", "", "## Answer", ""]
    lines += [f"- {a['text']} [→](#{a['link']})" for a in data["answer"]]
    lines += ["", '<a id="design"></a>', "", "## Design", ""]
    lines += [f"- {n}" for n in _notes(data)] + [""]
    for anchor, title, header, rows in tables(data):
        lines += [f'<a id="{anchor}"></a>', "", f"## {title}", ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        if not rows:
            lines.append("_(no data)_")
        lines.append("")
        for name in PLOTS_AFTER.get(anchor, []):
            if name in plots:
                lines += [f"![{titles[name]}]({plots[name]})", ""]
    return "\n".join(lines)


def _html_text(text: str) -> str:
    """Escaped text with the Answer's **bold** kept."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def render_html(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    """One self-contained HTML page; every text taken from the data is escaped."""
    e = html.escape
    titles = dict(PLOT_TITLES)
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>Batch-size study: {e(str(data['sweep']))}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Batch-size study: {e(str(data['sweep']))}</h1>", "<h2 id='answer'>Answer</h2>",
             "<ul>"]
    parts += [f"<li>{_html_text(a['text'])} <a href='#{e(a['link'])}'>→</a></li>"
              for a in data["answer"]]
    parts += ["</ul>", "<h2 id='design'>Design</h2>", "<ul>"]
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
        for name in PLOTS_AFTER.get(anchor, []):
            if name in plots:
                b64 = base64.b64encode(plots[name]).decode("ascii")
                parts.append(f"<figure><img alt='{e(titles[name])}' "
                             f"src='data:image/png;base64,{b64}'><figcaption>"
                             f"{e(titles[name])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- all of it -------------------------------------------------------------------------------
#: The files of a report folder besides ``plots/``; each is a function of the store alone.
REPORT_FILES = ("report.md", "report.html", "report.json")


def default_out(store_path: Path) -> Path:
    return store_path.parent / f"{store_path.stem}-report"


def write_report(store_path: str | Path, out_dir: str | Path | None = None,
                 *, plots: bool = True) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``plots/*.png``), ``report.html`` and ``report.json`` into
    ``out_dir`` (default: ``<store stem>-report`` beside the store); returns (md, html).

    Every file is a function of the store alone (no timestamp, path or host of this call),
    written through a temporary and a rename; a plot of an earlier report that this one does
    not draw is removed, so the folder holds exactly this report."""
    store_path = Path(store_path)
    out = Path(out_dir) if out_dir is not None else default_out(store_path)
    meta, runs = load_runs(store_path)
    data = compute(meta, runs)
    images = make_plots(data) if plots and runs else {}
    rel = _write_plots(out / "plots", images)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(out / "report.json", report_json(data))
    atomic_write_text(md, render_markdown(data, rel) + "\n")
    atomic_write_text(page, render_html(data, images) + "\n")
    return md, page


def report_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


def _write_plots(folder: Path, images: dict[str, bytes]) -> dict[str, str]:
    """Each plot as ``folder/NAME.png`` (atomically); the report's other plot names removed.
    Returns NAME -> its path relative to the report."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in PLOT_TITLES:
        stale = folder / f"{name}.png"
        if name not in images and stale.exists():
            stale.unlink()
    for name, png in images.items():
        atomic_write_bytes(folder / f"{name}.png", png)
    return {name: f"plots/{name}.png" for name in images}


# -- the Answer as a README quote -------------------------------------------------------------
def answer_quote(data: dict[str, Any], link: str) -> str:
    """The Answer as a Markdown blockquote for a README: a first line naming and linking the
    report folder ``link`` (relative to the README), then each sentence, its arrow pointing at
    its table in ``link/report.md``. :func:`shipped_answer_quote` makes it from a shipped
    report; tests/test_readme_results.py checks every such quote in README.md against it."""
    link = link.rstrip("/")
    lines = [f"> **Answer** ([{link}]({link}/report.md); generated by `batchscale report "
             f"--answer`, not edited):", ">"]
    lines += [f"> - {a['text']} [→]({link}/report.md#{a['link']})" for a in data["answer"]]
    return "\n".join(lines)


def read_report_json(folder: str | Path) -> dict[str, Any]:
    """A report folder's ``report.json`` (StoreError naming the file when it is missing or
    not a report's JSON)."""
    path = Path(folder) / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise StoreError(f"{path}: cannot read the report's JSON ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("answer"), list):
        raise StoreError(f"{path}: not a report's JSON (no 'answer' list)")
    return data


def shipped_answer_quote(folder: str | Path, link: str | None = None) -> str:
    """The Answer of the report in ``folder`` as a README quote (``link`` default: the folder
    as given, in / form)."""
    return answer_quote(read_report_json(folder), link or Path(folder).as_posix())


def summary_rows(data: dict[str, Any]) -> list[list[str]]:
    """The quality table's rows (for printing)."""
    return tables(data)[0][3]

