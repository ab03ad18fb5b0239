"""How the report writes its numbers: one place, so the Answer and the tables agree."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: float | None, digits: int = 2) -> str:
    """A number, ``n/a`` when missing or not finite; ``digits=0``: thousands separated."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 1e7:  # an unbounded fit's interval: the digits would mean nothing
        return f"{x:.2g}"
    return f"{x:,.{digits}f}" if digits == 0 else f"{x:.{digits}f}"


def signed(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}"


def fmt_iv(iv: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean [lo, hi]``; ``mean [n/a]`` without an interval; ``n/a`` without values."""
    if iv is None:
        return "n/a"
    ci = "n/a" if iv["lo"] is None else f"{fmt(iv['lo'], digits)}, {fmt(iv['hi'], digits)}"
    return f"{fmt(iv['mean'], digits)} [{ci}]"


def fmt_pd(d: dict[str, Any] | None, digits: int = 2, *, p_holm: float | None = None) -> str:
    """A paired difference: ``+mean [lo, hi] (n = k, p = ..., exact p = ...)``."""
    if d is None:
        return "n/a"
    ci = "n/a" if d["lo"] is None else f"{signed(d['lo'], digits)}, {signed(d['hi'], digits)}"
    ps = [f"n = {d['n']}"]
    if d.get("p_t") is not None:
        ps.append(f"p = {fmt_p(d['p_t'])}")
    if p_holm is not None:
        ps.append(f"Holm p = {fmt_p(p_holm)}")
    if d.get("p_exact") is not None:
        ps.append(f"exact p = {fmt_p(d['p_exact'])}")
    return f"{signed(d['mean'], digits)} [{ci}] ({', '.join(ps)})"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_spread(s: dict[str, Any] | None, digits: int = 0) -> str:
    """A discrete count: ``median [min, max]``."""
    if s is None:
        return "n/a"
    return f"{fmt(s['median'], digits)} [{fmt(s['lo'], digits)}, {fmt(s['hi'], digits)}]"


def percent(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"
