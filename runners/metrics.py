"""What a run's rows mean: the running training error of Figure 1 (a trace, TRACE_POINTS points per epoch), the
time at which a target was first crossed, the chance guard, convergence, and the run's summary.json. Plain Python
over the rows: no tensors, no files."""
from __future__ import annotations

import math
import statistics

from ablations.spec import RunSpec

TRACE_POINTS = 10  # the running training error (Figure 1's metric) is logged this many times per epoch
CHANCE_LOSS = 0.98  # a final clean loss at or above this share of ln(classes) is chance: the run did not learn


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
    if "test_error_1view" in last:  # a multi-view test run: the same net's plain-view test error
        metrics["test_error_1view"] = float(last["test_error_1view"])
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
