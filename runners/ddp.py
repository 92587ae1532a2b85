"""Launch one data-parallel run (devices = N) through PyTorch's own launcher, torch.distributed.run (torchrun).

torchrun starts N ranks of runners/ddp_worker.py (N / K on each of K nodes): nccl on CUDA (one GPU per rank),
gloo on the CPU (one process per device, each with threads = this process's threads / N, so 1 device and N
devices share the same cores). The parent (`ablate run`) keeps the run lock, relays rank 0's epoch lines as
progress, and builds the RunResult from the summary.json rank 0 wrote. If a rank dies, torchrun ends the
others, and the process-group timeout ($ABLATE_DDP_TIMEOUT, default 120 s) ends any rank stuck in a
collective; the last epoch's checkpoint stays, so rerunning the same command resumes the run.

Several nodes: run the same `ablate run` command on every node with `--nnodes K --node-rank R --rdzv HOST:PORT`
(or $ABLATE_NNODES, $ABLATE_NODE_RANK, $ABLATE_RDZV), HOST:PORT a free port on node 0, and one results folder
shared by all nodes. `devices` is then the world size (K x ranks per node). Node 0 trains the grid as usual and
hosts the rendezvous; a node R > 0 only joins node 0's multi-device runs, in grid order (follow_grid), and
never writes a file. Ranks are static: node R holds ranks R*n .. R*n+n-1, so rank 0 (the writer) is on node 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ablations.errors import UserError
from ablations.spec import RunSpec
from runners.ddp_worker import EPOCH_TAG
from runners.launch import GridOutcome, GridRequest, plan
from runners.store import RunFolder, Store
from runners.train import CHECKPOINT_SECONDS, RunResult, TrainOptions, pick_device

ROOT = Path(__file__).resolve().parents[1]
ENV_TIMEOUT = "ABLATE_DDP_TIMEOUT"  # seconds a collective may wait for a lost rank
ENV_RDZV_TIMEOUT = "ABLATE_RDZV_TIMEOUT"  # seconds a node waits for the others to join a run


@dataclass(frozen=True)
class Nodes:
    """Where the ranks of a run live: this machine only, or K nodes meeting at node 0's HOST:PORT."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv: str = ""  # HOST:PORT on node 0; only for nnodes > 1

    @staticmethod
    def of(options: TrainOptions) -> "Nodes":
        nodes = Nodes(options.nnodes, options.node_rank, options.rdzv)
        nodes.check()
        return nodes

    def check(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} with --nnodes {self.nnodes}: need nnodes >= 1 and "
                            f"0 <= node-rank < nnodes")
        if self.nnodes > 1 and (":" not in self.rdzv or not self.rdzv.rsplit(":", 1)[1].isdigit()):
            raise UserError(f"--nnodes {self.nnodes} needs --rdzv HOST:PORT (a free port on node 0, reachable "
                            f"from every node), got {self.rdzv!r}")

    def per_node(self, devices: int) -> int:
        if devices % self.nnodes:
            raise UserError(f"a run with {devices} devices does not split over {self.nnodes} nodes; use a "
                            f"device count divisible by --nnodes")
        return devices // self.nnodes


