"""The results store: one folder per run, atomic writes, regenerated aggregates (the locks: runners/locks.py).

results/<grid>/runs/<run_id>/{spec.json, epochs.csv, summary.json, checkpoint.pt}
results/<grid>/{grid.json, runs.csv, epochs.csv}   (aggregates: derived, regenerated, never hand-edited)

A killed process leaves either the old file or the new one, never half of one: every write goes to a
temporary file in the same folder, is fsynced, then os.replace()d over the target."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from ablations.choices import FINISHED
from ablations.errors import UserError
from runners.faults import fault_point
from runners.locks import grid_lock, open_nofollow, pid_alive

TMP_MARK = ".tmp"  # a write goes to .<name>.tmp<pid> first
EPOCH_COLUMNS = ["epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "clean_train_loss",
                 "clean_train_error", "predicted_classes", "test_loss", "test_error", "test_error_top5",
                 "epoch_seconds", "images_per_second", "cum_seconds"]
# columns only a multi-view (10-crop) test run writes: its net's plain-view test numbers (runners/train.py)
VIEW_COLUMNS = ["test_loss_1view", "test_error_1view"]
AGGREGATE_EPOCH_COLUMNS = ["epoch_lr" if c == "lr" else c for c in EPOCH_COLUMNS]  # results/<grid>/epochs.csv
# the running training error, TRACE_POINTS times per epoch (runners/train.py: trace_rows)
TRACE_COLUMNS = ["epoch", "segment_wrong", "segment_loss_sum", "segment_images", "segment_error", "window_error",
                 "window_loss"]


# ---------------------------------------------------------------- atomic writes

# the results layout's file names: spelled here only
GRID_JSON, RUNS_CSV, EPOCHS_CSV, RUNS_DIR = "grid.json", "runs.csv", "epochs.csv", "runs"
SPEC_JSON, SUMMARY_JSON, TRACE_CSV, MODEL_PT = "spec.json", "summary.json", "trace.csv", "model.pt"
CHECKPOINT, CHECKPOINT_PREV, RUN_LOCK = "checkpoint.pt", "checkpoint.prev.pt", "run.lock"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write", path)
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C included: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        if err.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; free some space and rerun the same command "
                            f"(finished runs are kept)") from None
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {path} ({err.strerror}); choose a writable folder with --out") from None
        raise


def remove_stale_temps(folder: Path, names: tuple[str, ...] | None = None) -> None:
    """Delete the temporary files that writers killed mid-write left in `folder` (of the given target names, or
    all), when their process is gone. Call it where no other process can be writing the same targets."""
    for tmp in Path(folder).glob(f".*{TMP_MARK}*"):
        target, _, pid = tmp.name[1:].rpartition(TMP_MARK)
        if pid.isdigit() and (names is None or target in names) and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def epoch_columns(rows: list[dict]) -> list[str]:
    """EPOCH_COLUMNS, with the plain-view test columns after the top-5 error where the rows have them: a
    single-view run's epochs.csv keeps exactly the standard columns."""
    if not rows or VIEW_COLUMNS[0] not in rows[0]:
        return EPOCH_COLUMNS
    at = EPOCH_COLUMNS.index("test_error_top5") + 1
    return EPOCH_COLUMNS[:at] + VIEW_COLUMNS + EPOCH_COLUMNS[at:]


def rows_csv(rows: list[dict], columns: list[str]) -> str:
    """The text pandas' to_csv(index=False) writes for these rows (floats as repr, NaN as an empty field), with
    the csv module, without building a DataFrame for a run's few epoch rows."""
    def field(v):
        return "" if isinstance(v, float) and math.isnan(v) else v

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([field(r.get(c, float("nan"))) for c in columns] for r in rows)
    return out.getvalue()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to bytes, append-free checksum in a sidecar-free envelope: {'sha256', 'payload'}."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(path, digest + b"\n" + payload)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint's state, or None when it is missing, truncated or corrupt (checksum mismatch)."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    digest, _, payload = blob.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - a checksum-valid file that still fails to load is treated as corrupt
        return None


