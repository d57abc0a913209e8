"""Files, shared by every stage: atomic writes on a local disk, and a few calls on any
pyarrow filesystem (a local path, `s3://`, `gs://`, `hdfs://`, `file://`)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """A hidden temp path beside `path` to write; when the block ends without an error it is
    flushed to disk (`fsync`) and renamed over `path`, so readers see the old file or the
    whole new one, never a part (rename is atomic within one filesystem). On an error the
    temp file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync and tmp.is_file():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path (made absolute) or any filesystem URI
    pyarrow resolves; S3 options go in the query string
    (`s3://bucket/dir?endpoint_override=minio:9000`)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(fs, path: str) -> str:
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


def write_text(fs, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(text.encode("utf-8"))
