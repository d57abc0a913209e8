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

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import PreprocessConfig
from pipelines.data.decode import DecodeError, crop_box, decode_rgb, encode, pixel_moments, rescale
from pipelines.data.manifest import build_manifest
from pipelines.data.output import (
    PreprocessError,
    check_params,
    check_shared_storage,
    lock_out,
    output_problem,
    say,
)
from pipelines.data.plan import (
    EST_RECORD_BYTES,
    block_bounds,
    job_params,
    listing_digest,
    load_plan,
    pending_rows,
    plan_shards,
    unstaged_positions,
    warn_if_disk_short,
)
from pipelines.data.shards import HEADER, MANIFEST, pack_record, read_manifest
from pipelines.data.sources import VOC_OBJECT, Listing, list_source
from pipelines.data.staging import STAGING, finalize_shard, shard_sizes, write_piece
from pipelines.runtime import cluster_cpus, init_ray, stop_local_ray

SIZE_SAMPLE = 32  # images encoded in the driver to estimate record size (shard planning)


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
        values[i] = pack_record(int(batch["label"][i]), rgb.shape[0], rgb.shape[1], encoding,
                                   str(rel), image)
        s, o, p = pixel_moments(rgb)
        sums[i], outers[i], pixels[i] = s, o.reshape(9), p
    # raw CIFAR pixels and crop boxes stop here
    out = {k: v for k, v in batch.items() if k not in ("pixels", "crop")}
    return {**out, "value": np.array(values, dtype=object), "reason": np.array(reasons),
            "sum": sums, "outer": outers, "pixels": pixels}


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
            sizes.append(len(image) + HEADER.size + len(rel.encode()))
        except (DecodeError, OSError):
            continue
    if sizes:
        return float(np.mean(sizes))
    return EST_RECORD_BYTES[cfg.encoding] * (cfg.resize / 256) ** 2


def make_plan(listing: Listing, cfg: PreprocessConfig) -> dict:
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


def dry_run(cfg: PreprocessConfig, listing: Listing | None = None) -> dict:
    """What `preprocess` would do, without writing anything: layout, per split and class
    counts, quarantined-at-listing files, shard plan and estimated size."""
    listing = listing or list_source(cfg.source, cfg.layout, cfg.voc_objects)
    plan = make_plan(listing, cfg)
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
    say(f"layout {listing.layout}: {listing.detected}; "
         + ", ".join(f"{s} {len(v)} images" for s, v in listing.splits.items()))
    if listing.reading:
        say(listing.reading)
    if cfg.dry_run:
        return dry_run(cfg, listing)
    out = Path(cfg.out)
    lock = lock_out(out)
    try:
        params = job_params(cfg, listing)
        check_params(out, params, cfg.overwrite)
        t = time.time()
        plan = load_plan(out, make_plan(listing, cfg), cfg.overwrite)
        check_params(out, params, False)  # load_plan may have cleared OUT
        pending, to_process = pending_rows(out, listing, plan, cfg.seed)
        timing["plan_s"] = time.time() - t
        if (pending is None or not pending.num_rows) and (out / MANIFEST).is_file():
            try:
                done = read_manifest(out)
            except ValueError:  # unreadable or an older format: rebuilt below
                done = None
            if done is not None and done.get("preprocess") == params:
                # Complete already. The manifest stays as it is: rewritten, its sha256 (which
                # names the dataset of every training run, and --resume checks) would change.
                return {**done, "already_complete": True}
        if pending is not None and pending.num_rows:
            warn_if_disk_short(out, pending.num_rows, plan)
            try:
                _run_pipeline(pending, listing.root, out, cfg, plan, timing)
            except Exception as exc:
                problem = output_problem(exc, out)
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
            return build_manifest(out, listing, plan, params, started, to_process, timing)
        except OSError as exc:
            problem = output_problem(exc, out)
            if problem:
                raise PreprocessError(problem) from None
            raise
    finally:
        lock.close()


def _run_pipeline(pending: pa.Table, root: str, out: Path, cfg: PreprocessConfig, plan: dict,
                  timing: dict) -> None:
    t = time.time()
    started = init_ray(lean=True, log_to_driver=False, configure_logging=False)
    try:
        check_shared_storage(out)
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
    missing = unstaged_positions(pending, plan)
    commit = ray.remote(num_cpus=1, max_retries=3)(finalize_shard)
    commits = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        splits = batch["split"].astype(str)
        for key in {(a, int(b)) for a, b in zip(splits, batch["shard"], strict=True)}:
            sel = (splits == key[0]) & (batch["shard"] == key[1])
            unstaged = missing[key]
            if unstaged.any():
                unstaged[batch["pos"][sel]] = False
                if not unstaged.any():
                    commits.append(commit.remote(out, *key, len(unstaged)))
    ray.get(commits)
    timing["pipeline_s"] = time.time() - t
    timing["pipeline_started_at"] = t
