"""Batched preprocessing and augmentation checked against their definitions on tiny generated batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ablations.errors import UserError
from runners.augment import (AUGMENT_LEVELS, PCA_SCALE, PREPROCESS, BatchAugmenter, InputStats, augment,
                             compose_augment, compute_input_stats, normalize, ten_crop_logits, ten_crop_views)
from tests.augment_reference import pca_lighting, random_crop, random_flip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Correlated RGB so the covariance has distinct eigenvalues: (N, 3, 8, 8) uint8."""
    g = gen(1)
    base = torch.rand(40, 1, 8, 8, generator=g) * 160
    return (base + torch.rand(40, 3, 8, 8, generator=g) * torch.tensor([20.0, 60.0, 90.0])[:, None, None]).to(
        torch.uint8)


@pytest.fixture(scope="module")
def stats(images: torch.Tensor) -> InputStats:
    return compute_input_stats(images, chunk=7)  # uneven chunks exercise the accumulation


def test_compute_input_stats_matches_numpy(images, stats):
    a = images.numpy().astype(np.float64)  # (N, 3, H, W)
    pix = a.transpose(0, 2, 3, 1).reshape(-1, 3)
    cov = np.cov(pix, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.mean_image.numpy(), a.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_mean.numpy(), pix.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.channel_std.numpy(), pix.std(0), rtol=1e-5)
    vals, vecs = stats.eigvals.double().numpy(), stats.eigvecs.double().numpy()
    assert np.all(np.diff(vals) < 0), "eigenvalues must be strictly descending here"
    np.testing.assert_allclose(cov @ vecs, vecs * vals, rtol=1e-4, atol=1e-3 * vals[0])
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(cov)[::-1], rtol=1e-5)
    assert stats.mean_image.dtype == stats.eigvecs.dtype == torch.float32


def test_compute_input_stats_rejects_bad_input():
    with pytest.raises(UserError, match="uint8"):
        compute_input_stats(torch.zeros(4, 3, 8, 8))
    with pytest.raises(UserError):
        compute_input_stats(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_normalize_both_modes_match_formula(images, stats):
    x = images[:5]
    std = (x / 255 - stats.channel_mean.view(3, 1, 1) / 255) / (stats.channel_std.view(3, 1, 1) / 255)
    torch.testing.assert_close(normalize(x, "standard", stats), std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalize(x, "paper", stats), x.double().sub(stats.mean_image.double()).float())
    xf = x.float()
    out = normalize(xf, "paper", stats)
    torch.testing.assert_close(out, normalize(x, "paper", stats))
    assert out.dtype == torch.float32 and torch.equal(xf, x.float()), "float input must not be modified"
    with pytest.raises(UserError, match="standard, paper"):
        normalize(x, "zca", stats)


def test_pca_lighting_matches_per_image_definition(stats):
    x = torch.randn(6, 3, 4, 4, generator=gen(2))
    for mode in PREPROCESS:
        out = pca_lighting(x, stats, gen(3), std=0.1, scale=PCA_SCALE, mode=mode)
        alpha = torch.randn(6, 3, generator=gen(3)) * 0.1  # the same draw the batched version makes
        for b in range(6):
            offset = PCA_SCALE * stats.eigvecs @ (alpha[b] * stats.eigvals)  # (3,) 0-255 units, paper §4.1
            if mode == "standard":
                offset = offset / stats.channel_std
            torch.testing.assert_close(out[b], x[b] + offset[:, None, None])
        assert (out - x).abs().amax() > 1e-3, "lighting must change the images"


def test_pca_lighting_zero_std_is_identity_and_offset_in_eigvec_span(stats):
    x = torch.randn(4, 3, 4, 4, generator=gen(4))
    torch.testing.assert_close(pca_lighting(x, stats, gen(5), std=0.0), x)
    # Keep only the first principal component: every offset must be a multiple of eigvecs[:, 0].
    one = InputStats(stats.mean_image, stats.channel_mean, stats.channel_std,
                     stats.eigvals * torch.tensor([1.0, 0.0, 0.0]), stats.eigvecs)
    offset = (pca_lighting(x, one, gen(6), scale=1.0) - x)[:, :, 0, 0]  # (B, 3)
    v = stats.eigvecs[:, 0]
    residual = offset - (offset @ v)[:, None] * v  # part of the offset outside span(v)
    assert residual.abs().max() < 1e-5 * offset.abs().max()
    assert (offset @ v).abs().min() > 0
    # Every pixel of an image gets the same offset.
    diff = pca_lighting(x, stats, gen(7)) - x
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))


def test_random_flip_only_flips_and_is_its_own_inverse():
    x = torch.randn(16, 3, 4, 5, generator=gen(8))
    out = random_flip(x, gen(9))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same | mirrored) and same.any() and mirrored.any()
    assert torch.equal(random_flip(out, gen(9)), x), "the same draw applied twice restores the batch"


def test_random_crop_is_a_window_of_the_padded_image():
    pad, x = 2, torch.randn(24, 3, 5, 6, generator=gen(10))
    out = random_crop(x, pad, gen(11))
    xp = F.pad(x, (pad,) * 4)
    offsets = set()
    for b in range(len(x)):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if torch.equal(out[b], xp[b, :, i:i + 5, j:j + 6])]
        assert hits, f"image {b} is not a window of its padded input"
        offsets.add(hits[0])
    assert len(offsets) > 5, "offsets must vary across the batch"
    assert torch.equal(random_crop(x, 0, gen(11)), x)


def test_random_crop_and_flip_accept_channels_last():
    x = torch.randn(8, 3, 6, 6, generator=gen(12))
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(random_crop(xc, 2, gen(13)), random_crop(x, 2, gen(13)))
    assert torch.equal(random_flip(xc, gen(13)), random_flip(x, gen(13)))


