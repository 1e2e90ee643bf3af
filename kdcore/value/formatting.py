"""Numbers as a reader sees them: money and sizes with the precision that matters.

No torch and no plotly, so the figures and the pages can use it without the engine's weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def format_money(x: float) -> str:
    """Dollars with the precision a reader needs: $1,234 / $12.35 / $0.0312 / $0.000017."""
    if x is None or not math.isfinite(x):
        return "n/a"
    sign, x = ("-" if x < 0 else ""), abs(x)
    if x >= 100:
        return f"{sign}${x:,.0f}"
    if x >= 1 or x == 0 or (x >= 0.01 and round(x, 2) == x):
        return f"{sign}${x:,.2f}"
    decimals = 2 - math.floor(math.log10(x))  # three significant digits, never 1.7e-05
    return f"{sign}${x:.{decimals}f}".rstrip("0")


def format_bytes(n: float) -> str:
    """Bytes in B/kB/MB/GB (powers of 1000, as disk sizes are sold)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_count(n: float) -> str:
    """A large count in words a reader takes in at a glance: 950 / 12,000 / 3.4 million."""
    if n is None or not math.isfinite(n):
        return "n/a"
    for word, scale in (("trillion", 1e12), ("billion", 1e9), ("million", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:,.3g} {word}"
    return f"{n:,.0f}"


def format_interval(figure: dict | None, fmt: Callable[[float], str] = format_money,
                    unit: str = "") -> str:
    """``{median, ci95: [low, high]}`` as "median [low to high]" ("0.184 ms [0.159 to 0.253]"
    with ``unit=" ms"``): a figure measured several times is read with its spread ("n/a" when
    missing, the median alone without an interval)."""
    if not figure or figure.get("median") is None:
        return "n/a"
    ci = figure.get("ci95")
    middle = fmt(figure["median"]) + unit
    return f"{middle} [{fmt(ci[0])} to {fmt(ci[1])}]" if ci else middle


def format_payback(payback: dict | None) -> str:
    """A ``payback_predictions`` figure of kdcore.value.roi as "203,049 [178,044 to 390,757]"
    predictions; "never" for a student that saves nothing, an open upper end as "never"."""
    if not payback or payback.get("median") is None:
        return "never"
    return format_interval(payback, lambda n: "never" if n is None else format_count(n))
