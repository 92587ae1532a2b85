"""Read the results store (results/<grid>/grid.json, runs.csv, epochs.csv) into frames, or say what is wrong.

The aggregates are derived files written atomically by `ablate run`; one that is missing while run folders
exist, cut short, or unparseable is an error that names the file and the command that regenerates it. A grid
folder with no runs at all is not an error: the report says "no runs". Derived metrics (the train/test gap,
censored times to a target) are added here once, so claims and figures read the same numbers."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ablations.choices import FINISHED
from ablations.errors import UserError
from ablations.grid import defined_run_ids
from ablations.grid import load_grid as load_grid_file

RUN_KEYS = ["run_id", "status", "seed"]
EPOCH_KEYS = ["run_id", "epoch", "train_error", "test_error"]
METRICS = ["train_loss", "train_error", "clean_train_error", "val_error", "test_loss", "test_error",
           "test_error_top5", "test_error_at_best_val", "test_error_1view", "gap", "epochs_run", "epochs_to_target",
           "seconds_to_target", "epochs_to_loss", "train_seconds", "wall_seconds", "images_per_second",
           "lrn_factor_p05", "lrn_factor_p95", "lrn_factor_spread"]
CHANCE_LOSS = 0.98  # runners/train.py's rule, for runs recorded before `learned` was: loss >= 0.98 ln(classes)
# a metric that is empty when a run never got there: counted at what the run spent (censored), never dropped
CENSORABLE = ("epochs_to_target", "seconds_to_target", "epochs_to_loss")
# settings outside the axes that must match the latest `ablate run` (grid.json) for a run to be reported
SETTING_KEYS = ("budget", "dataset")


@dataclass(frozen=True)
class GridResults:
    name: str
    path: Path
    meta: dict[str, Any]  # grid.json
    runs: pd.DataFrame  # runs.csv with derived columns; empty when there are no runs
    epochs: pd.DataFrame  # epochs.csv
    notes: tuple[str, ...] = field(default=())  # what was left out while loading
    settings: tuple[tuple[str, tuple[str, ...]], ...] = ()  # every spec.json field of the reported runs -> values

    def settings_text(self) -> str:
        """The settings the reported runs were made with, every override included: one value, or the set."""
        parts = []
        for key, values in self.settings:
            parts.append(f"{key}={values[0]}" if len(values) == 1 else f"{key} in {{{', '.join(values)}}}")
        return ", ".join(parts)

    @property
    def axes(self) -> list[str]:
        return [a for a in self.meta.get("axes", []) if a in self.runs.columns]

    def command(self, default: str = "") -> str:
        return self.meta.get("command") or default or f"ablate run --grid {self.name}"

    def budget_label(self) -> str:
        """The budget with the overrides the reported runs were made with ("cpu (precision=fp32)"): a verdict names
        what was run, not only the preset it started from."""
        budget = self.label("budget")
        over = self.meta.get("overrides") or {}
        return f"{budget} ({', '.join(f'{k}={canon(v)}' for k, v in sorted(over.items()))})" if over else budget

    def label(self, column: str, meta_key: str | None = None) -> str:
        """The value(s) a column holds, as recorded (e.g. the data set label), else grid.json's."""
        if column in self.runs and self.runs[column].notna().any():
            return ", ".join(sorted({str(v) for v in self.runs[column].dropna()}))
        return str(self.meta.get(meta_key or column) or "")


def grid_dirs(results_dir: Path) -> list[str]:
    """Names of the folders under results that hold a grid (grid.json, runs.csv or run folders)."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any((p / f).exists() for f in ("grid.json", "runs.csv", "runs")))


def load_results(results_dir: Path, grids: list[str] | None = None) -> list[GridResults]:
    """Every requested grid under results_dir (all of them by default)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"no results folder {root}; run `ablate run --grid NAME` first, or point --results at one")
    found = grid_dirs(root)
    if not found:
        raise UserError(f"{root} holds no grid results (no <grid>/grid.json); run `ablate run --grid NAME` first")
    unknown = [g for g in grids or [] if g not in found]
    if unknown:
        raise UserError(f"no results for grid {unknown[0]!r} under {root}; grids with results: {', '.join(found)}")
    return [load_grid(root, name) for name in (list(dict.fromkeys(grids)) if grids else found)]


