"""The regression gate: this tree (head) against a git revision (base), on one machine, in one run.

Rates measured on different machines, or hours apart on one shared machine, are not comparable; rates measured
minutes apart on one machine, in alternating fresh processes, are (asv's `continuous`, pyperf's `compare_to`). So
the gate checks REV out into a temporary git worktree and runs worker.py for head and base in pairs of fresh
processes: side by side, one per core, where the machine has two, and in lockstep (each timed call starts in both
at once, so both see the same moment's load, which cancels in their ratio), else one after the other; either way
in ABBA order (head first, then base first, ...). Each pair gives one head/base time ratio per case; a case's
verdict reads the Hodges-Lehmann centre of the log ratios and its exact Wilcoxon signed-rank interval (robust to
the odd disturbed process, no normality assumed):

- slower: the whole interval lies above 1 + tolerance (slower than the tolerance, with confidence): the gate fails;
- ok: it does not, and its top lies below 1 + 2 x tolerance: a slowdown of twice the tolerance (10% by default,
  the smallest the gate promises to catch) is excluded with confidence;
- undecided: neither: the machine was too noisy to tell ("undecided, re-run"), never reported as a pass.

Two looks, both planned: `pairs` pairs of every case, then `recheck_pairs` more of only the cases still undecided,
decided on all their pairs; none when the first look already found a case slower (the gate fails either way, and a
look not taken can add no false alarm). Each look reads its interval at CONFIDENCE (94%, so each one-sided
decision at 97%: by Bonferroni the two looks together err at most 6% per side, and by simulation about 4.5% at
the boundary, Pocock's rule for two equal looks). Looking after every pair instead would inflate the false alarms
without bound.

A fresh process per measurement also samples what a single process fixes once (memory layout, thread placement).
Within a process, each case's timed calls are taken round robin over the cases (a burst of load slows one call of
several cases, not every call of one) and a case reads their median: of three, of nine for the input pipeline,
whose short memory-bound calls vary most from call to call.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ablations.errors import UserError
from runners.bench import worker

CASES = worker.default_cases(native_bf16=True)
WORKER = Path(worker.__file__).resolve()
LAUNCH = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
CONFIDENCE = 0.94  # two-sided, at each of the two looks: each one-sided decision (slower / ok) at 97 %
TOLERANCE = 0.05
EXIT_SLOWER, EXIT_UNDECIDED = 3, 5


@dataclass(frozen=True)
class PairedConfig:
    rev: str = "HEAD~1"
    tolerance: float = TOLERANCE  # a case may be this much slower (time ratio 1 + tolerance) and pass
    cases: tuple[str, ...] = CASES
    pairs: int = 16  # the first look, over every case
    recheck_pairs: int = 16  # the second look, over the cases the first left undecided (0: one look only)
    concurrent: bool | None = None  # head and base side by side (None: when the machine has 2 x threads cores)
    call_seconds: float = 0.06  # work per timed call, sized once by a calibration process
    calls: int = 3  # timed calls per case per process, which reads their median: mostly the spread between
    # processes limits the interval, but the 10-crop evaluation also varies from call to call, and its first
    # call after the warm-up runs slow; a median of three drops that call
    pipeline_calls: int = 9  # the input pipeline's short calls vary most from call to call, even timed within one
    # process (results/bench/gate-calls-probe-*.txt), and cost least: a median of nine
    threads: int = 1  # one thread: steadier than two on a shared 2-core machine
    stall: float = 0.0  # inject a slowdown of this fraction into head (busy-wait after each timed call)


@dataclass(frozen=True)
class CaseResult:
    case: str
    ratios: tuple[float, ...]  # head / base seconds per unit of work, one per pair
    median: float
    lo: float
    hi: float
    verdict: str  # slower | ok | undecided


@dataclass(frozen=True)
class PairedResult:
    rev: str
    base_commit: str
    tolerance: float
    cases: tuple[CaseResult, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why it could not be compared
    seconds: float = 0.0
    stall: float = 0.0
    pairing: str = ""  # side by side | one after the other
    rechecked: tuple[str, ...] = ()  # the cases the first look left undecided, measured again

    @property
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.cases}
        if "slower" in verdicts:
            return "slower"
        return "ok" if verdicts == {"ok"} else "undecided"

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "slower": EXIT_SLOWER, "undecided": EXIT_UNDECIDED}[self.verdict]


def signed_rank_below(n: int) -> list[float]:
    """P(T <= t) for t = 0 .. n(n+1)/2, T the Wilcoxon signed-rank statistic of n pairs under no difference:
    the count of subsets of the ranks 1..n summing to each t, over 2^n."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    for rank in range(1, n + 1):
        for s in range(len(counts) - 1, rank - 1, -1):
            counts[s] += counts[s - rank]
    total, below, out = 2 ** n, 0, []
    for c in counts:
        below += c
        out.append(below / total)
    return out


