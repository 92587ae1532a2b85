"""Train one resolved RunSpec: SGD, a schedule, per-epoch metrics, a checkpoint every 30 s of training, resume.

The data set lives on the training device as uint8; each batch is gathered, augmented and normalised there
(runners/augment.py). Metrics are summed on the device and read once per epoch: no host sync per batch.
A checkpoint holds model, optimiser, scheduler and every RNG, so a resumed run on the CPU ends bit-for-bit
where an uninterrupted one ends. Evaluation lives in runners/evaluate.py, what the rows mean (the Figure 1 trace,
times to a target, the chance guard, the summary) in runners/metrics.py."""
from __future__ import annotations

import io
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ablations.models import build_model, count_params, train_flops_per_image
from ablations.spec import RunSpec
from runners.augment import BatchAugmenter, compute_input_stats
from runners.data import CifarData
from runners.evaluate import EVAL_BATCH, Evaluation, autocast, evaluate, evaluate_split, lrn_activity  # noqa: F401
from runners.metrics import (CHANCE_LOSS, TRACE_POINTS, converged, end_of_run, learned, summarise,  # noqa: F401
                             target_time, trace_rows, trace_segments)
from runners.checkpoint import Checkpointer
from runners.device_data import DeviceData, check_data_fits, select_data  # noqa: F401
from runners.devices import environment, keep_freed_memory, pick_device  # noqa: F401
from runners.store import RunFolder

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


    # a test_subset beyond the test set means all of it: clamped, and the count used is recorded (test_images)


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
        # index_select, not x[idx]: the same rows, ~9x faster on the CPU for uint8 images (`ablate bench`)
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


@dataclass
class Trainee:
    """What one run trains, built in a fixed order: the RNG draws, and so the run, depend on it."""
    dd: DeviceData
    aug: BatchAugmenter
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    order_gen: torch.Generator
    aug_gen: torch.Generator


def build_trainee(spec: RunSpec, data: CifarData, device: torch.device, shard: tuple[int, int]) -> Trainee:
    """Seeds, data on the device, augmenter, model, optimiser and schedule. Every rank builds the same initial
    model (seed); after that rank r > 0 reseeds the global RNG (dropout) with seed + DROPOUT_RANK_STRIDE * r, so
    ranks draw independent masks and rank 0 draws what one process would."""
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
    return Trainee(dd, aug, model, opt, make_scheduler(opt, spec), order_gen, aug_gen)


def resume(t: Trainee, state: dict | None, spec: RunSpec, shard: tuple[int, int]) -> tuple[list, list, float]:
    """Load this run's checkpoint into t: (epoch rows, trace, wall seconds so far); nothing for another run's."""
    if state is None or state.get("run_id") != spec.run_id:
        return [], [], 0.0
    t.model.load_state_dict(state["model"])
    t.opt.load_state_dict(state["opt"])
    t.sched.load_state_dict(state["sched"])
    ranks = state.get("rng_ranks", [])
    set_rng_state(ranks[shard[0]] if len(ranks) == shard[1] else state["rng"], t.order_gen, t.aug_gen)
    return list(state["rows"]), list(state.get("trace", [])), float(state.get("wall", 0.0))


