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

from ablations.choices import FINISHED, OVERNIGHT_HOURS
from ablations.errors import UserError
from ablations.grid import grid_names, load_grid
from reports.claims import ClaimResult, evaluate
from reports.verdicts import (INCONCLUSIVE, LARGER, MEASURED, NO_DATA, NO_EFFECT, NOT_EQUIVALENT, NOT_TESTABLE,
                              LRN_ACTS, NOT_REPRODUCED, OPPOSITE, OVERFIT_POINTS, REPRODUCED, SMALLER)
from reports.figures import forest_figure, grid_figures
from reports.output import write_text
from reports.load import (CENSORABLE, METRICS, GridResults, canon, copied, coverage, display_axes, load_results,
                          machine_seconds, pending_runs)
from reports.stats import LEVEL, N_RESAMPLES, RNG_SEED, cell_summary

ERRORS = {"train_error", "clean_train_error", "val_error", "test_error", "test_error_top5", "test_error_at_best_val",
          "test_error_1view", "gap"}
RULE = f"""\
Each claim compares two values of one axis (side a against side b) on one metric, run by run with the same seed.
Error metrics are compared in percentage points. Every other axis that varies on its own (not the claim's axis, its
tune axis, the seed, or a fixed filter; axes zipped to another move with it) splits a claim into one row per value:
relu-6x has a row per condition.

- **Three splits.** A fixed, class-stratified validation set is held out of the training images; it alone decides
  (the plateau schedule, early stops, the tuned learning rate). The test split is reported and decides nothing.
- **Over-fitting** is the *fair gap*: test error minus the error on a fixed slice of the training images measured
  in eval mode (no dropout, no augmentation), so a regulariser cannot shrink it just by making training batches
  harder.
- **Effect and interval.** Differences: the mean of per-seed differences a - b with a {LEVEL:.0%} t-interval.
  Ratios: the geometric mean of per-seed ratios a / b with a {LEVEL:.0%} t-interval on the log scale. Intervals of
  bounded metrics are clipped to the metric's range (this drops only values that cannot be true, so coverage is
  kept). When seeds do not pair, a percentile bootstrap ({N_RESAMPLES} resamples, RNG seed {RNG_SEED}).
- **Tuning.** A tuned claim (relu-6x: each side's learning rate) chooses the value with the lowest mean metric on
  its *selection* seeds, and estimates the effect on separate *confirmation* seeds at that value, so the interval
  is not made optimistic by the choice. The report says where the chosen value sits in its sweep.
- **Power.** Each verdict gives the smallest effect its seeds detect with 80% power at the measured seed spread,
  and, when that exceeds the paper's effect (or the margin), calls the cell *underpowered* with about how many seeds
  would resolve it.
- **Verdicts**, with the paper's number P (positive = the paper's direction) and the interval against no effect
  (0 for differences, 1x for ratios):
  - *{REPRODUCED}*: the interval excludes no effect and includes P;
  - *{SMALLER}* / *{LARGER}*: the interval excludes no effect but lies short of / beyond P;
  - *{OPPOSITE}*: the interval lies on the other side of no effect;
  - *{NOT_REPRODUCED}*: the interval includes no effect and stops short of P (the paper's effect is excluded);
  - *{INCONCLUSIVE}*: the interval includes no effect and P (or a single seed pair gives no interval);
  - *{NO_EFFECT}*: a claim with a margin m (ours: bf16 against fp32): the whole interval lies inside (-m, m);
    *{NOT_EQUIVALENT}* when it lies wholly at or beyond m;
  - *{MEASURED}*: the paper gives no number; the direction of the interval is stated;
  - *{NOT_TESTABLE}*: the runs did not reach the regime the claim is about, with the reason: a run that never
    learned (final clean training loss at least 98% of ln(classes), or one predicted class) makes every claim on it
    untestable; an over-fitting claim needs its unregularised side to over-fit (fair gap >= {OVERFIT_POINTS:g}
    points) and every run to have converged (two rate drops, or validation error flat over 5 epochs); a
    normalising claim (LRN) needs LRN to act in every LRN run (its factor's p95 / p05 over a fixed batch at least
    {LRN_ACTS:g}x; at 1x it is a constant scale); a run that
    never reached a target is censored: the effect is then a bound (≥ or ≤, never an interval), which decides only
    when even the bound lies beyond P.
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
    if not grids:  # a pipeline check (smoke) is shown only when asked for by name
        loaded = [g for g in loaded if g.meta.get("tests_paper", True)]
    results = tuple(r for g in loaded for r in evaluate(g) if g.meta.get("tests_paper", True))
    notes = {g.name: coverage(g) for g in loaded}
    if not grids:
        for name in sorted(set(grid_names()) - set(notes)):
            if load_grid(name).tests_paper:
                notes[name] = [f"no runs (`ablate run --grid {name} --budget cpu`)"]
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
    write_text(out_dir / "verdicts.csv", verdicts.to_csv(index=False))
    written = {out_dir / "verdicts.csv", out_dir / "REPORT.md"}
    forest = forest_figure(list(report.results), figdir, dpi)
    lines = _header(report) + _claims_markdown(report.results)
    if forest:
        lines += ["", f"![Every claim: paper vs ours]({_rel(forest[0], out_dir)})",
                  f"*Figure: every claim row, the paper's number (open diamond) against ours with its 95% interval, "
                  f"coloured by verdict ([SVG]({_rel(forest[1], out_dir)})).*"]
    lines += _cost_markdown(report)
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
            written.add(write_text(out_dir / f"cells_{grid.name}.csv", cells.to_csv(index=False)))
        written |= set(figures)
        lines += _grid_markdown(grid, report.coverage[grid.name], figures, cells, out_dir)
    path = out_dir / "REPORT.md"
    write_text(path, "\n".join(lines) + "\n")
    written |= set(forest)
    for old in [*out_dir.glob("cells_*.csv"), *figdir.glob("*.png"), *figdir.glob("*.svg")]:
        if old not in written:  # a figure or table of a grid no longer reported: a stale file would mislead
            old.unlink()
    return path


# ---------------------------------------------------------------- markdown

def _cost_markdown(report: Report) -> list[str]:
    """What the reported runs cost, measured: machine time per grid (wall x threads / cores, machine_seconds), the
    machines it was measured on, and the total against one night."""
    rows = [(g.name, g.budget_label() or "-", int(g.runs.status.isin(FINISHED).sum()), machine_seconds(g.runs),
             _machines(g.runs)) for g in report.grids if g.meta.get("tests_paper", True) and len(g.runs)]
    if not rows:
        return []
    lines = ["", "## What the reproduction cost", "",
             "Measured from the runs' own records: each run's wall time x its threads / the machine's cores "
             "(two runs at a time on a 2-core machine count half each). `ablate show --all --budget cpu` estimates "
             "what is still pending.", "", "| grid | budget | runs | machine time | measured on |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {budget} | {n} | {seconds / 3600:.2f} h | {_md(machines)} |"
              for name, budget, n, seconds, machines in rows]
    total = sum(r[3] for r in rows) / 3600
    lines += [f"| **total** | | {sum(r[2] for r in rows)} | **{total:.2f} h** | |", ""]
    n_copied = sum(int(copied(g.runs[g.runs.status.isin(FINISHED)]).sum()) for g in report.grids
                   if g.meta.get("tests_paper", True) and len(g.runs))
    if n_copied:
        lines += [f"{n_copied} of these runs were trained once in one grid and copied into another with the same "
                  f"settings (`reused_from` in runs.csv); they count once, where they were trained.", ""]
    over = f"{total - OVERNIGHT_HOURS:.2f} h over it" if total > OVERNIGHT_HOURS else "within it"
    machines = len({d for g in report.grids if g.meta.get("tests_paper", True) and "device_name" in g.runs
                    for d in g.runs[g.runs.status.isin(FINISHED)].device_name.dropna()})  # not its precisions
    return lines + [f"Target: the whole cpu reproduction in one night, {OVERNIGHT_HOURS:g} h on one 2-core machine. "
                    f"These runs: {total:.2f} h, {over}" + (", summed over runs on more than one machine (CPUs differ "
                    "in speed, so this is not one machine's night)." if machines > 1 else ".")]


def _machines(runs: pd.DataFrame) -> str:
    """The machines a grid's finished runs were measured on, with their precision: costs from different CPUs."""
    done = runs[runs.status.isin(FINISHED)]
    if "device_name" not in done or not len(done):
        return ""
    precision = done["precision"] if "precision" in done else pd.Series("", index=done.index)
    pairs = sorted({(str(d), str(p)) for d, p in zip(done.device_name, precision) if pd.notna(d)})
    return "; ".join(f"{d} ({p})" if p and p != "nan" else d for d, p in pairs)


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _header(report: Report) -> list[str]:
    labels = sorted({g.label("dataset_label") for g in report.grids} - {""})
    return ["# AlexNet's claims on CIFAR: ablation report", "",
            f"Generated by `ablate report` from `{report.results_dir.name}/` ({len(report.grids)} grid(s)). "
            f"Data as recorded in runs.csv: {', '.join(labels) or 'not recorded'}. One line per claim of the paper: "
            f"ours with its 95% interval, the verdict and why, and whether the runs reached the regime the claim "
            f"is about. The rule is at the end; each grid's section lists the exact settings of its runs.", "",
            *_cifar100_line(report), "## Claims", ""]


