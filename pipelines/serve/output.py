"""Where `batch-infer` writes: one .parquet/.csv file (written by the driver) or a directory
(files written in parallel), the output schema, and the running summary (accuracy,
per-class counts, errors) counted from the rows as they arrive.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import InferConfig
from pipelines.files import atomic_path
from pipelines.serve.predict import (
    InferError,
)

FILE_OUTPUTS = {".parquet": "parquet", ".csv": "csv"}

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


def write_file(ds, out: Path, fmt: str, summary: Summary) -> None:
    """Stream every batch to one file through the driver; the file appears atomically."""
    import pyarrow.csv as pcsv

    writer = None
    with atomic_path(out) as tmp:
        try:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if table.num_rows == 0:
                    continue
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


def write_dir(ds, out: str, fmt: str, overwrite: bool, summary: Summary) -> None:
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

PER_CLASS_FIELDS = ["index", "wnid", "name", "images", "top1_correct", "top5_correct",
                    "top1_accuracy", "top5_accuracy"]


def per_class_csv(rows: list[dict]) -> str:
    """The per-class table as CSV text (what --log-to-mlflow stores as an artifact)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PER_CLASS_FIELDS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
