"""When a run writes its checkpoint, and what it writes if it stops between two.

A checkpoint (model, optimiser, scheduler, every RNG, the rows so far) is written after the first epoch that ends
`every` seconds after the last one, so a short epoch does not pay for a checkpoint each time. Between two, the
last finished epoch's state is kept in memory, and written when the run is interrupted or fails: a resumed run
always starts from its last finished epoch."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from runners.store import RunFolder


class Checkpointer:
    def __init__(self, folder: RunFolder, every: float, clock: Callable[[], float] = time.perf_counter):
        self.folder, self.every, self.clock = folder, every, clock  # the training loop's clock
        self.last_saved = clock()
        self.unsaved: dict | None = None  # the last finished epoch's state, when no checkpoint holds it

    def after_epoch(self, state: dict, rows: list[dict], trace: list[dict], trains_on: bool) -> None:
        """Checkpoint now (with the curves so far) if `every` seconds have passed, else keep the state: a copy when
        the run `trains_on` (the next epoch changes the live tensors), the live state after its last epoch."""
        if self.clock() - self.last_saved >= self.every:
            self.folder.save_checkpoint(state)
            self.folder.write_curves(rows, trace)
            self.last_saved, self.unsaved = self.clock(), None
        elif trains_on:
            self.unsaved = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)
        else:
            self.unsaved = state

    def save_unsaved(self) -> None:
        """On an interrupt or a failure: put the last finished epoch on disk, so a rerun resumes from it."""
        if self.unsaved is not None:
            self.folder.save_checkpoint(self.unsaved)
