"""The honest decision: distil or not, which strategy, and against the teacher.

Pure numpy/scipy on per-seed test accuracies. Three questions, in this order:

1. Does any distillation beat training on labels alone (``ce``)? The best distilling strategy
   is picked after the fact (highest mean), so its claim is adjusted for the choice: every
   distilling variant gets a two-sided paired t-test against ``ce`` over their common seeds,
   the N p-values get Holm's step-down correction, and the chosen one is a win (or a loss) only
   when its Holm-adjusted p-value is below 0.05. Its interval is the paired t-interval at the
   level Holm uses for its rank r among the sorted p-values, 1 - 0.05/(N - r + 1) (ties take
   the first rank, the stricter level): the interval that excludes 0 exactly when Holm's
   step at that rank rejects, so the sentence and the interval never disagree. With N = 1
   this is the plain 95% interval. Holm rather than Bonferroni because it is never weaker and
   needs no independence; rather than a max-t or bootstrap because 5 seeds cannot carry one.
2. Which strategy is best: ``ce`` when it beats the best distiller, that distiller when it
   beats ``ce``, else the highest mean of all (more seeds break ties).
3. Does that student beat its teacher: its per-seed accuracies minus the teacher's (one
   number), a one-sample t-interval at 95%.

With fewer than 2 common seeds, or differences that are all equal (zero variance: a t-interval
of zero width that would read as certainty), the interval is None and the answer None
("cannot tell"), never a win. Per class, :func:`per_class_deltas` tests every class and
corrects across classes with Benjamini-Hochberg (``scipy.stats.false_discovery_control``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from kdcore.analysis.metrics import no_spread, paired_difference

ALPHA = 0.05
CE = "ce"
Accuracies = Mapping[str, Mapping[int, float]]  # strategy -> seed -> test accuracy

__all__ = ["ALPHA", "best_of", "decide", "hurts_and_fixes", "holm", "paired_p",
           "per_class_deltas"]


def paired_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of a one-sample t-test of the differences against 0; NaN when they
    cannot carry one (fewer than 2, or zero variance)."""
    diffs = np.asarray(diffs, float)
    if no_spread(diffs):
        return math.nan
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: p_(j) sorted ascending becomes
    max over i <= j of min(1, (m - i + 1) p_(i)). NaN p-values count in m (they were tried)
    as if 1, and stay NaN."""
    p = np.asarray(pvalues, float)
    m = len(p)
    filled = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(filled, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * filled[order]))
    out = np.empty(m)
    out[order] = stepped
    return [math.nan if math.isnan(v) else float(a) for v, a in zip(p, out, strict=True)]


def _mean(accuracies: Accuracies, name: str) -> float:
    return float(np.mean(list(accuracies[name].values())))


def _best_by_mean(accuracies: Accuracies, names: Sequence[str]) -> str | None:
    """The highest mean accuracy; more seeds, then the name (so the order given does not
    matter), break ties."""
    names = sorted(n for n in names if accuracies.get(n))
    return max(names, key=lambda n: (_mean(accuracies, n), len(accuracies[n])), default=None)


def _answer(ci: list[float] | None, significant: bool = True) -> bool | None:
    if ci is None or not significant:
        return None
    return True if ci[0] > 0 else False if ci[1] < 0 else None


def best_of(accuracies: Accuracies, candidates: Sequence[str], baseline: str,
            alpha: float = ALPHA) -> dict | None:
    """The best of ``candidates`` by mean, against ``baseline`` over common seeds, Holm-adjusted
    over the N candidates (see the module's docstring). None when the baseline or every
    candidate is missing.

    Returns ``best``, ``against``, ``n_variants`` (N), ``n_seeds`` (common seeds), ``delta``
    (``mean``, ``ci95``: the interval at ``level``; None without common seeds), ``level``,
    ``p_value`` and ``p_adjusted`` (None when NaN), ``wins`` (True, False or None).
    """
    candidates = [c for c in candidates if accuracies.get(c) and c != baseline]
    base = accuracies.get(baseline)
    if not base or not candidates:
        return None
    diffs = {c: [accuracies[c][s] - base[s] for s in sorted(accuracies[c]) if s in base]
             for c in candidates}
    pvalues = [paired_p(diffs[c]) for c in candidates]
    adjusted = holm(pvalues)
    best = _best_by_mean(accuracies, candidates)
    i, n = candidates.index(best), len(candidates)
    p = pvalues[i]
    rank = n if math.isnan(p) else 1 + sum(q < p for q in pvalues if not math.isnan(q))
    level = 1 - alpha / (n - rank + 1)
    delta = None
    if diffs[best]:
        delta = paired_difference(diffs[best], np.zeros(len(diffs[best])), level=level)
    significant = not math.isnan(adjusted[i]) and adjusted[i] < alpha
    return {"best": best, "against": baseline, "n_variants": n, "n_seeds": len(diffs[best]),
            "delta": delta, "level": level, "p_value": _finite(p),
            "p_adjusted": _finite(adjusted[i]),
            "wins": _answer(delta["ci95"] if delta else None, significant)}


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def decide(accuracies: Accuracies, teacher_accuracy: float | None) -> dict:
    """The three answers of the module's docstring from per-seed test accuracies
    (strategy -> seed -> accuracy) and the teacher's test accuracy.

    ``distil`` (True, False or None: cannot tell), ``best_strategy``, ``delta_vs_ce`` (the best
    distiller minus ce: ``mean`` and ``ci95``, the Holm-level interval; None without ce),
    ``beats_teacher``, ``adjustment`` ("holm, best of N"), ``note`` (why an answer is None),
    and ``best_distilled``, ``n_variants``, ``n_seeds``, ``ci_level``, ``p_value``,
    ``p_adjusted``, ``delta_vs_teacher`` (``mean``, ``ci95`` at 95%), ``teacher_accuracy``.
    """
    accuracies = {n: dict(s) for n, s in accuracies.items() if s}
    distillers = [n for n in accuracies if n != CE]
    q1 = best_of(accuracies, distillers, CE)
    note = None
    if CE not in accuracies:
        note = ("ce (training on labels alone) was not trained, so whether distillation pays "
                "is not answered; add ce to the strategies")
    elif not distillers:
        note = "only ce was trained; add a distilling strategy such as kd"
    elif q1["delta"] is None:
        note = f"{q1['best']} and ce share no seed; train them on the same seeds"
    elif q1["delta"]["ci95"] is None:
        note = (f"{q1['best']} and ce share only one seed; run more seeds"
                if q1["n_seeds"] < 2 else
                f"{q1['best']} differs from ce by the same amount on every seed (zero "
                "variance), so there is no interval; run more seeds")
    distil = q1["wins"] if q1 else None
    if distil is True:
        best = q1["best"]
    elif distil is False:
        best = CE
    else:
        best = _best_by_mean(accuracies, list(accuracies))
    versus_teacher, beats = None, None
    if best is not None and teacher_accuracy is not None:
        per_seed = list(accuracies[best].values())
        versus_teacher = paired_difference(per_seed, [float(teacher_accuracy)] * len(per_seed))
        beats = _answer(versus_teacher["ci95"])
    delta = q1["delta"] if q1 else None
    return {
        "distil": distil,
        "best_strategy": best,
        "delta_vs_ce": {"mean": delta["mean"], "ci95": delta["ci95"]} if delta else None,
        "beats_teacher": beats,
        "adjustment": f"holm, best of {len(distillers)}",
        "note": note,
        "best_distilled": q1["best"] if q1 else _best_by_mean(accuracies, distillers),
        "n_variants": len(distillers),
        "n_seeds": q1["n_seeds"] if q1 else None,
        "ci_level": q1["level"] if q1 else None,
        "p_value": q1["p_value"] if q1 else None,
        "p_adjusted": q1["p_adjusted"] if q1 else None,
        "delta_vs_teacher": versus_teacher,
        "teacher_accuracy": teacher_accuracy,
    }


# --------------------------------------------------------------------------- per class


def per_class_deltas(a: Mapping[int, Mapping[str, float | None]],
                     b: Mapping[int, Mapping[str, float | None]] | Mapping[str, float | None]
                     ) -> dict[str, dict]:
    """Per class, ``a`` minus ``b`` paired over seeds, with p-values corrected across classes.

    ``a`` is seed -> class -> accuracy; ``b`` the same (another strategy) or class -> accuracy
    (the teacher: one number per class, a one-sample test). Returns class -> ``delta``
    (``mean``, ``ci95`` at 95%; None without a common seed), ``p_value`` and ``p_adjusted``
    (Benjamini-Hochberg over the classes that have a p-value; None for a class with one seed or
    zero variance, which is left out of the correction rather than counted as a discovery).
    """
    constant = bool(b) and not isinstance(next(iter(b.values())), Mapping)
    classes: list[str] = []
    for row in a.values():
        classes += [c for c in row if c not in classes]
    out: dict[str, dict] = {}
    for cls in classes:
        diffs = []
        for seed, row in sorted(a.items()):
            other = b.get(cls) if constant else (b.get(seed) or {}).get(cls)
            mine = row.get(cls)
            if _number(mine) and _number(other):
                diffs.append(float(mine) - float(other))
        delta = paired_difference(diffs, np.zeros(len(diffs))) if diffs else None
        out[cls] = {"delta": delta, "p_value": _finite(paired_p(diffs)), "p_adjusted": None}
    tested = [c for c in classes if out[c]["p_value"] is not None]
    if tested:
        adjusted = stats.false_discovery_control([out[c]["p_value"] for c in tested])
        for cls, p in zip(tested, adjusted, strict=True):
            out[cls]["p_adjusted"] = float(p)
    return out


def _number(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def hurts_and_fixes(deltas: Mapping[str, dict], against: str, *, alpha: float = ALPHA,
                    limit: int = 10) -> dict[str, list[dict]]:
    """From :func:`per_class_deltas`, the classes significantly worse (``hurts``, worst first)
    and better (``fixes``, best first) after the correction, at most ``limit`` each; each item
    ``class``, ``delta``, ``p_adjusted``, ``against``."""
    found = [{"class": c, "delta": d["delta"], "p_adjusted": d["p_adjusted"], "against": against}
             for c, d in deltas.items()
             if d["p_adjusted"] is not None and d["p_adjusted"] < alpha and d["delta"]]
    hurts = sorted((f for f in found if f["delta"]["mean"] < 0), key=lambda f: f["delta"]["mean"])
    fixes = sorted((f for f in found if f["delta"]["mean"] > 0), key=lambda f: -f["delta"]["mean"])
    return {"hurts": hurts[:limit], "fixes": fixes[:limit]}
