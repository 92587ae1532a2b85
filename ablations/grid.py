"""Grid specs: one TOML file per grid in ablations/grids/, validated on load, expanded into RunSpecs.

A grid names base settings (`[run]`), Cartesian axes (`[axes]`), zipped axes whose values move together
(`[zip.NAME]`), seeds, an optional early stop, per-budget overrides (`[budgets.cpu]`, with
`[budgets.cpu.zip.NAME]` for a value per zip row) and the claims it tests (`[[claims]]`). Every error names
the file, the key and what was expected.

Grid files are looked up by name in ablations/grids/, then in the folder $ABLATE_GRIDS_DIR names (grids kept
outside the package; a shipped name wins). A name is letters, digits, '_' and '-', so it never leaves a folder."""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ablations.claims import check_claim
from ablations.errors import UserError, check_table, no_unknown
from ablations.models import ModelSpec, validate
from ablations.settings import (AXIS_PREFIX, FIELDS, MAX_SEEDS, MODEL_FIELDS, check_axis, check_seeds,  # noqa: F401
                                check_value, parse_overrides)
from ablations.spec import DATASETS, RunSpec

GRIDS_DIR = Path(__file__).parent / "grids"
GRIDS_ENV = "ABLATE_GRIDS_DIR"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

TOP_KEYS = {"title", "description", "seeds", "run", "axes", "zip", "early_stop", "budgets", "claims", "loss_target",
            "tune", "tests_paper"}
TUNE_KEYS = {"axis", "metric", "seeds"}
TUNE_METRICS = ("epochs_to_target", "val_error", "val_loss")  # minimised; never a test metric


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    title: str
    description: str
    seeds: tuple[int, ...]
    base: dict[str, Any]
    axes: dict[str, list]  # Cartesian
    zips: dict[str, dict[str, list]]  # name -> {key: values}, all of one length
    budgets: dict[str, dict[str, Any]]
    claims: tuple[dict[str, Any], ...]
    tune: dict[str, Any] | None = None  # {"axis", "metric", "seeds"}: see ablations/tune.py
    tests_paper: bool = True  # False for a pipeline check (smoke): never in the claims table or the forest figure

    @property
    def axis_names(self) -> list[str]:
        names = list(self.axes)
        for zname, group in self.zips.items():
            names += [zname] + [k for k in group if k != zname]
        return names

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "description": self.description,
                "axes": self.axis_names, "claims": list(self.claims), "seeds": list(self.seeds),
                "budgets": sorted(self.budgets), "tune": self.tune, "tests_paper": self.tests_paper}


def grid_dirs() -> list[Path]:
    """The shipped grids, then $ABLATE_GRIDS_DIR."""
    extra = os.environ.get(GRIDS_ENV)
    return [GRIDS_DIR, *([Path(extra).expanduser()] if extra else [])]


def grid_names() -> list[str]:
    return sorted({p.stem for d in grid_dirs() for p in d.glob("*.toml") if _NAME_RE.match(p.stem)})


def grid_path(name: str) -> Path:
    """Resolve a grid name to its file; names cannot reach outside the grids folder."""
    if not _NAME_RE.match(name or ""):
        raise UserError(f"grid name {name!r} is not a grid name (letters, digits, '_' and '-' only); "
                        f"known grids: {', '.join(grid_names())}")
    for folder in grid_dirs():
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise UserError(f"unknown grid {name!r}; known grids: {', '.join(grid_names())} (see `ablate list`)")


def load_grid(name: str) -> Grid:
    return parse_grid(name, grid_path(name))


