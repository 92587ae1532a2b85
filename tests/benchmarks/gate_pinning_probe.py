"""Probe of where the gate's noise comes from (run from the repository root; output under results/bench/):
the same check with each worker pinned to one CPU, the first started on CPU 0 and the second on CPU 1
(ABBA order swaps head and base between them every pair); read as the gate reads it, and as the geometric mean of
each two consecutive pairs (head once on each CPU), where a per-CPU speed factor cancels."""
import itertools, json, math, os, statistics, sys
from runners.bench import paired

raw, count = [], itertools.count()
orig_start, orig_pair = paired.start_worker, paired.run_pair
def start(tree, job):
    proc = orig_start(tree, job)
    os.sched_setaffinity(proc.pid, {next(count) % 2})
    return proc
def rec(*a, **k):
    out = orig_pair(*a, **k)
    raw.append({s: o["seconds"] for s, o in out.items()})
    return out
paired.start_worker, paired.run_pair = start, rec
r = paired.against(paired.PairedConfig(rev="HEAD", cases=paired.machine_cases()[0]), say=lambda _: None)
print(f"check {r.seconds:.0f} s, gate {r.verdict}")
for c in r.cases:
    med = [statistics.median(p["head"][c.case]) / statistics.median(p["base"][c.case]) for p in raw]
    two = [math.sqrt(med[i] * med[i + 1]) for i in range(0, len(med) - 1, 2)]
    a, b = paired.case_result(c.case, med, paired.TOLERANCE), paired.case_result(c.case, two, paired.TOLERANCE)
    print(f"{c.case:34s} pinned {a.median:.3f} [{a.lo:.3f}, {a.hi:.3f}] {a.verdict:9s} "
          f"swapped pairs (8) {b.median:.3f} [{b.lo:.3f}, {b.hi:.3f}] {b.verdict}")
    print("   pairs:", " ".join(f"{x:.3f}" for x in med))
json.dump(raw, open(sys.argv[1], "w"))
