"""The report's plots, as PNG bytes, from the computed numbers (matplotlib's object API: no
global pyplot state)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

PLOT_TITLES = [
    ("curves_examples", "Dev score vs examples seen (tuned lr; mean over seeds, band: min-max)"),
    ("curves_steps", "Dev score vs optimiser steps (tuned lr; mean over seeds)"),
    ("curves_seconds", "Dev score vs training seconds (tuned lr; mean over seeds)"),
    ("quality", "Final quality vs batch size (tuned lr; mean, 95% t CI)"),
    ("frontier", "Steps vs examples to each dev target, with the fitted hyperbola and B_crit"),
    ("lr", "Dev score vs lr multiplier, per batch size (whole-batch softmax)"),
    ("blocks", "Quality vs softmax block N, per batch size B"),
    ("mechanisms", "Probe-set mechanisms at the last point vs batch size (mean over seeds)"),
    ("mechanism_curves", "Negative-similarity variance and B_simple vs examples seen"),
    ("cost", "Throughput and peak memory vs batch size"),
]
PLOTS_AFTER = {"quality": ["curves_examples", "curves_steps", "curves_seconds", "quality"],
               "critical": ["frontier"], "lr": ["lr"], "blocks": ["blocks"],
               "mechanisms": ["mechanisms", "mechanism_curves"], "cost": ["cost"]}


#: PNG text chunks: none (matplotlib writes its version as "Software" by default), so the
#: bytes depend on the figure alone and a report reproduces byte for byte.
PNG_METADATA: dict[str, str | None] = {"Software": None}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata=PNG_METADATA)
    return buf.getvalue()


def _panels(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(3, max(1, n))
    rows = math.ceil(max(1, n) / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colors(batches: list[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {b: cmap(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}


def _finish(ax: Any, xlabel: str, ylabel: str, *, logx: bool = False) -> None:
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def curves(data: dict[str, Any], key: str) -> bytes:
    def draw(ax: Any, loss: str, color: dict[int, Any]) -> None:
        for c in data["curves"]:
            pts = [p for p in c["points"] if c["loss"] == loss and p[key] > 0]
            if not pts:
                continue
            x = [p[key] for p in pts]
            ax.plot(x, [p["dev"] for p in pts], color=color[c["batch_size"]], marker=".",
                    label=f"B={c['batch_size']}")
            if key == "examples":
                ax.fill_between(x, [p["lo"] for p in pts], [p["hi"] for p in pts],
                                color=color[c["batch_size"]], alpha=0.2, linewidth=0)

    xlabel = {"examples": "examples seen", "steps": "optimiser steps",
              "seconds": "training seconds"}[key]
    return per_loss(data, draw, xlabel, f"dev {data['metric']}")


def quality(data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, split in zip(fig.subplots(1, 2), ("dev", "test"), strict=True):
        for loss in data["losses"]:
            rows = [r for r in data["rows"] if r["loss"] == loss and r[split] is not None]
            if not rows:
                continue
            y = np.array([r[split]["mean"] for r in rows])
            lo = np.array([r[split]["lo"] if r[split]["lo"] is not None else r[split]["mean"]
                           for r in rows])
            hi = np.array([r[split]["hi"] if r[split]["hi"] is not None else r[split]["mean"]
                           for r in rows])
            ax.errorbar([r["batch_size"] for r in rows], y, yerr=[y - lo, hi - y], marker="o",
                        capsize=3, label=loss)
        _finish(ax, "batch size", f"{split} {data['metric']}", logx=True)
    return _png(fig)


def fit_marks(c: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Whether the frontier plot draws a target's pooled hyperbola, its B_crit star, and the
    curve dashed: the curve where a fit measures something (not where every run reached the
    target only at the budget's end), the star only where the table gives B_crit a value (the
    seeds' fits), dashed where the table gives only a bound (B_crit beyond the batch sizes
    run: the curve's bend is extrapolated)."""
    curve = bool(c.get("pooled")) and not c["only_at_last_point"]
    return curve, c["finding"] == "b_crit", curve and c["finding"] in ("above", "below")


