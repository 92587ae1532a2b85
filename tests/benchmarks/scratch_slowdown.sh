#!/usr/bin/env bash
# The gate's acceptance check: a deliberate 15% slowdown of the input pipeline, committed on a scratch branch in a
# temporary worktree, must fail `ablate bench --against` its parent (exit 3). Prints the gate's table; leaves no
# branch or worktree behind.   bash tests/benchmarks/scratch_slowdown.sh [> results/bench/scratch-slowdown-<cpu>.txt]
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
tree="$(mktemp -d)/scratch"
git -C "$root" worktree add -q -B scratch-slow15 "$tree" HEAD || exit 1
cd "$tree" || exit 1
python - <<'PY'
p = "runners/augment.py"; s = open(p).read()
s = s.replace("def augment(x: torch.Tensor,", "def _augment(x: torch.Tensor,", 1)
s += '''

def augment(*args, **kw):
    """Scratch branch only: the pipeline made 15% slower on purpose (a busy-wait after each call)."""
    import time
    t0 = time.perf_counter()
    out = _augment(*args, **kw)
    end = time.perf_counter() + 0.15 * (time.perf_counter() - t0)
    while time.perf_counter() < end:
        pass
    return out
'''
open(p, "w").write(s)
PY
git -c user.email=scratch@localhost -c user.name=scratch commit -qam "scratch: the input pipeline made 15% slower on purpose"
echo "processor: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) CPUs, torch CPU capability" \
     "$(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); $(date -u +%FT%TZ)"
python -m runners.cli bench --against HEAD~1 2>/dev/null
rc=$?
echo "gate exit code: $rc (3 = the slowdown was caught)"
cd "$root" && git worktree remove --force "$tree" && git branch -D scratch-slow15 >/dev/null
exit $([ "$rc" -eq 3 ] && echo 0 || echo 1)