def walsh_averages(xs: list[float]) -> list[float]:
    return sorted((xs[i] + xs[j]) / 2 for i in range(len(xs)) for j in range(i, len(xs)))


def pseudo_median_interval(xs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate (the median of the Walsh averages) with its exact Wilcoxon signed-rank interval
    [W_(k), W_(M+1-k)], k the largest with 1 - 2 P(T <= k - 1) >= confidence. Robust to the odd disturbed process
    like a median, nearly as tight as a t-interval (95 % efficiency under normal noise); assumes the pair
    differences are symmetric about their centre, which alternating the order (ABBA) encourages. (nan, nan) for
    the interval when even the extreme Walsh averages fall short of `confidence`."""
    walsh = walsh_averages(xs)
    centre = statistics.median(walsh) if walsh else float("nan")
    below = signed_rank_below(len(xs))
    k = 0
    while k < len(walsh) // 2 and 1 - 2 * below[k] >= confidence:
        k += 1
    if k == 0:
        return centre, float("nan"), float("nan")
    return centre, walsh[k - 1], walsh[len(walsh) - k]


def decide(lo: float, hi: float, tolerance: float) -> str:
    """slower: the interval lies above 1 + tolerance (slower than the tolerance, with confidence); ok: it does not,
    and it excludes a slowdown of twice the tolerance (the smallest the gate promises to catch); undecided:
    neither, the measurement too noisy to tell (or no interval)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    return "slower" if lo > 1.0 + tolerance else "ok" if hi < 1.0 + 2 * tolerance else "undecided"


def case_result(case: str, ratios: list[float], tolerance: float) -> CaseResult:
    """The pseudo-median of the log ratios and its interval, back on the ratio scale (a ratio's natural scale:
    1.1 and 1/1.1 are equally far from 1)."""
    centre, lo, hi = (math.exp(v) for v in pseudo_median_interval([math.log(r) for r in ratios]))
    return CaseResult(case, tuple(ratios), centre, lo, hi, decide(lo, hi, tolerance))


def git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise UserError("--against needs git, which is not installed here") from None
    except subprocess.CalledProcessError as err:
        raise UserError(f"git {' '.join(args)} failed: {(err.stderr or err.stdout).strip().splitlines()[-1:]}"
                        ) from None
    return out.stdout.strip()


def head_tree() -> Path:
    """The checkout this suite runs from: the tree the gate measures as head (uncommitted changes included)."""
    return WORKER.parents[2]


def resolve(root: Path, rev: str) -> str:
    try:
        inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                                text=True)
    except FileNotFoundError:
        raise UserError("--against needs git, which is not installed here") from None
    if inside.returncode != 0 or Path(inside.stdout.strip()).resolve() != root.resolve():
        raise UserError(f"--against needs a git checkout of the suite, and {root} is not one: clone the "
                        "repository and install it with `pip install -e .`")
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except UserError:
        raise UserError(f"--against: {rev!r} is not a commit of {root} (try HEAD~1, a branch or a hash)") from None


def spawn(argv: list[str]) -> subprocess.Popen:
    """A worker process; its errors go to a file, not a pipe, so a chatty one cannot block on a full pipe while
    the gate waits on its stdout."""
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
                            cwd=tempfile.gettempdir())
    proc.errors = errors  # type: ignore[attr-defined]
    return proc


def start_worker(tree: Path, job: dict) -> subprocess.Popen:
    return spawn([sys.executable, "-c", LAUNCH, str(WORKER), json.dumps({"tree": str(tree), **job})])