def load_grid(results_dir: Path, name: str) -> GridResults:
    gdir = Path(results_dir) / name
    rerun = f"re-run `ablate run --grid {name}` (finished runs are skipped) to regenerate it"
    meta = _read_meta(gdir / "grid.json", name, rerun)
    run_folders = [p for p in (gdir / "runs").glob("*/")] if (gdir / "runs").is_dir() else []
    if not (gdir / "runs.csv").exists():
        finished = [p for p in run_folders if (p / "summary.json").is_file()]
        if finished:  # unfinished runs (a grid still training its first runs) have no aggregate row yet
            raise UserError(f"{gdir / 'runs.csv'} is missing but {len(finished)} run folders exist (finished runs, in "
                            f"no aggregate); {rerun}")
        return GridResults(name, gdir, meta, pd.DataFrame(columns=RUN_KEYS), pd.DataFrame(columns=EPOCH_KEYS))
    runs = _read_csv(gdir / "runs.csv", [*RUN_KEYS, *[a for a in meta.get("axes", [])]], rerun)
    epochs = _read_csv(gdir / "epochs.csv", EPOCH_KEYS, rerun)
    _check_against_run_folders(gdir, runs, epochs, run_folders, rerun)
    runs, notes = _current_settings(gdir, runs, meta)
    runs = derive_metrics(runs, meta)
    epochs = epochs[epochs.run_id.isin(runs.run_id)]
    return GridResults(name, gdir, meta, runs.reset_index(drop=True), epochs.reset_index(drop=True), tuple(notes),
                       run_settings(gdir, list(runs.run_id)))


def run_settings(gdir: Path, run_ids: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each result-deciding field of the runs' spec.json (model fields by their own name) and the values taken."""
    seen: dict[str, dict[str, None]] = {}
    for rid in run_ids:
        try:
            spec = json.loads((gdir / "runs" / str(rid) / "spec.json").read_text())
        except (OSError, ValueError):
            continue
        flat = {**{k: v for k, v in spec.items() if k not in ("model", "axes", "grid", "run_id", "seed")},
                **spec.get("model", {})}
        for k, v in flat.items():
            seen.setdefault(k, {})[canon(v)] = None
    return tuple((k, tuple(sorted(v, key=lambda x: (len(x), x)))) for k, v in sorted(seen.items()))


def _check_against_run_folders(gdir: Path, runs: pd.DataFrame, epochs: pd.DataFrame, folders: list[Path],
                               rerun: str) -> None:
    """The aggregates are derived from the run folders: a duplicated row, a finished run missing from runs.csv, a
    row without its run, or epoch rows of unknown runs mean they are out of date or edited; refuse to report."""
    dup = runs.run_id[runs.run_id.duplicated()]
    if len(dup):
        raise UserError(f"{gdir / 'runs.csv'} lists run {dup.iloc[0]} more than once; {rerun}")
    if not folders:
        return
    finished = {p.name for p in folders if (p / "summary.json").is_file()}
    listed = set(runs.run_id.astype(str))
    missing, extra = finished - listed, listed - {p.name for p in folders}
    if missing or extra:
        raise UserError(f"{gdir / 'runs.csv'} is out of date with its run folders ({len(missing)} finished run(s) "
                        f"missing, {len(extra)} row(s) without a run folder); {rerun}")
    unknown = set(epochs.run_id.astype(str)) - listed
    if unknown:
        raise UserError(f"{gdir / 'epochs.csv'} holds rows of {len(unknown)} run(s) not in runs.csv; {rerun}")


def _read_meta(path: Path, name: str, rerun: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} is missing; re-run `ablate run --grid {name}`, which writes it")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}); re-run `ablate run --grid {name}`, "
                        f"which rewrites it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a grid description (expected a JSON object); {rerun}")
    meta.setdefault("name", name)
    return meta


