"""Preprocess throughput and memory: `workflow.py preprocess` against plain loops doing the
same work with the same libraries.

    .venv/bin/python benchmarks/preprocess.py                       # 5,000 images
    .venv/bin/python benchmarks/preprocess.py --images 5000 20000   # memory at two sizes

All in one run, so the ratios compare like with like:

1. Generates ImageNet-like JPEGs under /tmp/alexnet-bench-preprocess (kept between runs):
   100 wnid folders, sides about 500x375 (400-600 x 300-450, one in five portrait), photo-like
   content (smooth colour fields, texture, sensor noise) at quality 90, ~80-90 KB each
   (ILSVRC-2012 JPEGs average ~110 KB).
2. (a) one process, a plain loop over every file: read -> decode_rgb -> rescale 256 ->
   JPEG encode (q90) -> exact pixel moments -> pack_record -> LMDB put (one txn per 256),
   timing each stage (this is where the time goes).
   (b) the same loop in os.cpu_count() processes (fork), each on its share, its own LMDB.
   (c) `python workflow.py preprocess` as a subprocess, on a fresh local Ray. images/s over
   its pipeline time (manifest timing.pipeline_s: decode tasks + sink + shard commits; Ray's
   own start is printed apart, it is paid once per job) and over its whole wall time.
   Peak memory of (c): the proportional set size (PSS: shared pages such as the object store
   count once) summed over the driver and every process it started, sampled every 0.2 s,
   and the driver's own peak RSS; shown for each --images size (flat = does not grow).
   CPU per image of (b) and (c) (all their processes, from /proc and rusage): on a shared
   machine wall-clock ratios swing with other people's load, CPU per image does not, and
   (b)/(c) of it is exactly what Ray costs. (c)'s CPU is also split by process kind
   (workers, driver, Ray's own actors and daemons): where the overhead goes.
3. Reduced-size DCT decoding: the loop on 300 large JPEGs (1024-1600 px) with and without it.
4. Bytes per record of each --encoding on the ImageNet sample (../shared/data/imagenet-sample).

    .venv/bin/python benchmarks/preprocess.py --listing 1000000    # listing only

times `list_source` on a million empty files in 1000 wnid folders (directory reads only,
no stat per file, one process), and its peak memory.

The machine may be shared: the script prints the load average before and after; compare
ratios from one run, and rerun when the load is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path("/tmp/alexnet-bench-preprocess")
STAGES = ("read", "decode", "resize", "encode", "moments", "write")


# --------------------------------------------------------------------------- data
def _make_image(args: tuple[int, int, int]) -> bytes:
    import cv2
    import numpy as np

    seed, lo, hi = args
    rng = np.random.default_rng(seed)
    w = int(rng.integers(lo, hi + 1))
    h = int(round(w * 0.75 * rng.uniform(0.9, 1.1)))
    if rng.random() < 0.2:
        w, h = h, w
    base = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8).astype(np.float32),
                      (w, h), interpolation=cv2.INTER_CUBIC)
    texture = cv2.resize(rng.standard_normal((h // 5, w // 5, 3), np.float32) * 36, (w, h),
                         interpolation=cv2.INTER_LINEAR)
    img = base + texture + rng.standard_normal((h, w, 3), np.float32) * 9
    return cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _write_one(args: tuple[Path, int, int, int]) -> int:
    path, seed, lo, hi = args
    data = _make_image((seed, lo, hi))
    path.write_bytes(data)
    return len(data)


def generate(n: int, lo: int = 400, hi: int = 600, name: str | None = None) -> Path:
    """n JPEGs in SRC/train/<wnid>/ (100 classes); reused when already there."""
    src = WORK / (name or f"src-{n}")
    done = src / ".done"
    if done.is_file():
        return src
    shutil.rmtree(src, ignore_errors=True)
    classes = [f"n{10000000 + c:08d}" for c in range(100)]
    for wnid in classes:
        (src / "train" / wnid).mkdir(parents=True)
    jobs = [(src / "train" / classes[i % 100] / f"{classes[i % 100]}_{i}.JPEG", i, lo, hi)
            for i in range(n)]
    started = time.time()
    with get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = list(pool.imap_unordered(_write_one, jobs, chunksize=64))
    print(f"generated {n} JPEGs ({lo}-{hi} px, mean {sum(sizes) / n / 1e3:.0f} KB) in "
          f"{time.time() - started:.0f} s under {src}", flush=True)
    done.write_text(json.dumps({"images": n, "mean_bytes": sum(sizes) / n}))
    return src


def list_files(src: Path) -> list[tuple[str, int]]:
    from pipelines.sources import list_source

    return list_source(src).splits["train"]


# --------------------------------------------------------------------------- (a), (b)
def loop(items: list[tuple[str, int]], root: str, lmdb_path: str, resize: int = 256,
         reduced: bool = True) -> dict:
    """The plain loop: the same functions preprocess uses, no Ray. Returns CPU seconds per
    stage (thread CPU time: what a stage costs, whatever else runs on the machine) and the
    wall-clock total."""
    import lmdb

    from pipelines import shards as sh
    from pipelines.decode import decode_rgb, encode, pixel_moments, rescale

    spent = dict.fromkeys(STAGES, 0.0)
    env = lmdb.open(lmdb_path, subdir=False, map_size=sh.MAP_SIZE, lock=False, sync=False)
    txn = env.begin(write=True)
    clock = time.thread_time
    started = time.perf_counter()
    for i, (rel, label) in enumerate(items):
        t0 = clock()
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        t1 = clock()
        rgb = decode_rgb(data, min_side=resize if reduced else 0)
        t2 = clock()
        rgb = rescale(rgb, resize)
        t3 = clock()
        image = encode(rgb, "jpeg", 90)
        t4 = clock()
        pixel_moments(rgb)
        t5 = clock()
        txn.put(sh.record_key(i), sh.pack_record(label, resize, resize, "jpeg", rel, image))
        if i % 256 == 255:
            txn.commit()
            txn = env.begin(write=True)
        t6 = clock()
        for k, a, b in zip(STAGES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6),
                           strict=True):
            spent[k] += b - a
    txn.commit()
    env.sync(True)
    env.close()
    spent["total"] = time.perf_counter() - started
    return spent


def _loop_job(args) -> dict:
    items, root, path = args
    return loop(items, root, path)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_loops(src: Path, items: list, tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    cpu = time.process_time()
    a = loop(items, str(src), str(tmp / "single.lmdb"))
    a_cpu = time.process_time() - cpu
    procs = os.cpu_count() or 1
    shares = [items[i::procs] for i in range(procs)]
    cpu = _children_cpu()
    started = time.perf_counter()
    with get_context("fork").Pool(procs) as pool:
        pool.map(_loop_job, [(s, str(src), str(tmp / f"multi-{k}.lmdb"))
                             for k, s in enumerate(shares)])
    b_wall = time.perf_counter() - started
    b_cpu = _children_cpu() - cpu  # the pool's processes, reaped on exit
    return {"a": a, "a_images_per_s": len(items) / a["total"],
            "a_cpu_ms_per_image": 1e3 * a_cpu / len(items), "b_wall_s": b_wall,
            "b_processes": procs, "b_images_per_s": len(items) / b_wall,
            "b_cpu_ms_per_image": 1e3 * b_cpu / len(items)}


# --------------------------------------------------------------------------- (c)
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> tuple[str, float]:
    """(process title, user + system CPU seconds) from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        return title, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return "", 0.0


