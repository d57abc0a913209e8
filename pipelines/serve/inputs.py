"""What `batch-infer` reads: a folder tree of images, a preprocess OUT (its shards), an
images-list file or a .parquet/.csv table, listed as one Arrow table of paths and labels
(index, wnid or none), with the label map from a dataset's classes to the model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.sources import IMAGE_EXTENSIONS, SourceError, read_images_list
from pipelines.serve.predict import (
    InferError,
)

TABLE_EXTENSIONS = {".parquet", ".pq", ".csv"}


# --------------------------------------------------------------------------- inputs
class _Labels:
    """Reads a label token against the model's class index (the wnid lookup built once)."""

    def __init__(self, classes: list[dict]):
        self.classes = classes
        self.wnid_index = {c["wnid"]: c["index"] for c in classes}

    def __call__(self, token, where: str) -> tuple[int, str]:
        return _label_of(token, self.classes, where, self.wnid_index)


def _label_of(token, classes: list[dict], where: str,
              wnid_index: dict[str, int] | None = None) -> tuple[int, str]:
    """(class index, "") from an int index or a wnid; (-1, "") for null; (-1, reason) for a
    label that is not in the model's class index (the row then gets that error). Pass
    `wnid_index` when reading many labels (`_Labels` does)."""
    if token is None or (isinstance(token, float) and np.isnan(token)):
        return -1, ""
    if wnid_index is None:
        wnid_index = {c["wnid"]: c["index"] for c in classes}
    text = str(token).strip()
    if not text:  # an empty CSV cell (read as "" in a text column): no label, as a path-only line
        return -1, ""
    if text.lstrip("-").isdigit():
        value = int(text)
        if value == -1:
            return -1, ""
        if not 0 <= value < len(classes):
            return -1, (f"{where}: class {value} is outside the model's class index "
                        f"(0..{len(classes) - 1})")
        return value, ""
    if text in wnid_index:
        return wnid_index[text], ""
    return -1, (f"{where}: {text!r} is neither a class index nor a wnid of the model "
                f"(e.g. {classes[0]['wnid']!r})")


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) or "://" in p else str(base / p)


def _table(paths: list[str], labels: list[int], kind: str = "file",
           records: list[int] | None = None, errors: list[str] | None = None) -> pa.Table:
    n = len(paths)
    return pa.table({"path": pa.array(paths, pa.string()),
                     "record": pa.array(records or [-1] * n, pa.int64()),
                     "label": pa.array(labels, pa.int64()),
                     "kind": pa.array([kind] * n, pa.string()),
                     "error": pa.array(errors or [""] * n, pa.string())})


def _list_images_file(path: Path, classes: list[dict]) -> pa.Table:
    """The images-list layout of `preprocess` (parsed by `sources.read_images_list`):
    `class_id image_path` a line (here class_id may also be a wnid of the model, or -1 for
    no label); a line of one token is an unlabelled path; blank lines and `#` comments are
    skipped; relative paths are relative to the list file's folder. A line whose class is
    not in the model's class index becomes an error row."""
    paths, labels, errors = [], [], []
    try:
        lines = read_images_list(path)
    except SourceError as exc:  # unreadable or not UTF-8; the message names the list
        raise InferError(str(exc)) from None
    label_of = _Labels(classes)
    for n, _, token, image in lines:
        label, error = (-1, "") if token is None else label_of(token, f"{path.name}:{n}")
        paths.append(_resolve(path.parent, image))
        labels.append(label)
        errors.append(error)
    if not paths:
        raise InferError(f"images list {path} has no entries ('class_id image_path' a line)")
    return _table(paths, labels, errors=errors)


