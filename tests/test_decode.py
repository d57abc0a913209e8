"""What real image collections hold, as generated fixtures, each with its expected outcome:
converted to RGB with correct colours, or rejected with a reason (never a crash).

    pytest tests/test_decode.py

The last test runs every kind through the real preprocess pipeline (Ray, LMDB).
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.config import PreprocessConfig
from pipelines.data import shards
from pipelines.data.decode import (
    MAX_PIXELS,
    DecodeError,
    decode_rgb,
    pixel_moments,
    read_header,
    reduction,
    rescale,
)
from pipelines.data.preprocess import process_batch, run_preprocess

Image = pytest.importorskip("PIL.Image")  # Pillow writes the CMYK and EXIF fixtures
REPO = Path(__file__).resolve().parent.parent


def reference_rgb(h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth, colourful RGB image (JPEG keeps it to within a level or two)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 2) % 256, (y * 2.5) % 256, (255 - x - y) % 256], -1).astype(np.uint8)
    return cv2.GaussianBlur(rgb, (5, 5), 0)


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    return cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def png_bytes(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def _cmyk_of(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    k = 255 - np.maximum(np.maximum(r, g), b)
    den = np.where(k < 255, 255 - k, 1)
    cmy = [(255 - c - k) / den * 255 for c in (r, g, b)]
    return np.stack([*cmy, k], -1).round().clip(0, 255).astype(np.uint8)


def _pil_cmyk_jpeg(cmyk: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
    """A CMYK JPEG as Photoshop writes it (Adobe APP14, inverted), with a real K channel."""
    return _pil_cmyk_jpeg(_cmyk_of(rgb))


def ycck_jpeg(rgb: np.ndarray) -> bytes:
    """A YCCK JPEG (Adobe transform 2): CMY stored as YCbCr, K as is, all Adobe-inverted."""
    cmyk = _cmyk_of(rgb)
    c, m, y = (cmyk[..., i].astype(float) for i in range(3))
    ycc = np.stack([0.299 * c + 0.587 * m + 0.114 * y,
                    -0.168736 * c - 0.331264 * m + 0.5 * y + 128,
                    0.5 * c - 0.418688 * m - 0.081312 * y + 128], -1)
    stored = cmyk.copy()
    stored[..., :3] = 255 - ycc.round().clip(0, 255).astype(np.uint8)  # Pillow inverts on save
    data = bytearray(_pil_cmyk_jpeg(stored))
    at = data.find(b"Adobe")
    assert data[at + 11] == 0
    data[at + 11] = 2  # transform: YCCK
    return bytes(data)


def exif_jpeg(rgb: np.ndarray, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 65000, height: int = 65000) -> bytes:
    """A PNG whose header claims width x height; a few KB of deflate would fill it."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = _png_chunk(b"IDAT", zlib.compress(b"\0" * (width * 3 + 1) * 4, 9))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 65000, height: int = 65000) -> bytes:
    """A real JPEG with its frame header (SOF0) patched to claim width x height."""
    data = bytearray(jpeg_bytes(reference_rgb(), 90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# --------------------------------------------------------------------------- colours
@pytest.mark.parametrize("make", [cmyk_jpeg, ycck_jpeg], ids=["cmyk", "ycck"])
def test_cmyk_and_ycck_colours_match_the_rgb_original(make):
    rgb = reference_rgb()
    data = make(rgb)
    assert read_header(data).components == 4
    out = decode_rgb(data)
    baseline = _mean_error(decode_rgb(jpeg_bytes(rgb)), rgb)  # an RGB JPEG's own loss
    assert out.shape == rgb.shape
    assert _mean_error(out, rgb) < baseline + 0.5, (_mean_error(out, rgb), baseline)
    assert np.abs(out.astype(int) - rgb).max() <= 8
    assert _mean_error(out, 255 - rgb) > 60  # not inverted


def test_grayscale_png_behind_a_jpeg_name_rgba_and_16_bit():
    rgb = reference_rgb()
    gray = decode_rgb(jpeg_bytes(rgb[..., 0].copy()))
    assert gray.shape == rgb.shape and (gray[..., 0] == gray[..., 2]).all()
    # A PNG is a PNG whatever its name: decoded from its bytes, exactly.
    np.testing.assert_array_equal(decode_rgb(png_bytes(rgb[..., ::-1])), rgb)
    assert read_header(png_bytes(rgb)).format == "png"
    # RGBA: composited over white. Opaque keeps its colour, transparent becomes white.
    bgra = np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 255, np.uint8)])
    bgra[:10, :, 3] = 0
    bgra[10:20, :, 3] = 128
    out = decode_rgb(png_bytes(bgra))
    np.testing.assert_array_equal(out[20:], rgb[20:])
    assert (out[:10] == 255).all()
    half = (rgb[10:20].astype(int) * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(out[10:20], half)
    # Gray + alpha (PNG colour type 4) too.
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb[..., 1], np.full(rgb.shape[:2], 255, np.uint8)]),
                    "LA").save(buf, "PNG")
    la = decode_rgb(buf.getvalue())
    np.testing.assert_array_equal(la[..., 0], rgb[..., 1])
    # 16-bit colour and gray PNGs: round(x / 257), exact for 257 * k.
    np.testing.assert_array_equal(decode_rgb(png_bytes(rgb[..., ::-1].astype(np.uint16) * 257)),
                                  rgb)
    g16 = decode_rgb(png_bytes(rgb[..., 0].astype(np.uint16) * 257 + 100))
    np.testing.assert_array_equal(g16[..., 1], rgb[..., 0])


