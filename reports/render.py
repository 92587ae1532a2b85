"""The report: REPORT.md (claims table first, then one section per grid), verdicts.csv, per-cell CSVs, figures.

`render_report(results_dir, out_dir)` is the whole job; `build_report` + `write_report` are its two halves, so the
CLI can also print the claims table (`claims_table`) without reading files back."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.markup import escape
from rich.table import Table

from ablations.errors import UserError
from ablations.grid import grid_names
from reports.claims import (EQUIVALENT, INCONCLUSIVE, MEASURED, NOT_EQUIVALENT, NOT_REPRODUCED, REPRODUCED, SINGLE,
                            SMALLER, ClaimResult, evaluate)
from reports.figures import forest_figure, grid_figures
from reports.load import CENSORABLE, METRICS, GridResults, canon, coverage, display_axes, load_results
from reports.stats import LEVEL, N_RESAMPLES, RNG_SEED, cell_summary

ERRORS = {"train_error", "test_error", "test_error_top5", "best_test_error", "gap"}
RULE = f"""\
Each claim compares two values of one axis (side a against side b) on one metric, run by run with the same seed.
Error metrics are compared in percentage points. Every other axis that varies on its own (not the claim's axis, its
tune axis, the seed, or a fixed filter; axes zipped to another move with it) splits a claim into one row per value:
relu-6x has a row per condition.

- **Effect and interval.** Differences: the mean of per-seed differences a - b with a {LEVEL:.0%} t-interval
  (t quantile for n - 1 degrees of freedom). Ratios: the geometric mean of per-seed ratios a / b with a {LEVEL:.0%}
  t-interval on the log scale. When the seeds of a and b do not pair, a percentile bootstrap ({N_RESAMPLES} resamples,
  RNG seed {RNG_SEED}) of the ratio or difference of means, marked "unpaired". n is the number of seed pairs.
- **Tuning.** A claim with a tune axis (relu-6x: the learning-rate scale) first gives each side, per row, the value
  with the lowest mean metric over seeds (censored runs at the cap; ties go to the lower final training error).
- **Censoring.** A run that never reached the target counts at the epoch cap (seconds: at its training time), never
  dropped. The effect is then a bound: "≥" when only side a has censored runs (the true a is larger), "≤" when only
  side b has; the number of censored runs is given.
