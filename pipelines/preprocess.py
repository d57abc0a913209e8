"""Preprocess a source dataset into LMDB shards, with mean/std and RGB PCA, on Ray Data.

    python workflow.py preprocess --source data/sample --out data/sample-shards

Stages (one streaming Ray Data pipeline per run):
  listing (driver, no stat per file) -> shuffled with --seed and cut into shards
  -> map_batches(decode -> rescale -> encode + exact pixel moments), parallel tasks
  -> LmdbShardSink: rows are staged per shard, idempotently (a record's key is its position),
     and a shard whose records are all staged is written out as a finished, atomic file.
Then the driver reads the shards' sidecars and writes quarantine.jsonl and, last and
atomically, manifest.json: its presence means the data is complete.

Every rejected image lands in quarantine.jsonl with a reason; no single file fails the job.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import shards as sh
from pipelines.config import PreprocessConfig, to_dict
from pipelines.decode import DecodeError, decode_rgb, encode, pixel_moments, rescale
from pipelines.runtime import init_ray
from pipelines.sources import Listing, list_source

# Bytes per encoded 256x256 record, to size shards before anything is encoded.
EST_RECORD_BYTES = {"jpeg": 30_000, "raw": 256 * 256 * 3}
STAGING = ".staging"


class PreprocessError(RuntimeError):
    """The whole job cannot proceed; the message says what to do."""


# --------------------------------------------------------------------------- map stage
def process_batch(batch: dict[str, np.ndarray], source: str, resize: int, center_crop: bool,
                  encoding: str, quality: int) -> dict[str, Any]:
    """Decode, rescale, encode a batch of files; a failure becomes a reason, not an error."""
    n = len(batch["path"])
    values, reasons = [b""] * n, [""] * n
    sums = np.zeros((n, 3), np.int64)
    outers = np.zeros((n, 9), np.int64)
    pixels = np.zeros(n, np.int64)
    for i, rel in enumerate(batch["path"]):
        try:
            with open(os.path.join(source, rel), "rb") as fh:
                data = fh.read()
            rgb = rescale(decode_rgb(data), resize, center_crop)
            image = encode(rgb, encoding, quality)
        except (DecodeError, OSError) as exc:
            reasons[i] = str(exc) if isinstance(exc, DecodeError) else f"unreadable: {exc.strerror}"
            continue
        except Exception as exc:  # noqa: BLE001 - any decoder surprise is this file's problem
            reasons[i] = f"decode failed: {type(exc).__name__}: {exc}"
            continue
        values[i] = sh.pack_record(int(batch["label"][i]), rgb.shape[0], rgb.shape[1], encoding,
                                   str(rel), image)
        s, o, p = pixel_moments(rgb)
        sums[i], outers[i], pixels[i] = s, o.reshape(9), p
    return {**batch, "value": np.array(values, dtype=object), "reason": np.array(reasons),
            "sum": sums, "outer": outers, "pixels": pixels}


# --------------------------------------------------------------------------- sink
def _stage_path(out: Path, split: str, shard: int) -> Path:
    return out / split / STAGING / f"shard-{shard:05d}.lmdb"


def shard_name(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.lmdb"


def _sidecar(out: Path, split: str, shard: int) -> Path:
    return out / f"{shard_name(split, shard)}.json"


def _stage_rows(out: Path, split: str, shard: int, rows: list[dict]) -> tuple[int, int]:
    """Put rows into the shard's staging LMDB; returns (staged, expected). Idempotent: a key
    is the record's position, put with overwrite=False, so a retried task adds nothing twice."""
    import lmdb

    path = _stage_path(out, split, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    # lock=True: several write tasks on this node may stage into the same shard at once.
    env = lmdb.open(str(path), subdir=False, map_size=sh.MAP_SIZE, lock=True, meminit=False)
    try:
        with env.begin(write=True) as txn:
            state = json.loads(txn.get(b"__state__") or b'{"staged": 0}')
            for r in rows:
                entry = r["value"] if r["value"] else json.dumps(
                    {"path": r["path"], "reason": r["reason"]}).encode()
                prefix = b"r" if r["value"] else b"q"
                key = prefix + b"%010d" % r["pos"]
                if txn.get((b"q" if prefix == b"r" else b"r") + key[1:]) is not None:
                    continue  # staged before under the other outcome: keep the first
                if txn.put(key, entry, overwrite=False):
                    state["staged"] += 1
                    if r["value"]:
                        state["sum"] = (np.array(state.get("sum", [0] * 3)) + r["sum"]).tolist()
                        state["outer"] = (np.array(state.get("outer", [0] * 9))
                                          + r["outer"]).tolist()
                        state["pixels"] = state.get("pixels", 0) + int(r["pixels"])
            state["expected"] = int(rows[0]["shard_size"])
            txn.put(b"__state__", json.dumps(state).encode())
    finally:
        env.close()
    return state["staged"], state["expected"]


def finalize_shard(out: Path, split: str, shard: int) -> dict | None:
    """Write the finished shard from its complete staging file, then its sidecar (the commit
    record), then drop the staging file. Returns the sidecar, or None if not complete."""
    import lmdb

    stage = _stage_path(out, split, shard)
    if not stage.exists():
        return None
    env = lmdb.open(str(stage), subdir=False, map_size=sh.MAP_SIZE, lock=True, readonly=True)
    try:
        with env.begin() as txn:
            state = json.loads(txn.get(b"__state__") or b"{}")
            if not state or state["staged"] != state["expected"]:
                return None
            values, quarantine = [], []
            for key, value in txn.cursor():
                if key.startswith(b"r"):
                    values.append(bytes(value))
                elif key.startswith(b"q"):
                    quarantine.append({"split": split, **json.loads(bytes(value))})
    finally:
        env.close()
    final = out / shard_name(split, shard)
    sha = sh.write_shard(final, values, {"split": split, "shard": shard})
    sidecar = {"path": shard_name(split, shard), "records": len(values), "sha256": sha,
               "bytes": final.stat().st_size, "quarantine": quarantine,
               "sum": state.get("sum", [0] * 3), "outer": state.get("outer", [0] * 9),
               "pixels": state.get("pixels", 0)}
    _atomic_write(_sidecar(out, split, shard), json.dumps(sidecar))
    stage.unlink(missing_ok=True)
    Path(str(stage) + "-lock").unlink(missing_ok=True)
    return sidecar


class LmdbShardSink:
    """Ray Data sink (a `Datasink`) that writes LMDB shards; see module docstring.

    `supports_distributed_writes` is False, so Ray runs every write task on the driver's node:
    LMDB's locks need one local filesystem, and writing is cheap next to decoding, which
    still runs on every node."""

    def __new__(cls, *args, **kwargs):  # subclass lazily so importing this file needs no Ray
        from ray.data import Datasink

        class _Sink(Datasink):
            def __init__(self, out: str):
                self.out = Path(out)

            @property
            def supports_distributed_writes(self) -> bool:
                return False

            def write(self, blocks, ctx) -> list[str]:
                import pyarrow as pa  # noqa: F811 - runs in a Ray task

                groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
                for block in blocks:
                    table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
                    for row in table.to_pylist():
                        groups[(row["split"], row["shard"])].append(row)
                done = []
                for (split, shard), rows in sorted(groups.items()):
                    staged, expected = _stage_rows(self.out, split, shard, rows)
                    if staged == expected and finalize_shard(self.out, split, shard):
                        done.append(shard_name(split, shard))
                return done

        return _Sink(*args, **kwargs)


# --------------------------------------------------------------------------- driver
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan_shards(n: int, cfg: PreprocessConfig) -> int:
    if cfg.shards > 0:
        return max(1, min(cfg.shards, n))
    est = n * EST_RECORD_BYTES[cfg.encoding] * (cfg.resize / 256) ** 2
    return max(1, min(n, math.ceil(est / (cfg.shard_size * 1e6))))


def assign_shards(items: list[tuple[str, int]], num_shards: int, seed: int,
                  split: str) -> pa.Table:
    """Shuffle with the seed (training reads shards in order, so the order is decided here)
    and cut into `num_shards` near-equal contiguous shards."""
    order = np.random.default_rng([seed, sum(split.encode())]).permutation(len(items))
    shard_of = np.empty(len(items), np.int64)
    pos = np.empty(len(items), np.int64)
    sizes = np.empty(len(items), np.int64)
    for s, chunk in enumerate(np.array_split(np.arange(len(items)), num_shards)):
        shard_of[chunk], pos[chunk], sizes[chunk] = s, np.arange(len(chunk)), len(chunk)
    paths = [items[i][0] for i in order]
    labels = [items[i][1] for i in order]
    return pa.table({"split": [split] * len(items), "shard": shard_of, "pos": pos,
                     "shard_size": sizes, "path": paths, "label": labels})


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
            import shutil

            for child in out.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    _atomic_write(recorded, json.dumps(params, indent=1, sort_keys=True))


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole job; returns the manifest (also written to OUT/manifest.json)."""
    import ray

    if not cfg.source or not cfg.out:
        raise PreprocessError("both --source and --out are required")
    started = time.time()
    out = Path(cfg.out)
    listing: Listing = list_source(cfg.source, cfg.layout)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise PreprocessError(f"output {out} is not writable: {exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PreprocessError(f"another preprocess is writing to {out} now; wait for it to "
                              "finish or use another --out") from None
    params = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "overwrite", "batch_size")}
    params["source"] = str(Path(cfg.source).resolve())
    _check_out(out, params, cfg.overwrite)

    tables, plan = [], {}
    for split, items in listing.splits.items():
        n_shards = plan_shards(len(items), cfg) if items else 0
        plan[split] = n_shards
        if not items:
            continue
        (out / split).mkdir(exist_ok=True)
        table = assign_shards(items, n_shards, cfg.seed, split)
        for shard in range(n_shards):  # a killed run may have staged a complete shard
            if not _sidecar(out, split, shard).exists():
                finalize_shard(out, split, shard)
        done = [s for s in range(n_shards) if _sidecar(out, split, s).exists()]
        if done:
            keep = ~np.isin(table["shard"].to_numpy(), done)
            table = table.filter(pa.array(keep))
        tables.append(table)
    pending = pa.concat_tables(tables) if tables else None

    if pending is not None and pending.num_rows:
        init_ray(log_to_driver=False, configure_logging=False)
        # Blocks of ~batch_size rows keep every core busy even when there is a single shard.
        n_blocks = max(1, math.ceil(pending.num_rows / cfg.batch_size))
        ds = ray.data.from_arrow([pending.slice(o, cfg.batch_size)
                                  for o in range(0, pending.num_rows, cfg.batch_size)]
                                 if n_blocks > 1 else pending)
        ds = ds.map_batches(process_batch, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_kwargs={"source": str(Path(cfg.source)), "resize": cfg.resize,
                                       "center_crop": cfg.center_crop, "encoding": cfg.encoding,
                                       "quality": cfg.quality})
        ds.write_datasink(LmdbShardSink(str(out)))
    for split, n_shards in plan.items():  # shards whose last rows were staged by a retry
        for shard in range(n_shards):
            if not _sidecar(out, split, shard).exists():
                finalize_shard(out, split, shard)
    manifest = build_manifest(out, listing, plan, params, time.time() - started)
    return manifest


def build_manifest(out: Path, listing: Listing, plan: dict[str, int], params: dict,
                   seconds: float) -> dict:
    quarantine = list(listing.quarantine)
    splits = {}
    train_sum, train_outer, train_pixels = np.zeros(3, np.int64), np.zeros(9, np.int64), 0
    for split, n_shards in plan.items():
        shard_rows, records = [], 0
        for shard in range(n_shards):
            path = _sidecar(out, split, shard)
            if not path.exists():
                raise PreprocessError(f"shard {shard_name(split, shard)} did not finish; "
                                      "run the same command again to complete it")
            side = json.loads(path.read_text())
            quarantine.extend(side["quarantine"])
            shard_rows.append({k: side[k] for k in ("path", "records", "sha256", "bytes")})
            records += side["records"]
            if split == "train":
                train_sum += np.array(side["sum"], np.int64)
                train_outer += np.array(side["outer"], np.int64)
                train_pixels += int(side["pixels"])
        splits[split] = {"records": records, "shards": shard_rows,
                         "quarantined": sum(q["split"] == split for q in quarantine)}
    manifest = {
        "format": sh.FORMAT_VERSION,
        "layout": listing.layout,
        "classes": listing.classes,
        "splits": splits,
        "stats": moments_to_stats(train_sum, train_outer, train_pixels),
        "preprocess": params,
        "seconds": round(seconds, 2),
    }
    with open(out / sh.QUARANTINE, "w") as fh:
        for q in sorted(quarantine, key=lambda q: (q["split"], q["path"])):
            fh.write(json.dumps(q) + "\n")
    _atomic_write(out / sh.MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def summary_table(manifest: dict) -> str:
    lines = [f"{'split':<8}{'images':>10}{'quarantined':>13}{'shards':>8}{'MB':>10}"]
    for split, s in manifest["splits"].items():
        mb = sum(x["bytes"] for x in s["shards"]) / 1e6
        lines.append(f"{split:<8}{s['records']:>10}{s['quarantined']:>13}{len(s['shards']):>8}"
                     f"{mb:>10.1f}")
    st = manifest["stats"]
    lines.append(f"mean RGB {np.round(st['mean'], 2).tolist()}  std {np.round(st['std'], 2).tolist()}"
                 f"  eigval {np.round(st['eigval'], 2).tolist()}  ({manifest['seconds']} s)")
    return "\n".join(lines)
