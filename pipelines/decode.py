"""Decode, rescale and encode one image, robustly: every failure is a reason, never a crash.

Used by preprocessing (and batch inference) inside Ray Data tasks. OpenCV with libjpeg-turbo
does the work: decoding is most of the cost of preprocessing, and cv2.imdecode is among the
fastest decoders available from pip.
"""

from __future__ import annotations

import cv2
import numpy as np

# The decoders' own threads fight Ray's one-task-per-core scheduling; one thread a task.
cv2.setNumThreads(1)

# Refuse images whose pixel count would need more than ~1 GB once decoded (a header claiming
# 65000x65000 is a decompression bomb, not a photo).
MAX_PIXELS = 178_956_970  # Pillow's default limit, for the same reason


class DecodeError(ValueError):
    """An image that cannot be turned into RGB pixels; the message is the quarantine reason."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Bytes of any image file OpenCV reads -> RGB uint8 (H, W, 3). Raises DecodeError."""
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR converts grayscale and CMYK to 3-channel BGR and drops alpha.
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("not a decodable image (corrupt, truncated or not an image format)")
    if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS:
        raise DecodeError(f"image of {bgr.shape[1]}x{bgr.shape[0]} exceeds {MAX_PIXELS} pixels")
    if bgr.dtype != np.uint8:  # 16-bit PNG/TIFF: keep the top 8 bits
        bgr = (bgr >> 8).astype(np.uint8) if bgr.dtype == np.uint16 else bgr.astype(np.uint8)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rescale(rgb: np.ndarray, size: int, center_crop: bool = True) -> np.ndarray:
    """Shorter side to `size` (INTER_AREA when shrinking, which avoids aliasing; bilinear when
    growing), then the central size x size square when `center_crop` (the paper's 256x256)."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
    if center_crop:
        top, left = (nh - size) // 2, (nw - size) // 2
        rgb = rgb[top:top + size, left:left + size]
    return np.ascontiguousarray(rgb)


def encode(rgb: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    if encoding == "raw":
        return rgb.tobytes()
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DecodeError("JPEG encoding failed")
    return buf.tobytes()


def pixel_moments(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact integer sums for mean and covariance: (sum of RGB [3], sum of RGB outer products
    [3, 3], pixel count). int64 cannot overflow before ~10^9 images of 256x256."""
    # float64 BLAS is exact here (per-image sums stay far below 2^53) and ~10x faster than an
    # int64 matmul; the results are integers and are returned as int64 for exact reduction.
    flat = rgb.reshape(-1, 3).astype(np.float64)
    sums = np.rint(flat.sum(axis=0)).astype(np.int64)
    outer = np.rint(flat.T @ flat).astype(np.int64)
    return sums, outer, flat.shape[0]
