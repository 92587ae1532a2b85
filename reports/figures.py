"""Figures: the paper's Figure 1 recreated, test error per variant, learning curves, throughput scaling, and one
forest plot of every claim. Each is saved as PNG and SVG.

Figures are built on matplotlib `Figure` objects (the Agg canvas, no pyplot state) inside an rc_context with
seaborn's style, so rendering a report changes nothing process-wide. Fonts are >= 10 pt for print."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablations.choices import FINISHED
from reports.claims import ClaimResult
from reports.verdicts import (INCONCLUSIVE, LARGER, MEASURED, NO_EFFECT, NOT_EQUIVALENT, NOT_REPRODUCED, NOT_TESTABLE,
                              OPPOSITE, REPRODUCED, SMALLER, side_label, side_name)
from reports.load import GridResults, canon, cell_label, display_axes
from reports.output import write_atomic
from reports.stats import clip, compare, mean_ci

RC = {**sns.axes_style("whitegrid"), "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
      "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10,
      "figure.titlesize": 13, "savefig.facecolor": "white",
      "svg.hashsalt": "ablate"}  # fixed SVG element ids (else random): an unchanged figure rewrites the same bytes
PALETTE = sns.color_palette("colorblind")
VERDICT_COLORS = {REPRODUCED: PALETTE[2], SMALLER: PALETTE[1], LARGER: PALETTE[8], OPPOSITE: PALETTE[3],
                  NOT_REPRODUCED: PALETTE[5],
                  INCONCLUSIVE: PALETTE[7], NOT_TESTABLE: PALETTE[4], MEASURED: PALETTE[0], NO_EFFECT: PALETTE[2],
                  NOT_EQUIVALENT: PALETTE[3]}


def save(fig: Figure, out_dir: Path, name: str, dpi: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    write_atomic(paths[0], lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    # no timestamp in the SVG: reruns diff clean
    write_atomic(paths[1], lambda f: fig.savefig(f, format="svg", bbox_inches="tight", metadata={"Date": None}))
    return paths


def _wrap(text: str, width: int = 80) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _finished(grid: GridResults) -> pd.DataFrame:
    return grid.runs[grid.runs.status.isin(FINISHED)]


def _t_band(values) -> tuple[float, float]:
    """seaborn errorbar callable: our 95% t-interval over seeds of an error in percent, clipped to [0, 100]
    (nothing drawn for a single seed)."""
    iv = clip(mean_ci(values), 0.0, 100.0)
    return (iv.lo, iv.hi) if iv.has_interval else (iv.estimate, iv.estimate)


def _order(values: list[str], claims: list[ClaimResult], listed: list | None = None) -> list[str]:
    """The grid's own order when grid.json lists the axis values; else numbers by value, else the values the
    claims name first (in claim order), then the rest."""
    named = [canon(v) for v in listed or []]
    if not named and all(_num(v) is not None for v in values):
        return sorted(values, key=float)
    named = named or [canon(v) for r in claims for v in (r.claim.a, r.claim.b)]
    first = [v for v in dict.fromkeys(named) if v in values]
    rest = sorted(set(values) - set(first), key=lambda v: (_num(v) is None, _num(v) or 0, v))
    return first + rest


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- Figure 1

def figure1(grid: GridResults, rows: list[ClaimResult], out_dir: Path, dpi: int) -> list[Path]:
    """Training error vs epoch for the two activations at their chosen learning rate, one panel per condition,
    side by side: the running error on the training batches (the trailing one-epoch window, ten points per epoch,
    what the paper plotted), seeds thin, mean bold, the target dashed, our crossings dotted and the paper's
    (the claim's `paper_marks`, e.g. ReLU ~6, tanh ~35 epochs) grey."""
    rows = [r for r in rows if r.runs_a or r.runs_b]
    if not rows:
        return []
    claim = rows[0].claim
    marks = next((c.get("paper_marks") or {} for c in grid.meta.get("claims", []) if c.get("id") == claim.id), {})
    runs = grid.runs.set_index("run_id")
    target = float(_first(grid.runs, "target_value", (grid.meta.get("early_stop") or {}).get("below", 0.25)))
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.0 * len(rows), 4.8), layout="constrained")
        axes = fig.subplots(1, len(rows), squeeze=False, sharey=True)[0]
        for ax, r in zip(axes, rows):
            xmax = 1.0
            sides = ((claim.b, r.runs_b, r.tuned_b, "-"), (claim.a, r.runs_a, r.tuned_a, "--"))
            for i, (value, ids, tuned, style) in enumerate(sides):
                table = _curves(grid, ids)  # (points, seeds), percent
                if table.empty:
                    continue
                xmax = max(xmax, float(table.index.max()))
                name = side_name(claim, value)
                tune = f", {claim.tune} {tuned}" if claim.tune else ""
                ax.plot(table.index, table.to_numpy(), color=PALETTE[i], lw=0.7, alpha=0.45, ls=style)
                full = table.dropna()
                ax.plot(full.index, full.mean(axis=1), color=PALETTE[i], lw=2.4, ls=style,
                        label=f"{name} (mean of {table.shape[1]}{tune})")
                reach = runs.loc[list(ids), claim.metric].mean() if ids else math.nan
                censored = bool(runs.loc[list(ids), f"{claim.metric}_censored"].any()) if ids else False
                if not math.isnan(reach):
                    ax.axvline(reach, color=PALETTE[i], ls=":", lw=1.4)
                    right = reach > 0.6 * xmax
                    ax.text(reach + (-0.012 if right else 0.012) * xmax, 15 - 9 * i,
                            f"{name}: {'≥ ' if censored else ''}{reach:.1f} epochs", color=PALETTE[i],
                            ha="right" if right else "left", va="center", fontsize=10,
                            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
                if name in marks:
                    ax.axvline(float(marks[name]), color="0.55", ls="-.", lw=1.2)
                    ax.text(float(marks[name]), 92 - 7 * i, f" paper {name} ~{float(marks[name]):g}", color="0.35",
                            fontsize=9, ha="left", va="center")
                    xmax = max(xmax, float(marks[name]) * 1.1)
            ax.axhline(100 * target, color="0.25", ls="--", lw=1.3, label=f"{target:.0%} target")
            ax.set(xlabel="epoch", ylabel="training error (%), running", ylim=(0, 100), xlim=(0, xmax * 1.02),
                   title=r.split_label or "all runs")
            ax.legend(loc="upper right", title="thin lines: single seeds")
        tuned = f", each at its chosen {claim.tune}" if claim.tune else ""
        fig.suptitle(_wrap(f"Figure 1 recreated ({grid.name}): epochs to {target:.0%} training error on the "
                           f"training batches{tuned} - {grid.label('dataset_label', 'dataset')}, budget "
                           f"{grid.label('budget') or '-'}", 90))
        return save(fig, out_dir, f"{grid.name}_figure1", dpi)


def _curves(grid: GridResults, ids) -> pd.DataFrame:
    """The running training error of each run, in percent, indexed by (fractional) epoch: a run's trace.csv, or
    its per-epoch rows when it has none."""
    cols = {}
    for rid in ids:
        path = grid.path / "runs" / str(rid) / "trace.csv"
        try:
            t = pd.read_csv(path)
            cols[rid] = t.set_index("epoch")["window_error"] * 100
        except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
            ep = grid.epochs[grid.epochs.run_id == rid]
            if len(ep):
                cols[rid] = ep.set_index("epoch")["train_error"] * 100
    return pd.DataFrame(cols).sort_index() if cols else pd.DataFrame()


def _first(runs: pd.DataFrame, column: str, default):
    if column in runs:
        values = runs[column].dropna()
        values = values[values.astype(str).str.strip() != ""]
        if len(values):
            return values.iloc[0]
    return default


# ---------------------------------------------------------------- per-variant test error

def variants_figure(grid: GridResults, axis: str, claims: list[ClaimResult], out_dir: Path,
                    dpi: int) -> list[Path]:
    """Each value of an axis: mean over seeds with 95% t-interval bars, the seeds as dots."""
    runs = _finished(grid)
    if axis not in runs or not len(runs):
        return []
    metrics = [("test_error", "test top-1 error (%)")]
    used = {r.claim.metric for r in claims}
    if "test_error_top5" in used:
        metrics.append(("test_error_top5", "test top-5 error (%)"))
    if "gap" in used:
        metrics.append(("gap", "fair gap: test - clean training error (points)"))
    other = [a for a in display_axes(runs, grid.axes) if a != axis]
    data = runs.assign(variant=runs[axis].map(canon),
                       group=[cell_label(r, other) for _, r in runs.iterrows()] if other else "")
    order = _order(list(data.variant.unique()), claims, grid.meta.get("axis_values", {}).get(axis))
    groups = sorted(data.group.unique())
    width = 0.6 / max(len(groups), 1)
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(4.5, 0.9 * len(order) + 2) * len(metrics), 4.6), layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, (metric, ylabel) in zip(axes, metrics):
            for j, group in enumerate(groups):
                for i, variant in enumerate(order):
                    values = 100 * data[(data.variant == variant) & (data.group == group)][metric].dropna()
                    if not len(values):
                        continue
                    x = i + (j - (len(groups) - 1) / 2) * width
                    iv = clip(mean_ci(values), -100.0 if metric == "gap" else 0.0, 100.0)
                    err = [[iv.estimate - iv.lo], [iv.hi - iv.estimate]] if iv.has_interval else None
                    ax.errorbar(x, iv.estimate, yerr=err, fmt="o", ms=7, capsize=5, lw=1.6, color=PALETTE[j],
                                label=(group or "mean, 95% CI") if i == 0 else None)
                    jitter = np.linspace(-0.06, 0.06, len(values)) if len(values) > 1 else 0.0
                    ax.scatter(x + jitter, values, s=14, color=PALETTE[j], alpha=0.45, zorder=1)
            ax.set_xticks(range(len(order)), order, rotation=20 if max(map(len, order)) > 8 else 0)
            ax.set(xlabel=axis, ylabel=ylabel.split(": ")[-1], title=ylabel.split(" (")[0].split(": ")[0])
            if ax.get_legend_handles_labels()[0]:  # nothing labelled when no variant has a value
                ax.legend(title=", ".join(other) if other else "dots: seeds", loc="best")
        fig.suptitle(_wrap(f"{grid.name}: per {axis}, mean and 95% CI over seeds - "
                           f"{grid.label('dataset_label', 'dataset')}", 90))
        return save(fig, out_dir, f"{grid.name}_{axis}_variants", dpi)


