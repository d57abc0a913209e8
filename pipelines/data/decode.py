"""Decode, rescale and encode one image, robustly: every failure is a reason, never a crash.

Used by preprocessing and batch inference inside Ray Data tasks; tests: `pytest tests/test_decode.py`.

Order of work for one file's bytes (`decode_rgb`):
  1. `read_header` reads the container header only, with Pillow's lazy open (JPEG, PNG, GIF,
     BMP, WebP, TIFF, PNM): format, width, height, mode and the JPEG component count and Adobe
     marker. Nothing is decoded yet, so empty files, HTML error pages, unknown formats and
     decompression bombs (a header claiming 65000x65000) are rejected here, before any pixel
     buffer is allocated. Bytes are handed to a decoder only after their header was read and
     the dimensions accepted.
  2. JPEG (the bulk of ImageNet): OpenCV's libjpeg-turbo, which is among the fastest decoders
     on pip. When the shorter side is at least 2x/4x/8x the target size, libjpeg decodes
     straight to 1/2, 1/4 or 1/8 size in the DCT domain (IMREAD_REDUCED_COLOR_n), which skips
     most of the IDCT, colour conversion and resize work for large photos.
     4-component JPEGs (CMYK and YCCK; ImageNet has 22 CMYK ones) decode through the same
     call: libjpeg turns YCCK into CMYK, and OpenCV converts CMYK to RGB with the Adobe
     convention (inverted CMYK) that Photoshop writes and Pillow and browsers assume too,
     so colours match the RGB original (tests/test_decode.py: mean error below 1 level,
     like an RGB JPEG's own) instead of coming out inverted.
  3. Other formats: OpenCV with IMREAD_UNCHANGED, then: grayscale -> 3 equal channels,
     16-bit -> 8-bit by rounding x/257, alpha composited over white (what a viewer shows;
     dropping alpha would expose whatever colour transparent pixels happen to store).

EXIF orientation is ignored (IMREAD_IGNORE_ORIENTATION): pixels are used as stored, as
torchvision's PIL loader, fb.resnet.torch and the reference ImageNet pipelines do, so the
training pixels, the mean/PCA and the evaluation inputs match what models trained elsewhere
saw. Batch inference calls the same function, so training and serving agree either way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import (  # noqa: F401 - importing a plugin registers its format in Image.OPEN
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

# The decoders' own threads fight Ray's one-task-per-core scheduling; one thread a task.
cv2.setNumThreads(1)

# Refuse images whose pixel count would need more than ~540 MB once decoded as RGB: a header
# claiming 65000x65000 is a decompression bomb, not a photo. The number of Pillow's default
# error threshold (2 x Image.MAX_IMAGE_PIXELS), held here rather than read from Pillow, whose
# own check read_header bypasses (see there); the largest ILSVRC-2012 image is far below it.
MAX_PIXELS = 178_956_970
# The widest aspect ratio (longer : shorter side) accepted wherever the longer side is kept
# after rescaling: `rescale(..., center_crop=False)` (preprocess --no-center-crop) and
# serving's single centre crop (pipelines/serve/predict.py), which must agree since serving
# reproduces preprocessing. The limit is memory, not taste: rescaled to a shorter side of 256,
# 64:1 is a 256x16384 image (12 MB as RGB), while a 1x100000 banner would be 256x25600000
# (~20 GB). 64 keeps real photos, wide panoramas included (some pass 16:1, the old limit).
MAX_ASPECT = 64
# An object crop (preprocess --voc-objects) keeps this fraction of the box's side around the
# box on each side, clipped to the photo: a little context, as detection-to-classification
# crops usually keep, so the object's edges are not cut by a box drawn a pixel tight.
BOX_MARGIN = 0.08

# libjpeg writes RGB straight out (IMREAD_COLOR_RGB): no BGR->RGB pass afterwards; a BGR decode
# plus a numpy [:, :, ::-1] copy measured 2.3 ms against 0.8 ms for a 600x400 JPEG.
_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED = {f: (getattr(cv2, f"IMREAD_REDUCED_COLOR_{f}") & ~cv2.IMREAD_COLOR_BGR) | _RGB
            for f in (8, 4, 2)}


class DecodeError(ValueError):
    """An image that cannot be turned into RGB pixels; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageHeader:
    format: str           # jpeg, png, gif, bmp, webp, tiff, pnm
    width: int
    height: int
    mode: str = ""        # Pillow's mode: L, RGB, RGBA, CMYK, I;16, P, ...
    components: int = 0   # JPEG only: 1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK
    adobe: bool = False   # JPEG only: has an Adobe APP14 marker


