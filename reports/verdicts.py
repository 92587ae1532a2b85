"""A claim's verdict: the regime its runs reached, the interval against no effect and the paper's number, a bound
where runs were censored, and one plain sentence saying why. Pure functions of an Interval and a Claim."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ablations.claims import ERROR_METRICS, THROUGHPUT_METRICS, Claim
from reports.load import canon
from reports.stats import Interval, detectable, seeds_needed

NETS_AT_CHANCE = "not reached: nets at chance"  # the regime of a claim resting on a run that never learned
OVERFIT_POINTS = 15.0  # an over-fitting claim needs the unregularised arm's fair gap (test - clean train) >= this
LRN_ACTS = 1.10  # a normalising claim needs LRN's factor to vary: p95 / p05 over a fixed batch >= this in every
# LRN run (at 1.0 it is a constant scale, 2^-0.75 = 0.59 for k = 2, and its effect is not normalisation's)

# The verdict vocabulary: every verdict starts with one of these, followed by a one-line reason.
REPRODUCED = "reproduced"
SMALLER = "same direction, smaller"
LARGER = "same direction, larger"
NO_EFFECT = "no effect"
OPPOSITE = "opposite"
INCONCLUSIVE = "inconclusive"
NOT_REPRODUCED = "not reproduced"  # no effect detected, and the paper's effect excluded
NOT_TESTABLE = "not testable at this budget"
MEASURED = "measured"  # a line whose paper gives no number: the direction is stated
NO_DATA = "no data"
EQUIVALENT = NO_EFFECT  # an equivalence claim (a margin, no paper number) that holds
NOT_EQUIVALENT = "differs by the margin or more"
VERDICTS = (REPRODUCED, SMALLER, LARGER, NO_EFFECT, OPPOSITE, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTABLE, MEASURED,
            NO_DATA, NOT_EQUIVALENT)


def fmt(x: float, claim: Claim, unit: bool = True) -> str:
    if x is None or math.isnan(x):
        return "-"
    u = claim.unit if unit else ""
    if claim.unit == "%":
        return f"{100 * x:.0f}{u}"
    if claim.effect == "ratio":
        return f"{x:.2f}{u}"
    return f"{x:+.2f}{u}" if claim.scale == 100 else f"{x:+.3g}{u}"


def side_name(claim: Claim, value: Any) -> str:
    """'tanh' for a named value, 'lrn=True' or 'devices=2' for a bare number or switch."""
    text = canon(value)
    return text if isinstance(value, str) and text == value else f"{claim.axis}={text}"


def side_label(claim: Claim, side: str) -> str:
    """Side "a" or "b" of a claim in words: its value, and the metric it is read on where that is not the claim's
    (the two sides of a 10-crop claim are one level, read on the plain view and on ten views)."""
    value, metric = (claim.a if side == "a" else claim.b), claim.metric_of(side)
    name = side_name(claim, value)
    return name if metric == claim.metric and claim.a != claim.b else f"{name} ({metric})"


def metric_range(claim: Claim) -> tuple[float, float]:
    """Where the claim's effect can lie: error differences in [-100, 100] points, ratios in (0, inf)."""
    if claim.effect == "difference" and claim.metric in ERROR_METRICS:
        return -100.0 * (2 if claim.metric == "gap" else 1), 100.0 * (2 if claim.metric == "gap" else 1)
    if claim.effect == "ratio":
        return 0.0, math.inf
    return -math.inf, math.inf


def power(a, b, claim: Claim, paired: bool) -> tuple[float, int | None]:
    """The minimum detectable effect at the measured seed spread (80% power) in the claim's units, and the seed
    pairs that would resolve the paper's effect (None without a paper number or a spread)."""
    if not paired or len(a) < 2:
        return math.nan, None
    a, b = np.asarray(a, float), np.asarray(b, float)
    if claim.effect == "ratio":
        if (a <= 0).any() or (b <= 0).any():
            return math.nan, None
        d, target = np.log(a / b), math.log(claim.paper) if claim.paper else math.nan
        mde = detectable(float(d.std(ddof=1)), len(d))
        return (math.exp(mde) if math.isfinite(mde) else math.nan), seeds_needed(float(d.std(ddof=1)), target)
    d = a - b
    target = claim.margin if claim.margin is not None else (claim.paper if claim.paper is not None else math.nan)
    return detectable(float(d.std(ddof=1)), len(d)), seeds_needed(float(d.std(ddof=1)), target)


