"""Check that a preprocess OUT is whole: every shard, every record, every count.

    python workflow.py verify --data OUT [--decode]     # exit 0: whole, 1: problems found

For each split in manifest.json, each shard is checked for: presence, byte size and sha256
against the manifest; its `__meta__` record count; keys 0..records-1 all present and no
others; every record's header, CRC32 and label (inside the class index), raw sizes, and with
--decode that the image decodes to the stated height x width. Across a split: each source
path appears once (no duplicates), record counts add up to the manifest's, and records +
quarantined = images listed (no gaps). quarantine.jsonl must agree with the manifest's
per-split counts. Problems are reported by shard and record; shards are checked in parallel
threads (sha256, CRC32 and LMDB reads release the GIL).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb

from pipelines.data.shards import (
    META_KEY,
    QUARANTINE,
    RecordError,
    ShardReader,
    decode_image,
    file_sha256,
    read_manifest,
    record_key,
    unpack_record,
)


def _check_shard(out: Path, entry: dict, num_classes: int, decode: bool) -> dict:
    """Problems and source paths of one shard."""
    name, problems, paths = entry["path"], [], []
    path = out / name
    if not path.is_file():
        return {"shard": name, "problems": [f"{name}: missing"], "paths": [], "records": 0}
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    sha = file_sha256(path)
    if sha != entry["sha256"]:
        problems.append(f"{name}: sha256 {sha[:12]}..., manifest says {entry['sha256'][:12]}...")
    seen = 0
    try:
        # A private handle (not open_shard's cache): verify may run beside readers.
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
    except lmdb.Error as exc:
        return {"shard": name, "problems": problems + [f"{name}: not an LMDB file ({exc})"],
                "paths": [], "records": 0}
    try:
        with env.begin(buffers=False) as txn:
            raw_meta = txn.get(META_KEY)
            meta = json.loads(raw_meta) if raw_meta else {}
            if meta.get("records") != entry["records"]:
                problems.append(f"{name}: __meta__ says {meta.get('records')} records, manifest "
                                f"says {entry['records']}")
            for key, value in txn.cursor():
                if key == META_KEY:
                    continue
                try:
                    index = int(key)
                    if key != record_key(index) or not 0 <= index < entry["records"]:
                        raise ValueError
                except ValueError:
                    problems.append(f"{name}: unexpected key {key[:20]!r}")
                    continue
                seen += 1
                where = f"{name} record {index}"
                try:
                    rec = unpack_record(value)
                except RecordError as exc:
                    problems.append(f"{where}: {exc}")
                    continue
                paths.append(rec.path)
                if not 0 <= rec.label < num_classes:
                    problems.append(f"{where}: label {rec.label} outside 0..{num_classes - 1}")
                if rec.encoding == "raw" and len(rec.image) != rec.height * rec.width * 3:
                    problems.append(f"{where}: raw image of {len(rec.image)} bytes for "
                                    f"{rec.height}x{rec.width}")
                if decode:
                    try:
                        img = decode_image(rec)
                        if img.shape[:2] != (rec.height, rec.width):
                            problems.append(f"{where}: decodes to {img.shape[:2]}, header says "
                                            f"{(rec.height, rec.width)}")
                    except RecordError as exc:
                        problems.append(f"{where}: {exc}")
    finally:
        env.close()
    if seen != entry["records"]:
        problems.append(f"{name}: {seen} records found, manifest says {entry['records']}")
    return {"shard": name, "problems": problems, "paths": paths, "records": seen}


def quick_check(out: str | os.PathLike, manifest: dict) -> list[str]:
    """The cheap part of verify: every shard present, of its size, with its record count
    (one stat and one LMDB meta read a shard, no record read: well under a second for
    ImageNet). Problems as verify words them."""
    out, problems = Path(out), []
    for s in manifest["splits"].values():
        for entry in s["shards"]:
            name, path = entry["path"], out / entry["path"]
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            if "bytes" in entry and path.stat().st_size != entry["bytes"]:
                problems.append(f"{name}: {path.stat().st_size} bytes, manifest says "
                                f"{entry['bytes']}")
                continue
            try:
                records = len(ShardReader(path))
            except (RecordError, OSError, lmdb.Error) as exc:
                problems.append(f"{name}: not a finished LMDB shard ({exc})")
                continue
            if records != entry["records"]:
                problems.append(f"{name}: __meta__ says {records} records, manifest says "
                                f"{entry['records']}")
    return problems


def repair_advice(out: str | os.PathLike) -> str:
    """What to do about damaged shards; the one piece of advice train, preprocess and verify
    all give. Tried: a shard deleted with its sidecar is rebuilt by the same command (and
    only that shard), and the manifest rewritten; --overwrite alone does nothing when the
    parameters are unchanged."""
    from pipelines.data.output import resume_command

    cmd = resume_command(out) or f"python workflow.py preprocess --source SRC --out {out}"
    return (f"delete the damaged shards and their .json sidecars (shard-NNNNN.lmdb.json), then "
            f"re-run the same preprocess command, which rebuilds just those: `{cmd}`")


def verify_output(out: str | os.PathLike, decode: bool = False,
                  threads: int | None = None) -> dict:
    """{ok, problems [str], splits {split: {records, shards, quarantined}}, warnings}."""
    out = Path(out)
    report: dict = {"out": str(out), "ok": False, "problems": [], "warnings": [], "splits": {}}
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        report["problems"].append(str(exc))
        return report
    num_classes = len(manifest["classes"])
    quarantine: Counter = Counter()
    qpath = out / QUARANTINE
    if qpath.is_file():
        for n, line in enumerate(qpath.read_text().splitlines(), 1):
            try:
                quarantine[json.loads(line)["split"]] += 1
            except (json.JSONDecodeError, KeyError, TypeError):
                report["problems"].append(f"{QUARANTINE}:{n}: not a {{split, path, reason}} "
                                          "JSON line")
    else:
        report["problems"].append(f"{qpath} missing")
    jobs = [(split, entry) for split, s in manifest["splits"].items() for entry in s["shards"]]
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda j: (j[0], _check_shard(out, j[1], num_classes, decode)),
                                jobs))
    for split, s in manifest["splits"].items():
        mine = [r for sp, r in results if sp == split]
        for r in mine:
            report["problems"] += r["problems"]
        records = sum(r["records"] for r in mine)
        counts = Counter(p for r in mine for p in r["paths"])
        dups = [p for p, c in counts.items() if c > 1]
        for p in dups[:20]:
            report["problems"].append(f"{split}: {p} is stored {counts[p]} times")
        if len(dups) > 20:
            report["problems"].append(f"{split}: {len(dups) - 20} more duplicated paths")
        if records != s["records"]:
            report["problems"].append(f"{split}: {records} records in shards, manifest says "
                                      f"{s['records']}")
        if quarantine[split] != s["quarantined"]:
            report["problems"].append(f"{split}: {quarantine[split]} lines in {QUARANTINE}, "
                                      f"manifest says {s['quarantined']} quarantined")
        if "listed" in s and s["records"] + s["quarantined"] != s["listed"]:
            report["problems"].append(f"{split}: {s['records']} records + {s['quarantined']} "
                                      f"quarantined != {s['listed']} listed (images lost)")
        known = {Path(e["path"]).name for e in s["shards"]}
        split_dir = out / split
        if split_dir.is_dir():
            stray = sorted(p.name for p in split_dir.glob("shard-*.lmdb") if p.name not in known)
            if stray:
                report["warnings"].append(f"{split}: shard files not in the manifest: {stray[:5]}")
            if (split_dir / ".staging").is_dir() and any((split_dir / ".staging").iterdir()):
                report["warnings"].append(f"{split}: leftover staging files in "
                                          f"{split_dir / '.staging'}")
        report["splits"][split] = {"records": records, "shards": len(mine),
                                   "quarantined": quarantine[split], "duplicates": len(dups)}
    report["ok"] = not report["problems"]
    return report


def format_report(report: dict) -> str:
    lines = [f"{'split':<8}{'records':>10}{'shards':>8}{'quarantined':>13}{'duplicates':>12}"]
    for split, s in report["splits"].items():
        lines.append(f"{split:<8}{s['records']:>10}{s['shards']:>8}{s['quarantined']:>13}"
                     f"{s['duplicates']:>12}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += [f"problem: {p}" for p in report["problems"][:200]]
    if len(report["problems"]) > 200:
        lines.append(f"... and {len(report['problems']) - 200} more problems")
    lines.append(f"{report['out']}: " + ("OK, the data is whole" if report["ok"] else
                                         f"{len(report['problems'])} problem(s) found; "
                                         + repair_advice(report["out"])))
    return "\n".join(lines)
