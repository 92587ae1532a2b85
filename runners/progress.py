"""What `ablate run` shows while it works: a rich live display on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def table_console() -> Console:
    """rich on a terminal; on a pipe or a CI log, lines as wide as they need (no wrapping, no cut cells)."""
    return Console() if sys.stdout.isatty() else Console(width=100_000, no_color=True, soft_wrap=True)


def _label(axes: dict, seed: int) -> str:
    return " ".join(f"{k}={v}" for k, v in axes.items()) + f" seed={seed}"


class PlainReporter:
    """One line per event; for logs, CI and pipes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def grid(self, name: str, total: int, done: int) -> None:
        self._say(f"grid {name}: {total} runs, {done} already done, {total - done} to go")

    def say(self, text: str) -> None:
        self._say(text)

    def start_run(self, spec, i: int, total: int) -> None:
        self._t0 = time.perf_counter()
        self._say(f"[{i}/{total}] run {spec.run_id} {_label(dict(spec.axes), spec.seed)} "
                  f"({spec.epochs} epoch{'s' * (spec.epochs != 1)} max)")

    def step(self, i: int, n: int) -> None:
        pass

    def epoch(self, row: dict) -> None:
        val = f"val err {row['val_error']:.4f} | " if row.get("val_error") == row.get("val_error") else ""
        self._say(f"  epoch {row['epoch']}: train loss {row['train_loss']:.4f} err {row['train_error']:.4f} | "
                  f"clean {row.get('clean_train_error', float('nan')):.4f} | {val}"
                  f"test err {row['test_error']:.4f} top5 {row['test_error_top5']:.4f} | "
                  f"{row['images_per_second']:.0f} img/s {row['epoch_seconds']:.1f}s")

    def end_run(self, result) -> None:
        extra = f" ({result.error})" if result.error else ""
        self._say(f"  -> {result.status} ({result.stop_reason}){extra}")

    def skip(self, spec, why: str) -> None:
        self._say(f"skip {spec.run_id} {_label(dict(spec.axes), spec.seed)}: {why}")

    def close(self) -> None:
        pass


class RichReporter(PlainReporter):
    """Runs done / to go, the current epoch with ETA, live loss and error."""

    def __init__(self):
        super().__init__()
        self.console = Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.progress.start()
        self.runs_task = None
        self.epoch_task = None

    def _say(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def grid(self, name, total, done):
        super().grid(name, total, done)
        self.runs_task = self.progress.add_task(f"grid {name}", total=total, completed=done, info="")

    def start_run(self, spec, i, total):
        super().start_run(spec, i, total)
        if self.epoch_task is not None:
            self.progress.remove_task(self.epoch_task)
        self.epoch_task = self.progress.add_task(f"  run {spec.run_id}", total=spec.epochs, info="")
        self.step_task_total = spec.epochs

    def step(self, i, n):
        if self.epoch_task is not None:
            done = int(self.progress.tasks[-1].completed)
            self.progress.update(self.epoch_task, info=f"epoch {done + 1}: batch {i}/{n}")

    def epoch(self, row):
        super().epoch(row)
        self.progress.update(self.epoch_task, completed=row["epoch"],
                             info=f"loss {row['train_loss']:.3f} err {row['train_error']:.3f}")

    def end_run(self, result):
        super().end_run(result)
        self.progress.advance(self.runs_task)

    def skip(self, spec, why):
        pass

    def close(self):
        self.progress.stop()


def make_reporter(rich: bool | None = None) -> PlainReporter:
    if rich is None:
        rich = sys.stdout.isatty()
    return RichReporter() if rich else PlainReporter()
