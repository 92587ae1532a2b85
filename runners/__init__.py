"""How runs execute: data import and cache, on-device augmentation, one run's training loop, checkpoints, the
results store, the launchers, progress, the bench and the CLI.

The public surface, importable from here (each loads its module on first use, so `ablate --help` stays fast):
GridRequest and GridOutcome (runners.launch), run_grid (runners.execute), run_jobs and run_grid_ray
(runners.executors), follow_grid (runners.ddp), train_run and TrainOptions (runners.train), import_dataset,
load_dataset and make_synthetic (runners.data), pick_device (runners.devices), Store and RunFolder (runners.store).
"""
from __future__ import annotations

import importlib

_PUBLIC = {"GridRequest": "runners.launch", "GridOutcome": "runners.launch", "plan": "runners.launch",
           "run_grid": "runners.execute", "run_jobs": "runners.executors", "run_grid_ray": "runners.executors",
           "follow_grid": "runners.ddp", "train_run": "runners.train", "TrainOptions": "runners.train",
           "import_dataset": "runners.data", "load_dataset": "runners.data", "make_synthetic": "runners.data",
           "pick_device": "runners.devices", "Store": "runners.store", "RunFolder": "runners.store"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'runners' has no attribute {name!r}")
