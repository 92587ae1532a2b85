"""The timing harness and the small pure functions every bench row is computed with.

Timing follows STYLE habit 9: warm-up calls first, the device synchronised before every clock read; workloads are
timed interleaved (A B C, B C A, ...) and reported as medians, because these machines are shared: absolute numbers
drift with the neighbours' load, ratios measured side by side hold."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

# ---------------------------------------------------------------------------------------------------------------
# Pure maths


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is not positive (a ratio to nothing is not 0 or inf)."""
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return float("nan")
    return a / b


def achieved_flops(images_per_s: float, flops_per_image: float) -> float:
    return images_per_s * flops_per_image


def efficiency(images_per_s: float, flops_per_image: float, ceiling_flops: float) -> float:
    """Fraction of the measured GEMM ceiling the training (or eval) step achieves: images/s x FLOPs/image / ceiling."""
    return ratio(achieved_flops(images_per_s, flops_per_image), ceiling_flops)


def normalised(images_per_s: float, ceiling_flops: float) -> float:
    """images/s per TFLOP/s of the machine's GEMM rate, measured in the same run: the gate's unit."""
    return ratio(images_per_s, ceiling_flops / 1e12)


def overhead(loop_seconds: float, bare_seconds: float) -> float:
    """Share of the loop's wall time not spent in the bare work: 1 - bare / loop."""
    return 1.0 - ratio(bare_seconds, loop_seconds)




# ---------------------------------------------------------------------------------------------------------------
# Timing harness


def sync(device: torch.device) -> None:
    """Wait for queued device work; CUDA kernels run asynchronously, so a clock read without this times nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def using_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (None: leave them), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Workload:
    """One thing to time: `run()` does `items` units of work (images, or FLOPs for a GEMM) on `threads` threads."""

    name: str
    section: str  # ceiling | reference | alexnet | convnet4 | eval | kernels | pipeline | loop
    run: Callable[[], object]
    items: float
    threads: int
    unit: str = "images/s"
    model: str = ""
    precision: str = "fp32"
    channels_last: bool = False
    compiled: bool = False
    flops_per_item: float = 0.0  # training (eval: forward) FLOPs per image; 1 for a GEMM's FLOP/s
    base: str = ""  # the row this one is compared with (vs_base)
    switch: str = ""  # the switch this row turns on against its base ("" for the main rows)
    note: str = ""
    before: Callable[[], None] | None = None  # untimed set-up before each timed call
    after: Callable[[], None] | None = None  # untimed tear-down after it
    compile_seconds: float = float("nan")
    calls_per_round: int = 1  # timed calls in each interleaved round (more samples for a noisy comparison)


def timed(run: Callable[[], object], device: torch.device, before=None, after=None) -> float:
    """Seconds of one call of `run`, the device synchronised on both sides; before/after are not timed."""
    if before is not None:
        before()
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - t0
    if after is not None:
        after()
    return seconds


def units_per_call(unit_seconds: float, min_seconds: float, max_units: int) -> int:
    """How many units of work make a timed call of at least min_seconds (timer and sync costs vanish in it)."""
    if unit_seconds <= 0 or not math.isfinite(unit_seconds):
        return max_units
    return max(1, min(max_units, math.ceil(min_seconds / unit_seconds)))


def calibrate(make: Callable[[int], Callable[[], object]], device: torch.device, min_seconds: float,
              max_units: int, threads: int, before=None, after=None) -> tuple[Callable[[], object], int, float, float]:
    """Warm up one unit of work, then size a call to last >= min_seconds.

    Returns (run, units per call, first call's seconds, one warm unit's seconds). The first call carries the
    one-off costs (torch.compile, allocator and oneDNN primitive caches); it is never part of a median."""
    one = make(1)
    with using_threads(threads):
        first = timed(one, device, before, after)
        warm = timed(one, device, before, after)
    k = units_per_call(warm, min_seconds, max_units)
    return (make(k) if k > 1 else one), k, first, warm


def time_interleaved(loads: list[Workload], repeats: int, device: torch.device,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every workload, `repeats` rounds of one call each (A B C, B C A, ...), so a burst of
    load from the neighbours hits every workload rather than one; the rotation varies who follows whom."""
    times: dict[str, list[float]] = {w.name: [] for w in loads}
    for r in range(repeats):
        if progress:
            progress(f"round {r + 1}/{repeats}")
        shift = r % max(1, len(loads))
        for w in loads[shift:] + loads[:shift]:
            with using_threads(w.threads):
                for _ in range(w.calls_per_round):
                    times[w.name].append(timed(w.run, device, w.before, w.after))
    return times
