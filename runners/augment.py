"""Input preprocessing and batched augmentation on the training device (paper §2, §4.1).

Everything works on whole batches with tensor ops: no PIL, no per-image Python loop, no host sync, so the data
set can live on the device as one uint8 tensor and each batch is augmented where the model runs. Every random
draw takes an explicit `torch.Generator` on the data's device, so a run is reproducible and resumes exactly
from a saved generator state.

Training order (BatchAugmenter): normalise -> PCA lighting -> random crop -> random flip. Normalising first
means the zero padding of the crop is the mean (mean image in `paper` mode, channel mean in `standard` mode).
"""

import functools
import logging
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ablations.choices import AUGMENT, PREPROCESS
from ablations.errors import UserError

AUGMENT_LEVELS = AUGMENT

# The augmentations each level switches on, in the order they run after normalisation.
_LEVEL_OPS = {
    "none": (),
    "flip": ("flip",),
    "crop_flip": ("crop", "flip"),
    "crop_flip_pca": ("pca", "crop", "flip"),
}

# Pixel scale in which the paper's lighting formula is evaluated. Eigenvalues are variances, so the offset
# eigvecs @ (alpha * eigvals) depends on the unit: taken literally on 0-255 pixels (scale 1) CIFAR's top
# eigenvalue (~1e4) with alpha ~ N(0, 0.1) shifts pixels by hundreds of grey levels and wipes the image out;
# on [0, 1] pixels (scale 1/255, the common reading, e.g. fb.resnet.torch) the shift is a few grey levels.
PCA_SCALE = 1.0 / 255.0


@dataclass(frozen=True)
class InputStats:
    """Training-set statistics, all on the 0-255 pixel scale; computed once per data set."""

    mean_image: torch.Tensor  # (3, H, W) float32
    channel_mean: torch.Tensor  # (3,)
    channel_std: torch.Tensor  # (3,)
    eigvals: torch.Tensor  # (3,) of the RGB pixel covariance, descending
    eigvecs: torch.Tensor  # (3, 3) column k is the eigenvector of eigvals[k]

    def to(self, device: torch.device | str) -> "InputStats":
        return InputStats(*(getattr(self, f.name).to(device) for f in fields(self)))


def compute_input_stats(train_x: torch.Tensor, chunk: int = 32) -> InputStats:
    """Mean image, per-channel mean/std and the RGB covariance eigen-decomposition of uint8 images (N, 3, H, W).

    Accumulates in float64 over chunks of `chunk` images: 32 keep a chunk in L2 (~2x faster than 1024 here).
    Every partial sum is an integer below 2^53, so the result is exact whatever the chunking.
    The channel std and the covariance are population statistics (divide by the pixel count).
    """
    if train_x.dtype != torch.uint8 or train_x.ndim != 4 or train_x.shape[1] != 3 or len(train_x) == 0:
        raise UserError(f"input stats need a non-empty uint8 (N, 3, H, W) image tensor, got {train_x.dtype} "
                        f"{tuple(train_x.shape)}; re-import the data set with `ablate data import`")
    n, _, h, w = train_x.shape
    img_sum = torch.zeros(3, h, w, dtype=torch.float64, device=train_x.device)
    pix_sum = torch.zeros(3, dtype=torch.float64, device=train_x.device)
    outer_sum = torch.zeros(3, 3, dtype=torch.float64, device=train_x.device)
    for start in range(0, n, chunk):
        xb = train_x[start:start + chunk].to(torch.float64)  # (b, 3, H, W)
        img_sum += xb.sum(0)
        pix = xb.permute(0, 2, 3, 1).reshape(-1, 3)  # (b*H*W, 3) one RGB row per pixel
        pix_sum += pix.sum(0)
        outer_sum += pix.T @ pix
    n_pix = n * h * w
    mean = pix_sum / n_pix  # (3,)
    cov = outer_sum / n_pix - torch.outer(mean, mean)  # (3, 3)
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    # eigh's signs are arbitrary; make each column's largest component positive so stats are reproducible.
    vecs = vecs * vecs.gather(0, vecs.abs().argmax(0, keepdim=True)).sign()
    return InputStats(mean_image=(img_sum / n).float(), channel_mean=mean.float(),
                      channel_std=cov.diagonal().sqrt().float(), eigvals=vals.float(), eigvecs=vecs.float())