def parse_grid(name: str, path: Path) -> Grid:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML ({err}); fix the file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a grid file; a grid is a few flat tables") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (UTF-8) file; a grid is a TOML text file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    where = str(path)
    no_unknown(raw, TOP_KEYS, where, "top-level key")
    base = dict(raw.get("run", {}))
    check_table(base, where, "run")
    for key, value in base.items():
        check_value(key, value, f"{where}: run.{key}")
    if "early_stop" in raw:
        es = raw["early_stop"]
        no_unknown(es, {"metric", "below"}, where, "early_stop key")
        base["early_stop_metric"] = es.get("metric", "")
        base["early_stop_below"] = es.get("below", 0.0)
        check_value("early_stop_metric", base["early_stop_metric"], f"{where}: early_stop.metric")
        check_value("early_stop_below", base["early_stop_below"], f"{where}: early_stop.below")
    if "loss_target" in raw:
        check_value("loss_target", raw["loss_target"], f"{where}: loss_target")
        base["loss_target"] = raw["loss_target"]

    axes = raw.get("axes", {})
    check_table(axes, where, "axes")
    for key, values in axes.items():
        check_axis(key, values, f"{where}: axes.{key}")
    zips = raw.get("zip", {})
    check_table(zips, where, "zip")
    seen = set(axes)
    for zname, group in zips.items():
        check_table(group, where, f"zip.{zname}")
        if not group:
            raise UserError(f"{where}: zip.{zname} is empty; give it at least one key with a list of values")
        lengths = {len(v) if isinstance(v, list) else -1 for v in group.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise UserError(f"{where}: zip.{zname}: every key needs a list of values of the same length")
        for key, values in group.items():
            check_axis(key, values, f"{where}: zip.{zname}.{key}", label=key == zname and key not in FIELDS,
                        distinct=False)
        rows = list(zip(*group.values()))
        if len({repr(r) for r in rows}) != len(rows):
            raise UserError(f"{where}: zip.{zname}: two rows are the same; list each combination once")
        dup = seen & (set(group) | {zname})
        if dup:
            raise UserError(f"{where}: axis {sorted(dup)[0]!r} is given twice; each axis may appear once")
        seen |= set(group) | {zname}

    seeds = raw.get("seeds", [0])
    check_seeds(seeds, f"{where}: seeds")
    tune = raw.get("tune")
    if tune is not None:
        check_table(tune, where, "tune")
        no_unknown(tune, TUNE_KEYS, where, "tune key")
        if tune.get("axis") not in axes:
            raise UserError(f"{where}: tune.axis must name a Cartesian axis of this grid ({', '.join(axes)}), "
                            f"got {tune.get('axis')!r}")
        if tune.get("metric") not in TUNE_METRICS:
            raise UserError(f"{where}: tune.metric must be one of {', '.join(TUNE_METRICS)} (the test split decides "
                            f"nothing), got {tune.get('metric')!r}")
        check_seeds(tune.get("seeds"), f"{where}: tune.seeds")
        if set(tune["seeds"]) & set(seeds):
            raise UserError(f"{where}: tune.seeds (selection) and seeds (confirmation) must differ, so that the "
                            f"effect is estimated on runs that did not choose the setting")

    budgets = raw.get("budgets", {})
    check_table(budgets, where, "budgets")
    for bname, table in budgets.items():
        check_table(table, where, f"budgets.{bname}")
        for key, value in table.items():
            if key == "seeds":
                check_seeds(value, f"{where}: budgets.{bname}.seeds")
                if tune is not None and set(value) & set(tune["seeds"]):
                    raise UserError(f"{where}: budgets.{bname}.seeds overlap tune.seeds; confirmation seeds must "
                                    f"differ from selection seeds")
                continue
            if key == "zip":  # a budget may give a zip's rows other values, e.g. a per-arm epoch cap
                check_budget_zip(value, zips, set(axes), where, f"budgets.{bname}.zip")
                continue
            if key == "axes":  # a budget may sweep fewer values of an existing Cartesian axis
                check_table(value, where, f"budgets.{bname}.axes")
                for axis, values in value.items():
                    if axis not in axes:
                        raise UserError(f"{where}: budgets.{bname}.axes.{axis} is not a Cartesian axis of this grid")
                    check_axis(axis, values, f"{where}: budgets.{bname}.axes.{axis}")
                continue
            check_value(key, value, f"{where}: budgets.{bname}.{key}")

    if not raw or not any(k in raw for k in ("run", "axes", "zip")):
        raise UserError(f"{where}: the grid sets nothing (no [run], [axes] or [zip] table); a grid needs at least "
                        f"a [run] table, e.g. [run] arch = \"convnet4\"")
    axis_values = {**axes, **{k: v for g in zips.values() for k, v in g.items()}}
    claims = tuple(check_claim(c, i, where, axis_values) for i, c in enumerate(raw.get("claims", [])))
    return Grid(name=name, path=path, title=raw.get("title", name), description=raw.get("description", ""),
                seeds=tuple(seeds), base=base, axes=axes, zips=zips, budgets=budgets, claims=claims,
                tune=dict(tune) if tune is not None else None, tests_paper=_flag(raw, "tests_paper", where))


def check_budget_zip(table: Any, zips: dict[str, dict[str, list]], axes: set[str], where: str, name: str) -> None:
    """A budget's `zip.NAME.KEY = [...]` sets a setting per row of an existing zip (one value per row); never an
    axis of its own elsewhere, which would then take two values in one run."""
    check_table(table, where, name)
    for zname, group in table.items():
        if zname not in zips:
            raise UserError(f"{where}: {name}.{zname} is not a zip of this grid (its zips: "
                            f"{', '.join(zips) or 'none'})")
        check_table(group, where, f"{name}.{zname}")
        rows = len(next(iter(zips[zname].values())))
        for key, values in group.items():
            elsewhere = axes | {k for other, g in zips.items() if other != zname for k in (*g, other)}
            if key in elsewhere:
                raise UserError(f"{where}: {name}.{zname}.{key}: {key!r} is already an axis of this grid; a budget "
                                f"sets per row only what the grid fixes")
            if key == zname:
                raise UserError(f"{where}: {name}.{zname}.{key} would change the zip's own values; a budget "
                                f"sets other keys per row")
            check_axis(key, values, f"{where}: {name}.{zname}.{key}", distinct=False)
            if len(values) != rows:
                raise UserError(f"{where}: {name}.{zname}.{key} needs one value per row of zip.{zname} "
                                f"({rows}), got {len(values)}")


def budget_zips(grid: Grid, budget: str) -> dict[str, dict[str, list]]:
    """The grid's zips with the budget's per-row values merged in."""
    extra = grid.budgets.get(budget, {}).get("zip", {})
    return {zname: {**group, **extra.get(zname, {})} for zname, group in grid.zips.items()}


def _flag(raw: dict, key: str, where: str) -> bool:
    value = raw.get(key, True)
    if not isinstance(value, bool):
        raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def expand(grid: Grid, budget: str = "gpu", overrides: dict[str, Any] | None = None,
           seeds: list[int] | None = None,
           chooser: Callable[[list[RunSpec]], Any | None] | None = None) -> list[RunSpec]:
    """Every (axes x zips x seeds) combination as a RunSpec. Overrides (from the CLI) win over everything.

    A grid with `[tune]`: every tune value on the selection seeds, then, per cell of the other axes, the
    confirmation seeds at the value `chooser` picks from that cell's selection runs (None: not decided yet, so
    those runs are not listed)."""
    overrides = dict(overrides or {})
    settings = dict(grid.base)
    if budget != "gpu":
        if budget not in grid.budgets:
            raise UserError(f"grid {grid.name!r} has no budget {budget!r}; budgets: "
                            f"{', '.join(['gpu', *sorted(grid.budgets)])}")
        settings.update({k: v for k, v in grid.budgets[budget].items() if k not in ("seeds", "axes", "zip")})
        if seeds is None and "seeds" in grid.budgets[budget]:
            seeds = list(grid.budgets[budget]["seeds"])
    seeds = list(grid.seeds) if seeds is None else seeds
    axes = {**grid.axes, **grid.budgets.get(budget, {}).get("axes", {})}
    for key in [k for k in overrides if k.startswith(AXIS_PREFIX)]:
        name = key[len(AXIS_PREFIX):]
        if name not in grid.axes:
            raise UserError(f"override {key}: {name!r} is not a Cartesian axis of grid {grid.name!r} "
                            f"(its axes: {', '.join(grid.axes) or 'none'})")
        axes[name] = overrides.pop(key)
    for key, value in overrides.items():
        check_value(key, value, f"option --{key.replace('_', '-')}")

    cart = [[(k, v) for v in vs] for k, vs in axes.items()]
    zipped = [[tuple(zip(group, row)) for row in zip(*group.values())]
              for group in budget_zips(grid, budget).values()]
    cells = []
    for combo in itertools.product(*cart, *[[list(z) for z in zs] for zs in zipped]):
        labels: dict[str, Any] = {}
        for part in combo:
            labels.update(dict(part) if isinstance(part, list) else {part[0]: part[1]})
        cells.append(labels)
    # seed-major order: a grid stopped half-way has whole replicates (every cell once) rather than some cells
    if grid.tune is None:
        return [_resolve(grid.name, settings, labels, overrides, seed) for seed in seeds for labels in cells]
    axis = grid.tune["axis"]
    groups: dict[tuple, list[dict]] = {}  # a cell of every other axis -> its labels for each tune value
    for labels in cells:
        groups.setdefault(tuple((k, repr(v)) for k, v in labels.items() if k != axis), []).append(labels)
    selection = {key: [_resolve(grid.name, settings, labels, overrides, seed) for seed in grid.tune["seeds"]
                       for labels in members] for key, members in groups.items()}
    chosen = {key: chooser(specs) if chooser else None for key, specs in selection.items()}
    confirmation = [_resolve(grid.name, settings, labels, overrides, seed) for seed in seeds
                    for key, members in groups.items() for labels in members
                    if chosen[key] is not None and repr(labels[axis]) == repr(chosen[key])]
    first = [s for seed in grid.tune["seeds"] for specs in selection.values() for s in specs if s.seed == seed]
    return first + confirmation


def confirmation_count(grid: Grid, budget: str = "gpu", seeds: list[int] | None = None) -> int:
    """How many confirmation runs a tuned grid will add once its selection is done."""
    if grid.tune is None:
        return 0
    seeds = seeds if seeds is not None else list(grid.budgets.get(budget, {}).get("seeds", grid.seeds))
    axes = {**grid.axes, **grid.budgets.get(budget, {}).get("axes", {})}
    cells = 1
    for k, v in axes.items():
        cells *= 1 if k == grid.tune["axis"] else len(v)
    for group in grid.zips.values():
        cells *= len(next(iter(group.values())))
    return cells * len(seeds)


def defined_run_ids(grid: Grid, budget: str, overrides: dict[str, Any] | None, seeds: list[int]) -> set[str]:
    """The ids of every run the grid file, as it stands, defines at this budget and these overrides for these
    seeds (a tuned grid: at every tune value). The report reads exactly these runs, so runs of a budget whose
    definition has since changed share the folder but never a cell with the runs that answer the question."""
    untuned = dataclasses.replace(grid, tune=None)
    return {s.run_id for s in expand(untuned, budget=budget, overrides=overrides, seeds=seeds)}


def _resolve(grid: str, settings: dict, labels: dict, overrides: dict, seed: int) -> RunSpec:
    merged = {**settings, **{k: v for k, v in labels.items() if k in FIELDS}, **overrides, "seed": seed}
    lr_scale = merged.pop("lr_scale", 1.0)
    merged["lr"] = float(merged.get("lr", RunSpec.__dataclass_fields__["lr"].default)) * lr_scale
    dataset = merged.get("dataset", "cifar10")
    model_kw = {k: merged.pop(k) for k in list(merged) if k in MODEL_FIELDS}
    model = ModelSpec(num_classes=DATASETS[dataset], **model_kw)
    if "lr" in labels:
        labels = {**labels, "lr": merged["lr"]}
    run_kw = {k: (float(v) if FIELDS[k] == "float" else v) for k, v in merged.items()}
    spec = RunSpec(model=model, grid=grid, axes=tuple(labels.items()), **run_kw)
    check_consistent(spec)
    return spec


def check_consistent(spec: RunSpec) -> None:
    validate(spec.model)
    if spec.batch_size % spec.devices:
        raise UserError(f"batch size {spec.batch_size} does not split over {spec.devices} devices; "
                        f"choose a batch size divisible by the device count")
    if spec.early_stop_metric and not spec.early_stop_below:
        raise UserError("early_stop needs `below`, e.g. below = 0.25")
    if not spec.val_size and (spec.schedule == "plateau" or spec.early_stop_metric == "val_error"):
        raise UserError(f"{spec.grid or 'this grid'}: the plateau schedule and a val_error early stop read the "
                        f"validation split; set val_size (e.g. 5000 images held out of the training set)")
