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


from ablations.choices import FINISHED
from ablations.claims import Claim, claim_from_table
from ablations.tune import pick, position
from reports.load import GridResults, canon
from reports.stats import Interval, clip, compare
from reports.verdicts import (NETS_AT_CHANCE, NO_DATA, decide, fmt, metric_range, power, regime_check,
                              side_label)

TIE_BREAK = "train_error"  # among tune values with equal mean metric (e.g. all censored), the one that got closer


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
        if iv.method == "none" or self.regime.startswith(NETS_AT_CHANCE):  # a net at chance proves nothing
            return "-"
        sign = {"lower": "≥ ", "upper": "≤ "}.get(self.bound, "")
        text = sign + fmt(iv.estimate, c)
        if self.bound:  # censored runs: a bound, never an interval
            pass
        elif iv.has_interval:
            text += f" [{fmt(iv.lo, c, unit=False)}, {fmt(iv.hi, c, unit=False)}]"
        else:
            text += " (single seed: no interval)"
        censored = [self._censored_text(n, used, side)
                    for n, used, side in ((self.censored_a, self.runs_a, "a"), (self.censored_b, self.runs_b, "b"))
                    if n]
        if censored:
            text += f" ({'; '.join(censored)})"
        return text

    def _censored_text(self, n: int, used: tuple[str, ...], side: str) -> str:
        at = "their training time" if self.claim.metric.startswith("seconds") else f"{self.cap:g} epochs"
        return f"{n} of {len(used)} {side_label(self.claim, side)} runs censored at {at}"

    def paper_text(self) -> str:
        if self.claim.margin is not None:
            return f"within ±{self.claim.margin:g}{self.claim.unit} (our margin)"
        return "no number" if self.claim.paper is None else fmt(self.claim.paper, self.claim)

    def row(self) -> dict[str, Any]:
        """One line of verdicts.csv."""
        c, iv = self.claim, self.interval
        return {"grid": self.grid, "claim": c.id, "paper_claim": c.paper_claim, "title": c.title,
                "split": self.split_label, "secondary": c.secondary, "metric": c.metric,
                "metric_a": c.metric_of("a"), "metric_b": c.metric_of("b"), "axis": c.axis,
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


# ---------------------------------------------------------------- claims of a grid

def claims_of(grid: GridResults) -> list[Claim]:
    """The grid's declared claims, each followed by the secondary lines its table asks for (`also`): seconds
    beside epochs to target, top-5 beside top-1 on CIFAR-100, scaling efficiency and accuracy parity (unless the
    grid declares that claim itself) beside a data-parallel speed-up."""
    raw = grid.meta.get("claims", [])
    declared = {(c.get("metric"), c.get("axis"), canon(c.get("a")), canon(c.get("b"))) for c in raw}
    cifar100 = "cifar100" in grid.label("dataset")
    out = []
    for c in raw:
        claim = claim_from_table(c)
        out.append(claim)
        key = (claim.axis, canon(claim.a), canon(claim.b))
        if "seconds" in claim.also:
            out.append(dataclasses.replace(
                claim, id=f"{claim.id}/seconds", metric="seconds_to_target", paper=None, secondary=True,
                tune_metric="epochs_to_target", title=f"{claim.title}: the same runs in training seconds"))
        # top-5 has no plain-view reading: a claim with a side on another metric gets no top-5 line
        if "top5" in claim.also and cifar100 and ("test_error_top5", *key) not in declared and \
                not (claim.a_metric or claim.b_metric):
            out.append(dataclasses.replace(claim, id=f"{claim.id}/top5", metric="test_error_top5", paper=None,
                                           secondary=True, title=f"{claim.title} (top-5)"))
        if "efficiency" in claim.also:
            n = float(claim.a) / float(claim.b)
            out.append(dataclasses.replace(claim, id=f"{claim.id}/efficiency", per=n, paper=None, secondary=True,
                                           title=f"Scaling efficiency: speed-up / {n:g}"))
        if "accuracy" in claim.also and ("test_error", *key) not in declared:
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
        side, metric = rows[rows[claim.axis] == canon(value)], claim.metric_of(name)
        side = side[side[metric].notna()] if metric in side else side.iloc[:0]
        if claim.tune and claim.tune in side and len(side):
            side, tuned[name], how[name] = _tuned_side(grid, claim, side)
        sides[name] = side
    selection = "; ".join(f"{side_label(claim, n)}: {claim.tune} {how[n]}" for n in ("a", "b") if n in how)
    missing = [side_label(claim, n) for n in ("a", "b") if not len(sides[n])]
    if missing:
        why = f"no finished runs with {claim.metric} for {' and '.join(missing)}"
        if "pending" in selection:
            why += " (the learning-rate selection is not finished: rerun the grid)"
        elif "(none yet)" in selection:
            why += " (confirmation runs not made yet: rerun the grid)"
        return dataclasses.replace(_empty(grid, claim, split, why), selection=selection, reason=why)

    per_seed = {n: s.groupby("seed")[claim.metric_of(n)].mean() * claim.scale for n, s in sides.items()}
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
    flags = {n: f"{claim.metric_of(n)}_censored" for n in used}
    cens = {n: int(u[flags[n]].sum()) if flags[n] in u else 0 for n, u in used.items()}
    bound = {(True, False): "lower", (False, True): "upper", (True, True): "mixed"}.get(
        (cens["a"] > 0, cens["b"] > 0), "")
    diverged = sum(int((u.status == "diverged").sum()) for u in used.values())
    if diverged:
        notes.append(f"{diverged} diverged run(s) included" + (" (never reached the target: censored)"
                                                              if flags["a"] in rows else ""))
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
                       dataset_label=grid.label("dataset_label"), budget=grid.budget_label(),
                       precision=grid.label("precision"), reason=reason, detectable=mde, seeds_needed=needed,
                       regime=regime, selection=selection)


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
                       dataset_label=grid.label("dataset_label"), budget=grid.budget_label(),
                       precision=grid.label("precision"))