def run_epoch(net: torch.nn.Module, t: Trainee, spec: RunSpec, device: torch.device, epoch: int, cum: float,
              trace: list[dict], on_step: Callable[[int, int], None] | None, shard: tuple[int, int],
              reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Train one epoch, evaluate test, clean-train and validation data, step the schedule; the epoch's row (the
    Figure 1 trace grows in place). One host sync for the training sums, summed over ranks."""
    dd = t.dd
    lr = t.opt.param_groups[0]["lr"]
    t0 = time.perf_counter()
    loss_sum, wrong, seen, segments = train_one_epoch(net, t.opt, dd, t.aug, spec, device, t.order_gen, t.aug_gen,
                                                      on_step, shard)
    totals = reduce(torch.cat([torch.stack([loss_sum.float(), wrong.float(), torch.tensor(float(seen), device=device)]),
                               segments[:, [0, 1, 2]].flatten()])).tolist()
    train_loss, train_err, n_seen = totals[0] / totals[2], totals[1] / totals[2], totals[2]
    seconds = time.perf_counter() - t0
    segs = [totals[3 + 3 * k:6 + 3 * k] for k in range(len(segments))]
    trace += trace_rows(epoch, segs, trace_segments(math.ceil(len(dd.train_y) / spec.batch_size))[1],
                        trace[-TRACE_POINTS:])
    test = evaluate_split(t.model, dd.test_x, dd.test_y, t.aug, spec, device, spec.test_crops, shard, reduce)
    # a multi-view test also reads the plain view of the same net: the test-time effect, paired within one run
    one = evaluate_split(t.model, dd.test_x, dd.test_y, t.aug, spec, device, 1, shard, reduce) \
        if spec.test_crops > 1 else None
    clean = evaluate_split(t.model, dd.clean_x, dd.clean_y, t.aug, spec, device, 1, shard, reduce)
    val = evaluate_split(t.model, dd.val_x, dd.val_y, t.aug, spec, device, 1, shard, reduce) \
        if dd.val_x is not None else None
    step_scheduler(t.sched, val.error if val else math.nan)
    return dict(epoch=epoch, lr=lr, train_loss=train_loss, train_error=train_err,
                val_loss=val.loss if val else math.nan, val_error=val.error if val else math.nan,
                clean_train_loss=clean.loss, clean_train_error=clean.error,
                predicted_classes=clean.predicted_classes, test_loss=test.loss, test_error=test.error,
                test_error_top5=test.error_top5,
                **({"test_loss_1view": one.loss, "test_error_1view": one.error} if one else {}),
                epoch_seconds=seconds, images_per_second=n_seen / seconds, cum_seconds=cum + seconds)


def checkpoint_state(spec: RunSpec, t: Trainee, rng: dict, rng_ranks: list, rows: list, trace: list,
                     wall: float) -> dict:
    return {"run_id": spec.run_id, "model": t.model.state_dict(), "opt": t.opt.state_dict(),
            "sched": t.sched.state_dict(), "rng": rng, "rng_ranks": rng_ranks, "rows": list(rows),
            "trace": list(trace), "wall": wall}


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
    per rank (every rank's RNG state goes into rank 0's checkpoint); all default to one process."""
    device = pick_device(device) if isinstance(device, str) else device
    keep_freed_memory()
    folder, writer, reduce = RunFolder(Path(run_dir)), shard[0] == 0, reduce or (lambda x: x)
    if writer:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.write_spec(spec.to_json())
    started = time.perf_counter()
    t = build_trainee(spec, data, device, shard)
    rows, trace, wall_before = resume(t, folder.resume_state(), spec, shard)
    if rows and on_resume is not None and writer:
        on_resume(len(rows))
    net = wrap(t.model) if wrap else t.model
    env = {**environment(spec, data, device, context or {}), "val_fingerprint": t.dd.val_fingerprint}
    extra = {"model_params": count_params(t.model), "flops_per_image": train_flops_per_image(spec.model),
             "world_size": shard[1], "train_images": len(t.dd.train_y), "test_images": len(t.dd.test_y)}
    # resumed after the epoch that ended the run (killed before its summary was written): train no further
    status, stop_reason, error = end_of_run(spec, rows, trace) if rows else ("finished", "epochs", "")
    ckpt = Checkpointer(folder, checkpoint_seconds, time.perf_counter)
    try:
        for epoch in range(len(rows) + 1, spec.epochs + 1 if stop_reason == "epochs" else 0):
            row = run_epoch(net, t, spec, device, epoch, rows[-1]["cum_seconds"] if rows else 0.0, trace, on_step,
                            shard, reduce)
            rows.append(row)
            status, stop_reason, error = end_of_run(spec, rows, trace)
            rng = rng_state(t.order_gen, t.aug_gen)
            rng_ranks = gather(rng) if gather is not None else []  # a collective: every rank calls it
            if writer:
                state = checkpoint_state(spec, t, rng, rng_ranks, rows, trace,
                                         wall_before + time.perf_counter() - started)
                ckpt.after_epoch(state, rows, trace, trains_on=stop_reason == "epochs" and epoch < spec.epochs)
            if on_epoch is not None:
                on_epoch(row)
            if stop_reason != "epochs":
                break
    except (KeyboardInterrupt, SystemExit):
        ckpt.save_unsaved()
        raise  # the last finished epoch's checkpoint is on disk: the run resumes from it
    except Exception as err:  # noqa: BLE001 - a failed run is a row, not a crash (the grid goes on)
        if isinstance(err, OSError) or type(err).__name__ == "UserError":
            raise
        status, stop_reason, error = "failed", "error", f"{type(err).__name__}: {err}"
        traceback.print_exc()
        ckpt.save_unsaved()  # a failed run resumes when rerun: from its last finished epoch

    extra["wall_seconds"] = wall_before + time.perf_counter() - started
    if rows and t.dd.clean_x is not None:
        extra.update(lrn_probe(t, spec, device))
    summary = summarise(spec, rows, status, stop_reason, error, env, extra, trace)
    if writer:
        try:
            folder.write_result(rows, trace, weights_bytes(t.model), summary)  # the summary last: then it is done
        except KeyboardInterrupt:  # before the summary made the run finished: keep its last epoch
            ckpt.save_unsaved()
            raise
        if status != "failed":  # a failed run (e.g. a lost rank) resumes from its last epoch when rerun
            folder.drop_checkpoints()
    return RunResult(spec.run_id, status, stop_reason, rows, summary, error)


def lrn_probe(t: Trainee, spec: RunSpec, device: torch.device) -> dict:
    """The LRN activity diagnostic on a slice of clean training images, in the run's precision and layout."""
    with autocast(device, spec.precision):
        fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format
        return lrn_activity(t.model, t.aug.eval(t.dd.clean_x[:LRN_PROBE_IMAGES]).contiguous(memory_format=fmt))


def weights_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()
