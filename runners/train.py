"""Train one resolved RunSpec: SGD, a schedule, per-epoch metrics, a checkpoint every 30 s of training, resume.

The data set lives on the training device as uint8; each batch is gathered, augmented and normalised there
(runners/augment.py). Metrics are summed on the device and read once per epoch: no host sync per batch.
A checkpoint holds model, optimiser, scheduler and every RNG, so a resumed run on the CPU ends bit-for-bit
where an uninterrupted one ends."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ablations.models import build_model, count_params, train_flops_per_image
from ablations.spec import RunSpec
from runners.augment import BatchAugmenter, compute_input_stats, ten_crop_logits
from runners.data import CifarData
from runners.store import EPOCH_COLUMNS, TRACE_COLUMNS, atomic_write_bytes, atomic_write_json, atomic_write_text, rows_csv, \
    load_checkpoint, save_checkpoint

EVAL_BATCH = 500
TRACE_POINTS = 10  # the running training error (Figure 1's metric) is logged this many times per epoch
CLEAN_TRAIN_IMAGES = 2000  # the fixed training slice evaluated in eval mode each epoch (the fair gap, the chance guard)
CHANCE_LOSS = 0.98  # a final clean loss at or above this share of ln(classes) is chance: the run did not learn
LRN_PROBE_IMAGES = 256  # clean training images through which the LRN activity diagnostic is measured
CHECKPOINT_ENV = "ABLATE_CHECKPOINT_SECONDS"  # `ablate run --checkpoint-every` sets it for every worker process
CHECKPOINT_SECONDS = 30.0
COMPILED_INPUT_IMAGES = 1_000_000  # see compile_input
DROPOUT_RANK_STRIDE = 7_777_777  # rank r > 0 of a data-parallel run seeds its dropout RNG with seed + this x r


@dataclass
class RunResult:
    run_id: str
    status: str  # finished | diverged | failed
    stop_reason: str  # epochs | early_stop | diverged | error
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    error: str = ""


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of handing it back to the OS after each training step.

    By default, large freed blocks (activations) are unmapped or trimmed and faulted back in page by page
    (4 KB) at the next allocation, and a step frees and reallocates the same buffers every time: thousands
    of page faults per smoke run (tests/test_run.py shows the effect on a 4 MB buffer). CPU training guides
    suggest jemalloc or tcmalloc; this gets the same effect with no extra dependency. The cost is that the
    process keeps its peak memory. Linux/glibc only; elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))


def compile_input(spec: RunSpec, n_train: int, device: torch.device) -> bool:
    """Compile the input pipeline (BatchAugmenter) for CPU runs that push at least COMPILED_INPUT_IMAGES
    training images through it. Compiling costs torch.compile's start-up once per process plus a fraction of a
    second per pipeline (`ablate bench`: the compile_seconds of the compiled pipeline rows), and saves several
    us per image at the crop levels (compare its eager and compiled pipeline rows, one thread). That pays off
    from about a million images, and matters most for the small convnet4, whose step is only a few hundred us
    per image. On a GPU the eager pipeline is already far ahead of the model."""
    return device.type == "cpu" and spec.epochs * n_train >= COMPILED_INPUT_IMAGES


def checkpoint_seconds() -> float:
    """Seconds of training between checkpoints: after an epoch, one is written once this many have passed
    since the last. A checkpoint of the CIFAR AlexNet (~15M weights and their momenta) is ~120 MB and
    fsynced: after every few-second GPU epoch it would rival the epoch itself, and after each of a smoke
    run's sub-second epochs it dominated the run loop's overhead. A kill loses at most this much plus one epoch, and the
    resumed run is bit-identical whatever the interval. 0 writes one after every epoch."""
    from ablations.errors import UserError
    raw = os.environ.get(CHECKPOINT_ENV, "").strip()
    if not raw:
        return CHECKPOINT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise UserError(f"{CHECKPOINT_ENV}={raw!r} is not a number of seconds >= 0; unset it for the default "
                        f"({CHECKPOINT_SECONDS:g}) or set 0 to checkpoint after every epoch")
    return value


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ablations.errors import UserError
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA device is available; use --device cpu or auto")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass(frozen=True)
class DeviceData:
    """The run's images on the training device: uint8 images, int64 labels.

    train: what SGD sees; val: held out of the training images, decides the schedule (and, in reports, every
    choice); test: reported, never decides anything; clean: a fixed slice of train, evaluated like val (eval mode,
    no augmentation), so that test - clean is an over-fitting gap that dropout and augmentation cannot bias."""

    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,)
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,)
    val_x: torch.Tensor | None = None  # (V, 3, 32, 32) uint8; None without a validation split
    val_y: torch.Tensor | None = None
    clean_x: torch.Tensor | None = None  # (K, 3, 32, 32) uint8, K = min(N, CLEAN_TRAIN_IMAGES)
    clean_y: torch.Tensor | None = None
    val_fingerprint: str = ""  # sha256 (12 hex) of the validation indices into the imported training set


def validation_split(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of a class-stratified validation set of `size` training images, the same for every run.

    Each class gives size // C images (the first size % C classes one more), the first of a fixed shuffle (seed 0)
    of that class's images. Sorted, so the fingerprint does not depend on the class order."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    gen = torch.Generator().manual_seed(0)
    picks = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        take = size // classes + (c < size % classes)
        if take > len(members):
            from ablations.errors import UserError
            raise UserError(f"val_size {size} needs {take} images of class {c}, the data has {len(members)}; "
                            f"choose a smaller val_size")
        picks.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long)


def check_data_fits(spec: RunSpec, data: CifarData) -> None:
    """The validation split, subset and test subset fit the imported data (one line naming the limit if not)."""
    from ablations.errors import UserError
    n_train = len(data.train_y)
    if spec.val_size and spec.val_size >= n_train:
        raise UserError(f"val_size {spec.val_size} leaves no training images of the {n_train} imported; "
                        f"choose a smaller val_size")
    left = n_train - spec.val_size
    if spec.subset > left:
        raise UserError(f"subset {spec.subset} is more than the {left} training images "
                        f"{'left after the validation split' if spec.val_size else 'imported'}; choose at most "
                        f"{left}, or 0 for all")
    # a test_subset beyond the test set means all of it: clamped, and the count used is recorded (test_images)


def select_data(spec: RunSpec, data: CifarData, device: torch.device) -> DeviceData:
    """Validation split first (stratified, fixed), then `subset` images of the rest from a fixed shuffle (seed 0,
    the same for every run, so classes stay balanced), then the clean slice and `test_subset` the same way."""
    from ablations.errors import UserError

    def first(n_all: int, n: int) -> torch.Tensor:
        if n and n < n_all:
            return torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n]
        return torch.arange(n_all)

    check_data_fits(spec, data)
    n_train = len(data.train_y)
    val_idx = validation_split(data.train_y, spec.val_size) if spec.val_size else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[val_idx] = False
    pool = keep.nonzero().flatten()
    if spec.val_size:
        pool = pool[first(len(pool), spec.subset)]
    else:  # no split: the same images as ever for a given subset
        pool = first(n_train, spec.subset)
    clean = first(len(pool), min(len(pool), CLEAN_TRAIN_IMAGES))
    test = first(len(data.test_y), spec.test_subset)

    def put(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return (x if idx is None else x[idx]).to(device).contiguous()

    train_x, train_y = put(data.train_x, pool), put(data.train_y, pool)
    fingerprint = hashlib.sha256(val_idx.numpy().astype("<i8").tobytes()).hexdigest()[:12] if spec.val_size else ""
    return DeviceData(train_x, train_y, put(data.test_x, test), put(data.test_y, test),
                      val_x=put(data.train_x, val_idx) if spec.val_size else None,
                      val_y=put(data.train_y, val_idx) if spec.val_size else None,
                      clean_x=train_x[clean.to(device)], clean_y=train_y[clean.to(device)],
                      val_fingerprint=fingerprint)


def make_optimizer(model: torch.nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay on the weights only (decay_on="weights": the paper's recipe, as
    cuda-convnet and Caffe decay no bias) or on every parameter ("all"). fused=True: one kernel per step instead of
    ~4 passes over every parameter; the same maths to an ulp."""
    params = list(model.parameters())
    if spec.decay_on == "weights":  # biases (and any other 1-D parameter) get no decay
        groups = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        params = [g for g in groups if g["params"]]
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, fused=True)


