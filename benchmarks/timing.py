"""Interleaved timing for the benchmarks: every contender once per round, ratios per round.

On a shared machine a slow spell hits all contenders of the same round, so the ratio of two
contenders within a round is steadier than the ratio of their separate best times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one list entry per round, alternating between them.

    A call's result is freed after the clock stops: handing tens of MB back to the OS is not
    part of computing them, and on this VM it alone varies by 10-20 ms.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            results = []
            start = time.perf_counter()
            for _ in range(inner):
                results.append(fn())
            times[name].append((time.perf_counter() - start) / inner)
            del results
    return times


def ratio(times: dict[str, list[float]], name: str, baseline: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``times[name][i] / times[baseline][i]``."""
    per_round = [a / b for a, b in zip(times[name], times[baseline], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)
