"""Preprocess a source dataset into LMDB shards, with mean/std and RGB PCA, on Ray Data.

    python workflow.py preprocess --source data/sample --out data/sample-shards
    python workflow.py preprocess --source SRC --out OUT --dry-run     # plan only, writes nothing
    python workflow.py verify --data data/sample-shards

Stages (one streaming Ray Data pipeline per run, all splits together):
  listing (driver, no stat per file, pipelines/data/sources.py) -> shuffled with --seed and cut
  into near-equal shards -> map_batches(read -> decode -> rescale -> encode + exact pixel
  moments -> stage), parallel tasks on every node, each writing its rows of each shard as
  one atomic "piece" file (named by its positions, so a retried task adds nothing twice) ->
  the driver marks the positions the tasks report and commits every shard whose positions
  are all staged, in a task of its own: a finished, atomic LMDB file, then its JSON sidecar
  (the commit record). Then the driver reads the sidecars and writes quarantine.jsonl and,
  last and atomically, manifest.json: its presence means the data is complete.

Every rejected image lands in quarantine.jsonl with a reason; no single file fails the job.
Problems with the whole input or output (no images, unreadable source, unwritable OUT, disk
full, a source that changed under a half-finished OUT) raise PreprocessError/SourceError
with what to do; `workflow.py` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import PreprocessConfig, to_dict
from pipelines.data import shards as sh
from pipelines.data.decode import DecodeError, crop_box, decode_rgb, encode, pixel_moments, rescale
from pipelines.data.sources import VOC_OBJECT, Listing, list_source
from pipelines.runtime import cluster_cpus, init_ray, stop_local_ray, warm_data_workers

# Bytes per encoded 256x256 record when no sample could be encoded to measure it.
EST_RECORD_BYTES = {"jpeg": 30_000, "raw": 256 * 256 * 3}
SIZE_SAMPLE = 32  # images encoded in the driver to estimate record size (shard planning)
STAGING = ".staging"
BLOCKS_PER_CPU = 4   # at least this many blocks a CPU, so no core idles at the end
TAIL_SPLIT = 4       # the last wave's blocks are cut this many times smaller,
MIN_TAIL_ROWS = 32   # but not below this (~0.1 s of work; a worker waits ~0.08 s between tasks)
LOW_DISK_BYTES = 64 << 20  # under this much free space, a failed write means a full disk
PLAN = "plan.json"


class PreprocessError(RuntimeError):
    """The whole job cannot proceed; the message says what to do."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- map stage
def _read(source: str, rel: str, cropped: bool = False) -> bytes:
    # The records cut from one photo (VOC objects) are named "<photo>#obj<N>" so their source
    # paths stay distinct; the file is the photo.
    if cropped:
        rel = rel.rpartition(VOC_OBJECT)[0] or rel
    with open(os.path.join(source, rel), "rb") as fh:
        return fh.read()


