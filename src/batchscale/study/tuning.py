"""The learning rate chosen per batch size, on dev only (Shallue et al. 2018, arXiv
1811.03600: compare batch sizes each at its own best lr, not at one rule's lr).

A *setting* is a cell without its seed and lr multiplier: (loss variant, VRNS weight, lr rule,
batch size, softmax block). For each setting the multiplier with the best dev score is kept:
the best mean over the seeds that every multiplier has (``all_seeds``), or the best score of
the first seed (``first_seed``, whose other seeds then run the chosen multiplier only). A
multiplier whose run diverged scores -inf. Test scores never enter the choice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

Setting = tuple[str, float, str, int, int]


def setting_of(row: Mapping[str, Any]) -> Setting:
    """The setting of a cell or run row (store columns)."""
    return (row["loss"], float(row["vrns_weight"]), row["lr_scaling"], int(row["batch_size"]),
            int(row["softmax_batch"]))


def choose(scores: Mapping[float, Mapping[int, float | None]], mode: str,
           first_seed: int) -> float | None:
    """The multiplier with the best dev score. ``scores[m][seed]`` is the dev score of that
    run (None or NaN: diverged). None when the choice cannot be made yet (a multiplier lacks
    the seeds it needs)."""
    if not scores:
        return None
    if mode == "first_seed":
        if any(first_seed not in by_seed for by_seed in scores.values()):
            return None
        value = {m: _score(by_seed[first_seed]) for m, by_seed in scores.items()}
    else:
        seeds = set.intersection(*(set(by_seed) for by_seed in scores.values()))
        if not seeds:
            return None
        value = {m: sum(_score(by_seed[s]) for s in seeds) / len(seeds)
                 for m, by_seed in scores.items()}
    return max(sorted(value), key=lambda m: value[m])


def _score(x: float | None) -> float:
    return -math.inf if x is None or not math.isfinite(x) else float(x)


Scores = dict[Setting, dict[float, dict[int, float | None]]]


def scores_by_setting(cells: Iterable[Mapping[str, Any]],
                      dev: Mapping[str, float | None]) -> Scores:
    """setting -> multiplier -> seed -> dev score. ``cells``: cell or run rows; ``dev``: cell
    id -> dev score of its finished (or diverged: None) run; a cell without one adds its
    multiplier with no seeds."""
    scores: Scores = {}
    for c in cells:
        by_mult = scores.setdefault(setting_of(c), {})
        by_seed = by_mult.setdefault(float(c["lr_multiplier"]), {})
        if c["cell_id"] in dev:
            by_seed[int(c["seed"])] = dev[c["cell_id"]]
    return scores


def tuned(cells: Iterable[Mapping[str, Any]], dev: Mapping[str, float | None],
          mode: str, first_seed: int) -> dict[Setting, float | None]:
    """Every setting's chosen multiplier (arguments as :func:`scores_by_setting`)."""
    return {s: choose(by_mult, mode, first_seed)
            for s, by_mult in scores_by_setting(cells, dev).items()}
