"""Training-input throughput per CPU core: our LMDB-shard loader against the usual
torchvision ImageFolder + RandomResizedCrop on the raw JPEGs, and against Ray Data ingest.

    .venv/bin/python benchmarks/ingest.py                 # 600 images, ~3 min on 2 cores
    .venv/bin/python benchmarks/ingest.py --images 2000 --seconds 10

All in one run, so the ratios compare like with like:

1. Generates ImageNet-like JPEGs under /tmp/alexnet-bench-ingest (kept between runs): 20 wnid
   folders, about 500x375 (400-600 x 300-450), photo-like content at quality 90 (~100 KB,
   like ILSVRC-2012), then `workflow.py preprocess --resize 256` makes JPEG shards and
   `--encoding raw` shards from them (a one-off cost per dataset, not measured here).
2. Each measurement runs in a fresh process pinned to one core (`sched_setaffinity`,
   torch/OpenCV threads 1, DataLoader num_workers=0: every byte of work on that core) and
   counts uint8 224x224 training crops with random flips delivered in batches of 128, for at
   least --seconds, whole epochs:
   (a) ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor +
       Normalize (float32, what most PyTorch AlexNet implementations feed their model);
   (b) ImageFolder, uint8: the same with PILToTensor (uint8 out, no normalisation: the strict
       like-for-like baseline, since our loader also stops at uint8);
   (c) ours: `pipelines.train.ingest.make_loader(mode="train")` over the JPEG shards (decode 256x256,
       random 224 crop + flip, uint8) - what each Ray Train worker runs;
   (d) ours over raw-encoded shards (no decode: the disk-for-CPU trade);
   (e) Ray Data: the same records and crops through `ray.data` (`map_batches` tasks over
       record keys, `iter_torch_batches`) on a local Ray with one CPU, all its processes on
       the same core, as a `TorchTrainer(datasets=...)` worker would consume them.
   Per core means per CPU second: images / (user + system CPU seconds of the measuring
   process and everything it started, Ray's GCS, raylet and workers included). On a shared
   machine that figure holds still while wall-clock images/s (also printed) swings with the
   neighbours' load.
3. Peak memory: the proportional set size (PSS) summed over the measuring process and
   everything it started (Ray's GCS, raylet, workers), sampled every 0.2 s.

The machine may be shared: the script prints the load average; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from proctree import run_measured  # noqa: E402 - benchmarks/ is this script's folder

WORK = Path("/tmp/alexnet-bench-ingest")
CROP, BATCH = 224, 128


# --------------------------------------------------------------------------- data
def _image(seed: int) -> bytes:
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    w = int(rng.integers(400, 601))
    h = int(round(w * 0.75 * rng.uniform(0.9, 1.1)))
    base = cv2.resize(rng.integers(0, 256, (6, 8, 3)).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    texture = cv2.resize(rng.standard_normal((h // 5, w // 5, 3)).astype(np.float32) * 36,
                         (w, h), interpolation=cv2.INTER_LINEAR)
    img = base + texture + rng.standard_normal((h, w, 3)).astype(np.float32) * 9
    return cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def prepare(n: int) -> dict[str, Path]:
    """SRC (ImageFolder tree) and two preprocess OUTs (jpeg, raw); reused when present."""
    src = WORK / f"src-{n}"
    if not (src / ".done").is_file():
        shutil.rmtree(src, ignore_errors=True)
        sizes = []
        for i in range(n):
            wnid = f"n{10000000 + i % 20:08d}"
            (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
            data = _image(i)
            (src / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(data)
            sizes.append(len(data))
        (src / ".done").write_text(json.dumps({"images": n, "mean_kb": sum(sizes) / n / 1e3}))
    out = {"src": src}
    for enc in ("jpeg", "raw"):
        dst = WORK / f"shards-{n}-{enc}"
        if not (dst / "manifest.json").is_file():
            subprocess.run([sys.executable, str(REPO / "workflow.py"), "preprocess", "--source",
                            str(src), "--out", str(dst), "--resize", "256", "--encoding", enc],
                           check=True, stdout=subprocess.DEVNULL, cwd=WORK)
        out[enc] = dst
    return out


# --------------------------------------------------------------------------- children
def _one_core() -> None:
    import cv2
    import torch

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _tree_cpu() -> float:
    """CPU seconds (user + system) used so far by this process and every live descendant
    (Ray's GCS, raylet and workers included)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _result(images: int, elapsed: float, cpu: float) -> dict:
    return {"images": images, "seconds": round(elapsed, 2),
            "images_per_s": round(images / elapsed, 1),
            "images_per_cpu_s": round(images / cpu, 1), "cpu_seconds": round(cpu, 2)}


def _drain(make_epoch, seconds: float) -> dict:
    """Whole epochs until `seconds` have passed; the first batch (warm-up) is not timed."""
    it = iter(make_epoch(0))
    next(it)
    images, epoch, start, cpu = 0, 0, time.perf_counter(), _tree_cpu()
    while True:
        for batch in it:
            images += int(batch[0].shape[0])
        epoch += 1
        if time.perf_counter() - start >= seconds:
            break
        it = iter(make_epoch(epoch))
    return _result(images, time.perf_counter() - start, _tree_cpu() - cpu)


def child_imagefolder(args) -> dict:
    import torch
    from torchvision import datasets, transforms

    _one_core()
    tail = [transforms.PILToTensor()] if args.uint8 else [
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406],
                                                    [0.229, 0.224, 0.225])]
    ds = datasets.ImageFolder(str(Path(args.data) / "train"), transforms.Compose(
        [transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(), *tail]))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0)
    return _drain(lambda epoch: loader, args.seconds)


