"""Damaged state on disk: checkpoints and CSVs that are truncated, bit-flipped or not what they claim. Each is
detected (checksums, a comparison with summary.json, a parse) and the run goes on from the last good state:
checkpoint.prev.pt, or from scratch; never from garbage."""
import json
import os
import shutil

import pandas as pd
import pytest
import torch

from runners.store import Store, save_checkpoint
from tests.reliability.conftest import TALLY, kill_grid_args
from tests.reliability.harness import KILLED, ablate, assert_same_results, epochs_trained, finished_runs, \
    without_timing


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def flip_a_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def killed_in_epoch_3(tmp_path_factory, data_dir):
    """The kill grid SIGKILLed in the first run's third epoch: checkpoint.pt holds epoch 2, .prev.pt epoch 1."""
    out = tmp_path_factory.mktemp("killed")
    ran = ablate(kill_grid_args(out, data_dir), out / "log.txt", fault="step:3")
    assert ran.code == KILLED, ran.output
    TALLY.update(["kill points", "kill points: mid-epoch"])
    [run_dir] = [p.parent for p in (out / "smoke" / "runs").glob("*/checkpoint.pt")]
    return run_dir


@pytest.mark.parametrize("damage, resumes_at", [
    ({"checkpoint.pt": flip_a_byte}, 2),  # checksum mismatch: falls back to the previous epoch's checkpoint
    ({"checkpoint.pt": truncate}, 2),
    ({"checkpoint.pt": "evil"}, 2),  # a valid checksum over a pickle that would run code: refused, not run
    ({"checkpoint.pt": truncate, "checkpoint.prev.pt": flip_a_byte}, 1),  # nothing good left: from scratch
])
def test_damaged_checkpoint_resumes_from_the_last_good_state(tmp_path, data_dir, reference, killed_in_epoch_3,
                                                             damage, resumes_at):
    out = tmp_path / "out"
    shutil.copytree(killed_in_epoch_3.parents[2], out)
    run_dir = out / "smoke" / "runs" / killed_in_epoch_3.name
    for name, how in damage.items():
        if how == "evil":
            save_checkpoint(run_dir / name, {"run_id": run_dir.name, "rows": Evil(tmp_path / "pwned")})
        else:
            how(run_dir / name)
    ran = ablate(kill_grid_args(out, data_dir), tmp_path / "log.txt", fault="run:2")  # stop after the first run
    assert ran.code == KILLED, ran.output
    assert epochs_trained(ran.output, run_dir.name) == list(range(resumes_at, 4))
    assert not (tmp_path / "pwned").exists()
    ref = reference / "runs" / run_dir.name  # the run ends where the uninterrupted one ended, bit for bit
    pd.testing.assert_frame_equal(without_timing(pd.read_csv(run_dir / "epochs.csv")),
                                  without_timing(pd.read_csv(ref / "epochs.csv")))
    a, b = torch.load(ref / "model.pt", weights_only=True), torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_aggregates_and_run_csvs_are_rewritten_from_the_run_records(tmp_path, data_dir, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "smoke")
    first, second = sorted((out / "smoke" / "runs").iterdir())[:2]
    truncate(out / "smoke" / "runs.csv")
    (out / "smoke" / "epochs.csv").write_bytes(b"\x00garbage\xff\n")
    truncate(first / "epochs.csv")  # a FINISHED run's own CSV: summary.json holds its rows
    (second / "epochs.csv").unlink()
    before = finished_runs(out / "smoke")
    ran = ablate(kill_grid_args(out, data_dir), tmp_path / "log.txt")
    assert ran.code == 0, ran.output
    assert ran.counts()["trained"] == 0 and finished_runs(out / "smoke") == before
    for path in (first / "epochs.csv", second / "epochs.csv"):
        assert f"warning: {path} was damaged or missing; rewrote it from {path.parent.name}/summary.json" \
            in ran.output
    for name in ("runs.csv", "epochs.csv", f"runs/{first.name}/epochs.csv", f"runs/{second.name}/epochs.csv"):
        assert (out / "smoke" / name).read_bytes() == (reference / name).read_bytes(), name


def test_damaged_run_summary_means_the_run_is_trained_again(tmp_path, data_dir, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "smoke")
    run_dir = sorted((out / "smoke" / "runs").iterdir())[0]
    truncate(run_dir / "summary.json")
    ran = ablate(kill_grid_args(out, data_dir), tmp_path / "log.txt")
    assert ran.code == 0, ran.output
    assert ran.counts()["trained"] == 1 and epochs_trained(ran.output, run_dir.name) == [1, 2, 3]
    assert_same_results(out / "smoke", reference)


def test_damaged_csv_of_an_old_summary_without_epoch_rows_is_reported(tmp_path, reference):
    """Summaries written before they kept the epoch rows cannot restore the CSV: the run keeps its runs.csv row
    and a warning says how to get the epochs back."""
    shutil.copytree(reference, tmp_path / "smoke")
    run_dir = sorted((tmp_path / "smoke" / "runs").iterdir())[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["epochs"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    truncate(run_dir / "epochs.csv")
    warnings = []
    runs, epochs = Store(tmp_path).write_aggregates("smoke", warn=warnings.append)
    assert len(runs) == 4 and run_dir.name in set(runs.run_id)
    assert run_dir.name not in set(epochs.run_id) and len(epochs) == 9
    assert warnings == [f"{run_dir / 'epochs.csv'} is damaged and its summary.json holds no epoch rows: the run "
                        f"keeps its runs.csv row but has no epoch rows; delete {run_dir} and rerun to train it again"]