def _read_csv(path: Path, required: list[str], rerun: str) -> pd.DataFrame:
    """A CSV written whole by an atomic writer; anything else (cut short, garbled, missing columns) is an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {rerun}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}); {rerun}") from None
    if not text.strip():
        raise UserError(f"{path} is empty; {rerun}")
    if not text.endswith("\n"):
        raise UserError(f"{path} is truncated (its last line is cut off); {rerun}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise UserError(f"{path} is not a readable CSV ({str(err).splitlines()[0][:80]}); {rerun}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; {rerun}")
    return df


def _current_settings(gdir: Path, runs: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, list[str]]:
    """Keep the runs that the grid file, as it stands, defines at the recorded budget and overrides (any seed):
    the committed evidence answers the grid as written, whichever command ran last.

    Runs of other budgets, overrides or an earlier definition of the budget share the folder but not the question;
    mixing them would average, say, 10-epoch and 40-epoch runs into one cell. A run is judged by its id (the hash
    of its spec.json); one without a spec.json, or a grid whose file no longer loads, by the recorded budget,
    data set and overrides."""
    want = {k: meta[k] for k in SETTING_KEYS if meta.get(k) is not None}
    want.update({k: v for k, v in (meta.get("overrides") or {}).items() if k not in want})
    settings = ", ".join(f"{k}={v}" for k, v in want.items())
    keep = pd.Series(True, index=runs.index)
    for key, value in want.items():
        if key in runs.columns:  # the runner writes a zero setting (subset = 0: all images) as empty
            keep &= runs[key].map(lambda v: canon(v) or "0") == (canon(value) or "0")
    has_spec = runs.run_id.map(lambda rid: (gdir / "runs" / str(rid) / "spec.json").is_file())
    try:
        seeds = sorted({int(s) for s in pd.to_numeric(runs["seed"], errors="coerce").dropna()})
        ids = defined_run_ids(load_grid_file(gdir.name), meta.get("budget") or "gpu", meta.get("overrides") or {},
                              seeds)
        keep = keep & ~has_spec | runs.run_id.astype(str).isin(ids)
    except UserError:
        pass
    dropped = runs[~keep]
    if not len(dropped):
        return runs, []
    return runs[keep], [f"{len(dropped)} runs made with other settings than the grid file defines at {settings} "
                        f"are left out"]


def derive_metrics(runs: pd.DataFrame, meta: dict | None = None) -> pd.DataFrame:
    """Add `gap` (test error - clean training error, final epoch: eval mode, no dropout or augmentation, so a
    regulariser cannot shrink it by raising the training-batch error alone; NaN for runs that recorded no clean
    error) and `learned` where a run predates it, and fill censorable metrics of runs that never got there.

    A run that never reached its target counts at what it spent: the epoch cap (epochs_*) or its training
    seconds (seconds_*), with `<metric>_censored` = True. Failed runs carry no numbers and are left as they are."""
    runs = runs.copy()
    for m in METRICS:
        if m != "gap" and m not in runs:
            runs[m] = np.nan
        elif m != "gap":
            runs[m] = pd.to_numeric(runs[m], errors="coerce")
    clean = pd.to_numeric(runs["clean_train_error"], errors="coerce") if "clean_train_error" in runs else np.nan
    runs["gap"] = runs.test_error - clean
    if "learned" not in runs or (runs.learned.isna().any() and "train_loss" in runs):  # rows without the flag
        classes = (meta or {}).get("num_classes") or (100 if "cifar100" in str((meta or {}).get("dataset")) else 10)
        by_loss = runs.train_loss < CHANCE_LOSS * math.log(classes)
        runs["learned"] = runs.learned.where(runs.learned.notna(), by_loss) if "learned" in runs else by_loss
    cap = pd.to_numeric(runs["epochs"], errors="coerce") if "epochs" in runs else pd.Series(np.nan, runs.index)
    cap = cap.fillna((meta or {}).get("epochs", np.nan))
    ran = runs.status.isin(FINISHED)
    has_target = _present(runs, "target_metric") & ran
    has_loss = (pd.to_numeric(runs.get("loss_target", pd.Series(np.nan, runs.index)), errors="coerce") > 0) & ran
    spent = {"epochs_to_target": (has_target, cap), "seconds_to_target": (has_target, runs.train_seconds),
             "epochs_to_loss": (has_loss, cap)}
    for m, (applies, at) in spent.items():
        censored = applies & runs[m].isna()
        runs[f"{m}_censored"] = censored
        runs[m] = runs[m].where(~censored, at)
    return runs


def _present(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs:
        return pd.Series(False, index=runs.index)
    col = runs[column]
    return col.notna() & (col.astype(str).str.strip() != "")


def canon(value: Any) -> str:
    """One spelling per axis value, whether it came from TOML, JSON or a CSV column: True, 2, 0.5, relu."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        if value in ("True", "False", "true", "false"):
            return value.capitalize()
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        x = float(value)
        return str(int(x)) if x.is_integer() else repr(x)
    return str(value)


