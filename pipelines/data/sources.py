"""Source layouts that `preprocess` reads, listed without opening or stat-ing any image.

    python workflow.py preprocess --source SRC --out OUT --dry-run     # what would be done
    pytest tests/test_sources.py

Layouts (`--layout`, default `auto`; see README "Data layouts"):
  imagenet     SRC/train/<wnid>/*.JPEG; SRC/val/<wnid>/ or flat SRC/val/ + LOC_val_solution.csv;
               optional SRC/LOC_synset_mapping.txt ("<wnid> <name>" lines) fixes class order
  imagefolder  SRC/<class>/* (one split, "train"), or SRC/{train,val,test}/<class>/*;
               any image extension in any case, nested folders inside a class included
  images-list  a text file of "class_id image_path" lines (the C seed's format), paths
               relative to the list file or absolute; SRC is the file (split "train") or a
               folder holding train.txt / val.txt / test.txt
  cifar        CIFAR-10 or CIFAR-100 python batches, read without running the pickles
               (pipelines/data/cifar.py); their test set becomes split "val"
  voc          Pascal VOC 2012 as downloaded (VOC2012/{JPEGImages,Annotations,ImageSets/Main}),
               one label a record: the largest object's, or one record per object with
               --voc-objects (pipelines/data/voc.py)

Listing uses os.scandir: directory entries already say file or folder (d_type), so a million
files are listed from a few thousand directory reads, in one process, with no stat per file
and no Ray task per file. Files that cannot be used (an image outside any class folder, a
label not in the class index) are quarantined with a reason; files without an image
extension are counted as `ignored` and a few are named, never silently dropped.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

LAYOUTS = ("imagenet", "imagefolder", "images-list", "cifar", "voc")
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
SPLIT_DIRS = ("train", "val", "test")
LIST_FILES = ("train.txt", "val.txt", "test.txt")
WNID = re.compile(r"^n\d{8}$")
MAX_EXAMPLES = 20  # names kept of ignored (non-image) files, per split
VOC_OBJECT = "#obj"  # "JPEGImages/<id>.jpg#obj<N>": one record of --voc-objects (voc.py)


class SourceError(ValueError):
    """The whole input is unusable; the message says what was looked for and what to do."""


@dataclass
class Listing:
    layout: str
    classes: list[dict]                       # [{index, wnid, name}]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)]
    quarantine: list[dict] = field(default_factory=list)  # [{split, path, reason}]
    root: str = ""                            # folder the listed paths are relative to
    detected: str = ""                        # what `auto` found, in words
    ignored: dict[str, int] = field(default_factory=dict)            # split -> non-image files
    ignored_examples: dict[str, list[str]] = field(default_factory=dict)
    pixels: dict[str, np.ndarray] = field(default_factory=dict)      # cifar: split -> (N, 3072)
    # voc --voc-objects: split -> (N, 4) int32 box x0, y0, x1, y1 (0-based, end excluded, in
    # the photo's full-size pixels) that decode crops, aligned with the split's items
    crops: dict[str, np.ndarray] = field(default_factory=dict)
    reading: str = ""  # how a multi-label source became one label a record, in words

    def reject(self, split: str, path: str, reason: str) -> None:
        """Quarantine `path` of `split` at listing time, with the reason."""
        self.quarantine.append({"split": split, "path": path, "reason": reason})

    def counts(self) -> dict[str, dict]:
        """Per split: images listed, quarantined at listing time, and images per class."""
        out = {}
        for split in sorted(set(self.splits) | {q["split"] for q in self.quarantine}):
            items = self.splits.get(split, [])
            per_class = np.bincount(np.asarray([lab for _, lab in items], np.int64),
                                    minlength=len(self.classes))
            out[split] = {"images": len(items),
                          "quarantined": sum(q["split"] == split for q in self.quarantine),
                          "ignored": self.ignored.get(split, 0),
                          "per_class": {c["wnid"]: int(per_class[c["index"]])
                                        for c in self.classes}}
        return out


def named_classes(names) -> tuple[list[dict], dict[str, int]]:
    """The class index of classes known by name only (wnid = name), in the order given, and
    name -> index."""
    names = list(names)
    return ([{"index": i, "wnid": n, "name": n} for i, n in enumerate(names)],
            {n: i for i, n in enumerate(names)})


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _dirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise SourceError(f"cannot read folder {folder}: {exc.strerror}") from None


class _Scanner:
    """Collects images, quarantine entries and ignored files while walking class folders."""

    def __init__(self, listing: Listing):
        self.listing = listing

    def ignore(self, split: str, rel: str) -> None:
        self.listing.ignored[split] = self.listing.ignored.get(split, 0) + 1
        examples = self.listing.ignored_examples.setdefault(split, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(rel)

    def files(self, folder: Path, rel: str, split: str, recursive: bool = True) -> list[str]:
        """Image files under folder (paths relative to the listing root), sorted. Entries
        are classified from d_type: no stat per file (symlinks and DT_UNKNOWN excepted)."""
        images, stack = [], [(folder, rel)]
        while stack:
            here, here_rel = stack.pop()
            try:
                with os.scandir(here) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError as exc:
                self.listing.reject(split, here_rel, f"unreadable folder: {exc.strerror}")
                continue
            for name, is_dir in entries:
                if name.startswith("."):
                    continue
                child = f"{here_rel}/{name}" if here_rel else name
                if is_dir:
                    if recursive:
                        stack.append((here / name, child))
                elif _ext(name) in IMAGE_EXTENSIONS:
                    images.append(child)  # dangling links are listed too: read-time reason
                else:
                    self.ignore(split, child)
        return sorted(images)

    def class_tree(self, root: Path, rel: str, split: str, index: dict[str, int],
                   loose: dict[str, str] | None = None) -> None:
        """root/<class>/** -> items of split. Files directly in root get their label from
        `loose` (file stem -> class) when given, else are quarantined."""
        items = self.listing.splits.setdefault(split, [])
        for cls in _dirs(root):
            label = index.get(cls)
            for path in self.files(root / cls, f"{rel}/{cls}" if rel else cls, split):
                if label is None:
                    self.listing.reject(split, path, f"label {cls!r} is not in the class index")
                else:
                    items.append((path, label))
        for path in self.files(root, rel, split, recursive=False):
            stem = os.path.splitext(os.path.basename(path))[0]
            if loose is not None and stem in loose:
                cls = loose[stem]
                if cls in index:
                    items.append((path, index[cls]))
                else:
                    self.listing.reject(split, path, f"label {cls!r} is not in the class index")
            elif loose is not None:
                self.listing.reject(split, path, f"no row for {stem} in LOC_val_solution.csv")
            else:
                self.listing.reject(split, path, "image is not inside a class folder")


# --------------------------------------------------------------------------- imagenet
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


def list_imagenet(src: Path) -> Listing:
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise SourceError(f"layout imagenet: {train_dir} is not a folder; expected "
                          "SRC/train/<wnid>/*.JPEG")
    mapping_file = src / "LOC_synset_mapping.txt"
    if mapping_file.is_file():
        pairs = sorted(read_synset_mapping(mapping_file))  # the class index is the sorted wnids
    else:
        pairs = [(w, w) for w in _dirs(train_dir)]
    classes = [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(pairs)]
    index = {c["wnid"]: c["index"] for c in classes}
    listing = Listing("imagenet", classes, {}, root=str(src))
    scan = _Scanner(listing)
    scan.class_tree(train_dir, "train", "train", index)
    val_dir = src / "val"
    if val_dir.is_dir():
        solution = src / "LOC_val_solution.csv"
        loose = None
        if solution.is_file():
            loose = {}
            with open(solution, newline="") as fh:
                for row in csv.DictReader(fh):
                    loose[row["ImageId"]] = row["PredictionString"].split()[0]
        elif not _dirs(val_dir):
            raise SourceError(f"{val_dir} is flat but {solution} is missing: the val labels "
                              "come from it (ImageId,PredictionString).")
        scan.class_tree(val_dir, "val", "val", index, loose)
    return listing


# --------------------------------------------------------------------------- imagefolder
def list_imagefolder(src: Path) -> Listing:
    split_dirs = [split for split in SPLIT_DIRS if (src / split).is_dir()]
    if split_dirs:
        roots = {split: (src / split, split) for split in split_dirs}
        class_root = src / ("train" if "train" in split_dirs else split_dirs[0])
    else:
        roots = {"train": (src, "")}
        class_root = src
    names = _dirs(class_root)
    if not names:
        raise SourceError(f"layout imagefolder: no class folders in {class_root}; expected "
                          "SRC/<class>/* or SRC/train/<class>/*")
    classes, index = named_classes(names)
    listing = Listing("imagefolder", classes, {}, root=str(src))
    scan = _Scanner(listing)
    for split, (root, rel) in roots.items():
        scan.class_tree(root, rel, split, index)
    return listing


# --------------------------------------------------------------------------- images list
def _looks_like_list(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if b"\0" in head:
        return False  # binary: an image, a pickle
    lines = [x for x in head.split(b"\n")[:20] if x.strip() and not x.startswith(b"#")]
    good = sum(bool(re.match(rb"^\s*-?\d+\s+\S", x)) for x in lines)
    return good > 0 and good * 2 >= len(lines)  # bad lines are quarantined, not fatal


class ListLine(NamedTuple):
    """One entry of an images list, as written: what it means is the reader's policy."""
    number: int         # 1-based line number in the file, for messages ("train.txt:7")
    text: str           # the whole line, stripped
    label: str | None   # the first token; None on a line of one token
    image: str          # the rest of the line (spaces inside a path kept), not resolved


def read_images_list(path: Path) -> Iterator[ListLine]:
    """The entries of an images list: `class_id image_path` a line, split at the first run
    of whitespace; blank lines and `#` comments skipped; LF, CRLF or CR line endings.

    The one parser of the format, shared by `preprocess` (`_read_list`: integer class ids
    required, other lines quarantined) and `batch-infer` (`infer._list_images_file`: a wnid
    or no label accepted too). Paths are left as written because the two resolve them
    differently: preprocess relative to the listing root, inference against the list's
    folder with URLs kept. The file is read now (SourceError naming it when unreadable or
    not UTF-8); entries are made as they are iterated, never collected into a list of
    their own, so a million-line list costs its text and the caller's result only."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read images list {path}: {exc}") from None
    return _list_lines(text)


def _list_lines(text: str) -> Iterator[ListLine]:
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) == 1:
            yield ListLine(n, line, None, line)
        else:
            yield ListLine(n, line, parts[0], parts[1])


def _read_list(path: Path, split: str, listing: Listing, rel_base: Path) -> list[tuple[str, int]]:
    items = []
    for n, line, cls, image in read_images_list(path):
        if cls is None:  # one token: preprocess needs both, so it is read as a bare class id
            cls, image = image, ""
        where = f"{path.name}:{n}"
        try:
            label = int(cls)
        except ValueError:
            listing.reject(split, where, f"expected 'class_id image_path', got {line!r}")
            continue
        if not image:
            listing.reject(split, where, "line has a class id but no image path")
            continue
        # Paths are relative to the list file; kept relative to the listing root (absolute
        # paths stay absolute, os.path.join keeps them as they are).
        rel = image if os.path.isabs(image) else os.path.normpath(
            os.path.join(os.path.relpath(path.parent, rel_base), image))
        items.append((rel, label))
    return items


def list_images_list(src: Path) -> Listing:
    if src.is_file():
        files, root = {"train": src}, src.parent
    else:
        files = {f[:-4]: src / f for f in LIST_FILES if (src / f).is_file()}
        root = src
        if not files:
            raise SourceError(f"layout images-list: {src} holds none of {list(LIST_FILES)}; "
                              "give the list file itself as --source")
    listing = Listing("images-list", [], {}, root=str(root))
    raw = {split: _read_list(path, split, listing, root) for split, path in files.items()}
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():  # line i names class i
        pairs = read_synset_mapping(mapping)
    else:
        top = max((lab for items in raw.values() for _, lab in items), default=-1)
        pairs = [(str(i), str(i)) for i in range(top + 1)]
    listing.classes = [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(pairs)]
    for split, items in raw.items():
        keep = listing.splits.setdefault(split, [])
        first: dict[str, int] = {}
        for rel, label in items:
            if rel in first:  # one record per file: a repeated line would train on it twice
                listing.reject(split, rel, f"listed again (label {label}); the first line's "
                                           f"label {first[rel]} is kept")
            elif 0 <= label < len(pairs):
                first[rel] = label
                keep.append((rel, label))
            else:
                listing.reject(split, rel, f"label {label} is not in the class index "
                                           f"(0..{len(pairs) - 1})")
    return listing


# --------------------------------------------------------------------------- detection
LOOKED_FOR = (
    "an images list (a text file of 'class_id image_path' lines, or a folder with train.txt/"
    "val.txt); CIFAR python batches (batches.meta + data_batch_*, or meta + train + test); "
    "ImageNet (train/<wnid>/ with wnids like n01440764, or LOC_synset_mapping.txt); "
    "Pascal VOC (VOC2012/ with JPEGImages/ and ImageSets/Main/, or VOCdevkit/VOC2012/); "
    "ImageFolder (<class>/ folders, or train/<class>/, holding images)")


def _has_image(folder: Path, depth: int = 2) -> bool:
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir() and depth > 1 and not e.name.startswith("."):
                    if _has_image(Path(e.path), depth - 1):
                        return True
                elif _ext(e.name) in IMAGE_EXTENSIONS:
                    return True
    except OSError:
        return False
    return False


def detect_layout(src: Path) -> tuple[str, str]:
    """(layout, what was found) for SRC; SourceError naming what was looked for."""
    from pipelines.data.cifar import cifar_root  # they import this module's Listing
    from pipelines.data.voc import voc_root

    if src.is_file():
        if _looks_like_list(src):
            return "images-list", f"{src.name} is a list of 'class_id image_path' lines"
        raise SourceError(f"{src} is a file but not an images list ('class_id image_path' "
                          f"lines). Looked for: {LOOKED_FOR}.")
    cifar = cifar_root(src)
    if cifar is not None:
        return "cifar", f"CIFAR python batches in {cifar}"
    lists = [f for f in LIST_FILES if (src / f).is_file() and _looks_like_list(src / f)]
    if lists:
        return "images-list", f"images lists {lists}"
    voc = voc_root(src)
    if voc is not None:  # before ImageFolder: JPEGImages/ looks like a class folder
        return "voc", f"Pascal VOC (JPEGImages/, ImageSets/Main/) in {voc}"
    if (src / "train").is_dir():
        if (src / "LOC_synset_mapping.txt").is_file():
            return "imagenet", "train/ and LOC_synset_mapping.txt"
        wnids = [d for d in _dirs(src / "train") if WNID.match(d)]
        if wnids:
            return "imagenet", f"train/ with wnid folders like {wnids[0]}"
        if any(_has_image(src / "train" / d, 1) for d in _dirs(src / "train")[:5]):
            return "imagefolder", "train/<class>/ folders of images"
    classes = _dirs(src)
    if any(_has_image(src / d) for d in classes[:5]):
        return "imagefolder", f"class folders of images ({len(classes)} folders)"
    try:
        entries = sorted(os.listdir(src))[:10]
    except OSError as exc:
        raise SourceError(f"cannot read {src}: {exc.strerror}") from None
    raise SourceError(f"{src}: no known layout found. Looked for: {LOOKED_FOR}. Found: "
                      f"{entries or 'an empty folder'}. Use --layout to force one; see README "
                      "'Data layouts'.")


def list_source(src: str | os.PathLike, layout: str = "auto", voc_objects: bool = False) -> Listing:
    from pipelines.data.cifar import list_cifar  # they import this module's Listing
    from pipelines.data.voc import list_voc

    src = Path(src)
    if not src.exists():
        raise SourceError(f"source {src} is not a readable directory: it does not exist")
    if not src.is_file() and not os.access(src, os.R_OK | os.X_OK):
        raise SourceError(f"source {src} is not a readable folder (permissions)")
    if src.is_file() and layout not in ("auto", "images-list"):
        raise SourceError(f"source {src} is a file; only --layout images-list reads a file")
    detected = ""
    if layout == "auto":
        layout, detected = detect_layout(src)
    listers = {"imagenet": list_imagenet, "imagefolder": list_imagefolder,
               "images-list": list_images_list, "cifar": list_cifar,
               "voc": lambda source: list_voc(source, voc_objects)}
    if layout not in listers:
        raise SourceError(f"layout {layout!r} is not one of {list(LAYOUTS)}")
    if voc_objects and layout != "voc":
        raise SourceError(f"--voc-objects crops Pascal VOC's object boxes, but {src} is read "
                          f"as the {layout} layout; drop --voc-objects or use --layout voc")
    listing = listers[layout](src)
    listing.detected = detected or f"--layout {layout}"
    if not any(listing.splits.values()):
        raise SourceError(f"{src}: read it as the {layout} layout but found no usable images "
                          f"({len(listing.quarantine)} quarantined at listing, "
                          f"{sum(listing.ignored.values())} non-image files)")
    return listing
