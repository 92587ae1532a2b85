"""Real kills of `ablate run`: SIGKILL at seeded random points (mid-epoch, mid-write of a checkpoint or a CSV,
between runs, at a random moment), then the same command again. Nothing is lost: the grid completes, no finished
run is trained again, every file parses, and the results equal an uninterrupted run's bit for bit."""
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from runners.store import load_checkpoint
from tests.reliability.conftest import DIVERGING_GRID, TALLY, kill_grid_args
from tests.reliability.harness import KILLED, ablate, assert_same_results, finished_runs, start, \
    without_timing

SEED = 2024
SEQUENCES = 2  # each: a fresh results folder, killed at fault points again and again until a rerun completes it
MAX_KILLS = 16  # per sequence; then the command runs without a fault
TIMED_KILLS = 4  # then one more folder, SIGKILLed from outside after random delays (lands anywhere)


def draw_kill_point(rng: random.Random) -> str:
    """An $ABLATE_FAULT value. A child writes grid.json, then 14 files per run; it passes 3 steps and 1 `run`
    point per run."""
    r = rng.random()
    if r < 0.6:
        return f"write:{rng.randint(2, 12)}"
    if r < 0.85:
        return f"step:{rng.randint(1, 3)}"
    return f"run:{rng.randint(1, 2)}"


def where_killed(output: str) -> str:
    m = re.search(r"fault: SIGKILL at (\w+) \d+ (\S+)", output)
    if m is None:
        return "at a random moment"
    site, what = m.groups()
    if site != "write":
        return {"step": "mid-epoch", "run": "between runs"}[site]
    path = Path(what)
    if path.name.startswith("checkpoint"):
        return "writing a checkpoint"
    if path.parent.name == "smoke":
        return "writing an aggregate CSV" if path.suffix == ".csv" else "writing grid.json"
    return "writing a run's epochs.csv" if path.name == "epochs.csv" else f"writing {path.name}"


def assert_intact(grid_dir: Path, finished_before: dict) -> None:
    """Every CSV and JSON file is whole, and every run finished before is untouched."""
    for path in grid_dir.rglob("*.csv"):
        assert path.read_text().endswith("\n"), path
        pd.read_csv(path)
    for path in grid_dir.rglob("*.json"):
        json.loads(path.read_text())
    after = finished_runs(grid_dir)
    assert {rid: after.get(rid) for rid in finished_before} == finished_before


def kill_until_done(out: Path, data_dir: Path, logs: Path, next_kill) -> Counter:
    """Run the kill grid into `out` again and again, each time killed as next_kill() says (a fault, a delay or
    None for no kill), until a run completes; check what the store guarantees after every kill."""
    kills: Counter = Counter()
    grid_dir = out / "smoke"
    for attempt in itertools.count():
        fault, delay = next_kill(attempt) or ("", None)
        before = finished_runs(grid_dir)
        ran = start(kill_grid_args(out, data_dir), logs / f"{out.name}-{attempt}.txt", fault).wait(kill_after=delay)
        assert_intact(grid_dir, before)
        if ran.code != KILLED:
            assert ran.code == 0, ran.output
            assert ran.counts() == {"trained": 4 - len(before), "done": len(before), "diverged": 0, "failed": 0,
                                    "busy": 0}  # the runs finished before are not trained again
            return kills
        kills[where_killed(ran.output)] += 1


def test_sigkill_anywhere_then_rerun_loses_nothing(tmp_path, data_dir, reference):
    rng = random.Random(SEED)
    kills: Counter = Counter()
    for seq in range(SEQUENCES):
        out = tmp_path / f"faults{seq}"
        kills += kill_until_done(out, data_dir, tmp_path,
                                 lambda attempt: (draw_kill_point(rng), None) if attempt < MAX_KILLS else None)
        assert_same_results(out / "smoke", reference)
    out = tmp_path / "timed"
    kills += kill_until_done(out, data_dir, tmp_path,
                             lambda attempt: ("", rng.uniform(0.2, 1.0)) if attempt < TIMED_KILLS else None)
    assert_same_results(out / "smoke", reference)

    TALLY["kill points"] += sum(kills.values())
    TALLY.update({f"kill points: {k}": v for k, v in kills.items()})
    assert sum(kills.values()) >= 20, kills
    assert {"mid-epoch", "between runs", "writing a checkpoint", "writing a run's epochs.csv",
            "writing an aggregate CSV", "writing summary.json"} <= set(kills), kills


EARLY_STOP_GRID = """title = "Stops early: its training error is below the target after one epoch"
seeds = [0]

[run]
arch = "alexnet"
width = 0.0625
epochs = 3
batch_size = 64
subset = 128
test_subset = 50

[early_stop]
metric = "train_error"
below = 0.99
"""


@pytest.mark.parametrize("grid", ["smoke", "diverges", "stops_early"])
def test_killed_after_the_epoch_that_ends_a_run_ends_it_the_same_way(tmp_path, data_dir, grid):
    """The last epoch's checkpoint is on disk but nothing after it: the rerun must not train on (past the cap,
    a divergence or an early stop) and must write every epoch row."""
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "diverges.toml").write_text(DIVERGING_GRID)
    (grids / "stops_early.toml").write_text(EARLY_STOP_GRID)
    env = {"ABLATE_GRIDS_DIR": str(grids)}

    def first_run(out: Path, fault: str) -> Path:
        """Train the grid's first run (killed at `fault`, or before the second run)."""
        ran = ablate(kill_grid_args(out, data_dir, grid=grid), out.with_suffix(".txt"), fault=fault, env=env)
        assert ran.code in (0, KILLED) and ("SIGKILL at write" in ran.output) == fault.startswith("write"), \
            ran.output
        return next((out / grid / "runs").iterdir())

    ref = first_run(tmp_path / "ref", "run:2")  # uninterrupted
    ended = json.loads((ref / "summary.json").read_text())["metrics"]["epochs_run"]
    # grid.json, spec.json, then 3 writes per epoch (checkpoint, epochs.csv, trace.csv): killed at the last epochs.csv
    killed = first_run(tmp_path / "out", f"write:{1 + 3 * ended}")
    TALLY.update(["kill points", "kill points: after the epoch that ends a run"])
    assert len(load_checkpoint(killed / "checkpoint.pt")["rows"]) == ended
    csv = killed / "epochs.csv"
    assert (len(pd.read_csv(csv)) if csv.exists() else 0) == ended - 1  # killed writing the last epoch's row
    first_run(tmp_path / "out", "run:2")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, killed))
    assert (b["status"], b["stop_reason"], b["error"]) == (a["status"], a["stop_reason"], a["error"])
    pd.testing.assert_frame_equal(without_timing(pd.read_csv(killed / "epochs.csv")),
                                  without_timing(pd.read_csv(ref / "epochs.csv")))
