"""The one launcher interface. Every way to train a grid (in this process: runners/execute.py; several local jobs
or a Ray cluster: runners/executors.py; a follower node of a multi-node grid: runners/ddp.py) takes a GridRequest
and returns a GridOutcome, whose exit code `ablate run` exits with."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ablations.choices import FINISHED
from ablations.grid import Grid, expand, load_grid
from ablations.spec import RunSpec
from ablations.tune import pick
from runners.store import Store
from runners.train import TrainOptions

EXIT_OK, EXIT_FAILED_RUNS, EXIT_BUSY = 0, 3, 75


@dataclass(frozen=True)
class GridRequest:
    """Which grid to train, at which budget, overrides and seeds, from which data, on which device, how."""
    grid: str
    results: Path
    budget: str = "gpu"
    overrides: dict[str, Any] | None = None
    seeds: list[int] | None = None
    data_dir: Path | None = None
    device: str = "auto"
    wait_for_others: bool = True  # wait for runs another live process holds (else leave them to it)
    options: TrainOptions = TrainOptions()


@dataclass
class GridOutcome:
    grid: str
    total: int
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before
    reused: list[str] = field(default_factory=list)  # finished in another grid, copied (Store.adopt_run)
    busy: list[str] = field(default_factory=list)  # locked by another live process
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    announced: set[str] = field(default_factory=set)  # busy runs already reported as waited for
    code: int | None = None  # set by a launcher whose workers report their own exit codes (--jobs)

    @property
    def exit_code(self) -> int:
        if self.code is not None:
            return self.code
        if self.failed:
            return EXIT_FAILED_RUNS
        if self.busy:
            return EXIT_BUSY
        return EXIT_OK


def plan(grid_name: str, budget: str = "gpu", overrides: dict | None = None,
         seeds: list[int] | None = None, store: Store | None = None) -> tuple[Grid, list[RunSpec]]:
    """The grid's runs. For a tuned grid, the confirmation runs of each cell whose selection runs are all done in
    `store` (none without a store)."""
    grid = load_grid(grid_name)
    chooser = store_chooser(store, grid) if store is not None and grid.tune else None
    return grid, expand(grid, budget=budget, overrides=overrides, seeds=seeds, chooser=chooser)


def store_chooser(store: Store, grid: Grid) -> Callable[[list[RunSpec]], Any]:
    """ablations/tune.pick over a cell's finished selection runs, or None while any of them is not done. A run that
    never reached its target counts at its epoch cap; a diverged run never wins on an error metric."""
    axis, metric = grid.tune["axis"], grid.tune["metric"]

    def choose(specs: list[RunSpec]) -> Any:
        scores = []
        for s in specs:
            summary = store.summary(grid.name, s.run_id)
            if summary is None or summary.get("status") not in FINISHED:
                return None
            m = summary["metrics"]
            value = m.get(metric)
            if value is None or not math.isfinite(float(value)):
                value = float(s.epochs) if metric == "epochs_to_target" else math.inf
            scores.append((dict(s.axes)[axis], float(value), m.get("train_error")))
        return pick(scores)
    return choose
