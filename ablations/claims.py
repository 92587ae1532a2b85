"""A claim of the paper as a grid declares it (a `[[claims]]` table, checked by ablations/grid.py): which axis's two
values are compared, on which metric, as a ratio or a difference, and what the paper says. The report reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ERROR_METRICS = {"train_error", "test_error", "test_error_top5", "test_error_at_best_val", "gap", "val_error",
                 "clean_train_error"}
THROUGHPUT_METRICS = {"images_per_second"}  # a speed needs no learning: the chance guard leaves these alone


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


def claim_from_table(c: dict[str, Any]) -> Claim:
    """A checked `[[claims]]` table (as copied into grid.json) as a Claim."""
    return Claim(id=c["id"], paper_claim=c.get("paper_claim") or c["id"], title=c.get("title") or c["id"],
                 metric=c["metric"], axis=c["axis"], a=c["a"], b=c["b"], effect=c["effect"], paper=c.get("paper"),
                 tune=c.get("tune"), fixed=tuple(sorted((c.get("fixed") or {}).items())), margin=c.get("margin"),
                 regime=c.get("regime") or "learning")
