"""pytest-benchmark timings of the suite's training step and input pipeline at a small batch.

`python -m pytest tests/benchmarks --benchmark-enable` times them (add --benchmark-autosave / --benchmark-compare
to keep and compare runs); the normal test command runs each once (pyproject sets --benchmark-disable) as a
check that the timed code works. The regression gate with a committed baseline is test_gate.py."""
import pytest
import torch

from ablations.models import ModelSpec
from runners.augment import AUGMENT_LEVELS
from runners.bench import DeviceSet, pipeline_calls, train_calls
from runners.data import make_synthetic

BATCH = 32
CPU = torch.device("cpu")
STEPS = {
    "alexnet-w0.25-bf16": (ModelSpec(arch="alexnet", width=0.25), "bf16"),
    "alexnet-w0.25-fp32": (ModelSpec(arch="alexnet", width=0.25), "fp32"),
    "convnet4-bf16": (ModelSpec(arch="convnet4"), "bf16"),
    "convnet4-fp32": (ModelSpec(arch="convnet4"), "fp32"),
}


@pytest.fixture(scope="module")
def data() -> DeviceSet:
    return DeviceSet.of(make_synthetic("cifar10", 4 * BATCH, 16, seed=0), CPU)


@pytest.mark.parametrize("case", STEPS)
def test_train_step(benchmark, data, case):
    model, precision = STEPS[case]
    step = train_calls(model, data, BATCH, precision, CPU)(1)  # one batch per call
    step()  # warm-up: oneDNN builds its kernels on the first call
    loss_sum, wrong, seen, _ = benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    benchmark.extra_info["images_per_call"] = BATCH
    assert seen == BATCH and torch.isfinite(loss_sum) and 0 <= int(wrong) <= BATCH


@pytest.mark.parametrize("level", AUGMENT_LEVELS)
def test_pipeline(benchmark, data, level):
    run = pipeline_calls(level, data, BATCH, CPU)(4)  # four batches per call
    x = benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    benchmark.extra_info["images_per_call"] = 4 * BATCH
    assert x.shape == (BATCH, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(x).all()