# ---------------------------------------------------------------- learning curves

def curves_figure(grid: GridResults, axis: str, claims: list[ClaimResult], out_dir: Path,
                  dpi: int) -> list[Path]:
    """Train (dashed) and test (solid) error vs epoch per value of an axis: the gap between them is over-fitting."""
    runs = _finished(grid)
    if axis not in runs or not len(grid.epochs):
        return []
    other = [a for a in display_axes(runs, grid.axes) if a != axis]
    labels = runs.assign(variant=runs[axis].map(canon),
                         group=[cell_label(r, other) for _, r in runs.iterrows()] if other else "")
    train = "clean_train_error" if "clean_train_error" in grid.epochs and grid.epochs.clean_train_error.notna().any() \
        else "train_error"
    ep = grid.epochs[["run_id", "epoch", train, "test_error"]].merge(
        labels[["run_id", "variant", "group"]], on="run_id")
    long = ep.melt(id_vars=["run_id", "epoch", "variant", "group"], value_vars=[train, "test_error"],
                   var_name="split", value_name="error")
    long = long.assign(error=100 * long.error, split=long.split.map({train: "train", "test_error": "test"}))
    order = _order(list(labels.variant.unique()), claims, grid.meta.get("axis_values", {}).get(axis))
    groups = sorted(long.group.unique())
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.2 * len(groups) + 1.6, 4.6), layout="constrained")
        axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
        for k, (ax, group) in enumerate(zip(axes, groups)):
            sns.lineplot(data=long[long.group == group].rename(columns={"variant": axis}), x="epoch", y="error",
                         hue=axis, hue_order=order,
                         style="split", style_order=["test", "train"], errorbar=_t_band, palette="colorblind",
                         lw=2, ax=ax, legend=k == len(groups) - 1)
            ax.set(xlabel="epoch", ylabel="error (%)", title=group or f"per {axis}")
        if ax.get_legend():
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title=None, frameon=False)
        which = "clean (eval-mode) training error" if train == "clean_train_error" else "training-batch error"
        fig.suptitle(_wrap(f"{grid.name}: learning curves, mean over seeds with 95% CI band; train = {which}; the "
                           f"gap to test is over-fitting - {grid.label('dataset_label', 'dataset')}", 90))
        return save(fig, out_dir, f"{grid.name}_{axis}_curves", dpi)