def test_ten_crop_views_are_corners_centre_and_mirrors():
    pad, x = 2, torch.randn(3, 3, 5, 6, generator=gen(14))
    views = ten_crop_views(x, pad)
    assert views.shape == (10, 3, 3, 5, 6)
    xp = F.pad(x, (pad,) * 4)
    windows = [xp[:, :, i:i + 5, j:j + 6] for i, j in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
    for k, w in enumerate(windows):
        assert torch.equal(views[k], w) and torch.equal(views[k + 5], w.flip(3))
    assert torch.equal(views[4], x), "centre crop of the padded image is the original"
    assert len({v.numpy().tobytes() for v in views}) == 10


def test_ten_crop_logits_averages_softmax_over_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4))
    x = torch.randn(3, 3, 5, 5, generator=gen(15))
    probs = ten_crop_logits(model, x, pad=1)
    with torch.no_grad():
        expect = sum(model(v).softmax(-1) for v in ten_crop_views(x, 1)) / 10
        mean_logits = (sum(model(v) for v in ten_crop_views(x, 1)) / 10).softmax(-1)
    torch.testing.assert_close(probs, expect)
    assert not torch.allclose(probs, mean_logits), "must average probabilities, not logits"
    torch.testing.assert_close(ten_crop_logits(model, x, pad=1, max_batch=4), expect)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


@pytest.mark.parametrize("mode", PREPROCESS)
@pytest.mark.parametrize("level", AUGMENT_LEVELS)
def test_batch_augmenter_reproducible_per_seed(images, stats, mode, level):
    aug = BatchAugmenter(stats, mode, level, pad=2)
    x = images[:16]
    a, b, c = aug(x, gen(16)), aug(x, gen(16)), aug(x, gen(17))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    if level == "none":
        assert torch.equal(a, c) and torch.equal(a, normalize(x, mode, stats))
    else:
        assert not torch.equal(a, c)
    assert torch.equal(aug.eval(x), normalize(x, mode, stats))


def test_batch_augmenter_order_is_pca_then_crop_then_flip(images, stats):
    x, g = images[:8], gen(18)
    got = BatchAugmenter(stats, "standard", "crop_flip_pca", pad=2)(x, g)
    g = gen(18)
    want = normalize(x, "standard", stats)
    want = random_flip(random_crop(pca_lighting(want, stats, g, mode="standard"), 2, g), g)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", PREPROCESS)
@pytest.mark.parametrize("level", AUGMENT_LEVELS)
@pytest.mark.parametrize("pad", [0, 1, 3])
def test_the_eager_gather_pipeline_gives_the_op_by_op_numbers_bit_for_bit(images, stats, mode, level, pad):
    """augment (pad once, one gather for crop + flip) against compose_augment (each op in turn), in both memory
    formats, on an odd batch whose draws include flipped and unflipped images and every crop offset."""
    aug = BatchAugmenter(stats, mode, level, pad=pad)
    x, g = images[:23], gen(30 + pad)
    args = (x, aug.stat_args, mode, pad, PCA_SCALE, *aug.draw(len(x), g, x.device))
    for fmt in (torch.contiguous_format, torch.channels_last):
        got, want = augment(*args, fmt), compose_augment(*args, fmt)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=fmt)
    if level != "none":
        assert 0 < int(args[-1].sum()) < len(x)  # some images flipped, some not
    if "crop" in level and pad:
        assert set(args[-2].flatten().tolist()) == set(range(2 * pad + 1))


def test_batch_augmenter_rejects_unknown_settings(stats):
    with pytest.raises(UserError, match="crop_flip_pca"):
        BatchAugmenter(stats, "standard", "cutout")
    with pytest.raises(UserError, match="paper"):
        BatchAugmenter(stats, "zca", "none")
    with pytest.raises(UserError):
        BatchAugmenter(stats, "paper", "crop_flip", pad=-1)


def test_ten_crop_logits_accepts_channels_last():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 6, 6, generator=gen(19))
    got = ten_crop_logits(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ten_crop_logits(model, x))


@pytest.mark.parametrize("mode", PREPROCESS)
def test_compiled_pipeline_gives_the_eager_numbers_bit_for_bit(images, stats, mode):
    """compiled=True (one torch.compile'd kernel, for long CPU runs) draws the same numbers and returns the same
    tensor as the eager ops, in the asked memory format; a batch of another size (an epoch's last) runs eagerly."""
    fast = BatchAugmenter(stats, mode, "crop_flip_pca", pad=2, compiled=True)
    slow = BatchAugmenter(stats, mode, "crop_flip_pca", pad=2)
    for n in (16, 16, 5):
        g1, g2 = gen(20 + n), gen(20 + n)
        a, b = fast(images[:n], g1, torch.channels_last), slow(images[:n], g2, torch.channels_last)
        assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(g1.get_state(), g2.get_state())
    assert fast.compiled_size == 16


def test_a_compiler_failure_warns_once_and_runs_eagerly(images, stats, monkeypatch, capsys):
    import runners.augment as augment

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(augment._COMPILE, "ok", True)
    monkeypatch.setattr(augment, "compiled_augment", lambda: broken)
    aug = BatchAugmenter(stats, "standard", "crop_flip", compiled=True)
    a, b = aug(images[:8], gen(3)), BatchAugmenter(stats, "standard", "crop_flip")(images[:8], gen(3))
    assert torch.equal(a, b) and not augment._COMPILE["ok"]
    aug(images[:8], gen(3))
    assert capsys.readouterr().err.count("running it eagerly") == 1