def _check_mode(mode: str) -> None:
    if mode not in PREPROCESS:
        raise UserError(f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESS)}")


def normalize(x: torch.Tensor, mode: str, stats: InputStats) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) on the 0-255 scale -> float32 network input (a new tensor).

    standard: (x/255 - mean/255) / (std/255) = (x - mean) / std per channel (torchvision's and most CIFAR code's).
    paper:    x - mean image, still on the 0-255 scale, no division (paper §2, cuda-convnet).
    """
    return normalize_into(torch.empty_like(x, dtype=torch.float32), x, mode, stats)


def normalize_into(out: torch.Tensor, x: torch.Tensor, mode: str, stats: InputStats) -> torch.Tensor:
    """normalize(x) written into `out` (float32, x's shape, any strides) and returned: a copy, then in-place ops
    (2x faster than out-of-place on the CPU)."""
    _check_mode(mode)
    out.copy_(x)
    if mode == "paper":
        return out.sub_(stats.mean_image)  # (B, 3, H, W)
    return out.sub_(stats.channel_mean[:, None, None]).div_(stats.channel_std[:, None, None])  # (B, 3, H, W)


def shift_lighting(x: torch.Tensor, alpha: torch.Tensor, stats: InputStats, scale: float = PCA_SCALE,
                   mode: str = "paper") -> torch.Tensor:
    """Paper §4.1 "fancy PCA" for given draws alpha (B, 3), alpha ~ N(0, 0.1) per image: add eigvecs @ (alpha *
    eigvals) to every pixel, evaluated on pixels of PCA_SCALE x 0-255 and passed through the same per-channel
    division as `normalize` (none for `paper`, / channel_std for `standard`)."""
    return x + lighting_offset(alpha, stats, scale, mode)[:, :, None, None]  # (B, 3, H, W)


def lighting_offset(alpha: torch.Tensor, stats: InputStats, scale: float = PCA_SCALE,
                    mode: str = "paper") -> torch.Tensor:
    """Each image's RGB shift (B, 3) in normalised units for draws alpha (B, 3)."""
    offset = (alpha * (stats.eigvals * scale)) @ stats.eigvecs.T  # (B, 3) 0-255 units, row b = V (alpha_b * lambda)
    return offset / stats.channel_std if mode == "standard" else offset


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where flip (B,) bool is set."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)  # (B, C, H, W)


def crop_at(x: torch.Tensor, pad: int, off: torch.Tensor) -> torch.Tensor:
    """Random translation for given offsets off (2, B) in [0, 2*pad] (row offsets, then column offsets): zero-pad by
    `pad` (zero is the mean: x is normalised) and cut each image's HxW window, through one strided view (unfold)
    and one advanced index, no loop."""
    b, _, h, w = x.shape
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W) view
    return windows[torch.arange(b, device=x.device), :, off[0], off[1]]  # (B, C, H, W)