# ---------------------------------------------------------------- data-parallel scaling

def scaling_figure(grid: GridResults, out_dir: Path, dpi: int) -> list[Path]:
    """Throughput and scaling efficiency (speed-up / N, seeds paired with the smallest device count) vs devices."""
    runs = _finished(grid)
    if "devices" not in runs or runs.devices.nunique() < 2:
        return []
    other = [a for a in display_axes(runs, grid.axes) if a != "devices"]
    data = runs.assign(n=pd.to_numeric(runs.devices),
                       group=[cell_label(r, other) for _, r in runs.iterrows()] if other else "all runs")
    counts = sorted(data.n.unique())
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        ax_ips, ax_eff = fig.subplots(1, 2)
        for j, (group, g) in enumerate(data.groupby("group", sort=True)):
            base_n = g.n.min()
            base = g[g.n == base_n].groupby("seed").images_per_second.mean()
            ips = [mean_ci(g[g.n == n].images_per_second) for n in counts]
            means = np.array([iv.estimate for iv in ips])
            err = np.array([[iv.estimate - iv.lo, iv.hi - iv.estimate] if iv.has_interval else [0, 0]
                            for iv in ips]).T  # (2, counts)
            ax_ips.errorbar(counts, means, yerr=err, fmt="o-", capsize=5, lw=2, color=PALETTE[j], label=group)
            ax_ips.plot(counts, base.mean() * np.array(counts) / base_n, ls="--", color=PALETTE[j], lw=1.2,
                        alpha=0.8, label=f"{group}: ideal (linear)")
            for n in counts:
                side = g[g.n == n].groupby("seed").images_per_second.mean()
                common = sorted(set(side.index) & set(base.index))
                paired = len(common) >= 2
                iv = compare(side.loc[common] if paired else side, base.loc[common] if paired else base, "ratio",
                             paired)
                k = n / base_n
                err = [[100 * (iv.estimate - iv.lo) / k], [100 * (iv.hi - iv.estimate) / k]] \
                    if iv.has_interval else None
                ax_eff.errorbar(n, 100 * iv.estimate / k, yerr=err, fmt="o", capsize=5, ms=7, color=PALETTE[j],
                                label=group if n == counts[0] else None)
        ax_eff.axhline(100, color="0.3", ls="--", lw=1.2, label="perfect scaling")
        for ax in (ax_ips, ax_eff):
            ax.set_xticks(counts, [f"{n:g}" for n in counts])
            ax.set_xlabel("devices (data-parallel processes)")
        ax_ips.set(ylabel="training throughput (images/s)", title="Throughput (mean, 95% CI)")
        ax_eff.set(ylabel="scaling efficiency (%)", title="Speed-up / N (seeds paired)",
                   ylim=(0, max(115, ax_eff.get_ylim()[1])))
        ax_ips.legend(loc="upper left")
        ax_eff.legend(loc="lower left")
        device = grid.label("device_name")
        fig.suptitle(_wrap(f"{grid.name}: data-parallel scaling{' on ' + device if device else ''} - "
                           f"{grid.label('dataset_label', 'dataset')}", 90))
        return save(fig, out_dir, f"{grid.name}_scaling", dpi)


