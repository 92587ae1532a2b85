"""Each claim's effect, interval and verdict, computed from runs.csv.

A claim (a `[[claims]]` table of the grid TOML, copied into grid.json) compares values a and b of one axis on one
metric, as a ratio a/b or a difference a - b (error metrics in percentage points). Runs of a and b with the same
seed are paired. Every other axis that varies on its own (not the claim's axis, its tune axis, a fixed filter,
or an axis zipped to one of those) splits the claim into one row per value: relu-6x gets a row per condition.
A `tune` axis is chosen per side and per row first: its value with the lowest mean metric over seeds."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

import numpy as np

from ablations.choices import FINISHED
from ablations.tune import pick, position
from reports.load import GridResults, canon
from reports.stats import Interval, clip, compare, detectable, seeds_needed

ERROR_METRICS = {"train_error", "test_error", "test_error_top5", "test_error_at_best_val", "gap", "val_error",
                 "clean_train_error"}
TIE_BREAK = "train_error"  # among tune values with equal mean metric (e.g. all censored), the one that got closer
THROUGHPUT_METRICS = {"images_per_second"}  # a speed needs no learning: the chance guard leaves these alone
OVERFIT_POINTS = 15.0  # an over-fitting claim needs the unregularised arm's fair gap (test - clean train) >= this

# The verdict vocabulary: every verdict starts with one of these, followed by a one-line reason.
REPRODUCED = "reproduced"
SMALLER = "same direction, smaller"
LARGER = "same direction, larger"
NO_EFFECT = "no effect"
OPPOSITE = "opposite"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable at this budget"
MEASURED = "measured"  # a line whose paper gives no number: the direction is stated
NO_DATA = "no data"
EQUIVALENT = NO_EFFECT  # an equivalence claim (a margin, no paper number) that holds
NOT_EQUIVALENT = "differs by the margin or more"
VERDICTS = (REPRODUCED, SMALLER, LARGER, NO_EFFECT, OPPOSITE, INCONCLUSIVE, NOT_TESTABLE, MEASURED, NO_DATA,
            NOT_EQUIVALENT)


@dataclass(frozen=True)
class Claim:
    id: str
    paper_claim: str
    title: str
    metric: str
    axis: str
    a: Any
    b: Any
    effect: str  # "ratio" | "difference"
    paper: float | None = None  # in the claim's convention: positive = the paper's direction
    tune: str | None = None
    fixed: tuple[tuple[str, Any], ...] = ()
    tune_metric: str | None = None  # the metric that picks the tune value (default: metric)
    per: float = 1.0  # the effect is divided by this (scaling efficiency = speed-up / N)
    secondary: bool = False  # a line the report adds under a declared claim
    margin: float | None = None  # an equivalence claim: |a - b| < margin, in the claim's units (points)
    regime: str = "learning"  # "overfitting": only testable where the unregularised side a over-fits

    @property
    def reference(self) -> float:
        return 1.0 if self.effect == "ratio" else 0.0

    @property
    def scale(self) -> float:
        return 100.0 if self.effect == "difference" and self.metric in ERROR_METRICS else 1.0

    @property
    def unit(self) -> str:
        if self.effect == "ratio":
            return "%" if self.per != 1 else "x"
        return " pts" if self.scale == 100 else ""


@dataclass(frozen=True)
class ClaimResult:
    grid: str
    claim: Claim
    split: tuple[tuple[str, str], ...]  # the row's values of the splitting axes
    interval: Interval
    paired: bool
    n_a: int
    n_b: int
    censored_a: int
    censored_b: int
    cap: float  # the epoch cap censored runs count at
    tuned_a: str | None
    tuned_b: str | None
    runs_a: tuple[str, ...]
    runs_b: tuple[str, ...]
    verdict: str
    bound: str  # "" | "lower" | "upper" | "mixed": the effect is a bound because of censored runs
    notes: tuple[str, ...]
    dataset_label: str
    budget: str
    precision: str = ""  # the precisions of the runs, as recorded (e.g. "bf16", "bf16, fp32")
    reason: str = ""  # the verdict in one plain sentence
    detectable: float = math.nan  # the smallest effect these seeds detect with 80% power, in the claim's units
    seeds_needed: int | None = None  # seed pairs that would resolve the paper's effect at the measured spread
    regime: str = ""  # whether the runs reached the regime the claim is about, in words
    selection: str = ""  # how the tune value was chosen, on which seeds

    @property
    def split_label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.split)

    @property
    def label(self) -> str:
        return f"{self.claim.id} [{self.split_label}]" if self.split else self.claim.id

    @property
    def n_text(self) -> str:
        if self.interval.method == "none":
            return "0"
        return f"{self.n_a}+{self.n_b} (unpaired)" if not self.paired else str(self.interval.n)

    def ours_text(self) -> str:
        iv, c = self.interval, self.claim
        if iv.method == "none":
            return "-"
        sign = {"lower": "≥ ", "upper": "≤ "}.get(self.bound, "")
        text = sign + fmt(iv.estimate, c)
        if self.bound:  # censored runs: a bound, never an interval
            pass
        elif iv.has_interval:
            text += f" [{fmt(iv.lo, c, unit=False)}, {fmt(iv.hi, c, unit=False)}]"
        else:
            text += " (single seed: no interval)"
        censored = [self._censored_text(n, used, value)
                    for n, used, value in ((self.censored_a, self.runs_a, c.a), (self.censored_b, self.runs_b, c.b))
                    if n]
        if censored:
            text += f" ({'; '.join(censored)})"
        return text

    def _censored_text(self, n: int, used: tuple[str, ...], value: Any) -> str:
        at = "their training time" if self.claim.metric.startswith("seconds") else f"{self.cap:g} epochs"
        return f"{n} of {len(used)} {side_name(self.claim, value)} runs censored at {at}"

    def paper_text(self) -> str:
        if self.claim.margin is not None:
            return f"within ±{self.claim.margin:g}{self.claim.unit} (our margin)"
        return "no number" if self.claim.paper is None else fmt(self.claim.paper, self.claim)

    def row(self) -> dict[str, Any]:
        """One line of verdicts.csv."""
        c, iv = self.claim, self.interval
        return {"grid": self.grid, "claim": c.id, "paper_claim": c.paper_claim, "title": c.title,
                "split": self.split_label, "secondary": c.secondary, "metric": c.metric, "axis": c.axis,
                "a": canon(c.a), "b": canon(c.b), "effect": c.effect, "unit": c.unit.strip(),
                "paper": c.paper, "margin": c.margin, "estimate": iv.estimate * (100 if c.unit == "%" else 1),
                "lo": iv.lo * (100 if c.unit == "%" else 1), "hi": iv.hi * (100 if c.unit == "%" else 1),
                "method": iv.method, "paired": self.paired, "n": self.n_text, "n_a": self.n_a, "n_b": self.n_b,
                "bound": self.bound, "censored_a": self.censored_a, "censored_b": self.censored_b,
                "tuned_a": self.tuned_a or "", "tuned_b": self.tuned_b or "", "verdict": self.verdict,
                "paper_text": self.paper_text(), "ours": self.ours_text(), "notes": "; ".join(self.notes),
                "dataset_label": self.dataset_label, "budget": self.budget, "precision": self.precision,
                "reason": self.reason, "detectable": self.detectable, "seeds_needed": self.seeds_needed,
                "regime": self.regime, "selection": self.selection,
                "runs_a": " ".join(self.runs_a), "runs_b": " ".join(self.runs_b)}


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


# ---------------------------------------------------------------- claims of a grid

def claims_of(grid: GridResults) -> list[Claim]:
    """The grid's declared claims plus the secondary lines the report always shows with them:
    seconds to target beside epochs to target, top-5 beside top-1 on CIFAR-100, scaling efficiency (and
    accuracy parity, unless declared) beside a data-parallel speed-up."""
    raw = grid.meta.get("claims", [])
    declared = {(c.get("metric"), c.get("axis"), canon(c.get("a")), canon(c.get("b"))) for c in raw}
    cifar100 = "cifar100" in grid.label("dataset")
    out = []
    for c in raw:
        claim = Claim(id=c["id"], paper_claim=c.get("paper_claim") or c["id"], title=c.get("title") or c["id"],
                      metric=c["metric"], axis=c["axis"], a=c["a"], b=c["b"], effect=c["effect"],
                      paper=c.get("paper"), tune=c.get("tune"), fixed=tuple(sorted((c.get("fixed") or {}).items())),
                      margin=c.get("margin"), regime=c.get("regime") or "learning")
        out.append(claim)
        key = (claim.axis, canon(claim.a), canon(claim.b))
        if claim.metric == "epochs_to_target":
            out.append(dataclasses.replace(
                claim, id=f"{claim.id}/seconds", metric="seconds_to_target", paper=None, secondary=True,
                tune_metric="epochs_to_target", title=f"{claim.title}: the same runs in training seconds"))
        if (claim.metric == "test_error" and claim.effect == "difference" and cifar100
                and ("test_error_top5", *key) not in declared):
            out.append(dataclasses.replace(claim, id=f"{claim.id}/top5", metric="test_error_top5", paper=None,
                                           secondary=True, title=f"{claim.title} (top-5)"))
        if claim.axis == "devices" and claim.metric == "images_per_second" and claim.effect == "ratio":
            n = float(claim.a) / float(claim.b)
            out.append(dataclasses.replace(claim, id=f"{claim.id}/efficiency", per=n, paper=None, secondary=True,
                                           title=f"Scaling efficiency: speed-up / {n:g}"))
            if ("test_error", *key) not in declared:
                out.append(dataclasses.replace(claim, id=f"{claim.id}/accuracy", metric="test_error",
                                               effect="difference", paper=None, secondary=True,
                                               title="Test top-1 error, N devices minus one"))
    return out


def keyed(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Axis columns in one canonical spelling, so TOML values, JSON values and CSV columns compare equal."""
    return runs.assign(**{a: runs[a].map(canon) for a in axes if a in runs})


