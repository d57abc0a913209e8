"""Augmentations from the AlexNet paper.

Two halves, split by where they run:

- per image, on the CPU, as uint8 numpy ``HxWx3`` arrays (:func:`random_crop_flip`; the
  evaluation crops :func:`center_crop` and :func:`ten_crop` are :mod:`alexnet.crops`'): crops and flips only move bytes, so they stay uint8
  and the data loader ships 4x fewer bytes than float32 would;
- per batch, on the training device, as ``[N, 3, H, W]`` tensors (:func:`pca_lighting`,
  :func:`normalize`): the float work happens where the FLOPs are cheap.

Training order: ``normalize(pca_lighting(batch_uint8, eigval, eigvec), mean, std)``.
Pixel statistics (mean, std, eigval, eigvec) come from the dataset manifest in pixel units 0-255.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alexnet import crops
from alexnet.crops import center_crop

__all__ = [
    "center_crop",
    "crop_params",
    "normalize",
    "pca_lighting",
    "pca_shift",
    "random_crop_flip",
    "ten_crop",
]


def _per_channel(v: Tensor | list[float], like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def normalize(batch_uint8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` per channel, as float32. ``mean``/``std``: ``[3]`` in pixel units.

    ``batch_uint8`` is ``[N, 3, H, W]`` uint8 (or already float in pixel units, e.g. the output
    of :func:`pca_lighting`). Converts once, then works in place on that copy: one read of the
    uint8 batch and one float32 buffer, no temporaries. ``x.float()`` preserves strides, so a
    channels_last batch stays channels_last.
    """
    x = batch_uint8.float() if not batch_uint8.is_floating_point() else batch_uint8.clone()
    return x.sub_(_per_channel(mean, x)).div_(_per_channel(std, x))


def pca_shift(
    n: int,
    eigval: Tensor,
    eigvec: Tensor,
    alphastd: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-image RGB shifts of the paper's colour augmentation, ``[n, 3]`` in pixel units.

    ``eigval``: ``[3]`` eigenvalues of the RGB covariance in pixel units^2 (the manifest's);
    ``eigvec``: ``[3, 3]``, ``eigvec[i]`` the unit eigenvector of ``eigval[i]`` as ``[R, G, B]``.

    The formula is the paper's, ``sum_i alpha_i * lambda_i * p_i`` with ``alpha_i ~ N(0,
    alphastd)`` per image, evaluated with pixels scaled to 0-1 (so ``lambda_i = eigval_i /
    255^2``), as fb.resnet.torch does, then converted back to pixel units::

        shift = 255 * sum_i alpha_i * (eigval_i / 255^2) * eigvec[i]
              = sum_i alpha_i * (eigval_i / 255) * eigvec[i]

    Size: real photos have a per-channel variance of ~0.05 in 0-1 units, so the top
    eigenvalue ``eigval_0 / 255^2`` is ~0.05-0.15 (fb.resnet.torch hard-codes 0.2175). The
    shift along it then has std 0.1 * 0.2 * 255 ~ 5 pixel levels at most; the other two
    components add well under one level. Rejected readings: pixel-unit eigenvalues used
    directly (0.1 * 14,000 ~ 1,400 levels) and ``sqrt(eigval / 255^2)`` as if they were
    standard deviations (0.1 * sqrt(0.2) * 255 ~ 11 levels, not the formula as written).

    ``alpha`` is drawn on ``generator``'s device when one is given (reproducible streams),
    else on ``device``; the result is on ``device`` (default: ``eigval``'s).
    """
    if device is None:
        device = eigval.device if isinstance(eigval, Tensor) else torch.device("cpu")
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    alpha = torch.randn(n, 3, generator=generator, device=gen_device, dtype=torch.float32)
    alpha = alpha.to(device).mul_(alphastd)
    eigval = torch.as_tensor(eigval, dtype=torch.float32, device=device)
    eigvec = torch.as_tensor(eigvec, dtype=torch.float32, device=device)
    # Row vector of coefficients times rows-as-eigenvectors: [n, 3] @ [3, 3].
    return (alpha * (eigval / 255.0)) @ eigvec


def pca_lighting(
    batch: Tensor,
    eigval: Tensor,
    eigvec: Tensor,
    alphastd: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Add one :func:`pca_shift` per image to every pixel. ``batch``: ``[N, 3, H, W]``.

    ``batch`` is in pixel units 0-255, before :func:`normalize`; uint8 input is converted
    to float32 (the shifts are fractional). Returns a new tensor with the input's memory
    format; values are not clipped to 0-255 (the paper does not say to, and normalisation
    follows anyway). Costs one elementwise pass over the batch.
    """
    shift = pca_shift(batch.shape[0], eigval, eigvec, alphastd, generator, batch.device)
    x = batch.float() if not batch.is_floating_point() else batch.clone()
    return x.add_(shift.to(x.dtype).view(-1, 3, 1, 1))


def crop_params(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int, bool]:
    """``(top, left, flip)`` of a random crop: the draws :func:`random_crop_flip` makes.

    Needs only the image size, so a loader can draw the crop before the image is decoded
    (the GPU-decode path does: bytes go to the GPU, the crop box goes with them).
    """
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop size {size}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return top, left, bool(rng.random() < 0.5)


def random_crop_flip(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop of an ``HxWx3`` uint8 image, mirrored with p=0.5.

    Slicing is a view; the one copy is ``np.ascontiguousarray`` of the crop (plus the mirror
    when flipped), so the result is contiguous (ready for ``torch.from_numpy``) and uint8.
    """
    top, left, flip = crop_params(img.shape[0], img.shape[1], size, rng)
    crop = np.ascontiguousarray(img[top : top + size, left : left + size])
    return _mirror(crop) if flip else crop


def _mirror(img: np.ndarray) -> np.ndarray:
    """Left-right mirror of a contiguous ``HxWx3`` uint8 array, as a new contiguous array.

    NumPy's copy of a negative-stride view moves 3-byte pixels one element at a time: ~0.7 ms
    for 224x224, as long as decoding the JPEG. torch's flip kernel does it in ~0.04 ms."""
    return torch.from_numpy(img).flip(1).numpy()


def ten_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The paper's ten crops (:func:`alexnet.crops.ten_crop`), mirrored with torch's copy."""
    return crops.ten_crop(img, size, mirror=_mirror)