def display_axes(runs: pd.DataFrame, axes: list[str]) -> list[str]:
    """The axes that name a cell: those that vary and are not fixed by the axes before them (zip partners)."""
    keys = runs.assign(**{a: runs[a].map(canon) for a in axes if a in runs})
    kept: list[str] = []
    for axis in axes:
        if axis not in keys or keys[axis].nunique() < 2:
            continue
        if kept and (keys.groupby(kept)[axis].nunique() <= 1).all():
            continue
        kept.append(axis)
    return kept


def cell_label(row: pd.Series | dict, axes: list[str]) -> str:
    return ", ".join(f"{a}={canon(row[a])}" for a in axes)


def coverage(grid: GridResults) -> list[str]:
    """What the grid lacks, in words: "no runs", "1 of 3 seeds", failed and diverged runs, other settings."""
    notes = list(grid.notes)
    runs = grid.runs
    if not len(runs):
        return [*notes, "no runs"]
    axes = display_axes(runs, grid.axes)
    if grid.meta.get("tune"):
        return [*notes, *_tuned_coverage(runs, axes, grid.meta), *_run_problems(grid, runs, axes)]
    seen = sorted({int(s) for s in runs.seed.dropna()})
    planned = defined_seeds(grid) or grid.meta.get("run_seeds") or (
        grid.meta.get("seeds") if grid.meta.get("budget", "gpu") == "gpu" else None)
    expected = sorted(set(planned or []) | set(seen))
    cells = runs.groupby(axes, sort=True) if axes else [((), runs)]
    short = []
    for key, cell in cells:
        have = cell[cell.status.isin(FINISHED)].seed.nunique()
        if have < len(expected):
            short.append((cell_label(cell.iloc[0], axes), have))
    n_cells = len(runs.groupby(axes)) if axes else 1
    pending, defined = pending_runs(grid)
    if pending:  # whole cells the grid file defines may have no run yet: the cells above cannot show them
        notes.append(f"{pending} of the {defined} runs the grid file defines are not done yet (`ablate run --grid "
                     f"{grid.name} --budget {grid.meta.get('budget') or 'gpu'}` trains them)")
    if not short:
        notes += [] if pending else [f"complete: {n_cells} cell(s) x {len(expected)} seed(s)"]
    elif len({h for _, h in short}) == 1 and len(short) == n_cells:
        notes.append(f"{short[0][1]} of {len(expected)} seeds")
    else:
        shown = "; ".join(f"{label or 'all'}: {h} of {len(expected)} seeds" for label, h in short[:8])
        notes.append(shown + (f"; and {len(short) - 8} more cells" if len(short) > 8 else ""))
    return notes + _run_problems(grid, runs, axes)


def pending_runs(grid: GridResults) -> tuple[int, int]:
    """(runs the grid file defines at the recorded budget and overrides that have not finished, runs it defines);
    (0, 0) when no finished run is one of them (results from elsewhere, or of an earlier definition), and for a
    tuned grid, whose confirmation runs depend on the selection (its coverage counts both parts)."""
    seeds = defined_seeds(grid)
    if seeds is None or grid.meta.get("tune"):
        return 0, 0
    try:
        ids = defined_run_ids(load_grid_file(grid.name), grid.meta.get("budget") or "gpu",
                              grid.meta.get("overrides") or {}, seeds)
    except UserError:
        return 0, 0
    done = set(grid.runs[grid.runs.status.isin(FINISHED)].run_id.astype(str)) & ids
    return (len(ids - done), len(ids)) if done else (0, 0)


