"""Generate a small synthetic dataset in the ImageNet layout.

Run it with::

    python workflow.py make-sample --out data/sample

(optionally ``--classes N --train-per-class N --val-per-class N --seed S``). The demo and the
end-to-end tests use it so that the whole workflow (preprocess -> train -> batch-infer) runs on a
laptop with no download. The result is laid out exactly as the real ILSVRC-2012 download that
``preprocess`` reads (see docs/preprocess.md, "Layouts")::

    OUT/train/<wnid>/<wnid>_<k>.JPEG           k = 1 .. train_per_class
    OUT/val/ILSVRC2012_val_<8 digits>.JPEG     flat, classes shuffled
    OUT/LOC_val_solution.csv                   ImageId,PredictionString ("<wnid> x y x y")
    OUT/LOC_synset_mapping.txt                 "<wnid> <name>", sorted wnid = class index
    OUT/.sample.json                           marks the folder as ours, so a re-run may replace it

Each class is a (colour, shape) pair, e.g. "red circle" or "blue horizontal stripes", drawn at a
random position and scale on a randomly tinted, noisy background, with Gaussian pixel noise on
top: easy enough for AlexNet to learn in a few CPU epochs from ~40 images a class, yet not a
one-pixel giveaway. Past the 100 colour x shape pairs, the background pattern tells classes
apart, up to 1000 classes (the ILSVRC class count).

Output is deterministic: every image is drawn from its own ``numpy.random.default_rng`` seeded
with (seed, split, class, k), so the same seed gives byte-identical files, whatever the order
or subset generated.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

# Palette in RGB. Hues far apart and lightness extremes (white, black) so that colour alone
# already separates ten classes; the background is kept low-saturation so it never competes.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 180, 60)),
    ("blue", (40, 70, 220)),
    ("yellow", (230, 210, 40)),
    ("magenta", (210, 50, 200)),
    ("cyan", (40, 200, 210)),
    ("orange", (240, 140, 30)),
    ("purple", (120, 50, 170)),
    ("white", (240, 240, 240)),
    ("black", (20, 20, 20)),
)

# Shape masks on local coordinates u, v in [-1, 1] over the object's bounding square. Masks
# rather than cv2 drawing calls: one code path for solid shapes and textures, and textures
# scale with the object so a stripe count is a property of the class, not of the image size.
Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _bands(t: np.ndarray, n: int) -> np.ndarray:
    """True on every other of ``n`` equal bands across t in [-1, 1]."""
    return (np.floor((t + 1.0) * (n / 2.0)).astype(np.int32) % 2) == 0


SHAPES: tuple[tuple[str, Mask], ...] = (
    ("circle", lambda u, v: u * u + v * v <= 1.0),
    ("square", lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)),
    ("triangle", lambda u, v: np.abs(u) <= (v + 1.0) / 2.0),
    ("horizontal stripes", lambda u, v: _bands(v, 7)),
    ("vertical stripes", lambda u, v: _bands(u, 7)),
    ("checkerboard", lambda u, v: _bands(u, 5) == _bands(v, 5)),
    ("ring", lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.36)),
    ("cross", lambda u, v: (np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)),
    ("diamond", lambda u, v: np.abs(u) + np.abs(v) <= 1.0),
    ("diagonal stripes", lambda u, v: _bands((u + v) / 2.0, 7)),
)

# Background patterns, one per block of len(COLOURS) * len(SHAPES) classes. "plain" comes
# first so that the first 100 classes differ only by their object, the intended signal.
BACKGROUNDS: tuple[str, ...] = (
    "plain",
    "horizontal gradient",
    "vertical gradient",
    "radial gradient",
    "grid",
    "dots",
    "blocks",
    "diagonal gradient",
    "frame",
    "diagonal lines",
)

MAX_CLASSES = len(COLOURS) * len(SHAPES) * len(BACKGROUNDS)

# Synthetic but ImageNet-like ids: "n" + 8 digits. The 9 prefix keeps them clear of the real
# ones (all ILSVRC wnids lie below n16000000); fixed width makes string order = class order.
WNID_BASE = 90_000_000

# Split ids fed to the per-image seed; also the id of the val shuffle stream.
_SPLIT_IDS = {"train": 0, "val": 1, "val-order": 2}

MARKER = ".sample.json"


def class_spec(index: int) -> tuple[str, str, str, str]:
    """Return (wnid, colour, shape, background) of class ``index``.

    Colour and shape follow a Latin square (shape = colour + block), so any run of up to ten
    consecutive classes has ten different colours *and* ten different shapes: small samples
    get the most distinct classes possible.
    """
    if not 0 <= index < MAX_CLASSES:
        raise ValueError(f"class index must be in [0, {MAX_CLASSES}), got {index}")
    n_col, n_shp = len(COLOURS), len(SHAPES)
    colour = index % n_col
    shape = (index % n_col + index // n_col) % n_shp
    background = index // (n_col * n_shp)
    return (
        f"n{WNID_BASE + index:08d}",
        COLOURS[colour][0],
        SHAPES[shape][0],
        BACKGROUNDS[background],
    )


def class_name(index: int) -> str:
    """Human-readable class name, e.g. "red circle" or "red circle on grid"."""
    _, colour, shape, background = class_spec(index)
    name = f"{colour} {shape}"
    return name if background == "plain" else f"{name} on {background}"


def _background(rng: np.random.Generator, h: int, w: int, pattern: str) -> np.ndarray:
    """A low-saturation, randomly tinted RGB float32 background with blotchy noise."""
    grey = rng.uniform(95.0, 165.0)
    tint = grey + rng.uniform(-20.0, 20.0, size=3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = tint
    # Low-frequency blotches (a coarse random grid, bilinearly upsampled) so the background is
    # not flat: the network must look for the object rather than at the mean colour.
    coarse = rng.normal(0.0, 12.0, size=(6, 6, 3)).astype(np.float32)
    img += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)

    # Open grids (a column and a row) broadcast to full size only where a pattern needs it.
    ys, xs = np.ogrid[0:h, 0:w]
    yy = ys.astype(np.float32) / max(h - 1, 1)
    xx = xs.astype(np.float32) / max(w - 1, 1)
    amp = float(rng.uniform(35.0, 55.0))
    # Patterns are luminance-only (same offset on all channels) so they never look like an
    # object colour; their phase and period are random so only the kind of pattern is a cue.
    if pattern == "plain":
        delta = None
    elif pattern == "horizontal gradient":
        delta = amp * (xx - 0.5) * rng.choice([-1.0, 1.0])
    elif pattern == "vertical gradient":
        delta = amp * (yy - 0.5) * rng.choice([-1.0, 1.0])
    elif pattern == "radial gradient":
        delta = amp * (0.5 - np.hypot(xx - 0.5, yy - 0.5))
    elif pattern == "diagonal gradient":
        delta = amp * ((xx + yy) / 2.0 - 0.5) * rng.choice([-1.0, 1.0])
    elif pattern == "grid":
        period = int(rng.integers(18, 30))
        delta = amp * (((ys % period) < 3) | ((xs % period) < 3)).astype(np.float32)
    elif pattern == "dots":
        period = int(rng.integers(16, 26))
        r = np.hypot(ys % period - period / 2, xs % period - period / 2)
        delta = amp * (r < period / 5).astype(np.float32)
    elif pattern == "blocks":
        coarse = rng.uniform(-amp, amp, size=(int(rng.integers(4, 8)),) * 2).astype(np.float32)
        delta = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
    elif pattern == "frame":
        border = int(min(h, w) * 0.08)
        delta = np.zeros((h, w), np.float32)
        delta[:border, :] = delta[-border:, :] = delta[:, :border] = delta[:, -border:] = amp
    elif pattern == "diagonal lines":
        period = int(rng.integers(14, 24))
        delta = amp * (((ys + xs) % period) < 3).astype(np.float32)
    else:  # pragma: no cover - BACKGROUNDS and this function are edited together
        raise AssertionError(pattern)
    if delta is not None:
        img += np.asarray(delta, np.float32)[..., None]
    return img


def render(
    index: int, rng: np.random.Generator, min_side: int = 200, max_side: int = 400
) -> np.ndarray:
    """Draw one image of class ``index`` as a uint8 BGR array (OpenCV's order).

    Everything random (size, tint, object position/scale/colour jitter, noise) comes from
    ``rng``, so the caller controls determinism by how it seeds it.
    """
    _, colour, shape, background = class_spec(index)
    # Width and height drawn independently: aspect ratios vary, so preprocessing has to
    # rescale the shorter side and crop, as it must for real photos.
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    img = _background(rng, h, w, background)

    # Object size 30-70% of the shorter side: large enough to survive the 256 rescale and a
    # 224 random crop, small and mobile enough that position is no cue.
    side = max(int(rng.uniform(0.3, 0.7) * min(h, w)), 8)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    t = (np.arange(side, dtype=np.float32) + 0.5) / side * 2.0 - 1.0
    # Broadcast: texture masks that depend on one axis only come back as a row or a column.
    mask = np.broadcast_to(dict(SHAPES)[shape](t[None, :], t[:, None]), (side, side))
    # Per-image colour jitter: classes are colour families, not exact RGB triplets.
    rgb = np.clip(np.asarray(dict(COLOURS)[colour], np.float32) + rng.normal(0, 12, 3), 0, 255)
    region = img[y0 : y0 + side, x0 : x0 + side]
    region[mask] = rgb

    # Pixel noise on everything, as a sensor would add: no class is identifiable from a single
    # pixel value, and JPEG has real texture to encode.
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 10.0
    img += noise
    img += 0.5  # round, not truncate, on the cast below
    np.clip(img, 0, 255, out=img)
    return cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2BGR)


def _encode(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid arrays
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def _rng(seed: int, split: str, index: int, k: int) -> np.random.Generator:
    # One independent stream per image: adding classes or images never changes the others.
    return np.random.default_rng([seed, _SPLIT_IDS[split], index, k])


def _prepare(root: Path) -> None:
    """Make ``root`` ready for a fresh sample without ever deleting data we did not write."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            # A non-empty folder without our marker may be a real dataset: refuse, never wipe.
            raise FileExistsError(
                f"{root} is not empty and was not made by make-sample; choose an empty --out"
            )
        # Our own earlier sample: remove it whole so stale files of a larger run cannot linger.
        for name in ("train", "val"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt", MARKER):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def make_sample(
    out: str | os.PathLike,
    classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
    seed: int = 0,
    min_side: int = 200,
    max_side: int = 400,
) -> dict:
    """Write a synthetic ImageNet-layout dataset under ``out`` and return a summary.

    Returns ``{"root", "classes", "train", "val", "wnids"}``. Raises ``ValueError`` for bad
    arguments and ``FileExistsError`` when ``out`` is a non-empty folder that an earlier
    ``make_sample`` did not write (so a mistyped ``--out`` cannot destroy real data).
    """
    for label, value in (
        ("classes", classes),
        ("train_per_class", train_per_class),
        ("val_per_class", val_per_class),
        ("seed", seed),
        ("min_side", min_side),
        ("max_side", max_side),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{label} must be an integer, got {value!r}")
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES}, got {classes}")
    if train_per_class < 1:
        raise ValueError(f"train_per_class must be at least 1, got {train_per_class}")
    if val_per_class < 1:
        raise ValueError(f"val_per_class must be at least 1, got {val_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    # 32 px keeps every shape recognisable (object >= ~10 px); above 4096 a sample stops
    # being small.
    if not 32 <= min_side <= max_side <= 4096:
        raise ValueError(
            f"need 32 <= min_side <= max_side <= 4096, got min_side={min_side}, max_side={max_side}"
        )

    root = Path(out)
    _prepare(root)
    params = {
        "seed": seed,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "min_side": min_side,
        "max_side": max_side,
    }
    # Claim the folder before writing images, so a re-run after a crash may still replace it.
    marker = root / MARKER
    marker.write_text(json.dumps({"complete": False, "params": params}) + "\n", encoding="utf-8")
    wnids = [class_spec(i)[0] for i in range(classes)]

    # Mapping first: it fixes class index = sorted wnid order, as in the real download.
    with open(root / "LOC_synset_mapping.txt", "w", encoding="utf-8", newline="\n") as f:
        for i, wnid in enumerate(wnids):
            f.write(f"{wnid} {class_name(i)}\n")

    for i, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, train_per_class + 1):
            bgr = render(i, _rng(seed, "train", i, k), min_side, max_side)
            (folder / f"{wnid}_{k}.JPEG").write_bytes(_encode(bgr))

    # Val is flat and shuffled across classes like ILSVRC2012_val_*: the label lives only in
    # the CSV, so a reader that infers labels from file order or folders fails loudly.
    pairs = [(i, k) for i in range(classes) for k in range(1, val_per_class + 1)]
    order = np.random.default_rng([seed, _SPLIT_IDS["val-order"]]).permutation(len(pairs))
    (root / "val").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, p in enumerate(order, start=1):
        i, k = pairs[int(p)]
        image_id = f"ILSVRC2012_val_{n:08d}"
        bgr = render(i, _rng(seed, "val", i, k), min_side, max_side)
        (root / "val" / f"{image_id}.JPEG").write_bytes(_encode(bgr))
        # The real file's PredictionString is "<wnid> xmin ymin xmax ymax" (repeated per box);
        # readers take the first token, so a fixed fake box keeps the format honest.
        rows.append((image_id, f"{wnids[i]} 10 20 100 200"))
    with open(root / "LOC_val_solution.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)

    summary = {
        "root": str(root),
        "classes": classes,
        "train": classes * train_per_class,
        "val": len(rows),
        "wnids": wnids,
    }
    # Everything but "root": the path is no property of the data, and leaving it out keeps
    # two samples of one seed byte-identical wherever they are written.
    record = {k: v for k, v in summary.items() if k != "root"}
    marker.write_text(
        json.dumps({**record, "complete": True, "params": params}, indent=2) + "\n",
        encoding="utf-8",
    )
    return summary