def frontier(data: dict[str, Any]) -> bytes:
    """S against E = B S per loss: each target's measured medians and its pooled fit."""
    losses = data["losses"]
    fig, axes = _panels(len(losses))
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cmap = colormaps["plasma"]
    names = [t["name"] for t in data["targets"]]
    for ax, loss in zip(axes, losses, strict=True):
        for c in data["critical"]:
            if c["loss"] != loss:
                continue
            col = cmap(names.index(c["target"]) / max(1, len(names)))
            pts = [(p["examples"]["median"], p["steps"]["median"], p["batch_size"])
                   for p in c["per_batch"] if p["steps"]]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=col,
                           label=f"{c['target']} ({c['value']:.1f})")
                for e, s, b in pts:
                    ax.annotate(str(b), (e, s), fontsize=6, alpha=0.7)
            h = c.get("pooled")
            curve, star, dashed = fit_marks(c)
            if curve and pts:
                bs = np.geomspace(min(p[2] for p in pts) / 2, max(p[2] for p in pts) * 2, 60)
                s = h["s_min"] + h["e_min"] / bs
                ax.plot(bs * s, s, color=col, alpha=0.8, linestyle="--" if dashed else "-")
            if star and pts:
                ax.plot([h["b_crit"] * 2 * h["s_min"]], [2 * h["s_min"]], marker="*",
                        color=col, markersize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # within about a decade matplotlib labels the minor ticks too, and they overlap:
        # label 1, 2, 5 x 10^k instead
        lo, hi = ax.get_xlim()
        if 0 < lo < hi < lo * 100:
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{loss} (star: B_crit; dashed: a bound only)")
        _finish(ax, "examples to target (E)", "steps to target (S)")
    return _png(fig)


def per_loss(data: dict[str, Any], draw: Any, xlabel: str, ylabel: str) -> bytes:
    """One panel per loss: ``draw(ax, loss, colour of each batch size)``, log2 x axis."""
    color = _colors(data["batch_sizes"])
    fig, axes = _panels(len(data["losses"]))
    for ax, loss in zip(axes, data["losses"], strict=True):
        draw(ax, loss, color)
        ax.set_title(loss)
        _finish(ax, xlabel, ylabel, logx=True)
    return _png(fig)


def lr_plot(data: dict[str, Any]) -> bytes:
    def draw(ax: Any, loss: str, color: dict[int, Any]) -> None:
        for r in data["lr"]:
            if r["loss"] != loss or r["softmax_batch"] != r["batch_size"]:
                continue
            pts = [(x["multiplier"], x["dev"]["mean"]) for x in r["multipliers"] if x["dev"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    color=color[r["batch_size"]], label=f"B={r['batch_size']}")

    return per_loss(data, draw, "lr multiplier", f"dev {data['metric']}")


def blocks(data: dict[str, Any]) -> bytes:
    def draw(ax: Any, loss: str, color: dict[int, Any]) -> None:
        for b in data["batch_sizes"]:
            rows = [r for r in data["blocks"] if r["loss"] == loss and r["batch_size"] == b
                    and r["test"] is not None]
            if len(rows) > 1:
                ax.plot([r["softmax_batch"] for r in rows], [r["test"]["mean"] for r in rows],
                        marker="o", color=color[b], label=f"B={b}")

    return per_loss(data, draw, "softmax block N (pairs)", f"test {data['metric']}")


MECHANISM_PANELS = [("neg_cos_mean", "negative cosine, mean"),
                    ("neg_cos_var", "negative cosine, variance"),
                    ("hardest_neg_cos_mean", "hardest negative cosine"),
                    ("alignment", "alignment"), ("uniformity", "uniformity"),
                    ("weince_mean_lambda", "WEINCE mean lambda"),
                    ("temperature", "learned temperature"), ("b_simple", "B_simple")]


def mechanisms(data: dict[str, Any]) -> bytes | None:
    def value(r: dict[str, Any], key: str) -> float | None:
        x = r[key]
        return None if x is None else x.get("mean", x.get("value"))

    panels = [(k, t) for k, t in MECHANISM_PANELS
              if any(value(r, k) is not None for r in data["mechanisms"])]
    if not panels:
        return None
    fig, axes = _panels(len(panels), 4.2, 3.2)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for loss in data["losses"]:
            rows = [r for r in data["mechanisms"] if r["loss"] == loss
                    and value(r, key) is not None]
            ax.plot([r["batch_size"] for r in rows], [value(r, key) for r in rows],
                    marker="o", label=loss)
        ax.set_title(title)
        _finish(ax, "batch size", title, logx=True)
        if key == "b_simple":
            ax.set_yscale("log")
    return _png(fig)


def mechanism_curves(data: dict[str, Any]) -> bytes | None:
    keys = [k for k in ("neg_cos_var", "b_simple")
            if any(p[k] is not None for c in data["mechanism_curves"] for p in c["points"])]
    if not keys:
        return None
    losses = data["losses"]
    color = _colors(data["batch_sizes"])
    fig, axes = _panels(len(keys) * len(losses), 4.2, 3.2)
    for i, (key, loss) in enumerate((k, x) for k in keys for x in losses):
        ax = axes[i]
        for c in data["mechanism_curves"]:
            pts = [p for p in c["points"] if c["loss"] == loss and p[key] is not None
                   and p["examples"] > 0]
            if pts:
                ax.plot([p["examples"] for p in pts], [p[key] for p in pts], marker=".",
                        color=color[c["batch_size"]], label=f"B={c['batch_size']}")
        ax.set_title(f"{loss}: {dict(MECHANISM_PANELS)[key]}")
        _finish(ax, "examples seen", dict(MECHANISM_PANELS)[key], logx=True)
        if key == "b_simple":
            ax.set_yscale("log")
    return _png(fig)


def cost(data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("throughput", "peak_memory_mb"),
                              ("pairs / s (training)", "peak memory (MiB)"), strict=True):
        for loss in data["losses"]:
            rows = [r for r in data["rows"] if r["loss"] == loss and r[key] is not None]
            if rows:
                ax.plot([r["batch_size"] for r in rows], [r[key]["mean"] for r in rows],
                        marker="o", label=loss)
        _finish(ax, "batch size", label, logx=True)
    return _png(fig)


def make_plots(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every plot the data can fill, drawn under matplotlib's default style (a
    user's matplotlibrc or style changes nothing: the same data give the same bytes)."""
    if not data["losses"]:
        return {}
    from matplotlib import style

    with style.context("default"):
        return _draw_all(data)


def _draw_all(data: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes | None] = {
        "curves_examples": curves(data, "examples"), "curves_steps": curves(data, "steps"),
        "curves_seconds": curves(data, "seconds"), "quality": quality(data),
        "frontier": frontier(data) if data["critical"] else None,
        "lr": lr_plot(data) if any(len(r["multipliers"]) > 1 for r in data["lr"]) else None,
        "blocks": blocks(data) if data["negatives"] else None,
        "mechanisms": mechanisms(data), "mechanism_curves": mechanism_curves(data),
        "cost": cost(data)}
    return {k: v for k, v in out.items() if v is not None}