# ---------------------------------------------------------------- every claim

def _verdict_color(verdict: str):
    for key, color in VERDICT_COLORS.items():
        if verdict.startswith(key):
            return color
    return "0.5"


def forest_figure(results: list[ClaimResult], out_dir: Path, dpi: int, name: str = "claims_forest") -> list[Path]:
    """Paper's effect (open diamond) vs ours (dot, 95% CI bar, coloured by verdict) for every claim row.
    Ratios (log scale, 1 = no effect) and differences (points, 0 = no effect) in separate panels."""
    rows = [r for r in results if r.interval.method != "none"]
    panels = [(p, title) for p, title in (
        ([r for r in rows if r.claim.effect == "ratio"], "ratio a / b (log scale; 1 = no effect)"),
        ([r for r in rows if r.claim.effect != "ratio"], "difference a - b (percentage points; 0 = no effect)"))
        if p]
    if not panels:
        return []
    with matplotlib.rc_context(RC):
        heights = [len(p) + 1.2 for p, _ in panels]
        fig = Figure(figsize=(10, 0.55 * sum(heights) + 1.6), layout="constrained")
        axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, (panel, title) in zip(axes, panels):
            for y, r in enumerate(reversed(panel)):
                iv, c = r.interval, r.claim
                color = _verdict_color(r.verdict)
                marker = {"lower": ">", "upper": "<"}.get(r.bound, "o")
                shown = iv.has_interval and not r.bound and not r.verdict.startswith(NOT_TESTABLE)
                if shown:
                    ax.hlines(y, iv.lo, iv.hi, color=color, lw=2.4)
                ax.scatter(iv.estimate, y, marker=marker, s=60, zorder=3, color=color if shown else "white",
                           edgecolors=color, linewidths=1.8)
                if c.paper is not None:
                    ax.scatter(c.paper, y, marker="D", s=55, zorder=4, facecolors="none", edgecolors="black",
                               linewidths=1.4)
                if c.margin is not None:  # an equivalence claim: its interval must fit between the two ticks
                    ax.scatter([-c.margin, c.margin], [y, y], marker="|", s=260, zorder=2, color="0.35",
                               linewidths=1.6)
            ax.axvline(1.0 if "ratio" in title else 0.0, color="0.3", lw=1.1, ls="--")
            if "ratio" in title:
                _log_ratio_axis(ax)
            ax.set_yticks(range(len(panel)), [_row_label(r) for r in reversed(panel)])
            ax.set_ylim(-0.7, len(panel) - 0.3)
            ax.set_xlabel(title)
        seen = list(dict.fromkeys(k for r in rows for k in VERDICT_COLORS if r.verdict.startswith(k)))
        handles = [Line2D([], [], color=VERDICT_COLORS[k], marker="o", lw=0 if k == NOT_TESTABLE else 2.4,
                          mfc="white" if k == NOT_TESTABLE else VERDICT_COLORS[k], label=k) for k in seen]
        handles += [Line2D([], [], color="black", marker="D", mfc="none", ls="none", label="paper's number"),
                    Line2D([], [], color="0.4", marker=">", ls="none", label="≥ lower bound (censored runs)")]
        if any(r.claim.margin is not None for r in rows):
            handles.append(Line2D([], [], color="0.35", marker="|", ms=14, mew=1.6, ls="none",
                                  label="± equivalence margin"))
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
        labels = sorted({r.dataset_label for r in rows if r.dataset_label})
        fig.suptitle(_wrap(f"Every claim: the paper's effect vs ours (95% CI over seeds) - {', '.join(labels)}", 90))
        return save(fig, out_dir, name, dpi)


