"""`ablate run` end to end on generated data: CSVs with the documented columns, re-runs that train nothing,
kill -9 and resume ending bit-for-bit where an uninterrupted run ends, two processes sharing one grid."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from runners.cli import main
from runners.store import AGGREGATE_EPOCH_COLUMNS
from tests.precision import FAST_PRECISION

ROOT = Path(__file__).resolve().parents[2]
TIMING = ["epoch_seconds", "images_per_second", "cum_seconds", "wall_seconds", "train_seconds",
          "seconds_to_target", "threads", "host",
          "git_commit", "git_dirty"]  # where the code came from, not what it computed
RUN_COLUMNS = ["run_id", "grid", "status", "stop_reason", "activation", "lrn", "seed", "epochs", "epochs_run",
               "train_loss", "train_error", "test_loss", "test_error", "test_error_top5", "val_error",
               "clean_train_error", "learned", "test_error_at_best_val",
               "epochs_to_target", "seconds_to_target", "reached_target", "wall_seconds", "images_per_second",
               "dataset", "dataset_label", "precision", "device", "devices", "torch_version", "budget"]


def _args(out, data_dir, *extra):
    return ["run", "--grid", "smoke", "--out", str(out), "--data-dir", str(data_dir), "--plain", *FAST_PRECISION,
            *extra]


def _subprocess(out, data_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "runners.cli", *_args(out, data_dir, *extra)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df.columns]).sort_values(list(df.columns[:1])) \
        .reset_index(drop=True)


def test_smoke_grid_end_to_end_and_rerun_trains_nothing(tmp_path, data_dir, monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(sys, "argv", ["ablate", *_args(tmp_path, data_dir)])
    first = runner.invoke(main, _args(tmp_path, data_dir))
    assert first.exit_code == 0, first.output
    runs = pd.read_csv(tmp_path / "smoke" / "runs.csv")
    epochs = pd.read_csv(tmp_path / "smoke" / "epochs.csv")
    assert len(runs) == 8 and set(runs.status) == {"finished"}
    assert set(RUN_COLUMNS) <= set(runs.columns)
    assert set(AGGREGATE_EPOCH_COLUMNS) <= set(epochs.columns) and {"activation", "lrn", "seed"} <= set(epochs.columns)
    assert epochs.columns.is_unique  # an `lr` axis and the epoch's own rate (epoch_lr) never share a name
    assert len(epochs) == runs.epochs_run.sum() == 16  # one row per run-epoch
    for rid, group in epochs.groupby("run_id"):
        assert list(group.epoch) == [1, 2]
        run_dir = tmp_path / "smoke" / "runs" / rid
        assert {"spec.json", "epochs.csv", "summary.json"} <= {p.name for p in run_dir.iterdir()}
        assert not (run_dir / "checkpoint.pt").exists()
    assert runs.dataset_label.iloc[0].startswith("CIFAR-10")
    assert (tmp_path / "smoke" / "grid.json").exists()

    command = json.loads((tmp_path / "smoke" / "grid.json").read_text())["command"]
    assert command.startswith("ablate run --grid smoke") and "--jobs" not in command

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "smoke" / "runs").rglob("*") if p.is_file()}
    monkeypatch.setattr(sys, "argv", ["ablate", *_args(tmp_path, data_dir, "--jobs", "2")])
    second = runner.invoke(main, _args(tmp_path, data_dir))
    assert second.exit_code == 0, second.output
    assert "0 trained, 8 already done" in second.output
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "smoke" / "runs").rglob("*") if p.is_file()}
    assert before == after
    # grid.json names the command that made the runs, not the re-run that trained nothing
    assert json.loads((tmp_path / "smoke" / "grid.json").read_text())["command"] == command


def test_dry_run_trains_nothing(tmp_path, data_dir):
    result = CliRunner().invoke(main, _args(tmp_path, data_dir, "--dry-run"))
    assert result.exit_code == 0 and "8 runs" in result.output
    assert not (tmp_path / "smoke").exists()


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, data_dir):
    extra = ("--seeds", "1", "--epochs", "4")
    ref = _subprocess(tmp_path / "ref", data_dir, *extra)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    out = tmp_path / "killed"
    proc = _subprocess(out, data_dir, *extra)
    deadline = time.time() + 240
    killed_mid_run = False
    while time.time() < deadline and proc.poll() is None:
        mid = [d for d in (out / "smoke" / "runs").glob("*")
               if (d / "checkpoint.pt").exists() and not (d / "summary.json").exists()]
        if mid:
            proc.send_signal(signal.SIGKILL)
            killed_mid_run = True
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_mid_run, "the run finished before it could be killed"
    resumed = _subprocess(out, data_dir, *extra)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output

    a = pd.read_csv(tmp_path / "ref" / "smoke" / "runs.csv")
    b = pd.read_csv(out / "smoke" / "runs.csv")
    pd.testing.assert_frame_equal(_without_timing(a), _without_timing(b))
    ea = pd.read_csv(tmp_path / "ref" / "smoke" / "epochs.csv")
    eb = pd.read_csv(out / "smoke" / "epochs.csv")
    pd.testing.assert_frame_equal(_without_timing(ea), _without_timing(eb))
    for rid in a.run_id:
        wa = torch.load(tmp_path / "ref" / "smoke" / "runs" / rid / "model.pt", weights_only=True)
        wb = torch.load(out / "smoke" / "runs" / rid / "model.pt", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), rid  # bit-for-bit


def test_two_processes_share_a_grid_and_train_each_run_once(tmp_path, data_dir):
    procs = [_subprocess(tmp_path, data_dir, "--seeds", "1") for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    started = sum(o.count("] run ") for o in outputs)
    assert started == 4, outputs  # every run trained exactly once across the two processes
    runs = pd.read_csv(tmp_path / "smoke" / "runs.csv")
    assert len(runs) == 4 and runs.run_id.is_unique and set(runs.status) == {"finished"}
    epochs = pd.read_csv(tmp_path / "smoke" / "epochs.csv")
    assert len(epochs) == 8 and not epochs.isna().any().any()


class _Clock:
    """A stand-in for runners.train's `time`: every perf_counter() call advances it by `step` seconds, so the
    checkpoint cadence is the same on any machine."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def _small_spec(epochs: int = 5):
    from ablations.models import ModelSpec
    from ablations.spec import RunSpec
    return RunSpec(model=ModelSpec(width=0.125), epochs=epochs, batch_size=64, subset=128, test_subset=64,
                   lr=0.02, precision="fp32", grid="ckpt")


