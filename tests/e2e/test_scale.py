"""More than one process: DDP through torchrun (gloo on the CPU), `--jobs K`, and the Ray executor.

A 2-rank run must end where the 1-process run with the same global batch ends; a killed rank must fail the
run quickly and leave it resumable, and the resumed run must end bit-for-bit where an uninterrupted one ends."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from ablations.models import ModelSpec
from ablations.spec import RunSpec
from runners.cli import main
from runners.data import load_dataset
from runners.ddp import Nodes, launch_ddp_run, torchrun_command
from runners.execute import attempt_run
from runners.launch import GridOutcome
from runners.progress import PlainReporter
from runners.store import Store
from runners.train import TrainOptions, train_run
from tests.precision import FAST_PRECISION

CPU = torch.device("cpu")
TIMING = ["epoch_seconds", "images_per_second", "cum_seconds", "wall_seconds", "train_seconds", "threads", "host"]


def _spec(devices: int) -> RunSpec:
    """No dropout, no augmentation, fp32: one process and two ranks draw nothing differently."""
    return RunSpec(model=ModelSpec(width=0.125), epochs=3, batch_size=64, subset=256, test_subset=100, lr=0.02,
                   precision="fp32", augment="none", devices=devices, grid="scale")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """Uninterrupted runs of the same spec on 1 process and on 2 ranks."""
    root = tmp_path_factory.mktemp("ref")
    one = train_run(_spec(1), load_dataset("cifar10", data_dir), root / "one", CPU)
    (root / "two").mkdir()
    seen = []
    two = launch_ddp_run(_spec(2), root / "two", CPU, {}, seen.append, data_dir)
    return root, one, two, seen


def test_two_ranks_end_where_one_process_ends(reference):
    root, one, two, seen = reference
    assert one.status == two.status == "finished", two.error
    assert [r["epoch"] for r in seen] == [1, 2, 3]  # rank 0's epochs were relayed to the parent as progress
    for a, b in zip(one.rows, two.rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    wa, wb = _weights(root / "one"), _weights(root / "two")
    # float32 summed in another order (two halves, then the all-reduce): on an AVX2-only CPU fc1's bias ends up to
    # 7e-6 apart after 3 epochs; a rank's half lost or not averaged would move weights by lr x grad, far more
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=2e-5) for k in wa)
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)  # two ranks really summed two halves
    env = two.summary["env"]
    assert (env["world_size"], env["backend"], env["devices"], env["device"]) == (2, "gloo", 2, "cpu")
    assert two.summary["metrics"]["world_size"] == 2


def _rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of one rank (a `runners.ddp_worker` process with RANK=rank) of the run in run_dir."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"runners.ddp_worker" in cmd and b"torch.distributed.run" not in cmd \
                and str(run_dir.resolve()).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"rank {rank} of {run_dir} not found")


class _KillRankAfterEpoch1(PlainReporter):
    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def epoch(self, row: dict) -> None:
        super().epoch(row)
        if row["epoch"] == 1:  # epoch 1's checkpoint is on disk: take rank 1 away mid-run
            os.kill(_rank_pid(self.run_dir, 1), signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="finds the rank through /proc")
def test_a_killed_rank_fails_the_run_cleanly_and_it_resumes(tmp_path, data_dir, reference):
    spec = _spec(2)
    store = Store(tmp_path)
    rdir = store.run_dir(spec.grid, spec.run_id)
    datasets = {"cifar10": load_dataset("cifar10", data_dir)}
    outcome = GridOutcome(spec.grid, 1)
    start = time.perf_counter()
    every_epoch = TrainOptions(checkpoint_seconds=0)
    state = attempt_run(spec, 1, 1, store, spec.grid, datasets, CPU, {}, _KillRankAfterEpoch1(rdir), outcome,
                        data_dir, every_epoch)
    assert state == "trained" and outcome.failed == [spec.run_id]
    assert time.perf_counter() - start < 90  # no hang: torchrun and the process-group timeout end the other rank
    assert (rdir / "checkpoint.pt").exists() and not store.is_done(spec.grid, spec.run_id)
    assert not (rdir / "run.lock").exists()  # released

    outcome = GridOutcome(spec.grid, 1)
    assert attempt_run(spec, 1, 1, store, spec.grid, datasets, CPU, {}, PlainReporter(), outcome, data_dir,
                       every_epoch) == "trained"
    assert not outcome.failed and store.is_done(spec.grid, spec.run_id)
    root, _, two, _ = reference
    resumed = pd.read_csv(rdir / "epochs.csv")
    assert list(resumed.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed.drop(columns=TIMING[:3]),
                                  pd.DataFrame(two.rows).drop(columns=TIMING[:3]), check_dtype=False)
    wa, wb = _weights(root / "two"), _weights(rdir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # every rank's RNG and rank 0's state came back


def _smoke(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["run", "--grid", "smoke", "--seeds", "1", "--out", str(out), "--data-dir", str(data_dir), "--plain",
            *FAST_PRECISION, *extra]


@pytest.fixture(scope="module")
def jobs_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("jobs")
    result = CliRunner().invoke(main, _smoke(out, data_dir, "--jobs", "2"))
    return out, result


def test_jobs_train_every_run_exactly_once(jobs_run):
    out, result = jobs_run
    assert result.exit_code == 0, result.output
    assert "2 jobs of" in result.output
    starts = [line for line in result.output.splitlines() if "] run " in line]
    assert len(starts) == 4 and {line[:7] for line in starts} == {"[job 1]", "[job 2]"}, result.output
    runs = pd.read_csv(out / "smoke" / "runs.csv")
    assert len(runs) == 4 and runs.run_id.is_unique and set(runs.status) == {"finished"}


def test_ray_executor_writes_what_the_local_executor_writes(tmp_path, data_dir, jobs_run):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    result = CliRunner().invoke(main, _smoke(tmp_path, data_dir, "--executor", "ray"))
    assert result.exit_code == 0, result.output
    assert "4 trained" in result.output
    local = pd.read_csv(jobs_run[0] / "smoke" / "runs.csv")
    ray_runs = pd.read_csv(tmp_path / "smoke" / "runs.csv")
    assert list(ray_runs.columns) == list(local.columns)
    keep = [c for c in local.columns if c not in TIMING]
    pd.testing.assert_frame_equal(ray_runs[keep].sort_values("run_id").reset_index(drop=True),
                                  local[keep].sort_values("run_id").reset_index(drop=True))
    assert set(pd.read_csv(tmp_path / "smoke" / "epochs.csv").columns) == \
        set(pd.read_csv(jobs_run[0] / "smoke" / "epochs.csv").columns)


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(main, _smoke(tmp_path, data_dir, "--executor", "ray"))
    assert result.exit_code == 2
    assert result.output == "error: the ray executor needs Ray: pip install -e '.[ray]'\n"


def test_multi_node_launch_uses_static_ranks_from_node_0(tmp_path):
    nodes = Nodes(2, 1, "node0.example:29400")
    cmd = torchrun_command(_spec(4), tmp_path, CPU, None, 1, nodes, {})
    flags = dict(zip(cmd, cmd[1:]))
    assert (flags["--nproc-per-node"], flags["--nnodes"], flags["--node-rank"]) == ("2", "2", "1")
    assert (flags["--rdzv-backend"], flags["--rdzv-endpoint"]) == ("static", "node0.example:29400")
    assert flags["--rdzv-id"] == _spec(4).run_id and "--standalone" not in cmd
    assert "--standalone" in torchrun_command(_spec(2), tmp_path, CPU, None, 1, Nodes(), {})
    with pytest.raises(Exception, match="does not split over 2 nodes"):
        Nodes(2, 0, "h:1").per_node(3)
    with pytest.raises(Exception, match="needs --rdzv HOST:PORT"):
        Nodes(2, 0, "").check()


def test_a_follower_node_skips_the_runs_node_0_copies_from_another_grid(tmp_path, monkeypatch):
    """Node 0 copies a run finished in another grid instead of training it, so a follower must not wait for it."""
    from runners import ddp
    from runners.launch import GridRequest, plan

    _, specs = plan("gpus", "cpu")
    multi = [s for s in specs if s.devices > 1]
    for s in multi:
        rdir = tmp_path / "other" / "runs" / s.run_id
        rdir.mkdir(parents=True)
        (rdir / "summary.json").write_text(json.dumps({"run_id": s.run_id, "status": "finished"}))
    monkeypatch.setattr(ddp, "run_torchrun", lambda *a, **k: pytest.fail("joined a run node 0 copies"))
    outcome = ddp.follow_grid(GridRequest("gpus", tmp_path, budget="cpu"), say=lambda msg: None)
    assert multi and outcome.skipped == [s.run_id for s in multi] and not outcome.trained