def process_one(data: bytes | None, pixels: bytes | None, resize: int, center_crop: bool,
                encoding: str, quality: int, reduced_decode: bool,
                crop: np.ndarray | None = None) -> tuple[np.ndarray, bytes]:
    """One image's bytes (a file's, or a CIFAR row's CHW pixels) -> (rescaled RGB, encoded).
    `crop`: a box (x0, y0, x1, y1, full-size pixels) cut out, with a margin, before the
    rescale."""
    if pixels is not None:  # CIFAR: 3072 bytes, channel-major 3 x 32 x 32
        rgb = np.frombuffer(pixels, np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    elif crop is not None:
        # Decoded at full size: the box is in full-size pixels, and a reduced decode (sized for
        # the whole photo's shorter side) could leave a small box below --resize.
        rgb = crop_box(decode_rgb(data), crop)
    else:
        rgb = decode_rgb(data, min_side=resize if reduced_decode else 0)
    rgb = rescale(rgb, resize, center_crop)
    return rgb, encode(rgb, encoding, quality)


def process_batch(batch: dict[str, np.ndarray], source: str, resize: int, center_crop: bool,
                  encoding: str, quality: int, reduced_decode: bool = True) -> dict[str, Any]:
    """Read, decode, rescale, encode a batch; a failure becomes a reason, not an error."""
    n = len(batch["path"])
    values, reasons = [b""] * n, [""] * n
    sums = np.zeros((n, 3), np.int64)
    outers = np.zeros((n, 9), np.int64)
    pixels = np.zeros(n, np.int64)
    cifar, crops = batch.get("pixels"), batch.get("crop")
    for i, rel in enumerate(batch["path"]):
        try:
            if cifar is not None:
                rgb, image = process_one(None, bytes(cifar[i]), resize, center_crop, encoding,
                                         quality, reduced_decode)
            else:
                crop = None if crops is None else np.frombuffer(bytes(crops[i]), "<i4")
                rgb, image = process_one(_read(source, str(rel), crop is not None), None,
                                         resize, center_crop, encoding, quality,
                                         reduced_decode, crop)
        except DecodeError as exc:
            reasons[i] = str(exc)
            continue
        except OSError as exc:  # permissions, a folder or a dangling link named *.JPEG, EIO
            reasons[i] = f"unreadable: {exc.strerror or exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder surprise is this file's problem
            reasons[i] = f"decode failed: {type(exc).__name__}: {exc}"
            continue
        values[i] = sh.pack_record(int(batch["label"][i]), rgb.shape[0], rgb.shape[1], encoding,
                                   str(rel), image)
        s, o, p = pixel_moments(rgb)
        sums[i], outers[i], pixels[i] = s, o.reshape(9), p
    # raw CIFAR pixels and crop boxes stop here
    out = {k: v for k, v in batch.items() if k not in ("pixels", "crop")}
    return {**out, "value": np.array(values, dtype=object), "reason": np.array(reasons),
            "sum": sums, "outer": outers, "pixels": pixels}


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


def _stage_dir(out: Path, split: str, shard: int) -> Path:
    return out / split / STAGING / f"shard-{shard:05d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.lmdb"


def _sidecar(out: Path, split: str, shard: int) -> Path:
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
    folder = _stage_dir(out, split, shard)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pos.min():010d}-{pos.max():010d}-{len(pos)}.piece"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    crc = 0
    with open(tmp, "wb") as fh:
        for part in (PIECE_MAGIC + len(header).to_bytes(4, "little") + header,
                     np.ascontiguousarray(moments, "<i8").tobytes(), *values):
            if part:
                fh.write(part)
                crc = zlib.crc32(part, crc)
        fh.write(crc.to_bytes(4, "little"))
    os.replace(tmp, path)
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
    folder = _stage_dir(out, split, shard)
    pieces = []
    for path in sorted(folder.glob("*.piece")) if folder.is_dir() else []:
        try:
            pieces.append((path, *read_piece(path)))
        except (ValueError, OSError):
            _say(f"dropping damaged staging file {path}; its images are processed again")
            path.unlink(missing_ok=True)
    return pieces


def staged_positions(out: Path, split: str, shard: int) -> np.ndarray:
    """Positions already staged for an unfinished shard (a killed run's work, not redone)."""
    found = [np.asarray(h["positions"], np.int64) for _, h, _, _ in _staged(out, split, shard)]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def finalize_shard(out: Path, split: str, shard: int, expected: int) -> dict | None:
    """If the shard's pieces hold all `expected` positions: write the finished shard (records
    in position order, quarantined ones left out), then its sidecar (the commit record), then
    drop the pieces. Returns the sidecar, or None when the shard is incomplete or finished.

    A position staged twice (a task that outlived a killed run) is taken once, with its
    moments once, so the statistics stay exact."""
    if _sidecar(out, split, shard).exists():
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
        _atomic_write(_sidecar(out, split, shard), json.dumps(sidecar))
        _drop_stage(out, split, shard)
        return sidecar
    fds = [os.open(path, os.O_RDONLY) for path, *_ in pieces]
    try:

        def chunks(size: int = 1024):  # a chunk of records in memory at a time
            for c in range(0, len(order), size):
                yield [os.pread(fds[k], length, offset)
                       for k, offset, length in (where[p] for p in order[c:c + size])]

        sha = sh.write_shard(final, chunks(), {"split": split, "shard": shard})
    finally:
        for fd in fds:
            os.close(fd)
    sidecar = {"path": shard_name(split, shard), "records": len(order), "sha256": sha,
               "bytes": final.stat().st_size,
               "quarantine": [quarantine[p] for p in sorted(quarantine)],
               "sum": moments[:3].tolist(), "outer": moments[3:12].tolist(),
               "pixels": int(moments[12]), "committed_at": time.time()}
    _atomic_write(_sidecar(out, split, shard), json.dumps(sidecar))
    _drop_stage(out, split, shard)
    return sidecar


def _drop_stage(out: Path, split: str, shard: int) -> None:
    shutil.rmtree(_stage_dir(out, split, shard), ignore_errors=True)


