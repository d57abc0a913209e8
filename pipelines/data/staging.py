"""Staging pieces and the shard commit of `preprocess`.

A decode task writes its rows of each shard as one atomic piece file under
OUT/SPLIT/.staging/shard-NNNNN/, named by the positions it holds, so a retried task adds
nothing twice. When every position of a shard is staged, `finalize_shard` writes the LMDB
file atomically, then its JSON sidecar (the commit record), and drops the pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from pipelines.data.output import say
from pipelines.data.shards import write_shard
from pipelines.files import atomic_path, atomic_write

STAGING = ".staging"

# --------------------------------------------------------------------------- staging
# A decode task writes what it made for each shard it touched as one "piece" file in
# OUT/<split>/.staging/shard-NNNNN/, written to a temporary name and renamed: a piece is whole
# or absent, whatever is killed when. The task writes it itself, so the encoded images never
# travel through the object store to a separate write task (measured: that cost 1 ms CPU an
# image and a second process, 0.39x of the plain loop). A piece holds no pickle:
#
#     b"AXP2"  u32 header length  header JSON  int64[n, 13] moments  record bytes...  u32 CRC
#
# header: positions in the shard, byte length of each record (0 = quarantined) and the
# quarantine entries; moments: per record, the pixel sums (3), outer products (9), pixel count;
# CRC: CRC32 of everything before it. A piece is not fsynced: after a killed process the
# page cache still holds it, and after a machine crash a piece the kernel had not written
# out fails its length or CRC check and its rows are processed again. The fsync was ~50 ms
# of idle core per task (1.5 % of the job); the shard commit fsyncs what is kept.
PIECE_MAGIC = b"AXP2"

MOMENTS = 13


def stage_dir(out: Path, split: str, shard: int) -> Path:
    return out / split / STAGING / f"shard-{shard:05d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.lmdb"


def sidecar_path(out: Path, split: str, shard: int) -> Path:
    return out / f"{shard_name(split, shard)}.json"


def shard_sizes(n: int, num_shards: int) -> list[int]:
    """Records a shard gets when n images are cut into num_shards (differ by at most one)."""
    return [len(c) for c in np.array_split(np.arange(n), num_shards)] if num_shards else []


def write_piece(out: Path, split: str, shard: int, rows: dict[str, np.ndarray]) -> Path:
    """Stage one shard's rows of a batch (see above). Named by its positions, so a retried
    task rewrites the same file with the same bytes instead of adding a second copy."""
    pos = np.asarray(rows["pos"], np.int64)
    values = rows["value"]
    lengths = [len(v) for v in values]
    quarantine = [{"pos": int(pos[i]), "path": str(rows["path"][i]),
                   "reason": str(rows["reason"][i])} for i in range(len(pos)) if not lengths[i]]
    header = json.dumps({"split": split, "shard": shard, "positions": pos.tolist(),
                         "lengths": lengths, "quarantine": quarantine}).encode()
    moments = np.concatenate([np.asarray(rows["sum"], np.int64).reshape(-1, 3),
                              np.asarray(rows["outer"], np.int64).reshape(-1, 9),
                              np.asarray(rows["pixels"], np.int64).reshape(-1, 1)], axis=1)
    folder = stage_dir(out, split, shard)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pos.min():010d}-{pos.max():010d}-{len(pos)}.piece"
    crc = 0
    # No fsync: a piece lost in a crash is staged again by the resumed run (its positions
    # are missing); the shard built from the pieces is synced before it is committed.
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as fh:
        for part in (PIECE_MAGIC + len(header).to_bytes(4, "little") + header,
                     np.ascontiguousarray(moments, "<i8").tobytes(), *values):
            if part:
                fh.write(part)
                crc = zlib.crc32(part, crc)
        fh.write(crc.to_bytes(4, "little"))
    return path


def read_piece(path: Path) -> tuple[dict, np.ndarray, int]:
    """(header, moments, offset of the first record) of a piece; ValueError if it is not a
    whole piece (a foreign, cut short or damaged file: its rows are simply staged again).
    Reads the whole piece to check its CRC: ~10 ms for 1,024 records in the page cache. The
    commit then reads the records a second time, 1,024 at a time, rather than keep a
    shard's pieces (~270 MB) in memory between the two reads."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 12 or data[:4] != PIECE_MAGIC:
        raise ValueError(f"{path}: not a staging piece")
    if zlib.crc32(memoryview(data)[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: damaged staging piece (CRC mismatch)")
    size = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + size])
    n = len(header["positions"])
    start = 8 + size + 8 * MOMENTS * n
    moments = np.frombuffer(data, "<i8", MOMENTS * n, 8 + size).reshape(n, MOMENTS).copy()
    if len(data) != start + sum(header["lengths"]) + 4:
        raise ValueError(f"{path}: truncated staging piece")
    return header, moments, start


