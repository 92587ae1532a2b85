"""Choosing a tuned setting (relu-6x: each activation's learning rate) on selection seeds only.

A grid with a `[tune]` table runs every value of its tune axis on the selection seeds, picks per cell (every
other axis fixed) the value with the lowest mean metric, and runs its confirmation seeds (the grid's `seeds`) at
that value only. The effect is then estimated on runs that played no part in the choice, so its interval is not
made optimistic by picking the luckiest seeds. The runner and the report call the same `pick`."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def pick(scores: Iterable[tuple[Any, float, float]]) -> Any | None:
    """The value with the lowest mean score; ties go to the lower mean tie-break (e.g. final training error).

    `scores`: (value, score, tie) per selection run; a run that never reached a target scores at its cap (the
    caller decides). None when there is nothing to pick from."""
    table: dict[Any, list[tuple[float, float]]] = {}
    for value, score, tie in scores:
        table.setdefault(value, []).append((score, tie))
    means = {v: (_mean(s for s, _ in rows), _mean(t for _, t in rows)) for v, rows in table.items()}
    means = {v: m for v, m in means.items() if not math.isnan(m[0])}
    if not means:
        return None
    return min(means, key=lambda v: (means[v][0], _nan_last(means[v][1])))


def position(values: list, chosen: Any) -> str:
    """Where a chosen value sits in its sweep, in words: an edge means the best value may lie outside it."""
    ordered = sorted(values, key=float) if all(_is_number(v) for v in values) else list(values)
    if len(ordered) < 3:
        return f"{chosen} of only {len(ordered)} value(s)"
    i = ordered.index(chosen)
    if i == 0:
        return f"{chosen}: the lowest of {ordered} (an edge: a lower value might be better)"
    if i == len(ordered) - 1:
        return f"{chosen}: the highest of {ordered} (an edge: a higher value might be better)"
    return f"{chosen}: inside {ordered}"


def _mean(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else math.nan


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False
