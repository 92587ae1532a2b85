"""Statistics over seeds: means with t-intervals, paired effects, a bootstrap for unpaired sides.

Why t-intervals for paired effects: with 2-5 seeds a percentile bootstrap only reshuffles the few values it
has and comes out too narrow; the t-interval widens honestly as n shrinks. Ratios are paired on the log scale
(a geometric mean of per-seed ratios), where a ratio's noise is roughly symmetric. The bootstrap is kept for
sides whose seeds do not pair, where the statistic is a ratio or difference of two independent means.
The t quantile is computed here (exact finite series for integer degrees of freedom), so no scipy.

Bounded metrics: an error rate lies in [0, 1] and a difference of two in [-1, 1]; a t-interval from few seeds can
reach past that (82% [-8, 173]). `clip` intersects it with the metric's range. This loses no coverage: the true
value always lies inside the range, so whenever the t-interval covers it, the clipped one does too; it only drops
values that cannot be true. (A logit-scale interval would also stay inside, but it needs a per-seed value strictly
inside (0, 1) and changes what is averaged; clipping keeps the plain mean and its usual interval.)

Power: `detectable` is the smallest true effect a paired t-test at the measured seed spread finds with 80% power
(two-sided 5%): (t_0.975 + t_0.80) x sd / sqrt(n) with n - 1 degrees of freedom, and `seeds_needed` the fewest
pairs for which that falls to a given effect."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ablations.claims import ERROR_METRICS

LEVEL = 0.95
N_RESAMPLES = 5000
RNG_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval; lo = hi = nan when there is none (a single seed)."""

    estimate: float
    lo: float
    hi: float
    n: int  # seed pairs (paired) or the smaller side (unpaired)
    method: str  # "paired t" | "paired t on log ratios" | "bootstrap" | "paired bootstrap" | "single"

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi))


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df: Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2))]
        term, series = math.cos(theta), 0.0
        for k in range((df - 1) // 2):
            series += term
            term *= (2 * k + 2) / (2 * k + 3) * c2
        return 2 / math.pi * (theta + s * series)
    term, series = 1.0, 0.0  # sin(theta) [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
    for k in range(df // 2):
        series += term
        term *= (2 * k + 1) / (2 * k + 2) * c2
    return s * series


def t_critical(level: float, df: int) -> float:
    """The t with P(|T| < t) = level (1.96-ish for large df; 12.71 for df = 1 at 95%), by bisection."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_two_sided_cdf(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def clip(iv: Interval, low: float, high: float) -> Interval:
    """The interval intersected with the metric's range [low, high] (see the module docstring for why)."""
    if not iv.has_interval or (iv.lo >= low and iv.hi <= high):
        return iv
    return Interval(iv.estimate, max(iv.lo, low), min(iv.hi, high), iv.n, iv.method + ", clipped to the range")


POWER = 0.80


def detectable(sd: float, n: int, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test finds with `power` at this seed spread (sd of the
    per-seed differences, or of log ratios), n pairs. nan below two pairs."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    one_sided = t_critical(2 * power - 1, n - 1)  # P(T < t) = power  <=>  P(|T| < t) = 2 power - 1
    return (t_critical(level, n - 1) + one_sided) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, level: float = LEVEL, power: float = POWER, most: int = 200) -> int | None:
    """The fewest seed pairs whose detectable effect is at most |effect| at this spread; None beyond `most`."""
    if not math.isfinite(sd) or not math.isfinite(effect) or effect == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if detectable(sd, n, level, power) <= abs(effect):
            return n
    return None


def mean_ci(values, level: float = LEVEL) -> Interval:
    """Mean and t-interval over seeds: mean +- t(level, n-1) * sd / sqrt(n). NaNs are dropped."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, "single")
    half = t_critical(level, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t")


def paired_difference(a, b, level: float = LEVEL) -> Interval:
    """Mean of per-seed differences a_i - b_i with its t-interval."""
    d = mean_ci(np.asarray(a, float) - np.asarray(b, float), level)
    return Interval(d.estimate, d.lo, d.hi, d.n, "paired t" if d.n > 1 else "single")


def paired_ratio(a, b, level: float = LEVEL) -> Interval:
    """Geometric mean of per-seed ratios a_i / b_i, t-interval on the log scale, back-transformed."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("a ratio on the log scale needs positive values")
    d = mean_ci(np.log(a / b), level)
    return Interval(math.exp(d.estimate), math.exp(d.lo), math.exp(d.hi), d.n,
                    "paired t on log ratios" if d.n > 1 else "single")


def _effect(mean_a, mean_b, effect: str):
    return mean_a / mean_b if effect == "ratio" else mean_a - mean_b


def bootstrap(a, b, effect: str, paired: bool, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
              seed: int = RNG_SEED) -> Interval:
    """Percentile bootstrap of mean(a)/mean(b) or mean(a)-mean(b); paired resamples index pairs together.

    A fixed RNG seed makes the interval reproducible from the same results."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if paired and len(a) != len(b):
        raise ValueError("paired bootstrap needs equally many a and b values")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), size=(n_resamples, len(a)))  # (R, n_a)
    ib = ia if paired else rng.integers(0, len(b), size=(n_resamples, len(b)))  # (R, n_b)
    stats = _effect(a[ia].mean(axis=1), b[ib].mean(axis=1), effect)  # (R,)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return Interval(float(_effect(a.mean(), b.mean(), effect)), float(lo), float(hi), min(len(a), len(b)),
                    "paired bootstrap" if paired else "bootstrap")


def compare(a, b, effect: str, paired: bool, level: float = LEVEL) -> Interval:
    """The effect of side a against side b with a 95% interval, or a point estimate when there is no spread.

    Paired (same seeds, in the same order): t-interval on per-seed differences or log ratios. Unpaired: bootstrap.
    Fewer than two values on a side (or two pairs) leaves no interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    if (paired and len(a) < 2) or (not paired and min(len(a), len(b)) < 2):
        return Interval(float(_effect(a.mean(), b.mean(), effect)), math.nan, math.nan, min(len(a), len(b)),
                        "single")
    if not paired:
        return bootstrap(a, b, effect, paired=False, level=level)
    if effect == "difference":
        return paired_difference(a, b, level)
    if (a > 0).all() and (b > 0).all():
        return paired_ratio(a, b, level)
    return bootstrap(a, b, effect, paired=True, level=level)


def cell_range(metric: str) -> tuple[float, float]:
    """Where one run's value of a metric can lie: error rates (fractions) in [0, 1], the over-fitting gap (test
    minus clean training error) in [-1, 1], the LRN factor spread (p95 / p05) at least 1, and every other
    recorded metric (losses, epochs, seconds, rates, LRN factors) at least 0."""
    if metric == "gap":
        return -1.0, 1.0
    if metric in ERROR_METRICS:
        return 0.0, 1.0
    return (1.0 if metric == "lrn_factor_spread" else 0.0), math.inf


def cell_summary(runs: pd.DataFrame, by: list[str], metrics: list[str], level: float = LEVEL) -> pd.DataFrame:
    """Per cell (every axis but the seed): n, mean and the 95% t-interval of each metric over seeds, clipped to the
    metric's range (`cell_range`), so a cell near 0% error shows [0.0, 1.7] and not [-0.8, 1.7]."""
    rows = []
    for key, cell in runs.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key), n=len(cell))
        for m in metrics:
            if m not in cell:
                continue
            iv = clip(mean_ci(pd.to_numeric(cell[m], errors="coerce"), level), *cell_range(m))
            row.update({m: iv.estimate, f"{m}_lo": iv.lo, f"{m}_hi": iv.hi, f"{m}_n": iv.n})
        rows.append(row)
    return pd.DataFrame(rows)