# --------------------------------------------------------------------------- headers
# The formats OpenCV decodes, by Pillow's plugin names, and the names this module reports.
_FORMATS = {"JPEG": "jpeg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
            "TIFF": "tiff", "PPM": "pnm"}


def _describe(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        kind = "HTML/XML text (an error page saved under an image name?)"
    elif head.startswith(b"{") or head.startswith(b"["):
        kind = "JSON text"
    elif all(32 <= c < 127 or c in (9, 10, 13) for c in data[:64]):
        kind = "plain text"
    else:
        kind = "an unknown binary format"
    return f"not an image file: {kind}, starts with {bytes(data[:16])!r}"


def _header_failure(name: str, exc: Exception, at_end: bool) -> str:
    """The quarantine reason for a header Pillow could not read."""
    if isinstance(exc, Image.DecompressionBombError):  # WebP's plugin checks for itself
        return f"decompression bomb: {name} header: {exc}; not decoded"
    if at_end:  # the parser ran out of bytes
        return f"truncated {name}: the file ends inside its header"
    if str(exc) == "not identified by this driver":  # the header gave no size
        if name == "JPEG":
            return "corrupt JPEG: no frame header (SOF) before the image data"
        return f"corrupt {name}: its header gives no image size"
    return f"corrupt {name} header: {exc}"


def read_header(data: bytes) -> ImageHeader:
    """Format, dimensions, mode and JPEG colour details from the header alone; raises
    DecodeError for anything that is not a supported image. Pillow reads the header lazily
    (a JPEG's markers up to the scan, a PNG's chunks up to the pixel data): no pixel buffer
    is allocated, whatever the header claims."""
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    # Image.open without its bomb check: the plugin Image.open would pick, run as it runs it.
    # Pillow's check raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS (a
    # process-wide setting, 178,956,970 by default) with no dimensions in its message, and
    # warns from half that. MAX_PIXELS (the same number, held here so that another library's
    # setting cannot move it) is the limit that applies, in check_header, with the dimensions
    # in the reason. Only the WebP plugin runs Pillow's check itself (before libwebp sizes its
    # canvas); its error becomes a bomb reason too.
    prefix = data[:16]  # what Image.open shows each format's accept function
    for name, fmt in _FORMATS.items():
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix)
        if isinstance(verdict, str):  # Pillow built without this format's library
            raise DecodeError(f"{name} header not readable: {verdict}")
        if not verdict:
            continue
        stream = io.BytesIO(data)
        try:
            image = factory(stream, "")
        except Exception as exc:  # noqa: BLE001 - any parser failure is a reason, not a crash
            raise DecodeError(_header_failure(name, exc, stream.tell() >= len(data))) from None
        width, height = image.size
        if fmt != "jpeg":
            return ImageHeader(fmt, width, height, image.mode)
        return ImageHeader(fmt, width, height, image.mode, image.layers, "adobe" in image.info)
    raise DecodeError(_describe(data))


def check_header(header: ImageHeader) -> None:
    if header.width <= 0 or header.height <= 0:
        raise DecodeError(f"{header.format} header says {header.width}x{header.height} pixels")
    pixels = header.width * header.height
    if pixels > MAX_PIXELS:
        raise DecodeError(f"decompression bomb: {header.format} header says "
                          f"{header.width}x{header.height} = {pixels} pixels "
                          f"(limit {MAX_PIXELS}); not decoded")


def reduction(header: ImageHeader, min_side: int) -> int:
    """The DCT scale-down factor (1, 2, 4 or 8) that keeps the shorter side >= min_side."""
    if header.format != "jpeg" or min_side <= 0:
        return 1
    short = min(header.width, header.height)
    return next((f for f in _REDUCED if short >= f * min_side), 1)


# --------------------------------------------------------------------------- decoding
def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:  # round(x / 257): 65535 -> 255, exact for x = 257 * k
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise DecodeError(f"unsupported sample type {img.dtype} (only 8- and 16-bit integers)")


def _rgb_from_unchanged(img: np.ndarray) -> np.ndarray:
    img = _to_uint8(img)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    channels = img.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:  # BGRA: composite over white, integer-rounded
        alpha = img[:, :, 3:4].astype(np.uint16)
        rgb = img[:, :, 2::-1].astype(np.uint16)
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    raise DecodeError(f"unsupported channel count {channels}")


