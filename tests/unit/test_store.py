"""The results store's guarantees, piece by piece: atomic writes, checksummed checkpoints, run locks."""
import errno
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from ablations.errors import UserError
from runners import store as store_mod
from runners.locks import RunLock
from runners.store import Store, atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_disk_full_is_one_clear_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "epochs.csv"
    atomic_write_text(path, "old\n")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", full)
    with pytest.raises(UserError, match="disk full") as err:
        atomic_write_text(path, "new\n")
    assert "\n" not in str(err.value)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["epochs.csv"]


def test_checkpoint_round_trip_and_corruption_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"w": torch.arange(6.0), "rows": [{"epoch": 1, "loss": 0.5}], "rng": torch.get_rng_state()}
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["rows"] == state["rows"]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    assert load_checkpoint(path) is None
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # one flipped bit
    assert load_checkpoint(path) is None
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    """weights_only loading: a checkpoint holding an arbitrary object is treated as corrupt, not executed."""
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    save_checkpoint(path, {"x": Evil()})
    assert load_checkpoint(path) is None
    assert not (tmp_path / "pwned").exists()


def test_live_lock_is_respected_and_stale_lock_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    first = RunLock(path)
    assert first.acquire()
    assert not RunLock(path).acquire()  # this process is alive: respected
    first.release()
    assert not path.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": 0}))
    taker = RunLock(path)
    assert taker.acquire()  # the holder is gone: stale, taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_unwritable_results_folder_is_a_user_error(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):  # root ignores permission bits: use a file in the way instead
            (tmp_path / "file").write_text("")
            target = tmp_path / "file" / "sub"
        with pytest.raises(UserError, match="cannot write to the results folder"):
            Store(target).check_writable()
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_rows_csv_writes_what_pandas_writes():
    """epochs.csv is written with the csv module; readers (and old files) expect pandas' to_csv text."""
    from runners.store import EPOCH_COLUMNS, rows_csv
    rows = [dict(epoch=i, lr=0.01 * 0.1 ** i, train_loss=float("nan") if i == 2 else 2.3 / i, train_error=1 / 3,
                 test_loss=float("inf"), test_error=0.0, test_error_top5=1e-12, epoch_seconds=12.0,
                 images_per_second=1.5e12, cum_seconds=7.0 * i) for i in (1, 2, 3)]
    assert rows_csv(rows, EPOCH_COLUMNS) == pd.DataFrame(rows, columns=EPOCH_COLUMNS).to_csv(index=False)
    assert rows_csv([], EPOCH_COLUMNS) == pd.DataFrame([], columns=EPOCH_COLUMNS).to_csv(index=False)
