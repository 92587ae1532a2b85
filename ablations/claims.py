"""A claim of the paper as a grid declares it (a `[[claims]]` table): which axis's two values are compared, on which
metric, as a ratio or a difference, and what the paper says. check_claim validates the table when the grid file
loads; the report reads it back from grid.json as a Claim."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ablations.errors import UserError, check_table, no_unknown

ERROR_METRICS = {"train_error", "test_error", "test_error_top5", "test_error_at_best_val", "gap", "val_error",
                 "clean_train_error", "test_error_1view"}
THROUGHPUT_METRICS = {"images_per_second"}  # a speed needs no learning: the chance guard leaves these alone
CLAIM_KEYS = {"id", "paper_claim", "title", "metric", "axis", "a", "b", "effect", "paper", "tune", "fixed", "note",
              "margin", "regime", "paper_marks", "also", "a_metric", "b_metric"}
# overfitting: testable only where the unregularised side a over-fits; normalising: only where LRN's factor varies
REGIMES = ("learning", "overfitting", "normalising")
# lines the report shows under a claim (`also = [...]` in its table), each for the claims it can follow
ALSO: dict[str, str] = {
    "seconds": "the same runs in training seconds (a claim on epochs_to_target)",
    "top5": "the top-5 error, on CIFAR-100 only (a test_error difference)",
    "efficiency": "scaling efficiency, speed-up / N (an images_per_second ratio on the devices axis)",
    "accuracy": "test error, N devices minus one (an images_per_second ratio on the devices axis)",
}


def default_also(metric: str, effect: str, axis: str) -> tuple[str, ...]:
    """The lines a claim table without `also` gets: every one that can follow it."""
    return tuple(k for k in ALSO if can_follow(k, metric, effect, axis))


def can_follow(line: str, metric: str, effect: str, axis: str) -> bool:
    return {"seconds": metric == "epochs_to_target",
            "top5": metric == "test_error" and effect == "difference",
            "efficiency": axis == "devices" and metric == "images_per_second" and effect == "ratio",
            "accuracy": axis == "devices" and metric == "images_per_second" and effect == "ratio"}[line]


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
    regime: str = "learning"  # "overfitting": only where side a over-fits; "normalising": only where LRN acts
    also: tuple[str, ...] = ()  # secondary lines the report shows under this claim (keys of ALSO)
    # a side read on another metric of its runs (default: metric), e.g. the plain view of a 10-crop run: a = b
    # then compares two readings of the same nets, paired by seed
    a_metric: str | None = None
    b_metric: str | None = None

    def metric_of(self, side: str) -> str:
        """The metric side "a" or "b" is read on."""
        return {"a": self.a_metric, "b": self.b_metric}[side] or self.metric

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


def claim_from_table(c: dict[str, Any]) -> Claim:
    """A checked `[[claims]]` table (as copied into grid.json) as a Claim."""
    return Claim(id=c["id"], paper_claim=c.get("paper_claim") or c["id"], title=c.get("title") or c["id"],
                 metric=c["metric"], axis=c["axis"], a=c["a"], b=c["b"], effect=c["effect"], paper=c.get("paper"),
                 tune=c.get("tune"), fixed=tuple(sorted((c.get("fixed") or {}).items())), margin=c.get("margin"),
                 regime=c.get("regime") or "learning", a_metric=c.get("a_metric"), b_metric=c.get("b_metric"),
                 also=tuple(c["also"]) if "also" in c else default_also(c["metric"], c["effect"], c["axis"]))


def check_claim(claim: Any, i: int, where: str, axis_values: dict[str, list]) -> dict[str, Any]:
    """claims[i] of a grid file, checked against the grid's axes, with its defaults filled in; one UserError that
    names the key otherwise."""
    at = f"{where}: claims[{i}]"
    check_table(claim, where, f"claims[{i}]")
    no_unknown(claim, CLAIM_KEYS, at, "claim key")
    for key in ("id", "metric", "axis", "a", "b", "effect"):
        if key not in claim:
            raise UserError(f"{at}: missing {key!r}; a claim needs id, metric, axis, a, b, effect")
    if claim["axis"] not in axis_values:
        raise UserError(f"{at}: axis {claim['axis']!r} is not an axis of this grid ({', '.join(axis_values)})")
    for side in ("a", "b"):
        if claim[side] not in axis_values[claim["axis"]]:
            raise UserError(f"{at}: {side} = {claim[side]!r} is not a value of axis {claim['axis']!r} "
                            f"({axis_values[claim['axis']]!r})")
    for key in ("a_metric", "b_metric"):
        if key in claim and (not isinstance(claim[key], str) or claim[key] not in ERROR_METRICS):
            raise UserError(f"{at}: {key} must be an error metric ({', '.join(sorted(ERROR_METRICS))}), "
                            f"got {claim[key]!r}")
    if claim["a"] == claim["b"] and claim.get("a_metric", claim["metric"]) == claim.get("b_metric", claim["metric"]):
        raise UserError(f"{at}: a and b are both {claim['a']!r} on the same metric, so the claim compares runs with "
                        f"themselves; name different values, or read one side on another metric (a_metric)")
    if claim["effect"] not in ("ratio", "difference"):
        raise UserError(f"{at}: effect must be 'ratio' or 'difference', got {claim['effect']!r}")
    marks = claim.get("paper_marks", {})
    if not isinstance(marks, dict) or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not v == v
                                          for v in marks.values()):
        raise UserError(f"{at}: paper_marks must be a table of numbers (the paper's value per side, e.g. "
                        f"{{relu = 6, tanh = 35}}), got {marks!r}")
    if claim.get("regime", "learning") not in REGIMES:
        raise UserError(f"{at}: regime must be one of {', '.join(REGIMES)}, got {claim['regime']!r}")
    if "tune" in claim and claim["tune"] not in axis_values:
        raise UserError(f"{at}: tune axis {claim['tune']!r} is not an axis of this grid")
    if claim.get("tune") and str(claim["metric"]).startswith("test_"):
        raise UserError(f"{at}: a tuned claim on {claim['metric']} would choose its {claim['tune']} on test data; "
                        f"choose on validation data with a [tune] table (metric = \"val_error\") and no claim tune")
    if "paper" in claim and (not isinstance(claim["paper"], (int, float)) or isinstance(claim["paper"], bool)):
        raise UserError(f"{at}: paper must be a number (omit it when the paper gives none)")
    if "margin" in claim:
        margin = claim["margin"]
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin <= 0 or "paper" in claim:
            raise UserError(f"{at}: margin (an equivalence test: a and b differ by less than it) must be a number "
                            f"> 0, and a claim has a paper number or a margin, not both; got {margin!r}")
    also = claim.get("also", [])
    if not isinstance(also, list) or any(k not in ALSO for k in also):
        raise UserError(f"{at}: also must be a list of {', '.join(ALSO)} (the report's lines under the claim), "
                        f"got {also!r}")
    for line in also:
        if not can_follow(line, claim["metric"], claim["effect"], claim["axis"]):
            raise UserError(f"{at}: also = {line!r} cannot follow this claim; {line!r} is {ALSO[line]}")
    out = dict(claim)
    out.setdefault("also", list(default_also(claim["metric"], claim["effect"], claim["axis"])))
    out.setdefault("paper_claim", claim["id"])
    out.setdefault("title", claim["id"])
    out.setdefault("paper", None)
    return out
