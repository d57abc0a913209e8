"""Augmentations and metrics: arithmetic, PCA lighting size and direction, crops, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.augment import (
    center_crop,
    normalize,
    pca_lighting,
    pca_shift,
    random_crop_flip,
    ten_crop,
)
from alexnet.metrics import ErrorMeter, topk_correct

MEAN = torch.tensor([123.675, 116.28, 103.53])
STD = torch.tensor([58.395, 57.12, 57.375])


def imagenet_like_pca() -> tuple[torch.Tensor, torch.Tensor]:
    """fb.resnet.torch's ImageNet PCA, with its 0-1 eigvals squared into pixel units^2."""
    eigval = (255 * torch.tensor([0.2175, 0.0188, 0.0045], dtype=torch.float64)) ** 2
    eigvec = torch.tensor(
        [
            [-0.5675, 0.7192, 0.4009],
            [-0.5808, -0.0045, -0.8140],
            [-0.5836, -0.6948, 0.4203],
        ],
        dtype=torch.float64,
    ).T  # fb.resnet.torch stores eigenvectors as columns; the manifest as rows
    return eigval.float(), eigvec.float()


def covariance_pca(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of a correlated RGB covariance built from synthetic 'pixels', as preprocess does."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(20_000, 1, generator=g, dtype=torch.float64) * 255
    pixels = grey + 20 * torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    cov = torch.cov(pixels.T)
    val, vec = torch.linalg.eigh(cov)  # ascending, eigenvectors as columns
    return val.flip(0).float(), vec.T.flip(0).float()


def test_normalize_matches_arithmetic() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    out = normalize(x, MEAN, STD)
    expected = (x.double() - MEAN.double().view(1, 3, 1, 1)) / STD.double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    assert x.dtype == torch.uint8  # input untouched


def test_normalize_keeps_channels_last() -> None:
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    out = normalize(x, MEAN, STD)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalize(x.contiguous(), MEAN, STD))


def test_normalize_accepts_float_without_modifying_it() -> None:
    x = torch.rand(1, 3, 4, 4) * 255
    before = x.clone()
    out = normalize(x, MEAN, STD)
    torch.testing.assert_close(x, before)
    torch.testing.assert_close(out, (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))


@pytest.mark.parametrize("pca", [imagenet_like_pca, covariance_pca])
def test_pca_shift_size_is_a_few_pixel_levels(pca) -> None:
    eigval, eigvec = pca()
    g = torch.Generator().manual_seed(1)
    shift = pca_shift(10_000, eigval, eigvec, 0.1, g)
    assert shift.shape == (10_000, 3)
    mean_abs = shift.abs().mean().item()
    assert 0 < mean_abs < 20
    # The paper's formula in 0-1 units exactly: std along eigvec[0] is 0.1 * eigval_0 / 255.
    along_top = shift @ eigvec[0]
    assert along_top.std().item() == pytest.approx(0.1 * eigval[0].item() / 255, rel=0.05)


@pytest.mark.parametrize("pca", [imagenet_like_pca, covariance_pca])
def test_pca_shift_direction_is_principal_eigvec(pca) -> None:
    eigval, eigvec = pca()
    g = torch.Generator().manual_seed(2)
    shift = pca_shift(10_000, eigval, eigvec, 0.1, g).double()
    _, vec = torch.linalg.eigh(torch.cov(shift.T))
    top = vec[:, -1]
    cos = torch.dot(top, eigvec[0].double()).abs() / eigvec[0].double().norm()
    assert cos > 0.99


def test_pca_lighting_adds_one_shift_per_image() -> None:
    eigval, eigvec = imagenet_like_pca()
    batch = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    batch = batch.contiguous(memory_format=torch.channels_last)
    out = pca_lighting(batch, eigval, eigvec, generator=torch.Generator().manual_seed(3))
    expected_shift = pca_shift(4, eigval, eigvec, 0.1, torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    diff = out - batch.float()
    torch.testing.assert_close(diff, expected_shift.view(4, 3, 1, 1).expand_as(diff))
    # Then normalise: the documented training order runs end to end.
    assert normalize(out, MEAN, STD).shape == batch.shape


def test_pca_alphastd_zero_is_identity() -> None:
    eigval, eigvec = covariance_pca()
    x = torch.rand(2, 3, 4, 4) * 255
    torch.testing.assert_close(pca_lighting(x, eigval, eigvec, alphastd=0.0), x)


def test_random_crop_flip_shapes_and_both_outcomes() -> None:
    rng = np.random.default_rng(0)
    img = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)
    flipped = unflipped = 0
    for _ in range(200):
        crop = random_crop_flip(img, 6, rng)
        assert crop.shape == (6, 6, 3) and crop.dtype == np.uint8
        assert crop.flags["C_CONTIGUOUS"]
        # Pixel values increase left to right in img, so the direction tells flip apart.
        if crop[0, 0, 0] > crop[0, -1, 0]:
            flipped += 1
        else:
            unflipped += 1
    assert flipped > 50 and unflipped > 50


def test_random_crop_flip_is_reproducible_and_rejects_small_images() -> None:
    img = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    a = random_crop_flip(img, 16, np.random.default_rng(5))
    b = random_crop_flip(img, 16, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        random_crop_flip(img, 21, np.random.default_rng(0))


@pytest.mark.parametrize(("h", "w", "size"), [(256, 256, 224), (9, 12, 4), (11, 10, 6)])
def test_ten_crop_and_center_crop_match_torchvision(h: int, w: int, size: int) -> None:
    tf = pytest.importorskip("torchvision.transforms.functional")
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    ours = ten_crop(img, size)
    assert ours.shape == (10, size, size, 3) and ours.dtype == np.uint8
    theirs = torch.stack(tf.ten_crop(chw, [size, size])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(
        center_crop(img, size), tf.center_crop(chw, [size, size]).permute(1, 2, 0).numpy()
    )


def test_topk_correct_hand_made() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # target 1: top-1 hit
            [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],  # target 4: 5th best -> top-5 hit only
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # target 5: worst -> miss
        ]
    )
    target = torch.tensor([1, 4, 5])
    got = topk_correct(logits, target)
    assert got.dtype == torch.float64
    assert got.tolist() == [1.0, 2.0]
    # k clipped to the number of classes: top-5 over 3 classes is top-3, i.e. always right.
    small = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert topk_correct(small, torch.tensor([0, 2]), ks=(1, 5)).tolist() == [0.0, 2.0]


def test_error_meter_accumulates_and_round_trips() -> None:
    meter = ErrorMeter()
    meter.update(torch.tensor(6.0), torch.tensor([3.0, 4.0]), 4)
    meter.update(2.0, [1, 5], 6)
    result = meter.result()
    assert result == pytest.approx({"loss": 0.8, "top1_error": 0.6, "top5_error": 0.1})
    t = meter.as_tensor()
    assert t.dtype == torch.float64 and t.tolist() == [8.0, 4.0, 9.0, 10.0]
    # What an all_reduce(SUM) over two identical workers would produce.
    doubled = ErrorMeter.from_tensor(t + t)
    assert doubled.n == 20
    assert doubled.result() == pytest.approx(result)
    assert ErrorMeter.from_tensor(t).as_tensor().tolist() == t.tolist()


def test_error_meter_empty_is_nan() -> None:
    result = ErrorMeter().result()
    assert set(result) == {"loss", "top1_error", "top5_error"}
    assert all(np.isnan(v) for v in result.values())
    assert ErrorMeter().as_tensor().tolist() == [0.0, 0.0, 0.0, 0.0]