def regime_check(claim: Claim, used: dict[str, pd.DataFrame], cens: dict[str, int], cap: float) -> tuple[str, str]:
    """(the regime in words, why the claim is not testable here or ""). Every claim needs nets that learned (a
    run at chance measures nothing); an over-fitting claim needs side a, the unregularised arm, to over-fit
    (fair gap >= OVERFIT_POINTS) and every run to have converged."""
    both = pd.concat([used["a"], used["b"]])
    legacy = both.val_fingerprint.isna() if "val_fingerprint" in both else pd.Series(True, index=both.index)
    if legacy.any() and claim.metric not in THROUGHPUT_METRICS:
        return ("unknown: an earlier recipe",
                f"{int(legacy.sum())} of {len(both)} runs predate the validation split and the paper-recipe "
                f"switches; rerun the grid")
    words, why = _regime(claim, used, both, cens)
    if claim.metric not in THROUGHPUT_METRICS and "learned" in both:
        flat = both.learned.map(lambda v: str(v).strip().lower() in ("false", "0", "0.0"))
        if flat.any():  # named first, with the regime's own failures after it: fixing one may not make it testable
            chance = (f"{int(flat.sum())} of {len(both)} runs did not learn (final training loss at chance or a "
                      f"single predicted class), so any difference is between nets that predict nothing")
            return NETS_AT_CHANCE, "; and ".join(w for w in (chance, why) if w)
    return words, why


def _regime(claim: Claim, used: dict[str, pd.DataFrame], both: pd.DataFrame, cens: dict[str, int]) -> tuple[str, str]:
    """The claim's own regime condition (target crossed, over-fitting and converged, LRN acting), chance aside."""
    if claim.regime == "normalising":
        return _normalising(both)
    if claim.regime != "overfitting":
        if claim.metric.startswith(("epochs_to", "seconds_to")):
            n = sum(cens.values())
            return ("reached: every run crossed the target" if not n else
                    f"not reached: {n} of {len(both)} runs never crossed the target"), ""
        if claim.metric in THROUGHPUT_METRICS:
            return "speed: no regime condition", ""
        return ("reached: every run learned (none at chance)" if "learned" in both else
                "unknown: no chance check recorded"), ""
    side_a = used["a"]
    if "clean_train_error" not in side_a or side_a.clean_train_error.isna().all():
        return "unknown", ("no clean (eval-mode) training error was recorded for these runs, so over-fitting "
                           "cannot be measured fairly; rerun the grid")
    gap = 100 * float((side_a.test_error - side_a.clean_train_error).mean())
    def done(runs: pd.DataFrame) -> pd.Series:
        return runs.converged.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")) \
            if "converged" in runs else pd.Series(False, index=runs.index)
    converged = done(both)
    words = f"unregularised gap {gap:.1f} points (needs >= {OVERFIT_POINTS:g}); {int(converged.sum())} of " \
            f"{len(both)} runs converged"
    why = []  # every condition that fails, not only the first
    if gap < OVERFIT_POINTS:
        why.append(f"{side_label(claim, 'a')} does not over-fit here (test error {gap:.1f} points above its clean "
                   f"training error, fewer than {OVERFIT_POINTS:g}): a regulariser has nothing to cure")
    if not converged.all():
        which = "; ".join(f"{side_label(claim, k)} seed(s) {', '.join(str(int(x)) for x in sorted(seeds))}"
                          for k, seeds in ((k, used[k].seed[~done(used[k])]) for k in ("a", "b")) if len(seeds))
        why.append(f"{int((~converged).sum())} of {len(both)} runs had not converged (fewer than two rate drops "
                   f"and validation error still moving: {which})")
    return (f"not reached: {words}", "; and ".join(why)) if why else (f"reached: {words}", "")


