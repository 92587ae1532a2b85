"""The paired gate's power on this machine: how often it catches an injected slowdown, how often an unchanged tree
passes, and how long one check takes. A benchmark, not a test: run it on a quiet machine and commit its output.

    python -m tests.benchmarks.gate_power --trials 20 --slowdown 0.10
    python -m tests.benchmarks.gate_power --trials 20 --slowdown 0.10 --resume   # finish an interrupted study

Each trial is one full `ablate bench --against HEAD` check (its own worktree, calibration and pairs), alternately
of the unchanged tree and of the tree with every timed call made `slowdown` slower (a busy-wait of that fraction
of the call, PairedConfig.stall). Writes results/bench/gate-power-<processor>-<instruction set>.csv (one row per
trial and case) and a .json summary beside it: the gate's verdicts, each case's own verdicts (a real slowdown may
hit one case only), and the wall time of a check.
"""
from __future__ import annotations

import argparse
import statistics
from datetime import datetime
from pathlib import Path

import pandas as pd

from runners.bench import paired
from runners.bench.baseline import here_key
from runners.store import atomic_write_json
from runners.devices import device_name, pick_device


def trial_rows(trial: int, kind: str, r: paired.PairedResult) -> list[dict]:
    return [{"trial": trial, "tree": kind, "stall": r.stall, "gate": r.verdict, "seconds": r.seconds,
             "pairing": r.pairing, "rechecked": c.case in r.rechecked, "case": c.case, "ratio": c.median,
             "lo": c.lo, "hi": c.hi, "verdict": c.verdict,
             "pair_ratios": " ".join(f"{x:.4f}" for x in c.ratios)}  # in pair order: where the noise came from
            for c in r.cases]


def summary(rows: pd.DataFrame, slowdown: float, tolerance: float) -> dict:
    checks = rows.drop_duplicates(["trial", "tree"])
    by_tree = {k: g for k, g in checks.groupby("tree")}
    same, slowed = by_tree.get("unchanged", checks[:0]), by_tree.get("slowed", checks[:0])
    per_case = {}
    for case, g in rows.groupby("case", sort=False):
        s, u = g[g.tree == "slowed"], g[g.tree == "unchanged"]
        per_case[case] = {"caught": f"{(s.verdict == 'slower').sum()} of {len(s)}",
                          "passed unchanged": f"{(u.verdict == 'ok').sum()} of {len(u)}",
                          "false alarms": f"{(u.verdict == 'slower').sum()} of {len(u)}"}
    return {
        "command": f"python -m tests.benchmarks.gate_power --trials {len(same)} --slowdown {slowdown}",
        "device_name": device_name(pick_device("cpu")), "date": datetime.now().isoformat(timespec="seconds"),
        "tolerance": tolerance, "slowdown": slowdown, "pairs": paired.PairedConfig().pairs,
        "recheck pairs": paired.PairedConfig().recheck_pairs, "confidence per look": paired.CONFIDENCE,
        "timed calls per process": {"pipeline": paired.PairedConfig().pipeline_calls,
                                    "other cases": paired.PairedConfig().calls},
        "checks with a recheck": int(rows.groupby(["trial", "tree"]).rechecked.any().sum())
        if "rechecked" in rows else 0,
        "caught": f"{(slowed.gate == 'slower').sum()} of {len(slowed)}",
        "passed unchanged": f"{(same.gate == 'ok').sum()} of {len(same)}",
        "false alarms": f"{(same.gate == 'slower').sum()} of {len(same)}",
        "undecided": {"unchanged": int((same.gate == "undecided").sum()),
                      "slowed": int((slowed.gate == "undecided").sum())},
        "check seconds": {"median": statistics.median(checks.seconds), "max": float(checks.seconds.max())},
        "per case": per_case,
    }


def pending_checks(done: set[tuple[int, str]], trials: int) -> list[tuple[int, str]]:
    """The checks still to run, in the study's order (unchanged then slowed, trial by trial): `done` holds the
    (trial, tree) pairs an earlier, interrupted study already measured, so `--resume` adds to it, never repeats."""
    return [(t, kind) for t in range(trials) for kind in ("unchanged", "slowed") if (t, kind) not in done]


def earlier_rows(csv_path: Path, slowdown: float, cases: tuple[str, ...]) -> list[dict]:
    """The rows of an interrupted study of the same cases at the same slowdown; anything else is another study."""
    if not csv_path.exists():
        return []
    old = pd.read_csv(csv_path, keep_default_na=False)
    stalls = set(old.loc[old.tree == "slowed", "stall"])
    if stalls and stalls != {slowdown}:
        raise SystemExit(f"{csv_path} measured a slowdown of {sorted(stalls)}, not {slowdown}: "
                         f"resume with --slowdown {sorted(stalls)[0]}, or move that file away to start afresh")
    if set(old.case) != set(cases):
        raise SystemExit(f"{csv_path} timed other cases than the gate times here ({', '.join(sorted(set(old.case)))}): "
                         f"move that file away to start afresh")
    return old.to_dict("records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="checks of each tree (unchanged, slowed)")
    ap.add_argument("--slowdown", type=float, default=0.10)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the checks this processor's CSV already holds and run only the missing ones")
    args = ap.parse_args()
    name = f"gate-power-{here_key('cpu')[1]}"  # model and instruction set: two EPYCs differ
    csv_path, json_path = args.out / f"{name}.csv", args.out / f"{name}.json"
    cases, why = paired.machine_cases()  # what `ablate bench --against` times here: the fp32 forms without native bf16
    if why:
        print(why)
    rows = earlier_rows(csv_path, args.slowdown, cases) if args.resume else []
    todo = pending_checks({(int(r["trial"]), r["tree"]) for r in rows}, args.trials)
    if rows:
        print(f"resuming {csv_path}: {2 * args.trials - len(todo)} checks kept, {len(todo)} to run")
    for t, kind in todo:
        stall = args.slowdown if kind == "slowed" else 0.0
        r = paired.against(paired.PairedConfig(rev="HEAD", cases=cases, stall=stall), say=lambda _: None)
        rows += trial_rows(t, kind, r)
        print(f"trial {t + 1}/{args.trials} {kind}: {r.verdict} ({r.seconds:.0f} s)", flush=True)
        table = pd.DataFrame(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv_path, index=False)  # after every check: an interrupted study keeps what it measured
        atomic_write_json(json_path, summary(table, args.slowdown, paired.TOLERANCE))
    print(json_path.read_text())


if __name__ == "__main__":
    main()
