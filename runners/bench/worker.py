"""One measuring process of the paired gate (`ablate bench --against REV`), run with a tree's root first on sys.path.

The cases are defined here, in the tree that asks, and built from the public code of the tree under test (its
model family, training step, BatchAugmenter, evaluate, train_run), so both trees do the same work and only the
code under test differs. This file imports nothing of the suite at module level: it must not pull in the asking
tree's modules before the tree under test is on sys.path.

Input, one JSON object on argv[1]: {"tree", "cases", "units" (work per timed call, {} to calibrate), "calls" (timed
calls of each case, {case: n}, taken round robin over the cases), "threads", "stall", and optionally "lockstep"}.
With lockstep, the worker prints "ready" before each timed call and waits for a line on stdin: the gate releases
head's and base's calls together. Output, one JSON line on stdout: {"runners": the imported package's folder,
"seconds": {case: [seconds per unit of work, one per timed call]}} or, when calibrating, {"unit_seconds": {case:
seconds}}.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

BATCH = 64  # small: the whole gate must fit in a CI job
EVAL_UNIT = 10  # test images per unit of evaluation work: 100 ten-crop views, about a timed call's worth on a
# slow core (50 made each call several times the calibrated length, and evaluation a long case)
LOOP_IMAGES = 128  # images per epoch of the run-loop case: a short run, since what it guards is the loop's own
# work around the steps (setup, metrics, evaluation, files), which a short run also makes a larger share of its time
LOOP_TEST = 64
LEVELS = ("none", "flip", "crop_flip", "crop_flip_pca")

# name -> (kind, model arch, width, precision, augmentation level, test crops)
CASES: dict[str, tuple[str, str, float, str, str, int]] = {
    "train alexnet-w0.25 bf16": ("train", "alexnet", 0.25, "bf16", "crop_flip", 1),
    "train alexnet-w0.25 fp32": ("train", "alexnet", 0.25, "fp32", "crop_flip", 1),
    "train convnet4 bf16": ("train", "convnet4", 1.0, "bf16", "crop_flip", 1),
    "train convnet4 fp32": ("train", "convnet4", 1.0, "fp32", "crop_flip", 1),
    **{f"pipeline {level}": ("pipeline", "", 1.0, "fp32", level, 1) for level in LEVELS},
    "eval alexnet-w0.25 bf16 10-crop": ("eval", "alexnet", 0.25, "bf16", "none", 10),
    "run loop convnet4 bf16": ("loop", "convnet4", 1.0, "bf16", "crop_flip", 1),
    # the fp32 forms, for a CPU without native bf16 (see default_cases)
    "eval alexnet-w0.25 fp32 10-crop": ("eval", "alexnet", 0.25, "fp32", "none", 10),
    "run loop convnet4 fp32": ("loop", "convnet4", 1.0, "fp32", "crop_flip", 1),
}
FP32_FORMS = ("eval alexnet-w0.25 fp32 10-crop", "run loop convnet4 fp32")


def default_cases(native_bf16: bool) -> tuple[str, ...]:
    """Every case once: with native bf16 the bf16 training steps beside their fp32 twins and evaluation and the
    run loop in bf16 (the suite's default); without it, the fp32 forms only, since emulated bf16 would make the
    check an order of magnitude longer and measure PyTorch's emulation rather than this code."""
    if native_bf16:
        return tuple(c for c in CASES if c not in FP32_FORMS)
    return tuple(c for c, (_, _, _, precision, _, _) in CASES.items() if precision == "fp32")


def spin(seconds: float) -> None:
    """Busy-wait: an injected stall that holds the core as real work would (sleeping would free it)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def wait_for_go() -> None:
    """Lockstep: say ready, then wait for the gate's go, so that head and base time the same call of the same case
    at the same moment (an end of input means the partner is gone: go on alone)."""
    print("ready", flush=True)
    sys.stdin.readline()


def build(name: str, data, raw, device, tmp: Path):
    """make(units) -> a call doing `units` units of the case's work, from the tree under test's public code."""
    import torch
    from ablations.models import ModelSpec, build_model
    from ablations.spec import RunSpec
    from runners.augment import BatchAugmenter
    from runners.bench import pipeline_calls, train_calls
    from runners.train import DeviceData, evaluate, train_run

    kind, arch, width, precision, level, crops = CASES[name]
    model_spec = ModelSpec(arch=arch, width=width) if arch else None
    if kind == "train":
        return train_calls(model_spec, data, BATCH, precision, device, augment=level)
    if kind == "pipeline":
        return pipeline_calls(level, data, BATCH, device)
    if kind == "eval":
        spec = RunSpec(model=model_spec, precision=precision, test_crops=crops)
        torch.manual_seed(0)
        model = build_model(model_spec).to(device)
        if precision == "bf16":
            model = model.to(memory_format=torch.channels_last)
        aug = BatchAugmenter(data.stats, spec.preprocess, "none", device=device)

        def make_eval(k: int):
            dd = DeviceData(data.train_x[:0], data.train_y[:0], data.test_x[:k * EVAL_UNIT],
                            data.test_y[:k * EVAL_UNIT])
            return lambda: evaluate(model, dd, aug, spec, device)
        return make_eval
    spec = RunSpec(model=model_spec, precision=precision, augment=level, epochs=1, batch_size=BATCH,
                   subset=LOOP_IMAGES, test_subset=LOOP_TEST, val_size=64)
    counter = iter(range(10 ** 9))

    def make_loop(k: int):  # k whole runs, each in a fresh folder: setup, steps, metrics, evaluation, files
        return lambda: [train_run(spec, raw, tmp / f"run{next(counter)}", device) for _ in range(k)]
    return make_loop


def cap(name: str, data) -> int:
    """The most units one make(k) can do on the generated data (a train or pipeline unit is a batch of it)."""
    kind = CASES[name][0]
    if kind == "eval":
        return len(data.test_y) // EVAL_UNIT
    return len(data.train_y) // BATCH if kind in ("train", "pipeline") else 10 ** 9


def sized(make, units: int, most: int):
    """A call doing `units` units of work (rounded up to whole repeats of `most` when the data holds fewer);
    returns (call, units it does)."""
    if units <= most:
        return make(units), units
    reps, inner = -(-units // most), make(most)
    return (lambda: [inner() for _ in range(reps)]), reps * most


def measure(job: dict) -> dict:
    tree = Path(job["tree"]).resolve()
    sys.path.insert(0, str(tree))
    import torch

    import runners
    from runners.bench import DeviceSet
    from runners.data import make_synthetic
    from runners.train import pick_device

    here = Path(runners.__file__).resolve().parent
    if here != tree / "runners":
        raise SystemExit(f"worker imported runners from {here}, not from the tree under test {tree}")
    torch.set_num_threads(int(job["threads"]))
    device = pick_device("cpu")
    raw = make_synthetic("cifar10", 2048, 256, seed=0)  # speed does not depend on pixel values; small,
    # since every process makes it, and a call that needs more than it holds repeats over it (sized)
    data = DeviceSet.of(raw, device)
    calibrating = not job["units"]
    out: dict[str, object] = {"runners": str(here), "seconds": {}, "unit_seconds": {}}
    with tempfile.TemporaryDirectory(prefix="ablate-gate-") as tmp:
        runs = {}
        for name in job["cases"]:
            make = build(name, data, raw, device, Path(tmp))
            if calibrating:
                one = make(1)
                one()  # warm-up: one-off costs (allocator, oneDNN primitives, first files) never count
                t0 = time.perf_counter()
                one()
                out["unit_seconds"][name] = time.perf_counter() - t0
                continue
            runs[name] = sized(make, int(job["units"][name]), cap(name, data))
            runs[name][0]()  # warm-up on the timed call itself: its shapes (an evaluation's last batch) get
            # their primitives
            out["seconds"][name] = []
        for i in range(max((int(job["calls"][n]) for n in runs), default=0)):
            for name, (run, units) in runs.items():  # round robin over the cases: a burst of the host's load
                # slows one call of several cases rather than every call of one, and each case's median drops it
                if i >= int(job["calls"][name]):
                    continue
                if job.get("lockstep"):
                    wait_for_go()
                t0 = time.perf_counter()
                run()
                took = time.perf_counter() - t0
                if job["stall"]:
                    spin(job["stall"] * took)
                    took = time.perf_counter() - t0
                out["seconds"][name].append(took / units)
    return out


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