def _normalising(both: pd.DataFrame) -> tuple[str, str]:
    """LRN acted in every LRN run: its factor's spread (p95 / p05) over the fixed batch is at least LRN_ACTS."""
    spread = pd.to_numeric(both.get("lrn_factor_spread", pd.Series(dtype=float)), errors="coerce").dropna()
    if spread.empty:
        return "unknown", ("no LRN factor was recorded for these runs, so whether LRN normalised anything cannot be "
                           "told; rerun the grid")
    words = f"LRN factor spread {spread.min():.2f}-{spread.max():.2f}x (needs >= {LRN_ACTS:g}x in every LRN run)"
    if spread.min() < LRN_ACTS:
        return f"not reached: {words}", (f"LRN did not normalise in {int((spread < LRN_ACTS).sum())} of "
                                         f"{len(spread)} LRN runs (its factor spread {spread.min():.2f}x, under "
                                         f"{LRN_ACTS:g}x): there it scales by a near-constant, so a difference "
                                         f"measures that scale, not normalisation")
    return f"reached: {words}", ""


def decide(iv: Interval, claim: Claim, bound: str, mde: float, needed: int | None, untestable: str,
           used: dict[str, pd.DataFrame], cap: float, cens: dict[str, int]) -> tuple[str, str]:
    """(verdict, reason). Regime first, then censoring (a bound), then the interval against the paper."""
    if untestable:
        return NOT_TESTABLE, untestable
    if bound:
        return _bound_verdict(iv, claim, bound, used, cap, cens)
    text = verdict(iv, claim)
    return text, _reason(text, iv, claim, mde, needed)


def _bound_verdict(iv: Interval, claim: Claim, bound: str, used: dict, cap: float, cens: dict) -> tuple[str, str]:
    """A censored run gives a bound, not a value: the effect is at least (or at most) the estimate counted at
    the cap. It decides only when even the bound lies beyond the paper's number; otherwise it says what is not
    excluded."""
    a, b = side_label(claim, 'a'), side_label(claim, 'b')
    at = "their training time" if claim.metric.startswith("seconds") else f"the {cap:g}-epoch cap"
    who = "; ".join(f"{n} of {len(used[k])} {side} runs never reached the target by {at}"
                    for k, side, n in (("a", a, cens["a"]), ("b", b, cens["b"])) if n)
    est = fmt(iv.estimate, claim)
    if bound == "mixed":
        return NOT_TESTABLE, f"{who}: both sides are censored, so neither a value nor a bound can be read"
    if claim.paper is None:
        return NOT_TESTABLE, f"{who}: the effect is {'at least' if bound == 'lower' else 'at most'} {est}"
    towards = (bound == "lower") == (claim.paper > claim.reference)  # the truth may lie further the paper's way
    paper = fmt(claim.paper, claim)
    if towards and ((iv.estimate >= claim.paper) if claim.paper > claim.reference else (iv.estimate <= claim.paper)):
        return REPRODUCED, f"{who}; even so the effect is at least {est}, as large as the paper's {paper}"
    if claim.effect == "ratio":
        reading = (f"{a} took at least {est} as long as {b}" if bound == "lower"
                   else f"{a} took at most {est} as long as {b}")
    else:
        reading = f"the difference is {'at least' if bound == 'lower' else 'at most'} {est}"
    excluded = "is not excluded" if towards else "cannot be reached from here"
    return NOT_TESTABLE, f"{who}: {reading}; the paper's {paper} {excluded}; a higher epoch cap would tell"