def stage_batch(batch: dict[str, np.ndarray], out: str, **kwargs) -> dict[str, np.ndarray]:
    """The map stage: process a block (see process_batch) and stage each shard's rows as a
    piece. Returns only which positions it staged: a few bytes a row for the driver, which
    commits each shard as soon as all of its positions are staged."""
    done = process_batch(batch, **kwargs)
    split, shard = done["split"].astype(str), np.asarray(done["shard"], np.int64)
    for s, k in {(a, int(b)) for a, b in zip(split, shard, strict=True)}:
        sel = (split == s) & (shard == k)
        write_piece(Path(out), s, k, {c: done[c][sel] for c in
                                      ("pos", "path", "value", "reason", "sum", "outer",
                                       "pixels")})
    return {"split": split, "shard": shard, "pos": np.asarray(done["pos"], np.int64)}


# --------------------------------------------------------------------------- planning
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def estimate_record_bytes(listing: Listing, split: str, cfg: PreprocessConfig) -> float:
    """Mean record size of up to SIZE_SAMPLE evenly spaced images of the split, encoded here
    with the job's own settings (deterministic: the listing is sorted)."""
    items = listing.splits[split]
    picks = np.unique(np.linspace(0, len(items) - 1, min(SIZE_SAMPLE, len(items))).astype(int))
    sizes = []
    for i in picks:
        rel, _ = items[i]
        try:
            pix = listing.pixels[split][i].tobytes() if split in listing.pixels else None
            crop = listing.crops[split][i] if split in listing.crops else None
            data = None if pix is not None else _read(listing.root, rel, crop is not None)
            _, image = process_one(data, pix, cfg.resize, cfg.center_crop, cfg.encoding,
                                   cfg.quality, cfg.reduced_decode, crop)
            sizes.append(len(image) + sh.HEADER.size + len(rel.encode()))
        except (DecodeError, OSError):
            continue
    if sizes:
        return float(np.mean(sizes))
    return EST_RECORD_BYTES[cfg.encoding] * (cfg.resize / 256) ** 2


def plan_shards(n: int, cfg: PreprocessConfig, record_bytes: float | None = None) -> int:
    """Shards for a split of n images: --shards, or enough to keep each near --shard-size MB."""
    if cfg.shards > 0:
        return max(1, min(cfg.shards, n))
    if record_bytes is None:
        record_bytes = EST_RECORD_BYTES[cfg.encoding] * (cfg.resize / 256) ** 2
    est = n * record_bytes
    return max(1, min(n, math.ceil(est / (cfg.shard_size * 1e6))))


def assign_shards(items: list[tuple[str, int]], num_shards: int, seed: int,
                  split: str, pixels: np.ndarray | None = None,
                  crops: np.ndarray | None = None) -> pa.Table:
    """Shuffle with the seed (training reads shards in order, so the order is decided here)
    and cut into `num_shards` near-equal contiguous shards (sizes differ by at most one)."""
    order = np.random.default_rng([seed, sum(split.encode())]).permutation(len(items))
    shard_of = np.empty(len(items), np.int64)
    pos = np.empty(len(items), np.int64)
    sizes = np.empty(len(items), np.int64)
    for s, chunk in enumerate(np.array_split(np.arange(len(items)), num_shards)):
        shard_of[chunk], pos[chunk], sizes[chunk] = s, np.arange(len(chunk)), len(chunk)
    columns = {"split": [split] * len(items), "shard": shard_of, "pos": pos,
               "shard_size": sizes, "path": [items[i][0] for i in order],
               "label": [items[i][1] for i in order]}
    if pixels is not None:  # CIFAR rows carry their pixels (3072 bytes each)
        flat = np.ascontiguousarray(pixels[order])
        columns["pixels"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(flat.shape[1]), len(items), [None, pa.py_buffer(flat.tobytes())])
    if crops is not None:  # VOC object rows carry their box: 4 little-endian int32
        flat = np.ascontiguousarray(crops[order], "<i4")
        columns["crop"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), len(items), [None, pa.py_buffer(flat.tobytes())])
    return pa.table(columns)


def listing_digest(listing: Listing) -> str:
    """sha256 over every split's (path, label) list, and crop boxes where there are any: a
    resumed run must see the same source."""
    digest = hashlib.sha256()
    for split in sorted(listing.splits):
        digest.update(split.encode() + b"\0")
        for rel, label in listing.splits[split]:
            digest.update(f"{rel}\t{label}\n".encode())
        if split in listing.crops:  # an edited <bndbox> changes the records
            digest.update(np.ascontiguousarray(listing.crops[split], "<i4").tobytes())
    return digest.hexdigest()