def finish_worker(proc: subprocess.Popen, first: str = "") -> dict:
    """The worker's result line; `first` is what lockstep already read of its output."""
    proc.stdin.close()
    out = first + proc.stdout.read()
    proc.wait()
    proc.errors.seek(0)
    err = proc.errors.read()
    proc.errors.close()
    if proc.returncode != 0:
        raise RuntimeError((err.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.strip().splitlines()[-1])


def run_worker(tree: Path, job: dict) -> dict:
    return finish_worker(start_worker(tree, job))


def next_ready(proc: subprocess.Popen, kept: list[str]) -> bool:
    """Read a worker's output up to its next "ready" (True) or to its end (False), keeping every other line."""
    for line in iter(proc.stdout.readline, ""):
        if line == "ready\n":
            return True
        kept.append(line)
    return False


def lockstep(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Release the side-by-side workers' timed calls together: each says "ready" before a timed call, and once
    both have, both are told to go. Head and base then time the same case under the same moment's load (free
    running, they drift apart, and a memory-bound pipeline case of one meets a compute-bound step of the other).
    Returns what else each printed so far (its result, once it has ended); when one ends or dies, the other goes
    on alone (finish_worker closes its input)."""
    kept: dict[str, list[str]] = {side: [] for side in procs}
    while all(next_ready(proc, kept[side]) for side, proc in procs.items()):
        for proc in procs.values():
            try:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            except OSError:  # it died between its ready and our go: finish_worker reports why
                pass
    return {side: "".join(lines) for side, lines in kept.items()}


def run_pair(trees: dict[str, Path], jobs: dict[str, dict], order: tuple[str, str], concurrent: bool) -> dict:
    """One head and one base measurement: side by side on two cores, in lockstep (both see the same moment's
    load, which then cancels in their ratio), or one after the other; `order` alternates who starts first."""
    if not concurrent:
        return {side: run_worker(trees[side], jobs[side]) for side in order}
    procs = {side: start_worker(trees[side], {**jobs[side], "lockstep": True}) for side in order}
    first = lockstep(procs)
    return {side: finish_worker(proc, first[side]) for side, proc in procs.items()}


def usable_cases(cfg: PairedConfig, trees: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The cases that build in both trees: one case at a time is tried in each, so a case the base revision cannot
    build (an API it lacks) is named and left out rather than failing the gate."""
    usable, skipped = [], {}
    for case in cfg.cases:
        for side, tree in trees.items():
            try:
                run_worker(tree, {"cases": [case], "units": {}, "threads": cfg.threads, "stall": 0})
            except RuntimeError as err:
                skipped[case] = f"does not run in {side}: {err}"
                break
        else:
            usable.append(case)
    return usable, skipped


def calibrate(cfg: PairedConfig, trees: dict[str, Path], concurrent: bool) -> dict[str, dict]:
    """One untimed pass of every case in each tree: head's sizes each case's timed call, base's shows that every
    case builds there. Side by side where the pairs will be (half the wait, and under the same load); a
    RuntimeError when either fails, once both have ended."""
    job = {"cases": list(cfg.cases), "units": {}, "threads": cfg.threads, "stall": 0}
    if not concurrent:
        return {side: run_worker(tree, job) for side, tree in trees.items()}
    procs = {side: start_worker(tree, job) for side, tree in trees.items()}
    out, failed = {}, None
    for side, proc in procs.items():
        try:
            out[side] = finish_worker(proc)
        except RuntimeError as err:
            failed = failed or err
    if failed:
        raise failed
    return out


def units_for(unit_seconds: dict[str, float], call_seconds: float) -> dict[str, int]:
    return {c: max(1, math.ceil(call_seconds / s)) if s > 0 else 1 for c, s in unit_seconds.items()}


def compare_trees(cfg: PairedConfig, head: Path, base: Path, say: Callable[[str], None] = print,
                  rev: str = "", base_commit: str = "") -> PairedResult:
    """cfg.pairs pairs of head and base workers in ABBA order over every case, then cfg.recheck_pairs more over the
    cases still undecided; one verdict per case."""
    start = time.perf_counter()
    trees = {"head": head, "base": base}
    concurrent = cfg.concurrent if cfg.concurrent is not None else (os.cpu_count() or 1) >= 2 * cfg.threads
    try:
        calib = calibrate(cfg, trees, concurrent)["head"]
        cases, skipped = list(cfg.cases), {}
    except RuntimeError:
        cases, skipped = usable_cases(cfg, trees)
        if not cases:
            raise UserError("no gate case runs in both trees: " + "; ".join(f"{c} {w}" for c, w in skipped.items())
                            ) from None
        calib = run_worker(head, {"cases": cases, "units": {}, "threads": cfg.threads, "stall": 0})
    units = units_for(calib["unit_seconds"], cfg.call_seconds)
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    measure_pairs(cfg, trees, cases, units, concurrent, ratios, cfg.pairs, lambda i: say(f"pair {i}/{cfg.pairs}"))
    results = {c: case_result(c, ratios[c], cfg.tolerance) for c in cases}
    failed = [c for c in cases if results[c].verdict == "slower"]  # the gate fails whatever a second look says
    again = [c for c in cases if results[c].verdict == "undecided"] if cfg.recheck_pairs and not failed else []
    if failed and any(r.verdict == "undecided" for r in results.values()):
        say(f"slower with confidence at the first look: {', '.join(failed)}; no second look")
    if again:
        say(f"undecided: {', '.join(again)}; measuring those {cfg.recheck_pairs} pairs more")
        measure_pairs(cfg, trees, again, units, concurrent, ratios, cfg.recheck_pairs,
                      lambda i: say(f"recheck pair {i}/{cfg.recheck_pairs}"))
        results.update({c: case_result(c, ratios[c], cfg.tolerance) for c in again})
    return PairedResult(rev, base_commit, cfg.tolerance, tuple(results[c] for c in cases), skipped,
                        time.perf_counter() - start, cfg.stall,
                        "side by side" if concurrent else "one after the other", tuple(again))


def measure_pairs(cfg: PairedConfig, trees: dict[str, Path], cases: list[str], units: dict[str, int],
                  concurrent: bool, ratios: dict[str, list[float]], n: int, progress: Callable[[int], None]) -> None:
    """n pairs of head and base workers over `cases` in ABBA order; each pair's head/base time ratio per case is
    appended to ratios[case]."""
    calls = {c: cfg.pipeline_calls if worker.CASES.get(c, ("",))[0] == "pipeline" else cfg.calls for c in cases}
    jobs = {side: {"cases": cases, "units": {c: units[c] for c in cases}, "calls": calls,
                   "threads": cfg.threads, "stall": cfg.stall if side == "head" else 0.0} for side in trees}
    for i in range(n):
        order = ("head", "base") if i % 2 == 0 else ("base", "head")
        read = {side: out["seconds"] for side, out in run_pair(trees, jobs, order, concurrent).items()}
        for c in cases:
            ratios[c].append(statistics.median(read["head"][c]) / statistics.median(read["base"][c]))
        progress(i + 1)


def against(cfg: PairedConfig, say: Callable[[str], None] = print) -> PairedResult:
    """Check cfg.rev out into a temporary worktree, compare this tree with it, and remove the worktree."""
    if not 0 < cfg.tolerance < 1:
        raise UserError(f"--tolerance for --against is a fraction in (0, 1), got {cfg.tolerance}")
    unknown = [c for c in cfg.cases if c not in worker.CASES]
    if unknown:
        raise UserError(f"unknown gate case(s) {', '.join(unknown)}; known: {', '.join(worker.CASES)}")
    head = head_tree()
    commit = resolve(head, cfg.rev)
    tmp = Path(tempfile.mkdtemp(prefix="ablate-against-"))
    base = tmp / "base"
    git(head, "worktree", "add", "--detach", "--quiet", str(base), commit)
    try:
        say(f"head: {head} (working tree); base: {cfg.rev} = {commit[:12]} in {base}")
        return compare_trees(cfg, head, base, say, cfg.rev, commit)
    finally:
        subprocess.run(["git", "-C", str(head), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(head), "worktree", "prune"], capture_output=True)


def machine_cases() -> tuple[tuple[str, ...], str]:
    """The cases for this CPU and, when they leave bf16 out, one line that says why."""
    from runners.devices import EMULATED_BF16, native_bf16
    if native_bf16("cpu"):
        return CASES, ""
    return worker.default_cases(native_bf16=False), f"{EMULATED_BF16}: the gate times the fp32 forms of its cases"


def result_lines(r: PairedResult) -> list[str]:
    lines = [f"{'case':<34} {'head/base time':>14}  {format(CONFIDENCE, '.0%') + ' interval':>17}  pairs  verdict"]
    for c in r.cases:
        lines.append(f"{c.case:<34} {c.median:14.3f}  [{c.lo:6.3f}, {c.hi:6.3f}]  {len(c.ratios):5d}  {c.verdict}")
    lines += [f"{case:<34} not compared: {why}" for case, why in r.skipped.items()]
    reading = {"ok": "ok: no case is slower than the tolerance",
               "slower": "REGRESSION: a case is slower than the tolerance, with confidence",
               "undecided": "undecided, re-run: the machine was too noisy to tell for some case"}[r.verdict]
    lines.append(f"gate against {r.rev} ({r.base_commit[:12]}): {reading} (tolerance +{r.tolerance:.0%} time; "
                 f"{min((len(c.ratios) for c in r.cases), default=0)} pairs {r.pairing}"
                 f"{f', {len(r.rechecked)} undecided case(s) rechecked' if r.rechecked else ''}, {r.seconds:.0f} s"
                 f"{'; injected slowdown ' + format(r.stall, '.0%') if r.stall else ''})")
    return lines
