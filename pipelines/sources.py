"""Source layouts that `preprocess` reads, listed without opening or stat-ing any image.

ImageNet (see README "Data layouts"):
    SRC/train/<wnid>/*.JPEG
    SRC/val/<wnid>/*.JPEG              or flat SRC/val/*.JPEG with SRC/LOC_val_solution.csv
    SRC/LOC_synset_mapping.txt          optional: "<wnid> <name>" per line, fixes class order

Listing uses os.scandir per class folder (the directory entries already say file or folder),
so a million files are listed from a few thousand directory reads, in one process.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class SourceError(ValueError):
    """The whole input is unusable; the message says what was looked for and what to do."""


@dataclass
class Listing:
    layout: str
    classes: list[dict]                       # [{index, wnid, name}]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path relative to SRC, label)]
    quarantine: list[dict] = field(default_factory=list)  # [{split, path, reason}]


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_files(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and _is_image(e.name))


def _scan_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def read_synset_mapping(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not wnid:
            raise SourceError(f"{path}:{n}: expected '<wnid> <name>', got {line!r}")
        pairs.append((wnid, name.strip() or wnid))
    return pairs


def detect_layout(src: Path) -> str:
    if (src / "train").is_dir():
        return "imagenet"
    raise SourceError(
        f"{src}: no known layout found. Looked for an ImageNet tree (train/<wnid>/*.JPEG, "
        f"optional val/ and LOC_synset_mapping.txt). See README 'Data layouts'.")


def list_imagenet(src: Path) -> Listing:
    train_dir = src / "train"
    wnid_dirs = _scan_dirs(train_dir)
    mapping_file = src / "LOC_synset_mapping.txt"
    if mapping_file.is_file():
        pairs = read_synset_mapping(mapping_file)
        pairs = sorted(pairs)  # the class index is the sorted wnids
    else:
        pairs = [(w, w) for w in wnid_dirs]
    classes = [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(pairs)]
    index = {c["wnid"]: c["index"] for c in classes}
    quarantine: list[dict] = []
    splits: dict[str, list[tuple[str, int]]] = {}

    def add_wnid_tree(split: str, root: Path) -> None:
        items = splits.setdefault(split, [])
        for wnid in _scan_dirs(root):
            names = _scan_files(root / wnid)
            label = index.get(wnid)
            for name in names:
                rel = f"{root.name}/{wnid}/{name}"
                if label is None:
                    quarantine.append({"split": split, "path": rel,
                                       "reason": f"label {wnid!r} is not in the class index"})
                else:
                    items.append((rel, label))

    add_wnid_tree("train", train_dir)
    val_dir = src / "val"
    if val_dir.is_dir():
        if _scan_dirs(val_dir):
            add_wnid_tree("val", val_dir)
        else:
            splits["val"] = []
            solution = src / "LOC_val_solution.csv"
            if not solution.is_file():
                raise SourceError(f"{val_dir} is flat but {solution} is missing: the val labels "
                                  "come from it (ImageId,PredictionString).")
            labels: dict[str, str] = {}
            with open(solution, newline="") as fh:
                for row in csv.DictReader(fh):
                    labels[row["ImageId"]] = row["PredictionString"].split()[0]
            for name in _scan_files(val_dir):
                rel = f"val/{name}"
                wnid = labels.get(os.path.splitext(name)[0])
                if wnid is None:
                    reason = f"no row for {os.path.splitext(name)[0]} in {solution.name}"
                elif wnid not in index:
                    reason = f"label {wnid!r} is not in the class index"
                else:
                    splits["val"].append((rel, index[wnid]))
                    continue
                quarantine.append({"split": "val", "path": rel, "reason": reason})
    return Listing("imagenet", classes, splits, quarantine)


def list_source(src: str | os.PathLike, layout: str = "auto") -> Listing:
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"source {src} is not a readable directory")
    if layout == "auto":
        layout = detect_layout(src)
    if layout != "imagenet":
        raise SourceError(f"layout {layout!r} is not supported")
    listing = list_imagenet(src)
    if not any(listing.splits.values()):
        raise SourceError(f"{src}: found the {layout} layout but no images in it")
    return listing
