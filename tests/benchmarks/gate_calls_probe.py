"""Probe of the gate's per-case noise (run from a checkout's root; output committed under results/bench/): one
check of the tree against itself, 16 pairs, one look, and per case the spread of its pair log-ratios, beside every
pair's ratio. Run on each variant of the worker being compared, back to back on an idle machine.

    python tests/benchmarks/gate_calls_probe.py
"""
import math
import statistics
from pathlib import Path

from runners.bench import paired

tree = Path(paired.__file__).resolve().parents[2]
cfg = paired.PairedConfig(cases=paired.machine_cases()[0], recheck_pairs=0)
r = paired.compare_trees(cfg, tree, tree, say=lambda _: None)
print(f"check {r.seconds:.0f} s, gate {r.verdict} (one look of {cfg.pairs} pairs, the tree against itself)")
for c in r.cases:
    sd = statistics.stdev(math.log(x) for x in c.ratios)
    print(f"  {c.case:<32} {c.median:.3f} [{c.lo:.3f}, {c.hi:.3f}] sd {sd:.3f} {c.verdict:9s} | "
          + " ".join(f"{x:.2f}" for x in c.ratios))
