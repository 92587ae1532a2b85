"""The layers the model family adds to torch's: LRN as the paper writes it (with a faster path under autocast), its
per-column form for the two-tower net, cuda-convnet's same-map response normalisation, and a Conv2d whose bf16
backward keeps oneDNN's fast kernels on small-channel layers."""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ablations.errors import UserError


# cuda-convnet's response normalisations (layer-params-18pct.cfg: rnorm size 3, scale 5e-5, pow 0.75)
RNORM_SIZE, RNORM_SCALE, RNORM_POW = 3, 5e-5, 0.75
AMP_DEVICES = ("cpu", "cuda")  # where LocalResponseNorm and Conv2d take their faster paths (autocast exists there)


class LocalResponseNorm(nn.LocalResponseNorm):
    """nn.LocalResponseNorm (same constants, same maths) with the channel-window sum done as one matmul.

    out = x / (k + alpha/n * sum_{window} x^2)^beta, the window being channels c - n//2 .. c + (n-1)//2 as in
    F.local_response_norm. F.local_response_norm sums through avg_pool3d, which on CPUs makes an alexnet
    training step with LRN several times slower than without; the sum as x^2 @ band (a 0/1 C x C band matrix)
    makes the layer several times faster forward and backward (`ablate bench`'s LRN rows). Under bf16 autocast the
    matmul runs in bf16 and the rest in fp32, so the output is fp32 as F.local_response_norm's is there. Only
    training takes this path: without gradients (evaluation, FLOP counts) it is F.local_response_norm itself, so
    the band matmul, which is no FLOP of the model, never shows up in a FLOP count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if x.device.type not in AMP_DEVICES or not torch.is_grad_enabled():
            return super().forward(x)
        c = x.shape[1]
        i = torch.arange(c, device=x.device)
        offset = i[None, :] - i[:, None]  # offset[j, c] = c - j
        band = ((offset >= -((self.size - 1) // 2)) & (offset <= self.size // 2)).to(x.dtype)  # (C, C)
        sq = x * x  # (B, C, H, W)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            window = (sq.permute(0, 2, 3, 1) @ band).permute(0, 3, 1, 2)  # channels innermost: (B, H, W, C) @ (C, C)
        else:
            window = (band.T @ sq.flatten(2)).view_as(x)  # (C, C) @ (B, C, H*W)
        return x * (window.float() * (self.alpha / self.size) + self.k).pow(-self.beta)


def paper_lrn() -> nn.LocalResponseNorm:
    """Paper §3.3: b = a / (k + alpha * sum_{n=5 adjacent channels} a^2)^beta, k=2, alpha=1e-4, beta=0.75.

    PyTorch divides alpha by the window size n, so the paper's 1e-4 is alpha=5e-4 here."""
    return LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)


def lrn_per_column(x: torch.Tensor, lrn: nn.Module, columns: int) -> torch.Tensor:
    """Apply a cross-channel LRN within each of `columns` channel groups, never across them.

    The paper's two columns sat on two GPUs, so a channel window never reached the other column's maps. Folding
    the columns into the batch makes each column a separate image to the LRN."""
    B, C, H, W = x.shape
    y = lrn(x.reshape(B * columns, C // columns, H, W))  # (B*columns, C/columns, H, W)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return y.reshape(B, C, H, W).contiguous(memory_format=fmt)  # keep the caller's memory format


class ColumnLRN(nn.Module):
    """The paper's LRN, normalising each tower's channels separately (towers=2)."""

    def __init__(self, columns: int):
        super().__init__()
        self.columns = columns
        self.lrn = paper_lrn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrn_per_column(x, self.lrn, self.columns)

    def extra_repr(self) -> str:
        return f"columns={self.columns}, lrn=LocalResponseNorm({self.lrn.extra_repr()})"


class SameMapRNorm(nn.Module):
    """cuda-convnet's `rnorm`: normalise each pixel by its size x size spatial neighbourhood in the same map.

    b = a / (1 + (scale / size^2) * sum_{size x size window} a^2)^pow

    cuda-convnet divides the configured scale by size^2 for this 2-D window (by size for the cross-map `cmrnorm`)
    and adds 1 (k=1). The window is centred; pixels outside the image count as zeros. Since (scale / size^2) *
    sum is scale times the zero-padded window mean, it is one avg_pool2d over a^2 with count_include_pad."""

    def __init__(self, size: int = RNORM_SIZE, scale: float = RNORM_SCALE, pow: float = RNORM_POW):
        super().__init__()
        if size % 2 != 1:
            raise UserError(f"same-map rnorm size must be odd for a centred window, got {size}")
        self.size, self.scale, self.pow = size, scale, pow

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x * (1.0 + self.scale * mean_sq).pow(-self.pow)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, pow={self.pow}"


class _ConvBiasGradApart(torch.autograd.Function):
    """conv2d whose backward computes the bias gradient as a plain sum instead of inside the conv's kernel.

    Forward is F.conv2d itself; backward asks aten.convolution_backward (what autograd calls for conv2d) for the
    input and weight gradients only. Why: asked for the bias gradient as well, oneDNN's bf16 backward-weights
    pass leaves its AMX kernel for a generic GEMM one on small-channel layers such as alexnet's conv1 (3->64) and
    conv2 (64->192); `ablate bench`'s per-layer rows show the difference on a given machine. Adding the bias
    outside the conv instead would cost more than it saves: a broadcast add over a channels_last map with few
    channels is far slower than a copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # (B, C_out, H', W')

    @staticmethod
    def backward(ctx, grad):  # grad: (B, C_out, H', W')
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False])
        grad_b = grad.sum((0, 2, 3)) if need_b else None  # (C_out,)
        return grad_x, grad_w, grad_b, None, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, state_dict and forward maths) with the bias gradient computed apart from the
    weight gradient; see _ConvBiasGradApart for why."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        if bias is None or self.padding_mode != "zeros" or not torch.is_grad_enabled() or device not in AMP_DEVICES:
            return super()._conv_forward(x, weight, bias)  # nothing to gain (or no autocast, e.g. on "meta")
        if torch.is_autocast_enabled(device):  # cast as autocast would for conv2d, outside the Function
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _ConvBiasGradApart.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
