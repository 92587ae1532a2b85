"""The model family: every switch builds and trains a step, shapes and parameter counts follow the layouts, the
normalisation layers match their formulas written out as loops, the paper's init is what the paper says."""
import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from ablations.errors import UserError
from ablations.models import (
    ACTIVATIONS, INITS, PAPER_INIT, POOL_FIRST, POOLINGS, ModelSpec, SameMapRNorm, build_model, count_params,
    describe_model, lrn_per_column, paper_lrn, train_flops_per_image,
)
from runners.cli import main

W = 0.125  # CPU-sized widths keep the whole file fast


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# every switch alone, per architecture (drawn from the registries, so a new entry is tested the day it is added)
ALEXNET_SWITCHES = (
    [{"activation": a} for a in ACTIVATIONS] + [{"pooling": p} for p in POOLINGS] + [{"init": i} for i in INITS]
    + [{"dropout": 0.5}, {"lrn": True}, {"towers": 2}, {"half_kernels": True}]
)
CONVNET4_SWITCHES = [{"activation": a} for a in ACTIVATIONS] + [{"init": i} for i in INITS] + [{"lrn": True}]
SINGLE = [ModelSpec(arch="alexnet", width=W, **kw) for kw in ALEXNET_SWITCHES] + \
         [ModelSpec(arch="convnet4", width=W, **kw) for kw in CONVNET4_SWITCHES]
# a product of the structural switches; activation and init rotate through the registries
_STRUCTURE = ({"towers": 1}, {"towers": 2}, {"half_kernels": True})
COMBINED = [
    ModelSpec(arch="alexnet", width=W, lrn=lrn, pooling=pool, dropout=p, activation=list(ACTIVATIONS)[i % 4],
              init=INITS[i % 2], **structure)
    for i, (lrn, structure, pool, p) in enumerate(itertools.product((False, True), _STRUCTURE, POOLINGS, (0.0, 0.5)))
] + [ModelSpec(arch="convnet4", width=W, lrn=lrn, activation=a, init="paper")
     for lrn, a in itertools.product((False, True), ACTIVATIONS)]


def _id(spec: ModelSpec) -> str:
    d = {k: v for k, v in vars(spec).items() if v != getattr(ModelSpec(), k) and k != "width"}
    return f"{spec.arch}-" + "-".join(f"{k}={v}" for k, v in d.items() if k != "arch")


def _train_step(spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(spec).train()
    out = model(x)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("spec", SINGLE + COMBINED, ids=_id)
def test_forward_backward_finite(spec, num_classes):
    spec = ModelSpec(**{**vars(spec), "num_classes": num_classes})
    out = _train_step(spec, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", [ModelSpec(width=W, lrn=True, towers=2, dropout=0.5),
                                  ModelSpec(arch="convnet4", width=W, lrn=True)], ids=_id)
def test_channels_last_bf16_autocast(spec):
    torch.manual_seed(0)
    model = build_model(spec).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------- layouts and counts


