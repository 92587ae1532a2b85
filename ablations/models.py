"""The model family: the seed chapter's CIFAR AlexNet with the paper's switches, and cuda-convnet's four-layer net.

One frozen ModelSpec, one builder per architecture (a registry, not an if-chain), and small tables for the
activations, the poolings and the paper's initialisation. Everything is sized for 3x32x32 inputs.

- alexnet: 3x3 convs 64-192-384-256-256 (pads 2, 2, 1, 1, 1 as in the seed), max-pools after conv1, conv2, conv5,
  FC -> 2048 -> 2048 -> classes. The FC input size follows from the shapes (pooling changes it).
- convnet4: cuda-convnet's layers-19pct (lrn=False) / layers-18pct (lrn=True), the "four-layer convolutional
  network" of the paper's Figure 1 (see PAPER.md).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ablations.choices import ARCH_NAMES, DROPOUT_AT, POOLINGS
from ablations.errors import UserError
from ablations.layers import (AMP_DEVICES, ColumnLRN, Conv2d, LocalResponseNorm, SameMapRNorm,  # noqa: F401
                              lrn_per_column, paper_lrn)

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class ModelSpec:
    """Every switch that changes the network. Read-only; build_model validates it."""

    arch: str = "alexnet"  # "alexnet" | "convnet4"
    num_classes: int = 10  # 10 (CIFAR-10) | 100 (CIFAR-100)
    activation: str = "relu"  # a key of ACTIVATIONS
    dropout: float = 0.0  # alexnet: p in the first two FC layers (0 = off; the paper used 0.5)
    dropout_at: str = "outputs"  # alexnet: "outputs" of fc1 and fc2 (the paper, Caffe) | "inputs" (seed, torchvision)
    pooling: str = "overlap"  # alexnet: a key of POOLINGS
    lrn: bool = False  # alexnet: paper LRN in conv1, conv2; convnet4: True = layers-18pct, False = layers-19pct
    width: float = 1.0  # multiplies conv channels and FC widths
    towers: int = 1  # alexnet: 2 = the paper's two columns (conv2, conv4, conv5 grouped)
    half_kernels: bool = False  # alexnet: paper footnote 2 one-GPU net, half the kernels in conv1-conv4
    init: str = "default"  # "default" (PyTorch) | "paper" (see PAPER_INIT)


# ---------------------------------------------------------------------------------------------------------------
# Tables: activations, poolings, paper initialisation

# inplace where the op allows it: nothing downstream needs the pre-activation values (conv/linear backward
# needs their inputs, max-pool its indices), so overwriting saves one activation-sized buffer per layer.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": lambda: nn.Tanh(),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": lambda: nn.GELU(),
}

# POOLINGS and DROPOUT_AT (ablations/choices.py) name the pooling layouts and the dropout placements.
# Max-pooling ReLUs equals ReLU of the max-pool, bit for bit in any precision, and the gradient reaches the same
# input (the window's argmax, or none when the max is not positive). alexnet pools first where nothing sits
# between the two: ReLU and its backward then touch a quarter of the pixels. Not for the others: leaky_relu's
# rounded 0.01x and tanh can tie distinct inputs, which moves the argmax, so their gradients would differ
# (tests/unit/test_models.py); they keep the paper's order.
POOL_FIRST: frozenset[str] = frozenset({"relu"})

# layer name -> (weight std, bias start value). Paper §5 for alexnet: W ~ N(0, 0.01), biases 1 in conv2, conv4,
# conv5 and the hidden FC layers (to give ReLUs positive inputs early), 0 elsewhere. convnet4: cuda-convnet's
# layer-params-19pct initW (conv1 is tiny, 1e-4), biases 0.
PAPER_INIT: dict[str, dict[str, tuple[float, float]]] = {
    "alexnet": {
        "conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.01, 0.0), "conv4": (0.01, 1.0),
        "conv5": (0.01, 1.0), "fc1": (0.01, 1.0), "fc2": (0.01, 1.0), "fc3": (0.01, 0.0),
    },
    "convnet4": {"conv1": (1e-4, 0.0), "conv2": (0.01, 0.0), "conv3": (0.01, 0.0), "fc": (0.01, 0.0)},
}

INITS = ("default", "paper")
TOWERS = (1, 2)
ALEXNET_ONLY = ("dropout", "dropout_at", "pooling", "towers", "half_kernels")  # convnet4 rejects these
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)  # the seed chapter's CIFAR AlexNet
ALEXNET_PADDING = (2, 2, 1, 1, 1)
ALEXNET_FC = 2048
CONVNET4_CHANNELS = (32, 32, 64)  # layers-19pct


# ---------------------------------------------------------------------------------------------------------------
# The networks


class Net(nn.Module):
    """features -> flatten -> classifier. The arch builders fill the two named Sequentials."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32)
        x = self.features(x)  # (B, C, h, w)
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


