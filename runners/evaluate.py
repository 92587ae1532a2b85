"""Evaluation in eval mode (no dropout, no augmentation): a split's loss, top-1 and top-5 error and how many classes
the net predicts, with the paper's ten crops on request; and how much a normalisation layer really normalises.

Totals are summed on the device and read once per split; sharded runs evaluate a slice per rank and sum over ranks,
so every rank gets the same numbers (and the plateau schedule takes the same decision everywhere)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ablations.spec import RunSpec
from runners.augment import BatchAugmenter, ten_crop_logits

EVAL_BATCH = 500


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class Evaluation:
    loss: float
    error: float
    error_top5: float
    predicted_classes: int  # how many classes the net predicted at least once (1 = a constant predictor)


@torch.no_grad()
def evaluate_split(model, x_all: torch.Tensor, y_all: torch.Tensor, aug: BatchAugmenter, spec: RunSpec,
                   device: torch.device, crops: int = 1, shard: tuple[int, int] = (0, 1),
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Evaluation:
    """Loss, top-1 and top-5 error of one split in eval mode, no augmentation; crops=10 averages softmax over the
    paper's ten views. Sharded runs evaluate a slice per rank and sum over ranks, so every rank gets the same
    numbers (and the plateau schedule takes the same decision everywhere)."""
    model.eval()
    fmt = torch.channels_last if spec.precision == "bf16" else torch.contiguous_format
    classes = spec.model.num_classes
    totals = torch.zeros(3 + classes, device=device)  # loss, wrong1, wrong5, predictions per class
    xs, ys = x_all.tensor_split(shard[1])[shard[0]], y_all.tensor_split(shard[1])[shard[0]]
    for start in range(0, len(ys), EVAL_BATCH):
        x = aug.eval(xs[start:start + EVAL_BATCH]).contiguous(memory_format=fmt)
        y = ys[start:start + EVAL_BATCH]
        with autocast(device, spec.precision):
            if crops == 10:
                logp = ten_crop_logits(model, x).float().clamp_min(1e-12).log()
            else:
                logp = F.log_softmax(model(x).float(), dim=1)
        top5 = logp.topk(min(5, logp.shape[1]), dim=1).indices
        totals[0] += F.nll_loss(logp, y, reduction="sum")
        totals[1] += (top5[:, 0] != y).sum()
        totals[2] += (~(top5 == y[:, None]).any(1)).sum()
        totals[3:] += torch.bincount(top5[:, 0], minlength=classes)[:classes]
    if reduce is not None:
        totals = reduce(totals)
    m = len(y_all) or math.nan
    t = totals.tolist()
    return Evaluation(t[0] / m, t[1] / m, t[2] / m, sum(1 for c in t[3:] if c > 0))


def evaluate(model, dd, aug: BatchAugmenter, spec: RunSpec, device: torch.device,
             shard: tuple[int, int] = (0, 1),
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float, float]:
    """Test loss, top-1 error, top-5 error, with the run's test views (test_crops)."""
    e = evaluate_split(model, dd.test_x, dd.test_y, aug, spec, device, spec.test_crops, shard, reduce)
    return e.loss, e.error, e.error_top5


@torch.no_grad()
def lrn_activity(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """How much each response-normalisation layer really normalises: quantiles of its divisor factor
    (k + alpha/n * sum a^2)^-beta over every unit, for a fixed batch of clean training images.

    A p05-p95 spread near 1 means a constant rescaling (the layer normalises nothing); the paper's LRN at k = 2
    starts at 2^-0.75 = 0.59 and acts only where activations are large."""
    from ablations.models import SameMapRNorm
    factors: list[torch.Tensor] = []

    def hook(module, inputs, _out):
        a = inputs[0].float()
        if isinstance(module, SameMapRNorm):
            mean_sq = F.avg_pool2d(a * a, module.size, stride=1, padding=module.size // 2, count_include_pad=True)
            f = (1.0 + module.scale * mean_sq).pow(-module.pow)
        else:  # nn.LocalResponseNorm: 1 / (x / out) from the layer itself, exact for any window convention
            out = F.local_response_norm(a, module.size, module.alpha, module.beta, module.k)
            f = torch.where(a != 0, out / a.where(a != 0, torch.ones_like(a)), torch.nan)
        factors.append(f.flatten())

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.LocalResponseNorm, SameMapRNorm))]
    if not layers:
        return {}
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    f = torch.cat(factors)
    f = f[~f.isnan()]
    q = torch.quantile(f[torch.randperm(len(f), generator=torch.Generator().manual_seed(0))[:1_000_000]].double(),
                       torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"lrn_factor_p05": q[0], "lrn_factor_p50": q[1], "lrn_factor_p95": q[2],
            "lrn_factor_spread": q[2] / q[0] if q[0] > 0 else math.nan}