def conv_params(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> int:
    return c_out * (c_in // groups) * k * k + c_out


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def alexnet_params(channels, groups, fc_in, fc, classes) -> int:
    c_in = (3,) + tuple(channels[:-1])
    convs = sum(conv_params(i, o, 3, g) for i, o, g in zip(c_in, channels, groups))
    return convs + linear_params(fc_in, fc) + linear_params(fc, fc) + linear_params(fc, classes)


def test_alexnet_one_column_matches_seed_layout():
    c = (64, 192, 384, 256, 256)
    expected = alexnet_params(c, (1,) * 5, 256 * 4 * 4, 2048, 10)
    assert count_params(build_model(ModelSpec())) == expected
    assert count_params(build_model(ModelSpec(pooling="seed"))) == expected


@pytest.mark.parametrize("width, c", [(1.0, (64, 192, 384, 256, 256)), (0.25, (16, 48, 96, 64, 64))])
def test_towers_param_count_is_grouped_layout(width, c):
    model = build_model(ModelSpec(width=width, towers=2))
    fc = round(2048 * width)
    assert count_params(model) == alexnet_params(c, (1, 2, 1, 2, 2), c[4] * 16, fc, 10)
    # conv2, conv4 and conv5 each lose exactly half their weights against one column; nothing else changes
    one_column = count_params(build_model(ModelSpec(width=width)))
    assert one_column - count_params(model) == 9 * (c[0] * c[1] + c[2] * c[3] + c[3] * c[4]) // 2
    assert [model.features.get_submodule(f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]


def test_half_kernels_param_count():
    c = (32, 96, 192, 128, 256)  # conv1-conv4 halved, conv5 and the FC layers kept (paper footnote 2)
    model = build_model(ModelSpec(half_kernels=True, num_classes=100))
    assert count_params(model) == alexnet_params(c, (1,) * 5, 256 * 4 * 4, 2048, 100)


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_every_pooling_gives_the_same_map_sizes_and_fc_input(width, pooling):
    """Paper §3.4: overlapping 3x3/2 against 2x2/2 "which produces output of equivalent dimensions"; the arms differ
    in the overlap only."""
    model = build_model(ModelSpec(width=width, pooling=pooling))
    assert model.classifier.fc1.in_features == round(256 * width) * 4 * 4
    shapes, x = [], torch.zeros(1, 3, 32, 32)
    for name, layer in model.features.named_children():
        x = layer(x)
        if name.startswith("pool"):
            shapes.append(tuple(x.shape[2:]))
    assert shapes == [(17, 17), (9, 9), (4, 4)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(m.kernel_size, m.stride, m.ceil_mode) for m in pools] == list(POOLINGS[pooling])
    assert count_params(model) == count_params(build_model(ModelSpec(width=width, pooling="nonoverlap")))


def test_overlapping_pools_overlap_and_nonoverlapping_do_not():
    """A single bright pixel on a window border reaches two outputs of a 3x3/2 pool and one of a 2x2/2 pool."""
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 2] = 1.0
    overlap = nn.MaxPool2d(*POOLINGS["overlap"][0][:2], ceil_mode=True)(x)
    plain = nn.MaxPool2d(*POOLINGS["nonoverlap"][0][:2])(x)
    assert int(overlap.sum()) == 4 and int(plain.sum()) == 1


@pytest.mark.parametrize("placement, after", [("outputs", ["fc1", "act6", "drop1", "fc2", "act7", "drop2", "fc3"]),
                                              ("inputs", ["drop1", "fc1", "act6", "drop2", "fc2", "act7", "fc3"])])
def test_dropout_placement(placement, after):
    """The paper (and Caffe's drop6/drop7) drops the outputs of fc1 and fc2; the seed and torchvision their inputs."""
    model = build_model(ModelSpec(width=0.25, dropout=0.5, dropout_at=placement))
    assert [n for n, _ in model.classifier.named_children()] == after
    for fc in (model.classifier.fc1, model.classifier.fc2):  # every unit positive, so only dropout makes zeros
        nn.init.constant_(fc.weight, 1e-3)
        nn.init.constant_(fc.bias, 1.0)
    feats = torch.ones(256, model.classifier.fc1.in_features)
    upto = model.classifier[:-1]  # everything before fc3
    with torch.no_grad():
        clean = upto.eval()(feats)
        torch.manual_seed(0)
        dropped = upto.train()(feats)
    zeros = float((dropped == 0).float().mean())
    if placement == "outputs":  # fc2's outputs are dropped: about half exactly zero, the rest scaled by 1 / (1 - p)
        assert 0.45 < zeros < 0.55
        assert float(dropped.max()) > 1.5 * float(clean.max())  # inverted dropout scales the kept units up
    else:  # the inputs are dropped: every output stays positive
        assert zeros == 0


def test_convnet4_layout_and_cuda_convnet_pooling():
    model = build_model(ModelSpec(arch="convnet4"))
    shapes, x = [], torch.randn(1, 3, 32, 32)
    for name, layer in model.features.named_children():
        x = layer(x)
        if name.startswith("pool"):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert count_params(model) == conv_params(3, 32, 5) + conv_params(32, 32, 5) + conv_params(32, 64, 5) + \
        linear_params(64 * 16, 10)
    # cuda-convnet averages a window that runs off the image over the pixels inside it
    a = torch.randn(1, 1, 8, 8)
    assert torch.allclose(model.features.pool2(a)[0, 0, -1, -1], a[0, 0, 6:, 6:].mean())
    assert torch.allclose(model.features.pool1(a)[0, 0, -1, -1], a[0, 0, 6:, 6:].max())


def test_convnet4_lrn_is_layers_18pct_order():
    names = [n for n, _ in build_model(ModelSpec(arch="convnet4", lrn=True)).features.named_children()]
    assert names == ["conv1", "pool1", "act1", "rnorm1", "conv2", "act2", "pool2", "rnorm2", "conv3", "act3", "pool3"]
    names = [n for n, _ in build_model(ModelSpec(arch="convnet4")).features.named_children()]
    assert "rnorm1" not in names and "rnorm2" not in names


def test_alexnet_lrn_after_activation_before_pool():
    names = [n for n, _ in build_model(ModelSpec(width=W, lrn=True)).features.named_children()]
    for i in (1, 2):
        assert names.index(f"act{i}") + 1 == names.index(f"lrn{i}") == names.index(f"pool{i}") - 1
    assert "lrn3" not in names


# ----------------------------------------------------------------------------------------- initialisation


def _layer(model: nn.Module, name: str) -> nn.Module:
    return next(m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == name)


def test_paper_init_alexnet():
    torch.manual_seed(0)
    model = build_model(ModelSpec(width=0.5, init="paper"))
    for name in ("fc1", "conv4"):  # large layers: the sample std is within ~0.5% of the target
        w = _layer(model, name).weight
        assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    for name in ("conv1", "conv2", "conv3", "conv5", "fc2", "fc3"):
        assert abs(_layer(model, name).weight.std().item() - 0.01) < 1.5e-3
    for name in ("conv2", "conv4", "conv5", "fc1", "fc2"):
        assert torch.all(_layer(model, name).bias == 1.0), name
    for name in ("conv1", "conv3", "fc3"):
        assert torch.all(_layer(model, name).bias == 0.0), name
    assert set(PAPER_INIT["alexnet"]) == {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                          if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_default_init_is_pytorch_not_paper():
    torch.manual_seed(0)
    model = build_model(ModelSpec(width=0.5))
    assert not torch.all(_layer(model, "conv2").bias == 1.0)
    assert abs(_layer(model, "fc1").weight.std().item() - 0.01) > 2e-3


def test_paper_init_convnet4_cuda_convnet_stds():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="convnet4", init="paper"))
    for name, std in (("conv1", 1e-4), ("conv2", 0.01), ("conv3", 0.01), ("fc", 0.01)):
        layer = _layer(model, name)
        assert abs(layer.weight.std().item() / std - 1) < 0.1, name
        assert torch.all(layer.bias == 0.0), name


# ----------------------------------------------------------------------------------------- normalisation layers


def lrn_by_loops(a: torch.Tensor, n=5, k=2.0, alpha=1e-4, beta=0.75, columns=1) -> torch.Tensor:
    """Paper §3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta,
    with N the channels of the column that i belongs to."""
    B, C, H, W = a.shape
    per = C // columns
    b = torch.empty_like(a)
    for i in range(C):
        first = (i // per) * per
        lo, hi = max(first, i - n // 2), min(first + per - 1, i + n // 2)
        s = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        b[:, i] = a[:, i] / (k + alpha * s) ** beta
    return b


def test_paper_lrn_matches_formula():
    a = 40 * torch.randn(2, 11, 4, 4, generator=torch.Generator().manual_seed(0))  # large: the norm bites
    b = paper_lrn()(a)
    assert torch.allclose(b, lrn_by_loops(a), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b, a / 2 ** 0.75, rtol=1e-2)  # the window sum matters at this scale


def test_lrn_per_column_never_crosses_columns():
    a = 40 * torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(0))
    b = lrn_per_column(a, paper_lrn(), 2)
    assert torch.allclose(b, lrn_by_loops(a, columns=2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b, paper_lrn()(a), rtol=1e-3)  # channels 4-7 see the other column without it
    b_cl = lrn_per_column(a.to(memory_format=torch.channels_last), paper_lrn(), 2)
    assert b_cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(b_cl, b)


def rnorm_by_loops(a: torch.Tensor, size=3, scale=5e-5, pow_=0.75) -> torch.Tensor:
    """cuda-convnet rnorm written out: b = a / (1 + scale/size^2 * sum over the centred size x size window
    inside the image of a^2)^pow."""
    B, C, H, W = a.shape
    r = size // 2
    b = torch.empty_like(a)
    for y in range(H):
        for x in range(W):
            window = a[:, :, max(0, y - r):min(H, y + r + 1), max(0, x - r):min(W, x + r + 1)]
            s = (window ** 2).sum(dim=(2, 3))  # (B, C)
            b[:, :, y, x] = a[:, :, y, x] / (1 + scale / size ** 2 * s) ** pow_
    return b


def test_same_map_rnorm_matches_definition():
    a = 150 * torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    b = SameMapRNorm()(a)
    assert torch.allclose(b, rnorm_by_loops(a), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b, a, rtol=1e-2)


# ----------------------------------------------------------------------------------------- errors, counts, FLOPs


@pytest.mark.parametrize("kw, needle", [
    ({"arch": "vgg"}, "convnet4"), ({"activation": "sigmoid"}, "leaky_relu"), ({"pooling": "avg"}, "nonoverlap"),
    ({"init": "xavier"}, "paper"), ({"towers": 3}, "1, 2"), ({"towers": 2, "half_kernels": True}, "towers = 1"),
    ({"arch": "convnet4", "dropout": 0.5}, "dropout"), ({"arch": "convnet4", "towers": 2}, "towers"),
    ({"arch": "convnet4", "pooling": "nonoverlap"}, "pooling"),
    ({"arch": "convnet4", "half_kernels": True}, "half_kernels"),
    ({"width": 0.0}, "width"), ({"dropout": 1.0}, "dropout"), ({"num_classes": 1}, "num_classes"),
])
def test_bad_spec_raises_user_error(kw, needle):
    with pytest.raises(UserError, match=needle) as err:
        build_model(ModelSpec(**kw))
    assert "\n" not in str(err.value)


def test_count_params():
    assert count_params(nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 5, 3, bias=False))) == 16 + 90


def test_train_flops_convnet4_by_formula():
    fwd = {"conv1": 2 * 32 * 75 * 32 * 32, "conv2": 2 * 32 * 800 * 16 * 16, "conv3": 2 * 64 * 800 * 8 * 8,
           "fc": 2 * 1024 * 10}
    # backward costs 2x forward (input and weight gradients), except that conv1 needs no input gradient
    assert train_flops_per_image(ModelSpec(arch="convnet4")) == 3 * sum(fwd.values()) - fwd["conv1"]


@pytest.mark.parametrize("spec", [ModelSpec(width=W), ModelSpec(width=W, towers=2, lrn=True),
                                  ModelSpec(width=W, half_kernels=True, pooling="nonoverlap")], ids=_id)
def test_train_flops_three_forwards_less_conv1_input_grad(spec):
    model = build_model(spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # torch's forward count handles groups
        model(torch.zeros(4, 3, 32, 32))
    forward = counter.get_total_flops() // 4
    c1 = model.features.conv1.out_channels
    conv1 = 2 * c1 * 27 * 34 * 34  # multiply-adds x 2 over the 34x34 output of the pad-2 conv1
    train = train_flops_per_image(spec)
    assert 2.5 * forward < train == 3 * forward - conv1  # the image needs no gradient
    assert train_flops_per_image(spec) == train and train_flops_per_image.cache_info().hits >= 1


# ----------------------------------------------------------------------------------------- describe and CLI


def test_describe_model_lists_layers_and_totals():
    spec = ModelSpec(arch="convnet4", lrn=True)
    text = describe_model(spec)
    assert f"total params: {count_params(build_model(spec)):,}" in text
    assert "64x4x4" in text and "scale=5e-05" in text and "pow=0.75" in text
    assert f"{train_flops_per_image(spec):,}" in text
    assert "LRN" not in describe_model(ModelSpec(width=W))


def test_cli_model_prints_lrn_constants_and_params():
    result = CliRunner().invoke(main, ["model", "alexnet", "--lrn", "--towers", "2"])
    assert result.exit_code == 0, result.output
    assert "alpha=0.0005, beta=0.75, k=2" in result.output and "alpha=0.0001" in result.output
    assert f"total params: {count_params(build_model(ModelSpec(lrn=True, towers=2))):,}" in result.output
    assert "groups=2" in result.output


def test_cli_model_bad_switch_is_one_line_error():
    result = CliRunner().invoke(main, ["model", "convnet4", "--towers", "2"])
    assert result.exit_code == 2 and "error:" in result.output and "towers" in result.output


@pytest.mark.parametrize("activation", sorted(POOL_FIRST))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pooling_before_a_piecewise_linear_activation_is_the_same_maths(activation, precision):
    """alexnet pools before relu/leaky_relu for speed: outputs and gradients equal the paper's order bit for bit."""
    from collections import OrderedDict

    spec = ModelSpec(width=0.25, activation=activation, pooling="overlap")
    torch.manual_seed(0)
    fast = build_model(spec)
    names = [n for n, _ in fast.features.named_children()]
    assert names.index("pool1") < names.index("act1") and names.index("pool5") < names.index("act5")
    paper = copy.deepcopy(fast)
    order = [n for n in names if not n.startswith("pool")]
    for i in (1, 2, 5):
        order.insert(order.index(f"act{i}") + 1, f"pool{i}")
    paper.features = torch.nn.Sequential(OrderedDict((n, paper.features.get_submodule(n)) for n in order))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (fast, paper):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
        out.float().square().sum().backward()
        grads.append((out, [p.grad for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    lrn = [n for n, _ in build_model(dataclasses.replace(spec, lrn=True)).features.named_children()]
    assert lrn.index("act1") < lrn.index("lrn1") < lrn.index("pool1")  # LRN between: the paper's order stays
    for other in ("tanh", "leaky_relu", "gelu"):
        names = [n for n, _ in build_model(dataclasses.replace(spec, activation=other)).features.named_children()]
        assert names.index("act1") < names.index("pool1")
