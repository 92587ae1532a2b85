"""The speed regression gate, inside the normal test command (about 10-30 s on the shared 2-core CPU).

The gate cases (runners.bench.GATE_CASES: small training steps and the pipeline) are timed interleaved with an
fp32 GEMM, each normalised by the GEMM rate from the same run (runners.bench.GATE_UNIT), and compared with the
committed results/bench/baseline-cpu.json: a case more than the baseline's tolerance (35 %) below, in this
measurement and in one more taken on failure, fails (as `ablate bench --compare` decides).
Refresh the baseline after an intended change with `ablate bench --update-baseline`.

The same run also times two deliberately slowed copies of a case, to show on measured numbers that the rule
trips: a 0.2 s stall before every batch, and the bf16 case run in fp32 (autocast lost)."""
import dataclasses

import pytest

from runners.bench import GATE_CASES, compare_to_baseline, default_baseline, load_baseline, measure_gate, verdict

VICTIM = GATE_CASES[0]  # alexnet-w0.25-bf16
INJECTED = {
    "stall": dataclasses.replace(VICTIM, name=f"{VICTIM.name} +0.2 s stall per batch", sleep_per_batch=0.2),
    "fp32": dataclasses.replace(VICTIM, name=f"{VICTIM.name} run in fp32", precision="fp32"),
}


@pytest.fixture(scope="module")
def baseline() -> dict:
    return load_baseline(default_baseline("cpu"))


@pytest.fixture(scope="module")
def measured():
    return measure_gate([*GATE_CASES, *INJECTED.values()], repeats=5)


def test_no_regression_against_the_committed_baseline(measured):
    v, _ = compare_to_baseline(default_baseline("cpu"), first=measured)  # re-measures once before failing
    assert v.ok, "\n".join(v.lines())


@pytest.mark.parametrize("kind", INJECTED)
def test_gate_trips_on_an_injected_slowdown(measured, baseline, kind):
    slowed = measured.normalised[INJECTED[kind].name]
    # the verdict rule on the slowed case against the unslowed one, both timed in this run: always comparable
    same_run = verdict({VICTIM.name: slowed}, {VICTIM.name: measured.normalised[VICTIM.name]}, baseline["tolerance"])
    assert not same_run.ok, "\n".join(same_run.lines())
    # and as `ablate bench --compare` sees it, against the committed baseline
    v = verdict({**measured.normalised, VICTIM.name: slowed}, baseline["cases"], baseline["tolerance"])
    assert VICTIM.name in [c.case for c in v.cases if not c.ok], "\n".join(v.lines())