def moments_to_stats(total_sum: np.ndarray, total_outer: np.ndarray, pixels: int) -> dict:
    """Mean, std and PCA of the RGB covariance from exact integer sums."""
    if pixels == 0:
        return {"pixels": 0, "mean": [0.0] * 3, "std": [0.0] * 3, "eigval": [0.0] * 3,
                "eigvec": np.eye(3).tolist()}
    mean = np.asarray(total_sum, np.float64) / pixels
    cov = np.asarray(total_outer, np.float64).reshape(3, 3) / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending; columns are eigenvectors
    order = eigval.argsort()[::-1]
    return {"pixels": int(pixels), "mean": mean.tolist(), "std": np.sqrt(np.diag(cov)).tolist(),
            "eigval": eigval[order].tolist(), "eigvec": eigvec[:, order].T.tolist(),
            "cov": cov.tolist()}


# --------------------------------------------------------------------------- driver
def _params(cfg: PreprocessConfig, listing: Listing) -> dict:
    skip = ("out", "overwrite", "batch_size", "dry_run")
    params = {k: v for k, v in to_dict(cfg).items() if k not in skip}
    if listing.layout != "voc":
        # Meaningless elsewhere, and OUTs made before it existed would no longer match.
        params.pop("voc_objects", None)
    params["source"] = str(Path(cfg.source).resolve())
    params["layout"] = listing.layout
    return params


def _check_out(out: Path, params: dict, overwrite: bool) -> None:
    recorded = out / "preprocess.json"
    if recorded.exists():
        old = json.loads(recorded.read_text())
        if old != params:
            if not overwrite:
                diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
                raise PreprocessError(
                    f"{out} was made with other parameters {diff} (old, new). Use another "
                    f"--out, or --overwrite to replace it.")
            _clear(out)
    _atomic_write(recorded, json.dumps(params, indent=1, sort_keys=True))