@pytest.mark.parametrize("ext", [".gif", ".bmp", ".webp", ".tiff", ".ppm"])
def test_other_formats_headers_and_decoding(ext, tmp_path):
    rgb = reference_rgb(50, 70)
    if ext == ".gif":
        Image.fromarray(rgb).save(tmp_path / "x.gif")
        data = (tmp_path / "x.gif").read_bytes()
    else:
        data = cv2.imencode(ext, rgb[..., ::-1])[1].tobytes()
    header = read_header(data)
    assert (header.width, header.height) == (70, 50)
    out = decode_rgb(data)
    assert out.shape == (50, 70, 3)
    if ext in (".bmp", ".tiff", ".ppm"):  # lossless
        np.testing.assert_array_equal(out, rgb)


def test_exif_orientation_is_ignored():
    """Pixels as stored (the choice of torchvision's PIL loader; see pipelines/data/decode.py)."""
    rgb = reference_rgb(60, 100)
    data = exif_jpeg(rgb, orientation=6)  # "rotate 90 degrees to display"
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (100, 60)
    out = decode_rgb(data)
    assert out.shape == (60, 100, 3)
    assert _mean_error(out, rgb) < 2
    assert decode_rgb(data, min_side=20).shape == (30, 50, 3)  # reduced decode ignores it too


def test_tiny_and_extreme_aspect_images():
    for h, w in ((1, 1), (2, 3), (7, 1)):
        img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = rescale(decode_rgb(png_bytes(img)), 64)
        assert out.shape == (64, 64, 3)
    one = rescale(decode_rgb(png_bytes(np.full((1, 1, 3), 77, np.uint8))), 32)
    assert (one == 77).all()
    strip = decode_rgb(png_bytes(np.full((1, 5000, 3), 9, np.uint8)))
    assert rescale(strip, 64).shape == (64, 64, 3)  # centre crop: cut first, then resize
    with pytest.raises(DecodeError, match="aspect ratio"):
        rescale(strip, 64, center_crop=False)


