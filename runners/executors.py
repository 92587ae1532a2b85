"""Executors for a whole grid beyond one process: K local worker processes (`--jobs K`) or a Ray cluster
(`--executor ray`).

Both lean on the results store's run locks rather than on a scheduler of their own: K copies of `ablate run`
on one grid already share its runs safely (each takes the next unlocked run), and a Ray task is the same
lock-train-release step (runners.execute.attempt_run) run wherever Ray finds the run's resources. A worker that
dies leaves its run's last epoch checkpoint and a lock that goes stale; rerunning the command finishes the grid.
Ray is an optional extra (`pip install -e '.[ray]'`), imported only here and only for `--executor ray`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ablations.choices import FINISHED
from ablations.errors import UserError
from ablations.spec import RunSpec
from runners.ddp import stop_with_parent, worker_env, worker_pythonpath
from runners.execute import attempt_run, write_grid_json
from runners.launch import GridOutcome, GridRequest, plan
from runners.progress import PlainReporter
from runners.store import Store
from runners.train import RunResult, TrainOptions, pick_device

RAY_MISSING = "the ray executor needs Ray: pip install -e '.[ray]'"
EXIT_PRIORITY = (2, 1, 130, 143, 3, 75)  # which child exit code wins: bad input, crash, interrupt, failed, busy


# ---------------------------------------------------------------- K local processes

def job_command(grid: str, results: Path, budget: str, overrides: dict, seeds: list[int] | None,
                data_dir: Path | None, device: str, wait_for_others: bool,
                options: TrainOptions = TrainOptions()) -> list[str]:
    """The `ablate run` command line each job runs: the same grid and options, without --jobs."""
    cmd = [sys.executable, "-m", "runners.cli", "run", "--grid", grid, "--out", str(results), "--budget", budget,
           "--device", device, "--plain", "--yes",  # the parent already checked the cost
           "--checkpoint-every", repr(options.checkpoint_seconds)]
    for key, value in overrides.items():
        cmd.append(f"{key}={json.dumps(value)}")  # JSON's numbers, strings, true/false and lists are TOML too
    if seeds is not None:  # a count when it means 0..n-1, else a list (a trailing comma: never a count)
        cmd += ["--seeds", str(len(seeds)) if seeds == list(range(len(seeds))) else ",".join(map(str, seeds)) + ","]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    if not wait_for_others:
        cmd += ["--no-wait"]
    return cmd


def run_jobs(request: GridRequest, jobs: int, say: Callable[[str], None] = print) -> GridOutcome:
    """Train a grid with `jobs` processes at once on this machine, each with cores // jobs threads.
    Their output is relayed line by line with a `[job k]` prefix. The outcome is read back from the store; its
    exit code is the one among the jobs' that matters most."""
    r = request
    grid, results, budget, overrides, seeds = r.grid, Path(r.results), r.budget, r.overrides, r.seeds
    data_dir, device, wait_for_others, options = r.data_dir, r.device, r.wait_for_others, r.options
    store = Store(results)
    g, specs = plan(grid, budget, overrides, seeds, store)  # a bad grid or option: one error here, not one per job
    store.check_writable()
    before = {s.run_id for s in specs if store.is_done(g.name, s.run_id)}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    cmd = job_command(grid, Path(results), budget, overrides or {}, seeds, data_dir, device, wait_for_others,
                      options)
    env = worker_env(threads)
    say(f"grid {grid}: {jobs} jobs of {threads} thread(s) each")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              preexec_fn=stop_with_parent if sys.platform == "linux" else None)
             for _ in range(jobs)]
    lock = threading.Lock()

    def relay(k: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with lock:
                say(f"[job {k}] {line.rstrip()}")

    relays = [threading.Thread(target=relay, args=(k, p), daemon=True) for k, p in enumerate(procs, 1)]
    for t in relays:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()  # each job keeps its finished epochs; rerunning resumes
        for p in procs:
            p.wait()
        raise
    for t in relays:
        t.join()
    _, specs = plan(grid, budget, overrides, seeds, store)  # a tuned grid's confirmation runs now show
    outcome = GridOutcome(g.name, len(specs), code=next((c for c in EXIT_PRIORITY if c in codes), max(codes)))
    for s in specs:
        summary = store.summary(g.name, s.run_id) or {}
        status = summary.get("status")
        if s.run_id in before:
            outcome.skipped.append(s.run_id)
        elif summary.get("reused_from"):
            outcome.reused.append(s.run_id)
        elif status == "failed":
            outcome.failed.append(s.run_id)
        elif status in FINISHED:
            outcome.trained.append(s.run_id)
            if status == "diverged":
                outcome.diverged.append(s.run_id)
    return outcome


# ---------------------------------------------------------------- Ray

def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def ray_resources(spec: RunSpec, device_kind: str) -> dict[str, float]:
    """What one run asks of Ray: a GPU per device on CUDA, else a CPU per device (one thread per rank)."""
    if device_kind == "cuda":
        return {"num_cpus": spec.devices, "num_gpus": spec.devices}
    return {"num_cpus": spec.devices, "num_gpus": 0}


def ray_train(spec_json: dict, i: int, total: int, results: str, data_dir: str | None, device_kind: str,
              context: dict, checkpoint_seconds: float) -> dict[str, Any]:
    """One Ray task: take the run's lock, train (or resume) it into the shared results folder, release.
    Returns {"state": done|trained|busy, "status", "stop_reason", "error"}."""
    import ray

    from runners.data import load_dataset

    spec = RunSpec.from_json(spec_json)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    store = Store(Path(results))
    outcome = GridOutcome(spec.grid, total)
    data = load_dataset(spec.dataset, Path(data_dir) if data_dir else None)
    reporter = _RecordingReporter()
    state = attempt_run(spec, i, total, store, spec.grid, {spec.dataset: data}, pick_device(device_kind), context,
                     reporter, outcome, Path(data_dir) if data_dir else None,
                     TrainOptions(checkpoint_seconds=checkpoint_seconds))
    result = reporter.result
    return {"state": state, "status": result.status if result else "", "error": result.error if result else "",
            "stop_reason": result.stop_reason if result else ""}


class _RecordingReporter(PlainReporter):
    """Plain lines (Ray relays a task's stdout to the driver) and the run's result for the return value."""

    result: RunResult | None = None

    def end_run(self, result: RunResult) -> None:
        super().end_run(result)
        self.result = result


def run_grid_ray(request: GridRequest, reporter: PlainReporter | None = None, address: str | None = None,
                 command: str | None = None, poll_s: float = 2.0) -> GridOutcome:
    """Every pending run of a grid as a Ray task asking for the run's resources, on the cluster at `address`
    or on a local Ray instance. The results folder must be shared by every node (same path); each node needs
    the package installed and the data cache (--data-dir, $ABLATE_DATA or the default)."""
    ray = _import_ray()
    from runners.data import load_dataset, resolve_data_dir

    r = request
    grid_name, budget, overrides, seeds, data_dir, device = r.grid, r.budget, r.overrides, r.seeds, r.data_dir, r.device
    wait_for_others, options = r.wait_for_others, r.options
    reporter = reporter or PlainReporter()
    grid, specs = plan(grid_name, budget, overrides, seeds)
    store = Store(Path(r.results).resolve())
    store.check_writable()
    datasets = {name: load_dataset(name, data_dir) for name in sorted({s.dataset for s in specs})}
    write_grid_json(store, grid, specs, budget, overrides, datasets, command)
    data_arg = str(resolve_data_dir(data_dir).resolve()) if data_dir else None

    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local instance; its workers must find this package even when it is not installed
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    try:
        kind = _device_kind(device, ray.cluster_resources())
        _check_fits(specs, kind, ray.nodes())
        task = ray.remote(ray_train)
        outcome = GridOutcome(grid.name, len(specs))
        reporter.grid(grid.name, len(specs), sum(store.is_done(grid.name, s.run_id) for s in specs))
        context = {"budget": budget, "overrides": overrides or {}}  # as the local executor: same columns

        def submit(i: int, spec: RunSpec):
            return task.options(**ray_resources(spec, kind), name=f"ablate-{spec.run_id}").remote(
                spec.to_json(), i, len(specs), str(store.root), data_arg, kind, context, options.checkpoint_seconds)

        running = {submit(i, s): (i, s) for i, s in enumerate(specs, 1) if not store.is_done(grid.name, s.run_id)}
        outcome.skipped = [s.run_id for s in specs if store.is_done(grid.name, s.run_id)]
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            i, spec = running.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # the worker died or the task raised: resumable
                msg = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                if "UserError" in str(err):
                    raise UserError(msg.split("UserError: ", 1)[-1]) from None
                res = {"state": "trained", "status": "failed", "stop_reason": "error", "error": msg}
                reporter.end_run(RunResult(spec.run_id, "failed", "error", error=f"run {spec.run_id}: {msg}"))
            if res["state"] == "busy":
                if wait_for_others:
                    time.sleep(poll_s)  # another process holds the run: ask again later
                    running[submit(i, spec)] = (i, spec)
                else:
                    outcome.busy.append(spec.run_id)
                continue
            if res["state"] == "done":
                outcome.skipped.append(spec.run_id)
                continue
            outcome.trained.append(spec.run_id)
            if res["status"] == "failed":
                outcome.failed.append(spec.run_id)
            elif res["status"] == "diverged":
                outcome.diverged.append(spec.run_id)
    finally:
        ray.shutdown()
    store.write_aggregates(grid.name)
    reporter.close()
    return outcome


def _device_kind(device: str, cluster: dict) -> str:
    if device.startswith("cuda"):
        return "cuda"
    if device == "cpu":
        return "cpu"
    return "cuda" if cluster.get("GPU", 0) > 0 else "cpu"


def _check_fits(specs: list[RunSpec], kind: str, nodes: list[dict]) -> None:
    """A run's ranks share one node under Ray: a run larger than every node would wait forever."""
    key = "GPU" if kind == "cuda" else "CPU"
    biggest = max((n.get("Resources", {}).get(key, 0) for n in nodes if n.get("Alive")), default=0)
    need = max(s.devices for s in specs)
    if need > biggest:
        raise UserError(f"a run asks for {need} devices but the largest Ray node has {biggest:g} {key}s; lower "
                        f"`devices` or add a bigger node")
