"""Run `ablate` in a real child process that can be SIGKILLed, without paying torch's import for each child.

A forkserver process imports the CLI (and torch) once; every child is a fork of it that runs `ablate ARGS` exactly
as the console script does (same code, own pid, own exit code), its output going to a log file. A child killed
by SIGKILL, from a fault point inside it (runners/faults.py) or from here, has exit code -9."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

KILLED = -signal.SIGKILL
TIMING = ["epoch_seconds", "images_per_second", "cum_seconds", "wall_seconds", "train_seconds",
          "seconds_to_target", "threads", "host",
          "git_commit", "git_dirty"]  # where the code came from, not what it computed
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        # torch.optim imports torch._dynamo on first use: seconds that every child would pay again
        _ctx.set_forkserver_preload(["runners.cli", "runners.execute", "torch._dynamo", __name__])
    return _ctx


def _child(args: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)  # as in the test process: results are bit-for-bit comparable
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from runners.cli import main
    main(args, prog_name="ablate")


@dataclass
class Child:
    process: multiprocessing.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 180, kill_after: float | None = None) -> "Ran":
        """Wait for the exit (SIGKILL it after `kill_after` seconds, if given)."""
        self.process.join(kill_after if kill_after is not None else timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            assert kill_after is not None, f"ablate did not finish in {timeout} s:\n{self.log.read_text()}"
        return Ran(self.process.exitcode, self.log.read_text())


@dataclass
class Ran:
    code: int
    output: str

    def counts(self) -> dict[str, int]:
        """The numbers of the final line `grid G: N trained, M already done, ...`."""
        m = re.search(r"(\d+) trained, (\d+) already done, (\d+) diverged, (\d+) failed, (\d+) busy", self.output)
        assert m, self.output
        return dict(zip(("trained", "done", "diverged", "failed", "busy"), map(int, m.groups())))


def start(args: list[str], log: Path, fault: str = "", env: dict[str, str] | None = None) -> Child:
    """`ablate ARGS` in a new child; `fault` = "SITE:N[:enospc]" sets $ABLATE_FAULT in it."""
    env = {"ABLATE_GRIDS_DIR": "", **(env or {}), "ABLATE_FAULT": fault}  # nothing leaks in from the forkserver
    p = _context().Process(target=_child, args=(args, env, str(log)))
    p.start()
    return Child(p, Path(log))


def ablate(args: list[str], log: Path, fault: str = "", env: dict[str, str] | None = None,
           timeout: float = 180) -> Ran:
    return start(args, log, fault, env).wait(timeout)


# ---------------------------------------------------------------- what the tests compare

def without_timing(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("run_id", "epoch") if c in df.columns]
    return df.drop(columns=[c for c in TIMING if c in df.columns]).sort_values(keys).reset_index(drop=True)


def assert_same_results(grid_dir: Path, reference: Path) -> None:
    for name in ("runs.csv", "epochs.csv"):
        pd.testing.assert_frame_equal(without_timing(pd.read_csv(grid_dir / name)),
                                      without_timing(pd.read_csv(reference / name)))
    for ref in (reference / "runs").glob("*/model.pt"):
        a = torch.load(ref, weights_only=True)
        b = torch.load(grid_dir / "runs" / ref.parent.name / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), ref.parent.name  # bit for bit
    leftovers = [p.name for p in grid_dir.rglob(".*tmp*") if not p.name.startswith(".grid.json")]
    assert not leftovers  # what killed writers left behind is cleaned up


def finished_runs(grid_dir: Path) -> dict[str, tuple[int, int]]:
    """run id -> (inode, mtime) of the summary.json of every finished or diverged run."""
    out = {}
    for path in (grid_dir / "runs").glob("*/summary.json"):
        if json.loads(path.read_text())["status"] in ("finished", "diverged"):
            st = path.stat()
            out[path.parent.name] = (st.st_ino, st.st_mtime_ns)
    return out


def snapshot(*roots: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under the roots: size, mtime and bytes (results and caches in the tests are small)."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns, path.read_bytes())
    return out


def epochs_trained(output: str, run_id: str) -> list[int]:
    """The epochs the output shows a run training: the `epoch N:` lines under its `] run <id>` line."""
    section = re.split(r"\n(?:\[|grid |skip )", output.split(f"] run {run_id}", 1)[1], maxsplit=1)[0]
    return [int(n) for n in re.findall(r"^  epoch (\d+):", section, re.M)]


def wait_for(predicate, timeout: float = 120, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False



def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes the run lock at `path` and holds it for `seconds` (returns once it holds it)."""
    code = (f"from runners.locks import RunLock; from pathlib import Path; import time; "
            f"assert RunLock(Path({str(path)!r})).acquire(); print('held', flush=True); time.sleep({seconds})")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert holder.stdout.readline().strip() == "held"
    return holder