def worker_pythonpath() -> str:
    """PYTHONPATH for a worker process: this checkout first, so workers run this tree even when not installed."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker process: ours, with its thread count and this checkout on its path."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": worker_pythonpath()}


def _timeout_s(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise UserError(f"${name} must be a number of seconds") from None


def torchrun_command(spec: RunSpec, run_dir: Path, device: torch.device, data_dir: Path | None,
                     threads: int, nodes: Nodes, context: dict,
                     checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[str]:
    """`python -m torch.distributed.run ... -m runners.ddp_worker ...` for this node's share of the ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nodes.per_node(spec.devices)),
           "--max-restarts", "0"]
    if nodes.nnodes == 1:
        cmd += ["--standalone"]  # a private rendezvous on a free local port
    else:
        rdzv_timeout = int(_timeout_s(ENV_RDZV_TIMEOUT, 3600))
        cmd += ["--nnodes", str(nodes.nnodes), "--node-rank", str(nodes.node_rank), "--rdzv-backend", "static",
                "--rdzv-endpoint", nodes.rdzv, "--rdzv-id", spec.run_id, "--rdzv-conf", f"timeout={rdzv_timeout}"]
    cmd += ["-m", "runners.ddp_worker", "--run-dir", str(run_dir), "--run-id", spec.run_id,
            "--device", device.type, "--threads", str(threads), "--timeout-s", str(_timeout_s(ENV_TIMEOUT, 120)),
            "--context", json.dumps(context, default=str), "--checkpoint-seconds", repr(checkpoint_seconds)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return cmd


def launch_ddp_run(spec: RunSpec, rdir: Path, dev: torch.device, context: dict,
                   on_epoch: Callable[[dict], None], data_dir: Path | None = None,
                   options: TrainOptions = TrainOptions()) -> RunResult:
    """Train (or resume) one multi-device run with torchrun; the caller holds the run lock."""
    nodes = Nodes.of(options)
    rdir = Path(rdir)
    threads = max(1, torch.get_num_threads() // nodes.per_node(spec.devices))
    cmd = torchrun_command(spec, rdir.resolve(), dev, data_dir, threads, nodes, context, options.checkpoint_seconds)
    folder = RunFolder(rdir)
    folder.write_spec(spec.to_json())  # rank 0 reads it and sends it to the others
    folder.clear_summary()  # a failed attempt's; this attempt writes its own
    rc, tail = run_torchrun(cmd, threads, on_epoch)
    rows = _rows(folder)
    summary = folder.read_summary()
    if summary is None:
        errors = [line for line in tail if line.startswith("error: ")]
        if errors:  # a rank met a user error (no data cache on a node, a full disk): stop as one process would
            raise UserError(errors[-1].removeprefix("error: ")) from None
        last = next((line for line in reversed(tail) if line.strip()), f"exit code {rc}")
        return RunResult(spec.run_id, "failed", "error", rows, {},
                         f"a rank failed (torchrun exit code {rc}: {last.strip()[:200]}); the last epoch's "
                         f"checkpoint is kept: rerun to resume")
    return RunResult(spec.run_id, summary["status"], summary["stop_reason"], rows, summary, summary.get("error", ""))


def run_torchrun(cmd: list[str], threads: int, on_epoch: Callable[[dict], None]) -> tuple[int, list[str]]:
    """Run the launcher, relay epoch lines to on_epoch and everything else to stderr. Returns (exit code, the
    last lines). Interrupted or killed, the launcher is told to stop its ranks (SIGTERM) before we go."""
    env = worker_env(threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=stop_with_parent if sys.platform == "linux" else None)
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in proc.stdout:
            if line.startswith(EPOCH_TAG):
                try:
                    on_epoch(json.loads(line[len(EPOCH_TAG):]))
                    continue
                except ValueError:
                    pass
            tail.append(line.rstrip("\n"))
            print(line, end="", file=sys.stderr, flush=True)
        return proc.wait(), list(tail)
    except BaseException:
        proc.send_signal(signal.SIGTERM)  # torchrun's agent ends its ranks on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (even by kill -9), so no rank trains on after
    its run lock went stale. Linux only (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _rows(folder: RunFolder) -> list[dict]:
    try:
        return folder.read_epochs()
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return []


def follow_grid(request: GridRequest, say: Callable[[str], None] = print) -> GridOutcome:
    """Node R > 0 of a multi-node grid: join node 0's multi-device runs, in grid order, once each (node 0 moves
    on after a failed run too, so a retry here would wait for a run node 0 no longer starts). Runs already
    done in the shared results folder are skipped, as node 0 skips them. Takes no lock and writes nothing.
    The outcome's trained and failed runs are the joined runs whose launcher succeeded or failed on this node."""
    r = request
    nodes = Nodes.of(r.options)
    grid, specs = plan(r.grid, r.budget, r.overrides, r.seeds)
    store = Store(Path(r.results))
    dev = pick_device(r.device)
    multi = [s for s in specs if s.devices > 1]
    say(f"node {nodes.node_rank} of {nodes.nnodes}: joining the {len(multi)} multi-device runs of grid "
        f"{grid.name} at {nodes.rdzv}")
    outcome = GridOutcome(grid.name, len(multi))
    for spec in multi:
        if store.run_state(grid.name, spec.run_id) != "pending":  # done, or node 0 copies it from another grid
            outcome.skipped.append(spec.run_id)
            continue
        say(f"join run {spec.run_id} " + " ".join(f"{k}={v}" for k, v in spec.axes) + f" seed={spec.seed}")
        threads = max(1, torch.get_num_threads() // nodes.per_node(spec.devices))
        cmd = torchrun_command(spec, store.run_dir(grid.name, spec.run_id).resolve(), dev, r.data_dir, threads,
                               nodes, {})
        rc, _ = run_torchrun(cmd, threads, lambda row: None)
        (outcome.failed if rc != 0 else outcome.trained).append(spec.run_id)
    return outcome
