"""Evaluation crops of one uint8 ``HxWx3`` image: the centre crop and the paper's ten crops.

The one implementation, shared by training's validation (``pipelines/train/ingest.py``),
``predict``, batch inference and the MLflow model. NumPy only, no torch: batch inference's
decode tasks and the served model's preprocessing import this without torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["center_crop", "five_crop", "ten_crop"]


def _check(img: np.ndarray, size: int) -> None:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop size {size}")


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` crop, offsets rounded as torchvision rounds them."""
    _check(img, size)
    h, w = img.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def five_crop(img: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops (views but the centre)."""
    _check(img, size)
    h, w = img.shape[:2]
    return [
        img[:size, :size],
        img[:size, w - size :],
        img[h - size :, :size],
        img[h - size :, w - size :],
        center_crop(img, size),
    ]


def ten_crop(img: np.ndarray, size: int,
             mirror: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The paper's test-time crops: ``[10, size, size, 3]`` uint8.

    Order as ``torchvision.transforms.functional.ten_crop``: top-left, top-right,
    bottom-left, bottom-right, centre, then the same five cut from the mirrored image
    (so the 7th is the mirror of the top-right corner, not of the top-left). ``mirror``
    flips the image left-right (default: a NumPy view; training passes torch's faster copy).
    """
    flipped = mirror(np.ascontiguousarray(img)) if mirror else img[:, ::-1]
    return np.stack(five_crop(img, size) + five_crop(flipped, size))
