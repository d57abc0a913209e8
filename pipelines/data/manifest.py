"""OUT/manifest.json (written last and atomically: its presence means the data is complete),
the train split's mean/std and RGB PCA from exact pixel moments, and the summary table
`preprocess` prints. The format is described in docs/data-format.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipelines.data.output import PreprocessError
from pipelines.data.shards import FORMAT_VERSION, MANIFEST, QUARANTINE
from pipelines.data.sources import Listing
from pipelines.data.staging import shard_name, sidecar_path
from pipelines.files import atomic_write


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


def build_manifest(out: Path, listing: Listing, plan: dict, params: dict, started: float,
                   processed: dict[str, int] | None = None, timing: dict | None = None) -> dict:
    """Reduce the shards' sidecars into manifest.json (written last, atomically) and
    quarantine.jsonl. `timing`: seconds of listing, planning, Ray start and the pipeline."""
    processed, timing = processed or {}, dict(timing or {})
    # A split's wall time runs from the pipeline's start (after Ray's own start, which is
    # paid once per job and reported apart) to its last shard's commit.
    began = timing.pop("pipeline_started_at", started)
    quarantine = list(listing.quarantine)
    splits = {}
    train_sum, train_outer, train_pixels = np.zeros(3, np.int64), np.zeros(9, np.int64), 0
    for split, p in plan["splits"].items():
        shard_rows, records, last = [], 0, started
        for shard in range(p["shards"]):
            path = sidecar_path(out, split, shard)
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
        seconds = max(last - began, 1e-9) if processed.get(split) else 0.0
        splits[split] = {
            "records": records, "shards": shard_rows,
            "quarantined": sum(q["split"] == split for q in quarantine),
            "listed": p["images"] + sum(q["split"] == split for q in listing.quarantine),
            "ignored_files": listing.ignored.get(split, 0),
            "bytes": sum(s["bytes"] for s in shard_rows),
            "processed": processed.get(split, 0), "seconds": round(seconds, 2),
            "images_per_s": round(processed.get(split, 0) / seconds, 1) if seconds else 0.0}
    manifest = {
        "format": FORMAT_VERSION,
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
    atomic_write(out / QUARANTINE, lines)
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
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
