"""Probe of whether steadier memory per process narrows the gate's intervals (run from the repository root):
checks of the unchanged tree against HEAD, rotating through environments the workers inherit, and per case the
spread of the pair log-ratios and the interval each check read.

- default: as the gate runs;
- torch-thp: THP_MEM_ALLOC_ENABLE=1, PyTorch's CPU allocator backs large tensors with transparent huge pages
  (the kernel's THP setting here is madvise: without it, whether a buffer gets huge pages is up to the moment);
- glibc-thp: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc's malloc asks for huge pages for everything, and a fixed
  mmap threshold, so large buffers are placed the same way in every process whatever freed before them.

Usage: python tests/benchmarks/gate_memory_probe.py ROUNDS OUT.json (output: results/bench/gate-memory-probe-*.txt)"""
import json, math, os, statistics, sys
from unittest import mock

from runners.bench import paired

VARIANTS = {
    "default": {},
    "torch-thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc-thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"},
}


def check(env: dict[str, str]) -> paired.PairedResult:
    with mock.patch.dict(os.environ, env):  # the workers inherit it
        return paired.against(paired.PairedConfig(rev="HEAD", cases=paired.machine_cases()[0]), say=lambda _: None)


def main(rounds: int, out: str) -> None:
    rows = []
    for i in range(rounds):
        for name, env in VARIANTS.items():
            r = check(env)
            print(f"round {i + 1} {name:10s} check {r.seconds:.0f} s, gate {r.verdict}", flush=True)
            for c in r.cases:
                sd = statistics.stdev(math.log(x) for x in c.ratios)
                rows.append({"round": i + 1, "variant": name, "case": c.case, "median": c.median, "lo": c.lo,
                             "hi": c.hi, "verdict": c.verdict, "log_sd": sd, "seconds": r.seconds})
                print(f"   {c.case:34s} {c.median:.3f} [{c.lo:.3f}, {c.hi:.3f}] sd {sd:.3f} {c.verdict}", flush=True)
            json.dump(rows, open(out, "w"), indent=1)
    print("\nper variant: median log-ratio sd over its checks, per case; ok cases / all")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        ok = sum(r["verdict"] == "ok" for r in mine)
        secs = statistics.median(r["seconds"] for r in mine)
        print(f"{name:10s} ok {ok}/{len(mine)}, check {secs:.0f} s (median)")
        for c in cases:
            sds = [r["log_sd"] for r in mine if r["case"] == c]
            his = [r["hi"] for r in mine if r["case"] == c]
            print(f"   {c:34s} sd {statistics.median(sds):.3f}  hi max {max(his):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