class BatchAugmenter:
    """The per-run input pipeline: uint8 batch on the device -> normalised (and, for training, augmented) floats.

    Training order: normalise -> PCA lighting -> crop -> flip, as switched on by `level` (AUGMENT_LEVELS).
    Random draws from `gen` happen in that order, so a saved generator state resumes the exact stream.
    """

    def __init__(self, stats: InputStats, preprocess: str = "standard", level: str = "crop_flip", pad: int = 4,
                 device: torch.device | str = "cpu", pca_std: float = 0.1, pca_scale: float = PCA_SCALE,
                 compiled: bool = False):
        _check_mode(preprocess)
        if level not in _LEVEL_OPS:
            raise UserError(f"unknown augmentation level {level!r}; choose one of {', '.join(AUGMENT_LEVELS)}")
        if pad < 0 or pca_std < 0:
            raise UserError(f"crop padding ({pad}) and PCA std ({pca_std}) must be >= 0")
        self.stats, self.preprocess, self.level, self.pad = stats.to(device), preprocess, level, pad
        self.pca_std, self.pca_scale, self.ops = pca_std, pca_scale, _LEVEL_OPS[level]
        self.compiled, self.compiled_size = compiled, 0
        self.stat_args = tuple(getattr(self.stats, f.name) for f in fields(self.stats))  # augment()'s argument

    def draw(self, b: int, gen: torch.Generator, device: torch.device):
        """A batch's random numbers, in the pipeline's order: PCA alphas (B, 3), crop offsets (2, B), flips (B,);
        None for an op the level leaves out. The same draws as the one-op-at-a-time definitions in
        tests/augment_reference.py."""
        alpha = torch.randn(b, 3, generator=gen, device=device) * self.pca_std if "pca" in self.ops else None
        off = torch.randint(0, 2 * self.pad + 1, (2, b), generator=gen, device=device) \
            if "crop" in self.ops and self.pad else None
        flip = torch.rand(b, generator=gen, device=device) < 0.5 if "flip" in self.ops else None
        return alpha, off, flip

    def __call__(self, x: torch.Tensor, gen: torch.Generator,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> augmented float32 (B, 3, H, W) in `memory_format`.

        compiled=True runs the same maths as one torch.compile'd CPU kernel, faster at the crop levels
        (`ablate bench`'s pipeline rows), the same numbers bit for bit (tests/unit/test_augment.py). Compiling
        costs seconds once per process, so train_run turns it on for runs big enough to repay it. Only batches
        of the first compiled size use it (no recompiling for an epoch's shorter last batch); if compiling
        fails (no C++ compiler, say) it warns once and runs eagerly."""
        args = (x, self.stat_args, self.preprocess, self.pad, self.pca_scale,
                *self.draw(len(x), gen, x.device), memory_format)
        if self.compiled and x.device.type == "cpu" and _COMPILE["ok"] and self.compiled_size in (0, len(x)):
            try:
                out = compiled_augment()(*args)
                self.compiled_size = len(x)
                return out
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path gives the same numbers
                _COMPILE["ok"] = False
                print(f"warning: compiling the input pipeline failed ({type(err).__name__}); running it eagerly",
                      file=sys.stderr)
        return augment(*args)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time input: normalised, never augmented."""
        return normalize(x, self.preprocess, self.stats)


def augment(x: torch.Tensor, stats: tuple[torch.Tensor, ...], preprocess: str, pad: int, pca_scale: float,
            alpha: torch.Tensor | None, off: torch.Tensor | None, flip: torch.Tensor | None,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The training pipeline for given draws, run eagerly: compose_augment's numbers bit for bit in fewer passes
    over memory. It normalises and lights the batch in place inside a zero border (zero is the mean after
    normalising), then one gather cuts each crop window, mirrored where flipped, straight into `memory_format`.
    (torch.compile turns a gather into a slow loop, so the compiled path traces compose_augment instead.)"""
    if off is None and flip is None:  # no pixel moves
        return compose_augment(x, stats, preprocess, pad, pca_scale, alpha, off, flip, memory_format)
    st = InputStats(*stats)
    b, c, h, w = x.shape
    p = pad if off is not None else 0
    padded = (torch.zeros if p else torch.empty)(b, c, h + 2 * p, w + 2 * p, device=x.device)
    inner = normalize_into(padded[:, :, p:p + h, p:p + w], x, preprocess, st)  # (B, 3, H, W) view of padded
    if alpha is not None:
        inner.add_(lighting_offset(alpha, st, pca_scale, preprocess)[:, :, None, None])
    return gather_windows(padded, h, w, off, flip, memory_format)


def compose_augment(x: torch.Tensor, stats: tuple[torch.Tensor, ...], preprocess: str, pad: int, pca_scale: float,
                    alpha: torch.Tensor | None, off: torch.Tensor | None, flip: torch.Tensor | None,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The training pipeline as its ops one after another: normalise, PCA lighting, crop, flip. A plain function
    of tensors (the statistics as InputStats' fields in order) that torch.compile fuses into one loop."""
    st = InputStats(*stats)
    x = normalize(x, preprocess, st)  # (B, 3, H, W) float32
    if alpha is not None:
        x = shift_lighting(x, alpha, st, pca_scale, preprocess)
    if off is not None:
        x = crop_at(x, pad, off)
    if flip is not None:
        x = flip_where(x, flip)
    return x.contiguous(memory_format=memory_format)


def gather_windows(padded: torch.Tensor, h: int, w: int, off: torch.Tensor | None, flip: torch.Tensor | None,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Each image's HxW window of `padded` (B, C, Hp, Wp) at offsets off (2, B) (None: the top left), mirrored
    left-right where flip (B,) is set: crop_at then flip_where as one gather, written in `memory_format`."""
    b, c, hp, wp = padded.shape
    i, j = torch.arange(h, device=padded.device), torch.arange(w, device=padded.device)
    rows, cols = i.expand(b, h), j.expand(b, w)  # (B, H), (B, W) source row and column of each output pixel
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - j, j)
    if off is not None:
        rows, cols = rows + off[0][:, None], cols + off[1][:, None]
    pixel = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W)
    if memory_format == torch.channels_last:
        out = torch.empty(b, h * w, c, device=padded.device).permute(0, 2, 1)  # (B, C, H*W) with C innermost
    else:
        out = torch.empty(b, c, h * w, device=padded.device)
    torch.gather(padded.reshape(b, c, hp * wp), 2, pixel, out=out)
    return out.view(b, c, h, w)


_COMPILE = {"ok": True}  # False once compiling has failed in this process


@functools.cache
def compiled_augment():
    # inductor's C++ toolchain probe looks for CUDA and logs "No CUDA runtime is found" on every CPU machine:
    # noise for a CPU kernel, so that one logger only reports errors
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(compose_augment, dynamic=False)


def ten_crop_views(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Paper §4.1 test-time views adapted to CIFAR: normalised (B, C, H, W) -> (10, B, C, H, W).

    HxW windows of the zero-padded image at the four corners and the centre (views 0-4: top-left, top-right,
    bottom-left, bottom-right, centre = x itself), then the same five mirrored (views 5-9).
    """
    _, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    corners = ((0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad))
    crops = torch.stack([xp[:, :, i:i + h, j:j + w] for i, j in corners])  # (5, B, C, H, W)
    return torch.cat([crops, crops.flip(-1)])  # (10, B, C, H, W)


@torch.no_grad()
def ten_crop_logits(model: torch.nn.Module, x_norm: torch.Tensor, pad: int = 4,
                    max_batch: int | None = None) -> torch.Tensor:
    """Softmax probabilities averaged over the 10 views (paper §4.1: it averages predictions, not logits).

    Returns (B, classes) probabilities despite the name. The caller puts the model in eval mode. One forward
    over all 10*B views, or chunks of `max_batch` views when memory is short; keeps x_norm's channels_last.
    """
    views = ten_crop_views(x_norm, pad).flatten(0, 1)  # (10*B, C, H, W)
    if x_norm.is_contiguous(memory_format=torch.channels_last) and not x_norm.is_contiguous():
        views = views.contiguous(memory_format=torch.channels_last)
    probs = torch.cat([model(v).float().softmax(-1) for v in views.split(max_batch or len(views))])  # (10*B, K)
    return probs.view(10, x_norm.shape[0], -1).mean(0)  # (B, K)
