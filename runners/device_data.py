"""What a run trains and is measured on, placed on its device once: its training subset, the held-out validation
split (never the test data: it chooses the schedule), a fixed clean-training slice (the fair gap), the test set."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ablations.spec import RunSpec
from runners.data import CifarData
from runners.evaluate import EVAL_BATCH, Evaluation, autocast, evaluate, evaluate_split, lrn_activity  # noqa: F401
from runners.metrics import (CHANCE_LOSS, TRACE_POINTS, converged, end_of_run, learned, summarise,  # noqa: F401
                             target_time, trace_rows, trace_segments)

CLEAN_TRAIN_IMAGES = 2000  # the fixed training slice evaluated in eval mode each epoch (the fair gap, the chance guard)


@dataclass(frozen=True)
class DeviceData:
    """The run's images on the training device: uint8 images, int64 labels.

    train: what SGD sees; val: held out of the training images, decides the schedule (and, in reports, every
    choice); test: reported, never decides anything; clean: a fixed slice of train, evaluated like val (eval mode,
    no augmentation), so that test - clean is an over-fitting gap that dropout and augmentation cannot bias."""

    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,)
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,)
    val_x: torch.Tensor | None = None  # (V, 3, 32, 32) uint8; None without a validation split
    val_y: torch.Tensor | None = None
    clean_x: torch.Tensor | None = None  # (K, 3, 32, 32) uint8, K = min(N, CLEAN_TRAIN_IMAGES)
    clean_y: torch.Tensor | None = None
    val_fingerprint: str = ""  # sha256 (12 hex) of the validation indices into the imported training set


def validation_split(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of a class-stratified validation set of `size` training images, the same for every run.

    Each class gives size // C images (the first size % C classes one more), the first of a fixed shuffle (seed 0)
    of that class's images. Sorted, so the fingerprint does not depend on the class order."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    gen = torch.Generator().manual_seed(0)
    picks = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        take = size // classes + (c < size % classes)
        if take > len(members):
            from ablations.errors import UserError
            raise UserError(f"val_size {size} needs {take} images of class {c}, the data has {len(members)}; "
                            f"choose a smaller val_size")
        picks.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long)


def check_data_fits(spec: RunSpec, data: CifarData) -> None:
    """The validation split, subset and test subset fit the imported data (one line naming the limit if not)."""
    from ablations.errors import UserError
    n_train = len(data.train_y)
    if spec.val_size and spec.val_size >= n_train:
        raise UserError(f"val_size {spec.val_size} leaves no training images of the {n_train} imported; "
                        f"choose a smaller val_size")
    left = n_train - spec.val_size
    if spec.subset > left:
        raise UserError(f"subset {spec.subset} is more than the {left} training images "
                        f"{'left after the validation split' if spec.val_size else 'imported'}; choose at most "
                        f"{left}, or 0 for all")


def select_data(spec: RunSpec, data: CifarData, device: torch.device) -> DeviceData:
    """Validation split first (stratified, fixed), then `subset` images of the rest from a fixed shuffle (seed 0,
    the same for every run, so classes stay balanced), then the clean slice and `test_subset` the same way."""

    def first(n_all: int, n: int) -> torch.Tensor:
        if n and n < n_all:
            return torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n]
        return torch.arange(n_all)

    check_data_fits(spec, data)
    n_train = len(data.train_y)
    val_idx = validation_split(data.train_y, spec.val_size) if spec.val_size else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[val_idx] = False
    pool = keep.nonzero().flatten()
    if spec.val_size:
        pool = pool[first(len(pool), spec.subset)]
    else:  # no split: the same images as ever for a given subset
        pool = first(n_train, spec.subset)
    clean = first(len(pool), min(len(pool), CLEAN_TRAIN_IMAGES))
    test = first(len(data.test_y), spec.test_subset)

    def put(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return (x if idx is None else x[idx]).to(device).contiguous()

    train_x, train_y = put(data.train_x, pool), put(data.train_y, pool)
    fingerprint = hashlib.sha256(val_idx.numpy().astype("<i8").tobytes()).hexdigest()[:12] if spec.val_size else ""
    return DeviceData(train_x, train_y, put(data.test_x, test), put(data.test_y, test),
                      val_x=put(data.train_x, val_idx) if spec.val_size else None,
                      val_y=put(data.train_y, val_idx) if spec.val_size else None,
                      clean_x=train_x[clean.to(device)], clean_y=train_y[clean.to(device)],
                      val_fingerprint=fingerprint)

