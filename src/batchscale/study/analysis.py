"""The numbers of the study report, one function per section, from a store's runs.

Every section is computed from the *tuned* runs: for each setting (loss variant, VRNS weight,
lr rule, batch size B, softmax block N) the lr multiplier with the best dev score is kept
(:mod:`batchscale.study.tuning`), so batch sizes are compared each at its own best lr
(Shallue et al. 2018). Test scores never choose anything.

Definitions:

* a run's *dev* score is that of its selected checkpoint (the best dev point), its *test*
  score that checkpoint's test score;
* *targets*: dev scores every run is timed to: ``report.targets`` of the sweep, or 50%, 80%
  and 90% of the way from the mean dev score at the start to the best tuned setting's mean
  dev score; *steps (examples) to a target*: the first evaluation point at or above it;
* means over seeds carry a 95% Student-t interval; paired differences (same seed, one factor
  changed) a 95% paired-t interval, the paired t test's p and the exact sign-flip p, Holm-
  adjusted over each table; discrete counts (steps, examples) the median and the range;
* trends: per seed, the least-squares slope of the score on log2(B) (and a quadratic's
  curvature); their mean over seeds with a t interval (seeds are the unit);
* B_crit: McCandlish et al.'s hyperbola S(B) = S_min + E_min / B fitted per seed to the steps
  to a target, geometric means over seeds with t intervals on the log scale;
* B_simple: the gradient noise scale measured at each evaluation point (when the sweep
  measured it), taken at the point where each run first reaches the target;
* reach (``report.reach``, default sogclr against infonce): A at each of its batch sizes
  against B at B's largest batch size B_large (and at the same batch size), paired by seed,
  Holm-adjusted over the table per column;
* the share of the negatives: with a run at batch B_large split into softmax blocks of
  N = B_small, the batch-size effect B_small -> B_large splits into the optimisation batch
  (B_small -> B_large at N = B_small) and the negatives (N = B_small -> B_large at B_large).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import stats
from .answer import answer, excludes_zero
from .critical import CriticalBatch, critical_batch, doubling_gain, steps_to_target
from .tuning import choose, scores_by_setting

#: Fractions of the way from the start score to the best tuned score: the default targets.
TARGET_FRACTIONS = (0.5, 0.8, 0.9)
#: The probe-set quantities of each evaluation point, as stored (``point_metrics`` names).
MECHANISMS = {
    "neg_cos_mean": "geometry/neg_cos_mean",
    "neg_cos_var": "geometry/neg_cos_var",
    "hardest_neg_cos_mean": "geometry/hardest_neg_cos_mean",
    "alignment": "geometry/alignment",
    "uniformity": "geometry/uniformity",
    "weince_mean_lambda": "geometry/weince_mean_lambda",
    "temperature": "loss/temperature",
}
TRACE_SIGMA, GRAD_SQ = "noise_scale/trace_sigma", "noise_scale/grad_sq"
#: Batch sizes that must reach a target before its hyperbola is fitted: through two points
#: a hyperbola passes exactly, and its interval says nothing.
MIN_BATCH_SIZES = 3


@dataclass(frozen=True)
class Arm:
    """A loss variant as the report compares it: name, VRNS weight, lr rule."""

    loss: str
    vrns_weight: float
    lr_scaling: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> Arm:
        return cls(row["loss"], float(row["vrns_weight"]), row["lr_scaling"])


# -- the runs, grouped ----------------------------------------------------------------------
class Runs:
    """The finished runs of a store, grouped by arm, batch size, block and seed, with the lr
    multiplier chosen for each setting."""

    def __init__(self, sweep: dict[str, Any], runs: list[dict[str, Any]],
                 failures: list[dict[str, Any]]) -> None:
        self.sweep = sweep
        self.failures = failures
        grid = sweep.get("grid", {})
        self.variants = list(grid.get("losses", {}))
        self.all = runs
        vrns = {float(r["vrns_weight"]) for r in runs}
        self.rules = {r["lr_scaling"] for r in runs}
        self.several_vrns = len([w for w in vrns if w > 0]) > 1
        order = sorted({Arm.of(r) for r in runs},
                       key=lambda a: (self.variants.index(a.loss) if a.loss in self.variants
                                      else len(self.variants), a.loss, a.vrns_weight,
                                      a.lr_scaling))
        self.arms = order
        self.batches = sorted({int(r["batch_size"]) for r in runs})
        self.chosen = self._choose(grid, runs, failures)
        self.tuned = [r for r in runs if self.chosen.get(self.setting(r)) ==
                      float(r["lr_multiplier"])]
        self._cells: dict[tuple[Arm, int, int], list[dict[str, Any]]] = defaultdict(list)
        for r in sorted(self.tuned, key=lambda r: r["seed"]):
            self._cells[self.setting(r)].append(r)

    @staticmethod
    def setting(r: dict[str, Any]) -> tuple[Arm, int, int]:
        return Arm.of(r), int(r["batch_size"]), int(r["softmax_batch"])

    def _choose(self, grid: dict[str, Any], runs: list[dict[str, Any]],
                failures: list[dict[str, Any]]) -> dict[tuple[Arm, int, int], float]:
        # a diverged run scores None; a finished run of the same cell replaces it
        dev = {f["cell_id"]: None for f in failures} | {r["cell_id"]: r["best_dev"]
                                                         for r in runs}
        mode = grid.get("lr_tuning", "all_seeds")
        first = (grid.get("seeds") or [0])[0]
        out = {}
        for (loss, w, rule, b, n), by_mult in scores_by_setting([*failures, *runs],
                                                                dev).items():
            m = choose(by_mult, mode, first)
            if m is None:  # a partial store: the best mean over whatever seeds finished
                m = choose({k: {0: t_mean(v.values())} for k, v in by_mult.items()},
                           "all_seeds", 0)
            if m is not None:
                out[(Arm(loss, w, rule), b, n)] = m
        return out

    def label(self, arm: Arm) -> str:
        label = arm.loss
        if arm.vrns_weight > 0:
            label += f"+vrns{arm.vrns_weight:g}" if self.several_vrns else "+vrns"
        if len(self.rules) > 1:
            label += f" (lr {arm.lr_scaling})"
        return label

    def cell(self, arm: Arm, b: int, n: int | None = None) -> list[dict[str, Any]]:
        """The tuned runs of (arm, B, N) (N None: the whole batch), by seed."""
        return self._cells.get((arm, b, b if n is None else n), [])

    def batches_of(self, arm: Arm) -> list[int]:
        """The batch sizes at which ``arm`` has tuned whole-batch runs, ascending."""
        return [b for b in self.batches if self.cell(arm, b)]

    def whole_batch_cells(self) -> list[tuple[Arm, int, list[dict[str, Any]]]]:
        """(arm, B, its tuned runs) of every whole-batch (N = B) setting that has runs."""
        return [(arm, b, group) for arm in self.arms for b in self.batches
                if (group := self.cell(arm, b))]

    def block_cells(self) -> list[tuple[Arm, int, int]]:
        """(arm, B, N) of every tuned setting, whole batch (N = B) included, in table order."""
        return [(arm, b, n) for arm in self.arms for b in self.batches
                for n in self.blocks(arm, b)]

    def blocks(self, arm: Arm, b: int) -> list[int]:
        return sorted(n for a, bb, n in self._cells if a == arm and bb == b)


def t_mean(values: Any) -> float | None:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def iv(i: stats.Interval | None) -> dict[str, Any] | None:
    return None if i is None else {"mean": i.mean, "lo": i.lo, "hi": i.hi, "n": i.n}


def pd(d: stats.PairedDifference | None) -> dict[str, Any] | None:
    return None if d is None else {"mean": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n,
                                   "p_t": d.p_t, "p_exact": d.p_exact}


def spread(s: stats.Spread | None) -> dict[str, Any] | None:
    return None if s is None else {"median": s.median, "lo": s.lo, "hi": s.hi, "n": s.n}


def by_seed(runs: list[dict[str, Any]], key: str | Callable[[dict[str, Any]], Any]
            ) -> dict[int, Any]:
    get = key if callable(key) else (lambda r: r[key])
    return {int(r["seed"]): get(r) for r in runs}


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str
           ) -> stats.PairedDifference | None:
    """a minus b over the seeds both have."""
    va, vb = by_seed(a, key), by_seed(b, key)
    seeds = sorted(set(va) & set(vb))
    return stats.paired_difference([va[s] for s in seeds], [vb[s] for s in seeds])


# -- sections -------------------------------------------------------------------------------
def design(runs: Runs, meta: dict[str, str], sweep: dict[str, Any]) -> dict[str, Any]:
    """The regime the conclusions hold for, and the budget check."""
    base = sweep.get("base", {})
    budget = sweep.get("budget", {})
    kind = next((k for k in ("examples", "steps", "epochs") if budget.get(k) is not None),
                None)
    field = {"examples": "examples", "steps": "steps"}.get(kind or "", "")
    flagged = []
    if field:
        want = budget[kind]
        flagged = [{"loss": runs.label(Arm.of(r)), "batch_size": r["batch_size"],
                    "softmax_batch": r["softmax_batch"], "seed": r["seed"],
                    "lr_multiplier": r["lr_multiplier"], field: r[field]}
                   for r in runs.all if r[field] != want]
    grid = sweep.get("grid", {})
    counts = [len(runs.cell(arm, b, n)) for arm, b, n in runs.block_cells()]
    return {"model": base.get("model", {}).get("name"), "data": base.get("data", {}).get("train"),
            "dev": base.get("eval", {}).get("dev"), "test": base.get("eval", {}).get("test"),
            "budget": {"kind": kind, "value": budget.get(kind) if kind else None},
            "seeds": grid.get("seeds"), "lr_multipliers": grid.get("lr_multipliers", [1.0]),
            "seeds_per_cell": [min(counts), max(counts)] if counts else None,
            "vrns_weights": grid.get("vrns_weights"),
            "lr_tuning": grid.get("lr_tuning", "all_seeds"),
            "lr_scaling": grid.get("lr_scaling"), "base_lr": base.get("optim", {}).get("lr"),
            "reference_batch_size": base.get("optim", {}).get("reference_batch_size"),
            "temperature": base.get("loss", {}).get("temperature"),
            "epochs_seen": spread(stats.median_range([r.get("epochs") for r in runs.all])),
            "training_pairs": spread(stats.median_range([r.get("data_pairs")
                                                         for r in runs.all])),
            "contaminated": spread(stats.median_range([r.get("data_contaminated")
                                                       for r in runs.all])),
            "flagged": flagged, "package_version": meta.get("package_version")}


def lr_section(runs: Runs) -> list[dict[str, Any]]:
    """Dev score per lr multiplier of every setting, and the chosen one. Every multiplier of
    the grid is listed: one with no finished run has dev None and says whether it diverged
    (else it has not run yet: a study under way), so the columns stay aligned."""
    groups: dict[tuple[Arm, int, int], dict[float, list[float]]] = defaultdict(
        lambda: defaultdict(list))
    for r in runs.all:
        groups[Runs.setting(r)][float(r["lr_multiplier"])].append(r["best_dev"])
    diverged = {(Runs.setting(f), float(f["lr_multiplier"])) for f in runs.failures}
    grid = {float(m) for m in runs.sweep.get("grid", {}).get("lr_multipliers") or [1.0]}
    mults = sorted(grid | {m for by_mult in groups.values() for m in by_mult})
    out = []
    for setting, by_mult in sorted(groups.items(), key=lambda kv: (
            runs.arms.index(kv[0][0]), kv[0][1], -kv[0][2])):
        arm, b, n = setting
        out.append({"loss": runs.label(arm), "batch_size": b, "softmax_batch": n,
                    "chosen": runs.chosen.get(setting),
                    "multipliers": [{"multiplier": m, "dev": iv(stats.t_interval(by_mult[m]))}
                                    if m in by_mult else
                                    {"multiplier": m, "dev": None,
                                     "diverged": (setting, m) in diverged}
                                    for m in mults]})
    return out


def quality_rows(runs: Runs, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm and batch size (whole-batch softmax, tuned lr): quality, speed, cost."""
    rows = []
    for arm, b, group in runs.whole_batch_cells():
        row: dict[str, Any] = {
            "loss": runs.label(arm), "batch_size": b, "seeds": len(group),
            "lr_multiplier": group[0]["lr_multiplier"],
            "dev": iv(stats.t_interval([r["best_dev"] for r in group])),
            "test": iv(stats.t_interval([r["test"] for r in group])),
            "steps": spread(stats.median_range([r["steps"] for r in group])),
            "examples": spread(stats.median_range([r["examples"] for r in group])),
            "throughput": iv(stats.t_interval([r["throughput"] for r in group])),
            "peak_memory_mb": iv(stats.t_interval([r["peak_memory_mb"] for r in group])),
            "memory_kind": group[0]["memory_kind"],
            "train_seconds": iv(stats.t_interval([r["train_seconds"] for r in group])),
            "to_target": []}
        for t in targets:
            hits = [reach(r, t["value"]) for r in group]
            got = [h for h in hits if h is not None]
            row["to_target"].append({
                "target": t["name"], "reached": len(got),
                "steps": spread(stats.median_range([h["steps"] for h in got])),
                "examples": spread(stats.median_range([h["examples"] for h in got])),
                "seconds": spread(stats.median_range([h["seconds"] for h in got]))})
        rows.append(row)
    return rows