def _kind(pid: int, title: str, driver: int) -> str:
    """Which part of the job a process is: the driver, Ray's workers, or Ray's own services."""
    if pid == driver:
        return "driver"
    if title.startswith("ray::"):  # ray::IDLE, ray::_StatsActor.register_dataset, ...
        name = title[5:].split("(")[0].split(".")[0].split(":")[-1].strip()
        return "Ray workers (decode + sink tasks)" if name in ("IDLE", "MapBatches", "Write") \
            else f"Ray {name}"
    words = title.split()
    script = next((w for w in words[1:] if w.endswith(".py")), words[0] if words else "?")
    return f"Ray {os.path.basename(script)}"


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_workflow(src: Path, out: Path, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    ray_tmp = Path(f"/tmp/rb{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "workflow.py", "preprocess", "--source", str(src), "--out",
           str(out), "--batch-size", str(batch_size)]
    peak = {"pss_kb": 0, "driver_rss_kb": 0}
    cpu: dict[int, tuple[str, float]] = {}  # (kind, last CPU seconds seen) per process
    pss_peak: dict[str, int] = {}  # peak PSS (KiB) per kind of process
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = _tree(proc.pid)
            pss = {p: _pss_kb(p) for p in pids}
            peak["pss_kb"] = max(peak["pss_kb"], sum(pss.values()))
            now: dict[str, int] = {}
            for p, kb in pss.items():
                kind = cpu[p][0] if p in cpu else "?"
                now[kind] = now.get(kind, 0) + kb
            for kind, kb in now.items():
                pss_peak[kind] = max(pss_peak.get(kind, 0), kb)
            peak["driver_rss_kb"] = max(peak["driver_rss_kb"], _rss_kb(proc.pid))
            for p in pids:
                title, seconds = _cpu_s(p)
                if seconds:  # an exiting process has no title left: keep the kind it had
                    kind = _kind(p, title, proc.pid) if title.strip() else cpu.get(p, ("?",))[0]
                    cpu[p] = (kind, seconds)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    text, _ = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"workflow.py preprocess failed:\n{text[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["splits"]["train"]["records"] + manifest["splits"]["train"]["quarantined"]
    timing = manifest["timing"]
    by_kind: dict[str, float] = {}
    for kind, seconds in cpu.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return {"images": n, "wall_s": wall, "timing": timing,
            "cpu_ms_per_image": 1e3 * sum(by_kind.values()) / n,
            "cpu_s_by_process": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "peak_pss_mb_by_process": {k: round(v / 1024) for k, v in
                                       sorted(pss_peak.items(), key=lambda kv: -kv[1])},
            "images_per_s": n / timing["pipeline_s"], "images_per_s_wall": n / wall,
            "peak_pss_mb": peak["pss_kb"] / 1024, "peak_driver_rss_mb":
                peak["driver_rss_kb"] / 1024, "summary": text.strip().splitlines()[-4:]}


# --------------------------------------------------------------------------- extras
def reduced_decode_effect(tmp: Path) -> dict:
    """The loop on large JPEGs with and without DCT-domain reduction, alternated three times
    (CPU per image, best of three: robust to other people's load)."""
    src = generate(300, 1024, 1600, name="src-large-300")
    items = list_files(src)
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(3):
        for reduced in (True, False):
            path = tmp / f"reduced-{reduced}.lmdb"
            path.unlink(missing_ok=True)
            runs[reduced].append(loop(items, str(src), str(path), reduced=reduced))
    best = {r: min(rs, key=lambda x: sum(x[k] for k in STAGES)) for r, rs in runs.items()}
    cpu = {r: 1e3 * sum(b[k] for k in STAGES) / len(items) for r, b in best.items()}
    return {"images": len(items), "cpu_ms_with": cpu[True], "cpu_ms_without": cpu[False],
            "decode_ms_with": 1e3 * best[True]["decode"] / len(items),
            "decode_ms_without": 1e3 * best[False]["decode"] / len(items),
            "resize_ms_with": 1e3 * best[True]["resize"] / len(items),
            "resize_ms_without": 1e3 * best[False]["resize"] / len(items)}


def bytes_per_record() -> dict:
    from pipelines.preprocess import process_one
    from pipelines.sources import list_source

    sample = REPO.parent / "shared" / "data" / "imagenet-sample"
    if not (sample / "train").is_dir():
        return {}
    listing = list_source(sample)
    items = [it for split in listing.splits.values() for it in split]
    out = {}
    for enc in ("jpeg", "raw"):
        sizes = [len(process_one((sample / rel).read_bytes(), None, 256, True, enc, 90, True)[1])
                 for rel, _ in items]
        out[enc] = sum(sizes) / len(sizes)
    out["images"] = len(items)
    return out


def listing_scale(n: int) -> dict:
    """Time list_source on n empty files in 1000 wnid folders (the shape of ILSVRC train):
    listing reads directories only, so empty files list exactly like JPEGs."""
    from pipelines.sources import list_source

    src = WORK / f"listing-{n}"
    if not (src / ".done").is_file():
        shutil.rmtree(src, ignore_errors=True)
        per = -(-n // 1000)
        for c in range(1000):
            d = src / "train" / f"n{20000000 + c:08d}"
            d.mkdir(parents=True)
            for i in range(min(per, n - c * per)):
                os.close(os.open(d / f"n{20000000 + c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY))
        (src / ".done").write_text(str(n))
    started, cpu = time.perf_counter(), time.process_time()
    listing = list_source(src)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"paths": len(listing.splits["train"]), "seconds": seconds,
            "cpu_s": time.process_time() - cpu, "peak_rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[5000],
                    help="dataset sizes; the loops run on the first, (c) on each")
    ap.add_argument("--batch-size", type=int, default=32, help="preprocess --batch-size")
    ap.add_argument("--listing", type=int, default=0, metavar="N",
                    help="only time listing N paths (empty files in 1000 folders), e.g. 1000000")
    args = ap.parse_args()
    if args.listing:
        print(json.dumps(listing_scale(args.listing)))
        return
    print(f"cpus {os.cpu_count()}, load average before {os.getloadavg()}", flush=True)
    tmp = WORK / "out"
    shutil.rmtree(tmp, ignore_errors=True)
    srcs = {n: generate(n) for n in args.images}
    n0 = args.images[0]
    items = list_files(srcs[n0])
    loops = run_loops(srcs[n0], items, tmp / "loops")
    a = loops["a"]
    print(f"(a) single-process loop: {loops['a_images_per_s']:.1f} images/s; CPU per image: "
          + ", ".join(f"{k} {1e3 * a[k] / len(items):.2f} ms "
                      f"({100 * a[k] / sum(a[s] for s in STAGES):.0f}%)" for k in STAGES),
          flush=True)
    print(f"    CPU {loops['a_cpu_ms_per_image']:.2f} ms per image", flush=True)
    print(f"(b) the loop in {loops['b_processes']} processes: {loops['b_images_per_s']:.1f} "
          f"images/s; CPU {loops['b_cpu_ms_per_image']:.2f} ms per image", flush=True)
    results = {}
    for n in args.images:
        c = run_workflow(srcs[n], tmp / f"shards-{n}", args.batch_size)
        results[n] = c
        print(f"(c) workflow.py preprocess, {n} images: {c['images_per_s']:.1f} images/s over "
              f"the pipeline ({c['timing']['pipeline_s']} s), {c['images_per_s_wall']:.1f} over "
              f"the wall ({c['wall_s']:.1f} s, of which Ray start {c['timing']['ray_start_s']} s,"
              f" listing {c['timing']['listing_s']} s, plan {c['timing']['plan_s']} s); peak "
              f"PSS {c['peak_pss_mb']:.0f} MB (all processes), driver RSS "
              f"{c['peak_driver_rss_mb']:.0f} MB", flush=True)
        print(f"    CPU {c['cpu_ms_per_image']:.2f} ms per image, all processes; seconds: "
              + ", ".join(f"{k} {v:.1f}" for k, v in c["cpu_s_by_process"].items()), flush=True)
        print("    peak PSS MB by process kind: " + ", ".join(
            f"{k} {v}" for k, v in c["peak_pss_mb_by_process"].items()), flush=True)
    c0 = results[n0]
    print(f"ratio (c)/(b): {c0['images_per_s'] / loops['b_images_per_s']:.2f} over the "
          f"pipeline, {c0['images_per_s_wall'] / loops['b_images_per_s']:.2f} over the wall "
          "(goal >= 0.85)", flush=True)
    print(f"CPU efficiency (b)/(c): {loops['b_cpu_ms_per_image'] / c0['cpu_ms_per_image']:.2f} "
          "(CPU per image of the loop / of the pipeline: what Ray costs, whatever the load)",
          flush=True)
    red = reduced_decode_effect(tmp)
    print(f"reduced DCT decoding on {red['images']} JPEGs of 1024-1600 px: CPU per image "
          f"{red['cpu_ms_with']:.1f} ms with, {red['cpu_ms_without']:.1f} ms without (decode "
          f"{red['decode_ms_with']:.1f} vs {red['decode_ms_without']:.1f} ms, resize "
          f"{red['resize_ms_with']:.1f} vs {red['resize_ms_without']:.1f} ms)", flush=True)
    enc = bytes_per_record()
    if enc:
        print(f"bytes per 256x256 record on the ImageNet sample ({enc['images']} images): "
              f"jpeg q90 {enc['jpeg']:.0f}, raw {enc['raw']:.0f}")
    print(f"load average after {os.getloadavg()}")
    print(json.dumps({"loops": {k: v for k, v in loops.items() if k != "a"},
                      "stages_ms": {k: 1e3 * a[k] / len(items) for k in STAGES},
                      "workflow": {n: {k: v for k, v in c.items() if k != "summary"}
                                   for n, c in results.items()},
                      "reduced_decode": red, "bytes_per_record": enc}, default=float))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
