"""The full `ablate bench`: plan the workloads, time them interleaved, summarise them into the CSV's rows, check
the targets, read and write the CSV, and print the table."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ablations.errors import UserError
from ablations.models import ModelSpec
from runners.augment import (
    AUGMENT_LEVELS,
)
from runners.bench.harness import (
    Workload,
    achieved_flops,
    efficiency,
    median,
    overhead,
    ratio,
    time_interleaved,
)
from runners.bench.loop import LOOP_BARE, LOOP_BARE_EVAL, LOOP_RUN, loop_spec, loop_workloads
from runners.bench.workloads import (
    CONVNET4,
    CSV_COLUMNS,
    SEED_ALEXNET,
    SUITE_ALEXNET,
    TRAIN_AUGMENT,
    DeviceSet,
    model_label,
    threads_label,
    conv_pass_workloads,
    eval_workload,
    gemm_workload,
    kernel_bound,
    pipeline_workload,
    reference_workload,
    train_workload,
)
from runners.data import CifarData, load_dataset, make_synthetic
from runners.devices import device_name, keep_freed_memory, pick_device
from runners.train import COMPILED_INPUT_IMAGES

# ---------------------------------------------------------------------------------------------------------------
# The bench


@dataclass(frozen=True)
class BenchConfig:
    model: str = "all"  # all | alexnet | convnet4
    batch_size: int = 128
    device: str = "auto"
    repeats: int = 5
    quick: bool = False
    compile: bool | None = None  # None: on unless quick
    threads: int | None = None  # the many-threads setting (default: all of torch's); 1 thread is always timed too
    data_dir: Path | None = None

    @property
    def min_seconds(self) -> float:
        return 0.3 if self.quick else 0.6


@dataclass
class BenchResult:
    rows: pd.DataFrame  # CSV_COLUMNS
    data_label: str


def bench_data(data_dir: Path | None) -> tuple[CifarData, str, bool]:
    """The cached CIFAR-10 (real), else generated data of the same shape (every row then says so)."""
    try:
        data = load_dataset("cifar10", data_dir)
        return data, data.meta.get("label", "CIFAR-10"), True
    except UserError:
        return make_synthetic("cifar10", 50_000, 10_000, seed=0), "synthetic data", False


def plan_workloads(cfg: BenchConfig, device: torch.device, data: CifarData, dset: DeviceSet, ref_root: Path | None,
                   data_label: str, tmp: Path, say: Callable[[str], None]) -> list[Workload]:
    """Build (and warm up) everything the bench times, in table order.

    Thread counts: on a CPU the main rows run at 1 thread and at all threads (`many`), and so does the
    reference. On a shared 2-core machine two threads collapse whenever a neighbour runs (the threads of a
    parallel kernel wait for each other), so both are shown; switches, eval, pipeline and the loop check run at
    1 thread. --quick keeps the suite at 1 thread and the reference as written."""
    b, s = cfg.batch_size, cfg.min_seconds
    many = cfg.threads or torch.get_num_threads()
    counts = (1,) if device.type == "cuda" or many == 1 or cfg.quick else (1, many)  # the suite's thread counts
    reference_counts = (many,) if cfg.quick or many == 1 else (many, 1)  # as written (torch's default) first
    compile_on = (not cfg.quick) if cfg.compile is None else cfg.compile
    alexnet, convnet4 = cfg.model in ("all", "alexnet"), cfg.model in ("all", "convnet4")
    loads: list[Workload] = []

    def add(builder: Callable[[], Workload | list[Workload]], what: str) -> None:
        say(f"preparing {what}")
        made = builder()
        loads.extend(made if isinstance(made, list) else [made])

    for t in sorted(set(counts) | set(reference_counts if alexnet else ())):  # a ceiling for every row's threads
        # the ceiling is the best of these sizes: on an AMX CPU a 1024 bf16 GEMM (in L2) reaches ~1.1 TFLOP/s,
        # 4096 ~0.7-0.9 (results/bench/cpu-2026*.csv): a single size would flatter the efficiency
        for p, n in (("fp32", 1024), ("fp32", 2048), ("bf16", 1024), ("bf16", 2048)) + \
                ((("bf16", 4096),) if not cfg.quick else ()):
            add(lambda n=n, p=p, t=t: gemm_workload(n, p, device, s / 2, t), f"GEMM {p} {n}, {threads_label(t)}")
    if alexnet and ref_root is not None:
        for t in reference_counts:
            name = f"reference fp32, DataLoader, {threads_label(t)}" + (" (as written)" if t == many else "")
            add(lambda t=t, name=name: reference_workload(ref_root, b, device, s, t, name,
                                                          note=f"seed chapter code; flip only; {data_label}"), name)

    def family(section: str, spec: ModelSpec, title: str, switches: list[tuple[str, ModelSpec, str]]) -> None:
        base = f"{title} bf16+cl, 1 thread"
        for t in counts:
            if not cfg.quick:
                add(lambda t=t: train_workload(f"{title} fp32, {threads_label(t)}", section, spec, dset, b, "fp32",
                                               device, s, t, base=base, note="NCHW"),
                    f"{title} fp32 {threads_label(t)}")
            add(lambda t=t: train_workload(f"{title} bf16+cl, {threads_label(t)}", section, spec, dset, b, "bf16",
                                           device, s, t, base="" if t == 1 else base),
                f"{title} bf16 {threads_label(t)}")
        if compile_on:
            add(lambda: train_workload(f"{title} bf16+cl compiled, 1 thread", section, spec, dset, b, "bf16",
                                       device, s, 1, compile_model=True, base=base),
                f"{title} compiled (compiling takes minutes on 2 cores)")
        if cfg.quick:
            return
        for label, sw, aug in switches:
            add(lambda sw=sw, aug=aug, label=label: dataclasses.replace(train_workload(
                f"{title} bf16+cl {label}, 1 thread", section, sw, dset, b, "bf16", device, s, 1, augment=aug,
                base=base), switch=label), f"{title} {label}")
        one = f"{title} eval 1 view, 1 thread"
        add(lambda: eval_workload(one, spec, dset, "bf16", 1, device, s, 1), one)
        add(lambda: eval_workload(f"{title} eval 10 crops, 1 thread", spec, dset, "bf16", 10, device, s, 1,
                                  base=one), f"{title} eval 10 crops")

    if alexnet:
        r = dataclasses.replace
        family("alexnet", SEED_ALEXNET, "alexnet (seed layout)", [
            ("LRN", r(SEED_ALEXNET, lrn=True), TRAIN_AUGMENT),
            ("towers=2", r(SEED_ALEXNET, towers=2), TRAIN_AUGMENT),
            ("tanh", r(SEED_ALEXNET, activation="tanh"), TRAIN_AUGMENT),
            ("PCA lighting", SEED_ALEXNET, "crop_flip_pca"),
            ("3x3/2 pools, no dropout (suite default)", SUITE_ALEXNET, TRAIN_AUGMENT),
        ])
    if alexnet and not cfg.quick:
        add(lambda: conv_pass_workloads(SEED_ALEXNET, b, device, s / 2), "alexnet (seed layout) conv passes")
    if convnet4:
        family("convnet4", CONVNET4, "convnet4", [
            ("rnorm (layers-18pct)", dataclasses.replace(CONVNET4, lrn=True), TRAIN_AUGMENT),
            ("tanh", dataclasses.replace(CONVNET4, activation="tanh"), TRAIN_AUGMENT),
            ("PCA lighting", CONVNET4, "crop_flip_pca"),
        ])
    for level in AUGMENT_LEVELS:
        add(lambda level=level: pipeline_workload(level, dset, b, device, s / 2, 1), f"pipeline {level}")
    if device.type == "cpu" and compile_on:
        for level in AUGMENT_LEVELS[1:]:  # "none" is normalisation alone: nothing to fuse
            add(lambda level=level: pipeline_workload(level, dset, b, device, s / 2, 1, compiled=True),
                f"pipeline {level} compiled")
    if cfg.quick:  # the smoke run: 0.2 s, several per call and per round to time it at all
        add(lambda: loop_workloads(loop_spec(quick=True), data, device, tmp, 1, runs_per_call=4, calls_per_round=3),
            "the run-loop overhead check")
    else:
        add(lambda: loop_workloads(loop_spec(), data, device, tmp, 1), "the run-loop overhead check (one real epoch)")
    return loads


TRAIN_SECTIONS = ("reference", "alexnet", "convnet4")


def summarise(loads: list[Workload], times: dict[str, list[float]], context: dict) -> pd.DataFrame:
    """One CSV_COLUMNS row per workload: median rate, its range, ratios, FLOP/s and efficiency.

    A row's ceiling is the fastest single GEMM timing of its precision at any size and at its thread count or
    fewer. Rates are medians, but a ceiling is what the hardware can do: noise from neighbours only ever slows a
    timing, and two threads can do at least what one does. (In results/bench/cpu-20261129-081005.csv the
    2-thread bf16 1024 GEMM median, 0.53 TFLOP/s, sits below the 1-thread one, 0.58: a median ceiling would
    flatter every 2-thread row.)
    vs_reference divides by the faster reference row (the reference at its best). A pipeline row's base is the
    fastest training row at its thread count (the hungriest consumer: in training, the input pipeline runs on
    the same threads as the step), so its vs_base is the pipeline's headroom."""
    rates = {w.name: [w.items / t for t in times[w.name]] for w in loads}
    med = {name: median(r) for name, r in rates.items()}
    gemms = [w for w in loads if w.section == "ceiling"]
    ceilings = {(w.precision, w.threads): max(max(rates[g.name]) for g in gemms
                                              if g.precision == w.precision and g.threads <= w.threads)
                for w in gemms}
    reference = max([med[w.name] for w in loads if w.section == "reference"], default=float("nan"))
    trains = [w for w in loads if w.section in ("alexnet", "convnet4")]

    def consumer(threads: int) -> str:  # the fastest training row on as many threads as the pipeline row had
        same = [w for w in trains if w.threads == threads]
        return max(same, key=lambda w: med[w.name]).name if same else ""

    rows = []
    for w in loads:
        rate = med[w.name]
        base = consumer(w.threads) if w.section == "pipeline" else w.base
        counted = w.section in (*TRAIN_SECTIONS, "eval", "kernels")
        ceiling = ceilings.get((w.precision, w.threads), float("nan")) if counted else float("nan")
        rows.append(dict(
            section=w.section, name=w.name, model=w.model, switch=w.switch, precision=w.precision,
            channels_last=w.channels_last,
            compiled=w.compiled, threads=w.threads, batch=context.get("batch", ""), unit=w.unit, rate=rate,
            rate_min=min(rates[w.name]), rate_max=max(rates[w.name]), repeats=len(rates[w.name]),
            items_per_call=w.items,
            vs_reference=ratio(rate, reference) if w.section in ("reference", "alexnet") else float("nan"),
            base=base, vs_base=ratio(rate, med.get(base, float("nan"))),
            flops_per_item=w.flops_per_item if counted else float("nan"),
            achieved_flops=achieved_flops(rate, w.flops_per_item) if counted else float("nan"),
            ceiling_flops=ceiling, efficiency=efficiency(rate, w.flops_per_item, ceiling),
            compile_seconds=w.compile_seconds, note=w.note,
            **{k: context.get(k, "") for k in ("data", "device", "device_name", "torch_version", "date")}))
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


