"""The plan of a preprocess run: record-size estimate, shard count and assignment (seeded),
the listing's digest, plan.json (what a resumed run must agree with), the rows still to do,
Ray Data block bounds, and `--dry-run`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.config import PreprocessConfig, to_dict
from pipelines.data.output import PreprocessError, clear_out, say
from pipelines.data.sources import Listing
from pipelines.data.staging import (
    drop_stage,
    finalize_shard,
    shard_sizes,
    sidecar_path,
    stage_dir,
    staged_positions,
)
from pipelines.files import atomic_write

# Bytes per encoded 256x256 record when no sample could be encoded to measure it.
EST_RECORD_BYTES = {"jpeg": 30_000, "raw": 256 * 256 * 3}

BLOCKS_PER_CPU = 4   # at least this many blocks a CPU, so no core idles at the end

TAIL_SPLIT = 4       # the last wave's blocks are cut this many times smaller,

MIN_TAIL_ROWS = 32   # but not below this (~0.1 s of work; a worker waits ~0.08 s between tasks)

PLAN = "plan.json"


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


# --------------------------------------------------------------------------- driver
def job_params(cfg: PreprocessConfig, listing: Listing) -> dict:
    skip = ("out", "overwrite", "batch_size", "dry_run")
    params = {k: v for k, v in to_dict(cfg).items() if k not in skip}
    if listing.layout != "voc":
        # Meaningless elsewhere, and OUTs made before it existed would no longer match.
        params.pop("voc_objects", None)
    params["source"] = str(Path(cfg.source).resolve())
    params["layout"] = listing.layout
    return params


def load_plan(out: Path, plan: dict, overwrite: bool) -> dict:
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
        clear_out(out)
    atomic_write(path, json.dumps(plan, indent=1))
    return plan


def pending_rows(out: Path, listing: Listing, plan: dict, seed: int) -> tuple[pa.Table | None,
                                                                              dict[str, int]]:
    """Rows still to process: not in a finished shard, not staged by an earlier (killed) run."""
    tables, to_process = [], {}
    for split, items in listing.splits.items():
        n_shards = plan["splits"][split]["shards"]
        to_process[split] = 0
        if not items:
            continue
        (out / split).mkdir(exist_ok=True)
        table = assign_shards(items, n_shards, seed, split, listing.pixels.get(split),
                              listing.crops.get(split))
        shard_col, pos_col = table["shard"].to_numpy(), table["pos"].to_numpy()
        keep = np.ones(table.num_rows, bool)
        for shard, size in enumerate(shard_sizes(len(items), n_shards)):
            finalize_shard(out, split, shard, size)  # a killed run may have staged all of it
            if sidecar_path(out, split, shard).exists():
                drop_stage(out, split, shard)  # killed before dropping it
                keep[shard_col == shard] = False
                continue
            for leftover in stage_dir(out, split, shard).glob(".*.tmp"):
                leftover.unlink(missing_ok=True)  # a piece a killed task was writing
            staged = staged_positions(out, split, shard)
            if staged.size:
                keep[(shard_col == shard) & np.isin(pos_col, staged)] = False
        table = table.filter(pa.array(keep))
        to_process[split] = table.num_rows
        tables.append(table)
    pending = pa.concat_tables(tables) if tables else None
    return pending, to_process


def warn_if_disk_short(out: Path, rows: int, plan: dict) -> None:
    per = [p["record_bytes"] for p in plan["splits"].values() if p.get("record_bytes")]
    need = rows * (max(per) if per else EST_RECORD_BYTES["jpeg"])
    free = shutil.disk_usage(out).free
    if free < 1.2 * need:
        say(f"warning: {out} has {free / 1e9:.2f} GB free; the shards need about "
             f"{need / 1e9:.2f} GB (plus one shard of staging)")


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


def unstaged_positions(pending: pa.Table, plan: dict) -> dict[tuple[str, int], np.ndarray]:
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
            unstaged = np.zeros(sizes[int(k)], bool)
            unstaged[pos[a:b]] = True
            missing[(str(split), int(k))] = unstaged
    return missing