def resume_command(out: str | os.PathLike) -> str | None:
    """The preprocess command that made (or began) OUT, from its preprocess.json: running
    it again finishes an interrupted OUT. None when OUT holds no preprocess.json."""
    try:
        params = json.loads((Path(out) / "preprocess.json").read_text())
    except (OSError, ValueError):
        return None
    parts = ["python workflow.py preprocess", f"--source {params.get('source')}", f"--out {out}"]
    defaults = PreprocessConfig()
    for key, value in sorted(params.items()):
        if key == "source" or not hasattr(defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "layout":  # the layout found, so auto is not asked to find it again
            parts.append(f"{flag} {value}")
        elif isinstance(value, bool):
            if value != getattr(defaults, key):
                parts.append(flag if value else f"--no-{flag[2:]}")
        elif value != getattr(defaults, key):
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def _clear(out: Path) -> None:
    for child in out.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _open_out(out: Path):
    """Create OUT and take its lock; PreprocessError when OUT is not writable or busy."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")  # noqa: SIM115 - held for the whole run
        probe = out / f".probe.{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise PreprocessError(f"output {out} is not writable ({exc.strerror or exc}); choose "
                              "another --out or fix its permissions") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise PreprocessError(f"another preprocess is writing to {out} now; wait for it to "
                              "finish or use another --out") from None
    return lock


def _make_plan(listing: Listing, cfg: PreprocessConfig) -> dict:
    plan = {"listing_sha256": listing_digest(listing), "splits": {}}
    for split, items in listing.splits.items():
        if items:
            rb = estimate_record_bytes(listing, split, cfg)
            n_shards = plan_shards(len(items), cfg, rb)
        else:
            rb, n_shards = None, 0
        plan["splits"][split] = {"images": len(items), "shards": n_shards,
                                 "record_bytes": round(rb) if rb else None}
    return plan


def _load_plan(out: Path, plan: dict, overwrite: bool) -> dict:
    """The plan of the first run into OUT (so a resumed run cuts shards the same way);
    refuses when the source changed since, unless --overwrite."""
    path = out / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("listing_sha256") == plan["listing_sha256"]:
            return old
        if not overwrite:
            counts = {s: (old["splits"].get(s, {}).get("images"), v["images"])
                      for s, v in plan["splits"].items()}
            raise PreprocessError(f"the source changed since {out} was started (images per "
                                  f"split, then and now: {counts}); finishing it would mix two "
                                  "listings. Use --overwrite to start again, or another --out.")
        _clear(out)
    _atomic_write(path, json.dumps(plan, indent=1))
    return plan


def dry_run(cfg: PreprocessConfig, listing: Listing | None = None) -> dict:
    """What `preprocess` would do, without writing anything: layout, per split and class
    counts, quarantined-at-listing files, shard plan and estimated size."""
    listing = listing or list_source(cfg.source, cfg.layout, cfg.voc_objects)
    plan = _make_plan(listing, cfg)
    counts = listing.counts()
    for split, p in plan["splits"].items():
        counts[split].update(shards=p["shards"], record_bytes=p["record_bytes"],
                             est_mb=round((p["record_bytes"] or 0) * p["images"] / 1e6, 1))
    return {"dry_run": True, "source": cfg.source, "out": cfg.out, "layout": listing.layout,
            "detected": listing.detected, "reading": listing.reading,
            "classes": len(listing.classes), "splits": counts,
            "quarantine": listing.quarantine[:50],
            "ignored_examples": listing.ignored_examples}


def format_dry_run(report: dict) -> str:
    lines = [f"dry run: nothing written. layout {report['layout']} ({report['detected']}), "
             f"{report['classes']} classes",
             *([report["reading"]] if report.get("reading") else []),
             f"{'split':<8}{'images':>10}{'quarantined':>13}{'ignored':>9}{'shards':>8}"
             f"{'est. MB':>10}"]
    for split, c in report["splits"].items():
        lines.append(f"{split:<8}{c['images']:>10}{c['quarantined']:>13}{c['ignored']:>9}"
                     f"{c.get('shards', 0):>8}{c.get('est_mb', 0.0):>10.1f}")
    for split, c in report["splits"].items():
        per = c["per_class"]
        if len(per) <= 20:
            lines.append(f"{split} per class: " + ", ".join(f"{k} {v}" for k, v in per.items()))
        elif per:
            # ImageNet has 1000 classes: list the ones with images (a sample or a partial
            # download leaves most empty), or, when there are many, how many classes have
            # how many images.
            n = np.array(list(per.values()))
            lines.append(f"{split} per class: min {n.min()}, median {int(np.median(n))}, max "
                         f"{n.max()} images; {int((n == 0).sum())} of {len(n)} classes have none")
            filled = [(k, v) for k, v in per.items() if v]
            if len(filled) <= 60:
                items = [f"{k} {v:>5}" for k, v in filled]
                lines += ["  " + "   ".join(items[i:i + 6]) for i in range(0, len(items), 6)]
            else:
                counts, classes = np.unique(n[n > 0], return_counts=True)
                lines.append("  " + ", ".join(
                    f"{k} classes have {c} image{'s' if c > 1 else ''}"
                    for c, k in zip(counts.tolist(), classes.tolist(), strict=True)))
    for q in report["quarantine"][:10]:
        lines.append(f"would quarantine {q['split']}/{q['path']}: {q['reason']}")
    return "\n".join(lines)


def _output_problem(exc: BaseException, out: Path) -> str | None:
    """A message for failures of the whole output (disk full, read-only) hidden anywhere in a
    Ray task error's chain; None for anything else (a bug, which should show its traceback)."""
    seen, todo, text = set(), [exc], []
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text.append(str(e))
        if isinstance(e, OSError) and e.errno is not None:
            text.append(os.strerror(e.errno))
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    blob = "\n".join(text)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = 0
    # LMDB reports a failed write at commit as "Input/output error" even when the cause was a
    # full disk, so an I/O error next to (almost) no free space is called what it is.
    io_error = "Input/output error" in blob or "mdb_" in blob
    if ("No space left on device" in blob or "Disk quota" in blob
            or (io_error and free < LOW_DISK_BYTES)):
        return (f"out of disk space writing {out} ({free / 1e6:.1f} MB free). Free some space "
                "or use another --out, then run the same command again: finished shards are "
                "kept.")
    if "Read-only file system" in blob:
        return f"output {out} is on a read-only file system; use another --out"
    if io_error:
        return (f"I/O error writing {out}: check the disk, then run the same command again "
                "(finished shards are kept)")
    return None


def _pending_table(out: Path, listing: Listing, plan: dict, seed: int) -> tuple[pa.Table | None,
                                                                              dict[str, int]]:
    """Rows still to process: not in a finished shard, not staged by an earlier (killed) run."""
    tables, todo = [], {}
    for split, items in listing.splits.items():
        n_shards = plan["splits"][split]["shards"]
        todo[split] = 0
        if not items:
            continue
        (out / split).mkdir(exist_ok=True)
        table = assign_shards(items, n_shards, seed, split, listing.pixels.get(split),
                              listing.crops.get(split))
        shard_col, pos_col = table["shard"].to_numpy(), table["pos"].to_numpy()
        keep = np.ones(table.num_rows, bool)
        for shard, size in enumerate(shard_sizes(len(items), n_shards)):
            finalize_shard(out, split, shard, size)  # a killed run may have staged all of it
            if _sidecar(out, split, shard).exists():
                _drop_stage(out, split, shard)  # killed before dropping it
                keep[shard_col == shard] = False
                continue
            for leftover in _stage_dir(out, split, shard).glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # a piece a killed task was writing
            staged = staged_positions(out, split, shard)
            if staged.size:
                keep[(shard_col == shard) & np.isin(pos_col, staged)] = False
        table = table.filter(pa.array(keep))
        todo[split] = table.num_rows
        tables.append(table)
    pending = pa.concat_tables(tables) if tables else None
    return pending, todo


def check_config(cfg: PreprocessConfig) -> None:
    """Numbers outside their range, refused before any listing or decoding (--resize 0 was
    an OpenCV assertion inside a Ray task, one per image, as a 100-line traceback)."""
    if cfg.resize < 1:
        raise PreprocessError(f"--resize {cfg.resize}: the shorter side in pixels, at least 1 "
                              "(256 for ImageNet, 32 or 40 for CIFAR)")
    if not 1 <= cfg.quality <= 100:
        raise PreprocessError(f"--quality {cfg.quality}: a JPEG quality from 1 to 100")
    if cfg.shard_size <= 0:
        raise PreprocessError(f"--shard-size {cfg.shard_size:g}: a size in MB above 0")
    if cfg.shards < 0:
        raise PreprocessError(f"--shards {cfg.shards}: 0 (from --shard-size) or more")
    if cfg.batch_size < 1:
        raise PreprocessError(f"--batch-size {cfg.batch_size}: at least 1 image a block")


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole job; returns the manifest (also written to OUT/manifest.json), or the
    dry-run report when cfg.dry_run."""
    if not cfg.source or not cfg.out:
        raise PreprocessError("both --source and --out are required")
    check_config(cfg)
    started = time.time()
    listing: Listing = list_source(cfg.source, cfg.layout, cfg.voc_objects)
    timing = {"listing_s": time.time() - started}
    _say(f"layout {listing.layout}: {listing.detected}; "
         + ", ".join(f"{s} {len(v)} images" for s, v in listing.splits.items()))
    if listing.reading:
        _say(listing.reading)
    if cfg.dry_run:
        return dry_run(cfg, listing)
    out = Path(cfg.out)
    lock = _open_out(out)
    try:
        params = _params(cfg, listing)
        _check_out(out, params, cfg.overwrite)
        t = time.time()
        plan = _load_plan(out, _make_plan(listing, cfg), cfg.overwrite)
        _check_out(out, params, False)  # _load_plan may have cleared OUT
        pending, todo = _pending_table(out, listing, plan, cfg.seed)
        timing["plan_s"] = time.time() - t
        if (pending is None or not pending.num_rows) and (out / sh.MANIFEST).is_file():
            try:
                done = sh.read_manifest(out)
            except ValueError:  # unreadable or an older format: rebuilt below
                done = None
            if done is not None and done.get("preprocess") == params:
                # Complete already. The manifest stays as it is: rewritten, its sha256 (which
                # names the dataset of every training run, and --resume checks) would change.
                return {**done, "already_complete": True}
        if pending is not None and pending.num_rows:
            _warn_disk(out, pending.num_rows, plan)
            try:
                _run_pipeline(pending, listing.root, out, cfg, plan, timing)
            except Exception as exc:
                problem = _output_problem(exc, out)
                if problem:
                    raise PreprocessError(problem) from None
                raise
        for split, p in plan["splits"].items():  # e.g. a commit task lost with its node
            for shard, size in enumerate(shard_sizes(p["images"], p["shards"])):
                finalize_shard(out, split, shard, size)
            try:
                (out / split / STAGING).rmdir()  # only when empty: every shard finished
            except OSError:
                pass
        try:
            return build_manifest(out, listing, plan, params, started, todo, timing)
        except OSError as exc:
            problem = _output_problem(exc, out)
            if problem:
                raise PreprocessError(problem) from None
            raise
    finally:
        lock.close()


def _warn_disk(out: Path, rows: int, plan: dict) -> None:
    per = [p["record_bytes"] for p in plan["splits"].values() if p.get("record_bytes")]
    need = rows * (max(per) if per else EST_RECORD_BYTES["jpeg"])
    free = shutil.disk_usage(out).free
    if free < 1.2 * need:
        _say(f"warning: {out} has {free / 1e9:.2f} GB free; the shards need about "
             f"{need / 1e9:.2f} GB (plus one shard of staging)")


def _run_pipeline(pending: pa.Table, root: str, out: Path, cfg: PreprocessConfig, plan: dict,
                  timing: dict) -> None:
    t = time.time()
    started = init_ray(lean=True, log_to_driver=False, configure_logging=False)
    try:
        _check_shared(out)
        warm_data_workers(["pipelines.data.preprocess"])
        timing["ray_start_s"] = time.time() - t
        _stage_and_commit(pending, root, out, cfg, plan, timing)
    finally:
        stop_local_ray(started)


def _stage_and_commit(pending: pa.Table, root: str, out: Path, cfg: PreprocessConfig,
                      plan: dict, timing: dict) -> None:
    import ray

    t = time.time()
    n = pending.num_rows
    cpus = cluster_cpus()
    blocks = [pending.slice(a, b - a) for a, b in block_bounds(n, cfg.batch_size, cpus)]
    # from_blocks: metadata computed here, not in one remote task per block as from_arrow
    # does (1.3 s before the first decode on 2 CPUs).
    ds = ray.data.from_blocks(blocks)
    ds = ds.map_batches(stage_batch, batch_size=None, batch_format="numpy",
                        fn_kwargs={"out": str(out), "source": root, "resize": cfg.resize,
                                   "center_crop": cfg.center_crop, "encoding": cfg.encoding,
                                   "quality": cfg.quality,
                                   "reduced_decode": cfg.reduced_decode})
    # One operator only: Ray Data's per-operator resource reservation (half the CPUs held for
    # it, the rest shared) then only delays the second task until the first one's output size
    # is known, and leaves ~0.15 s between a worker's tasks (measured on 2 CPUs: the second
    # worker started 1.6 s late, and each worker idled 13 % of the time; 1 % without it).
    # Set on this dataset's own context, not the process-wide one.
    ds.context.op_resource_reservation_enabled = False
    # The driver marks staged positions as the tasks report them and commits each shard as
    # soon as it is whole, in a task of its own, while the decoding goes on. Marks, not
    # counts: a retried task reports its rows twice.
    missing = _unstaged_positions(pending, plan)
    commit = ray.remote(num_cpus=1, max_retries=3)(finalize_shard)
    commits = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        splits = batch["split"].astype(str)
        for key in {(a, int(b)) for a, b in zip(splits, batch["shard"], strict=True)}:
            sel = (splits == key[0]) & (batch["shard"] == key[1])
            todo = missing[key]
            if todo.any():
                todo[batch["pos"][sel]] = False
                if not todo.any():
                    commits.append(commit.remote(out, *key, len(todo)))
    ray.get(commits)
    timing["pipeline_s"] = time.time() - t
    timing["pipeline_started_at"] = t


def block_bounds(n: int, batch_size: int, cpus: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of the decode blocks, in the order they run.

    Each block is one decode task and one staging piece a shard: big blocks amortise the
    per-task costs (scheduling, the driver's bookkeeping, a file), yet there must be enough
    of them to keep every core busy to the end. So blocks hold `batch_size` rows (fewer when
    n is small: BLOCKS_PER_CPU blocks a CPU at least), except the last wave, one block a CPU,
    which is cut TAIL_SPLIT times smaller: a whole block started last on one core left the
    others idle for up to a block's time (3.3 s for 1,024 images on this machine's cores)."""
    rows = max(1, min(batch_size, math.ceil(n / (BLOCKS_PER_CPU * cpus))))
    tail = min(n, rows * cpus)
    small = max(min(rows, MIN_TAIL_ROWS), math.ceil(rows / TAIL_SPLIT))
    bounds = [(a, min(a + rows, n - tail)) for a in range(0, n - tail, rows)]
    return bounds + [(a, min(a + small, n)) for a in range(n - tail, n, small)]


def _unstaged_positions(pending: pa.Table, plan: dict) -> dict[tuple[str, int], np.ndarray]:
    """Per (split, shard) with pending rows, a mask over the shard's positions: True = still
    to be staged. Sorted once (a million rows and a thousand shards take a second, not the
    hours a mask per shard over all rows would)."""
    missing = {}
    splits = pending["split"].to_numpy(False).astype(str)
    for split in np.unique(splits):
        p = plan["splits"][split]
        sizes = shard_sizes(p["images"], p["shards"])
        rows = splits == split
        shard = pending["shard"].to_numpy()[rows]
        pos = pending["pos"].to_numpy()[rows]
        order = np.argsort(shard, kind="stable")
        shard, pos = shard[order], pos[order]
        keys, starts = np.unique(shard, return_index=True)
        for k, a, b in zip(keys, starts, [*starts[1:], len(shard)], strict=True):
            todo = np.zeros(sizes[int(k)], bool)
            todo[pos[a:b]] = True
            missing[(str(split), int(k))] = todo
    return missing


def _check_shared(out: Path) -> None:
    """On a cluster, every node writes its pieces into OUT: refuse, before any work, an OUT
    that some node cannot see (a local path on the head node rather than shared storage)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if len(nodes) < 2:
        return
    probe = out / f".shared-probe-{os.getpid()}"
    probe.write_text("x")
    try:
        sees = ray.get([ray.remote(num_cpus=0)(os.path.exists).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(probe)) for node in nodes])
    finally:
        probe.unlink(missing_ok=True)
    blind = [node[:12] for node, ok in zip(nodes, sees, strict=True) if not ok]
    if blind:
        raise PreprocessError(f"--out {out} is not visible from Ray node(s) {blind}: on a "
                              "cluster OUT must be on storage every node mounts at the same "
                              "path (NFS, a shared volume)")


def build_manifest(out: Path, listing: Listing, plan: dict, params: dict, started: float,
                   todo: dict[str, int] | None = None, timing: dict | None = None) -> dict:
    """Reduce the shards' sidecars into manifest.json (written last, atomically) and
    quarantine.jsonl. `timing`: seconds of listing, planning, Ray start and the pipeline."""
    todo, timing = todo or {}, dict(timing or {})
    # A split's wall time runs from the pipeline's start (after Ray's own start, which is
    # paid once per job and reported apart) to its last shard's commit.
    began = timing.pop("pipeline_started_at", started)
    quarantine = list(listing.quarantine)
    splits = {}
    train_sum, train_outer, train_pixels = np.zeros(3, np.int64), np.zeros(9, np.int64), 0
    for split, p in plan["splits"].items():
        shard_rows, records, last = [], 0, started
        for shard in range(p["shards"]):
            path = _sidecar(out, split, shard)
            if not path.exists():
                raise PreprocessError(f"shard {shard_name(split, shard)} did not finish; "
                                      "run the same command again to complete it")
            side = json.loads(path.read_text())
            quarantine.extend(side["quarantine"])
            if side["records"] == 0 and side["sha256"] is None:
                continue  # all quarantined: no file (see finalize_shard)
            shard_rows.append({k: side[k] for k in ("path", "records", "sha256", "bytes")})
            records += side["records"]
            last = max(last, side.get("committed_at", started))
            if split == "train":
                train_sum += np.array(side["sum"], np.int64)
                train_outer += np.array(side["outer"], np.int64)
                train_pixels += int(side["pixels"])
        seconds = max(last - began, 1e-9) if todo.get(split) else 0.0
        splits[split] = {
            "records": records, "shards": shard_rows,
            "quarantined": sum(q["split"] == split for q in quarantine),
            "listed": p["images"] + sum(q["split"] == split for q in listing.quarantine),
            "ignored_files": listing.ignored.get(split, 0),
            "bytes": sum(s["bytes"] for s in shard_rows),
            "processed": todo.get(split, 0), "seconds": round(seconds, 2),
            "images_per_s": round(todo.get(split, 0) / seconds, 1) if seconds else 0.0}
    manifest = {
        "format": sh.FORMAT_VERSION,
        "layout": listing.layout,
        "detected": listing.detected,
        # how a multi-label source (VOC) became one label a record; other layouts have none
        **({"reading": listing.reading} if listing.reading else {}),
        "classes": listing.classes,
        "splits": splits,
        "stats": moments_to_stats(train_sum, train_outer, train_pixels),
        "preprocess": params,
        "seconds": round(time.time() - started, 2),
        "timing": {k: round(v, 2) for k, v in timing.items()},
    }
    lines = "".join(json.dumps(q) + "\n"
                    for q in sorted(quarantine, key=lambda q: (q["split"], q["path"])))
    _atomic_write(out / sh.QUARANTINE, lines)
    _atomic_write(out / sh.MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def summary_table(manifest: dict) -> str:
    lines = [f"{'split':<8}{'images':>10}{'quarantined':>13}{'shards':>8}{'MB':>10}"
             f"{'images/s':>10}{'wall s':>9}"]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:<8}{s['records']:>10}{s['quarantined']:>13}{len(s['shards']):>8}"
                     f"{s['bytes'] / 1e6:>10.1f}{s.get('images_per_s', 0):>10.1f}"
                     f"{s.get('seconds', 0):>9.1f}")
    st = manifest["stats"]
    lines.append(f"mean RGB {np.round(st['mean'], 2).tolist()}  std {np.round(st['std'], 2).tolist()}"
                 f"  eigval {np.round(st['eigval'], 2).tolist()}")
    ray_s = manifest.get("timing", {}).get("ray_start_s")
    lines.append(f"{manifest['seconds']} s in all" + (f", of which starting Ray {ray_s} s"
                                                      if ray_s is not None else ""))
    return "\n".join(lines)