def scaled(n: int, width: float, multiple: int = 1) -> int:
    """round(n * width) to the nearest multiple (2 for grouped convs), at least one multiple."""
    return max(multiple, multiple * round(n * width / multiple))


def _flat_size(features: nn.Sequential) -> int:
    """Per-image size of the features' output, by running one dummy image (never hard-code it)."""
    with torch.no_grad():
        return features(torch.zeros(1, *IMAGE_SHAPE)).numel()


def alexnet_channels(spec: ModelSpec) -> tuple[int, ...]:
    """conv1..conv5 output channels after width, half_kernels (all but conv5 halved) and towers (even counts)."""
    multiple = 2 if spec.towers == 2 else 1
    halves = (0.5, 0.5, 0.5, 0.5, 1.0) if spec.half_kernels else (1.0,) * 5
    return tuple(scaled(c, spec.width * h, multiple) for c, h in zip(ALEXNET_CHANNELS, halves))


def _alexnet(spec: ModelSpec) -> Net:
    """The seed's CIFAR AlexNet. With towers=2, conv2, conv4 and conv5 see only their own column (groups=2) while
    conv1, conv3 and the FC layers see both, as in the paper's Figure 2."""
    act = ACTIVATIONS[spec.activation]
    pools = dict(zip((1, 2, 5), POOLINGS[spec.pooling]))
    groups = (1, spec.towers, 1, spec.towers, spec.towers)
    lrn = (lambda: ColumnLRN(spec.towers)) if spec.towers > 1 else paper_lrn
    layers: list[tuple[str, nn.Module]] = []
    c_in = IMAGE_SHAPE[0]
    for i, (c, pad, g) in enumerate(zip(alexnet_channels(spec), ALEXNET_PADDING, groups), start=1):
        block = [(f"act{i}", act())]
        if spec.lrn and i in (1, 2):  # paper §3.3: after the ReLU, before the pooling
            block.append((f"lrn{i}", lrn()))
        if i in (1, 2, 5):
            kernel, stride, ceil = pools[i]
            pool = (f"pool{i}", nn.MaxPool2d(kernel, stride, ceil_mode=ceil))
            pool_first = spec.activation in POOL_FIRST and len(block) == 1  # the same maths; see POOL_FIRST
            block = [pool, *block] if pool_first else [*block, pool]
        layers += [(f"conv{i}", Conv2d(c_in, c, 3, padding=pad, groups=g)), *block]
        c_in = c
    features = nn.Sequential(OrderedDict(layers))
    fc = scaled(ALEXNET_FC, spec.width)
    drop = (lambda: nn.Dropout(spec.dropout)) if spec.dropout > 0 else nn.Identity
    fc1, fc2 = [("fc1", nn.Linear(_flat_size(features), fc)), ("act6", act())], [("fc2", nn.Linear(fc, fc)),
                                                                                 ("act7", act())]
    if spec.dropout_at == "inputs":  # the seed's and torchvision's placement: before fc1 and fc2
        layers = [("drop1", drop()), *fc1, ("drop2", drop()), *fc2]
    else:  # the paper's (§4.2) and Caffe's drop6/drop7: on the outputs of fc1 and fc2
        layers = [*fc1, ("drop1", drop()), *fc2, ("drop2", drop())]
    classifier = nn.Sequential(OrderedDict([*layers, ("fc3", nn.Linear(fc, spec.num_classes))]))
    return Net(features, classifier)


