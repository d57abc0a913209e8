"""Batch inference throughput and memory: `batch-infer` end to end against a bare PyTorch loop.

    .venv/bin/python benchmarks/batch_infer.py                  # 2000 images, threads = cores
    .venv/bin/python benchmarks/batch_infer.py --images 8000 --threads 8 --batch-size 64

All in one run, so the ratios compare like with like:

1. Generates ImageNet-sized JPEGs (300-500 px sides, like ILSVRC photos; 10 synthetic
   classes) under /tmp/alexnet-bench, kept between runs, and a 1000-class torchvision-layout
   AlexNet bundle (random weights: the speed does not depend on them). Input: an images-list
   file of the first N of them.
2. Baseline: one process, `torch.set_num_threads(THREADS)`, a plain loop over batches: read
   -> decode_rgb -> the model's rescale 256 + centre 224 crop -> predict_proba -> top-5 ->
   one Parquet file. Timed from cold (importing torch and loading the model count, as they
   do in the pipeline's actors); also timed after the model load, and per stage.
3. The pipeline: `run_batch_infer` (listing, Ray Data decode tasks, the actor pool, Parquet
   streamed through the driver) on the fresh local Ray it starts itself, exactly as
   `workflow.py batch-infer` does: first its automatic layout (no flags), then one actor of
   THREADS threads, then one actor of one thread (for the scaling with actors). Ray's own
   start is timed apart: a cluster is started once, not per job.
4. The load of a shared machine drifts within minutes, so a baseline runs before and after
   every pipeline run and each ratio is against the mean of the two around it. CPU seconds
   of the whole process tree per image are reported too: they move less with the load.
5. Memory: the pipeline on N/4 and on N images; the peak proportional set size (PSS, so
   shared pages such as the object store count once) summed over the driver and every Ray
   process it started, sampled every 0.2 s, in runs of their own (reading PSS that often
   costs the run being timed 13 % of a 2-core machine; timed runs read CPU times only).
   Flat means peak(N) / peak(N/4) near 1.

Each measurement runs in a fresh child process. Prints one line per run and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from proctree import run_measured  # noqa: E402 - benchmarks/ is this script's folder

WORK = Path("/tmp/alexnet-bench")


# --------------------------------------------------------------------------- setup
def prepare(images: int) -> tuple[Path, Path]:
    """ImageNet-sized JPEGs (10 classes) and a 1000-class bundle; reused when present."""
    from pipelines.data.sample import make_sample

    per_class = -(-images // 10)
    src = WORK / f"src-{per_class * 10}"
    if not (src / ".sample.json").is_file():
        make_sample(src, classes=10, train_per_class=per_class, val_per_class=1, seed=0,
                    min_side=300, max_side=500)
    bundle = WORK / "model"
    if not (bundle / "inference.json").is_file():
        import torch

        from alexnet import build_model
        from pipelines.serve.model import save_bundle

        torch.manual_seed(0)
        net = build_model("torchvision", 1000, init="default")
        classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)]
        save_bundle(bundle, net.state_dict(), {
            "variant": "torchvision", "groups": 1, "num_classes": 1000, "input_size": 224,
            "resize": 256, "mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4],
            "classes": classes})
    return src, bundle


def image_list(src: Path, n: int) -> Path:
    """An images-list file of the first n images (the pipeline reads it as any user would)."""
    files = sorted(str(p) for p in (src / "train").glob("*/*.JPEG"))[:n]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images in {src}")
    path = WORK / f"list-{n}.txt"
    path.write_text("".join(f"{f}\n" for f in files))
    return path


# --------------------------------------------------------------------------- children
def child_baseline(args) -> dict:
    # Timed from cold, as the pipeline is: importing torch and loading the model count, as
    # they do in the pipeline's actors (Ray's own start does not count on either side).
    started = time.perf_counter()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines.data.decode import decode_rgb
    from pipelines.serve.model import load_bundle, predict_proba, preprocess_image

    torch.set_num_threads(args.threads)
    files = Path(args.list).read_text().split()
    model, info = load_bundle(args.bundle)
    t_decode = t_model = 0.0
    ready = time.perf_counter()
    writer = None
    out = WORK / "baseline.parquet"
    for o in range(0, len(files), args.batch_size):
        t0 = time.perf_counter()
        crops = []
        for f in files[o:o + args.batch_size]:
            with open(f, "rb") as fh:
                crops.append(preprocess_image(decode_rgb(fh.read()), info))
        t1 = time.perf_counter()
        probs = predict_proba(model, np.stack(crops), info)
        idx = np.argsort(-probs, axis=1)[:, :5]
        t2 = time.perf_counter()
        table = pa.table({"path": files[o:o + args.batch_size],
                          "top5_index": idx.tolist(),
                          "top5_prob": np.take_along_axis(probs, idx, 1).tolist()})
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        t_decode, t_model = t_decode + t1 - t0, t_model + t2 - t1
    writer.close()
    ended = time.perf_counter()
    n = len(files)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "images": n, "seconds": ended - started, "images_per_s": n / (ended - started),
            "start_s": ready - started, "steady_images_per_s": n / (ended - ready),
            "decode_ms": 1e3 * t_decode / n, "model_ms": 1e3 * t_model / n}


def child_pipeline(args) -> dict:
    import ray

    from pipelines.config import InferConfig
    from pipelines.serve import output
    from pipelines.serve.infer import run_batch_infer

    ray.data.DataContext.get_current().enable_progress_bars = False
    # When each batch of rows reaches the driver, to tell start-up (listing, workers and
    # actors starting, model load) from the rate once rows flow: the summary counts every
    # batch as it arrives, so its update is timed here, in this measuring process only.
    arrivals: list[tuple[float, int]] = []
    count = output.Summary.update

    def timed(self, table):
        count(self, table)
        arrivals.append((time.perf_counter(), self.images))

    output.Summary.update = timed
    cfg = InferConfig(model=[args.bundle], input=args.list, output=str(WORK / "pipe.parquet"),
                      batch_size=args.batch_size, actors=args.actors,
                      cpus_per_actor=args.cpus_per_actor, overwrite=True)  # repeated runs
    t0 = time.perf_counter()
    result = run_batch_infer(cfg)  # starts the same local Ray as `workflow.py batch-infer`
    seconds = time.perf_counter() - t0 - result["ray_start_s"]
    ray.shutdown()
    # The steady rate over the second half of the rows (batches arrive in bursts at first,
    # while the actors catch up with decoded inputs queued for them).
    images, (ended, _) = result["images"], arrivals[-1]
    t_half, n_half = next(a for a in arrivals if a[1] >= images / 2)
    steady = (images - n_half) / (ended - t_half) if ended > t_half and images > n_half else 0.0
    return {"images": result["images"], "errors": result["errors"], "seconds": seconds,
            "ray_start_s": result["ray_start_s"], "images_per_s": result["images"] / seconds,
            "first_rows_s": arrivals[0][0] - t0 - result["ray_start_s"],
            "steady_images_per_s": steady,
            "actors": result["actors"], "cpus_per_actor": result["cpus_per_actor"]}


# --------------------------------------------------------------------------- measurement
def run_child(kind: str, args, memory: bool = False, **extra) -> dict:
    """Run one measurement in a fresh process; returns its figures plus the CPU seconds its
    process tree used (sampled every 0.5 s, so a process's last fraction of a second can be
    missed) and, for a `memory` run, the tree's peak PSS (MB). PSS is read only in memory
    runs: reading it every 0.2 s cost 9.7 CPU-s of a 38 s pipeline run (13 % of this 2-core
    machine; the bare loop, one process, pays far less), which would bias the speed ratio."""
    cmd = [sys.executable, __file__, "--child", kind, "--bundle", str(args.bundle),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    result, tree = run_measured(cmd, env={"RAY_DEDUP_LOGS": "0"}, cwd=WORK, memory=memory)
    if memory:
        result["peak_pss_mb"] = round(tree.peak_pss_kb / 1024, 1)
    result["cpu_s"] = round(tree.cpu_s(), 1)
    result["cpu_ms_per_image"] = round(1e3 * result["cpu_s"] / result["images"], 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images for the throughput runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="model threads of the bare loop (default: the cores, as the pipeline's "
                   "automatic layout uses)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--child", choices=("baseline", "pipeline"), help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--list", help=argparse.SUPPRESS)
    p.add_argument("--actors", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cpus-per-actor", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = child_baseline if args.child == "baseline" else child_pipeline
        print(json.dumps(fn(args)))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    src, args.bundle = prepare(args.images)
    full, quarter = image_list(src, args.images), image_list(src, args.images // 4)
    load = os.getloadavg()[0]
    print(f"{args.images} images, {args.threads} model threads, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, load average {load:.1f} at start", flush=True)

    t = args.threads
    # The automatic layout `batch-infer` picks on this machine (no flags), then one actor with
    # all THREADS, then one actor of one thread (with the automatic t x 1 layout it shows how
    # the pool scales with actors). Every run starts the local Ray `batch-infer` starts itself
    # (one logical CPU more than the cores, for the decode tasks); its start is timed apart.
    layouts = [(0, 0), (1, t), (1, 1)] if t > 1 else [(0, 0), (1, 1)]
    # On a shared machine the load drifts within minutes: a baseline runs before and after
    # every pipeline run, and each ratio is against the mean of the two around it.
    bases = [run_child("baseline", args, list=full)]
    _say_base(bases[-1])
    rows = []
    for actors, cpus in layouts:
        r = run_child("pipeline", args, list=full, actors=actors, cpus_per_actor=cpus)
        bases.append(run_child("baseline", args, list=full))
        _say_base(bases[-1])
        ref = (bases[-2]["images_per_s"] + bases[-1]["images_per_s"]) / 2
        ref_cpu = (bases[-2]["cpu_ms_per_image"] + bases[-1]["cpu_ms_per_image"]) / 2
        ref_steady = (bases[-2]["steady_images_per_s"] + bases[-1]["steady_images_per_s"]) / 2
        layout = f"{r['actors']} actor(s) x {r['cpus_per_actor']} thread(s)"
        r.update(layout=layout + (" (automatic)" if not actors else ""),
                 baseline_images_per_s=ref, ratio=r["images_per_s"] / ref,
                 steady_ratio=r["steady_images_per_s"] / ref_steady,
                 cpu_ratio=r["cpu_ms_per_image"] / ref_cpu)
        rows.append(r)
        print(f"pipeline {r['layout']}: {r['images_per_s']:.1f} images/s end to end = "
              f"{r['ratio']:.2f}x the baselines around it ({ref:.1f}); once rows flow "
              f"{r['steady_images_per_s']:.1f} images/s = {r['steady_ratio']:.2f}x the loop's "
              f"after its model load (first rows "
              f"after {r['first_rows_s']:.1f} s; Ray start {r['ray_start_s']:.1f} s apart); "
              f"CPU {r['cpu_ms_per_image']:.0f} ms/image = {r['cpu_ratio']:.2f}x the "
              f"baseline's", flush=True)
    small = run_child("pipeline", args, memory=True, list=quarter)
    big = run_child("pipeline", args, memory=True, list=full)
    growth = big["peak_pss_mb"] / small["peak_pss_mb"]
    print(f"peak memory (PSS, driver + Ray), automatic layout, in runs of their own: "
          f"{small['peak_pss_mb']:.0f} MB on {small['images']} images, "
          f"{big['peak_pss_mb']:.0f} MB on {big['images']} images: x{growth:.2f} for 4x the "
          f"input (baseline process: peak RSS {bases[0]['peak_rss_mb']:.0f} MB)")
    one = next((r for r in rows if (r["actors"], r["cpus_per_actor"]) == (1, 1)), None)
    many = next((r for r in rows if r["actors"] > 1 and r["cpus_per_actor"] == 1), None)
    if one and many:
        print(f"scaling with actors of 1 thread: 1 -> {many['actors']} actors "
              f"x{many['steady_images_per_s'] / one['steady_images_per_s']:.2f} once rows flow, "
              f"x{many['images_per_s'] / one['images_per_s']:.2f} end to end, on "
              f"{os.cpu_count()} cores")
    base = bases[0]
    per_image_model = base["model_ms"] * t  # one thread's cost, if threads scaled perfectly
    print(f"per-stage cost (first baseline): model ~{per_image_model:.0f} ms/image on one "
          f"thread (~{1e3 / per_image_model:.0f} images/s per actor thread), "
          f"decode+rescale+crop ~{base['decode_ms']:.1f} ms/image "
          f"(~{1e3 / base['decode_ms']:.0f} images/s per decode CPU)")
    print(json.dumps({"baselines": bases, "pipeline": rows, "memory_quarter": small,
                      "memory_full": big,
                      "memory_growth_4x": round(growth, 3), "load_average_start": load,
                      "load_average_end": os.getloadavg()[0]}))


def _say_base(b: dict) -> None:
    print(f"baseline loop: {b['images_per_s']:.1f} images/s from cold, "
          f"{b['steady_images_per_s']:.1f} after {b['start_s']:.1f} s of imports and model load "
          f"(decode+preprocess "
          f"{b['decode_ms']:.1f} ms/image, model {b['model_ms']:.1f} ms/image; CPU "
          f"{b['cpu_ms_per_image']:.0f} ms/image)", flush=True)


if __name__ == "__main__":
    main()
