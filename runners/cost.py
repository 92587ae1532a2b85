"""`ablate show`: a grid's expanded runs with a cost estimate before anything trains.

Cost = images to process x FLOPs per image, turned into time by timing a few real training steps of each
distinct model on this device (a probe), because FLOP/s differ a lot between layers and precisions."""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from ablations.choices import OVERNIGHT_HOURS
from ablations.models import ModelSpec, build_model, train_flops_per_image
from ablations.spec import RunSpec
from runners.store import RUNS_CSV, Store
from runners.train import autocast, pick_device

TRAIN_SIZE, TEST_SIZE = 50_000, 10_000


@lru_cache(maxsize=None)
def probe_images_per_second(model: ModelSpec, batch: int, precision: str, device: str, steps: int = 3) -> float:
    """Training images/s of `model` on random data: one warm-up step, then `steps` timed ones."""
    dev = torch.device(device)
    net = build_model(model).to(dev)
    fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (batch,), device=dev)

    def step() -> None:
        with autocast(dev, precision):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return batch * steps / (time.perf_counter() - t0)


BUSY_LOAD = 0.5  # load average per core above which other work shares the cores the probe times


def busy_note(load: float, cores: int) -> str:
    """One line when the machine was busy before the probe (1-minute load average at or above BUSY_LOAD per core):
    the probe then times steps that share the cores, so every estimate reads high; "" on an idle machine."""
    if load < BUSY_LOAD * cores:
        return ""
    return (f"the machine is busy (load average {load:.1f} on {cores} cores): the probe shared the cores, so these "
            f"estimates read high; run `ablate show` again when it is idle")


def run_images(spec: RunSpec) -> tuple[int, int]:
    """(training images, test images) processed by a run at its epoch cap."""
    train = (spec.subset or TRAIN_SIZE) * spec.epochs
    test = (spec.test_subset or TEST_SIZE) * spec.epochs * (spec.test_crops + (spec.test_crops > 1))  # + plain view
    return train, test


HOUR = 3600.0


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / HOUR:.1f} h" if seconds >= HOUR else f"{seconds / 60:.0f} min"