def make_scheduler(opt: torch.optim.Optimizer, spec: RunSpec):
    """constant | step (/10 every step_epochs) | plateau (the paper's /10 when validation error stalls, max_lr_drops
    times) | cosine (to 0 over the epoch cap). Stepped once per epoch."""
    if spec.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec.step_epochs, gamma=0.1)
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    if spec.schedule == "plateau":
        floor = spec.lr * 0.1 ** spec.max_lr_drops * 0.999
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                          patience=spec.plateau_patience, min_lr=floor)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def step_scheduler(sched, val_error: float) -> None:
    """The plateau schedule reads validation error: the test split never decides anything."""
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(val_error)
    else:
        sched.step()


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_one_epoch(model, opt, dd: DeviceData, aug: BatchAugmenter, spec: RunSpec, device: torch.device,
                    order_gen: torch.Generator, aug_gen: torch.Generator,
                    on_step: Callable[[int, int], None] | None = None,
                    shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """One pass over the training set. Returns (summed loss, error count) as device tensors, the count, and a
    (segments, 3) device tensor of (errors, summed loss, images) per tenth of the epoch (trace_segments), from
    which the running training error is read once per epoch: no host sync per batch.

    `shard` = (rank, world): every rank draws the same global permutation and takes its slice of each
    global batch, so N ranks see exactly the batches one process would. With world > 1 each rank's loss is
    its sum x world / global batch: DDP averages gradients over ranks, so the step is the global batch mean
    even when the last batch splits unevenly (a last batch smaller than world is dropped)."""
    rank, world = shard
    model.train()
    n = len(dd.train_y)
    perm = torch.randperm(n, generator=order_gen, device=order_gen.device).to(device)
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    steps = math.ceil(n / spec.batch_size)
    segment_of, _ = trace_segments(steps)
    segments = torch.zeros((max(segment_of, default=0) + 1, 3), device=device)
    fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format
    seen = 0
    for i in range(steps):
        idx = perm[i * spec.batch_size:(i + 1) * spec.batch_size]
        n_global = len(idx)
        if n_global < world:
            break  # some rank would get an empty batch
        idx = idx.tensor_split(world)[rank]
        # index_select, not x[idx]: the same rows, ~9x faster on the CPU for uint8 images (runners/bench.py)
        x = aug(dd.train_x.index_select(0, idx), aug_gen, fmt)  # (B, 3, 32, 32) float
        y = dd.train_y[idx]
        with autocast(device, spec.precision):
            logits = model(x)
        if world == 1:
            loss = F.cross_entropy(logits.float(), y)
        else:
            loss = F.cross_entropy(logits.float(), y, reduction="sum") * (world / n_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        batch_loss = loss.detach() * (len(y) if world == 1 else n_global / world)
        batch_wrong = (logits.argmax(1) != y).sum()
        loss_sum += batch_loss
        wrong += batch_wrong
        segments[segment_of[i], 0] += batch_wrong
        segments[segment_of[i], 1] += batch_loss
        segments[segment_of[i], 2] += len(y)
        seen += len(y)
        if on_step is not None and i % 10 == 0:
            on_step(i, steps)
    return loss_sum, wrong, seen, segments


def trace_segments(steps: int, points: int = TRACE_POINTS) -> tuple[list[int], list[float]]:
    """Which segment each step of an epoch belongs to, and each segment's end as a fraction of the epoch:
    `points` segments of (nearly) equal steps, fewer when an epoch has fewer steps than points."""
    raw = [i * points // steps for i in range(steps)]
    dense = {k: j for j, k in enumerate(dict.fromkeys(raw))}
    ends = [(i + 1) / steps for i in range(steps) if i + 1 == steps or raw[i + 1] != raw[i]]
    return [dense[k] for k in raw], ends


def trace_rows(epoch: int, segments: list[list[float]], ends: list[float], before: list[dict]) -> list[dict]:
    """The epoch's running-error log: at each segment's end, the error and loss of that segment and of the
    trailing one-epoch window of training batches (`window_error`: what the paper's Figure 1 plots, at a tenth
    of an epoch's resolution; in the first epoch, the batches so far)."""
    rows, history = [], [(r["segment_wrong"], r["segment_loss_sum"], r["segment_images"]) for r in before]
    per_epoch = len(ends)
    for (wrong, loss_sum, images), end in zip(segments, ends):
        history.append((wrong, loss_sum, images))
        window = history[-per_epoch:]
        n = sum(w[2] for w in window) or math.nan
        rows.append(dict(epoch=round(epoch - 1 + end, 6), segment_wrong=wrong, segment_loss_sum=loss_sum,
                         segment_images=images, segment_error=wrong / (images or math.nan),
                         window_error=sum(w[0] for w in window) / n, window_loss=sum(w[1] for w in window) / n))
    return rows


@dataclass(frozen=True)
class Evaluation:
    loss: float
    error: float
    error_top5: float
    predicted_classes: int  # how many classes the net predicted at least once (1 = a constant predictor)


@torch.no_grad()
def evaluate_split(model, x_all: torch.Tensor, y_all: torch.Tensor, aug: BatchAugmenter, spec: RunSpec,
                   device: torch.device, crops: int = 1, shard: tuple[int, int] = (0, 1),
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Evaluation:
    """Loss, top-1 and top-5 error of one split in eval mode, no augmentation; crops=10 averages softmax over the
    paper's ten views. Sharded runs evaluate a slice per rank and sum over ranks, so every rank gets the same
    numbers (and the plateau schedule takes the same decision everywhere)."""
    model.eval()
    fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format
    classes = spec.model.num_classes
    totals = torch.zeros(3 + classes, device=device)  # loss, wrong1, wrong5, predictions per class
    xs, ys = x_all.tensor_split(shard[1])[shard[0]], y_all.tensor_split(shard[1])[shard[0]]
    for start in range(0, len(ys), EVAL_BATCH):
        x = aug.eval(xs[start:start + EVAL_BATCH]).contiguous(memory_format=fmt)
        y = ys[start:start + EVAL_BATCH]
        with autocast(device, spec.precision):
            if crops == 10:
                logp = ten_crop_logits(model, x).float().clamp_min(1e-12).log()
            else:
                logp = F.log_softmax(model(x).float(), dim=1)
        top5 = logp.topk(min(5, logp.shape[1]), dim=1).indices
        totals[0] += F.nll_loss(logp, y, reduction="sum")
        totals[1] += (top5[:, 0] != y).sum()
        totals[2] += (~(top5 == y[:, None]).any(1)).sum()
        totals[3:] += torch.bincount(top5[:, 0], minlength=classes)[:classes]
    if reduce is not None:
        totals = reduce(totals)
    m = len(y_all) or math.nan
    t = totals.tolist()
    return Evaluation(t[0] / m, t[1] / m, t[2] / m, sum(1 for c in t[3:] if c > 0))


def evaluate(model, dd: DeviceData, aug: BatchAugmenter, spec: RunSpec, device: torch.device,
             shard: tuple[int, int] = (0, 1),
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float, float]:
    """Test loss, top-1 error, top-5 error, with the run's test views (test_crops)."""
    e = evaluate_split(model, dd.test_x, dd.test_y, aug, spec, device, spec.test_crops, shard, reduce)
    return e.loss, e.error, e.error_top5


@torch.no_grad()
def lrn_activity(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """How much each response-normalisation layer really normalises: quantiles of its divisor factor
    (k + alpha/n * sum a^2)^-beta over every unit, for a fixed batch of clean training images.

    A p05-p95 spread near 1 means a constant rescaling (the layer normalises nothing); the paper's LRN at k = 2
    starts at 2^-0.75 = 0.59 and acts only where activations are large."""
    from ablations.models import SameMapRNorm
    factors: list[torch.Tensor] = []

    def hook(module, inputs, _out):
        a = inputs[0].float()
        if isinstance(module, SameMapRNorm):
            mean_sq = F.avg_pool2d(a * a, module.size, stride=1, padding=module.size // 2, count_include_pad=True)
            f = (1.0 + module.scale * mean_sq).pow(-module.pow)
        else:  # nn.LocalResponseNorm: 1 / (x / out) from the layer itself, exact for any window convention
            out = F.local_response_norm(a, module.size, module.alpha, module.beta, module.k)
            f = torch.where(a != 0, out / a.where(a != 0, torch.ones_like(a)), torch.nan)
        factors.append(f.flatten())

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.LocalResponseNorm, SameMapRNorm))]
    if not layers:
        return {}
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    f = torch.cat(factors)
    f = f[~f.isnan()]
    q = torch.quantile(f[torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:1_000_000]].double(),
                       torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"lrn_factor_p05": q[0], "lrn_factor_p50": q[1], "lrn_factor_p95": q[2],
            "lrn_factor_spread": q[2] / q[0] if q[0] > 0 else math.nan}


def rng_state(order_gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "order": order_gen.get_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, order_gen: torch.Generator, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    order_gen.set_state(state["order"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@functools.cache
def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count: what a run (and a bench row) records it ran on."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def environment(spec: RunSpec, data: CifarData, device: torch.device, context: dict) -> dict:
    return {"torch_version": torch.__version__, "device": str(device), "device_name": device_name(device),
            "precision": spec.precision, "devices": spec.devices, "threads": torch.get_num_threads(),
            "dataset": spec.dataset, "dataset_label": data.meta.get("label", spec.dataset),
            "dataset_sha256": data.meta.get("sha256", ""), "dataset_source": data.meta.get("source", ""),
            "python": platform.python_version(), "host": platform.node(), **provenance(), **context}


@functools.cache
def provenance() -> dict:
    """The suite's version and git commit (with a dirty flag) and the versions that decide the numbers."""
    import importlib.metadata
    import subprocess

    import numpy
    import torchvision

    root = Path(__file__).resolve().parent.parent
    commit, dirty = "", None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = importlib.metadata.version("alexnet-ablate")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return {"suite_version": version, "git_commit": commit, "git_dirty": dirty,
            "torchvision_version": torchvision.__version__, "numpy_version": numpy.__version__}


def target_time(spec: RunSpec, rows: list[dict], trace: list[dict]) -> tuple[float, float] | None:
    """(epochs, training seconds) at which the early-stop metric first went below its target, else None.

    Training error and loss are read from the running trace (a tenth of an epoch's resolution, the trailing
    one-epoch window of batches); evaluated metrics (val_error) at the end of each epoch. Seconds are
    interpolated within the epoch, which trains at a steady rate."""
    if not spec.early_stop_metric:
        return None
    column = {"train_error": "window_error", "train_loss": "window_loss"}.get(spec.early_stop_metric)
    if column is None:
        hit = next((r for r in rows if r[spec.early_stop_metric] < spec.early_stop_below), None)
        return (float(hit["epoch"]), float(hit["cum_seconds"])) if hit else None
    point = next((t for t in trace if t[column] < spec.early_stop_below), None)
    if point is None:
        return None
    epoch = math.ceil(point["epoch"] - 1e-9)
    row = rows[epoch - 1]
    done = point["epoch"] - (epoch - 1)  # fraction of that epoch trained
    return float(point["epoch"]), float(row["cum_seconds"] - row["epoch_seconds"] * (1 - done))


def learned(spec: RunSpec, last: dict) -> bool:
    """False for a run indistinguishable from chance: its final clean training loss is at least CHANCE_LOSS x
    ln(classes), or it predicts a single class. Such a run measures nothing, whatever its error reads."""
    loss = last.get("clean_train_loss", last.get("train_loss", math.nan))
    if not math.isfinite(loss):
        return False
    return loss < CHANCE_LOSS * math.log(spec.model.num_classes) and last.get("predicted_classes", 2) > 1


FLAT_EPOCHS, FLAT_RANGE = 5, 0.01  # validation error within 1 point over the last 5 epochs: flat


def converged(rows: list[dict]) -> bool:
    """Training has converged when the plateau schedule has divided the rate at least twice, or validation error
    has stayed within FLAT_RANGE over the last FLAT_EPOCHS epochs (the regime over-fitting claims need)."""
    drops = sum(1 for p, r in zip(rows, rows[1:]) if r["lr"] < p["lr"] * 0.5)
    tail = [r.get("val_error", math.nan) for r in rows[-FLAT_EPOCHS:]]
    flat = len(rows) >= FLAT_EPOCHS + 1 and all(math.isfinite(v) for v in tail) and max(tail) - min(tail) < FLAT_RANGE
    return drops >= 2 or flat


def summarise(spec: RunSpec, rows: list[dict], status: str, stop_reason: str, error: str,
              env: dict, extra: dict, trace: list[dict] | None = None) -> dict:
    """summary.json: status, final metrics, thresholds crossed, throughput, environment. Plain Python over the
    rows, no DataFrame: this runs once per run, and pandas cost ~1% of a smoke-sized run's wall time here."""
    trace = trace or []
    last = rows[-1] if rows else {}
    metrics = {k: float(last.get(k, float("nan"))) for k in
               ("train_loss", "train_error", "val_loss", "val_error", "clean_train_loss", "clean_train_error",
                "test_loss", "test_error", "test_error_top5")}
    val_errors = [r["val_error"] for r in rows if not math.isnan(r.get("val_error", math.nan))]
    best = min(range(len(val_errors)), key=val_errors.__getitem__) if val_errors else None
    metrics.update(epochs=spec.epochs, epochs_run=len(rows),
                   # the test error at the epoch of the best validation error: chosen on val, read on test
                   best_val_error=val_errors[best] if best is not None else float("nan"),
                   test_error_at_best_val=float(rows[best]["test_error"]) if best is not None else float("nan"),
                   predicted_classes=int(last.get("predicted_classes", 0)),
                   learned=learned(spec, last) if rows else False,
                   lr_drops=sum(1 for p, r in zip(rows, rows[1:]) if r["lr"] < p["lr"] * 0.5),
                   converged=converged(rows),
                   train_seconds=float(sum(r["epoch_seconds"] for r in rows)),
                   images_per_second=float(statistics.median(r["images_per_second"] for r in rows)) if rows
                   else float("nan"),
                   target_metric=spec.early_stop_metric, target_value=spec.early_stop_below or None,
                   epochs_to_target=None, seconds_to_target=None, reached_target=None,
                   loss_target=spec.loss_target or None, epochs_to_loss=None,
                   width=spec.model.width, subset=spec.subset or None, val_size=spec.val_size or None, **extra)
    if spec.early_stop_metric:
        hit = target_time(spec, rows, trace)
        metrics["reached_target"] = hit is not None
        if hit:
            metrics["epochs_to_target"], metrics["seconds_to_target"] = hit
    if spec.loss_target:
        hit_loss = next((t["epoch"] for t in trace if t["window_loss"] < spec.loss_target), None)
        if hit_loss is None:
            hit_loss = next((r["epoch"] for r in rows if r["train_loss"] < spec.loss_target), None)
        metrics["epochs_to_loss"] = float(hit_loss) if hit_loss is not None else None
    return {"run_id": spec.run_id, "grid": spec.grid, "status": status, "stop_reason": stop_reason,
            "error": error, "axes": dict(spec.axes), "spec": spec.to_json(), "metrics": metrics, "env": env,
            "epochs": [dict(r) for r in rows], "trace": [dict(t) for t in trace]}  # the record


def end_of_run(spec: RunSpec, rows: list[dict], trace: list[dict]) -> tuple[str, str, str]:
    """(status, stop_reason, error) after an epoch; stop_reason "epochs" means train on (up to the cap). An early
    stop ends the run at the end of the epoch in which its metric first crossed the target."""
    row = rows[-1]
    if not math.isfinite(row["train_loss"]):
        return "diverged", "diverged", f"non-finite training loss at epoch {row['epoch']}"
    if target_time(spec, rows, trace) is not None:
        return "finished", "early_stop", ""
    return "finished", "epochs", ""


def train_run(spec: RunSpec, data: CifarData, run_dir: Path, device: torch.device | str = "auto",
              context: dict | None = None, on_epoch: Callable[[dict], None] | None = None,
              on_step: Callable[[int, int], None] | None = None,
              shard: tuple[int, int] = (0, 1), wrap: Callable | None = None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
              gather: Callable[[dict], list[dict]] | None = None,
              on_resume: Callable[[int], None] | None = None) -> RunResult:
    """Train (or resume) one run into run_dir. Only rank 0 of a sharded run writes files.

    `wrap` wraps the model (DDP), `reduce` sums a device tensor over ranks, `gather` collects one object
    per rank (every rank's RNG state goes into rank 0's checkpoint); all default to one process.
    Every rank builds the same initial model (seed); after that rank r > 0 reseeds the global RNG (dropout)
    with seed + DROPOUT_RANK_STRIDE * r, so ranks draw independent masks and rank 0 draws what one process
    would."""
    device = pick_device(device) if isinstance(device, str) else device
    keep_freed_memory()
    run_dir = Path(run_dir)
    writer = shard[0] == 0
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "spec.json", spec.to_json())
    reduce = reduce or (lambda t: t)
    started = time.perf_counter()

    torch.manual_seed(spec.seed)
    order_gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    aug_gen = torch.Generator(device=device).manual_seed(spec.seed + 1_000_003 * (shard[0] + 1))
    dd = select_data(spec, data, device)
    aug = BatchAugmenter(compute_input_stats(dd.train_x), spec.preprocess, spec.augment, device=device,
                         compiled=compile_input(spec, len(dd.train_y), device))
    model = build_model(spec.model).to(device)
    if shard[0]:
        torch.manual_seed(spec.seed + DROPOUT_RANK_STRIDE * shard[0])
    if spec.precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, spec)
    sched = make_scheduler(opt, spec)

    rows: list[dict] = []
    trace: list[dict] = []
    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state is None:
        state = load_checkpoint(run_dir / "checkpoint.prev.pt")
    if state is not None and state.get("run_id") == spec.run_id:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ranks = state.get("rng_ranks", [])
        set_rng_state(ranks[shard[0]] if len(ranks) == shard[1] else state["rng"], order_gen, aug_gen)
        rows = list(state["rows"])
        trace = list(state.get("trace", []))
        wall_before = float(state.get("wall", 0.0))
        if on_resume is not None and writer:
            on_resume(len(rows))
    else:
        wall_before = 0.0
    net = wrap(model) if wrap else model

    env = {**environment(spec, data, device, context or {}), "val_fingerprint": dd.val_fingerprint}
    extra = {"model_params": count_params(model), "flops_per_image": train_flops_per_image(spec.model),
             "world_size": shard[1], "train_images": len(dd.train_y), "test_images": len(dd.test_y)}
    # resumed after the epoch that ended the run (killed before its summary was written): train no further
    status, stop_reason, error = end_of_run(spec, rows, trace) if rows else ("finished", "epochs", "")
    cum = rows[-1]["cum_seconds"] if rows else 0.0
    every, last_saved = checkpoint_seconds(), time.perf_counter()
    unsaved: dict | None = None  # the last finished epoch's state when no checkpoint was written after it
    try:
        for epoch in range(len(rows) + 1, spec.epochs + 1 if stop_reason == "epochs" else 0):
            lr = opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            loss_sum, wrong, seen, segments = train_one_epoch(net, opt, dd, aug, spec, device, order_gen,
                                                              aug_gen, on_step, shard)
            totals = reduce(torch.cat([torch.stack([loss_sum.float(), wrong.float(),
                                                    torch.tensor(float(seen), device=device)]),
                                       segments[:, [0, 1, 2]].flatten()])).tolist()
            train_loss, train_err, n_seen = totals[0] / totals[2], totals[1] / totals[2], totals[2]
            seconds = time.perf_counter() - t0
            segs = [totals[3 + 3 * k:6 + 3 * k] for k in range(len(segments))]
            trace += trace_rows(epoch, segs, trace_segments(math.ceil(len(dd.train_y) / spec.batch_size))[1],
                                trace[-TRACE_POINTS:])
            test = evaluate_split(model, dd.test_x, dd.test_y, aug, spec, device, spec.test_crops, shard, reduce)
            clean = evaluate_split(model, dd.clean_x, dd.clean_y, aug, spec, device, 1, shard, reduce)
            val = evaluate_split(model, dd.val_x, dd.val_y, aug, spec, device, 1, shard, reduce) \
                if dd.val_x is not None else None
            step_scheduler(sched, val.error if val else math.nan)
            cum += seconds
            row = dict(epoch=epoch, lr=lr, train_loss=train_loss, train_error=train_err,
                       val_loss=val.loss if val else math.nan, val_error=val.error if val else math.nan,
                       clean_train_loss=clean.loss, clean_train_error=clean.error,
                       predicted_classes=clean.predicted_classes, test_loss=test.loss, test_error=test.error,
                       test_error_top5=test.error_top5, epoch_seconds=seconds, images_per_second=n_seen / seconds,
                       cum_seconds=cum)
            rows.append(row)
            status, stop_reason, error = end_of_run(spec, rows, trace)
            rng = rng_state(order_gen, aug_gen)
            rng_ranks = gather(rng) if gather is not None else []  # a collective: every rank calls it
            if writer:
                state = {"run_id": spec.run_id, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "rng": rng, "rng_ranks": rng_ranks, "rows": list(rows),
                         "trace": list(trace), "wall": wall_before + time.perf_counter() - started}
                if time.perf_counter() - last_saved >= every:
                    save_checkpoint_rotating(run_dir, state)
                    atomic_write_text(run_dir / "epochs.csv", rows_csv(rows, EPOCH_COLUMNS))
                    atomic_write_text(run_dir / "trace.csv", rows_csv(trace, TRACE_COLUMNS))
                    last_saved, unsaved = time.perf_counter(), None
                elif stop_reason == "epochs" and epoch < spec.epochs:  # written if Ctrl-C stops the run; a copy,
                    # because the next epoch trains the live tensors on
                    unsaved = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)
                else:  # the run's last epoch: nothing trains after it, so the live tensors stay its state
                    unsaved = state
            if on_epoch is not None:
                on_epoch(row)
            if stop_reason != "epochs":
                break
    except (KeyboardInterrupt, SystemExit):
        if unsaved is not None:
            save_checkpoint_rotating(run_dir, unsaved)
        raise  # the last finished epoch's checkpoint is on disk: the run resumes from it
    except Exception as err:  # noqa: BLE001 - a failed run is a row, not a crash (the grid goes on)
        if isinstance(err, OSError) or type(err).__name__ == "UserError":
            raise
        status, stop_reason, error = "failed", "error", f"{type(err).__name__}: {err}"
        traceback.print_exc()
        if unsaved is not None:  # a failed run resumes when rerun: from its last finished epoch
            save_checkpoint_rotating(run_dir, unsaved)

    extra["wall_seconds"] = wall_before + time.perf_counter() - started
    if rows and dd.clean_x is not None:
        with autocast(device, spec.precision):
            fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format
            extra.update(lrn_activity(model, aug.eval(dd.clean_x[:LRN_PROBE_IMAGES]).contiguous(memory_format=fmt)))
    summary = summarise(spec, rows, status, stop_reason, error, env, extra, trace)
    if writer:
        try:
            atomic_write_text(run_dir / "epochs.csv", rows_csv(rows, EPOCH_COLUMNS))  # killed before? rewrite
            atomic_write_text(run_dir / "trace.csv", rows_csv(trace, TRACE_COLUMNS))
            atomic_write_bytes(run_dir / "model.pt", _state_bytes(model))
            atomic_write_json(run_dir / "summary.json", summary)
        except KeyboardInterrupt:  # before the summary made the run finished: keep its last epoch
            if unsaved is not None:
                save_checkpoint_rotating(run_dir, unsaved)
            raise
        if status != "failed":  # a failed run (e.g. a lost rank) resumes from its last epoch when rerun
            for name in ("checkpoint.pt", "checkpoint.prev.pt"):
                (run_dir / name).unlink(missing_ok=True)
    return RunResult(spec.run_id, status, stop_reason, rows, summary, error)


def save_checkpoint_rotating(run_dir: Path, state: dict) -> None:
    """Keep the previous checkpoint until the new one is safely on disk (a torn write falls back to it)."""
    cur, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    if cur.exists():
        os.replace(cur, prev)
    save_checkpoint(cur, state)


def _state_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()