def _cifar100_line(report: Report) -> list[str]:
    """Say plainly when no CIFAR-100 run is reported: the paper's CIFAR claims are then measured on CIFAR-10 only."""
    if any(g.meta.get("dataset") == "cifar100" and g.meta.get("tests_paper", True) and len(g.runs)
           for g in report.grids):
        return []
    return ["**CIFAR-100: no verdict is measured yet.** No copy of the data set could be brought to the machines "
            "these results come from; the pipeline is tested end to end on generated data in the official "
            "format (100 classes, top-5 error). To measure it: `ablate data import cifar100 cifar-100-python.tar.gz` "
            "(or `download` on a connected machine), then `ablate run --all --budget cpu dataset=cifar100` and "
            "`ablate report`.", ""]


def _claims_markdown(results: tuple[ClaimResult, ...]) -> list[str]:
    primary = [r for r in results if not r.claim.secondary]
    secondary = [r for r in results if r.claim.secondary]
    lines = _claim_table(primary)
    if secondary:
        lines += ["", "Further lines measured with the same runs (no paper number, or a second view of a claim):",
                  "", *_claim_table(secondary)]
    return lines


def _claim_table(results: list[ClaimResult]) -> list[str]:
    lines = ["| claim | paper | ours (95% CI) | verdict: why | seeds | data set, budget | regime |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"**{r.claim.id}**" + (f" ({r.split_label})" if r.split else "")
        name += f": {r.claim.title}" if r.claim.title != r.claim.id else ""
        seeds = r.n_text + (f"; {r.selection}" if r.selection else "")
        why = f"**{r.verdict}**: {r.reason}" if r.reason else f"**{r.verdict}**"
        notes = "; ".join(r.notes) if r.verdict != NO_DATA else ""  # an empty row's reason is its verdict's
        lines.append("| " + " | ".join(_md(x) for x in (
            name, r.paper_text(), r.ours_text() + (f" ({notes})" if notes else ""), why, seeds,
            f"{r.dataset_label or '-'}, {r.budget or '-'}", r.regime or "-")) + " |")
    return lines


def _grid_markdown(grid: GridResults, missing: list[str], figures: list[Path], cells: pd.DataFrame,
                   out_dir: Path) -> list[str]:
    meta = grid.meta
    lines = ["", f"## {grid.name}: {meta.get('title', '')}".rstrip(": "), ""]
    if meta.get("description"):  # the grid file's intent; what the runs really used is the settings line below
        lines += ["*The grid file:* " + " ".join(str(meta["description"]).split()), ""]
    lines += [f"- Data set: {grid.label('dataset_label', 'dataset') or 'not recorded'}; budget: "
              f"{grid.budget_label() or '-'}; model: {meta.get('model', '-')}",
              "- Settings of every reported run (from their spec.json): " + (grid.settings_text() or "not recorded"),
              "- Precision: " + _precision_counts(grid.runs),
              f"- Command that produced the runs: `{grid.command()}`",
              "- Runs: " + (", ".join(f"{n} {s}" for s, n in grid.runs.status.value_counts().items())
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
    claimed = [c.get(k) for c in grid.meta.get("claims", []) for k in ("metric", "a_metric", "b_metric")]
    if any(m == "epochs_to_target" for m in claimed):
        claimed.append("seconds_to_target")
    shown = ["test_error", "clean_train_error" if grid.runs.get("clean_train_error", pd.Series()).notna().any()
             else "train_error", *[m for m in claimed if m in METRICS]]
    if grid.runs.get("lrn_factor_spread", pd.Series()).notna().any():  # did LRN act? p95 / p05 of its factor
        shown += ["lrn_factor_p05", "lrn_factor_p95", "lrn_factor_spread"]
    return list(dict.fromkeys(shown))


def _cells(grid: GridResults) -> pd.DataFrame:
    runs = grid.runs[grid.runs.status.isin(FINISHED)]
    if not len(runs):
        return pd.DataFrame()
    axes = display_axes(grid.runs, grid.axes)
    by = axes or ["grid"]
    cells = cell_summary(runs, by, METRICS)
    # a cell of unconverged runs is a point, not a verdict; a run that stops at a target has no plateau to reach
    if "converged" in runs and runs.converged.notna().any() and not (grid.meta.get("early_stop") or {}).get("metric"):
        done = runs.converged.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
        cells["converged"] = done.groupby([runs[b] for b in by], sort=False, dropna=False).sum().to_numpy()
    for m in CENSORABLE:
        flag = f"{m}_censored"
        if flag in runs:
            cells[flag] = runs.groupby(by, sort=False, dropna=False)[flag].sum().to_numpy()
    return cells


def _cells_markdown(grid: GridResults, cells: pd.DataFrame) -> list[str]:
    axes = display_axes(grid.runs, grid.axes)
    metrics = _shown_metrics(grid)
    converged = "converged" in cells
    head = [*axes, "n", *(["converged"] if converged else []), *[f"{m} (%)" if m in ERRORS else m for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, c in cells.iterrows():
        values = [canon(c[a]) for a in axes] + [str(int(c["n"]))]
        values += [f"{int(c['converged'])} of {int(c['n'])}"] if converged else []
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
    colors = {REPRODUCED: "green", SMALLER: "yellow", LARGER: "yellow", OPPOSITE: "red", NOT_REPRODUCED: "red",
              INCONCLUSIVE: "white",
              NOT_TESTABLE: "magenta", MEASURED: "cyan", NO_EFFECT: "green", NOT_EQUIVALENT: "red", NO_DATA: "dim"}
    labels = {"data set": {r.dataset_label or "-" for r in report.results},
              "budget": {r.budget or "-" for r in report.results}}
    common = [f"{k}: {next(iter(v))}" for k, v in labels.items() if len(v) == 1]  # said once, in the title
    table = Table(title="Claims, 95% intervals over seeds (rule in REPORT.md)" + "".join(f"; {c}" for c in common))
    extra = [k for k, v in labels.items() if len(v) > 1]
    for col in ("claim", "paper", "ours (95% CI)", "verdict", "n", *extra):
        table.add_column(col, overflow="fold")
    for r in (r for r in report.results if not r.claim.secondary):
        color = next((c for k, c in colors.items() if r.verdict.startswith(k)), "dim")
        name = r.label + (" (secondary)" if r.claim.secondary else "")
        cells = [name, r.paper_text(), r.ours_text(), r.verdict, r.n_text,
                 *[{"data set": r.dataset_label, "budget": r.budget}[k] or "-" for k in extra]]
        cells = [escape(c) for c in cells]
        cells[3] = f"[{color}]{cells[3]}[/{color}]"
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------- the README's claims block

README_START, README_END = "<!-- claims:start (written by `ablate report --readme`) -->", "<!-- claims:end -->"


def readme_block(report: Report) -> list[str]:
    """The short claims table for the README: one line per claim row of the paper, with verdict and budget."""
    lines = ["| claim | paper | ours (95% CI) | verdict | seeds | budget |", "|---|---|---|---|---|---|"]
    for r in (r for r in report.results if not r.claim.secondary):
        name = r.claim.id + (f" ({r.split_label})" if r.split else "")
        lines.append("| " + " | ".join(_md(x) for x in (name, r.paper_text(), r.ours_text(), r.verdict, r.n_text,
                                                         r.budget or "-")) + " |")
    labels = sorted({r.dataset_label for r in report.results if r.dataset_label})
    lines += ["", f"Data: {', '.join(labels) or 'none yet'}. Each verdict's reason, the regime its runs reached and "
                  f"the rule: [`results/report/REPORT.md`](results/report/REPORT.md)."]
    pending = []
    for g in report.grids:
        n, total = pending_runs(g)
        if n:
            pending.append(f"{g.name} {n} of {total} (`ablate run --grid {g.name} --budget "
                           f"{g.meta.get('budget') or 'gpu'}`)")
    if pending:  # a claim row that reads "no data" or few seeds says why here, not only in REPORT.md
        lines += ["", "Runs the grid files define that are not trained yet: " + "; ".join(pending) + "."]
    return lines


def update_readme(report: Report, readme: Path) -> Path:
    """Rewrite the block between README_START and README_END in `readme` with the claims table."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise UserError(f"{readme} has no claims block; add the two marker lines {README_START!r} and "
                        f"{README_END!r} where the table should go")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    write_text(readme, head + README_START + "\n" + "\n".join(readme_block(report)) + "\n" + README_END + tail)
    return readme