def estimate_rows(grid_name: str, budget: str, overrides: dict, seeds: list[int] | None, device: str,
                  probe: bool, results: Path) -> dict:
    """The grid's runs with their estimates, for `ablate show --json` and the cost guard."""
    from ablations.grid import confirmation_count, expand
    from runners.launch import plan

    store = Store(results)
    grid, specs = plan(grid_name, budget, dict(overrides), seeds, store)
    dev = str(pick_device(device))
    runs, total = [], 0.0
    for s in specs:
        train, test = run_images(s)
        seconds = None
        if probe:
            seconds = (train + test / 3) / probe_images_per_second(s.model, s.batch_size // s.devices, s.precision, dev)
        state = store.run_state(grid.name, s.run_id)  # a run finished in another grid is copied: no work
        total += seconds if state == "pending" and seconds is not None else 0.0
        runs.append({"run_id": s.run_id, "axes": dict(s.axes), "seed": s.seed, "epochs": s.epochs,
                     "gflop_per_image": train_flops_per_image(s.model) / 1e9, "estimated_seconds": seconds,
                     "state": state})
    later = confirmation_count(grid, budget, seeds) - (len(specs) - len(expand(grid, budget, dict(overrides), seeds)))
    return {"grid": grid.name, "budget": budget, "device": dev, "runs": runs, "pending_runs": sum(
        r["state"] == "pending" for r in runs), "confirmation_runs_to_come": max(later, 0),
        "estimated_pending_seconds": total if probe else None}


def check_cost(grid_name: str, budget: str, overrides: dict, seeds: list[int] | None, device: str,
               results: Path, limit_s: float = HOUR) -> None:
    """Stop (one line, exit 2) before a run whose pending work is estimated at over `limit_s`, unless --yes.
    The estimate is the epoch caps' work at a probed rate: early stopping only makes it shorter."""
    est = estimate_rows(grid_name, budget, overrides, seeds, device, True, results)
    if est["estimated_pending_seconds"] > limit_s:
        from ablations.errors import UserError
        more = f" plus {est['confirmation_runs_to_come']} confirmation runs" if est["confirmation_runs_to_come"] \
            else ""
        raise UserError(f"grid {grid_name} ({budget} budget): {est['pending_runs']} pending runs{more} estimated at "
                        f"up to {_fmt_hours(est['estimated_pending_seconds'])} on {est['device']} (at the epoch caps; "
                        f"early stops make it shorter); add --yes to start, or shrink it (--epochs, --subset, "
                        f"--seeds), or see `ablate show {grid_name} --budget {budget}`")


def estimate_table(grid_name: str, budget: str, overrides: dict, seeds: list[int] | None, device: str,
                   probe: bool, results: Path) -> Table:
    from ablations.grid import confirmation_count, expand
    from runners.launch import plan

    store = Store(results)
    grid, specs = plan(grid_name, budget, overrides, seeds, store)
    dev = str(pick_device(device))
    later = confirmation_count(grid, budget, seeds) - (len(specs) - len(expand(grid, budget, overrides, seeds)))
    more = (f" (+ {later} confirmation runs at the chosen {grid.tune['axis']}, listed once the selection runs "
            f"are done)") if later > 0 else ""
    table = Table(title=f"{grid.name} ({budget} budget): {len(specs)} runs on {dev}{more}",
                  caption="time = epoch cap x images / probed training rate (eval at 3x that rate); "
                          "early stopping can only make it shorter")
    for col in ("run id", *grid.axis_names, "seed", "epochs", "GFLOP/img", "est. time", "state"):
        table.add_column(col)
    total_s, total_flop = 0.0, 0.0
    for s in specs:
        train, test = run_images(s)
        flops = train_flops_per_image(s.model)
        est = ""
        if probe:
            rate = probe_images_per_second(s.model, s.batch_size // s.devices, s.precision, dev)
            seconds = (train + test / 3) / rate
            est = _fmt_seconds(seconds)
        axes = dict(s.axes)
        state = store.run_state(grid.name, s.run_id)
        if not state.startswith("reuses"):  # a copy costs this grid nothing
            total_flop += flops * (train + test / 3)
            total_s += seconds if probe else 0.0
        table.add_row(s.run_id, *[str(axes.get(a, "")) for a in grid.axis_names], str(s.seed), str(s.epochs),
                      f"{flops / 1e9:.3f}", est, state)
    table.add_section()
    table.add_row("total", *[""] * len(grid.axis_names), "", "", f"{total_flop / 1e15:.2f} PFLOP",
                  _fmt_seconds(total_s) if probe else "", "")
    return table


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def paper_grids() -> list[str]:
    """The grids of the reproduction: every grid that tests a claim of the paper (not the smoke pipeline check)."""
    from ablations.grid import grid_names, load_grid

    return [name for name in grid_names() if load_grid(name).tests_paper]


def reproduction_rows(budgets: dict[str, str], overrides: dict, seeds: list[int] | None, device: str, probe: bool,
                      results: Path) -> list[dict]:
    """Per paper grid at its budget: runs, done, pending, the estimate of what is pending and the machine time
    the done runs took (from their records). `ablate show --all` prints them; the report records the last."""
    rows = []
    for name, budget in budgets.items():
        est = estimate_rows(name, budget, overrides, seeds, device, probe, results)
        rows.append({"grid": name, "budget": budget, "runs": len(est["runs"]), "done": len(est["runs"]) -
                     est["pending_runs"], "pending": est["pending_runs"],
                     "confirmation_runs_to_come": est["confirmation_runs_to_come"],
                     "estimated_pending_seconds": est["estimated_pending_seconds"],
                     "measured_seconds": _measured(results, name, {r["run_id"] for r in est["runs"]
                                                                   if r["state"] == "done"}),
                     **_recorded_plan(results, name, budget, overrides, seeds)})
    return rows


def _recorded_plan(results: Path, name: str, budget: str, overrides: dict, seeds: list[int] | None) -> dict:
    """Where the grid's last `ablate run` at this budget used overrides (grid.json) and none are asked for now:
    how many of that plan's runs are done. Those are the runs its report reads, though they are not the grid's own
    settings, so `show --all` counts them apart rather than as pending work nobody did."""
    from ablations.grid import expand, load_grid

    store = Store(results)
    meta = store.read_grid_json(name) or {}
    recorded = meta.get("overrides") or {}
    if overrides or not recorded or meta.get("budget") != budget:
        return {}
    specs = expand(load_grid(name), budget, dict(recorded), seeds)
    return {"recorded_overrides": recorded, "done_with_recorded_overrides": sum(store.is_done(name, s.run_id)
                                                                                  for s in specs)}


def _measured(results: Path, name: str, run_ids: set[str]) -> float:
    """Machine time of these finished runs of the grid (other runs in its folder belong to other plans)."""
    import pandas as pd

    from reports.load import machine_seconds

    path = results / name / RUNS_CSV
    if not run_ids or not path.exists():
        return 0.0  # nothing trained yet
    try:
        runs = pd.read_csv(path)
    except (OSError, ValueError):
        return float("nan")  # unreadable: the report says why
    return machine_seconds(runs[runs.run_id.isin(run_ids)])


def reproduction_table(rows: list[dict], device: str) -> Table:
    table = Table(title=f"the reproduction: every paper grid on {device}",
                  caption="pending: epoch caps x images / probed rate (early stops make it shorter); measured: the "
                          "done runs' wall time x threads / cores, from their records")
    for col in ("grid", "budget", "runs", "done", "pending", "est. pending", "measured"):
        table.add_column(col)
    for r in rows:
        more = f" (+{r['confirmation_runs_to_come']})" if r["confirmation_runs_to_come"] else ""
        est = r["estimated_pending_seconds"]
        table.add_row(r["grid"], r["budget"], str(r["runs"]), str(r["done"]), f"{r['pending']}{more}",
                      _fmt_seconds(est) if est is not None else "", _fmt_seconds(r["measured_seconds"]))
    table.add_section()
    est = [r["estimated_pending_seconds"] for r in rows]
    table.add_row("total", "", str(sum(r["runs"] for r in rows)), str(sum(r["done"] for r in rows)),
                  str(sum(r["pending"] for r in rows)), _fmt_seconds(sum(est)) if None not in est else "",
                  _fmt_seconds(sum(r["measured_seconds"] for r in rows)))
    if None not in est:
        measured, pending = sum(r["measured_seconds"] for r in rows), sum(est)
        table.caption += (f"\nmeasured {_fmt_seconds(measured)} + estimated pending {_fmt_seconds(pending)} = "
                          f"{_fmt_seconds(measured + pending)}, against one night ({OVERNIGHT_HOURS:g} h on one 2-core "
                          f"machine)")
    for r in rows:
        if r.get("done_with_recorded_overrides"):
            over = " ".join(f"{k}={v}" for k, v in sorted(r["recorded_overrides"].items()))
            table.caption += (f"\n{r['grid']}: {r['done_with_recorded_overrides']} runs done with {over} (its last "
                              f"run's overrides, the runs its report reads) are not counted as done here; `ablate show "
                              f"{r['grid']} --budget {r['budget']} {over}` lists them")
    return table
