"""RunSpec: everything that decides one training run's result, resolved once and frozen.

The run id is a short hash of the fields that change the result, so a re-run finds its finished runs and
two specs that differ in any such field never share an id. Labels (grid name, axis values) are not hashed."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ablations.choices import AUGMENT, DATASETS, PRECISIONS, PREPROCESS, SCHEDULES
from ablations.models import ModelSpec

__all__ = ["AUGMENT", "DATASETS", "PRECISIONS", "PREPROCESS", "SCHEDULES", "RunSpec", "run_id"]



@dataclass(frozen=True)
class RunSpec:
    """One run: model, data, optimiser, schedule, seed. Read-only downstream."""

    model: ModelSpec
    dataset: str = "cifar10"
    preprocess: str = "standard"  # "standard": per-channel mean/std; "paper": 0-255 minus the mean image
    augment: str = "none"
    test_crops: int = 1  # 1 = the plain view, 10 = the paper's ten-crop test (softmax averaged)
    epochs: int = 10  # the cap; early stopping may end a run sooner
    batch_size: int = 128  # global batch: with N devices each takes batch_size / N
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_on: str = "weights"  # "weights" (the paper, cuda-convnet, Caffe: no decay on biases) | "all"
    schedule: str = "constant"
    step_epochs: int = 30  # schedule "step": divide by 10 every step_epochs
    plateau_patience: int = 3  # schedule "plateau": epochs without validation-error improvement before lr /= 10
    max_lr_drops: int = 3  # the paper divided the rate three times in all
    seed: int = 0
    val_size: int = 0  # a class-stratified validation split held out of the training images (0 = none)
    subset: int = 0  # train on the first `subset` images of a fixed shuffle of the rest (0 = all)
    test_subset: int = 0  # evaluate on the first `test_subset` test images (0 = all)
    devices: int = 1  # data-parallel processes (DDP); 1 = a plain process
    precision: str = "bf16"
    early_stop_metric: str = ""  # "train_error" (the running trace) | "train_loss" | "val_error"; "" = none
    early_stop_below: float = 0.0
    loss_target: float = 0.0  # record the first epoch whose train loss is below this (0 = none); never stops a run

    # labels, not hashed: which grid and which axis values produced this run (become CSV columns)
    grid: str = field(default="", compare=False)
    axes: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @functools.cached_property
    def run_id(self) -> str:
        """Hashed once per spec (a spec is frozen): a run asks for it several times."""
        return run_id(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields that decide the result, as plain JSON (the run id hashes exactly this)."""
        d = dataclasses.asdict(self)
        d.pop("grid")
        d.pop("axes")
        return d

    def to_json(self) -> dict[str, Any]:
        d = self.result_fields()
        d["grid"] = self.grid
        d["axes"] = {k: v for k, v in self.axes}
        d["run_id"] = self.run_id
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        d.pop("run_id", None)
        model = ModelSpec(**d.pop("model"))
        axes = tuple(d.pop("axes", {}).items())
        return RunSpec(model=model, axes=axes, **d)


def run_id(spec: RunSpec) -> str:
    blob = json.dumps(spec.result_fields(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
