"""Batch inference with one registered model (or an ensemble) on Ray Data.

    python workflow.py batch-infer --model models:/alexnet@champion --input data/sample/val \
        --output predictions.parquet
    python workflow.py batch-infer --model models:/alexnet/1 --model models:/alexnet/2 \
        --input /shared/imagenet-shards --split val --ten-crop --actors 4 --gpu \
        --output /shared/preds/ --log-to-mlflow

Stages: list the inputs (a folder tree, a preprocess OUT's shards, an images-list file or a
Parquet/CSV table with a path column) -> map_batches(load_crops) in tasks (read, decode, the
model's own rescale and crop) -> map_batches(Predictor) on an actor pool (each actor loads the
weights once, from the object store, so actors on other nodes need no shared model path) ->
Parquet or CSV. Ray Data streams with backpressure, so memory stays flat on any input size.
A file that does not decode becomes a row with `error` set and no prediction.

Output: `--output NAME.parquet` or `NAME.csv` is one file, streamed through the driver (for a
folder or a few hundred thousand images); any other `--output` is a directory of files written
in parallel by the Ray workers (`ds.write_parquet` / `ds.write_csv`), for large inputs and
shared or remote storage. The summary (counts, top-1/top-5 accuracy, per class) is the same
either way; `--log-to-mlflow` records it as an evaluation run linked to the model version.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import InferConfig
from pipelines.data.sources import IMAGE_EXTENSIONS, SourceError, read_images_list
from pipelines.runtime import init_ray, stop_local_ray
from pipelines.serve.predict import (
    DEFAULT_MODEL,
    InferError,
    ModelRef,
    geometry,
    read_info,
    resolve_model,
    resolve_models,
    topk,
)

__all__ = ["InferError", "ModelRef", "SCHEMA", "list_inputs", "resolve_model", "run_batch_infer"]

TABLE_EXTENSIONS = {".parquet", ".pq", ".csv"}
FILE_OUTPUTS = {".parquet": "parquet", ".csv": "csv"}
TOP = 5
# Memory a decode task reserves per image besides its crops: a decoded photo of up to ~2 MP
# with its rescaled copy (ILSVRC photos average ~0.2 MP; larger ones still run: this is a
# scheduling estimate, not a limit).
DECODED_IMAGE_BYTES = 8 << 20

# One row per input. Lists are top-k by descending probability, k = min(5, classes).
SCHEMA = pa.schema([
    ("path", pa.string()),            # the image file, or the record's source path for shards
    ("shard", pa.string()),           # the shard file (shard inputs only)
    ("record", pa.int64()),           # the record's position in its shard (shard inputs only)
    ("top5_index", pa.list_(pa.int64())),
    ("top5_wnid", pa.list_(pa.string())),
    ("top5_name", pa.list_(pa.string())),
    ("top5_prob", pa.list_(pa.float32())),
    ("label", pa.int64()),            # the true class index when known
    ("label_wnid", pa.string()),
    ("correct_top1", pa.bool_()),     # null when the label is unknown or the image failed
    ("correct_top5", pa.bool_()),
    ("error", pa.string()),           # why there is no prediction; null when there is one
    ("model_uri", pa.string()),       # as given; an ensemble's members joined by " + "
    ("model_version", pa.string()),   # registry version(s) when known
])


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
        found = [label_of(v, where.format(i))
                 for i, v in enumerate(table[label_column].to_pylist())]
    else:
        found = [(-1, "")] * len(raw_paths)
    paths, errors = [], []
    for i, (p, (_, err)) in enumerate(zip(raw_paths, found, strict=True)):
        empty = p is None or str(p).strip() == ""
        paths.append(f"{path.name} row {i}" if empty else _resolve(path.parent, str(p)))
        # The row's path column then names the row; printed as "PATH: ERROR", so the error
        # itself does not repeat it.
        errors.append(f"empty {path_column!r}" if empty else err)
    return _table(paths, [lab for lab, _ in found], errors=errors)


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


# --------------------------------------------------------------------------- decode (tasks)
def load_crops(batch: dict[str, np.ndarray], geometries: list[tuple[int, int]],
               ten_crop: bool, label_map: list[int] | None = None) -> dict[str, np.ndarray]:
    """Read and decode each input, then each model geometry's rescale + crop (Ray tasks, CPU).
    A shard record's label goes through `label_map` (OUT index -> model index, see
    `shard_label_map`) when the OUT's class list is not the model's.

    Returns the batch with `crops_<g>` uint8 [N, S, S, 3] ([N, 10, S, S, 3] with ten_crop)
    per geometry g, and `error` ("" when fine); a failed row keeps zero pixels."""
    from pipelines.data.decode import decode_rgb
    from pipelines.data.shards import ShardReader, decode_image
    from pipelines.serve.predict import make_crops

    n = len(batch["path"])
    shape = (10,) if ten_crop else ()
    crops = [np.zeros((n, *shape, size, size, 3), np.uint8) for _, size in geometries]
    errors = [""] * n
    paths = batch["path"].astype(object).copy()
    shards = np.array([""] * n, dtype=object)  # "" = not a shard (None would become NaN)
    labels = batch["label"].copy()
    readers: dict[str, ShardReader] = {}
    for i, (src, kind) in enumerate(zip(batch["path"], batch["kind"], strict=True)):
        if batch["error"][i]:  # found at listing time (a label not in the class index, ...)
            errors[i] = str(batch["error"][i])
            continue
        try:
            if kind == "shard":
                shards[i], paths[i] = src, f"{src}#{int(batch['record'][i])}"
                reader = readers.get(src) or readers.setdefault(src, ShardReader(src))
                rec = reader[int(batch["record"][i])]
                paths[i] = rec.path
                labels[i] = rec.label if label_map is None or rec.label < 0 else \
                    label_map[rec.label]
                rgb = decode_image(rec)
            else:
                with open(src, "rb") as fh:
                    data = fh.read()
                rgb = decode_rgb(data)
            for g, geom in enumerate(geometries):
                crops[g][i] = make_crops(rgb, geom, ten_crop)
        except OSError as exc:
            errors[i] = f"unreadable: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - one bad input is a row, never a failed job
            errors[i] = str(exc) or type(exc).__name__
    out = {"path": paths.astype(str), "shard": shards, "record": batch["record"],
           "label": labels, "error": np.array(errors, dtype=object)}
    out.update({f"crops_{g}": c for g, c in enumerate(crops)})
    return out


# --------------------------------------------------------------------------- model (actors)
def _model_source(ref: ModelRef, ship: bool) -> dict:
    """Where an actor finds a model: the bundle dir, readable by actors on the driver's node
    (and on others when it is on shared storage); with `ship`, also inference.json and the
    weights' bytes in the object store, for nodes that cannot see that dir. A single-node
    Ray ships nothing: 240 MB of weights would be copied into the store for no reader."""
    import ray

    from pipelines.serve.predict import INFERENCE, WEIGHTS

    bundle = Path(ref.bundle)
    info = (bundle / INFERENCE).read_text()
    blob = ray.put({"info": info, "weights": (bundle / WEIGHTS).read_bytes()}) if ship else None
    return {"dir": str(bundle), "info": info, "blob": [blob]}  # a list: no auto-resolve


class Predictor:
    """Runs the ensemble on an actor; builds it once per actor, not once per batch."""

    def __init__(self, sources: list[dict], model_uri: str, model_version: str | None,
                 gpu: bool, amp: bool, threads: int):
        import ray
        import torch

        from pipelines.serve.predict import INFERENCE, WEIGHTS, Ensemble

        torch.set_num_threads(max(1, threads))
        with tempfile.TemporaryDirectory(prefix="alexnet-actor-") as tmp:
            dirs = []
            for i, src in enumerate(sources):
                here = Path(src["dir"])
                if (here / WEIGHTS).is_file() and (here / INFERENCE).is_file() and \
                        (here / INFERENCE).read_text() == src["info"]:
                    dirs.append(str(here))  # same node or shared storage: read it directly
                    continue
                if src["blob"][0] is None:
                    raise InferError(f"model bundle {here} is not readable on this node and "
                                     "was not shipped")
                blob = ray.get(src["blob"][0])
                d = Path(tmp) / str(i)
                d.mkdir()
                (d / INFERENCE).write_text(blob["info"])
                (d / WEIGHTS).write_bytes(blob["weights"])
                del blob
                dirs.append(str(d))
            self.ensemble = Ensemble(dirs, "cuda" if gpu else "cpu", amp=amp)
        classes = self.ensemble.classes
        self.wnids = np.array([c["wnid"] for c in classes], dtype=object)
        self.names = np.array([c["name"] for c in classes], dtype=object)
        self.model_uri, self.model_version = model_uri, model_version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["error"] == ""
        n = len(ok)
        k = min(TOP, len(self.wnids))
        top_i = np.zeros((n, k), np.int64)
        top_p = np.zeros((n, k), np.float32)
        if ok.any():
            crops = [batch[f"crops_{g}"][ok] for g in range(len(self.ensemble.geometries))]
            top_i[ok], top_p[ok] = topk(self.ensemble.predict(crops), k)
        labels = np.asarray(batch["label"], np.int64)
        known = labels >= 0
        scored = ok & known

        def rows(values: np.ndarray, mask: np.ndarray) -> list:
            return [v if m else None for v, m in zip(values.tolist(), mask, strict=True)]

        return pa.table({
            "path": pa.array(batch["path"].astype(str), pa.string()),
            "shard": pa.array(rows(batch["shard"].astype(str), batch["shard"] != ""),
                              pa.string()),
            "record": pa.array(rows(batch["record"], batch["record"] >= 0), pa.int64()),
            "top5_index": pa.array(rows(top_i, ok), SCHEMA.field("top5_index").type),
            "top5_wnid": pa.array(rows(self.wnids[top_i], ok), SCHEMA.field("top5_wnid").type),
            "top5_name": pa.array(rows(self.names[top_i], ok), SCHEMA.field("top5_name").type),
            "top5_prob": pa.array(rows(top_p, ok), SCHEMA.field("top5_prob").type),
            "label": pa.array(rows(labels, known), pa.int64()),
            "label_wnid": pa.array(rows(self.wnids[labels.clip(0)], known), pa.string()),
            "correct_top1": pa.array(rows(top_i[:, 0] == labels, scored), pa.bool_()),
            "correct_top5": pa.array(rows((top_i == labels[:, None]).any(1), scored),
                                     pa.bool_()),
            "error": pa.array(rows(batch["error"], ~ok), pa.string()),
            "model_uri": pa.array([self.model_uri] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
        }, schema=SCHEMA)


# --------------------------------------------------------------------------- output
def csv_columns(table: pa.Table) -> pa.Table:
    """CSV holds no lists: top-k lists become columns top1_index, top1_wnid, top1_name,
    top1_prob, ..., topk_prob (k = min(5, classes)); the other columns stay as they are."""
    k = 0
    lengths = pc.list_value_length(table["top5_index"]).drop_null()
    if len(lengths):
        k = int(pc.max(lengths).as_py())
    out = {}
    for name in table.column_names:
        if not name.startswith("top5_"):
            out[name] = table[name]
    for j in range(k):
        for field in ("index", "wnid", "name", "prob"):
            out[f"top{j + 1}_{field}"] = pc.list_element(table[f"top5_{field}"], j)
    return pa.table(out)


def output_plan(cfg: InferConfig) -> tuple[str, str]:
    """("file" | "dir", "parquet" | "csv"). The rule: an --output ending in .parquet or .csv
    is one file written by the driver; anything else is a directory written by the workers."""
    ext = Path(cfg.output).suffix.lower()
    mode = "file" if ext in FILE_OUTPUTS else "dir"
    fmt = cfg.format if cfg.format != "auto" else FILE_OUTPUTS.get(ext, "parquet")
    if mode == "file" and fmt != FILE_OUTPUTS[ext]:
        raise InferError(f"--format {fmt} disagrees with --output {cfg.output}; "
                         f"name it *.{fmt} or drop --format")
    if mode == "file" and "://" in cfg.output:
        raise InferError("a single-file --output must be a local path; give a directory URI "
                         "(no .parquet/.csv extension) to write to remote storage")
    return mode, fmt


class Summary:
    """Counts, accuracy and per-class accuracy, accumulated batch by batch (flat memory)."""

    def __init__(self, classes: list[dict]):
        self.classes = classes
        self.images = self.errors = 0
        c = len(classes)
        self.per_class = np.zeros((3, c), np.int64)  # images, top-1 correct, top-5 correct
        self.error_examples: list[dict] = []

    def update(self, table: pa.Table) -> None:
        self.images += table.num_rows
        err = table["error"]
        # An error is a non-empty reason: counted from the values, not from null counts,
        # so that an empty string from any reader can never count as an error.
        failed = pc.fill_null(pc.not_equal(err, ""), False)
        n_failed = int(pc.sum(failed).as_py() or 0)
        self.errors += n_failed
        if n_failed and len(self.error_examples) < 5:
            for p, e in zip(table["path"].to_pylist(), err.to_pylist(), strict=True):
                if e and len(self.error_examples) < 5:
                    self.error_examples.append({"path": p, "error": e})
        scored = pc.is_valid(table["correct_top1"]).to_numpy(zero_copy_only=False)
        if not scored.any():
            return
        labels = pc.fill_null(table["label"], 0).to_numpy(zero_copy_only=False)[scored]
        c = len(self.classes)
        for row, col in ((1, "correct_top1"), (2, "correct_top5")):
            hit = pc.fill_null(table[col], False).to_numpy(zero_copy_only=False)[scored]
            self.per_class[row] += np.bincount(labels[hit.astype(bool)], minlength=c)
        self.per_class[0] += np.bincount(labels, minlength=c)

    def result(self) -> dict:
        labelled = int(self.per_class[0].sum())
        out = {"images": self.images, "errors": self.errors, "labelled": labelled,
               "error_examples": self.error_examples}
        if labelled:
            out["top1_accuracy"] = float(self.per_class[1].sum() / labelled)
            out["top5_accuracy"] = float(self.per_class[2].sum() / labelled)
        return out

    def per_class_rows(self) -> list[dict]:
        """One row per class that had labelled, predicted images."""
        rows = []
        for c in self.classes:
            n, t1, t5 = (int(v) for v in self.per_class[:, c["index"]])
            if n:
                rows.append({"index": c["index"], "wnid": c["wnid"], "name": c["name"],
                             "images": n, "top1_correct": t1, "top5_correct": t5,
                             "top1_accuracy": t1 / n, "top5_accuracy": t5 / n})
        return rows


def _write_file(ds, out: Path, fmt: str, summary: Summary) -> list[tuple[float, int]]:
    """Stream every batch to one file through the driver; the file appears atomically.
    Returns (arrival time, rows so far) per batch, to tell start-up from throughput."""
    import pyarrow.csv as pcsv

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer = None
    arrivals: list[tuple[float, int]] = []
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if table.num_rows == 0:
                continue
            arrivals.append((time.time(), summary.images + table.num_rows))
            table = table.cast(SCHEMA)
            summary.update(table)
            if fmt == "csv":
                table = csv_columns(table)
                writer = writer or pcsv.CSVWriter(str(tmp), table.schema)
            else:
                writer = writer or pq.ParquetWriter(str(tmp), SCHEMA)
            writer.write_table(table)
        if writer is None:  # no rows at all still gives a readable, empty file
            writer = pq.ParquetWriter(str(tmp), SCHEMA) if fmt == "parquet" else None
            if writer is None:
                tmp.write_text("")
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    return arrivals


def check_output(cfg: InferConfig, mode: str) -> None:
    """Before the model is fetched and Ray starts: a local --output must be new (or
    --overwrite given, for a file as for a directory) and its folder writable, tried with a
    real file (os.access says yes to root on a read-only mount). Remote URIs are left to
    the writer."""
    if "://" in cfg.output:
        return
    out = Path(cfg.output)
    if mode == "file":
        if out.is_dir():
            raise InferError(f"--output {out} is a directory; name a new .parquet/.csv file "
                             "or drop the extension to write a directory of files")
        if out.exists() and not cfg.overwrite:
            raise InferError(f"--output {out} exists; pass --overwrite to replace it or "
                             "choose another file")
    else:
        if out.is_file():
            raise InferError(f"--output {out} is a file; a directory output needs a new or "
                             "empty directory (or a .parquet/.csv name for one file)")
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise InferError(f"--output {out} exists and is not empty; pass --overwrite or "
                             "choose another directory")
    if out.parent.exists() and not out.parent.is_dir():
        raise InferError(f"cannot write --output {out}: {out.parent} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe-"):
            pass
    except OSError as exc:
        raise InferError(f"cannot write --output {out}: {exc.strerror or exc} in "
                         f"{out.parent}; choose another --output") from None


def _write_dir(ds, out: str, fmt: str, overwrite: bool, summary: Summary) -> None:
    """Ray workers write the files in parallel; then the small columns are read back for
    the summary (a few MB per million rows). Local directories appear atomically."""
    import pyarrow.dataset as pads

    local = "://" not in out
    target = out
    if local:
        final = Path(out)
        if final.exists() and any(final.iterdir()) and not overwrite:
            raise InferError(f"--output {out} exists and is not empty; pass --overwrite or "
                             "choose another directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        target = str(final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"))
    try:
        if fmt == "csv":
            ds.map_batches(csv_columns, batch_format="pyarrow", batch_size=None).write_csv(target)
        else:
            ds.write_parquet(target)
        cols = ["path", "label", "error", "correct_top1", "correct_top5"]
        schema = pa.schema([SCHEMA.field(c) for c in cols])
        file_format = fmt
        if fmt == "csv":  # types as written, not guessed per file (an all-empty column)
            import pyarrow.csv as pcsv

            # The writer quotes every string and leaves a null as a bare empty field, so the
            # read-back tells them apart: a bare empty `error` is null (no error). Without
            # this every row read back as an error with an empty reason.
            file_format = pads.CsvFileFormat(convert_options=pcsv.ConvertOptions(
                column_types={f.name: f.type for f in schema}, strings_can_be_null=True,
                quoted_strings_can_be_null=False))
        data = pads.dataset(target, format=file_format)
        for batch in data.to_batches(columns=cols):
            summary.update(pa.Table.from_batches([batch]).cast(schema))
    except BaseException:
        if local:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if local:
        if Path(out).exists():
            shutil.rmtree(out)
        os.replace(target, out)


# --------------------------------------------------------------------------- MLflow
def log_evaluation(cfg: InferConfig, refs: list[ModelRef], result: dict,
                   per_class: list[dict], source: dict) -> str:
    """An evaluation run: tags naming the model version(s) and training run(s), metrics
    (accuracy linked to the model in MLflow 3's model view), the per-class accuracy table
    and the summary as artifacts. Returns the run id."""
    import mlflow

    from pipelines import config as C
    from pipelines.train.tracking import setup_mlflow

    setup_mlflow()
    mlflow.set_experiment(cfg.experiment)

    def joined(attr: str) -> str:
        return ",".join(str(getattr(r, attr) or "") for r in refs)

    label = " + ".join(f"{r.name}/{r.version}" if r.version else r.uri for r in refs)
    tags = {"evaluation": "batch-infer", "model.uri": joined("uri"),
            "model.name": joined("name"), "model.version": joined("version"),
            "model.run_id": joined("run_id"), "input": cfg.input, "input.kind": source["kind"],
            "ten_crop": str(cfg.ten_crop), "ensemble_size": str(len(refs))}
    if "manifest_sha256" in source:
        tags["dataset.manifest_sha256"] = source["manifest_sha256"]
    metrics = {k: float(result[k]) for k in ("images", "errors", "labelled", "images_per_s")}
    for k in ("top1_accuracy", "top5_accuracy"):
        if k in result:
            metrics[k] = result[k]
            metrics[k.replace("accuracy", "error")] = 1.0 - result[k]
    # Linking metrics to the LoggedModel puts them on the model's page; an ensemble's numbers
    # belong to no single model, so they stay on the run (the tags still name every member).
    model_id = refs[0].model_id if len(refs) == 1 else None
    with mlflow.start_run(run_name=f"eval {label}") as run:
        mlflow.set_tags(tags)
        mlflow.log_params({k: str(v)[:500] for k, v in C.flatten(cfg).items()})
        mlflow.log_metrics(metrics, model_id=model_id)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "per_class_accuracy.csv").write_text(per_class_csv(per_class))
            (Path(tmp) / "summary.json").write_text(json.dumps(result, indent=1, default=str))
            mlflow.log_artifacts(tmp)
        return run.info.run_id


# --------------------------------------------------------------------------- the job
def _check_resources(cfg: InferConfig, ray) -> None:
    res = ray.cluster_resources()
    if cfg.gpu and res.get("GPU", 0) < 1:
        raise InferError("--gpu: the Ray cluster has no GPU (ray.cluster_resources() lists "
                         "none); drop --gpu or connect to a cluster with GPUs (RAY_ADDRESS)")
    need = max(cfg.actors, cfg.max_actors) * cfg.cpus_per_actor
    if need + 1 > res.get("CPU", 0):
        raise InferError(f"{max(cfg.actors, cfg.max_actors)} actors x {cfg.cpus_per_actor} CPUs "
                         f"leave no CPU for decoding on a cluster of {res.get('CPU', 0):g} CPUs; "
                         "lower --actors/--max-actors or --cpus-per-actor")


def _check_config(cfg: InferConfig) -> None:
    if not cfg.input:
        raise InferError("--input is required: a folder of images, a preprocess OUT, an "
                         "images-list file or a .parquet/.csv file with a path column")
    if "://" not in cfg.input and not Path(cfg.input).exists():
        raise InferError(f"input {cfg.input} does not exist (expected a folder of images, a "
                         "preprocess OUT, an images-list file or a .parquet/.csv file)")
    if cfg.batch_size < 1:
        raise InferError("--batch-size must be at least 1")
    for name in ("actors", "max_actors", "cpus_per_actor"):
        if getattr(cfg, name) < 0:
            raise InferError(f"--{name.replace('_', '-')} must be 0 (automatic) or more")
    if cfg.max_actors and cfg.max_actors < cfg.actors:
        raise InferError("--max-actors must be 0 (a fixed pool of --actors) or >= --actors")


# Auto layout on a local Ray, at most this many actors: each holds its own copy of the model
# (~240 MB of weights, ~475 MB PSS measured), and beyond a few actors more threads per actor
# cost less memory for the same cores.
MAX_AUTO_ACTORS = 4


def local_ray_cpus() -> int:
    """Logical CPUs of the local Ray batch-infer starts itself: the cores plus one. The model
    actors get every core and one decode task at a time runs beside them. Decoding costs a
    tenth of the model's CPU per image (2.2 against ~20 ms on one thread, measured), so a
    whole core of its own would leave most of that core idle (2-core machine, end to end
    against the bare loop: 1 actor x 1 thread 0.60-0.63x, 2 actors x 1 thread beside the
    decode tasks 0.88-0.92x, median 0.92x of five runs; benchmarks/batch_infer.py)."""
    return (os.cpu_count() or 1) + 1


def actor_layout(cfg: InferConfig, local: bool, gpus: float,
                 images: int | None = None) -> InferConfig:
    """cfg with --actors/--cpus-per-actor of 0 (automatic) made concrete. On the local Ray
    batch-infer started (`local`): one actor a core, at most MAX_AUTO_ACTORS, the cores
    shared out as their threads; with --gpu, one actor a GPU and a thread each. On a cluster
    nothing is known of the nodes' sizes here: 1 actor of 1 CPU, unless flags say more.
    Never more automatic actors than `images` make batches: an actor with no batch to run
    would only load the model (and hold its threads from the one that works)."""
    cores = os.cpu_count() or 1
    actors = cfg.actors or (max(1, int(gpus)) if cfg.gpu and local
                            else min(MAX_AUTO_ACTORS, cores) if local else 1)
    if not cfg.actors and images is not None:
        actors = max(1, min(actors, -(-images // cfg.batch_size)))
    if cfg.max_actors:
        actors = min(actors, cfg.max_actors)
    threads = cfg.cpus_per_actor or (max(1, cores // actors) if local and not cfg.gpu else 1)
    return dataclasses.replace(cfg, actors=actors, cpus_per_actor=threads)


def run_batch_infer(cfg: InferConfig) -> dict:
    """Run inference; writes cfg.output and returns counts, accuracy and where things went."""
    import ray

    started = time.time()
    _check_config(cfg)
    mode, fmt = output_plan(cfg)
    check_output(cfg, mode)
    refs_given = [cfg.model] if isinstance(cfg.model, str) else list(cfg.model or [DEFAULT_MODEL])
    # Downloaded models live in `tmp` until the job ends: actors on this node read them there.
    with tempfile.TemporaryDirectory(prefix="alexnet-infer-") as tmp:
        refs = resolve_models(refs_given, tmp)
        infos = [read_info(r.bundle) for r in refs]
        classes = infos[0]["classes"]
        geometries = sorted({geometry(i) for i in infos})
        inputs, source = list_inputs(cfg.input, cfg.split, classes, cfg.path_column,
                                     cfg.label_column)

        t = time.time()
        local = init_ray(lean=True, local_cpus=local_ray_cpus(), log_to_driver=False)
        ray_start_s = time.time() - t
        cfg = actor_layout(cfg, local, ray.cluster_resources().get("GPU", 0), inputs.num_rows)
        _check_resources(cfg, ray)
        ship = len([n for n in ray.nodes() if n.get("Alive")]) > 1
        sources = [_model_source(r, ship) for r in refs]
        model_uri = " + ".join(r.uri for r in refs)
        versions = [r.version for r in refs]
        model_version = " + ".join(v or "" for v in versions) if any(versions) else None

        # from_blocks: block metadata computed here; from_arrow runs one remote task per block
        # for it (32 tasks and ~2 s before the first decode for 2,000 images on 2 CPUs).
        block = cfg.batch_size
        ds = ray.data.from_blocks([inputs.slice(o, block)
                                   for o in range(0, inputs.num_rows, block)])
        # Decoding stays in tasks, apart from the model actors: Ray Data fuses the two
        # (decode inside the actors) when their resource requests match, and then decoding
        # could not use CPUs beyond the actors'. The decode tasks' memory request (a real
        # estimate: a decoded photo and its crops, with headroom, per image) makes them differ.
        crop_bytes = sum(3 * s * s for _, s in geometries) * (10 if cfg.ten_crop else 1)
        ds = ds.map_batches(load_crops, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_kwargs={"geometries": geometries, "ten_crop": cfg.ten_crop,
                                       "label_map": source.get("label_map")},
                            memory=cfg.batch_size * (crop_bytes + DECODED_IMAGE_BYTES))
        pool = (ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors)
                if cfg.max_actors > cfg.actors else ray.data.ActorPoolStrategy(size=cfg.actors))
        ds = ds.map_batches(Predictor, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={
                                "sources": sources, "model_uri": model_uri,
                                "model_version": model_version, "gpu": cfg.gpu,
                                "amp": cfg.amp, "threads": cfg.cpus_per_actor},
                            compute=pool, num_cpus=cfg.cpus_per_actor,
                            num_gpus=1 if cfg.gpu else 0)
        summary = Summary(classes)
        arrivals: list[tuple[float, int]] = []
        if mode == "file":
            arrivals = _write_file(ds, Path(cfg.output), fmt, summary)
        else:
            _write_dir(ds, cfg.output, fmt, cfg.overwrite, summary)
    ended = time.time()  # the last row: the steady rate below ends here
    stop_local_ray(local)
    seconds = time.time() - started
    result = {"output": cfg.output, "output_mode": mode, "format": fmt, **summary.result(),
              "seconds": round(seconds, 2), "images_per_s": round(summary.images / seconds, 2),
              "model": model_uri, "model_version": model_version, "input_kind": source["kind"],
              "actors": cfg.actors, "cpus_per_actor": cfg.cpus_per_actor,
              "ray_start_s": round(ray_start_s, 2)}
    if arrivals:
        # Start-up (listing, worker and actor start, model load, first batch) apart from the
        # rate once rows flow, taken over the second half of the rows (batches arrive in
        # bursts at first, while the actors catch up with decoded inputs queued for them).
        result["first_rows_s"] = round(arrivals[0][0] - started, 2)
        t_half, n_half = next(a for a in arrivals if a[1] >= summary.images / 2)
        if ended > t_half and summary.images > n_half:
            result["steady_images_per_s"] = round(
                (summary.images - n_half) / (ended - t_half), 2)
    if "label_note" in source:
        result["label_note"] = source["label_note"]
    result["per_class"] = summary.per_class_rows()
    if cfg.log_to_mlflow:
        result.update(_log_evaluation_or_keep(cfg, refs, result, source))
    return result


def _log_evaluation_or_keep(cfg: InferConfig, refs: list[ModelRef], result: dict,
                            source: dict) -> dict:
    """Log the evaluation run; when MLflow cannot take it, the predictions are written all
    the same: keep the summary beside them (to log later) and return a warning instead of
    failing a job whose work is done."""
    from pipelines.train.journal import short_requests

    summary = {k: v for k, v in result.items() if k != "per_class"}
    try:
        with short_requests():  # a small run: minutes of retries would help no one
            return {"mlflow_run_id": log_evaluation(cfg, refs, summary, result["per_class"],
                                                    source)}
    except Exception as exc:  # noqa: BLE001 - tracking is a side channel of a finished job
        out = Path(cfg.output)
        kept = out / "summary.json" if out.is_dir() else out.with_name(out.name +
                                                                        ".summary.json")
        kept.write_text(json.dumps({**summary, "per_class": result["per_class"]}, indent=1,
                                   default=str))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return {"mlflow_warning": f"the evaluation run could not be logged to MLflow "
                                  f"({first}); predictions are in {cfg.output} and the "
                                  f"summary in {kept}, to log later"}


PER_CLASS_FIELDS = ["index", "wnid", "name", "images", "top1_correct", "top5_correct",
                    "top1_accuracy", "top5_accuracy"]


def per_class_csv(rows: list[dict]) -> str:
    """The per-class table as CSV text (what --log-to-mlflow stores as an artifact)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PER_CLASS_FIELDS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