def _row_label(r: ClaimResult) -> str:
    c = r.claim
    op = " / " if c.effect == "ratio" else " - "
    per = f" / {c.per:g}" if c.per != 1 else ""
    return (_wrap(r.label + (" (secondary)" if c.secondary else ""), 48)
            + f"\n{side_label(c, 'a')}{op}{side_label(c, 'b')}{per}, {c.metric}")


def _log_ratio_axis(ax) -> None:
    """Log scale with plain tick labels (0.5x, 1x, 2x, 6x) instead of powers of ten."""
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    nice = [v for v in (0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 10, 15, 20, 30, 50, 100) if lo <= v <= hi]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(nice))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


# ---------------------------------------------------------------- a grid's figures

def grid_figures(grid: GridResults, results: list[ClaimResult], out_dir: Path, dpi: int) -> list[Path]:
    """Every figure a grid's claims call for (PNG and SVG paths)."""
    paths: list[Path] = []
    primary = [r for r in results if not r.claim.secondary]
    for cid in dict.fromkeys(r.claim.id for r in primary if r.claim.metric == "epochs_to_target"):
        paths += figure1(grid, [r for r in primary if r.claim.id == cid], out_dir, dpi)
    error_axes = dict.fromkeys(r.claim.axis for r in results
                               if r.claim.metric in ("test_error", "test_error_top5", "gap"))
    for axis in error_axes:
        paths += variants_figure(grid, axis, [r for r in results if r.claim.axis == axis], out_dir, dpi)
    for axis in dict.fromkeys(r.claim.axis for r in results
                              if r.claim.metric == "gap" or r.claim.regime == "overfitting"):
        paths += curves_figure(grid, axis, [r for r in results if r.claim.axis == axis], out_dir, dpi)
    paths += scaling_figure(grid, out_dir, dpi)
    return paths
