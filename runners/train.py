"""Train one resolved RunSpec: SGD, a schedule, per-epoch metrics, a checkpoint every 30 s of training, resume.

The data set lives on the training device as uint8; each batch is gathered, augmented and normalised there
(runners/augment.py). Metrics are summed on the device and read once per epoch: no host sync per batch.
A checkpoint holds model, optimiser, scheduler and every RNG, so a resumed run on the CPU ends bit-for-bit
where an uninterrupted one ends. Evaluation lives in runners/evaluate.py, what the rows mean (the Figure 1 trace,
times to a target, the chance guard, the summary) in runners/metrics.py."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import math
import os
import platform
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
from runners.augment import BatchAugmenter, compute_input_stats
from runners.data import CifarData
from runners.evaluate import EVAL_BATCH, Evaluation, autocast, evaluate, evaluate_split, lrn_activity  # noqa: F401
from runners.provenance import git_state, suite_version
from runners.metrics import (CHANCE_LOSS, TRACE_POINTS, converged, end_of_run, learned, summarise,  # noqa: F401
                             target_time, trace_rows, trace_segments)
from runners.store import (EPOCH_COLUMNS, TRACE_COLUMNS, atomic_write_bytes, atomic_write_json, atomic_write_text,
                           load_checkpoint, rows_csv, save_checkpoint)

CLEAN_TRAIN_IMAGES = 2000  # the fixed training slice evaluated in eval mode each epoch (the fair gap, the chance guard)
LRN_PROBE_IMAGES = 256  # clean training images through which the LRN activity diagnostic is measured
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


@dataclass(frozen=True)
class TrainOptions:
    """How runs are trained, apart from what they are (RunSpec): set once at the CLI and passed as an argument
    to every launcher and worker process, so no setting travels through the environment.

    checkpoint_seconds: after an epoch, a checkpoint is written once this many seconds of training have passed
    since the last (0: after every epoch). A checkpoint of the CIFAR AlexNet (~15M weights and their momenta)
    is ~120 MB and fsynced: after every few-second GPU epoch it would rival the epoch itself. A kill loses at
    most this much plus one epoch, and the resumed run is bit-identical whatever the interval.
    nnodes, node_rank, rdzv: where the ranks of a multi-device run live (runners/ddp.py)."""

    checkpoint_seconds: float = CHECKPOINT_SECONDS
    nnodes: int = 1
    node_rank: int = 0
    rdzv: str = ""  # HOST:PORT on node 0; only for nnodes > 1


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
    import numpy
    import torchvision

    commit, dirty = git_state()
    return {"suite_version": suite_version(), "git_commit": commit, "git_dirty": dirty,
            "torchvision_version": torchvision.__version__, "numpy_version": numpy.__version__}


def train_run(spec: RunSpec, data: CifarData, run_dir: Path, device: torch.device | str = "auto",
              context: dict | None = None, on_epoch: Callable[[dict], None] | None = None,
              on_step: Callable[[int, int], None] | None = None,
              shard: tuple[int, int] = (0, 1), wrap: Callable | None = None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
              gather: Callable[[dict], list[dict]] | None = None,
              on_resume: Callable[[int], None] | None = None,
              checkpoint_seconds: float = CHECKPOINT_SECONDS) -> RunResult:
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
    every, last_saved = checkpoint_seconds, time.perf_counter()
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
