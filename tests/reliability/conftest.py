"""Shared pieces of the fault-injection suite: the tiny grid every kill test runs, its uninterrupted reference
result (trained once per session), and the tally of kill points and bad inputs shown at the end of the run."""
from collections import Counter
from pathlib import Path

import pytest

from tests.precision import FAST_OVERRIDES, FAST_PRECISION
from tests.reliability.harness import ablate

TALLY: Counter = Counter()  # "kill points", "bad inputs", "kill points: <where>"

DIVERGING_GRID = """title = "Two learning rates: one far too large"
seeds = [0]

[run]
arch = "alexnet"
width = 0.125
epochs = 3
batch_size = 64
subset = 128
test_subset = 50

[axes]
lr = [1e4, 0.01]
"""


def kill_grid_args(out: Path, data_dir: Path, seeds: str = "1", epochs: int = 3, grid: str = "smoke") -> list[str]:
    """The smoke grid cut to 4 runs x 3 epochs of 2 batches of a half-width net: every kind of kill point in a
    few seconds."""
    return ["run", "--grid", grid, "--seeds", seeds, "--epochs", str(epochs), "--subset", "128",
            "--test-subset", "50", "--width", "0.0625", "--plain", "--out", str(out), "--data-dir", str(data_dir),
            *FAST_PRECISION]


def kill_grid_overrides(epochs: int = 3) -> dict:
    """The settings kill_grid_args overrides, for plan(): the run ids of the runs it trains."""
    return {"epochs": epochs, "subset": 128, "test_subset": 50, "width": 0.0625, **FAST_OVERRIDES}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir) -> Path:
    """results/smoke of the kill grid trained without interruption, in a child process like the killed ones."""
    out = tmp_path_factory.mktemp("reference")
    ran = ablate(kill_grid_args(out, data_dir), out / "log.txt")
    assert ran.code == 0, ran.output
    assert ran.counts()["trained"] == 4
    return out / "smoke"


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    where = ", ".join(f"{k.split(': ', 1)[1]} {v}" for k, v in sorted(TALLY.items()) if k.startswith("kill points: "))
    terminalreporter.write_line(f"reliability: {TALLY['kill points']} SIGKILL points survived ({where}); "
                                f"{TALLY['bad inputs']} bad inputs refused with one line; "
                                f"{TALLY['links refused']} planted links refused; "
                                f"{TALLY['lock rounds']} stale-lock races with exactly one holder")