- **Verdicts**, with the paper's number P in the claim's convention (positive = the paper's direction) and the
  interval [lo, hi] against the reference r (0 for differences, 1 for ratios):
  - *{REPRODUCED}*: the interval lies on the paper's side of r and reaches P (hi ≥ P when P > r; lo ≤ P when P < r);
  - *{SMALLER}*: the interval lies on the paper's side of r but short of P;
  - *{NOT_REPRODUCED}*: the interval lies on the other side of r;
  - *{INCONCLUSIVE}*: the interval contains r;
  - *{SINGLE}*: one seed (pair) only: the point estimate is shown and no verdict is possible;
  - *{MEASURED}*: the paper gives no number; the direction of the interval is stated ("measured: a > b").
  A claim of ours with a margin m instead of a paper number (bf16 against fp32) is an equivalence test:
  *{EQUIVALENT}* when the interval lies inside (-m, m), *{NOT_EQUIVALENT}* when it lies wholly at or beyond m on
  one side, *{INCONCLUSIVE}* otherwise.
  A verdict on a censored bound is qualified when the truth beyond the bound could change it.
"""


@dataclass(frozen=True)
class Report:
    results_dir: Path
    grids: tuple[GridResults, ...]
    results: tuple[ClaimResult, ...]
    coverage: dict[str, list[str]]  # grid -> what is missing or left out


def build_report(results_dir: Path, grids: list[str] | None = None) -> Report:
    """Load, evaluate every claim, and note what is missing (shipped grids never run, when reporting all)."""
    loaded = load_results(Path(results_dir), grids)
    results = tuple(r for g in loaded for r in evaluate(g))
    notes = {g.name: coverage(g) for g in loaded}
    if not grids:
        for name in sorted(set(grid_names()) - set(notes)):
            notes[name] = [f"no runs (`ablate run --grid {name}`)"]
    return Report(Path(results_dir), tuple(loaded), results, notes)


def render_report(results_dir: Path, out_dir: Path | None = None, grids: list[str] | None = None,
                  dpi: int = 150) -> Path:
    """Write REPORT.md, verdicts.csv, cells_<grid>.csv and figures/ under out_dir (default <results>/report)."""
    report = build_report(results_dir, grids)
    return write_report(report, Path(out_dir) if out_dir else Path(results_dir) / "report", dpi)


def write_report(report: Report, out_dir: Path, dpi: int = 150) -> Path:
    out_dir = Path(out_dir)
    try:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report folder {out_dir} ({err.strerror}); choose another with --out") \
            from None
    figdir = out_dir / "figures"
    verdicts = pd.DataFrame([r.row() for r in report.results])
    verdicts.to_csv(out_dir / "verdicts.csv", index=False)
    forest = forest_figure(list(report.results), figdir, dpi)
    lines = _header(report) + _claims_markdown(report.results)
    if forest:
        lines += ["", f"![Every claim: paper vs ours]({_rel(forest[0], out_dir)})",
                  f"*Figure: every claim row, the paper's number (open diamond) against ours with its 95% interval, "
                  f"coloured by verdict ([SVG]({_rel(forest[1], out_dir)})).*"]
    gaps = [f"- {g}: {'; '.join(n)}" for g, n in report.coverage.items()
            if not (len(n) == 1 and n[0].startswith("complete"))]
    if gaps:
        lines += ["", "## What is missing", "", *gaps]
    lines += ["", "## How the verdicts are decided", "", RULE]
    for grid in report.grids:
        results = [r for r in report.results if r.grid == grid.name]
        figures = grid_figures(grid, results, figdir, dpi)
        cells = _cells(grid)
        if len(cells):
            cells.to_csv(out_dir / f"cells_{grid.name}.csv", index=False)
        lines += _grid_markdown(grid, report.coverage[grid.name], figures, cells, out_dir)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- markdown

def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _header(report: Report) -> list[str]:
    labels = sorted({g.label("dataset_label", "dataset") for g in report.grids} - {""})
    return ["# AlexNet's claims on CIFAR: ablation report", "",
            f"Generated by `ablate report` from `{report.results_dir}` ({len(report.grids)} grid(s)). "
            f"Data as recorded in runs.csv: {', '.join(labels) or 'not recorded'}. "
            f"Effects use the 95% intervals and the verdict rule below.", "", "## Claims", ""]


def _claims_markdown(results: tuple[ClaimResult, ...]) -> list[str]:
    lines = ["| claim | paper | ours (95% CI) | verdict | n seeds | data set | budget | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"**{r.claim.id}**" + (f" ({r.split_label})" if r.split else "")
        title = "" if r.claim.title == r.claim.id else f": *{r.claim.title}*" if r.claim.secondary \
            else f": {r.claim.title}"
        lines.append("| " + " | ".join(_md(x) for x in (
            name + title, r.paper_text(), r.ours_text(), r.verdict, r.n_text, r.dataset_label or "-",
            r.budget or "-", "; ".join(r.notes) or "")) + " |")
    return lines


def _grid_markdown(grid: GridResults, missing: list[str], figures: list[Path], cells: pd.DataFrame,
                   out_dir: Path) -> list[str]:
    meta = grid.meta
    lines = ["", f"## {grid.name}: {meta.get('title', '')}".rstrip(": "), ""]
    if meta.get("description"):
        lines += [" ".join(str(meta["description"]).split()), ""]
    lines += [f"- Data set: {grid.label('dataset_label', 'dataset') or 'not recorded'}; budget: "
              f"{grid.label('budget') or '-'}; model: {meta.get('model', '-')}; epoch cap: {meta.get('epochs', '-')}",
              "- Precision: " + _precision_counts(grid.runs),
              f"- Command that produced the runs: `{grid.command()}`",
              f"- Runs: " + (", ".join(f"{n} {s}" for s, n in grid.runs.status.value_counts().items())
                             if len(grid.runs) else "none"),
              "- Coverage: " + "; ".join(missing), ""]
    for png in (p for p in figures if p.suffix == ".png"):
        lines += [f"![{png.stem}]({_rel(png, out_dir)})", f"([SVG]({_rel(png.with_suffix('.svg'), out_dir)}))", ""]
    if len(cells):
        lines += [f"Per cell, mean [95% CI] over seeds (full table: `cells_{grid.name}.csv`):", ""]
        lines += _cells_markdown(grid, cells)
    return lines


def _precision_counts(runs: pd.DataFrame) -> str:
    """How many runs trained in each precision (runs.csv's `precision` column), e.g. "bf16 (12 runs)"."""
    if "precision" not in runs or not runs.precision.notna().any():
        return "not recorded"
    counts = runs.precision.value_counts().sort_index()
    return ", ".join(f"{p} ({n} run{'s' * (n != 1)})" for p, n in counts.items())


def _shown_metrics(grid: GridResults) -> list[str]:
    claimed = [c.get("metric") for c in grid.meta.get("claims", [])]
    if any(m == "epochs_to_target" for m in claimed):
        claimed.append("seconds_to_target")
    return list(dict.fromkeys(["test_error", "train_error", *[m for m in claimed if m in METRICS]]))


def _cells(grid: GridResults) -> pd.DataFrame:
    runs = grid.runs[grid.runs.status.isin(["finished", "diverged"])]
    if not len(runs):
        return pd.DataFrame()
    axes = display_axes(grid.runs, grid.axes)
    by = axes or ["grid"]
    cells = cell_summary(runs, by, METRICS)
    for m in CENSORABLE:
        flag = f"{m}_censored"
        if flag in runs:
            cells[flag] = runs.groupby(by, sort=False, dropna=False)[flag].sum().to_numpy()
    return cells


def _cells_markdown(grid: GridResults, cells: pd.DataFrame) -> list[str]:
    axes = display_axes(grid.runs, grid.axes)
    metrics = _shown_metrics(grid)
    head = [*axes, "n", *[f"{m} (%)" if m in ERRORS else m for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, c in cells.iterrows():
        values = [canon(c[a]) for a in axes] + [str(int(c["n"]))]
        for m in metrics:
            k = 100 if m in ERRORS else 1
            text = _num(c.get(m), k)
            if not math.isnan(c.get(f"{m}_lo", math.nan)):
                text += f" [{_num(c[f'{m}_lo'], k)}, {_num(c[f'{m}_hi'], k)}]"
            if c.get(f"{m}_censored", 0):
                text += f" ({int(c[f'{m}_censored'])} censored)"
            values.append(text)
        lines.append("| " + " | ".join(_md(v) for v in values) + " |")
    return lines


def _num(x, k: float = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x) * k
    return f"{x:.1f}" if k == 100 or abs(x) >= 100 else f"{x:.3g}"


# ---------------------------------------------------------------- terminal

def claims_table(report: Report) -> Table:
    """The claims table for the terminal (rich)."""
    colors = {REPRODUCED: "green", SMALLER: "yellow", NOT_REPRODUCED: "red", INCONCLUSIVE: "white",
              SINGLE: "magenta", MEASURED: "cyan", EQUIVALENT: "green", NOT_EQUIVALENT: "red"}
    labels = {"data set": {r.dataset_label or "-" for r in report.results},
              "budget": {r.budget or "-" for r in report.results}}
    common = [f"{k}: {next(iter(v))}" for k, v in labels.items() if len(v) == 1]  # said once, in the title
    table = Table(title="Claims, 95% intervals over seeds (rule in REPORT.md)" + "".join(f"; {c}" for c in common))
    extra = [k for k, v in labels.items() if len(v) > 1]
    for col in ("claim", "paper", "ours (95% CI)", "verdict", "n", *extra):
        table.add_column(col, overflow="fold")
    for r in report.results:
        color = next((c for k, c in colors.items() if r.verdict.startswith(k)), "dim")
        name = r.label + (" (secondary)" if r.claim.secondary else "")
        cells = [name, r.paper_text(), r.ours_text(), r.verdict, r.n_text,
                 *[{"data set": r.dataset_label, "budget": r.budget}[k] or "-" for k in extra]]
        cells = [escape(c) for c in cells]
        cells[3] = f"[{color}]{cells[3]}[/{color}]"
        table.add_row(*cells)
    return table