def determined(runs: pd.DataFrame, column: str, by: list[str]) -> bool:
    """True when `column` takes one value for each combination of `by` (a zip partner, not a factor of its own)."""
    if not by:
        return runs[column].nunique(dropna=False) <= 1
    return bool((runs.groupby(by, dropna=False)[column].nunique(dropna=False) <= 1).all())


def split_axes(runs: pd.DataFrame, axes: list[str], claim: Claim) -> list[str]:
    """The axes that split a claim into rows: they vary, and no axis already accounted for determines them."""
    base = [claim.axis] + ([claim.tune] if claim.tune else [])
    skip = set(base) | {k for k, _ in claim.fixed} | {"seed"}
    kept: list[str] = []
    for axis in axes:
        if axis in skip or axis not in runs or runs[axis].nunique() < 2:
            continue
        if not determined(runs, axis, base + kept):
            kept.append(axis)
    return kept


# ---------------------------------------------------------------- evaluation

def evaluate(grid: GridResults) -> list[ClaimResult]:
    runs = keyed(grid.runs, grid.axes)
    return [r for claim in claims_of(grid) for r in evaluate_claim(grid, claim, runs)]


def evaluate_claim(grid: GridResults, claim: Claim, runs: pd.DataFrame) -> list[ClaimResult]:
    """One result per row of the claim (per value of its splitting axes)."""
    if claim.axis not in runs or not len(runs):
        return [_empty(grid, claim, (), "no runs")]
    splits = split_axes(runs, grid.axes, claim)
    usable = runs[runs.status.isin(FINISHED)]
    for key, value in claim.fixed:
        if key in usable:
            usable = usable[usable[key] == canon(value)]
    if not splits:
        return [_evaluate_row(grid, claim, usable, ())]
    out = []
    for values, _ in runs.groupby(splits, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        split = tuple(zip(splits, values))
        rows = usable
        for axis, value in split:
            rows = rows[rows[axis] == value]
        out.append(_evaluate_row(grid, claim, rows, split))
    return out


def pick_tuned(side: pd.DataFrame, tune: str, metric: str) -> str | None:
    """The tune value with the lowest mean metric over seeds (censored runs already count at the cap), ties to
    the lower final training error: ablations/tune.pick, the rule the runner used."""
    tie = side[TIE_BREAK] if TIE_BREAK in side else side[metric]
    return pick(zip(side[tune], side[metric], tie))


def _tuned_side(grid: GridResults, claim: Claim, side: pd.DataFrame) -> tuple[pd.DataFrame, str | None, str]:
    """The runs that estimate the effect for one side of a tuned claim, the chosen value, and how it was chosen.

    With a `[tune]` table (grid.json), the value is chosen on the selection seeds and the effect read on the other
    (confirmation) seeds at that value. Without one, on the same seeds (an optimistic interval, said so)."""
    tune = grid.meta.get("tune") or {}
    # the rule the runner used: the grid's [tune] metric when it tunes this axis, else the claim's own
    metric = tune["metric"] if tune.get("axis") == claim.tune and tune.get("metric") in side else \
        (claim.tune_metric or claim.metric)
    values = sorted(side[claim.tune].unique(), key=lambda v: float(v) if _number(v) else v)
    if tune.get("axis") != claim.tune:
        chosen = pick_tuned(side, claim.tune, metric)
        where = (position(values, chosen) + _lr_note(side[side[claim.tune] == chosen], claim.tune)
                 if chosen is not None else "")
        return side[side[claim.tune] == chosen], chosen, (f"{where}; chosen and estimated on the same seeds, "
                                                          f"so the interval is optimistic")
    sel_seeds = set(tune.get("seeds") or [])
    selection = side[side.seed.isin(sel_seeds)]
    planned = len(sel_seeds) * len((grid.meta.get("axis_values") or {}).get(claim.tune) or values)
    chosen = pick_tuned(selection, claim.tune, metric) if len(selection) else None
    if chosen is None or len(selection) < planned:
        return side.iloc[:0], None, f"selection runs pending ({len(selection)} of {planned} done)"
    confirm = side[~side.seed.isin(sel_seeds) & (side[claim.tune] == chosen)]
    where = position(sorted(selection[claim.tune].unique(), key=lambda v: float(v) if _number(v) else v), chosen)
    where += _lr_note(selection[selection[claim.tune] == chosen], claim.tune)
    seeds = ", ".join(str(int(x)) for x in sorted(sel_seeds))
    return confirm, chosen, f"{where}; chosen on seeds {seeds}, estimated on seeds " + (
        ", ".join(str(int(x)) for x in sorted(confirm.seed.unique())) or "(none yet)")


def _number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _evaluate_row(grid: GridResults, claim: Claim, rows: pd.DataFrame,
                  split: tuple[tuple[str, str], ...]) -> ClaimResult:
    sides, tuned, notes, how = {}, {}, [], {}
    for name, value in (("a", claim.a), ("b", claim.b)):
        side = rows[rows[claim.axis] == canon(value)]
        side = side[side[claim.metric].notna()] if claim.metric in side else side.iloc[:0]
        if claim.tune and claim.tune in side and len(side):
            side, tuned[name], how[name] = _tuned_side(grid, claim, side)
        sides[name] = side
    selection = "; ".join(f"{side_name(claim, v)}: {claim.tune} {how[n]}" for n, v in (("a", claim.a),
                                                                                      ("b", claim.b)) if n in how)
    missing = [side_name(claim, v) for n, v in (("a", claim.a), ("b", claim.b)) if not len(sides[n])]
    if missing:
        why = f"no finished runs with {claim.metric} for {' and '.join(missing)}"
        if "pending" in selection:
            why += " (the learning-rate selection is not finished: rerun the grid)"
        elif "(none yet)" in selection:
            why += " (confirmation runs not made yet: rerun the grid)"
        return dataclasses.replace(_empty(grid, claim, split, why), selection=selection, reason=why)

    per_seed = {n: s.groupby("seed")[claim.metric].mean() * claim.scale for n, s in sides.items()}
    if any(s.seed.duplicated().any() for s in sides.values()):
        notes.append("more than one run per seed on a side (settings outside the axes differ): averaged")
    common = sorted(set(per_seed["a"].index) & set(per_seed["b"].index))
    if len(common) >= 2 or (common and min(len(per_seed["a"]), len(per_seed["b"])) < 2):
        paired = True
        va, vb = per_seed["a"].loc[common], per_seed["b"].loc[common]
        left = len(per_seed["a"]) + len(per_seed["b"]) - 2 * len(common)
        if left:
            notes.append(f"{left} run(s) without a partner seed left out")
    else:
        paired = False
        va, vb = per_seed["a"], per_seed["b"]
        if min(len(va), len(vb)) >= 2:
            notes.append("seeds do not pair: unpaired bootstrap")
    used = {n: sides[n][sides[n].seed.isin(v.index)] for n, v in (("a", va), ("b", vb))}

    iv = compare(va.to_numpy(), vb.to_numpy(), claim.effect, paired)
    low, high = metric_range(claim)
    iv = clip(iv, low, high)
    if claim.per != 1:
        iv = dataclasses.replace(iv, estimate=iv.estimate / claim.per, lo=iv.lo / claim.per, hi=iv.hi / claim.per)
    flag = f"{claim.metric}_censored"
    cens = {n: int(u[flag].sum()) if flag in u else 0 for n, u in used.items()}
    bound = {(True, False): "lower", (False, True): "upper", (True, True): "mixed"}.get(
        (cens["a"] > 0, cens["b"] > 0), "")
    diverged = sum(int((u.status == "diverged").sum()) for u in used.values())
    if diverged:
        notes.append(f"{diverged} diverged run(s) included" + (" (never reached the target: censored)"
                                                              if flag in rows else ""))
    if paired and iv.has_interval and not bound:
        notes.append(iv.method)
    cap = float(pd.concat([used["a"], used["b"]])["epochs"].max()) if "epochs" in rows else math.nan
    mde, needed = power(va.to_numpy(), vb.to_numpy(), claim, paired)
    regime, untestable = regime_check(claim, used, cens, cap)
    text, reason = decide(iv, claim, bound, mde, needed, untestable, used, cap, cens)
    return ClaimResult(grid=grid.name, claim=claim, split=split, interval=iv, paired=paired,
                       n_a=len(va), n_b=len(vb), censored_a=cens["a"], censored_b=cens["b"], cap=cap,
                       tuned_a=tuned.get("a"), tuned_b=tuned.get("b"),
                       runs_a=tuple(used["a"].run_id), runs_b=tuple(used["b"].run_id),
                       verdict=text, bound=bound, notes=tuple(notes),
                       dataset_label=grid.label("dataset_label"), budget=grid.label("budget"),
                       precision=grid.label("precision"), reason=reason, detectable=mde, seeds_needed=needed,
                       regime=regime, selection=selection)


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
    if claim.metric not in THROUGHPUT_METRICS and "learned" in both:
        flat = both.learned.map(lambda v: str(v).strip().lower() in ("false", "0", "0.0"))
        if flat.any():
            return ("not reached: nets at chance",
                    f"{int(flat.sum())} of {len(both)} runs did not learn (final training loss at chance or a "
                    f"single predicted class), so any difference is between nets that predict nothing")
    if claim.regime != "overfitting":
        if claim.metric.startswith(("epochs_to", "seconds_to")):
            n = sum(cens.values())
            return ("reached: every run crossed the target" if not n else
                    f"not reached: {n} of {len(both)} runs never crossed the target"), ""
        return "learning (no regime condition)", ""
    side_a = used["a"]
    if "clean_train_error" not in side_a or side_a.clean_train_error.isna().all():
        return "unknown", ("no clean (eval-mode) training error was recorded for these runs, so over-fitting "
                           "cannot be measured fairly; rerun the grid")
    gap = 100 * float((side_a.test_error - side_a.clean_train_error).mean())
    converged = both.converged.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")) \
        if "converged" in both else pd.Series(False, index=both.index)
    words = f"unregularised gap {gap:.1f} points (needs >= {OVERFIT_POINTS:g}); {int(converged.sum())} of " \
            f"{len(both)} runs converged"
    if gap < OVERFIT_POINTS:
        return f"not reached: {words}", (f"{side_name(claim, claim.a)} does not over-fit here (test error "
                                         f"{gap:.1f} points above its clean training error, fewer than "
                                         f"{OVERFIT_POINTS:g}): a regulariser has nothing to cure")
    if not converged.all():
        return f"not reached: {words}", (f"{int((~converged).sum())} of {len(both)} runs had not converged (fewer "
                                         f"than two rate drops and validation error still moving)")
    return f"reached: {words}", ""


def _lr_note(side: pd.DataFrame, tune: str) -> str:
    """When the sweep is over a learning-rate scale, also name the rate it came to."""
    if tune == "lr" or "lr" not in side or side["lr"].nunique() != 1:
        return ""
    return f" (lr {side['lr'].iloc[0]})"


def _empty(grid: GridResults, claim: Claim, split: tuple, why: str) -> ClaimResult:
    nan = math.nan
    return ClaimResult(grid=grid.name, claim=claim, split=split, interval=Interval(nan, nan, nan, 0, "none"),
                       paired=False, n_a=0, n_b=0, censored_a=0, censored_b=0, cap=nan, tuned_a=None, tuned_b=None,
                       runs_a=(), runs_b=(), verdict=NO_DATA, bound="", notes=(why,),
                       dataset_label=grid.label("dataset_label"), budget=grid.label("budget"),
                       precision=grid.label("precision"))


# ---------------------------------------------------------------- verdicts

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
    a, b = side_name(claim, claim.a), side_name(claim, claim.b)
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
    if math.isfinite(mde):
        power_note = f"; these seeds detect only effects of {fmt(mde, claim)} or more (80% power)"
        target = claim.margin if claim.margin is not None else claim.paper
        if target is not None and needed and (mde > abs(target) if claim.effect != "ratio" else mde > target):
            power_note += f"; about {needed} seeds would resolve {fmt(target, claim)}"
        elif target is not None and needed is None:
            power_note += "; more than 200 seeds would be needed at this spread"
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
        a, b = side_name(claim, claim.a), side_name(claim, claim.b)
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
    return INCONCLUSIVE
