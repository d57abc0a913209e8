"""Training throughput: the full Ray Train loop (`workflow.py train`: shards -> loader ->
DDP-prepared model -> metrics, checkpoints, MLflow) against a bare single-process PyTorch
loop with the same model, batch size and threads, fed from memory.

    .venv/bin/python benchmarks/train_step.py                      # CPU, ~4 min on 2 cores
    .venv/bin/python benchmarks/train_step.py --gpu --batch-size 128 --images 5120   # GPU

All in one run, so the ratio compares like with like:

1. Data: ImageNet-like JPEGs preprocessed to 256x256 JPEG shards (benchmarks/ingest.py's
   generator; kept under /tmp/alexnet-bench-ingest).
2. (a) bare: one process, `torch.set_num_threads(--threads)` and OMP_NUM_THREADS (as Ray
   sets it for its workers), a fixed uint8 batch already in memory; per step: normalise, forward, cross-entropy, backward, SGD step (bf16 autocast and
   channels_last with --gpu, as the training loop does). One warm-up step, then an epoch's
   worth of steps timed.
   (b) ray: `pipelines.train.run_train` on a fresh local Ray, one worker with --threads CPUs
   (Ray sets OMP_NUM_THREADS from them, so torch uses the same threads), one DataLoader
   process decoding and cropping, no validation, no registration; the loop's own metrics
   give images/s, images per CPU second of the worker process (`worker_cpu_seconds`) and
   the data-wait fraction of the last (steady) epoch; the whole job's
   images/s over its wall time (Ray and MLflow start, checkpoints) is printed apart.
   bare runs before and after ray; their mean is the baseline.
3. Peak memory: proportional set size (PSS) summed over each measurement's process tree.

The machine may be shared: the script prints the load average; compare ratios from one run.
Images per CPU second of the training process (bare: `time.process_time`) is printed too:
on a loaded machine wall-clock ratios swing with the neighbours, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.ingest import WORK, prepare, run_child_cmd  # noqa: E402


def child_bare(args) -> dict:
    import torch
    import torch.nn.functional as F

    from alexnet import build_model
    from alexnet.augment import normalize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    model = build_model(args.variant, args.classes, init="default").to(device)
    if args.gpu:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randint(0, 256, (args.batch_size, args.crop, args.crop, 3),
                           dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (args.batch_size,))
    mean, std = torch.tensor([120.0, 115, 100], device=device), torch.tensor([60.0, 58, 57],
                                                                               device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.gpu)

    def step():
        x = normalize(images.to(device, non_blocking=True).permute(0, 3, 1, 2), mean, std)
        with amp:
            loss = F.cross_entropy(model(x).float(), labels.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    steps = max(1, args.images // args.batch_size)
    if args.gpu:
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if args.gpu:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": steps * args.batch_size, "seconds": round(elapsed, 2),
            "images_per_s": round(steps * args.batch_size / elapsed, 2),
            "images_per_cpu_s": round(steps * args.batch_size / cpu, 2),
            "threads": torch.get_num_threads()}


def child_ray(args) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK / 'mlflow.db'}"
    import ray
    from mlflow import MlflowClient

    from pipelines import config as C
    from pipelines.train import run_train

    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = C.TrainConfig()
    cfg.data.data, cfg.data.crop, cfg.data.val_split = args.data, args.crop, "none"
    cfg.data.loader_workers = args.loader_workers
    cfg.model.variant, cfg.model.init = args.variant, "default"
    cfg.optim.batch_size = args.batch_size
    cfg.run.epochs, cfg.run.workers, cfg.run.cpus_per_worker = args.epochs, 1, args.threads
    cfg.run.gpu, cfg.run.max_failures = args.gpu, 0
    cfg.run.storage, cfg.run.name = str(WORK / "ckpt"), "bench"
    cfg.tracking.register = False
    summary = run_train(cfg)
    wall = time.perf_counter() - started
    client = MlflowClient()

    def last(key):
        return max(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step).value

    images = client.get_metric_history(summary["run_id"], "images_per_s")
    epoch_images = last("images_per_s_worker") * last("epoch_seconds")
    return {"images_per_s": round(last("images_per_s"), 2),
            "images_per_cpu_s": round(epoch_images / last("worker_cpu_seconds"), 2),
            "first_epoch_images_per_s": round(min(images, key=lambda m: m.step).value, 2),
            "data_wait_fraction": round(last("data_wait_fraction"), 4),
            "job_images_per_s": round(args.epochs * args.images / wall, 2),
            "job_seconds": round(wall, 1)}


CHILDREN = {"bare": child_bare, "ray": child_ray}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images (one epoch)")
    parser.add_argument("--epochs", type=int, default=3, help="Ray run epochs (last is timed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = worker CPUs")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--variant", default="torchvision")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--data")
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")

    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare(args.images)["jpeg"]
    common = ["--data", str(data), "--images", str(args.images), "--batch-size",
              str(args.batch_size), "--threads", str(args.threads), "--variant", args.variant,
              "--crop", str(args.crop), "--epochs", str(args.epochs), "--loader-workers",
              str(args.loader_workers)] + (["--gpu"] if args.gpu else [])
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = {}
    for label, kind in (("bare (before)", "bare"), ("ray", "ray"), ("bare (after)", "bare")):
        # OMP_NUM_THREADS as Ray sets it for a worker with --threads CPUs: set_num_threads
        # alone leaves OpenMP's larger team spinning (measured: 35% slower on 1 thread).
        results[label] = run_child_cmd([sys.executable, __file__, "--child", kind, *common],
                                       env={"OMP_NUM_THREADS": str(args.threads)})
        print(f"{label:14s} {json.dumps(results[label])}", flush=True)
    bare = (results["bare (before)"]["images_per_s"] + results["bare (after)"]["images_per_s"]) / 2
    bare_cpu = (results["bare (before)"]["images_per_cpu_s"]
                + results["bare (after)"]["images_per_cpu_s"]) / 2
    ray_r = results["ray"]
    print(f"\n{args.variant} {args.crop}px, batch {args.batch_size}, {args.threads} thread(s), "
          f"{'GPU' if args.gpu else 'CPU'}")
    print(f"bare loop:            {bare:8.2f} images/s   peak PSS "
          f"{results['bare (before)']['peak_pss_mb']:.0f} MB")
    print(f"Ray Train loop:       {ray_r['images_per_s']:8.2f} images/s   peak PSS "
          f"{ray_r['peak_pss_mb']:.0f} MB (driver + Ray + worker + loader)")
    print(f"ratio Ray Train / bare: {ray_r['images_per_s'] / bare:.3f}  (goal >= 0.9); "
          f"data-wait fraction {ray_r['data_wait_fraction']:.3f}")
    print(f"per CPU second of the training process (load-proof): bare {bare_cpu:.2f}, "
          f"Ray Train {ray_r['images_per_cpu_s']:.2f} images, ratio "
          f"{ray_r['images_per_cpu_s'] / bare_cpu:.3f}")
    print(f"whole job (Ray + MLflow start, {args.epochs} epochs, checkpoints): "
          f"{ray_r['job_images_per_s']:.2f} images/s over {ray_r['job_seconds']} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
