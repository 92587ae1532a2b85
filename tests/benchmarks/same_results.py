"""Does a refactor change what the suite computes? Train one grid with this tree and with a git revision, each into
an empty folder (same torch, threads, device and data), and compare every run's epochs.csv and weights.

    python -m tests.benchmarks.same_results --rev 6697e91 --grid smoke

Runs are matched by their axis values and seed (a spec field added since the revision changes the run id, not the
run). The wall-clock columns of epochs.csv (seconds, images per second) differ between any two runs; every other
column must be identical, as must each tensor of model.pt. Writes results/bench/same-results-<rev>-<grid>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("epoch_seconds", "images_per_second", "cum_seconds", "eval_seconds", "train_seconds", "wall_seconds")


def train(tree: Path, grid: str, out: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "runners.cli", "run", "--grid", grid, "--out", str(out), "--plain",
                    "--yes"], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)


def runs_by_cell(results: Path, grid: str) -> dict[str, Path]:
    """'axis=value,...,seed=N' -> run folder."""
    cells = {}
    for folder in sorted((results / grid / "runs").iterdir()):
        spec = json.loads((folder / "spec.json").read_text())
        axes = spec["axes"].items() if isinstance(spec["axes"], dict) else spec["axes"]
        cells[",".join(f"{k}={v}" for k, v in sorted(axes)) + f",seed={spec['seed']}"] = folder
    return cells


def compare_run(a: Path, b: Path) -> list[str]:
    """What differs between two runs' epochs.csv (wall-clock columns aside) and weights; [] when nothing does."""
    ea, eb = pd.read_csv(a / "epochs.csv"), pd.read_csv(b / "epochs.csv")
    cols = [c for c in ea.columns if c not in TIMING]
    problems = [f"epochs.csv column {c} only in one" for c in sorted(set(cols) ^ {c for c in eb.columns
                                                                                  if c not in TIMING})]
    for c in (c for c in cols if c in eb.columns):
        if not ea[c].astype(str).equals(eb[c].astype(str)):
            problems.append(f"epochs.csv column {c} differs")
    wa, wb = (torch.load(p / "model.pt", map_location="cpu", weights_only=True) for p in (a, b))
    wa, wb = (w.get("model", w) if isinstance(w, dict) else w for w in (wa, wb))
    for k in sorted(set(wa) | set(wb)):
        if k not in wa or k not in wb or not torch.equal(wa[k], wb[k]):
            problems.append(f"weight {k} differs")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="git revision to compare this tree with")
    p.add_argument("--grid", default="smoke")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = p.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="ablate-same-"))
    base = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base), commit], check=True)
    try:
        train(base, args.grid, tmp / "before", args.threads)
        train(ROOT, args.grid, tmp / "after", args.threads)
        before, after = runs_by_cell(tmp / "before", args.grid), runs_by_cell(tmp / "after", args.grid)
        cells = {c: compare_run(before[c], after[c]) for c in sorted(set(before) & set(after))}
        unmatched = sorted(set(before) ^ set(after))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    record = {"command": "python -m tests.benchmarks.same_results " + " ".join(sys.argv[1:]),
              "date": datetime.now().isoformat(timespec="seconds"), "before": commit, "after": head.strip(),
              "grid": args.grid, "threads": args.threads, "torch": torch.__version__,
              "identical": not unmatched and all(not p for p in cells.values()), "runs compared": len(cells),
              "unmatched runs": unmatched, "differences": {c: p for c, p in cells.items() if p}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"same-results-{commit[:7]}-{args.grid}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("identical", "runs compared", "unmatched runs")}), "->", path)
    sys.exit(0 if record["identical"] else 1)


if __name__ == "__main__":
    main()