def _list_table_file(path: Path, classes: list[dict], path_column: str,
                     label_column: str) -> pa.Table:
    """A Parquet or CSV file with a path column (and optionally a label column). An empty
    path or a label outside the model's class index becomes an error row."""
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
                column_types={path_column: pa.string()}))
        else:
            table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InferError(f"cannot read {path}: {exc}") from None
    if path_column not in table.column_names:
        raise InferError(f"{path} has no column {path_column!r} (--path-column); its columns: "
                         f"{table.column_names}")
    if table.num_rows == 0:
        raise InferError(f"{path} has no rows")
    raw_paths = table[path_column].to_pylist()
    if label_column and label_column in table.column_names:
        where, label_of = f"{path.name} row {{}} column {label_column!r}", _Labels(classes)
        labels = [label_of(v, where.format(i))
                 for i, v in enumerate(table[label_column].to_pylist())]
    else:
        labels = [(-1, "")] * len(raw_paths)
    paths, errors = [], []
    for i, (p, (_, err)) in enumerate(zip(raw_paths, labels, strict=True)):
        empty = p is None or str(p).strip() == ""
        paths.append(f"{path.name} row {i}" if empty else _resolve(path.parent, str(p)))
        # The row's path column then names the row; printed as "PATH: ERROR", so the error
        # itself does not repeat it.
        errors.append(f"empty {path_column!r}" if empty else err)
    return _table(paths, [lab for lab, _ in labels], errors=errors)


def _list_folder(root: Path, classes: list[dict]) -> pa.Table:
    wnid_index = {c["wnid"]: c["index"] for c in classes}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not files:
        raise InferError(f"no images under {root} (extensions {sorted(IMAGE_EXTENSIONS)}); "
                         "for a folder of images lists (train.txt, val.txt) give the list")
    # A file in a folder named after a known wnid has that label (ImageNet/ImageFolder trees).
    return _table(files, [wnid_index.get(Path(f).parent.name, -1) for f in files])


def list_inputs(path: str, split: str, classes: list[dict], path_column: str = "path",
                label_column: str = "label") -> tuple[pa.Table, dict]:
    """Rows of (path, record, label, kind) for every input, and what the input was.

    Lists paths only; no image is opened here (a million files list in seconds), so an
    unreadable file becomes an error row later rather than a failure now."""
    from pipelines.data.shards import MANIFEST, manifest_digest, not_an_output, read_manifest

    if not path:
        raise InferError("--input is required: a folder of images, a preprocess OUT, an "
                         "images-list file or a .parquet/.csv file with a path column")
    root = Path(path)
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise InferError(f"{root} has no split {split!r}; it has {list(manifest['splits'])}")
        rows = [(str(root / s["path"]), i) for s in manifest["splits"][split]["shards"]
                for i in range(s["records"])]
        if not rows:
            raise InferError(f"{root}: split {split!r} has no records")
        # The label is in each record; -1 here is filled in when the record is read.
        table = _table([p for p, _ in rows], [-1] * len(rows), "shard", [i for _, i in rows])
        return table, {"kind": "shards", "split": split,
                       "manifest_sha256": manifest_digest(root),
                       **shard_label_map(manifest["classes"], classes, root)}
    if root.is_dir():
        if (root / "preprocess.json").is_file():  # shards but no manifest: not images to list
            raise InferError(not_an_output(root))
        return _list_folder(root, classes), {"kind": "folder"}
    if root.is_file():
        if root.suffix.lower() in TABLE_EXTENSIONS:
            return _list_table_file(root, classes, path_column, label_column), {"kind": "table"}
        return _list_images_file(root, classes), {"kind": "images-list"}
    raise InferError(f"input {root} does not exist (expected a folder of images, a preprocess "
                     "OUT, an images-list file or a .parquet/.csv file)")


def shard_label_map(out_classes: list[dict], model_classes: list[dict], root: Path) -> dict:
    """How the records' labels (indices into the OUT's class list) become the model's: {}
    when both lists are the same wnids in the same order; else {"label_map": [model index
    or -1 per OUT index], "label_note": one line}, matched by wnid. A record whose class the
    model does not know is predicted unlabelled (no accuracy), never scored against the
    wrong class, which comparing raw indices would do."""
    out_wnids = [c["wnid"] for c in out_classes]
    model_index = {c["wnid"]: c["index"] for c in model_classes}
    if out_wnids == [c["wnid"] for c in model_classes]:
        return {}
    mapping = [model_index.get(w, -1) for w in out_wnids]
    known = sum(m >= 0 for m in mapping)
    note = (f"{root}: its {len(out_wnids)} classes differ from the model's "
            f"{len(model_classes)}; labels are matched by wnid ({known} of {len(out_wnids)} "
            "known to the model; records of the others are predicted unlabelled)")
    return {"label_map": mapping, "label_note": note}
