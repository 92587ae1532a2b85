"""The outside-in attack's findings, each as a test: no write follows a planted link, a lock cannot outlive its
holder or be taken twice, every bad number is refused with one line."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ablations.errors import UserError
from runners.locks import RunLock, grid_lock
from runners.store import Store, atomic_write_text
from tests.reliability.conftest import TALLY
from tests.reliability.harness import hold_lock

ROUNDS = 40


def _contend(path: str, barrier, results) -> None:
    barrier.wait()
    lock = RunLock(Path(path))
    won = lock.acquire()
    results.put(won)
    if won:
        time.sleep(0.05)  # hold it while the others try
        lock.release()


def test_four_processes_on_a_stale_lock_give_exactly_one_holder_every_round(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = tmp_path / f"run{round_}.lock"
        # a stale record whose PID now belongs to a live, unrelated process (pid 1), aged three days
        path.write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "since": 0}))
        os.utime(path, (time.time() - 3 * 86400,) * 2)
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(path), barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        wins = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sum(wins) == 1, f"round {round_}: {sum(wins)} holders"
        TALLY["lock rounds"] += 1


def test_a_lock_dies_with_its_holder_even_when_its_pid_is_reused(tmp_path):
    path = tmp_path / "run.lock"
    holder = hold_lock(path, 60)
    try:
        assert not RunLock(path).acquire()  # a live holder is respected
        assert f"pid {holder.pid}" in RunLock(path).holder()
    finally:
        holder.kill()
        holder.wait()
    path.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": 0}))  # a live pid
    lock = RunLock(path)
    assert lock.acquire()  # no process holds the flock: the record alone holds nothing
    lock.release()
    assert not path.exists()


def test_a_planted_link_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    gdir = tmp_path / "out" / "smoke"
    gdir.mkdir(parents=True)
    (gdir / ".aggregate.lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        with grid_lock(gdir):
            pass
    assert victim.read_text() == "precious"
    with pytest.raises(UserError, match="symbolic link"):
        Store(tmp_path / "out").check_writable("smoke")
    (gdir / ".aggregate.lock").unlink()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (gdir / "runs").mkdir()
    (gdir / "runs" / "abc").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        Store(tmp_path / "out").make_run_dir("smoke", "abc")
    lock_link = tmp_path / "run.lock"
    lock_link.symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(lock_link).acquire()
    assert victim.read_text() == "precious" and not list(outside.iterdir())
    TALLY["links refused"] += 4


def test_an_atomic_write_never_follows_a_planted_temporary_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "epochs.csv"
    (tmp_path / f".epochs.csv.tmp{os.getpid()}").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        atomic_write_text(target, "x")
    assert victim.read_text() == "precious"
    TALLY["links refused"] += 1


@pytest.mark.parametrize("text, message", [
    ('[run]\narch = "convnet4"\nlr = nan\n', "finite number"),
    ('[run]\narch = "convnet4"\nlr = inf\n', "finite number"),
    ('[run]\narch = "convnet4"\n[axes]\nweight_decay = [0.0, -inf]\n', "finite number"),
    ("", "sets nothing"),
    ('title = "only a title"\n', "sets nothing"),
])
def test_non_finite_numbers_and_empty_grids_are_refused(tmp_path, text, message):
    from ablations.grid import parse_grid
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_grid("g", path)
    TALLY["bad inputs"] += 1


def test_a_waiting_process_says_once_what_it_waits_for(tmp_path, data_dir):
    from runners.launch import plan
    from tests.reliability.conftest import kill_grid_args, kill_grid_overrides
    from tests.reliability.harness import start, wait_for
    out = tmp_path / "out"
    _, specs = plan("smoke", "gpu", kill_grid_overrides(epochs=1), [0])
    rdir = out / "smoke" / "runs" / specs[0].run_id
    rdir.mkdir(parents=True)
    holder = hold_lock(rdir / "run.lock", 120)
    log = tmp_path / "wait.txt"
    child = start(kill_grid_args(out, data_dir, epochs=1), log)
    try:
        assert wait_for(lambda: log.exists() and "waiting for run" in log.read_text(), timeout=120)
        time.sleep(1.0)  # a few more polls of the lock while it is still held
    finally:
        holder.kill()
        holder.wait()
    ran = child.wait()  # the holder is gone: the waiting process takes the run and finishes the grid
    assert ran.code == 0, ran.output
    assert ran.output.count(f"waiting for run {specs[0].run_id}: it is being trained by pid {holder.pid}") == 1


def test_a_deeply_nested_grid_file_is_one_line(tmp_path):
    from ablations.grid import parse_grid
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="nested too deeply|not valid TOML"):
        parse_grid("deep", path)
