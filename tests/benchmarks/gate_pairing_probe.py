"""Probe of where the gate's noise comes from (run from the repository root; output under results/bench/):
the same check's pairs read two ways, ratio of each process's median call (the gate) against the median of
call-by-call ratios (lockstep calls run at the same moment)."""
import json, statistics, sys
from runners.bench import paired

raw = []
orig = paired.run_pair
def rec(*a, **k):
    out = orig(*a, **k)
    raw.append({s: o["seconds"] for s, o in out.items()})
    return out
paired.run_pair = rec
r = paired.against(paired.PairedConfig(rev="HEAD", cases=paired.machine_cases()[0]), say=lambda _: None)
print(f"check {r.seconds:.0f} s, gate {r.verdict}")
for c in r.cases:
    med = [statistics.median(p["head"][c.case]) / statistics.median(p["base"][c.case]) for p in raw]
    call = [statistics.median(h / b for h, b in zip(p["head"][c.case], p["base"][c.case])) for p in raw]
    a, b = paired.case_result(c.case, med, paired.TOLERANCE), paired.case_result(c.case, call, paired.TOLERANCE)
    print(f"{c.case:34s} medians {a.median:.3f} [{a.lo:.3f}, {a.hi:.3f}] {a.verdict:9s} "
          f"call-by-call {b.median:.3f} [{b.lo:.3f}, {b.hi:.3f}] {b.verdict}")
    print("   pairs (medians):", " ".join(f"{x:.3f}" for x in med))
json.dump(raw, open(sys.argv[1], "w"))