def _train_recording(spec, data, run_dir, every: float, stop_at: int = 0):
    """train_run, noting after each epoch which epoch the checkpoint on disk holds (0: none); stop_at > 0 raises
    KeyboardInterrupt (Ctrl-C) after that epoch. `every`: the checkpoint interval in seconds."""
    from runners.store import load_checkpoint
    from runners.train import train_run
    held: list[int] = []

    def on_epoch(row):
        state = load_checkpoint(run_dir / "checkpoint.pt")
        held.append(len(state["rows"]) if state else 0)
        if row["epoch"] == stop_at:
            raise KeyboardInterrupt

    try:
        train_run(spec, data, run_dir, "cpu", on_epoch=on_epoch, checkpoint_seconds=every)
    except KeyboardInterrupt:
        pass
    return held


def test_checkpoints_wait_for_the_interval_and_a_sparse_one_still_resumes_bit_for_bit(tmp_path, data_dir,
                                                                                     monkeypatch):
    import runners.train as train
    from runners.data import load_dataset
    from runners.store import load_checkpoint

    data, spec = load_dataset("cifar10", data_dir), _small_spec()
    assert _train_recording(spec, data, tmp_path / "every", 0) == [1, 2, 3, 4, 5]
    ref = torch.load(tmp_path / "every" / "model.pt", weights_only=True)

    assert _train_recording(spec, data, tmp_path / "never", 1e9) == [0, 0, 0, 0, 0]
    assert not list((tmp_path / "never").glob("checkpoint*"))

    # the loop reads the clock 3 times per epoch (start, end, checkpoint check): 3 s per epoch on this clock,
    # so a 5 s interval checkpoints after epochs 2 and 4
    monkeypatch.setattr(train, "time", _Clock(1.0))
    assert _train_recording(spec, data, tmp_path / "sparse", 5, stop_at=3) == [0, 2, 2]
    # Ctrl-C after epoch 3 writes epoch 3's state, kept in memory since no checkpoint followed it
    assert len(load_checkpoint(tmp_path / "sparse" / "checkpoint.pt")["rows"]) == 3
    (tmp_path / "sparse" / "checkpoint.pt").unlink()  # as if killed -9 instead: back to epoch 2's checkpoint
    # resumes from checkpoint.prev.pt (epoch 2), retrains epoch 3 and checkpoints again after epoch 4
    assert _train_recording(spec, data, tmp_path / "sparse", 5) == [0, 4, 4]
    summary = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert [r["epoch"] for r in summary["epochs"]] == [1, 2, 3, 4, 5]
    got = torch.load(tmp_path / "sparse" / "model.pt", weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpoint_interval_default_and_bad_values(tmp_path, data_dir, monkeypatch):
    import inspect

    from runners.train import CHECKPOINT_SECONDS, TrainOptions, train_run
    monkeypatch.delenv("ABLATE_CHECKPOINT_SECONDS")
    assert inspect.signature(train_run).parameters["checkpoint_seconds"].default == CHECKPOINT_SECONDS == 30.0
    assert TrainOptions().checkpoint_seconds == CHECKPOINT_SECONDS
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("ABLATE_CHECKPOINT_SECONDS", bad)
        result = CliRunner().invoke(main, _args(tmp_path, data_dir, "--seeds", "1"))
        assert result.exit_code == 2, (bad, result.output)
        assert "ABLATE_CHECKPOINT_SECONDS" in result.output or "--checkpoint-every" in result.output
        assert not (tmp_path / "smoke" / "runs").exists() or not list((tmp_path / "smoke" / "runs").glob("*/*"))
    monkeypatch.setenv("ABLATE_CHECKPOINT_SECONDS", "0")
    result = CliRunner().invoke(main, _args(tmp_path, data_dir, "--checkpoint-every", "-2"))
    assert result.exit_code == 2 and "--checkpoint-every" in result.output


def test_freed_training_memory_is_reused_without_page_faults():
    """train_run asks glibc to keep freed blocks: reallocating a step's activations then costs no page faults
    (by default glibc trims or unmaps freed 4 MB buffers and faults them back in: ~5,000 faults for these 20)."""
    import resource
    from runners.devices import keep_freed_memory
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux only; elsewhere keep_freed_memory does nothing")
    assert keep_freed_memory()
    torch.ones(1 << 20)  # 4 MB: the first allocation may fault its pages in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(1 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000  # ~1,000 here: one growth


def test_only_long_cpu_runs_compile_their_input_pipeline():
    """Compiling the pipeline costs seconds per process; it repays them from about a million images."""
    from runners.train import COMPILED_INPUT_IMAGES, compile_input
    spec = _small_spec(epochs=10)
    cpu = torch.device("cpu")
    assert not compile_input(spec, COMPILED_INPUT_IMAGES // 10 - 1, cpu)
    assert compile_input(spec, COMPILED_INPUT_IMAGES // 10, cpu)
    assert not compile_input(spec, COMPILED_INPUT_IMAGES, torch.device("cuda"))


def test_a_run_with_the_compiled_input_pipeline_trains_the_same_weights(tmp_path, data_dir, monkeypatch):
    """train_run with compile_input on (its threshold lowered for the test) ends with the weights of the eager
    run, bit for bit: the compiled full batches and the eager last batch (160 = 2 x 64 + 32) draw and compute
    the same numbers."""
    import runners.augment as augment
    import runners.train as train
    from runners.data import load_dataset

    compiled_calls = []
    real = augment.compiled_augment

    def counted():
        fn = real()
        return lambda *args: compiled_calls.append(1) or fn(*args)

    monkeypatch.setattr(augment, "compiled_augment", counted)
    data = load_dataset("cifar10", data_dir)
    spec = dataclasses.replace(_small_spec(epochs=2), subset=160)
    weights = []
    for threshold, name in ((10 ** 12, "eager"), (1, "compiled")):
        monkeypatch.setattr(train, "COMPILED_INPUT_IMAGES", threshold)
        assert train.compile_input(spec, 160, torch.device("cpu")) == (name == "compiled")
        train.train_run(spec, data, tmp_path / name, "cpu")
        weights.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len(compiled_calls) == 4 and augment._COMPILE["ok"], "2 full batches x 2 epochs went through it"


def test_a_failed_run_keeps_its_last_finished_epoch_even_between_checkpoints(tmp_path, data_dir):
    """An error mid-run (a lost DDP rank, say) records the run as failed and writes the last finished epoch's
    state, held in memory since no checkpoint was due; the rerun resumes there and ends bit for bit the same."""
    from runners.data import load_dataset
    from runners.store import load_checkpoint
    from runners.train import train_run

    data, spec = load_dataset("cifar10", data_dir), _small_spec(epochs=4)
    train_run(spec, data, tmp_path / "ref", "cpu", checkpoint_seconds=1e9)

    def fail_after_2(row):
        if row["epoch"] == 2:
            raise RuntimeError("rank 1 lost")

    failed = train_run(spec, data, tmp_path / "run", "cpu", on_epoch=fail_after_2, checkpoint_seconds=1e9)
    assert failed.status == "failed" and "rank 1 lost" in failed.error
    assert len(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["rows"]) == 2
    resumed = train_run(spec, data, tmp_path / "run", "cpu", on_epoch=lambda row: None, checkpoint_seconds=1e9)
    assert resumed.status == "finished" and [r["epoch"] for r in resumed.rows] == [1, 2, 3, 4]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_the_last_epoch_releases_the_lock_and_the_rerun_says_where_it_resumes(tmp_path, data_dir):
    """What Slurm, Kubernetes, `docker stop` and `timeout` send: handled as Ctrl-C, with its own exit code."""
    extra = ("--seeds", "1", "--epochs", "6")
    out = tmp_path / "out"
    proc = _subprocess(out, data_dir, *extra)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any((d / "checkpoint.pt").exists() for d in (out / "smoke" / "runs").glob("*")):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert "terminated (SIGTERM): every finished epoch is saved" in output and "Traceback" not in output
    assert not list((out / "smoke").rglob("run.lock"))
    rerun = _subprocess(out, data_dir, *extra)
    again = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, again
    assert "resuming at epoch" in again


def test_a_run_logs_its_epochs_and_settings_to_tensorboard(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = CliRunner().invoke(main, _args(tmp_path, data_dir, "--seeds", "1"))
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "smoke" / "runs.csv")
    for rid in runs.run_id:
        acc = EventAccumulator(str(tmp_path / "smoke" / "runs" / rid / "tb"))
        acc.Reload()
        assert {"train_loss", "val_error", "test_error", "clean_train_error"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("test_error")] == [1, 2]  # one point per epoch


def test_a_run_estimated_at_over_an_hour_stops_with_the_estimate_unless_confirmed(tmp_path, data_dir, monkeypatch):
    import runners.cost as cost
    monkeypatch.setattr(cost, "probe_images_per_second", lambda *a, **k: 0.05)  # a very slow machine
    stopped = CliRunner().invoke(main, _args(tmp_path, data_dir, "--seeds", "1"))
    assert stopped.exit_code == 2 and stopped.stderr.count("\n") == 1, stopped.output
    assert "estimated at up to" in stopped.stderr and "add --yes to start" in stopped.stderr
    assert not (tmp_path / "smoke").exists()  # nothing written
    monkeypatch.setattr(cost, "probe_images_per_second", lambda *a, **k: 1e9)
    quick = CliRunner().invoke(main, _args(tmp_path, data_dir, "--seeds", "1", "--dry-run"))
    assert quick.exit_code == 0, quick.output


def test_progress_lines_say_epoch_or_epochs():
    import io
    from runners.progress import PlainReporter
    out = io.StringIO()
    spec = dataclasses.replace(_small_spec(epochs=1), axes=(("activation", "relu"),))
    PlainReporter(out).start_run(spec, 1, 1)
    PlainReporter(out).start_run(dataclasses.replace(spec, epochs=3), 1, 1)
    assert "(1 epoch max)" in out.getvalue() and "(3 epochs max)" in out.getvalue()


def test_sigterm_to_a_jobs_parent_stops_every_child_cleanly(tmp_path, data_dir):
    extra = ("--seeds", "2", "--epochs", "20", "--jobs", "2")
    out = tmp_path / "out"
    proc = _subprocess(out, data_dir, *extra)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if sum((d / "checkpoint.pt").exists() for d in (out / "smoke" / "runs").glob("*")) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert output.count("terminated (SIGTERM): every finished epoch is saved") == 3, output  # 2 jobs + parent
    assert not list((out / "smoke").rglob("run.lock"))
    interrupted = [d for d in (out / "smoke" / "runs").glob("*")  # a stop mid-save leaves only checkpoint.prev.pt
                   if list(d.glob("checkpoint*.pt")) and not (d / "summary.json").exists()]
    assert interrupted  # at least one child was stopped mid-run (on a loaded machine the other may have finished)
    rerun = _subprocess(out, data_dir, *extra)
    again = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, again
    assert again.count("resuming at epoch") == len(interrupted), again


def test_all_shows_and_runs_every_paper_grid_and_no_pipeline_check(tmp_path):
    from ablations.grid import grid_names, load_grid
    from runners.cli import main
    paper = [n for n in grid_names() if load_grid(n).tests_paper]
    assert "smoke" in grid_names() and "smoke" not in paper and "relu_vs_tanh" in paper
    shown = CliRunner().invoke(main, ["show", "--all", "--budget", "cpu", "--no-probe", "--json",
                                      "--results", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.output)
    assert [r["grid"] for r in rows] == paper and all(r["budget"] == "cpu" for r in rows)
    assert all(r["done"] == 0 and r["pending"] == r["runs"] and r["measured_seconds"] == 0 for r in rows)
    dry = CliRunner().invoke(main, ["run", "--all", "--budget", "cpu", "--dry-run", "--out", str(tmp_path)])
    assert dry.exit_code == 0 and [ln[len("== grid "):] for ln in dry.output.splitlines()
                                   if ln.startswith("== grid ")] == paper
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"
    for args in (["run"], ["run", "--all", "--grid", "smoke"], ["show"]):
        bad = CliRunner().invoke(main, args)
        assert bad.exit_code == 2 and "--all" in bad.output, bad.output


def test_show_all_counts_runs_of_the_last_runs_overrides_apart_and_sets_the_total_against_one_night(tmp_path):
    from rich.console import Console

    from ablations.grid import expand, load_grid
    from runners.cli import main
    from runners.cost import reproduction_table
    fp32 = expand(load_grid("pooling"), "cpu", {"precision": "fp32"})
    for s in fp32:  # a grid trained with an override: its report reads these runs
        (tmp_path / "pooling" / "runs" / s.run_id).mkdir(parents=True)
        (tmp_path / "pooling" / "runs" / s.run_id / "summary.json").write_text('{"status": "finished"}')
    (tmp_path / "pooling" / "grid.json").write_text(json.dumps({"budget": "cpu", "overrides": {"precision": "fp32"}}))
    args = ["show", "--all", "--budget", "cpu", "--no-probe", "--results", str(tmp_path)]
    rows = {r["grid"]: r for r in json.loads(CliRunner().invoke(main, [*args, "--json"]).output)}
    assert rows["pooling"]["done"] == 0 and rows["pooling"]["done_with_recorded_overrides"] == len(fp32) == 6
    assert "done_with_recorded_overrides" not in rows["dropout"]
    shown = CliRunner().invoke(main, args, terminal_width=400)
    assert shown.exit_code == 0 and "pooling: 6 runs done with precision=fp32" in shown.output, shown.output
    asked = json.loads(CliRunner().invoke(main, [*args, "--json", "--precision", "fp32"]).output)
    assert {r["grid"]: r for r in asked}["pooling"]["done"] == 6  # asked for them: counted as done, no note
    assert "done_with_recorded_overrides" not in {r["grid"]: r for r in asked}["pooling"]
    console = Console(record=True, width=400)
    console.print(reproduction_table([{**r, "estimated_pending_seconds": 1800.0} for r in rows.values()], "cpu"))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    hours = f"{len(rows) / 2:.1f} h"  # eight grids of half an hour each, nothing measured yet
    assert f"measured 0 s + estimated pending {hours} = {hours}, against one night (8 h on one" in text, text


def test_show_says_when_a_busy_machine_makes_its_estimates_read_high(tmp_path, monkeypatch):
    from runners.cli import main
    from runners.cost import busy_note
    assert busy_note(0.9, 2) == "" and "load average 1.0 on 2 cores" in busy_note(1.0, 2)
    args = ["show", "smoke", "--results", str(tmp_path)]
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
    idle = CliRunner().invoke(main, args, terminal_width=200)
    assert idle.exit_code == 0 and "busy" not in idle.output, idle.output
    monkeypatch.setattr("os.getloadavg", lambda: (float(os.cpu_count()), 1.0, 1.0))
    busy = CliRunner().invoke(main, args, terminal_width=200)
    assert busy.exit_code == 0 and "the machine is busy (load average" in busy.output, busy.output
    unprobed = CliRunner().invoke(main, [*args, "--no-probe"], terminal_width=200)
    assert "busy" not in unprobed.output  # no probe, no timing to spoil


def test_a_run_finished_in_another_grid_is_copied_not_trained_and_its_cost_counts_once(tmp_path, data_dir):
    """Same run id = same result fields: a second grid adopts the finished run (relabelled), trains nothing."""
    from reports.load import machine_seconds

    small = ("axes.lrn=[false]", "--seeds", "1")
    runner = CliRunner()
    assert runner.invoke(main, _args(tmp_path, data_dir, *small)).exit_code == 0
    (tmp_path / "smoke").rename(tmp_path / "other")  # the same runs, finished in another grid's folder
    (tmp_path / "other" / "runs.csv").unlink()
    dry = runner.invoke(main, _args(tmp_path, data_dir, *small, "--dry-run"))
    assert dry.output.count("reuses other") == 2, dry.output
    first_id = sorted(p.name for p in (tmp_path / "other" / "runs").iterdir())[0]
    (tmp_path / "smoke" / "runs" / first_id).mkdir(parents=True)  # an interrupted training of the same run here
    (tmp_path / "smoke" / "runs" / first_id / "checkpoint.pt").write_bytes(b"old")
    result = runner.invoke(main, _args(tmp_path, data_dir, *small))
    assert result.exit_code == 0, result.output
    assert "0 trained, 0 already done, 2 reused from other grids" in result.output
    for rdir in (tmp_path / "smoke" / "runs").iterdir():
        source = tmp_path / "other" / "runs" / rdir.name
        summary = json.loads((rdir / "summary.json").read_text())
        assert summary["grid"] == summary["spec"]["grid"] == "smoke" and summary["reused_from"] == "other"
        assert json.loads((rdir / "spec.json").read_text())["grid"] == "smoke"
        assert (rdir / "epochs.csv").read_bytes() == (source / "epochs.csv").read_bytes()
        assert summary["metrics"] == json.loads((source / "summary.json").read_text())["metrics"]
    assert not (tmp_path / "smoke" / "runs" / first_id / "checkpoint.pt").exists()
    runs = pd.read_csv(tmp_path / "smoke" / "runs.csv")
    assert list(runs.reused_from) == ["other", "other"] and runs.wall_seconds.gt(0).all()
    assert machine_seconds(runs) == 0.0  # counted where it was trained
    report = runner.invoke(main, ["report", "--results", str(tmp_path), "--grid", "smoke", "--dpi", "30"])
    assert report.exit_code == 0, report.output
    assert "2 run(s) trained in grid other with the same settings" in (tmp_path / "report" / "REPORT.md").read_text()
    again = runner.invoke(main, _args(tmp_path, data_dir, *small))
    assert "0 trained, 2 already done" in again.output


def test_runs_behind_a_link_are_never_adopted(tmp_path, data_dir):
    small = ("axes.lrn=[false]", "--seeds", "1")
    runner = CliRunner()
    elsewhere = tmp_path / "elsewhere"
    assert runner.invoke(main, _args(elsewhere, data_dir, *small)).exit_code == 0
    out = tmp_path / "results"
    out.mkdir()
    (out / "other").symlink_to(elsewhere / "smoke", target_is_directory=True)
    result = runner.invoke(main, _args(out, data_dir, *small))
    assert result.exit_code == 0 and "2 trained" in result.output, result.output
    assert "reused_from" not in pd.read_csv(out / "smoke" / "runs.csv")
