"""What `ablate bench` times: GEMM ceilings, the seed chapter's reference pipeline, the suite's training step,
evaluation, the conv passes and the input pipeline at every augmentation level (the run loop against a bare script
is in loop.py). Each workload is built on the suite's own code (train_one_epoch, BatchAugmenter, evaluate)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F

from ablations.models import (ModelSpec, build_model, count_flops_per_image, forward_flops_per_image,
                              train_flops_per_image)
from ablations.spec import RunSpec
from runners.augment import (
    BatchAugmenter,
    InputStats,
    compute_input_stats,
)
from runners.bench.harness import Workload, calibrate, ratio
from runners.data import CifarData
from runners.train import (
    COMPILED_INPUT_IMAGES,
    DeviceData,
    autocast,
    evaluate,
    make_optimizer,
    train_one_epoch,
)

# The seed chapter's net in the suite's family: the same convs and FCs, its 2x2, 2x2, 3x3/2 pools, dropout 0.6
# before fc1 and fc2.
SEED_ALEXNET = ModelSpec(arch="alexnet", pooling="seed", dropout=0.6, dropout_at="inputs")
SUITE_ALEXNET = ModelSpec(arch="alexnet")  # the suite's default: overlapping 3x3/2 pools (paper §3.4), no dropout
CONVNET4 = ModelSpec(arch="convnet4")
TRAIN_AUGMENT = "crop_flip"  # the suite's usual training augmentation (more work than the reference's flip)

CSV_COLUMNS = (
    "section", "name", "model", "switch", "precision", "channels_last", "compiled", "batch", "unit", "rate",
    "rate_min", "rate_max", "repeats", "items_per_call", "threads", "vs_reference", "base", "vs_base", "flops_per_item",
    "achieved_flops", "ceiling_flops", "efficiency", "compile_seconds", "data", "device", "device_name",
    "torch_version", "date", "note")


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts: the model family's counter (ablations/models.py), for the reference net too


def reference_flops_per_image(train: bool = True) -> int:
    from runners.reference import AlexNet

    return count_flops_per_image(AlexNet, train)


# ---------------------------------------------------------------------------------------------------------------
# Workloads


def gemm_workload(n: int, precision: str, device: torch.device, min_seconds: float, threads: int) -> Workload:
    """Square (n x n) @ (n x n) matrix multiplies: the machine's attainable FLOP/s in that precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)

    def make(k: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(k):
                torch.mm(a, b, out=out)
        return run

    run, k, _, _ = calibrate(make, device, min_seconds, 10_000, threads)
    return Workload(f"GEMM {precision} {n}x{n}, {threads_label(threads)}", "ceiling", run, 2.0 * n ** 3 * k, threads,
                    unit="FLOP/s", precision=precision, flops_per_item=1.0)


@contextlib.contextmanager
def _quiet_workers() -> Iterator[None]:
    """4 workers on a 2-core machine is the chapter's setting: keep it, without torch's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


class ReferenceLoop:
    """The chapter's training loop: batches from its DataLoader, moved to the device, fp32, NCHW.

    The chapter shows no loop, so this is the conventional one (SGD, momentum 0.9, weight decay 5e-4 as the
    suite's runs use). Worker processes live only between before() and after(), so they never steal CPU from
    the other workloads; before() also takes the first batch (worker start-up is not steady state)."""

    def __init__(self, root: Path, batch_size: int, device: torch.device, num_workers: int = 4):
        from runners.reference import AlexNet, reference_loader

        self.device = device
        with _quiet_workers():
            self.loader = reference_loader(root, batch_size, num_workers)
        torch.manual_seed(0)
        self.net = AlexNet().to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.it, self.pending = None, None

    def before(self) -> None:
        with _quiet_workers():
            self.it = iter(self.loader)
            self.pending = next(self.it)

    def after(self) -> None:
        self.it, self.pending = None, None  # dropping the iterator shuts its workers down

    def steps(self, k: int) -> None:
        self.net.train()
        for i in range(k):
            x, y = self.pending if i == 0 else next(self.it)
            x, y = x.to(self.device), y.to(self.device)
            loss = F.cross_entropy(self.net(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


def reference_workload(root: Path, batch_size: int, device: torch.device, min_seconds: float, threads: int,
                       name: str, note: str) -> Workload:
    loop = ReferenceLoop(root, batch_size, device)
    run, k, _, _ = calibrate(lambda k: (lambda: loop.steps(k)), device, min_seconds, len(loop.loader) - 1,
                             threads, loop.before, loop.after)
    return Workload(name, "reference", run, k * batch_size, threads, model="seed chapter AlexNet",
                    flops_per_item=reference_flops_per_image(), before=loop.before, after=loop.after, note=note)


@dataclass(frozen=True)
class DeviceSet(DeviceData):
    """The training loop's DeviceData plus the training set's input statistics, computed once for every workload."""

    stats: InputStats | None = None

    @staticmethod
    def of(data: CifarData, device: torch.device, n_train: int = 50_000, n_test: int = 10_000) -> "DeviceSet":
        train_x = data.train_x[:n_train].to(device).contiguous()
        stats = compute_input_stats(train_x[:5000])  # speed does not depend on the exact statistics
        return DeviceSet(train_x, data.train_y[:n_train].to(device), data.test_x[:n_test].to(device).contiguous(),
                         data.test_y[:n_test].to(device), stats=stats)


def prepared_model(spec: ModelSpec, precision: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    if precision == "bf16":  # as train_run does: channels_last goes with bf16
        model = model.to(memory_format=torch.channels_last)
    return model


def model_label(spec: ModelSpec) -> str:
    changed = {k: v for k, v in dataclasses.asdict(spec).items() if v != getattr(ModelSpec(), k) and k != "arch"}
    return spec.arch + (" " + " ".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


def threads_label(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def train_calls(model_spec: ModelSpec, data: DeviceSet, batch: int, precision: str, device: torch.device,
                augment: str = TRAIN_AUGMENT, compile_model: bool = False,
                aug_wrapper: Callable | None = None) -> Callable[[int], Callable[[], tuple]]:
    """make(k): a call that trains k batches with the suite's own loop (train_one_epoch over k batches of the
    uint8 device data, BatchAugmenter, the run's precision and memory format). Returns train_one_epoch's result."""
    spec = RunSpec(model=model_spec, batch_size=batch, precision=precision, augment=augment)
    model = prepared_model(model_spec, precision, device)
    net = torch.compile(model) if compile_model else model
    opt = make_optimizer(model, spec)
    aug = BatchAugmenter(data.stats, spec.preprocess, augment, device=device)
    if aug_wrapper is not None:
        aug = aug_wrapper(aug)
    order_gen = torch.Generator().manual_seed(0)
    aug_gen = torch.Generator(device=device).manual_seed(1)
    empty_x, empty_y = data.test_x[:0], data.test_y[:0]

    def make(k: int) -> Callable[[], tuple]:
        dd = DeviceData(data.train_x[:k * batch], data.train_y[:k * batch], empty_x, empty_y)
        return lambda: train_one_epoch(net, opt, dd, aug, spec, device, order_gen, aug_gen)

    return make


def train_workload(name: str, section: str, model_spec: ModelSpec, data: DeviceSet, batch: int, precision: str,
                   device: torch.device, min_seconds: float, threads: int, augment: str = TRAIN_AUGMENT,
                   compile_model: bool = False, base: str = "", note: str = "",
                   aug_wrapper: Callable | None = None) -> Workload:
    """Training images/s of the suite's own loop; a compiled model's first call (the compilation) is apart."""
    make = train_calls(model_spec, data, batch, precision, device, augment, compile_model, aug_wrapper)
    run, k, first, warm = calibrate(make, device, min_seconds, len(data.train_y) // batch, threads)
    return Workload(name, section, run, k * batch, threads, model=model_label(model_spec), precision=precision,
                    channels_last=precision == "bf16", compiled=compile_model,
                    flops_per_item=train_flops_per_image(model_spec), base=base, note=note,
                    compile_seconds=first - warm if compile_model else float("nan"))


def eval_workload(name: str, model_spec: ModelSpec, data: DeviceSet, precision: str, crops: int,
                  device: torch.device, min_seconds: float, threads: int, base: str = "", unit: int = 50) -> Workload:
    """Test images/s of evaluate() (one view, or the paper's ten crops averaged)."""
    spec = RunSpec(model=model_spec, precision=precision, test_crops=crops)
    model = prepared_model(model_spec, precision, device)
    aug = BatchAugmenter(data.stats, spec.preprocess, "none", device=device)

    def make(k: int) -> Callable[[], object]:
        dd = DeviceData(data.train_x[:0], data.train_y[:0], data.test_x[:k * unit], data.test_y[:k * unit])
        return lambda: evaluate(model, dd, aug, spec, device)

    run, k, _, _ = calibrate(make, device, min_seconds, len(data.test_y) // unit, threads)
    return Workload(name, "eval", run, k * unit, threads, model=model_label(model_spec), precision=precision,
                    channels_last=precision == "bf16", flops_per_item=crops * forward_flops_per_image(model_spec),
                    base=base, note=f"{crops} view{'s' if crops > 1 else ''} per test image")


CONV_PASSES = ("forward", "input grad", "weight grad")


def conv_pass_workloads(spec: ModelSpec, batch: int, device: torch.device, min_seconds: float) -> list[Workload]:
    """Every conv layer's three passes alone, bf16 channels_last, 1 thread, as the training step calls them
    (F.conv2d; aten.convolution_backward asked for one gradient), in FLOP/s: what the convolution kernels
    themselves allow, so the gap between a training row and the ceiling can be split between the kernels
    and everything else (kernel_bound). conv1's input gradient is never computed in training: left out."""
    model = prepared_model(spec, "bf16", device)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    inputs: list[torch.Size] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: inputs.append(args[0].shape)) for m in convs]
    with torch.no_grad(), autocast(device, "bf16"):
        model.eval()(torch.zeros(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    g = torch.Generator(device=device).manual_seed(0)
    loads = []
    for i, (conv, shape) in enumerate(zip(convs, inputs), start=1):
        x = torch.randn(shape, generator=g, device=device).to(torch.bfloat16) \
            .contiguous(memory_format=torch.channels_last)  # (B, C_in, H, W)
        w = conv.weight.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        geometry = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
        out = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)  # (B, C_out, H', W')
        grad = torch.randn(out.shape, generator=g, device=device).to(torch.bfloat16) \
            .contiguous(memory_format=torch.channels_last)
        flops = 2.0 * out.numel() * w[0].numel()  # MACs x 2 per pass, as FlopCounterMode counts a conv
        calls = {"forward": lambda x=x, w=w, c=conv: F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups),
                 "input grad": lambda x=x, w=w, gr=grad, ge=geometry: torch.ops.aten.convolution_backward(
                     gr, x, w, None, *ge, [True, False, False]),
                 "weight grad": lambda x=x, w=w, gr=grad, ge=geometry: torch.ops.aten.convolution_backward(
                     gr, x, w, None, *ge, [False, True, False])}
        for what in (p for p in CONV_PASSES if not (i == 1 and p == "input grad")):
            one = calls[what]

            def make(k: int, one=one) -> Callable[[], None]:
                def run() -> None:
                    for _ in range(k):
                        one()
                return run

            run, k, _, _ = calibrate(make, device, min_seconds, 1000, 1)
            loads.append(Workload(f"conv{i} {what} {tuple(x.shape[1:])}->{tuple(out.shape[1:])}, 1 thread",
                                  "kernels", run, k, 1, unit="passes/s", model=model_label(spec), precision="bf16",
                                  channels_last=True, flops_per_item=flops, switch=what,
                                  note=f"batch {batch}; one pass = {flops / 1e9:.2f} GFLOP"))
    return loads


def kernel_bound(rows: pd.DataFrame, train_flops_per_image: float, batch: int) -> float:
    """The share of the ceiling a training step would reach if its convolutions ran at the measured kernel
    rates and everything else (FC layers, pooling, activations, casts, the optimiser) took no time."""
    kernels = rows[rows.section == "kernels"]
    if not len(kernels) or not kernels.ceiling_flops.notna().any():
        return float("nan")
    seconds = float((1.0 / kernels.rate).sum())  # one training step's conv passes, one call each
    return ratio(train_flops_per_image * batch / seconds, float(kernels.ceiling_flops.iloc[0]))


def pipeline_calls(level: str, data: DeviceSet, batch: int, device: torch.device,
                   compiled: bool = False) -> Callable[[int], Callable]:
    """make(k): a call that feeds k batches the way the training loop does (gather the uint8 rows, augment at
    `level`, make them channels_last) and returns the last batch."""
    aug = BatchAugmenter(data.stats, "standard", level, device=device, compiled=compiled)
    gen = torch.Generator(device=device).manual_seed(2)
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0)).to(device)

    def make(k: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            for i in range(k):
                idx = perm[i * batch:(i + 1) * batch]
                x = aug(data.train_x.index_select(0, idx), gen, torch.channels_last)
            return x  # (B, 3, 32, 32)
        return run

    return make


def pipeline_workload(level: str, data: DeviceSet, batch: int, device: torch.device, min_seconds: float,
                      threads: int, compiled: bool = False) -> Workload:
    """The training loop's input path alone, images/s; compiled as train_run compiles it for long CPU runs
    (the first call, which compiles, is the warm-up)."""
    make = pipeline_calls(level, data, batch, device, compiled)
    run, k, first, warm = calibrate(make, device, min_seconds, len(data.train_y) // batch, threads)
    return Workload(f"pipeline {level}{' compiled' if compiled else ''}, {threads_label(threads)}", "pipeline", run,
                    k * batch, threads, compiled=compiled, switch="compiled" if compiled else "",
                    compile_seconds=first - warm if compiled else float("nan"),
                    note="gather + BatchAugmenter + channels_last" + (
                        f"; compiled, as in CPU runs of >= {COMPILED_INPUT_IMAGES:,} images" if compiled else ""))