# --------------------------------------------------------------------------- rejections
def test_broken_files_get_reasons():
    good = jpeg_bytes(reference_rgb(), 90)
    cases = {
        b"": "empty file (0 bytes)",
        b"<!DOCTYPE html><html><body>403 Forbidden</body></html>": "not an image file: HTML",
        b"PK\x03\x04" + bytes(100): "not an image file: an unknown binary format",
        b"just some text, no image\n": "not an image file: plain text",
        good[: len(good) // 2]: "truncated JPEG: no end-of-image marker",
        good[:40]: "truncated JPEG",
        png_bytes(reference_rgb())[:200]: "corrupt or truncated PNG",
        b"\x89PNG\r\n\x1a\n\0\0": "truncated PNG",
        # A quantization table, then the scan, and no frame header (SOF) between them.
        b"\xff\xd8\xff\xdb\x00\x43\x00" + bytes(64) + b"\xff\xda\x00\x02\x00\xff\xd9":
            "no frame header",
        b"\xff\xd8\xff\xdb\x00\x04\x00\x00\xff\xda": "corrupt JPEG header",  # a 2-byte table
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            decode_rgb(data)


@pytest.mark.parametrize("make", [png_bomb, jpeg_bomb], ids=["png", "jpeg"])
def test_decompression_bombs_rejected_from_the_header_alone(make):
    data = make()
    # The header is in the first bytes (a JPEG's markers up to its scan): nothing else is read.
    header = read_header(data[:1024])
    assert header.width * header.height > MAX_PIXELS
    with pytest.raises(DecodeError, match="decompression bomb.*65000x65000.*not decoded"):
        decode_rgb(data)
    # 20000x20000 is under OpenCV's own limit: cv2 would allocate 1.2 GB and decode grey.
    # Rejected here before any allocation: peak memory does not move.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_rgb(make(20000, 20000))
    assert time.perf_counter() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_webp_bomb_rejected_from_the_header():
    """A lossless WebP whose header claims 16383x16383: Pillow's WebP plugin refuses it before
    libwebp sizes a canvas; the reason says so like any other bomb."""
    data = bytearray(cv2.imencode(".webp", reference_rgb(50, 70), [cv2.IMWRITE_WEBP_QUALITY, 101])[1])
    assert data[12:16] == b"VP8L"
    bits = int.from_bytes(data[21:25], "little") & ~(2 ** 28 - 1)
    data[21:25] = (bits | 16382 | 16382 << 14).to_bytes(4, "little")  # sides minus one
    with pytest.raises(DecodeError, match="decompression bomb: WEBP"):
        decode_rgb(bytes(data))


def test_unreadable_files_become_reasons(tmp_path):
    """Permission denied, a folder named like an image, a missing file, a dangling link."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "folder.JPEG").mkdir()
    (src / "dangling.JPEG").symlink_to(src / "nowhere.JPEG")
    batch = {"path": np.array(["folder.JPEG", "gone.JPEG", "dangling.JPEG"]),
             "label": np.array([0, 0, 0])}
    out = process_batch(batch, str(src), 32, True, "jpeg", 90)
    assert list(out["reason"]) == ["unreadable: Is a directory",
                                   "unreadable: No such file or directory",
                                   "unreadable: No such file or directory"]


def test_permission_denied_becomes_a_reason():
    """root reads any file, so as root the check runs in a child that drops to user nobody
    after its imports; ok.JPEG (readable) is the control, locked.JPEG has mode 000."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="perm-"))  # /tmp/perm-*: traversable by nobody
    try:
        folder.chmod(0o755)
        for name in ("ok.JPEG", "locked.JPEG"):
            (folder / name).write_bytes(jpeg_bytes(reference_rgb()))
        (folder / "ok.JPEG").chmod(0o644)
        (folder / "locked.JPEG").chmod(0)
        drop = "os.setgid(65534); os.setuid(65534); " if os.geteuid() == 0 else ""
        code = ("import os, numpy as np; from pipelines.data.preprocess import process_batch; "
                + drop + "out = process_batch({'path': np.array(['ok.JPEG', 'locked.JPEG']), "
                "'label': np.array([0, 0])}, " + repr(str(folder)) + ", 32, True, 'jpeg', 90); "
                "print(repr([str(r) for r in out['reason']]))")
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert run.stdout.strip() == "['', 'unreadable: Permission denied']", run.stderr[-2000:]
    finally:
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- reduced decode
def test_reduced_dct_decoding_keeps_the_short_side_and_the_picture():
    big = cv2.resize(reference_rgb(), (1200, 900), interpolation=cv2.INTER_CUBIC)
    data = jpeg_bytes(big, 90)
    header = read_header(data)
    assert [reduction(header, s) for s in (100, 112, 200, 256, 450, 600)] == [8, 8, 4, 2, 2, 1]
    full = decode_rgb(data)
    half = decode_rgb(data, min_side=256)
    assert full.shape == (900, 1200, 3) and half.shape == (450, 600, 3)
    # After the rescale to 256 the two agree to about a level: the DCT scaling is a proper
    # low-pass, as INTER_AREA is.
    assert _mean_error(rescale(half, 256), rescale(full, 256)) < 1.5
    assert reduction(read_header(png_bytes(big)), 100) == 1  # only JPEG has DCT scaling


# --------------------------------------------------------------------------- the pipeline
def test_every_bad_kind_through_preprocess(ray_local, tiny_source, tmp_path):
    """Each fixture through the real pipeline: accepted as RGB, or one quarantine line."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    d = src / "train" / wnid
    rgb = reference_rgb()
    accepted = {
        "cmyk.JPEG": cmyk_jpeg(rgb), "ycck.JPEG": ycck_jpeg(rgb),
        "gray.JPEG": jpeg_bytes(rgb[..., 0].copy()), "png_named.JPEG": png_bytes(rgb),
        "rgba.png": png_bytes(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "deep.png": png_bytes(rgb.astype(np.uint16) * 257), "exif.JPEG": exif_jpeg(rgb),
        "tiny.JPEG": jpeg_bytes(np.full((2, 3, 3), 50, np.uint8)),
    }
    rejected = {
        "empty.JPEG": (b"", "empty file"),
        "html.JPEG": (b"<html><body>404</body></html>", "not an image file: HTML"),
        "truncated.JPEG": (jpeg_bytes(rgb)[:900], "truncated JPEG"),
        "bomb.JPEG": (jpeg_bomb(), "decompression bomb"),
        "bomb.png": (png_bomb(), "decompression bomb"),
    }
    for name, data in accepted.items():
        (d / name).write_bytes(data)
    for name, (data, _) in rejected.items():
        (d / name).write_bytes(data)
    (d / "dangling.JPEG").symlink_to(d / "nowhere")
    stray = src / "train" / "n99999999"
    stray.mkdir()
    (stray / "x.JPEG").write_bytes(jpeg_bytes(rgb))

    out = tmp_path / "out"
    manifest = run_preprocess(PreprocessConfig(source=str(src), out=str(out), resize=64,
                                               batch_size=8))
    quarantine = [json.loads(x) for x in (out / shards.QUARANTINE).read_text().splitlines()]
    reasons = {Path(q["path"]).name: q["reason"] for q in quarantine}
    assert set(reasons) == set(rejected) | {"dangling.JPEG", "x.JPEG"}
    for name, (_, reason) in rejected.items():
        assert reason in reasons[name], (name, reasons[name])
    assert reasons["dangling.JPEG"].startswith("unreadable")
    assert "not in the class index" in reasons["x.JPEG"]
    train = manifest["splits"]["train"]
    assert train["quarantined"] == len(reasons) and train["records"] == 40 + len(accepted)
    assert train["listed"] == train["records"] + train["quarantined"]
    records = {Path(r.path).name: r for rd in shards.split_readers(out, manifest, "train")
               for r in (rd[i] for i in range(len(rd)))}
    assert set(accepted) <= set(records)
    for name in ("cmyk.JPEG", "ycck.JPEG"):
        want = rescale(rgb, 64)
        assert _mean_error(shards.decode_image(records[name]), want) < 3


def test_pixel_moments_are_exact_integers():
    """cv2 products + sums against numpy int64 arithmetic, extremes included."""
    rng = np.random.default_rng(5)
    for img in (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                np.full((300, 400, 3), 255, np.uint8), np.zeros((7, 5, 3), np.uint8),
                rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)[10:200, 30:400]):
        flat = img.reshape(-1, 3).astype(np.int64)
        sums, outer, count = pixel_moments(img)
        np.testing.assert_array_equal(sums, flat.sum(0))
        np.testing.assert_array_equal(outer, flat.T @ flat)
        assert count == flat.shape[0] and outer.dtype == sums.dtype == np.int64
