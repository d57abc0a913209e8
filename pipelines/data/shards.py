"""The shard format: LMDB files of pickle-free records, and the manifest that lists them.

The manifest and the record format are described in docs/data-format.md, the one place they
are written down; this module is the code that writes and reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from pipelines.files import atomic_path

MAGIC = b"AXR1"
HEADER = struct.Struct("<4sBBHiIII")
ENCODINGS = {"jpeg": 0, "raw": 1}
ENCODING_NAMES = {v: k for k, v in ENCODINGS.items()}
META_KEY = b"__meta__"
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
FORMAT_VERSION = "alexnet-lmdb/1"
# Virtual address space only: LMDB files grow with the data, not with map_size.
MAP_SIZE = 1 << 40


class RecordError(ValueError):
    """A record whose bytes are not what its header says (corrupt or foreign data)."""


@dataclass(frozen=True)
class Record:
    label: int
    height: int
    width: int
    encoding: str
    path: str
    image: bytes


def record_key(index: int) -> bytes:
    return b"%010d" % index


def pack_record(label: int, height: int, width: int, encoding: str, path: str,
                image: bytes) -> bytes:
    path_b = path.encode("utf-8")
    header = HEADER.pack(MAGIC, ENCODINGS[encoding], 0, len(path_b), label, height, width,
                         zlib.crc32(image))
    return header + path_b + image


def unpack_record(value: bytes, verify: bool = True) -> Record:
    if len(value) < HEADER.size:
        raise RecordError(f"record of {len(value)} bytes is shorter than the header")
    magic, enc, _, path_len, label, height, width, crc = HEADER.unpack_from(value)
    if magic != MAGIC or enc not in ENCODING_NAMES:
        raise RecordError(f"bad record header (magic {magic!r}, encoding {enc})")
    start = HEADER.size + path_len
    path = bytes(value[HEADER.size:start]).decode("utf-8", errors="replace")
    image = bytes(value[start:])
    if verify and zlib.crc32(image) != crc:
        raise RecordError(f"CRC mismatch for {path}")
    return Record(label, height, width, ENCODING_NAMES[enc], path, image)


def decode_image(rec: Record) -> np.ndarray:
    """The record's image as an RGB uint8 array (H, W, 3)."""
    import cv2  # only readers that decode need OpenCV

    if rec.encoding == "raw":
        arr = np.frombuffer(rec.image, dtype=np.uint8)
        if arr.size != rec.height * rec.width * 3:
            raise RecordError(f"raw record {rec.path}: {arr.size} bytes, header says "
                              f"{rec.height}x{rec.width}x3")
        return arr.reshape(rec.height, rec.width, 3)
    # RGB straight from libjpeg: a numpy [:, :, ::-1] copy would cost more than the decode.
    rgb = cv2.imdecode(np.frombuffer(rec.image, dtype=np.uint8),
                       cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if rgb is None:
        raise RecordError(f"JPEG record {rec.path} does not decode")
    return rgb


_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_PID = os.getpid()


def open_shard(path: str | os.PathLike) -> lmdb.Environment:
    """A finished shard, opened read-only and lock-free, once per process.

    LMDB must not use an environment across fork() and py-lmdb refuses a second open of the
    same file in one process, so the cache is per process: a forked child (a DataLoader
    worker) closes what it inherited, which for lock-free read-only environments only unmaps
    the child's copy, and opens its own."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    key = os.path.abspath(path)
    env = _ENVS.get(key)
    if env is None:
        env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=2048)
        _ENVS[key] = env
    return env


class ShardReader:
    """Random access to one shard's records; cheap to make, safe to pass to other processes
    (it holds only the path; the LMDB handle comes from `open_shard` in each process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.records = int(self.meta()["records"])

    def meta(self) -> dict:
        with open_shard(self.path).begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            raise RecordError(f"{self.path}: no {META_KEY.decode()} key; not a finished shard")
        return json.loads(raw)

    def raw(self, index: int) -> bytes:
        with open_shard(self.path).begin(buffers=False) as txn:
            value = txn.get(record_key(index))
        if value is None:
            raise RecordError(f"{self.path}: record {index} missing")
        return value

    def __len__(self) -> int:
        return self.records

    def __getitem__(self, index: int) -> Record:
        return unpack_record(self.raw(index))


def write_shard(path: str | os.PathLike, values, meta: dict, chunk: int = 1024) -> str:
    """Write a finished shard atomically (tmp file + rename) and return its sha256.

    `values` is a list of record values, or any iterable of lists (chunks) of them. A
    transaction is committed every `chunk` records: LMDB holds a write transaction's dirty
    pages in memory, so one transaction per shard would cost a shard's size of RAM. Records
    are appended in order, so the same records give the same file bytes on every run."""
    chunks = [values] if isinstance(values, list) else values
    n = 0
    # No lock file (lock=False): the temp file has one writer and no reader before the rename.
    with atomic_path(path, fsync=False) as tmp:
        # meminit=True zeroes unused page space, so the same records give the same file bytes
        # (and sha256) on every run.
        env = lmdb.open(str(tmp), subdir=False, map_size=MAP_SIZE, lock=False, sync=False,
                        metasync=False, meminit=True)
        try:
            for part in chunks:
                for start in range(0, len(part), chunk):
                    with env.begin(write=True) as txn:
                        for value in part[start:start + chunk]:
                            txn.put(record_key(n), value, append=True)
                            n += 1
            with env.begin(write=True) as txn:
                txn.put(META_KEY, json.dumps({**meta, "records": n}).encode())
            env.sync(True)  # data on disk before the rename makes the shard visible
        finally:
            env.close()
    return file_sha256(path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def not_an_output(out: str | os.PathLike) -> str:
    """Why `out` (which has no manifest.json) is no finished preprocess OUT, and what to run:
    a missing path, an interrupted preprocess (its preprocess.json names the command that
    finishes it) or something else, such as the source dataset itself."""
    out = Path(out)
    if not out.exists():
        return (f"{out} does not exist; make it with `python workflow.py preprocess "
                f"--source SRC --out {out}`")
    if (out / "preprocess.json").is_file():
        from pipelines.data.output import resume_command  # preprocess imports this module

        return (f"{out} is an unfinished preprocess OUT (no {MANIFEST}: the run was stopped "
                f"before the end); finish it with the same command, which keeps the "
                f"finished shards: `{resume_command(out)}`")
    return (f"{out} has no {MANIFEST}, so it is not the OUT of a preprocess run; for a source "
            f"dataset, run `python workflow.py preprocess --source {out} --out OUT` and use OUT")


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of a preprocessed OUT, or a clear error saying what to run."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(not_an_output(out))
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this code reads "
                         f"{FORMAT_VERSION!r}; re-run preprocess with --overwrite")
    return manifest


def manifest_digest(out: str | os.PathLike) -> str:
    """sha256 of manifest.json: names the exact dataset a model was trained on."""
    return file_sha256(Path(out) / MANIFEST)


def split_readers(out: str | os.PathLike, manifest: dict, split: str) -> list[ShardReader]:
    shards = manifest["splits"][split]["shards"]
    return [ShardReader(Path(out) / s["path"]) for s in shards]
