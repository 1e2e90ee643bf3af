"""Numbers as a reader sees them: money and sizes with the precision that matters.

No torch and no plotly, so the figures and the pages can use it without the engine's weight.
"""

from __future__ import annotations

import math


def format_money(x: float) -> str:
    """Dollars with the precision a reader needs: $1,234 / $12.35 / $0.0312."""
    if x is None or not math.isfinite(x):
        return "n/a"
    sign, x = ("-" if x < 0 else ""), abs(x)
    if x >= 100:
        return f"{sign}${x:,.0f}"
    if x >= 1 or x == 0 or (x >= 0.01 and round(x, 2) == x):
        return f"{sign}${x:,.2f}"
    return f"{sign}${x:.3g}"


def format_bytes(n: float) -> str:
    """Bytes in B/kB/MB/GB (powers of 1000, as disk sizes are sold)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"
