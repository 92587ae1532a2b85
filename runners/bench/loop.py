"""The run-loop workloads of `ablate bench`: train_run (setup, steps, metrics, evaluation, checkpoints, files)
against a bare script of the same run, so the loop's own overhead is measured on a real cpu-budget epoch."""
from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ablations.spec import RunSpec
from runners.augment import BatchAugmenter, compute_input_stats
from runners.bench.harness import Workload, timed, using_threads
from runners.bench.workloads import model_label, prepared_model
from runners.data import CifarData
from runners.train import EVAL_BATCH, DeviceData, autocast, make_optimizer, select_data, train_run


def loop_spec(quick: bool = False) -> RunSpec:
    """The run the loop-overhead target is measured on: one real epoch of a cpu-budget run (the dropout grid's
    first: AlexNet width 0.5, 10,000 training images, validation, clean-train and test evaluation), where the
    loop's fixed costs weigh what they weigh in a real run; or, with quick, the smoke grid's first run. No early
    stopping, so that every call trains the same epochs."""
    from ablations.grid import expand, load_grid

    spec = expand(load_grid("smoke"))[0] if quick else expand(load_grid("dropout"), "cpu")[0]
    return dataclasses.replace(spec, epochs=spec.epochs if quick else 1, early_stop_metric="",
                               early_stop_below=0.0)


LOOP_RUN, LOOP_BARE = "train_run (whole run loop)", "bare train steps"
LOOP_BARE_EVAL = "bare script: setup + steps + eval"


def loop_workloads(spec: RunSpec, data: CifarData, device: torch.device, tmp: Path, threads: int,
                   runs_per_call: int = 1, calls_per_round: int = 1) -> list[Workload]:
    """train_run (its setup, steps, metrics, evaluation, checkpoints, CSVs, summary) against a bare script of the
    same run, which any trainer needs: select the data, its input statistics, build the model and optimiser,
    take the same steps, run the same evaluation forwards (test, clean-train slice, validation), and nothing
    else. Also the bare steps alone, on a model built once (the strictest baseline). Each train_run starts in a
    fresh folder. A call is `runs_per_call` runs: a run of well under a second needs several to time steadily."""
    counter = itertools.count()
    dirs: list[Path] = []

    def before() -> None:
        dirs.append(tmp / f"run{next(counter)}")

    def after() -> None:
        shutil.rmtree(dirs.pop(), ignore_errors=True)

    fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format

    def setup():
        torch.manual_seed(spec.seed)
        dd = select_data(spec, data, device)
        aug = BatchAugmenter(compute_input_stats(dd.train_x), spec.preprocess, spec.augment, device=device)
        model = prepared_model(spec.model, spec.precision, device)
        return dd, aug, model, make_optimizer(model, spec)

    def steps(dd: DeviceData, aug: BatchAugmenter, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        model.train()
        gen = torch.Generator(device=device).manual_seed(spec.seed)
        for _ in range(spec.epochs):
            perm = torch.randperm(len(dd.train_y), device=device)
            for i in range(0, len(dd.train_y), spec.batch_size):
                idx = perm[i:i + spec.batch_size]
                x = aug(dd.train_x.index_select(0, idx), gen, fmt)  # (B, 3, 32, 32)
                with autocast(device, spec.precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), dd.train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    @torch.no_grad()
    def eval_forwards(dd: DeviceData, aug: BatchAugmenter, model: torch.nn.Module) -> None:
        model.eval()
        splits = [x for x in (dd.test_x, dd.clean_x, dd.val_x) if x is not None]
        for _ in range(spec.epochs):
            for split in splits:
                for i in range(0, len(split), EVAL_BATCH):
                    x = aug.eval(split[i:i + EVAL_BATCH]).contiguous(memory_format=fmt)  # (b, 3, 32, 32)
                    with autocast(device, spec.precision):
                        model(x)

    built = setup()

    def bare_steps() -> None:
        for _ in range(runs_per_call):
            steps(*built)

    def bare_script() -> None:
        for _ in range(runs_per_call):
            dd, aug, model, opt = setup()
            steps(dd, aug, model, opt)
            eval_forwards(dd, aug, model)

    def full() -> None:
        for i in range(runs_per_call):
            train_run(spec, data, dirs[-1] / f"run{i}", device)

    with using_threads(threads):  # warm-up: the first run pays one-off costs (imports, FLOP count, allocator)
        timed(full, device, before, after)
        bare_script()
    items, label = runs_per_call * spec.epochs * len(built[0].train_y), model_label(spec.model)
    note = f"{spec.grid} spec: {len(built[0].train_y)} images x {spec.epochs} epoch(s), batch {spec.batch_size}, " \
           f"{spec.precision}"
    n = calls_per_round
    return [Workload(LOOP_RUN, "loop", full, items, threads, model=label, precision=spec.precision, before=before,
                     after=after, base=LOOP_BARE_EVAL, note=note, calls_per_round=n),
            Workload(LOOP_BARE, "loop", bare_steps, items, threads, model=label, precision=spec.precision,
                     note="the same steps on a model built once: no setup, metrics, files or evaluation",
                     calls_per_round=n),
            Workload(LOOP_BARE_EVAL, "loop", bare_script, items, threads, model=label, precision=spec.precision,
                     note="data, input stats, model, optimiser; the same steps and evaluation forwards",
                     calls_per_round=n)]