@dataclass(frozen=True)
class RunFolder:
    """One run's folder, results/<grid>/runs/<run id>/: what training, launchers and the store read and write there."""
    path: Path

    @property
    def lock_path(self) -> Path:
        return self.path / RUN_LOCK

    def write_spec(self, spec_json: dict) -> None:
        atomic_write_json(self.path / SPEC_JSON, spec_json)

    def read_spec_text(self) -> str:
        return (self.path / SPEC_JSON).read_text()

    def read_summary(self) -> dict | None:
        """summary.json, or None while the run is unfinished (or its summary unreadable)."""
        try:
            return json.loads((self.path / SUMMARY_JSON).read_text())
        except (OSError, ValueError):
            return None

    def clear_summary(self) -> None:
        (self.path / SUMMARY_JSON).unlink(missing_ok=True)

    def read_epochs(self) -> list[dict]:
        return pd.read_csv(self.path / EPOCHS_CSV).to_dict("records")

    def resume_state(self) -> dict | None:
        """The newest intact checkpoint: checkpoint.pt, else the previous one a torn write left in place."""
        state = load_checkpoint(self.path / CHECKPOINT)
        return state if state is not None else load_checkpoint(self.path / CHECKPOINT_PREV)

    def save_checkpoint(self, state: dict) -> None:
        """Keep the previous checkpoint until the new one is safely on disk (a torn write falls back to it)."""
        cur, prev = self.path / CHECKPOINT, self.path / CHECKPOINT_PREV
        if cur.exists():
            os.replace(cur, prev)
        save_checkpoint(cur, state)

    def drop_checkpoints(self) -> None:
        for name in (CHECKPOINT, CHECKPOINT_PREV):
            (self.path / name).unlink(missing_ok=True)

    def write_curves(self, rows: list[dict], trace: list[dict]) -> None:
        atomic_write_text(self.path / EPOCHS_CSV, rows_csv(rows, epoch_columns(rows)))
        atomic_write_text(self.path / TRACE_CSV, rows_csv(trace, TRACE_COLUMNS))

    def write_result(self, rows: list[dict], trace: list[dict], weights: bytes, summary: dict) -> None:
        """The finished run: its curves, weights and, last, the summary that marks it done."""
        self.write_curves(rows, trace)
        atomic_write_bytes(self.path / MODEL_PT, weights)
        atomic_write_json(self.path / SUMMARY_JSON, summary)


# ---------------------------------------------------------------- the store

