"""Shards on a cluster without a shared filesystem: copy them to local disk once per node.

    from pipelines.data.shard_cache import localize
    out, report = localize("s3://bucket/imagenet-shards", "/mnt/local-ssd/shard-cache",
                           splits=("train", "val"))
    # `out` is a local preprocess OUT (manifest.json + shards): read it as usual.

Why: training reads records at random (a per-epoch permutation), which object stores and
network filesystems serve slowly; a node-local copy turns every read into a local page-cache
hit. Copying a whole shard is one sequential read, and each node copies it once for all its
training workers and all epochs.

- `source`: a preprocess OUT as a local/NFS path or any pyarrow filesystem URI
  (`s3://`, `gs://`, `hdfs://`, `file://`); its manifest.json says which shards exist, with
  their size and sha256.
- The copy goes to `cache_dir/<first 16 hex of the manifest's sha256>/`: content-addressed,
  so a re-preprocessed dataset never mixes with an older cached one.
- Every shard is streamed to a temp file, its sha256 checked against the manifest, then
  renamed into place: a shard in the cache is always complete and verified; a corrupt or
  truncated source shard is an error, never a silent bad copy.
- Concurrent callers on one node (several Ray Train workers) serialise on a file lock: the
  first copies, the others wait and find the shards there. The manifest is written last, so
  its presence in the cache means the listed splits are complete (the same contract as a
  preprocess OUT).
- Disk space is checked before copying; shards already cached are not copied again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from pipelines import files
from pipelines.files import atomic_path, atomic_write

MANIFEST = "manifest.json"
CHUNK = 8 << 20  # 8 MiB reads: large enough for object-store throughput, small in memory


class ShardCacheError(RuntimeError):
    """The cache cannot be filled; the message says why and what to do."""


def _copy_verified(filesystem, src: str, dst: Path, sha256: str | None) -> int:
    """Stream src to dst (temp file + rename), checking the sha256; returns bytes copied."""
    digest = hashlib.sha256()
    size = 0
    with atomic_path(dst) as tmp:
        with filesystem.open_input_stream(src) as stream, open(tmp, "wb") as out:
            while block := stream.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
        if sha256 and digest.hexdigest() != sha256:
            raise ShardCacheError(f"{src}: sha256 {digest.hexdigest()[:16]}... does not match "
                                  f"the manifest's {sha256[:16]}...; the source is corrupt or "
                                  f"was rewritten: re-run preprocess")
    return size


def localize(source: str, cache_dir: str | os.PathLike,
             splits: Iterable[str] = ("train", "val")) -> tuple[str, dict]:
    """Copy `splits` of the preprocess OUT at `source` into `cache_dir` (once per node).

    Returns (local OUT path, report) where report says what was copied and reused:
    {"source", "path", "shards", "copied", "reused", "bytes_copied", "seconds"}."""
    t0 = time.perf_counter()
    filesystem, base = files.filesystem(source)
    manifest_text = files.read_text(filesystem, f"{base.rstrip('/')}/{MANIFEST}")
    manifest = json.loads(manifest_text)
    digest = hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()
    target = Path(cache_dir) / digest[:16]
    target.mkdir(parents=True, exist_ok=True)

    wanted = [s for split in splits if split in manifest.get("splits", {})
              for s in manifest["splits"][split]["shards"]]
    report = {"source": source, "path": str(target), "shards": len(wanted), "copied": 0,
              "reused": 0, "bytes_copied": 0}
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others wait here
        missing = [s for s in wanted if not _cached(target / s["path"], s)]
        need = sum(int(s.get("bytes", 0)) for s in missing)
        free = shutil.disk_usage(target).free
        if need and need > free * 0.95:
            raise ShardCacheError(f"{target}: {need / 2**30:.1f} GiB of shards to cache, "
                                  f"{free / 2**30:.1f} GiB free; use a bigger --cache-dir disk "
                                  f"or read the shards from shared storage")
        for shard in missing:
            dst = target / shard["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            report["bytes_copied"] += _copy_verified(
                filesystem, f"{base.rstrip('/')}/{shard['path']}", dst, shard.get("sha256"))
            report["copied"] += 1
        report["reused"] = len(wanted) - len(missing)
        manifest_path = target / MANIFEST
        if not manifest_path.exists() or manifest_path.read_text() != manifest_text:
            atomic_write(manifest_path, manifest_text)  # last: its presence means complete
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return str(target), report


def _cached(path: Path, shard: dict) -> bool:
    """A shard is in the cache when a file of the manifest's size is there: only verified
    copies are ever renamed into place, so the size check is enough on the hot path."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return "bytes" not in shard or size == int(shard["bytes"])