def child_shards(args) -> dict:
    from pipelines.data.shards import read_manifest, split_readers
    from pipelines.train.ingest import make_loader

    _one_core()
    m = read_manifest(args.data)
    loader = make_loader(split_readers(args.data, m, "train"), CROP, "train", BATCH, 0, 1, 0,
                         workers=0, pin_memory=False)

    def epoch(e):
        loader.sampler.set_epoch(e)
        return loader

    return _drain(epoch, args.seconds)


_RECORDS = {}


def _record_crops(batch: dict, data: str) -> dict:
    """Ray Data map_batches function: record keys -> uint8 crops (the same work as (c)).
    The reader is cached per worker process, as a per-worker loader keeps its own."""
    import numpy as np

    from pipelines.data.shards import read_manifest, split_readers
    from pipelines.train.ingest import ShardRecords

    if data not in _RECORDS:
        m = read_manifest(data)
        _RECORDS[data] = ShardRecords(split_readers(data, m, "train"), CROP, "train", 0)
    items = [_RECORDS[data][int(k)] for k in batch["key"]]
    return {"image": np.stack([it[0] for it in items]),
            "label": np.array([it[1] for it in items], np.int64)}


def child_ray_data(args) -> dict:
    import numpy as np
    import ray

    _one_core()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    from pipelines.data.shards import read_manifest

    n = read_manifest(args.data)["splits"]["train"]["records"]
    # One streaming execution over many epochs' keys (each epoch its own permutation, as
    # the per-worker sampler does), so Ray Data's per-dataset start is paid once, as it
    # would be over an ImageNet epoch.
    epochs = 200
    keys = np.concatenate([(e << 40) | np.random.default_rng([0, e]).permutation(n)
                           for e in range(epochs)])
    ds = ray.data.from_numpy(keys).rename_columns({"data": "key"}).map_batches(
        _record_crops, fn_kwargs={"data": args.data}, batch_size=BATCH)
    batches = iter(ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=2))
    next(batches)  # warm-up: worker start, first task
    images, start, cpu = 0, time.perf_counter(), _tree_cpu()
    for b in batches:
        images += int(b["image"].shape[0])
        if time.perf_counter() - start >= args.seconds:
            break
    return _result(images, time.perf_counter() - start, _tree_cpu() - cpu)


CHILDREN = {"imagefolder": child_imagefolder, "shards": child_shards, "ray_data": child_ray_data}


# --------------------------------------------------------------------------- parent
def run_child(kind: str, data: Path, seconds: float, uint8: bool = False) -> dict:
    return run_child_cmd([sys.executable, __file__, "--child", kind, "--data", str(data),
                          "--seconds", str(seconds)] + (["--uint8"] if uint8 else []))


def run_child_cmd(cmd: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a fresh process; its last stdout line is a JSON object, to
    which the peak PSS (MB) of its process tree is added."""
    result, tree = run_measured(cmd, env=env, cwd=WORK)
    result["peak_pss_mb"] = round(tree.peak_pss_kb / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--seconds", type=float, default=8.0, help="time each measurement")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--data")
    parser.add_argument("--uint8", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.images)
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = [
        ("ImageFolder+RandomResizedCrop, float", "imagefolder", paths["src"], False),
        ("ImageFolder+RandomResizedCrop, uint8", "imagefolder", paths["src"], True),
        ("ours: LMDB JPEG shards, per-worker reader", "shards", paths["jpeg"], False),
        ("ours: LMDB raw shards, per-worker reader", "shards", paths["raw"], False),
        ("Ray Data over the JPEG shards", "ray_data", paths["jpeg"], False),
    ]
    results = {}
    for label, kind, data, uint8 in rows:
        results[label] = run_child(kind, data, args.seconds, uint8)
        r = results[label]
        print(f"{label:46s} {r['images_per_cpu_s']:7.1f} images/CPU-s  "
              f"{r['images_per_s']:7.1f} images/s  peak PSS {r['peak_pss_mb']:7.1f} MB  "
              f"({r['images']} images, {r['seconds']} s, {r['cpu_seconds']} CPU-s)", flush=True)
    # Per core = per CPU second of the whole process tree: what load on a shared machine
    # does not change (wall-clock images/s on one pinned core does, a lot).
    float_base = results[rows[0][0]]["images_per_cpu_s"]
    uint8_base = results[rows[1][0]]["images_per_cpu_s"]
    ours = results[rows[2][0]]["images_per_cpu_s"]
    print(f"\nours (JPEG shards) / ImageFolder, float: {ours / float_base:.2f}x  "
          f"(goal >= 4x)")
    print(f"ours (JPEG shards) / ImageFolder, uint8: {ours / uint8_base:.2f}x")
    print(f"ours (raw shards)  / ImageFolder, float: "
          f"{results[rows[3][0]]['images_per_cpu_s'] / float_base:.2f}x")
    print(f"Ray Data / ours (same shards, per CPU second):  "
          f"{results[rows[4][0]]['images_per_cpu_s'] / ours:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