@dataclass(frozen=True)
class Store:
    root: Path  # the results folder

    def grid_dir(self, grid: str) -> Path:
        return self.root / grid

    def run_dir(self, grid: str, run_id: str) -> Path:
        return self.root / grid / RUNS_DIR / run_id

    def run_folder(self, grid: str, run_id: str) -> RunFolder:
        return RunFolder(self.run_dir(grid, run_id))

    def grid_json(self, grid: str) -> Path:
        return self.grid_dir(grid) / GRID_JSON

    def read_grid_json(self, grid: str) -> dict | None:
        """grid.json, or None where there is none (or it is unreadable)."""
        try:
            return json.loads(self.grid_json(grid).read_text())
        except (OSError, ValueError):
            return None

    def make_run_dir(self, grid: str, run_id: str) -> Path:
        """Create (or find) a run's folder, refusing any link between the results folder and it: a planted link
        would send spec.json, epochs.csv and model.pt outside --out."""
        rdir = self.run_dir(grid, run_id)
        rdir.mkdir(parents=True, exist_ok=True)
        for part in (self.grid_dir(grid), self.grid_dir(grid) / RUNS_DIR, rdir):
            if part.is_symlink():
                raise UserError(f"{part} is a symbolic link, which the suite never creates; remove it and rerun "
                                f"(results are never written through links)")
        return rdir

    def summary(self, grid: str, run_id: str) -> dict | None:
        return self.run_folder(grid, run_id).read_summary()

    def is_done(self, grid: str, run_id: str) -> bool:
        s = self.summary(grid, run_id)
        return s is not None and s.get("status") in FINISHED

    def finished_elsewhere(self, grid: str, run_id: str) -> str | None:
        """Another grid whose folder holds this run finished. The run id hashes every field that decides a result,
        so it is the same run: adopt_run copies it rather than training it again. Folders reached through links
        are not looked at."""
        for rdir in sorted(self.root.glob(f"*/{RUNS_DIR}/{run_id}")):
            other = rdir.parent.parent.name
            if other == grid or any(p.is_symlink() for p in (rdir.parent.parent, rdir.parent, rdir,
                                                              rdir / SUMMARY_JSON)):
                continue
            s = RunFolder(rdir).read_summary()
            if s is not None and s.get("status") in FINISHED and s.get("run_id") == run_id:
                return other
        return None

    def run_state(self, grid: str, run_id: str) -> str:
        """"done", "reuses <grid>" (finished in another grid: copied, not trained) or "pending"."""
        if self.is_done(grid, run_id):
            return "done"
        other = self.finished_elsewhere(grid, run_id)
        return f"reuses {other}" if other else "pending"

    def adopt_run(self, source: str, grid: str, spec_json: dict) -> dict:
        """Copy the finished run of grid `source` into `grid`, relabelled with this grid's name and axes
        (`spec_json`, the run's RunSpec.to_json()). Its summary records `reused_from`, the grid that trained it, so
        its machine time counts there only; it is written last, so a copy killed half-way is simply adopted again.
        Call it holding the run's lock."""
        src, dst = RunFolder(self.run_dir(source, spec_json["run_id"])), RunFolder(self.make_run_dir(
            grid, spec_json["run_id"]))
        summary = src.read_summary()
        if summary is None:
            raise UserError(f"{src.path} lost its summary.json while being reused; rerun the same command")
        for name in (EPOCHS_CSV, TRACE_CSV, MODEL_PT):
            path = src.path / name
            if path.is_file() and not path.is_symlink():
                atomic_write_bytes(dst.path / name, path.read_bytes())
        dst.write_spec(spec_json)
        dst.drop_checkpoints()  # an interrupted training of the same run here: the copy replaces it
        summary.update(grid=grid, axes=dict(spec_json["axes"]), spec=spec_json,
                       reused_from=summary.get("reused_from") or source)
        atomic_write_json(dst.path / SUMMARY_JSON, summary)
        return summary

    def check_writable(self, grid: str | None = None) -> None:
        """The results folder, and a grid's folder, runs folder and aggregate lock when they exist, are writable
        and no links: checked before anything is written, so a refusal changes nothing."""
        folders = [self.root]
        if grid is not None:
            folders += [p for p in (self.grid_dir(grid), self.grid_dir(grid) / RUNS_DIR)
                        if p.exists() or p.is_symlink()]
        for folder in folders:
            if folder.is_symlink() and folder != self.root:
                raise UserError(f"{folder} is a symbolic link, which the suite never creates; remove it and rerun "
                                f"(results are never written through links)")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-probe{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                what = "the results folder " if folder == self.root else ""
                raise UserError(f"cannot write to {what}{folder} ({err.strerror}); make it writable or choose "
                                f"another results folder with --out") from None
        if grid is not None:
            lock = self.grid_dir(grid) / ".aggregate.lock"
            if lock.is_symlink():
                raise UserError(f"{lock} is a symbolic link, which the suite never creates; remove it and rerun")
            if lock.exists() and not os.access(lock, os.W_OK):
                raise UserError(f"cannot write {lock} (permission denied); make it writable or remove it")

    def write_aggregates(self, grid: str, warn: Callable[[str], None] = _warn) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rebuild runs.csv and epochs.csv of a grid from its run folders (under a grid lock)."""
        gdir = self.grid_dir(grid)
        with grid_lock(gdir):
            remove_stale_temps(gdir, (RUNS_CSV, EPOCHS_CSV))
            runs, epochs = [], []
            for rdir in sorted((gdir / RUNS_DIR).glob("*/")):
                try:
                    summary = json.loads((rdir / SUMMARY_JSON).read_text())
                except (FileNotFoundError, ValueError):
                    continue  # not finished (or being written): not part of the aggregate yet
                row = summary_row(summary)
                runs.append(row)
                ep = run_epochs(rdir, summary, warn)
                if ep is not None:
                    label_cols = {k: row[k] for k in ["run_id", "grid", *summary["axes"], "seed"]}
                    # the epoch's own rate as epoch_lr, so an `lr` axis and it never share a column name
                    ep = ep.rename(columns={"lr": "epoch_lr"})
                    epochs.append(ep.assign(**label_cols)[[*label_cols, *AGGREGATE_EPOCH_COLUMNS]])
            runs_df = pd.DataFrame(runs)
            epochs_df = pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame(
                columns=["run_id", "grid", "seed", *AGGREGATE_EPOCH_COLUMNS])
            if len(runs_df):
                atomic_write_csv(gdir / RUNS_CSV, runs_df)
                atomic_write_csv(gdir / EPOCHS_CSV, epochs_df)
            return runs_df, epochs_df


def run_epochs(rdir: Path, summary: dict, warn: Callable[[str], None] = _warn) -> pd.DataFrame | None:
    """A run's epochs.csv, checked against its summary.json, which is the record: the epoch rows of a finished or
    diverged run (never trained again) are rewritten from the summary when the file is damaged or missing. A
    damaged file whose summary holds no rows (written before summaries kept them) is left out, with a warning."""
    path, rows = rdir / EPOCHS_CSV, summary.get("epochs")
    if rows and summary["status"] in FINISHED:
        text = rows_csv(rows, epoch_columns(rows))
        try:
            intact = path.read_text() == text
        except (OSError, UnicodeDecodeError):
            intact = False
        if not intact:
            atomic_write_text(path, text)
            warn(f"{path} was damaged or missing; rewrote it from {path.parent.name}/summary.json")
        return pd.read_csv(io.StringIO(text))
    n = summary["metrics"].get("epochs_run") or 0
    if not n:
        return None
    try:
        text = path.read_text()
        ep = pd.read_csv(io.StringIO(text))
        intact = text.endswith("\n") and set(EPOCH_COLUMNS) <= set(ep.columns) and list(ep.epoch) == [*range(1, n + 1)]
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        intact = False
    if not intact:
        warn(f"{path} is damaged and its summary.json holds no epoch rows: the run keeps its runs.csv row but has no "
             f"epoch rows; delete {path.parent} and rerun to train it again")
        return None
    return ep


def summary_row(summary: dict) -> dict:
    """Flatten a summary.json into one runs.csv row: ids, every axis as a column, metrics, environment."""
    row = {"run_id": summary["run_id"], "grid": summary["grid"], "status": summary["status"],
           "stop_reason": summary.get("stop_reason", "")}
    row.update(summary["axes"])
    row["seed"] = summary["spec"]["seed"]
    if summary.get("reused_from"):  # trained in that grid (Store.adopt_run): its machine time counts there
        row["reused_from"] = summary["reused_from"]
    row.update(summary["metrics"])
    row.update(summary["env"])
    return row