@dataclass(frozen=True)
class Target:
    key: str
    title: str
    value: float
    goal: float
    at_most: bool  # True: value must be <= goal (overhead); False: >= goal
    detail: str

    @property
    def met(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.goal if self.at_most else self.value >= self.goal


def check_targets(rows: pd.DataFrame) -> list[Target]:
    """The bench's targets, from one run's rows (a target whose rows were not measured is left out): the suite
    against the seed chapter's reference, the share of the GEMM ceiling, the pipeline's headroom over training,
    and the run loop's overhead."""
    out = []
    seed = rows[(rows.section == "alexnet") & (rows.model == model_label(SEED_ALEXNET))
                & (rows.switch.fillna("") == "")]
    if len(seed) and seed.vs_reference.notna().any():
        best = seed.loc[seed.vs_reference.idxmax()]
        out.append(Target("vs-reference", "suite AlexNet training vs the faster reference row", best.vs_reference,
                          2.0, False,
                          f"{best['name']}: {best.rate:.0f} vs {best.rate / best.vs_reference:.0f} images/s"))
    bf16 = seed[seed.precision == "bf16"]
    if len(bf16) and bf16.efficiency.notna().any():
        best = bf16.loc[bf16.efficiency.idxmax()]
        bound = kernel_bound(rows, float(best.flops_per_item), int(best.batch))
        out.append(Target("bf16-gemm-share", "AlexNet training FLOP/s as a share of the measured bf16 GEMM ceiling",
                          best.efficiency, 0.75, False,
                          f"{best['name']}: {best.achieved_flops / 1e12:.3f} of {best.ceiling_flops / 1e12:.3f} "
                          f"TFLOP/s at {threads_label(int(best.threads))}" + (
                              f"; its conv kernels alone, at their 1-thread rates, would allow {bound:.0%}"
                              if math.isfinite(bound) else "")))
    every = rows[rows.section == "pipeline"]
    pipe = every[~every.compiled.astype(bool)]  # eager: what every run gets
    fused = every[every.compiled.astype(bool)]
    if len(pipe):
        worst = pipe.loc[pipe.rate.idxmin()]
        if len(seed):  # the model of the two targets above
            best = seed.loc[seed.rate.idxmax()]
            out.append(Target("pipeline-headroom-alexnet", "pipeline (slowest level) / AlexNet training rate",
                              worst.rate / best.rate, 20.0, False,
                              f"{worst['name']}: {worst.rate:.0f} images/s vs {best['name']}: {best.rate:.0f}"))
        if worst.base:  # the hungriest consumer measured (convnet4 when it was timed)
            out.append(Target("pipeline-headroom", "pipeline (slowest level) / fastest training rate", worst.vs_base,
                              20.0, False, f"{worst['name']}: {worst.rate:.0f} images/s vs {worst.base}"))
    if len(fused) and fused.base.iloc[0]:
        worst = fused.loc[fused.rate.idxmin()]
        out.append(Target("pipeline-headroom-compiled", "compiled pipeline (slowest level) / fastest training rate",
                          worst.vs_base, 20.0, False,
                          f"{worst['name']}: {worst.rate:.0f} images/s vs {worst.base}; what CPU runs of "
                          f">= {COMPILED_INPUT_IMAGES:,} training images use"))
    loop = rows[rows.section == "loop"].set_index("name")
    if {LOOP_RUN, LOOP_BARE, LOOP_BARE_EVAL} <= set(loop.index):
        # From each row's fastest call: the overhead is a fixed amount of extra work and neighbours only add
        # time, so the least disturbed calls compare it best (medians mix in the calls a neighbour slowed).
        best = loop.rate_max
        excl = overhead(1 / best[LOOP_RUN], 1 / best[LOOP_BARE_EVAL])
        incl = overhead(1 / best[LOOP_RUN], 1 / best[LOOP_BARE])
        medians = overhead(1 / loop.rate[LOOP_RUN], 1 / loop.rate[LOOP_BARE_EVAL])
        real = str(loop.note[LOOP_RUN]).startswith("dropout spec")
        out.append(Target("loop-overhead", "run-loop overhead on " + (
            "one cpu-budget epoch" if real else "the smoke run (--quick)"), excl, 0.01 if real else 0.05, True,
                          f"fastest calls, vs a bare script of the same run (setup, steps, eval forwards); "
                          f"{incl:.1%} vs the steps alone on a prebuilt model; {medians:.1%} from the medians"))
    return out


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> BenchResult:
    """Prepare, warm up and time every workload of the plan in interleaved rounds; return the rows."""
    from runners.reference import export_cifar10

    if cfg.repeats < 1 or cfg.batch_size < 1 or (cfg.threads is not None and cfg.threads < 1):
        raise UserError(f"--repeats, --batch-size and --threads must be >= 1, got {cfg.repeats}, {cfg.batch_size} "
                        f"and {cfg.threads}")
    device = pick_device(cfg.device)
    keep_freed_memory()  # as train_run does, for every workload alike (the reference's included)
    data, label, real = bench_data(cfg.data_dir)
    say(f"data: {label}" + ("" if real else " (no cached cifar10: run `ablate data import cifar10 SOURCE`)"))
    dset = DeviceSet.of(data, device)
    with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
        ref_root = None
        if cfg.model in ("all", "alexnet"):
            say("writing the data set in torchvision's pickle format for the reference loader")
            ref_root = export_cifar10(data, Path(tmp) / "reference")
        loads = plan_workloads(cfg, device, data, dset, ref_root, label, Path(tmp), say)
        say(f"timing {len(loads)} workloads in {cfg.repeats} interleaved rounds")
        times = time_interleaved(loads, cfg.repeats, device, say)
    context = dict(batch=cfg.batch_size, data=label, device=str(device), device_name=device_name(device),
                   torch_version=torch.__version__, date=datetime.now().isoformat(timespec="seconds"))
    return BenchResult(summarise(loads, times, context), label)


def write_results(result: BenchResult, out_dir: Path, when: datetime | None = None) -> tuple[Path, Path]:
    """results/bench/<device>-<date>.csv and a copy as <device>-latest.csv."""
    from runners.store import atomic_write_csv

    when = when or datetime.now()
    kind = str(result.rows.device.iloc[0]).split(":")[0] if len(result.rows) else "cpu"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, latest = out_dir / f"{kind}-{when:%Y%m%d-%H%M%S}.csv", out_dir / f"{kind}-latest.csv"
    for p in (path, latest):
        atomic_write_csv(p, result.rows[list(CSV_COLUMNS)])
    return path, latest


_TEXT_COLUMNS = ("name", "model", "switch", "base", "note", "data")


def read_results(path: Path) -> BenchResult:
    """A CSV that write_results wrote, back as a BenchResult (for `ablate bench --show`)."""
    try:
        rows = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read the bench CSV {path} ({err}); give a file that `ablate bench` wrote "
                        f"(results/bench/*.csv)") from None
    missing = [c for c in CSV_COLUMNS if c not in rows.columns]
    if missing or not len(rows):
        raise UserError(f"{path} is not a bench CSV (missing columns: {', '.join(missing) or 'none, but no rows'}); "
                        f"give a file that `ablate bench` wrote (results/bench/*.csv)")
    rows[list(_TEXT_COLUMNS)] = rows[list(_TEXT_COLUMNS)].fillna("")
    return BenchResult(rows[list(CSV_COLUMNS)], str(rows.data.iloc[0]))