def _reason(text: str, iv: Interval, claim: Claim, mde: float, needed: int | None) -> str:
    """One plain sentence for a verdict read off an interval."""
    if text == NO_DATA:
        return "no runs to compare"
    lo, hi = fmt(iv.lo, claim, unit=False), fmt(iv.hi, claim, unit=False)
    span = f"[{lo}, {hi}]"
    none = "1x" if claim.effect == "ratio" else "0"
    paper = fmt(claim.paper, claim) if claim.paper is not None else ""
    power_note = ""
    if math.isfinite(mde) and claim.per == 1:  # a per-N line (efficiency) shares its speed-up's power: that row says it
        power_note = f"; these seeds detect only effects of {fmt(mde, claim)} or more (80% power)"
        target = claim.margin if claim.margin is not None else claim.paper
        if target is not None and needed and (mde > abs(target) if claim.effect != "ratio" else mde > target):
            power_note += f"; underpowered: about {needed} seeds would resolve {fmt(target, claim)}"
        elif target is not None and needed is None:
            power_note += "; underpowered: more than 200 seeds would be needed at this spread"
    if not iv.has_interval:
        return "a single seed pair: no interval, so no verdict"
    if text.startswith(NO_EFFECT):
        base = f"the whole interval {span} lies inside the ±{claim.margin:g}{claim.unit} margin"
    elif text.startswith(NOT_EQUIVALENT):
        base = f"the interval {span} lies at or beyond the ±{claim.margin:g}{claim.unit} margin"
    elif text == REPRODUCED:
        base = f"the interval {span} excludes no effect ({none}) and includes the paper's {paper}"
    elif text == SMALLER:
        base = f"the interval {span} excludes no effect ({none}) but stays short of the paper's {paper}"
    elif text == LARGER:
        base = f"the interval {span} excludes no effect ({none}) and lies beyond the paper's {paper}"
    elif text == OPPOSITE:
        base = f"the interval {span} lies on the other side of no effect ({none}) from the paper's {paper}"
    elif text.startswith(MEASURED):
        base = f"the paper gives no number; the interval is {span}"
    elif text == NOT_REPRODUCED:
        base = f"the interval {span} includes no effect ({none}) and excludes the paper's {paper}"
    else:
        base = f"the interval {span} includes no effect ({none})" + (
            f" and the paper's {paper}" if claim.paper is not None and iv.lo <= claim.paper <= iv.hi else "")
    return base + power_note


def verdict(iv: Interval, claim: Claim) -> str:
    """The rule written in REPORT.md: the interval against no effect (0 or 1) and the paper's number."""
    if iv.method == "none":
        return NO_DATA
    if not iv.has_interval:
        return INCONCLUSIVE
    if claim.margin is not None:  # equivalence: the whole interval inside (-margin, margin), or wholly outside
        m, unit = claim.margin, claim.unit
        if -m < iv.lo and iv.hi < m:
            return f"{EQUIVALENT}: within ±{m:g}{unit}"
        if iv.lo >= m or iv.hi <= -m:
            return f"{NOT_EQUIVALENT}: differs by {m:g}{unit} or more"
        return INCONCLUSIVE
    ref = claim.reference
    if claim.paper is None or claim.paper == ref:
        a, b = side_label(claim, 'a'), side_label(claim, 'b')
        a_b = f"{a} - {b}" if claim.effect == "difference" else f"{a} / {b}"
        a_b += f" / {claim.per:g}" if claim.per != 1 else ""
        if iv.lo > ref:
            return f"{MEASURED}: {a_b} > {ref:g}"
        if iv.hi < ref:
            return f"{MEASURED}: {a_b} < {ref:g}"
        return f"{MEASURED}: {a_b} spans {ref:g}"
    s = 1.0 if claim.paper > ref else -1.0  # flip so that the paper's direction is positive
    lo, hi = sorted(((iv.lo - ref) * s, (iv.hi - ref) * s))
    p = (claim.paper - ref) * s
    if lo > 0:
        if hi < p:
            return SMALLER
        return LARGER if lo > p else REPRODUCED
    if hi < 0:
        return OPPOSITE
    return NOT_REPRODUCED if hi < p else INCONCLUSIVE
