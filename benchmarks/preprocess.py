"""Preprocess throughput and memory: `workflow.py preprocess` against plain loops doing the
same work with the same libraries.

    .venv/bin/python benchmarks/preprocess.py                       # 5,000 images
    .venv/bin/python benchmarks/preprocess.py --images 5000 20000   # and memory at two sizes

All in one run, so the ratios compare like with like:

1. Generates ImageNet-like JPEGs under /tmp/alexnet-bench-preprocess (kept between runs):
   100 wnid folders, sides about 500x375 (400-600 x 300-450, one in five portrait), photo-like
   content (smooth colour fields, texture, sensor noise) at quality 90, ~80-90 KB each
   (ILSVRC-2012 JPEGs average ~110 KB). Sizes above 20,000 hard-link the 20,000 under
   further names (generating costs ~35 ms an image); decoding them costs the same.
2. (a) one process, a plain loop over every file: read -> decode_rgb -> rescale 256 ->
   JPEG encode (q90) -> exact pixel moments -> pack_record -> LMDB put (one txn per 256),
   timing each stage (this is where the time goes).
   (b) the same loop in os.cpu_count() processes (fork), each on its share, its own LMDB.
   (c) `python workflow.py preprocess` as a subprocess, twice over:
       - "fresh": on a local Ray it starts itself (what one command on a laptop costs);
       - "running": as a job on a Ray started beforehand with `ray start --head` (what a job
         on a cluster costs: the cluster is started once, not per job).
   (b) and (c) alternate --repeat times per size, since a shared machine's load drifts within
   minutes; the best run of each is compared (as timeit does), the medians are printed too.
   images/s of (c) over its whole wall time and over its pipeline (manifest timing.pipeline_s:
   decode tasks + shard commits, after Ray's start, listing and planning); with two sizes,
   the marginal rate (images beyond the smaller run / extra seconds), which is the rate at
   ImageNet scale, where start-up is paid once for a million images.
   Peak memory of the fresh (c): the proportional set size (PSS: shared pages such as the
   object store count once) summed over the driver and every process it started, sampled
   every 0.2 s (benchmarks/proctree.py), and the driver's own peak RSS; shown per size (flat
   = does not grow). Reading PSS that often costs CPU (13 % of this 2-core machine for a
   Ray job's ~15 processes), so it is measured in one more run of (c) per size, not in the
   timed ones, which read only CPU times (cheap) every 0.5 s. CPU per image of (b) and (c)
   (all their processes): on a shared machine wall-clock ratios swing with other people's
   load, CPU per image much less, and (b)/(c) of it is what Ray costs; (c)'s CPU is also
   split by process kind.
3. Reduced-size DCT decoding: the loop on 300 large JPEGs (1024-1600 px) with and without it.
4. Bytes per record of each --encoding on the ImageNet sample (../shared/data/imagenet-sample).

    .venv/bin/python benchmarks/preprocess.py --listing 1000000    # listing only

times `list_source` on a million empty files in 1000 wnid folders (directory reads only,
no stat per file, one process), and its peak memory.

The script prints the load average before and after; rerun when the load is high.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from proctree import run_measured  # noqa: E402 - benchmarks/ is this script's folder

WORK = Path("/tmp/alexnet-bench-preprocess")
STAGES = ("read", "decode", "resize", "encode", "moments", "write")
SINGLE_MAX = 5000  # (a) gives where the time goes: 5,000 images tell that as well as more


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


GENERATE_MAX = 20000


def generate(n: int, lo: int = 400, hi: int = 600, name: str | None = None) -> Path:
    """n JPEGs in SRC/train/<wnid>/ (100 classes); reused when already there. Above
    GENERATE_MAX images, the GENERATE_MAX set is hard-linked under further names instead:
    generating costs ~35 ms of CPU an image here (100,000 would take half an hour on 2 cores).
    Decoding them costs the same; only the page cache holds fewer distinct bytes, for (b)
    and (c) alike."""
    if n > GENERATE_MAX and not name:
        return _linked(n)
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


def _linked(n: int) -> Path:
    base = generate(GENERATE_MAX)
    src = WORK / f"src-{n}-linked"
    if (src / ".done").is_file():
        return src
    shutil.rmtree(src, ignore_errors=True)
    files = sorted((base / "train").glob("*/*.JPEG"))
    for i in range(n):
        f = files[i % len(files)]
        (src / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, src / "train" / f.parent.name / f"{f.stem}_c{i // len(files)}{f.suffix}")
    (src / ".done").write_text(json.dumps({"images": n, "linked_from": base.name}))
    return src


def list_files(src: Path) -> list[tuple[str, int]]:
    from pipelines.data.sources import list_source

    return list_source(src).splits["train"]


# --------------------------------------------------------------------------- (a), (b)
def loop(items: list[tuple[str, int]], root: str, lmdb_path: str, resize: int = 256,
         reduced: bool = True) -> dict:
    """The plain loop: the same functions preprocess uses, no Ray. Returns CPU seconds per
    stage (thread CPU time: what a stage costs, whatever else runs on the machine) and the
    wall-clock total."""
    import lmdb

    from pipelines.data.decode import decode_rgb, encode, pixel_moments, rescale
    from pipelines.data.shards import MAP_SIZE, pack_record, record_key

    spent = dict.fromkeys(STAGES, 0.0)
    env = lmdb.open(lmdb_path, subdir=False, map_size=MAP_SIZE, lock=False, sync=False)
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
        txn.put(record_key(i), pack_record(label, resize, resize, "jpeg", rel, image))
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


def run_single(src: Path, items: list, tmp: Path) -> dict:
    """(a): the loop in this process; CPU per stage and per image."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "single.lmdb").unlink(missing_ok=True)
    cpu = time.process_time()
    a = loop(items, str(src), str(tmp / "single.lmdb"))
    return {"stages": a, "images_per_s": len(items) / a["total"],
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / len(items)}


