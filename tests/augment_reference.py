"""The augmentations with their own random draws, one op at a time: the definitions the tests check the suite's
batched pipeline (runners/augment.py, which takes the draws as arguments) against."""
from __future__ import annotations

import torch

from runners.augment import PCA_SCALE, InputStats, crop_at, flip_where, shift_lighting


def pca_lighting(x: torch.Tensor, stats: InputStats, gen: torch.Generator, std: float = 0.1,
                 scale: float = PCA_SCALE, mode: str = "paper") -> torch.Tensor:
    """Paper §4.1 "fancy PCA": add eigvecs @ (alpha * eigvals) to every pixel, alpha ~ N(0, std) per image.

    The formula is evaluated on pixels of `scale` x 0-255 (see PCA_SCALE); that offset is scale * eigvecs @
    (alpha * eigvals) in 0-255 units. `x` is a batch already normalised with `mode` (B, 3, H, W), so the offset
    goes through the same per-channel division as `normalize`: none for `paper` (also right for raw 0-255
    floats), / channel_std for `standard`. Draws one randn((B, 3)) from `gen`.
    """
    alpha = torch.randn(x.shape[0], 3, generator=gen, device=x.device) * std  # (B, 3)
    return shift_lighting(x, alpha, stats, scale, mode)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 0.5. Draws one rand((B,)) from `gen`."""
    return flip_where(x, torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad`, then cut an HxW window at a per-image offset in [0, 2*pad]^2 (random translation).

    Zero padding is the mean because x is already normalised. The windows are one strided view (unfold), and a
    single advanced index copies each image's window: no loop (faster on CPU than a loop over the 81 offsets,
    measured). Draws one randint((2, B)) from `gen`: row offsets, then column offsets.
    """
    if pad == 0:
        return x
    return crop_at(x, pad, torch.randint(0, 2 * pad + 1, (2, x.shape[0]), generator=gen, device=x.device))
