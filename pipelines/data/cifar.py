"""The `cifar` layout of `preprocess`: CIFAR-10 and CIFAR-100 python batches.

    pytest tests/test_sources.py -k cifar

CIFAR-10 is batches.meta, data_batch_1..5 and test_batch; CIFAR-100 is meta, train and test.
Their test set becomes split "val". The pixels travel in the listing (`Listing.pixels`), not
as files: a record's path is "<batch file>/<row>".

The batches are Python pickles, and unpickling can call any function the file names. They are
read by `read_pickle_safely`: the standard library's restricted unpickler (a `find_class` that
answers only the numpy reconstruction functions and types CIFAR batches name; see "Restricting
Globals" in the `pickle` documentation), so a tampered batch that names os.system, eval or any
other global is refused before anything runs: an error, not a risk. The numpy functions it
does answer are wrappers that accept plain number types only (an object array made from a
pickle's bytes would hold arbitrary pointers), and what comes out is checked again.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from pipelines.data.sources import Listing, SourceError, named_classes


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes, and nothing else."""
    if encoding not in ("latin1", "latin-1"):
        raise SourceError(f"pickled bytes with encoding {encoding!r}; a CIFAR batch has none")
    return text.encode("latin-1")


def _numeric_dtype(spec, align=False, copy=True) -> np.dtype:
    """`numpy.dtype` for plain numbers only: an object dtype would let the bytes of a pickle
    become object pointers (np.ndarray((1,), "O", b"...") crashes the process)."""
    if isinstance(spec, bytes):
        spec = spec.decode("latin-1")
    dtype = np.dtype(spec)  # align, copy: nothing to a plain number type
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise SourceError(f"pickled dtype {spec!r} is not a plain number type; a CIFAR batch "
                          "holds only numbers")
    return dtype


class _NdarrayToken:
    """What `numpy.ndarray` resolves to: the subtype argument `_reconstruct` expects, never
    the class itself, which a pickle could call with an object dtype and a byte buffer."""

    def __new__(cls, *args, **kwargs):
        raise SourceError("pickle calls numpy.ndarray itself, which a CIFAR batch never does; "
                          "refusing to load it")


# numpy's own pickle helpers, taken from what numpy pickles rather than imported by module
# name (numpy 2 moved them from numpy.core to numpy._core, and batches name either), and
# called only with plain number types.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _reconstruct(subtype, shape, typecode) -> np.ndarray:
    """An empty array that the pickle's BUILD then fills (protocols 0 to 4)."""
    if subtype is not _NdarrayToken:
        raise SourceError("pickled array of a type other than numpy.ndarray")
    return _RECONSTRUCT(np.ndarray, shape, _numeric_dtype(typecode))


def _frombuffer(buf, dtype, shape, order="C") -> np.ndarray:
    """An array from its bytes (protocol 5)."""
    return np.frombuffer(bytes(buf), dtype=_numeric_dtype(dtype)).reshape(shape, order=order)


# Every global a CIFAR batch names (the download's Python 2 batches, re-pickled Python 3
# ones), each answered by a function that checks its arguments.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in _ALLOWED; any other is refused."""

    def __init__(self, file, origin: str):
        # Python 2's str (CIFAR was written by cPickle) comes back as bytes, not guessed text.
        super().__init__(file, encoding="bytes")
        self.origin = origin

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise SourceError(f"{self.origin}: refers to {module}.{name}, which a CIFAR batch "
                              "never does; refusing to load it")
        return allowed


_PLAIN = (str, bytes, bytearray, int, float, bool, type(None))


def _plain(value, origin: str):
    """`value` with dict keys as str, after checking that it holds only what a CIFAR batch
    holds: dicts, lists, tuples, strings, numbers, None and numeric arrays."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype.fields is not None:
            raise SourceError(f"{origin}: pickled array of dtype {value.dtype} is not a plain "
                              "number type; a CIFAR batch holds only numbers")
        return value
    if isinstance(value, dict):
        return {(k.decode("latin-1") if isinstance(k, bytes) else k): _plain(v, origin)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, origin) for v in value)
    if not isinstance(value, _PLAIN):
        raise SourceError(f"{origin}: pickle holds a {type(value).__name__}, which a CIFAR "
                          "batch never does")
    return value


def read_pickle_safely(data: bytes, origin: str = "pickle"):
    """The object in a pickle made only of dicts, lists, tuples, str/bytes, numbers, None and
    numeric numpy arrays (what CIFAR batches hold). No other global is ever looked up.

    Python 2 str comes back as bytes; dict keys are returned as str. Another global, an
    object array, a malformed stream: SourceError."""
    try:
        value = _BatchUnpickler(io.BytesIO(data), origin).load()
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed stream fails in many ways
        raise SourceError(f"{origin}: not a readable CIFAR batch ({type(exc).__name__}: "
                          f"{exc})") from None
    return _plain(value, origin)


def cifar_root(src: Path) -> Path | None:
    """The folder holding the batches: SRC itself or the download's folder inside it."""
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
    batch = read_pickle_safely(data, str(path))
    if not isinstance(batch, dict):
        raise SourceError(f"{path}: expected a dict, got {type(batch).__name__}")
    return batch


def list_cifar(src: Path) -> Listing:
    root = cifar_root(src)
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
    classes, _ = named_classes(names)
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
                    listing.reject(split, path, f"label {label} is not in the class index "
                                                f"(0..{len(classes) - 1})")
            arrays.append(data[keep])
        listing.splits[split] = items
        listing.pixels[split] = np.concatenate(arrays)
    return listing