def _convnet4(spec: ModelSpec) -> Net:
    """cuda-convnet layers-19pct (lrn=False) or layers-18pct (lrn=True, same-map rnorm after pool1 and pool2):

    conv32 - maxpool - act - [rnorm] - conv32 - act - avgpool - [rnorm] - conv64 - act - avgpool - fc

    conv1's neuron sits after its max-pool as in the cfg (the same for monotone activations). Pools are 3x3
    stride 2 with ceil_mode=True and no padding: that is cuda-convnet's outputsX = ceil((size - 3) / 2) + 1, so
    32 -> 16 -> 8 -> 4, windows start at 0, and a window that runs off the edge pools (max or mean) only the
    pixels inside the image, as cuda-convnet does."""
    act = ACTIVATIONS[spec.activation]
    c1, c2, c3 = (scaled(c, spec.width) for c in CONVNET4_CHANNELS)

    def rnorm(i: int) -> list[tuple[str, nn.Module]]:  # layers-18pct only
        return [(f"rnorm{i}", SameMapRNorm())] if spec.lrn else []

    features = nn.Sequential(OrderedDict([
        ("conv1", Conv2d(IMAGE_SHAPE[0], c1, 5, padding=2)),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("act1", act()), *rnorm(1),
        ("conv2", Conv2d(c1, c2, 5, padding=2)), ("act2", act()),
        ("pool2", nn.AvgPool2d(3, 2, ceil_mode=True)), *rnorm(2),
        ("conv3", Conv2d(c2, c3, 5, padding=2)), ("act3", act()),
        ("pool3", nn.AvgPool2d(3, 2, ceil_mode=True)),
    ]))
    classifier = nn.Sequential(OrderedDict([("fc", nn.Linear(_flat_size(features), spec.num_classes))]))
    return Net(features, classifier)


ARCHS: dict[str, Callable[[ModelSpec], Net]] = {"alexnet": _alexnet, "convnet4": _convnet4}
assert tuple(ARCHS) == ARCH_NAMES, "ablations/choices.py's ARCH_NAMES names every arch, in this order"


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def init_paper(model: nn.Module, arch: str) -> None:
    """Set each conv/linear layer to the PAPER_INIT table's Gaussian std and constant bias."""
    table = PAPER_INIT[arch]
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(layers) == set(table), f"paper init table {sorted(table)} does not cover {sorted(layers)}"
    for name, (std, bias) in table.items():
        nn.init.normal_(layers[name].weight, mean=0.0, std=std)
        nn.init.constant_(layers[name].bias, bias)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def _choice(field: str, value, valid) -> None:
    if value not in valid:
        raise UserError(f"unknown {field} {value!r}; valid: {', '.join(map(str, valid))}")


def validate(spec: ModelSpec) -> None:
    """Raise UserError (one line, listing valid values) for any switch that does not fit the architecture."""
    _choice("arch", spec.arch, tuple(ARCHS))
    _choice("activation", spec.activation, tuple(ACTIVATIONS))
    _choice("pooling", spec.pooling, tuple(POOLINGS))
    _choice("dropout_at", spec.dropout_at, DROPOUT_AT)
    _choice("init", spec.init, INITS)
    _choice("towers", spec.towers, TOWERS)
    if not isinstance(spec.num_classes, int) or spec.num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2 (10 for CIFAR-10, 100 for CIFAR-100), "
                        f"got {spec.num_classes!r}")
    if not 0 < spec.width <= 16:
        raise UserError(f"width must be in (0, 16], got {spec.width}")
    if not 0 <= spec.dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {spec.dropout}")
    if spec.half_kernels and spec.towers != 1:
        raise UserError("half_kernels (the paper's one-GPU baseline) needs towers = 1")
    if spec.arch == "convnet4":
        alexnet_only = [k for k in ALEXNET_ONLY if getattr(spec, k) != getattr(ModelSpec(), k)]
        if alexnet_only:
            raise UserError(f"convnet4 takes no {', '.join(alexnet_only)} switch (alexnet only); "
                            "leave it at its default")


