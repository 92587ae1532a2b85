"""Ctrl-C, a diverging run, a full disk and run locks, each through a real `ablate run` process."""
import errno
import json
import os
import shutil
import signal

import pandas as pd
from click.testing import CliRunner

from runners.cli import main
from runners.launch import plan
from runners.locks import RunLock
from runners.store import load_checkpoint
from tests.reliability.conftest import DIVERGING_GRID, kill_grid_args, kill_grid_overrides
from tests.reliability.harness import ablate, assert_same_results, epochs_trained, finished_runs, hold_lock, \
    snapshot, start, wait_for


def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_resume(tmp_path, data_dir, reference):
    out = tmp_path / "out"
    args = kill_grid_args(out, data_dir)
    child = start(args, tmp_path / "interrupted.txt")
    checkpoints = lambda: sorted((out / "smoke" / "runs").glob("*/checkpoint*.pt"))  # noqa: E731
    assert wait_for(checkpoints), "no epoch finished"
    run_dir = checkpoints()[0].parent
    os.kill(child.pid, signal.SIGINT)  # in the run's second epoch (or writing its checkpoint)
    ran = child.wait()
    assert ran.code == 130, ran.output
    assert ran.output.strip().splitlines()[-1] == \
        "interrupted: every finished epoch is saved and the run locks are released; rerun the same command to resume"
    assert "Traceback" not in ran.output
    state = load_checkpoint(run_dir / "checkpoint.pt") or load_checkpoint(run_dir / "checkpoint.prev.pt")
    saved = len(state["rows"])
    assert saved >= 1
    assert not list(out.rglob("run.lock")) and not list(out.rglob(".*tmp*"))  # lock released, no half files

    resumed = ablate(args, tmp_path / "resumed.txt")
    assert resumed.code == 0, resumed.output
    assert epochs_trained(resumed.output, run_dir.name) == list(range(saved + 1, 4))
    assert_same_results(out / "smoke", reference)


def test_diverged_run_is_recorded_with_its_epoch_and_the_grid_goes_on(tmp_path, data_dir):
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "diverges.toml").write_text(DIVERGING_GRID)
    out = tmp_path / "out"
    args = ["run", "--grid", "diverges", "--plain", "--out", str(out), "--data-dir", str(data_dir)]
    env = {"ABLATE_GRIDS_DIR": str(grids)}
    ran = ablate(args, tmp_path / "log.txt", env=env)
    assert ran.code == 0, ran.output
    assert ran.counts() == {"trained": 2, "done": 0, "diverged": 1, "failed": 0, "busy": 0}
    runs = pd.read_csv(out / "diverges" / "runs.csv").set_index("lr")
    bad, good = runs.loc[1e4], runs.loc[0.01]
    assert (bad.status, bad.stop_reason) == ("diverged", "diverged")
    summary = json.loads((out / "diverges" / "runs" / bad.run_id / "summary.json").read_text())
    assert summary["error"] == f"non-finite training loss at epoch {bad.epochs_run}"
    assert len(pd.read_csv(out / "diverges" / "runs" / bad.run_id / "epochs.csv")) == bad.epochs_run
    assert (good.status, good.epochs_run) == ("finished", 3)  # the run after the diverged one still trained
    again = ablate(args, tmp_path / "again.txt", env=env)
    assert again.code == 0 and again.counts()["done"] == 2  # a diverged run is done: not trained again


def test_full_disk_is_one_line_and_keeps_every_earlier_result(tmp_path, data_dir, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "smoke")
    args = kill_grid_args(out, data_dir, seeds="2")  # seed 0's runs are finished; seed 1's are new
    done_dirs = sorted((out / "smoke" / "runs").iterdir())
    finished = snapshot(*done_dirs)
    runs_before = pd.read_csv(out / "smoke" / "runs.csv")
    for write in (1, 4, 9, 14):  # grid.json; then a new run's epochs.csv, its summary, the aggregate runs.csv
        everything = snapshot(out)
        ran = ablate(args, tmp_path / f"full-{write}.txt", fault=f"write:{write}:enospc")
        assert ran.code == 2, ran.output
        last = ran.output.strip().splitlines()[-1]
        assert last.startswith("error: disk full while writing ") and "rerun the same command" in last
        assert sum(line.startswith("error") for line in ran.output.splitlines()) == 1
        assert "Traceback" not in ran.output
        assert not list(out.rglob(".*tmp*")) and not list(out.rglob("run.lock"))
        if write == 1:
            assert snapshot(out) == everything  # failed at the first write: nothing changed at all
        assert snapshot(*done_dirs) == finished  # the finished runs, byte for byte
        runs_now = pd.read_csv(out / "smoke" / "runs.csv")  # whole, and the finished runs' rows as they were
        pd.testing.assert_frame_equal(runs_now[runs_now.run_id.isin(runs_before.run_id)].reset_index(drop=True),
                                      runs_before, check_dtype=False)
    done = len(finished_runs(out / "smoke"))
    assert done == 5  # the new run that got as far as its summary before the aggregate's write failed
    ran = ablate(args, tmp_path / "freed.txt")  # space freed: the same command finishes the grid
    assert ran.code == 0, ran.output
    assert ran.counts() == {"trained": 8 - done, "done": done, "diverged": 0, "failed": 0, "busy": 0}


def test_live_lock_is_left_alone_and_a_dead_holders_lock_taken_over(tmp_path, data_dir):
    out = tmp_path / "out"
    args = [*kill_grid_args(out, data_dir, epochs=1), "--no-wait"]
    _, specs = plan("smoke", "gpu", kill_grid_overrides(epochs=1), [0])
    locked = out / "smoke" / "runs" / specs[1].run_id
    locked.mkdir(parents=True)
    holder = hold_lock(locked / "run.lock", 120)  # a live process holds the run's lock
    try:
        lock = (locked / "run.lock").read_text()
        ran = ablate(args, tmp_path / "busy.txt")
        assert ran.code == 75, ran.output
        assert ran.counts() == {"trained": 3, "done": 0, "diverged": 0, "failed": 0, "busy": 1}
        assert ran.output.strip().splitlines()[-1] == \
            "some runs are being trained by another process; rerun later to pick up what is left"
        assert f"is being trained by pid {holder.pid}" not in ran.output  # --no-wait: nothing is waited for
        assert (locked / "run.lock").read_text() == lock and not (locked / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    ran = ablate(args, tmp_path / "stale.txt")  # the holder is gone: its lock is stale, taken over
    assert ran.code == 0, ran.output
    assert ran.counts() == {"trained": 1, "done": 3, "diverged": 0, "failed": 0, "busy": 0}
    assert not (locked / "run.lock").exists() and (locked / "summary.json").exists()


def test_full_disk_anywhere_else_is_the_same_one_line(tmp_path, data_dir, reference, monkeypatch):
    """Outside the store's atomic writes (here: creating a run's lock file) a full disk reads the same."""
    out = tmp_path / "out"
    shutil.copytree(reference, out / "smoke")
    before = snapshot(out)

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(RunLock, "acquire", full)
    result = CliRunner().invoke(main, kill_grid_args(out, data_dir, seeds="2"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: disk full (") and result.stderr.count("\n") == 1
    assert "rerun the same command" in result.stderr and "Traceback" not in result.output
    assert {p: v for p, v in snapshot(out).items() if not p.endswith("grid.json")} == \
        {p: v for p, v in before.items() if not p.endswith("grid.json")}
