"""Live experiment logging: TensorBoard event files per run, in results/<grid>/runs/<run_id>/tb/, so that
`tensorboard --logdir results/<grid>` compares a grid's cells while it trains (per-epoch metrics as scalars, the
run's settings and final metrics in the HPARAMS tab).

TensorBoard is an optional extra (`pip install -e '.[tensorboard]'`); without it nothing is logged and nothing
else changes."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from ablations.spec import RunSpec

SCALARS = ("train_loss", "train_error", "clean_train_error", "val_error", "test_error", "test_error_top5", "lr",
           "images_per_second")
FINAL = ("test_error", "val_error", "clean_train_error", "epochs_to_target")


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class RunLog:
    """One run's event writer; a no-op without TensorBoard."""

    def __init__(self, run_dir: Path, spec: RunSpec):
        self.spec, self.writer = spec, None
        if available():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key in SCALARS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self, metrics: dict | None = None) -> None:
        if self.writer is None:
            return
        if metrics:
            hparams = {"run_id": self.spec.run_id, "seed": self.spec.seed, "lr": self.spec.lr,
                       **{k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.spec.axes}}
            final = {f"final/{k}": float(metrics[k]) for k in FINAL
                     if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
            self.writer.add_hparams(hparams, final, run_name=".")
        self.writer.close()