def run_multi(src: Path, items: list, tmp: Path) -> dict:
    """(b): the loop in os.cpu_count() forked processes, each on its share, its own LMDB."""
    tmp.mkdir(parents=True, exist_ok=True)
    procs = os.cpu_count() or 1
    shares = [items[i::procs] for i in range(procs)]
    for k in range(procs):
        (tmp / f"multi-{k}.lmdb").unlink(missing_ok=True)
    cpu = _children_cpu()
    started = time.perf_counter()
    with get_context("fork").Pool(procs) as pool:
        pool.map(_loop_job, [(s, str(src), str(tmp / f"multi-{k}.lmdb"))
                             for k, s in enumerate(shares)])
    wall = time.perf_counter() - started
    return {"processes": procs, "wall_s": wall, "images_per_s": len(items) / wall,
            "cpu_ms_per_image": 1e3 * (_children_cpu() - cpu) / len(items)}  # reaped on exit


# --------------------------------------------------------------------------- (c)
def run_workflow(src: Path, out: Path, batch_size: int, address: str | None = None,
                 memory: bool = False) -> dict:
    """`workflow.py preprocess` as a subprocess: on a fresh local Ray of its own (address
    None), or as a job on the running Ray at `address` (a cluster's Ray is started once, not
    per job; its processes are not the job's, so memory is reported for the first kind).
    `memory`: sample PSS too; that costs the run CPU (proctree.TreeSampler), so speed runs
    read CPU times only and memory is measured in runs of its own."""
    shutil.rmtree(out, ignore_errors=True)
    ray_tmp = Path(f"/tmp/rb{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = {"RAY_TMPDIR": str(ray_tmp)}
    if address:
        env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    cmd = [sys.executable, "workflow.py", "preprocess", "--source", str(src), "--out",
           str(out), "--batch-size", str(batch_size)]
    started = time.perf_counter()
    try:
        text, tree = run_measured(cmd, env={**env, **({} if address else {"RAY_ADDRESS": ""})},
                                  cwd=REPO, json_result=False, memory=memory)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["splits"]["train"]["records"] + manifest["splits"]["train"]["quarantined"]
    timing = manifest["timing"]
    result = {"images": n, "wall_s": wall, "timing": timing,
              "cpu_ms_per_image": 1e3 * tree.cpu_s() / n,
              "cpu_s_by_process": tree.cpu_s_by_kind(),
              "images_per_s": n / timing["pipeline_s"], "images_per_s_wall": n / wall,
              "summary": text.strip().splitlines()[-4:]}
    if memory:  # a speed run read no PSS: no zeros that would read as measured memory
        result.update(peak_pss_mb_by_process=tree.peak_pss_mb_by_kind(),
                      peak_pss_mb=tree.peak_pss_kb / 1024,
                      peak_driver_rss_mb=tree.peak_root_rss_kb / 1024)
    return result


class RunningRay:
    """A local Ray started once (`ray start --head`, as on a cluster) for the warm runs;
    stopped by its own processes, never `ray stop` (which would stop everyone's)."""

    def __enter__(self) -> str:
        from cluster.services import start_head
        from pipelines.runtime import free_port

        self.state = Path(f"/tmp/rbh{os.getpid()}")
        self.node = start_head(self.state, port=free_port(), dashboard_port=free_port(),
                               num_cpus=os.cpu_count())
        return self.node["gcs_address"]

    def __exit__(self, *exc) -> None:
        from cluster.local import stop_node

        stop_node(self.node)
        shutil.rmtree(self.state, ignore_errors=True)


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
    from pipelines.data.preprocess import process_one
    from pipelines.data.sources import list_source

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
    from pipelines.data.sources import list_source

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


def _best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def _describe_c(c: dict) -> str:
    t = c["timing"]
    return (f"{c['images_per_s']:.1f} images/s over the pipeline ({t['pipeline_s']} s), "
            f"{c['images_per_s_wall']:.1f} over the wall ({c['wall_s']:.1f} s, of which Ray "
            f"start {t['ray_start_s']} s, listing {t['listing_s']} s, plan {t['plan_s']} s)")


def compare(srcs: dict[int, Path], tmp: Path, batch_size: int, repeat: int,
            address: str | None) -> dict:
    """(b) and (c) alternated `repeat` times per size (the load of a shared machine drifts
    within minutes); the best run of each is compared, as timeit does."""
    mode = "as a job on a running Ray" if address else "on a fresh local Ray of its own"
    results = {}
    for n, src in srcs.items():
        items = list_files(src)
        bs, cs = [], []
        for _ in range(repeat):
            bs.append(run_multi(src, items, tmp / "loops"))
            cs.append(run_workflow(src, tmp / f"shards-{n}", batch_size, address))
            print(f"  {n} images: (b) {bs[-1]['images_per_s']:.1f} images/s; (c) "
                  f"{cs[-1]['images_per_s']:.1f} over the pipeline, "
                  f"{cs[-1]['images_per_s_wall']:.1f} over the wall", flush=True)
        b, c = _best(bs, "images_per_s"), _best(cs, "images_per_s_wall")
        if not address:  # memory in a run of its own: sampling PSS slows the run it samples
            m = run_workflow(src, tmp / f"shards-{n}", batch_size, None, memory=True)
            c.update({k: m[k] for k in ("peak_pss_mb", "peak_pss_mb_by_process",
                                        "peak_driver_rss_mb")})
        print(f"(b) the loop in {b['processes']} processes, {n} images: "
              f"{b['images_per_s']:.1f} images/s (best of {repeat}; median "
              f"{statistics.median(r['images_per_s'] for r in bs):.1f}); CPU "
              f"{b['cpu_ms_per_image']:.2f} ms per image", flush=True)
        print(f"(c) workflow.py preprocess {mode}, {n} images: {_describe_c(c)}",
              flush=True)
        if not address:
            print(f"    CPU {c['cpu_ms_per_image']:.2f} ms per image, all processes; in a "
                  f"memory run of its own: peak PSS {c['peak_pss_mb']:.0f} MB (all processes), driver RSS "
                  f"{c['peak_driver_rss_mb']:.0f} MB; by process kind: " + ", ".join(
                      f"{k} {v}" for k, v in c["peak_pss_mb_by_process"].items()), flush=True)
        ratio = {"pipeline": max(r["images_per_s"] for r in cs) / b["images_per_s"],
                 "wall": c["images_per_s_wall"] / b["images_per_s"]}
        if not address:  # on a running Ray the workers are not the command's children
            print("    CPU seconds by process: " + ", ".join(
                f"{k} {v:.1f}" for k, v in c["cpu_s_by_process"].items()), flush=True)
            ratio["cpu"] = b["cpu_ms_per_image"] / c["cpu_ms_per_image"]
        print(f"ratio (c)/(b), {n} images, {mode}: {ratio['wall']:.2f} over the wall, "
              f"{ratio['pipeline']:.2f} over the pipeline (goal >= 0.85)" + (
                  f"; CPU efficiency (b)/(c) {ratio['cpu']:.2f}" if "cpu" in ratio else ""),
              flush=True)
        results[n] = {"b": b, "c": {k: v for k, v in c.items() if k != "summary"},
                      "b_runs": [r["images_per_s"] for r in bs],
                      "c_runs_wall": [r["images_per_s_wall"] for r in cs],
                      "c_runs_pipeline": [r["images_per_s"] for r in cs], "ratio": ratio}
    if len(srcs) > 1:  # what each image beyond the smallest run costs: the rate at scale
        (n0, r0), (n1, r1) = sorted(results.items())[0], sorted(results.items())[-1]
        marginal = (n1 - n0) / (r1["c"]["wall_s"] - r0["c"]["wall_s"])
        b_rate = statistics.mean([r0["b"]["images_per_s"], r1["b"]["images_per_s"]])
        print(f"marginal rate of (c) {mode}, images {n0} -> {n1}: {marginal:.1f} images/s = "
              f"{marginal / b_rate:.2f} of (b)", flush=True)
        results["marginal"] = {"images_per_s": marginal, "ratio": marginal / b_rate}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[5000],
                    help="dataset sizes; (a) runs on the first (at most 5,000 of its images), "
                    "(b) and (c) on each")
    ap.add_argument("--batch-size", type=int, default=1024, help="preprocess --batch-size")
    ap.add_argument("--repeat", type=int, default=2,
                    help="(b) and (c) alternated this many times per size; best of each")
    ap.add_argument("--modes", nargs="+", default=["fresh", "running"],
                    choices=["fresh", "running"],
                    help="(c) on a fresh local Ray of its own, and/or on a running Ray")
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
    items = list_files(srcs[n0])[:SINGLE_MAX]
    a = run_single(srcs[n0], items, tmp / "loops")
    st = a["stages"]
    print(f"(a) single-process loop, {len(items)} images: {a['images_per_s']:.1f} images/s; CPU "
          f"{a['cpu_ms_per_image']:.2f} ms per image: " + ", ".join(
              f"{k} {1e3 * st[k] / len(items):.2f} ms "
              f"({100 * st[k] / sum(st[s] for s in STAGES):.0f}%)" for k in STAGES),
          flush=True)
    report = {"a": {"images_per_s": a["images_per_s"],
                    "cpu_ms_per_image": a["cpu_ms_per_image"],
                    "stages_ms": {k: 1e3 * st[k] / len(items) for k in STAGES}}}
    if "fresh" in args.modes:
        report["fresh"] = compare(srcs, tmp, args.batch_size, args.repeat, None)
    if "running" in args.modes:
        with RunningRay() as address:
            report["running"] = compare(srcs, tmp, args.batch_size, args.repeat, address)
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
    report.update(reduced_decode=red, bytes_per_record=enc)
    print(json.dumps(report, default=float))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
