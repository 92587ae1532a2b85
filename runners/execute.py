"""Run a grid: expand it, skip finished runs, claim each pending run with a lock, train, aggregate.

Safe to run twice at once on the same results folder: the run locks decide who trains what, and the
aggregates are regenerated under a grid lock. Safe to kill at any moment: rerun the same command."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ablations.errors import UserError
from ablations.grid import Grid
from ablations.spec import RunSpec
from runners.data import load_dataset, resolve_data_dir
from runners.progress import PlainReporter
from runners.ddp import launch_ddp_run
from runners.faults import fault_point
from runners.tblog import RunLog
from runners.locks import RunLock
from runners.store import RunFolder, Store, atomic_write_json, remove_stale_temps
from runners.launch import GridOutcome, GridRequest, plan
from runners.devices import emulated_bf16_note
from runners.train import TrainOptions, check_data_fits, pick_device, train_run


def check_devices(specs: list[RunSpec], device: torch.device, nnodes: int = 1) -> None:
    """Each node must hold its share of a run's devices (nnodes > 1: multi-node data parallelism, runners/ddp.py)."""
    need = -(-max(s.devices for s in specs) // nnodes)
    have = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    if need > have:
        kind = "CUDA devices" if device.type == "cuda" else "CPU cores (one process each)"
        raise UserError(f"a run asks for {need} devices but this machine has {have} {kind}; "
                        f"lower `devices` or run on a bigger machine")


def run_grid(request: GridRequest, reporter: PlainReporter | None = None, command: str | None = None,
             poll_s: float = 2.0) -> GridOutcome:
    """Train every pending run of a grid into results/<grid>/ and regenerate the aggregates.

    Runs locked by another live process are waited for (or, with wait_for_others=False, left to it), so
    when this returns the grid is complete unless runs failed."""
    r = request
    grid_name, budget, overrides, seeds, device = r.grid, r.budget, r.overrides, r.seeds, r.device
    wait_for_others, options = r.wait_for_others, r.options
    reporter = reporter or PlainReporter()
    store = Store(Path(r.results))
    grid, specs = plan(grid_name, budget, overrides, seeds, store)
    store.check_writable(grid.name)
    dev = pick_device(device)
    check_devices(specs, dev, options.nnodes)
    data_dir = resolve_data_dir(r.data_dir)
    datasets = {name: load_dataset(name, data_dir) for name in sorted({s.dataset for s in specs})}
    for s in specs:  # before anything is written
        check_data_fits(s, datasets[s.dataset])

    write_grid_json(store, grid, specs, budget, overrides, datasets, command)

    outcome = GridOutcome(grid.name, len(specs))
    to_train = [s for s in specs if not store.is_done(grid.name, s.run_id)]
    reporter.grid(grid.name, len(specs), len(specs) - len(to_train))
    if note := emulated_bf16_note(to_train, dev, grid.name):
        reporter.say(note)
    context = {"budget": budget, "overrides": overrides or {}}
    pending = list(enumerate(specs, 1))
    planned = {s.run_id for s in specs}
    while pending:
        waiting = []
        for i, spec in pending:
            state = attempt_run(spec, i, len(specs), store, grid.name, datasets, dev, context, reporter, outcome,
                             data_dir, options)
            if state == "busy":
                waiting.append((i, spec))
        if waiting and not wait_for_others:
            outcome.busy = [s.run_id for _, s in waiting]
            break
        if waiting:
            for _, spec in waiting:  # said once per run, not at every poll
                if spec.run_id not in outcome.announced:
                    outcome.announced.add(spec.run_id)
                    holder = RunLock(store.run_folder(grid.name, spec.run_id).lock_path).holder()
                    reporter.say(f"waiting for run {spec.run_id}: it is being trained by {holder}")
            time.sleep(poll_s)  # another process holds these runs: wait for it to finish (or die) and look again
        pending = waiting
        if not pending and grid.tune:  # a finished selection adds its confirmation runs
            _, specs = plan(grid_name, budget, overrides, seeds, store)
            new = [s for s in specs if s.run_id not in planned]
            if new:
                planned |= {s.run_id for s in new}
                outcome.total = len(specs)
                write_grid_json(store, grid, specs, budget, overrides, datasets, command)
                reporter.say(f"grid {grid.name}: selection done; {len(new)} confirmation runs at the chosen "
                             f"{grid.tune['axis']}")
                pending = [(i, s) for i, s in enumerate(specs, 1) if s.run_id in {n.run_id for n in new}]
    store.write_aggregates(grid.name)
    reporter.close()
    return outcome


def write_grid_json(store: Store, grid: Grid, specs: list[RunSpec], budget: str, overrides: dict | None,
                    datasets: dict, command: str | None) -> None:
    """results/<grid>/grid.json: what the report needs to know about the grid and the command that ran it.

    The command is the one that made the runs: a run of a grid whose every run is done keeps the recorded one."""
    gdir = store.grid_dir(grid.name)
    gdir.mkdir(parents=True, exist_ok=True)
    first = next(iter(datasets.values()))
    command = command or "ablate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if all(store.is_done(grid.name, s.run_id) for s in specs):
        command = (store.read_grid_json(grid.name) or {}).get("command") or command
    atomic_write_json(store.grid_json(grid.name), {
        **grid.to_json(), "budget": budget, "overrides": overrides or {},
        "command": command,
        "dataset": specs[0].dataset, "dataset_label": first.meta.get("label", specs[0].dataset),
        "model": ", ".join(dict.fromkeys(s.model.arch for s in specs)), "epochs": specs[0].epochs,
        "run_seeds": sorted({s.seed for s in specs}),
        "axis_values": {a: list(dict.fromkeys(dict(s.axes)[a] for s in specs)) for a in grid.axis_names},
        "early_stop": ({"metric": specs[0].early_stop_metric, "below": specs[0].early_stop_below}
                       if specs[0].early_stop_metric else None)})


def attempt_run(spec: RunSpec, i: int, total: int, store: Store, grid: str, datasets: dict, dev: torch.device,
             context: dict, reporter: PlainReporter, outcome: GridOutcome, data_dir: Path | None = None,
             options: TrainOptions = TrainOptions()) -> str:
    """Train one run unless it is done or locked by a live process. Returns "done", "trained" or "busy"."""
    fault_point("run", spec.run_id)
    if store.is_done(grid, spec.run_id):
        outcome.skipped.append(spec.run_id)
        reporter.skip(spec, "already done")
        return "done"
    rdir = store.make_run_dir(grid, spec.run_id)
    lock = RunLock(RunFolder(rdir).lock_path)
    if not lock.acquire():
        return "busy"
    try:
        if store.is_done(grid, spec.run_id):  # finished by another process since we looked
            outcome.skipped.append(spec.run_id)
            return "done"
        remove_stale_temps(rdir)  # what a killed writer of this run left; the lock says nobody writes here now
        if source := store.finished_elsewhere(grid, spec.run_id):
            store.adopt_run(source, grid, spec.to_json())
            outcome.reused.append(spec.run_id)
            reporter.skip(spec, f"finished in grid {source} with the same settings; copied, not trained again")
            store.write_aggregates(grid)
            return "done"
        reporter.start_run(spec, i, total)
        result = train_one(spec, datasets[spec.dataset], rdir, dev, context, reporter, lock, data_dir, options)
        reporter.end_run(result)
    finally:
        lock.release()
    outcome.trained.append(spec.run_id)
    if result.status == "failed":
        outcome.failed.append(spec.run_id)
    elif result.status == "diverged":
        outcome.diverged.append(spec.run_id)
    store.write_aggregates(grid)
    return "trained"


def train_one(spec: RunSpec, data, rdir: Path, dev: torch.device, context: dict[str, Any],
              reporter: PlainReporter, lock: RunLock, data_dir: Path | None = None,
              options: TrainOptions = TrainOptions()):
    """One run in this process, or, for devices > 1, through torch.distributed.run (runners/ddp.py). Each
    finished epoch also goes to the run's TensorBoard log (runners/tblog.py) when TensorBoard is installed."""
    tb = RunLog(rdir, spec)

    def on_epoch(row: dict) -> None:
        lock.heartbeat()
        reporter.epoch(row)
        tb.epoch(row)

    try:
        if spec.devices > 1:
            result = launch_ddp_run(spec, rdir, dev, context, on_epoch, data_dir, options)
        else:
            result = _train_here(spec, data, rdir, dev, context, reporter, on_epoch, options.checkpoint_seconds)
    except BaseException:
        tb.close()
        raise
    tb.close(result.summary.get("metrics"))
    return result


def _train_here(spec: RunSpec, data, rdir: Path, dev: torch.device, context: dict[str, Any],
                reporter: PlainReporter, on_epoch: Callable[[dict], None], checkpoint_seconds: float):

    def on_step(i: int, n: int) -> None:
        fault_point("step", spec.run_id)
        reporter.step(i, n)

    def on_resume(done: int) -> None:
        reporter.say(f"  resuming at epoch {done + 1}: epochs 1-{done} restored from the run's checkpoint")

    return train_run(spec, data, rdir, dev, context=context, on_epoch=on_epoch, on_step=on_step,
                     on_resume=on_resume, checkpoint_seconds=checkpoint_seconds)