def reach(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """Steps, examples, seconds and B_simple at the run's first point at or above target."""
    hit = steps_to_target(run["curve"], target)
    if hit is None:
        return None
    point = next(p for p in run["curve"] if p["steps"] == hit[0])
    return {"steps": hit[0], "examples": hit[1], "seconds": point["seconds"],
            "noise": point.get("metrics", {})}


def b_simple(points: list[dict[str, float]]) -> dict[str, Any] | None:
    """B_simple as McCandlish et al. take it: the ratio of the averages of the tr(Sigma) and
    |G|^2 estimates (each unbiased; their ratio per point is not, and is undefined where the
    |G|^2 estimate is not positive) over the given evaluation points (runs, seeds)."""
    pairs = [(p[TRACE_SIGMA], p[GRAD_SQ]) for p in points if TRACE_SIGMA in p and GRAD_SQ in p]
    if not pairs:
        return None
    trace, grad = (sum(x) / len(pairs) for x in zip(*pairs, strict=True))
    return {"value": trace / grad if grad > 0 else None, "n": len(pairs)}


def targets(runs: Runs, settings: dict[str, Any]) -> list[dict[str, Any]]:
    fixed = settings.get("targets")
    if fixed:
        return [{"name": f"{v:g}", "value": float(v), "rule": "report.targets of the sweep"}
                for v in fixed]
    starts = [r["curve"][0]["dev"] for r in runs.tuned
              if r["curve"] and r["curve"][0]["steps"] == 0 and r["curve"][0]["dev"] is not None]
    means = [t_mean(r["best_dev"] for r in runs.cell(arm, b, n))
             for arm, b, n in runs.chosen]
    best = max((m for m in means if m is not None), default=None)
    if not starts or best is None:
        return []
    start = sum(starts) / len(starts)
    return [{"name": f"{round(f * 100)}% of the gain", "value": start + f * (best - start),
             "rule": f"start {start:.2f} + {f:g} x (best tuned mean {best:.2f} - start)"}
            for f in TARGET_FRACTIONS]


def best_section(runs: Runs) -> list[dict[str, Any]]:
    """Per arm: the batch size with the best mean dev score (tuned lr, whole batch), its test
    score, and what the smallest and largest batch sizes cost against it (paired by seed)."""
    out = []
    for arm in runs.arms:
        have = runs.batches_of(arm)
        means = {b: t_mean(r["best_dev"] for r in runs.cell(arm, b)) for b in have}
        means = {b: m for b, m in means.items() if m is not None}
        if not means:
            continue
        best = max(sorted(means), key=lambda b: means[b])
        top = runs.cell(arm, best)
        entry: dict[str, Any] = {
            "loss": runs.label(arm), "batch_size": best,
            "dev": iv(stats.t_interval([r["best_dev"] for r in top])),
            "test": iv(stats.t_interval([r["test"] for r in top])), "extremes": []}
        for b in sorted({have[0], have[-1]} - {best}):
            entry["extremes"].append({
                "batch_size": b,
                "dev": pd(paired(runs.cell(arm, b), top, "best_dev")),
                "test": pd(paired(runs.cell(arm, b), top, "test"))})
        out.append(entry)
    return out


def blocks_section(runs: Runs) -> list[dict[str, Any]]:
    """Quality on the (B, N) grid: every softmax block size run at each batch size."""
    out = []
    for arm, b, n in runs.block_cells():
        group = runs.cell(arm, b, n)
        out.append({"loss": runs.label(arm), "batch_size": b, "softmax_batch": n,
                    "seeds": len(group), "lr_multiplier": group[0]["lr_multiplier"],
                    "dev": iv(stats.t_interval([r["best_dev"] for r in group])),
                    "test": iv(stats.t_interval([r["test"] for r in group]))})
    return out


def negatives_section(runs: Runs) -> list[dict[str, Any]]:
    """The batch-size effect B_small -> B_large split at (B_large, N = B_small)."""
    out = []
    for arm, large, small in runs.block_cells():
        if small == large or not runs.cell(arm, small):
            continue
        a, mid, z = runs.cell(arm, small), runs.cell(arm, large, small), runs.cell(arm, large)
        entry: dict[str, Any] = {"loss": runs.label(arm), "b_small": small, "b_large": large}
        for split, key in (("dev", "best_dev"), ("test", "test")):
            total, negatives = pd(paired(z, a, key)), pd(paired(z, mid, key))
            # A share of a total the seeds cannot tell from zero is any number at all.
            share = None
            if excludes_zero(total) and negatives is not None:
                share = negatives["mean"] / total["mean"]  # type: ignore[index]
            entry[split] = {"total": total, "optimisation": pd(paired(mid, a, key)),
                            "negatives": negatives, "negatives_share": share}
        out.append(entry)
    return out


def trends_section(runs: Runs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-arm trends in log2(B) and the loss x batch-size interactions (Holm over them)."""
    def points(arm: Arm, key: str) -> list[tuple[int, int, float | None]]:
        return [(r["seed"], r["batch_size"], r[key]) for b in runs.batches
                for r in runs.cell(arm, b)]

    trends = []
    for arm in runs.arms:
        entry: dict[str, Any] = {"loss": runs.label(arm)}
        for split, key in (("dev", "best_dev"), ("test", "test")):
            t = stats.seed_trend(points(arm, key))
            entry[split] = None if t is None else {"slope": pd(t.slope),
                                                   "curvature": pd(t.curvature)}
        trends.append(entry)
    inter = []
    for a, b in comparisons(runs):
        entry = {"comparison": f"{runs.label(a)} − {runs.label(b)}"}
        for split, key in (("dev", "best_dev"), ("test", "test")):
            entry[split] = pd(stats.trend_difference(points(a, key), points(b, key)))
        inter.append(entry)
    for split in ("dev", "test"):
        adjusted = stats.holm([(e[split] or {}).get("p_t") for e in inter])
        for e, p in zip(inter, adjusted, strict=True):
            e[f"{split}_p_holm"] = p
    return trends, inter


def comparisons(runs: Runs) -> list[tuple[Arm, Arm]]:
    """(A, B) pairs of arms compared: ``report.compare`` (default weince − infonce) at each
    VRNS weight and rule, then each arm with VRNS against the same arm without."""
    settings = runs.sweep.get("report", {}) or {}
    pairs = settings.get("compare") or [("weince", "infonce")]
    have = set(runs.arms)
    out = []
    for a_name, b_name in pairs:
        for arm in runs.arms:
            if arm.loss == a_name:
                other = Arm(b_name, arm.vrns_weight, arm.lr_scaling)
                if other in have:
                    out.append((arm, other))
    for arm in runs.arms:
        plain = Arm(arm.loss, 0.0, arm.lr_scaling)
        if arm.vrns_weight > 0 and plain in have:
            out.append((arm, plain))
    return out


def differences_section(runs: Runs) -> list[dict[str, Any]]:
    """Paired differences of the compared arms at each batch size (Holm over the table)."""
    out = []
    for a, b in comparisons(runs):
        for bs in runs.batches:
            ga, gb = runs.cell(a, bs), runs.cell(b, bs)
            if not ga or not gb:
                continue
            out.append({"comparison": f"{runs.label(a)} − {runs.label(b)}", "batch_size": bs,
                        "pairs": len(set(by_seed(ga, "seed")) & set(by_seed(gb, "seed"))),
                        "dev": pd(paired(ga, gb, "best_dev")),
                        "test": pd(paired(ga, gb, "test"))})
    for split in ("dev", "test"):
        adjusted = stats.holm([(d[split] or {}).get("p_t") for d in out])
        for d, p in zip(out, adjusted, strict=True):
            d[f"{split}_p_holm"] = p
    return out


def reach_pairs(runs: Runs) -> list[tuple[Arm, Arm]]:
    """(A, B) pairs of arms for the reach table: ``report.reach`` (default sogclr against
    infonce) at each VRNS weight and rule where the runs have both."""
    settings = runs.sweep.get("report", {}) or {}
    names = settings.get("reach") or [("sogclr", "infonce")]
    have = set(runs.arms)
    return [(arm, Arm(b_name, arm.vrns_weight, arm.lr_scaling)) for a_name, b_name in names
            for arm in runs.arms
            if arm.loss == a_name and Arm(b_name, arm.vrns_weight, arm.lr_scaling) in have]


def _paired_entry(ga: list[dict[str, Any]], gb: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs (seeds both have), dev and test differences a minus b."""
    return {"pairs": len(set(by_seed(ga, "seed")) & set(by_seed(gb, "seed"))),
            "dev": pd(paired(ga, gb, "best_dev")), "test": pd(paired(ga, gb, "test"))}


def reach_section(runs: Runs) -> list[dict[str, Any]]:
    """Does A at each of its batch sizes reach B at B's largest batch size? Per batch size B
    where A has (whole-batch, tuned) runs: A@B - B@B_large and A@B - B@B (same batch),
    paired by seed, each column Holm-adjusted over the table."""
    out = []
    for a, b in reach_pairs(runs):
        have_b = runs.batches_of(b)
        if not have_b:  # B has softmax-block runs only
            continue
        large = have_b[-1]
        for bs in runs.batches:
            ga = runs.cell(a, bs)
            if not ga:
                continue
            same = runs.cell(b, bs)
            out.append({"comparison": f"{runs.label(a)} − {runs.label(b)}",
                        "loss": runs.label(a), "reference": runs.label(b), "batch_size": bs,
                        "reference_batch_size": large,
                        "large": _paired_entry(ga, runs.cell(b, large)),
                        "same": _paired_entry(ga, same) if same else None})
    for kind in ("large", "same"):
        for split in ("dev", "test"):
            entries = [e[kind] for e in out if e[kind] is not None]
            adjusted = stats.holm([(e[split] or {}).get("p_t") for e in entries])
            for e, p in zip(entries, adjusted, strict=True):
                e[f"{split}_p_holm"] = p
    return out


def range_bound(fit: CriticalBatch, lo: int, hi: int) -> dict[str, Any] | None:
    """What is measured where B_crit = E_min / S_min lies outside the batch sizes [lo, hi]:
    beyond hi the steps still fall as 1/B, S_min runs to the fit's floor and only B_crit > hi,
    S_min < E_min / hi are measured; below lo, the mirror image (B_crit < lo, E_min < S_min
    lo). None inside the range or without a fit."""
    if fit.b_crit is None or fit.s_min is None or fit.e_min is None:
        return None
    if fit.b_crit.mean > hi:
        return {"b_crit_above": hi, "s_min_below": fit.e_min.mean / hi}
    if fit.b_crit.mean < lo:
        return {"b_crit_below": lo, "e_min_below": fit.s_min.mean * lo}
    return None


def finding(fit: CriticalBatch, bound: dict[str, Any] | None, only_at_last: bool) -> str:
    """What a target's fits measure, decided once for the Answer, the table and the plot:
    ``not_fitted`` (no seed has a fit), ``last_point`` (every run reached it only at the
    budget's end, so the steps are the budget / B and a fit would measure the schedule),
    ``above`` / ``below`` (B_crit outside the batch sizes measured: only a bound),
    ``b_crit`` (B_crit inside them, with its interval)."""
    if fit.b_crit is None:
        return "not_fitted"
    if only_at_last:
        return "last_point"
    if bound and "b_crit_above" in bound:
        return "above"
    if bound and "b_crit_below" in bound:
        return "below"
    return "b_crit"


def critical_section(runs: Runs, targets_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm and target: steps to the target per batch size, the hyperbola fit, B_crit,
    what a doubling buys below and above it, and B_simple at the target."""
    out = []
    for arm in runs.arms:
        # the arm's own batch sizes: a bound or a doubling names a batch it was run at
        sizes = runs.batches_of(arm)
        for t in targets_:
            per_seed: dict[int, dict[int, float | None]] = defaultdict(dict)
            at_target: list[dict[str, float]] = []
            per_batch = []
            at_last = []  # per run that reached it: whether only at its last point
            for b in sizes:
                hits = {}
                for r in runs.cell(arm, b):
                    h = reach(r, t["value"])
                    per_seed[int(r["seed"])][b] = None if h is None else float(h["steps"])
                    hits[int(r["seed"])] = h
                    if h is not None:
                        at_target.append(h["noise"])
                        at_last.append(h["steps"] == max(p["steps"] for p in r["curve"]))
                got = [h for h in hits.values() if h is not None]
                if hits:
                    counts = {k: spread(stats.median_range([h[k] for h in got]))
                              for k in ("steps", "examples")}
                    per_batch.append({"batch_size": b, "reached": len(got), "runs": len(hits),
                                      **counts})
            fit = critical_batch(per_seed, min_batch_sizes=MIN_BATCH_SIZES)
            bound = range_bound(fit, min(sizes), max(sizes))
            # then the steps to it are the budget / B: the fit measures the schedule
            only_at_last = bool(at_last) and all(at_last)
            pooled = fit.pooled if len({p["batch_size"] for p in per_batch
                                        if p["reached"]}) >= MIN_BATCH_SIZES else None
            entry: dict[str, Any] = {
                "loss": runs.label(arm), "target": t["name"], "value": t["value"],
                "per_batch": per_batch, "n": fit.n, "min_batch_sizes": MIN_BATCH_SIZES,
                "s_min": iv(fit.s_min), "e_min": iv(fit.e_min), "b_crit": iv(fit.b_crit),
                "pooled": None if pooled is None else {
                    "s_min": pooled.s_min, "e_min": pooled.e_min, "b_crit": pooled.b_crit},
                "measured": [min(sizes), max(sizes)],
                "bound": bound, "only_at_last_point": only_at_last,
                "finding": finding(fit, bound, only_at_last),
                # [seed, batch size, steps or None]: lets the Answer say when two losses
                # reached a target at the same points (then their fits are one fit)
                "steps_by_seed": [[seed, b, s] for seed, by_b in sorted(per_seed.items())
                                  for b, s in sorted(by_b.items())],
                "b_simple": b_simple(at_target)}
            if pooled is not None:
                h = pooled
                below = [b for b in sizes if b * 2 <= h.b_crit]
                above = [b for b in sizes if b >= h.b_crit]
                entry["doubling"] = {
                    "below": None if not below else {"batch_size": below[0],
                                                     "steps_saved": doubling_gain(h, below[0])},
                    "above": None if not above else {"batch_size": above[-1],
                                                     "steps_saved": doubling_gain(h, above[-1])}}
            out.append(entry)
    return out


def mechanisms_section(runs: Runs) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The probe set's quantities at each run's last point (mean over seeds), and their
    curves against examples (means over seeds, points all seeds share)."""
    rows, curves = [], []
    for arm, b, group in runs.whole_batch_cells():
        last = [r["curve"][-1].get("metrics", {}) for r in group if r["curve"]]
        row: dict[str, Any] = {"loss": runs.label(arm), "batch_size": b}
        for name, stored in MECHANISMS.items():
            row[name] = iv(stats.t_interval([m[stored] for m in last if stored in m]))
        row["b_simple"] = b_simple(last)
        rows.append(row)
        points = []
        for i in range(min(len(r["curve"]) for r in group)):
            ms = [r["curve"][i].get("metrics", {}) for r in group]
            point = {"examples": group[0]["curve"][i]["examples"]}
            for name, stored in MECHANISMS.items():
                point[name] = t_mean(m.get(stored) for m in ms)
            point["b_simple"] = (b_simple(ms) or {}).get("value")
            points.append(point)
        curves.append({"loss": runs.label(arm), "batch_size": b, "points": points})
    return rows, curves


def curves_section(runs: Runs) -> list[dict[str, Any]]:
    """Dev score against examples, steps and seconds (tuned, whole batch): the mean over
    seeds at the points all seeds share, with the min-max band."""
    out = []
    for arm, b, group in runs.whole_batch_cells():
        points = []
        for i in range(min(len(r["curve"]) for r in group)):
            devs = [r["curve"][i]["dev"] for r in group if r["curve"][i]["dev"] is not None]
            if not devs:  # a NaN score (a collapsed encoder) in every seed
                continue
            secs = [r["curve"][i]["seconds"] for r in group]
            points.append({"examples": group[0]["curve"][i]["examples"],
                           "steps": group[0]["curve"][i]["steps"],
                           "seconds": sum(secs) / len(secs),
                           "dev": sum(devs) / len(devs), "lo": min(devs), "hi": max(devs)})
        out.append({"loss": runs.label(arm), "batch_size": b, "points": points})
    return out


def failures_section(runs: Runs, failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: dict[tuple[str, int, int, float], int] = defaultdict(int)
    for f in failures:
        counts[(runs.label(Arm.of(f)), int(f["batch_size"]), int(f["softmax_batch"]),
                float(f["lr_multiplier"]))] += 1
    return [{"loss": k[0], "batch_size": k[1], "softmax_batch": k[2], "lr_multiplier": k[3],
             "attempts": v} for k, v in sorted(counts.items())]


# -- all of it ------------------------------------------------------------------------------
def compute(meta: dict[str, str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of the report (see the module docstring for the definitions)."""
    sweep = json.loads(meta["sweep_config"])
    failures = json.loads(meta.get("_failures", "[]"))
    grouped = Runs(sweep, runs, failures)
    settings = sweep.get("report", {}) or {}
    targets_ = targets(grouped, settings)
    trends, interactions = trends_section(grouped)
    mechanisms, mechanism_curves = mechanisms_section(grouped)
    data: dict[str, Any] = {
        "sweep": sweep.get("name", meta.get("sweep_name")),
        "metric": sweep["base"]["eval"]["metric"],
        "store": {"sweep_hash": meta.get("sweep_hash"),
                  "package_version": meta.get("package_version"),
                  "created_at": meta.get("created_at")},
        "runs": len(runs), "tuned_runs": len(grouped.tuned),
        "losses": [grouped.label(a) for a in grouped.arms], "batch_sizes": grouped.batches,
        "design": design(grouped, meta, sweep),
        "targets": targets_,
        "rows": quality_rows(grouped, targets_),
        "best": best_section(grouped),
        "lr": lr_section(grouped),
        "blocks": blocks_section(grouped),
        "negatives": negatives_section(grouped),
        "trends": trends, "interactions": interactions,
        "differences": differences_section(grouped),
        "reach": reach_section(grouped),
        "critical": critical_section(grouped, targets_),
        "mechanisms": mechanisms, "mechanism_curves": mechanism_curves,
        "curves": curves_section(grouped),
        "failures": failures_section(grouped, failures),
    }
    data["answer"] = answer(data)
    return data