def _staged(out: Path, split: str, shard: int) -> list[tuple[Path, dict, np.ndarray, int]]:
    """The shard's whole pieces; damaged ones and killed tasks' temporary files are removed
    (their rows count as not staged, so they are done again)."""
    folder = stage_dir(out, split, shard)
    pieces = []
    for path in sorted(folder.glob("*.piece")) if folder.is_dir() else []:
        try:
            pieces.append((path, *read_piece(path)))
        except (ValueError, OSError):
            say(f"dropping damaged staging file {path}; its images are processed again")
            path.unlink(missing_ok=True)
    return pieces


def staged_positions(out: Path, split: str, shard: int) -> np.ndarray:
    """Positions already staged for an unfinished shard (a killed run's work, not redone)."""
    positions = [np.asarray(h["positions"], np.int64) for _, h, _, _ in _staged(out, split, shard)]
    return np.unique(np.concatenate(positions)) if positions else np.zeros(0, np.int64)


def finalize_shard(out: Path, split: str, shard: int, expected: int) -> dict | None:
    """If the shard's pieces hold all `expected` positions: write the finished shard (records
    in position order, quarantined ones left out), then its sidecar (the commit record), then
    drop the pieces. Returns the sidecar, or None when the shard is incomplete or finished.

    A position staged twice (a task that outlived a killed run) is taken once, with its
    moments once, so the statistics stay exact."""
    if sidecar_path(out, split, shard).exists():
        return None
    where: dict[int, tuple[int, int, int]] = {}  # position -> (piece, offset, length)
    quarantine: dict[int, dict] = {}
    moments = np.zeros(MOMENTS, np.int64)
    pieces = _staged(out, split, shard)
    for k, (_, header, mom, start) in enumerate(pieces):
        bad = {q["pos"]: q for q in header["quarantine"]}
        offset = start
        for i, (p, length) in enumerate(zip(header["positions"], header["lengths"],
                                            strict=True)):
            if p not in where and p not in quarantine:
                if length:
                    where[p] = (k, offset, length)
                    moments += mom[i]
                else:
                    quarantine[p] = {"split": split, "path": bad[p]["path"],
                                     "reason": bad[p]["reason"]}
            offset += length
    if len(where) + len(quarantine) != expected or \
            not all(p in where or p in quarantine for p in range(expected)):
        return None
    final = out / shard_name(split, shard)
    order = sorted(where)
    if not order:
        # Every image of the shard was quarantined (more shards than images that decode,
        # e.g. --shards 50 on 7 images, one broken): the sidecar records that, and no empty
        # LMDB file is written; build_manifest leaves the shard out.
        sidecar = {"path": shard_name(split, shard), "records": 0, "sha256": None, "bytes": 0,
                   "quarantine": [quarantine[p] for p in sorted(quarantine)],
                   "sum": [0] * 3, "outer": [0] * 9, "pixels": 0, "committed_at": time.time()}
        atomic_write(sidecar_path(out, split, shard), json.dumps(sidecar))
        drop_stage(out, split, shard)
        return sidecar
    fds = [os.open(path, os.O_RDONLY) for path, *_ in pieces]
    try:

        def chunks(size: int = 1024):  # a chunk of records in memory at a time
            for c in range(0, len(order), size):
                yield [os.pread(fds[k], length, offset)
                       for k, offset, length in (where[p] for p in order[c:c + size])]

        sha = write_shard(final, chunks(), {"split": split, "shard": shard})
    finally:
        for fd in fds:
            os.close(fd)
    sidecar = {"path": shard_name(split, shard), "records": len(order), "sha256": sha,
               "bytes": final.stat().st_size,
               "quarantine": [quarantine[p] for p in sorted(quarantine)],
               "sum": moments[:3].tolist(), "outer": moments[3:12].tolist(),
               "pixels": int(moments[12]), "committed_at": time.time()}
    atomic_write(sidecar_path(out, split, shard), json.dumps(sidecar))
    drop_stage(out, split, shard)
    return sidecar


def drop_stage(out: Path, split: str, shard: int) -> None:
    shutil.rmtree(stage_dir(out, split, shard), ignore_errors=True)