def build_model(spec: ModelSpec) -> nn.Module:
    """Validate the spec, build the network on the current default device, apply the chosen init."""
    validate(spec)
    model = ARCHS[spec.arch](spec)
    if spec.init == "paper":
        init_paper(model, spec.arch)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A conv's backward: the input gradient and the weight gradient each cost one forward.

    Replaces torch's formula, which counts a grouped conv's weight gradient `groups` times (fixed upstream in
    pytorch/pytorch#183405, not in torch 2.14) and so would inflate the towers=2 net's cost."""
    from torch.utils.flop_counter import conv_flop_count

    assert not transposed, "no transposed convs in this family"
    return conv_flop_count(x_shape, w_shape, grad_out_shape) * (int(output_mask[0]) + int(output_mask[1]))


def count_flops_per_image(make_model: Callable[[], nn.Module], train: bool = True) -> int:
    """FLOPs of one 3x32x32 image through make_model()'s net, forward (+ backward when `train`), as FlopCounterMode
    counts them (convs and matmuls only), with a grouped convolution's backward counted per group
    (_conv_backward_flops). The one FLOP counter of the suite: the bench's rates and the runs' records use it.

    Built and run on the meta device: shapes only, no arithmetic, so it costs milliseconds at any width."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2
    with torch.device("meta"):
        model = make_model()
        x = torch.zeros(batch, *IMAGE_SHAPE)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = model(x)
        if train:
            out.sum().backward()
    return counter.get_total_flops() // batch


@functools.lru_cache(maxsize=None)
def train_flops_per_image(spec: ModelSpec) -> int:
    """Forward + backward FLOPs of one image through the family's net for `spec`."""
    return count_flops_per_image(lambda: build_model(spec), train=True)


def forward_flops_per_image(spec: ModelSpec) -> int:
    """Forward FLOPs of one image (one test crop) through the family's net for `spec`."""
    return count_flops_per_image(lambda: build_model(spec), train=False)


def _lrn_lines(model: nn.Module) -> list[str]:
    lines = []
    for m in model.modules():
        if isinstance(m, ColumnLRN):
            lines.append(f"LRN applied within each of the {m.columns} columns separately (towers={m.columns})")
        elif isinstance(m, nn.LocalResponseNorm):
            lines.append(f"LRN (paper §3.3): k={m.k:g}, n={m.size}, alpha={m.alpha / m.size:g}, beta={m.beta:g} "
                         f"= nn.LocalResponseNorm({m.size}, alpha={m.alpha:g}, beta={m.beta:g}, k={m.k:g}) "
                         f"(PyTorch divides alpha by n)")
        elif isinstance(m, SameMapRNorm):
            lines.append(f"same-map rnorm (cuda-convnet): size={m.size}x{m.size}, scale={m.scale:g} "
                         f"(/size^2 = {m.scale / m.size ** 2:g}), pow={m.pow:g}, k=1")
    return list(dict.fromkeys(lines))  # one line per distinct constant set, in order


def _one_line(m: nn.Module) -> str:
    return f"{type(m).__name__}({m.extra_repr()})"


def describe_model(spec: ModelSpec) -> str:
    """Layer list with output shapes and parameter counts, the total, the normalisation constants, FLOPs/image."""
    model = build_model(spec).eval()
    layers = [(n, m) for part in (model.features, model.classifier) for n, m in part.named_children()
              if not isinstance(m, nn.Identity)]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in layers]
    with torch.no_grad():
        model(torch.zeros(1, *IMAGE_SHAPE))
    for h in hooks:
        h.remove()
    switches = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(spec).items())
    rows = [f"{spec.arch}: {switches}", f"{'layer':<8} {'output':<14} {'params':>12}  module"]
    for n, m in layers:
        rows.append(f"{n:<8} {'x'.join(map(str, shapes[n])):<14} {count_params(m):>12,}  {_one_line(m)}")
    rows.append(f"total params: {count_params(model):,}")
    rows += _lrn_lines(model)
    rows.append(f"train FLOPs/image (forward+backward): {train_flops_per_image(spec):,}")
    return "\n".join(rows)