def defined_seeds(grid: GridResults) -> list[int] | None:
    """The seeds the grid file, as it stands, defines at the recorded budget (as the run selection reads it), not
    those of the last `ablate run`; None for a grid without a file (a results folder from elsewhere)."""
    try:
        g = load_grid_file(grid.name)
    except UserError:
        return None
    return list(g.budgets.get(grid.meta.get("budget") or "gpu", {}).get("seeds", g.seeds))


def _tuned_coverage(runs: pd.DataFrame, axes: list[str], meta: dict) -> list[str]:
    """A tuned grid runs every value of its tune axis on the selection seeds and only the chosen value on the
    confirmation seeds: each part is complete when every cell has its own seeds."""
    tune_axis, selection = meta["tune"]["axis"], sorted(meta["tune"].get("seeds", []))
    confirmation = sorted(set(meta.get("seeds") or []) - set(selection))

    def lacking(keys: list[str], seeds: list[int]) -> tuple[int, list[str]]:
        groups = [cell for _, cell in runs.groupby(keys, sort=True)] if keys else [runs]
        short = [cell_label(cell.iloc[0], keys) or "all" for cell in groups
                 if not set(seeds) <= set(cell[cell.status.isin(FINISHED)].seed.astype(int))]
        return len(groups), short

    notes = []
    for part, keys, seeds in (("selection", axes, selection),
                              (f"confirmation at the chosen {tune_axis}", [a for a in axes if a != tune_axis],
                               confirmation)):
        n, short = lacking(keys, seeds)
        notes.append(f"{part}: {n - len(short)} of {n} cell(s) x {len(seeds)} seed(s)"
                     + (f" (short: {'; '.join(short[:6])})" if short else ""))
    return notes


def _run_problems(grid: GridResults, runs: pd.DataFrame, axes: list[str]) -> list[str]:
    """Failed and diverged runs, finished runs whose learning curves are missing, runs trained in another grid."""
    notes = []
    for source, copies in runs[copied(runs)].groupby("reused_from") if "reused_from" in runs else ():
        notes.append(f"{len(copies)} run(s) trained in grid {source} with the same settings and copied here "
                     f"(their machine time counts there)")
    ok = runs[runs.status.isin(FINISHED)]
    for status in ("failed", "diverged"):
        bad = runs[runs.status == status]
        if len(bad):
            which = ", ".join(f"{cell_label(r, axes)} seed {r.seed}".lstrip(", ") for _, r in bad.head(5).iterrows())
            notes.append(f"{len(bad)} {status} run(s): {which}" + (" ..." if len(bad) > 5 else ""))
    no_curves = set(ok.run_id) - set(grid.epochs.run_id)
    if no_curves:
        notes.append(f"{len(no_curves)} run(s) have no rows in epochs.csv (their learning curves are missing)")
    return notes


def copied(runs: pd.DataFrame) -> pd.Series:
    """The runs copied from the grid that trained them (Store.adopt_run: `reused_from` names it)."""
    if "reused_from" not in runs:
        return pd.Series(False, index=runs.index)
    return runs.reused_from.fillna("").astype(str) != ""


def machine_seconds(runs: pd.DataFrame) -> float:
    """The machine time a grid's finished runs took: each run's wall time x its threads x its processes (a DDP
    run's world_size) / the machine's cores (read from device_name, "..., 2 CPUs"), so that runs trained two at a
    time (--jobs 2, a thread each) count half their wall time each, and one run on every core, in one process or
    in one per core, counts its own. GPU runs count their wall time."""
    done = runs[runs.status.isin(FINISHED)] if "status" in runs else runs
    done = done[~copied(done)]  # counted in the grid that trained them
    if not len(done) or "wall_seconds" not in done:
        return 0.0
    total = 0.0
    for _, r in done.iterrows():
        wall = float(r.wall_seconds) if pd.notna(r.get("wall_seconds")) else 0.0
        cores = re.search(r"(\d+) CPUs?$", str(r.get("device_name", "")))
        threads = float(r.get("threads")) if pd.notna(r.get("threads")) else 0.0
        threads *= float(r.get("world_size")) if pd.notna(r.get("world_size", float("nan"))) else 1.0
        total += wall * (min(threads, float(cores.group(1))) / float(cores.group(1)) if cores and threads else 1.0)
    return total