def _fmt(x: float, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if isinstance(x, (int, float)) and math.isfinite(x) else ""


def bench_table(result: BenchResult):
    from rich.table import Table

    r0 = result.rows.iloc[0] if len(result.rows) else None
    title = "ablate bench" + (f": {r0.device_name}, batch {r0.batch}, torch {r0.torch_version}" if r0 is not None
                              else "")
    table = Table(title=title, caption=f"data: {result.data_label}. rate: median of interleaved repeats (range: "
                                       "min-max). "
                                       "x ref: vs the faster reference row. % ceiling: achieved FLOP/s over the "
                                       "fastest GEMM timing of the same precision on as many threads or fewer")
    for col in ("workload", "rate", "range", "x ref", "x base", "GFLOP/img", "TFLOP/s", "% ceil", "compile s"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    section = None
    for r in result.rows.itertuples():
        if section is not None and r.section != section:
            table.add_section()
        section = r.section
        scale, unit, digits = {"FLOP/s": (1e12, " TFLOP/s", 3), "passes/s": (1.0, " passes/s", 1)}.get(
            r.unit, (1.0, " img/s", 0))
        table.add_row(
            r.name, f"{r.rate / scale:,.{digits}f}{unit}",
            f"{r.rate_min / scale:,.{digits}f}-{r.rate_max / scale:,.{digits}f}",
            _fmt(r.vs_reference, ".2f", "x"), _fmt(r.vs_base, ".2f", "x"), _fmt(r.flops_per_item / 1e9, ".3f"),
            _fmt(r.achieved_flops / 1e12, ".3f"), _fmt(100 * r.efficiency, ".1f", "%"), _fmt(r.compile_seconds, ".0f"))
    return table


def target_lines(targets: list[Target]) -> list[str]:
    out = []
    for t in targets:
        share = t.key in ("bf16-gemm-share", "loop-overhead")
        value, goal = (f"{t.value:.1%}", f"{t.goal:.0%}") if share else (f"{t.value:.1f}x", f"{t.goal:.1f}x")
        out.append(f"target ({t.key}) {t.title}: {value} ({'<=' if t.at_most else '>='} {goal}) "
                   f"{'met' if t.met else 'NOT met'} - {t.detail}")
    return out