def decode_rgb(data: bytes, min_side: int = 0) -> np.ndarray:
    """Bytes of an image file -> RGB uint8 (H, W, 3). Raises DecodeError with the reason.

    min_side > 0 allows reduced-size JPEG decoding as long as the shorter side stays
    >= min_side (pass the rescale target; 0 always decodes at full size)."""
    header = read_header(data)
    check_header(header)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        if header.format == "jpeg":
            if data.rfind(b"\xff\xd9") < 0:
                raise DecodeError("truncated JPEG: no end-of-image marker")
            rgb = cv2.imdecode(buf, _REDUCED.get(reduction(header, min_side), _RGB))
            if rgb is None:
                raise DecodeError("corrupt or truncated JPEG (the decoder gave up)")
            return rgb
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # also ignores EXIF orientation
    except cv2.error as exc:
        raise DecodeError(f"{header.format} decoder error: {str(exc).strip().splitlines()[-1]}")\
            from None
    if img is None:
        raise DecodeError(f"corrupt or truncated {header.format.upper()} (the decoder gave up)")
    return _rgb_from_unchanged(img)


# --------------------------------------------------------------------------- rescale, encode
def rescale(rgb: np.ndarray, size: int, center_crop: bool = True) -> np.ndarray:
    """Shorter side to `size`, then the central size x size square when `center_crop` (the
    paper's 256x256). INTER_AREA when shrinking (no aliasing), bilinear when growing.

    With the crop, the central square is cut from the source first and only it is resized:
    the same geometry as resize-then-crop (to under one source pixel of the crop offset), a
    quarter less resize work on a 4:3 photo, and no huge intermediate for a 1x5000 strip."""
    h, w = rgb.shape[:2]
    if center_crop:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        rgb = rgb[top:top + side, left:left + side]
        nh = nw = size
        scale = size / side
    else:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if max(nh, nw) > MAX_ASPECT * size:
            raise DecodeError(f"aspect ratio of {w}x{h} is beyond 1:{MAX_ASPECT}; rescaling "
                              f"with --no-center-crop would make a {nw}x{nh} image")
    if (nh, nw) != rgb.shape[:2]:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
    return np.ascontiguousarray(rgb)


def crop_box(rgb: np.ndarray, box, margin: float = BOX_MARGIN) -> np.ndarray:
    """The region of `box` (x0, y0, x1, y1: 0-based, end excluded, in the decoded image's
    pixels) widened by `margin` x its width and height on each side, clipped to the image.
    DecodeError when the box does not lie inside the image (an annotation that disagrees
    with the photo it describes)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DecodeError(f"box ({x0},{y0})-({x1},{y1}) lies outside the decoded {w}x{h} "
                          "photo; correct the annotation's <bndbox> (or <size>)")
    mx, my = round(margin * (x1 - x0)), round(margin * (y1 - y0))
    return rgb[max(y0 - my, 0):min(y1 + my, h), max(x0 - mx, 0):min(x1 + mx, w)]


def encode(rgb: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    if encoding == "raw":
        return rgb.tobytes()
    # cvtColor, not rgb[:, :, ::-1]: OpenCV would copy the strided view element by element.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DecodeError("JPEG encoding failed")
    return buf.tobytes()


def pixel_moments(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact integer sums for mean and covariance: (sum of RGB [3], sum of RGB outer products
    [3, 3], pixel count). int64 cannot overflow before ~10^9 images of 256x256.

    Each product of two channels fits uint16 (255 * 255 = 65025), and OpenCV sums an image
    exactly into a double while below 2^53 (an image under MAX_PIXELS stays below 1.2e13), so
    six cv2.multiply + cv2.sumElems give exact integers at a fraction of the cost of a float64
    matmul plus numpy's strided axis-0 sums (measured 3.4x faster)."""
    channels = cv2.split(np.ascontiguousarray(rgb))
    sums = np.rint(cv2.sumElems(rgb)[:3]).astype(np.int64)
    outer = np.empty((3, 3), np.int64)
    for i in range(3):
        for j in range(i, 3):
            product = cv2.multiply(channels[i], channels[j], dtype=cv2.CV_16U)
            outer[i, j] = outer[j, i] = round(cv2.sumElems(product)[0])
    return sums, outer, rgb.shape[0] * rgb.shape[1]
