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
  cifar        CIFAR-10 (batches.meta, data_batch_1..5, test_batch) or CIFAR-100 (meta,
               train, test) python batches; their test set becomes split "val"
  voc          Pascal VOC 2012 as downloaded: VOC2012/{JPEGImages,Annotations,ImageSets/Main};
               SRC is VOC2012/ or a folder holding VOC2012/ or VOCdevkit/VOC2012/; splits
               from ImageSets/Main/{train,val}.txt; the class index is VOC's 20 classes in
               VOC's order. VOC is multi-label, a record has one label: by default one
               record per image, labelled with its largest non-difficult object (box area);
               with --voc-objects one record per non-difficult object ("<jpeg>#obj<N>", N
               the object's place in the XML), its box cropped with a margin at decode time

Listing uses os.scandir: directory entries already say file or folder (d_type), so a million
files are listed from a few thousand directory reads, in one process, with no stat per file
and no Ray task per file. Files that cannot be used (an image outside any class folder, a
label not in the class index) are quarantined with a reason; files without an image
extension are counted as `ignored` and a few are named, never silently dropped.

CIFAR batches are Python pickles. They are read by `read_pickle_safely`, which walks the
opcode stream with `pickletools.genops` (a parser that executes nothing) and builds only
dicts, lists, strings, numbers and plain numeric numpy arrays. It never calls
`pickle.load`, imports nothing and refuses any other global, so a tampered batch file cannot
run code; it is an error, not a risk.

VOC annotations are XML from a download, so they are parsed with defusedxml (no entity
expansion, no external references), never xml.etree directly. Each annotation is read in
the driver at listing time (~11,500 files of ~1 KB for VOC2012 train+val, a few seconds):
the label depends on its objects. A missing, unparsable or empty annotation, an unknown
class, a box outside the image's <size>, only difficult objects, an id without its JPEG:
each is quarantined with a reason, never fatal.
"""

from __future__ import annotations

import csv
import os
import pickletools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from pipelines.data.decode import BOX_MARGIN

LAYOUTS = ("imagenet", "imagefolder", "images-list", "cifar", "voc")
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp",
                    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
SPLIT_DIRS = ("train", "val", "test")
LIST_FILES = ("train.txt", "val.txt", "test.txt")
WNID = re.compile(r"^n\d{8}$")
MAX_EXAMPLES = 20  # names kept of ignored (non-image) files, per split


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


def _named_classes(names) -> tuple[list[dict], dict[str, int]]:
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

    def quarantine(self, split: str, rel: str, reason: str) -> None:
        self.listing.quarantine.append({"split": split, "path": rel, "reason": reason})

    def files(self, folder: Path, rel: str, split: str, recursive: bool = True) -> list[str]:
        """Image files under folder (paths relative to the listing root), sorted. Entries
        are classified from d_type: no stat per file (symlinks and DT_UNKNOWN excepted)."""
        found, stack = [], [(folder, rel)]
        while stack:
            here, here_rel = stack.pop()
            try:
                with os.scandir(here) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError as exc:
                self.quarantine(split, here_rel, f"unreadable folder: {exc.strerror}")
                continue
            for name, is_dir in entries:
                if name.startswith("."):
                    continue
                child = f"{here_rel}/{name}" if here_rel else name
                if is_dir:
                    if recursive:
                        stack.append((here / name, child))
                elif _ext(name) in IMAGE_EXTENSIONS:
                    found.append(child)  # dangling links are listed too: read-time reason
                else:
                    self.ignore(split, child)
        return sorted(found)

    def class_tree(self, root: Path, rel: str, split: str, index: dict[str, int],
                   loose: dict[str, str] | None = None) -> None:
        """root/<class>/** -> items of split. Files directly in root get their label from
        `loose` (file stem -> class) when given, else are quarantined."""
        items = self.listing.splits.setdefault(split, [])
        for cls in _dirs(root):
            label = index.get(cls)
            for path in self.files(root / cls, f"{rel}/{cls}" if rel else cls, split):
                if label is None:
                    self.quarantine(split, path, f"label {cls!r} is not in the class index")
                else:
                    items.append((path, label))
        for path in self.files(root, rel, split, recursive=False):
            stem = os.path.splitext(os.path.basename(path))[0]
            if loose is not None and stem in loose:
                cls = loose[stem]
                if cls in index:
                    items.append((path, index[cls]))
                else:
                    self.quarantine(split, path, f"label {cls!r} is not in the class index")
            elif loose is not None:
                self.quarantine(split, path, f"no row for {stem} in LOC_val_solution.csv")
            else:
                self.quarantine(split, path, "image is not inside a class folder")


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
    split_dirs = [s for s in SPLIT_DIRS if (src / s).is_dir()]
    if split_dirs:
        roots = {s: (src / s, s) for s in split_dirs}
        class_root = src / ("train" if "train" in split_dirs else split_dirs[0])
    else:
        roots = {"train": (src, "")}
        class_root = src
    names = _dirs(class_root)
    if not names:
        raise SourceError(f"layout imagefolder: no class folders in {class_root}; expected "
                          "SRC/<class>/* or SRC/train/<class>/*")
    classes, index = _named_classes(names)
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
            listing.quarantine.append({"split": split, "path": where,
                                       "reason": f"expected 'class_id image_path', got {line!r}"})
            continue
        if not image:
            listing.quarantine.append({"split": split, "path": where,
                                       "reason": "line has a class id but no image path"})
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
                listing.quarantine.append({"split": split, "path": rel,
                                           "reason": f"listed again (label {label}); the first "
                                                     f"line's label {first[rel]} is kept"})
            elif 0 <= label < len(pairs):
                first[rel] = label
                keep.append((rel, label))
            else:
                listing.quarantine.append({"split": split, "path": rel,
                                           "reason": f"label {label} is not in the class index "
                                                     f"(0..{len(pairs) - 1})"})
    return listing


# --------------------------------------------------------------------------- cifar
class _Array:
    """numpy's `_reconstruct(ndarray, (0,), b'b')` result until BUILD gives it its state."""
    array: np.ndarray | None = None


_MARK = object()


def _np_dtype(spec, align=False, copy=True) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("latin-1")
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf" or dtype.fields or dtype.subdtype:
        raise SourceError(f"pickled dtype {spec!r} is not a plain number type")
    return dtype


def _from_buffer(buf, dtype, shape, order="C"):
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)


def _codecs_encode(text, encoding="utf-8"):  # Python 3 protocol-2 pickles of bytes
    if encoding not in ("latin1", "latin-1"):
        raise SourceError(f"pickled bytes with encoding {encoding!r}")
    return text.encode("latin-1")


_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda *a: _Array(),
    ("numpy._core.multiarray", "_reconstruct"): lambda *a: _Array(),
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.numeric", "_frombuffer"): _from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _from_buffer,
    ("_codecs", "encode"): _codecs_encode,
}


def _build(obj, state):
    """BUILD for the two kinds of objects a CIFAR batch holds: arrays and dtypes."""
    if isinstance(obj, _Array):
        if len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, raw)
        shape, dtype, fortran, raw = state
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise SourceError("pickled array holds Python objects, not numbers")
        obj.array = np.frombuffer(bytes(raw), dtype=dtype).reshape(
            shape, order="F" if fortran else "C")
        return obj
    if isinstance(obj, np.dtype):  # (version, byteorder, subdescr, names, fields, ...)
        order = state[1].decode() if isinstance(state[1], bytes) else state[1]
        if state[2] is not None or state[3] is not None:
            raise SourceError("pickled structured dtype; a CIFAR batch has none")
        return obj.newbyteorder(order) if order in "<>" and obj.itemsize > 1 else obj
    raise SourceError(f"pickle BUILD on a {type(obj).__name__}")


def _finish(value):
    if isinstance(value, _Array):
        if value.array is None:
            raise SourceError("pickled array without its data")
        return value.array
    if isinstance(value, dict):
        return {(k.decode("latin-1") if isinstance(k, bytes) else k): _finish(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_finish(v) for v in value)
    return value


def read_pickle_safely(data: bytes, origin: str = "pickle"):
    """The object in a pickle made only of dicts, lists, tuples, str/bytes, numbers, None and
    numeric numpy arrays (what CIFAR batches hold), without executing the pickle.

    Python 2 str (CIFAR was written by cPickle) comes back as bytes; dict keys are returned as
    str. Anything else - another global, object arrays, a malformed stream - raises SourceError."""
    stack: list = []
    marks: list[int] = []
    memo: dict = {}

    def pop_mark() -> list:
        k = marks.pop()
        items = stack[k:]
        del stack[k:]
        return items

    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                break
            if name == "MARK":
                marks.append(len(stack))
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = stack[-n:]
                del stack[-n:]
                stack.append(tuple(items))
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif name == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2], strict=True))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                stack.append(arg.encode("latin-1"))  # pickletools gives Python 2 str as latin-1
            elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"):
                stack.append(bytes(arg))
            elif name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
                          "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
                          "FLOAT", "BINFLOAT"):
                stack.append(arg)
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, qual = arg.split(" ", 1)
                else:
                    qual, module = stack.pop(), stack.pop()
                fn = _GLOBALS.get((module, qual))
                if fn is None:
                    raise SourceError(f"{origin}: refers to {module}.{qual}, which a CIFAR "
                                      "batch never does; refusing to load it")
                stack.append(fn)
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                if not callable(fn):
                    raise SourceError(f"{origin}: pickle calls a non-function")
                stack.append(fn(*args))
            elif name == "BUILD":
                state = stack.pop()
                stack[-1] = _build(stack[-1], state)
            else:
                raise SourceError(f"{origin}: pickle opcode {name} is not used by CIFAR "
                                  "batches; refusing to load it")
    except SourceError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise SourceError(f"{origin}: not a readable CIFAR batch ({type(exc).__name__}: "
                          f"{exc})") from None
    if len(stack) != 1:
        raise SourceError(f"{origin}: malformed pickle (stack of {len(stack)} at the end)")
    return _finish(stack[0])


def _cifar_root(src: Path) -> Path | None:
    for root in (src, src / "cifar-10-batches-py", src / "cifar-100-python"):
        if (root / "batches.meta").is_file() or ((root / "meta").is_file()
                                                 and (root / "train").is_file()):
            return root
    return None


def _read_batch(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read CIFAR batch {path}: {exc.strerror}") from None
    obj = read_pickle_safely(data, str(path))
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def list_cifar(src: Path) -> Listing:
    root = _cifar_root(src)
    if root is None:
        raise SourceError(f"layout cifar: {src} has neither batches.meta (CIFAR-10) nor "
                          "meta + train (CIFAR-100)")
    if (root / "batches.meta").is_file():
        names = _read_batch(root / "batches.meta")["label_names"]
        files = {"train": sorted(p.name for p in root.glob("data_batch_*")),
                 "val": ["test_batch"] if (root / "test_batch").is_file() else []}
        label_key = "labels"
    else:
        names = _read_batch(root / "meta")["fine_label_names"]
        files = {"train": ["train"], "val": ["test"] if (root / "test").is_file() else []}
        label_key = "fine_labels"
    names = [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names]
    classes, _ = _named_classes(names)
    listing = Listing("cifar", classes, {}, root=str(root))
    for split, batch_files in files.items():
        if not batch_files:
            continue
        items, arrays = [], []
        for name in batch_files:
            batch = _read_batch(root / name)
            data, labels = batch.get("data"), batch.get(label_key)
            if not isinstance(data, np.ndarray) or labels is None:
                raise SourceError(f"{root / name}: no 'data' array or {label_key!r} list")
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                    or len(labels) != data.shape[0]:
                raise SourceError(f"{root / name}: data {data.dtype} {data.shape} with "
                                  f"{len(labels)} labels; expected uint8 (N, 3072) and N labels")
            keep = []
            for i, label in enumerate(labels):
                path = f"{name}/{i}"
                if 0 <= int(label) < len(classes):
                    items.append((path, int(label)))
                    keep.append(i)
                else:
                    listing.quarantine.append({"split": split, "path": path,
                                               "reason": f"label {label} is not in the class "
                                                         f"index (0..{len(classes) - 1})"})
            arrays.append(data[keep])
        listing.splits[split] = items
        listing.pixels[split] = np.concatenate(arrays)
    return listing


# --------------------------------------------------------------------------- pascal voc
# VOC's own class order (devkit VOCinit.m): the class index, so label i means the same class
# in every VOC-derived dataset and in published per-class results.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
VOC_SPLITS = ("train", "val")  # ImageSets/Main/<split>.txt; trainval.txt is their union
VOC_OBJECT = "#obj"  # "JPEGImages/<id>.jpg#obj<N>": one record of --voc-objects
MAX_ANNOTATION_BYTES = 1 << 20  # VOC's annotations are under 10 KB; more is not one of them


class VocObject(NamedTuple):
    number: int                     # 1-based place among the XML's <object>s ("#obj<N>")
    name: str
    difficult: bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: 0-based, end excluded
    problem: str                    # why the object cannot be used; "" when it can

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


class AnnotationError(ValueError):
    """An annotation that gives no object at all; the message is the quarantine reason."""


def _xml_int(node, tag: str) -> int | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return round(float(text))  # a few VOC2012 boxes are written as "273.5"
    except (TypeError, ValueError):
        return None


def read_voc_annotation(path: Path, rel: str) -> list[VocObject]:
    """The objects of one VOC annotation file, each with its problem ("" if none);
    AnnotationError when the file gives none (missing, too large, not XML, no <object>).
    `rel` names the file in reasons."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ANNOTATION_BYTES + 1)
    except FileNotFoundError:
        raise AnnotationError(f"no annotation {rel}: the label comes from it; restore it from "
                              "the VOC2012 trainval tar or drop the id from the split's "
                              "ImageSets/Main list") from None
    except OSError as exc:
        raise AnnotationError(f"annotation {rel} is unreadable ({exc.strerror}); fix its "
                              "permissions or restore it") from None
    if len(data) > MAX_ANNOTATION_BYTES:
        raise AnnotationError(f"annotation {rel} is over {MAX_ANNOTATION_BYTES >> 20} MiB, not "
                              "a VOC annotation (those are under 10 KB); restore it")
    try:
        root = fromstring(data)
    except (ParseError, DefusedXmlException) as exc:
        raise AnnotationError(f"annotation {rel} is not valid VOC XML ({type(exc).__name__}: "
                              f"{exc}); restore it from the VOC2012 tar or fix it") from None
    # Without a usable <size> the boxes are checked against the decoded photo instead (a
    # --voc-objects crop); the default reading only compares box areas.
    size = root.find("size")
    width, height = _xml_int(size, "width"), _xml_int(size, "height")
    objects = []
    for number, node in enumerate(root.findall("object"), 1):
        name = (node.findtext("name") or "").strip()
        difficult = (node.findtext("difficult") or "0").strip() == "1"
        bndbox = node.find("bndbox")
        coords = [_xml_int(bndbox, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        box, problem = (0, 0, 0, 0), ""
        if name not in VOC_CLASSES:
            problem = (f"{rel} object {number}: class {name!r} is not one of VOC's 20 classes; "
                       "correct its <name>")
        elif None in coords:
            problem = (f"{rel} object {number} ({name}): <bndbox> lacks a numeric xmin, ymin, "
                       "xmax or ymax; correct it")
        else:
            xmin, ymin, xmax, ymax = coords
            # VOC counts pixels from 1, ends included; a 0 from 0-based tools is let through.
            box = (max(xmin - 1, 0), max(ymin - 1, 0), xmax, ymax)
            outside = bool(width and height and width > 0 and height > 0
                           and (xmax > width or ymax > height))
            if min(coords) < 0 or xmax < xmin or ymax < ymin or box[2] <= box[0] \
                    or box[3] <= box[1]:
                problem = (f"{rel} object {number} ({name}): box ({xmin},{ymin})-({xmax},{ymax}) "
                           "is empty or negative; correct its <bndbox>")
            elif outside:
                problem = (f"{rel} object {number} ({name}): box ({xmin},{ymin})-({xmax},{ymax}) "
                           f"lies outside the {width}x{height} image its <size> gives; correct "
                           "the <bndbox> or the <size>")
        objects.append(VocObject(number, name, difficult, box, problem))
    if not objects:
        raise AnnotationError(f"annotation {rel} has no <object>, so no label; add its objects "
                              "or drop the id from the split's ImageSets/Main list")
    return objects


def _voc_root(src: Path) -> Path | None:
    for root in (src, src / "VOC2012", src / "VOCdevkit" / "VOC2012"):
        if (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Main").is_dir():
            return root
    return None


def _voc_ids(root: Path, split: str, listing: Listing, seen: dict[str, str]) -> list[str]:
    """The image ids of ImageSets/Main/<split>.txt, once each and in no other split."""
    rel = f"ImageSets/Main/{split}.txt"
    try:
        text = (root / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {root / rel}: {exc}") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        where = f"{rel}:{n}"
        if not tokens:
            continue
        if len(tokens) != 1:  # e.g. a per-class list ("2008_000008 -1") given as train.txt
            listing.quarantine.append({"split": split, "path": where, "reason": (
                f"expected one image id a line, got {line.strip()!r}; the split lists are "
                "ImageSets/Main/train.txt and val.txt as downloaded")})
        elif tokens[0] in seen:
            listing.quarantine.append({"split": split, "path": where, "reason": (
                f"image id {tokens[0]} listed again (first in {seen[tokens[0]]}); kept once, "
                "so no image is in two splits or twice in one")})
        else:
            seen[tokens[0]] = where
            ids.append(tokens[0])
    return ids


def list_voc(src: Path, objects: bool = False) -> Listing:
    """Pascal VOC 2012 (see the module docstring): one record per image labelled with its
    largest non-difficult object, or with `objects` one record per non-difficult object."""
    root = _voc_root(src)
    if root is None:
        raise SourceError(f"layout voc: no JPEGImages/ and ImageSets/Main/ in {src}, "
                          f"{src / 'VOC2012'} or {src / 'VOCdevkit' / 'VOC2012'}; give the "
                          "VOC2012 folder of the extracted trainval tar as --source")
    if not (root / "Annotations").is_dir():
        raise SourceError(f"layout voc: {root / 'Annotations'} is missing; the labels come "
                          "from its XML files (VOC2012 trainval tar)")
    splits = [s for s in VOC_SPLITS if (root / "ImageSets" / "Main" / f"{s}.txt").is_file()]
    if not splits:
        raise SourceError(f"layout voc: {root / 'ImageSets' / 'Main'} holds neither train.txt "
                          "nor val.txt, which name each split's images (VOC2012 trainval tar)")
    classes, index = _named_classes(VOC_CLASSES)
    listing = Listing("voc", classes, {}, root=str(root))
    # One directory read tells which ids have a photo: no stat or failed open per id.
    jpegs = {}
    try:
        with os.scandir(root / "JPEGImages") as it:
            for e in it:
                stem, ext = os.path.splitext(e.name)
                if ext.lower() in IMAGE_EXTENSIONS and (stem not in jpegs or ext == ".jpg"):
                    jpegs[stem] = e.name
    except OSError as exc:
        raise SourceError(f"cannot read folder {root / 'JPEGImages'}: {exc.strerror}; fix its "
                          "permissions") from None
    seen: dict[str, str] = {}
    images = difficult = other_classes = 0
    for split in splits:
        items, boxes = listing.splits.setdefault(split, []), []

        def reject(path: str, reason: str, split: str = split) -> None:
            listing.quarantine.append({"split": split, "path": path, "reason": reason})

        for image_id in _voc_ids(root, split, listing, seen):
            name = jpegs.get(image_id)
            jpeg = f"JPEGImages/{name or image_id + '.jpg'}"
            if name is None:
                reject(jpeg, f"listed in ImageSets/Main/{split}.txt but {jpeg} does not exist; "
                             "restore it from the VOC2012 tar or drop the id from the list")
                continue
            try:
                found = read_voc_annotation(root / "Annotations" / f"{image_id}.xml",
                                            f"Annotations/{image_id}.xml")
            except AnnotationError as exc:
                reject(jpeg, str(exc))
                continue
            usable = [o for o in found if not o.difficult]
            if not usable:
                reject(jpeg, f"Annotations/{image_id}.xml: all its {len(found)} object(s) are "
                             "marked difficult, which VOC leaves out of training and "
                             "evaluation: nothing to label it with")
                continue
            if objects:
                for o in found:
                    if o.problem:
                        reject(f"{jpeg}{VOC_OBJECT}{o.number}", o.problem)
                    elif o.difficult:
                        difficult += 1
                    else:
                        items.append((f"{jpeg}{VOC_OBJECT}{o.number}", index[o.name]))
                        boxes.append(o.box)
                continue
            problems = [o.problem for o in found if o.problem]
            if problems:  # a wrong class or box: which object is the largest is unknown
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                reject(jpeg, problems[0] + more)
                continue
            largest = max(usable, key=lambda o: o.area)  # the first of equals: XML order
            images += 1
            other_classes += len({o.name for o in usable}) > 1
            items.append((jpeg, index[largest.name]))
        if objects:
            listing.crops[split] = np.asarray(boxes, np.int32).reshape(-1, 4)
    if objects:
        listing.reading = (
            f"VOC multi-label read as one record per non-difficult object: its box cropped "
            f"with a margin of {BOX_MARGIN:g} x the box side (clipped to the photo) before the "
            f"rescale, named <jpeg>{VOC_OBJECT}<N>; {difficult} difficult object(s) left out, "
            "as VOC's evaluation leaves them out")
    else:
        listing.reading = (
            f"VOC multi-label read as one record per image, labelled with its largest "
            f"non-difficult object by box area; {other_classes} of {images} image(s) also hold "
            "other classes, which are not recorded (--voc-objects: one record per object)")
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
    if src.is_file():
        if _looks_like_list(src):
            return "images-list", f"{src.name} is a list of 'class_id image_path' lines"
        raise SourceError(f"{src} is a file but not an images list ('class_id image_path' "
                          f"lines). Looked for: {LOOKED_FOR}.")
    if _cifar_root(src) is not None:
        return "cifar", f"CIFAR python batches in {_cifar_root(src)}"
    lists = [f for f in LIST_FILES if (src / f).is_file() and _looks_like_list(src / f)]
    if lists:
        return "images-list", f"images lists {lists}"
    if _voc_root(src) is not None:  # before ImageFolder: JPEGImages/ looks like a class folder
        return "voc", f"Pascal VOC (JPEGImages/, ImageSets/Main/) in {_voc_root(src)}"
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
        found = sorted(os.listdir(src))[:10]
    except OSError as exc:
        raise SourceError(f"cannot read {src}: {exc.strerror}") from None
    raise SourceError(f"{src}: no known layout found. Looked for: {LOOKED_FOR}. Found: "
                      f"{found or 'an empty folder'}. Use --layout to force one; see README "
                      "'Data layouts'.")


def list_source(src: str | os.PathLike, layout: str = "auto", voc_objects: bool = False) -> Listing:
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
               "voc": lambda s: list_voc(s, voc_objects)}
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
