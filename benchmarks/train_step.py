"""Training throughput: the full Ray Train loop (`workflow.py train`: shards -> loader ->
DDP-prepared model in bf16 autocast + channels_last + the fused LRN where the CPU has native
bf16 -> metrics, checkpoints, MLflow) against a bare fp32 eager paper AlexNet written in
plain `torch.nn` (nn.LocalResponseNorm, no autocast), same batch size and threads.

    .venv/bin/python benchmarks/train_step.py                      # CPU, 5-7 min on 2 cores
    .venv/bin/python benchmarks/train_step.py --gpu --batch-size 128 --images 5120   # GPU

Defaults: the paper variant, 1 worker with 2 threads, 1 loader process, batch 64 (the paper
recipe's acceptance setting), 192 images (3 steps an epoch). All in one run, so the ratios compare like with like:

1. Data: ImageNet-like JPEGs preprocessed to 256x256 JPEG shards (benchmarks/ingest.py's
   generator; kept under /tmp/alexnet-bench-ingest).
2. (a) bare: one process, `torch.set_num_threads(--threads)` and OMP_NUM_THREADS (as Ray
   sets it for its workers), a fixed uint8 batch already in memory; per step: normalise to
   fp32 NCHW, forward, cross-entropy, backward, SGD step of the plain-nn model (what a user
   would write from the paper; on --gpu: bf16 autocast + channels_last, as the loop).
   One warm-up step, then an epoch's worth of steps timed.
   (b) bare-amp: the same loop with the workflow's model (`alexnet.build_model`: fused LRN)
   and `pipelines.precision` (bf16 autocast + channels_last where native): the ceiling the
   Ray path can reach, to tell the model's speed from the pipeline's losses.
   (c) ray: `pipelines.train.launcher.run_train` on a fresh local Ray, one worker with --threads CPUs
   (Ray sets OMP_NUM_THREADS from them, so torch uses the same threads), --loader-workers
   DataLoader processes decoding and cropping, no validation, no registration; the loop's
   own metrics give images/s, images per CPU second of the worker process
   (`worker_cpu_seconds`) and the data-wait fraction of the last (steady) epoch; the whole
   job's images/s over its wall time (Ray and MLflow start, checkpoints) is printed apart.
   bare runs before and after ray; their mean is the baseline.
3. GFLOP/s of the training step: forward FLOPs counted by `torch.utils.flop_counter` (convs
   and matmuls, 2 per multiply-add), x3 for forward + backward, times images/s; against the
   peak of the threads used: FLOPs per core per cycle x clock (the `cpu MHz` of
   /proc/cpuinfo: a VM shows the nominal clock, turbo is not counted) x threads, for fp32
   AVX512 (2 FMA ports x 16 lanes x 2 = 64), bf16 AVX512_BF16 (vdpbf16ps: 128) and, where
   the CPU has it, AMX-BF16 (1024).
4. Peak memory: proportional set size (PSS) summed over each measurement's process tree.

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


def plain_paper_alexnet(num_classes: int, groups: int = 1):
    """The paper's AlexNet as a user writes it in plain torch.nn: nn.LocalResponseNorm with
    the paper's constants (alpha x n, as alexnet.model), torch's default init, fp32."""
    from torch import nn

    def lrn():
        return nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)

    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4, padding=2), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=groups), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=groups), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=groups), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, num_classes))


def forward_flops(args) -> int:
    """FLOPs of one image's forward pass through the variant (convs + linears)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from alexnet import build_model

    model = build_model(args.variant, args.classes, groups=args.groups, init="default").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, args.crop, args.crop))
    return int(counter.get_total_flops())


def peaks(threads: int) -> dict:
    """Peak GFLOP/s of `threads` cores: fp32 AVX512, bf16 AVX512_BF16 and AMX-BF16 (when
    PyTorch reports it), at the clock /proc/cpuinfo shows (nominal in a VM)."""
    import torch

    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = max(float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    ghz = mhz / 1e3
    out = {"clock_ghz": round(ghz, 3),
           "fp32_avx512": 64 * ghz * threads if caps.get("avx512_f") else None,
           "bf16_avx512": 128 * ghz * threads if caps.get("avx512_bf16") else None,
           "bf16_amx": 1024 * ghz * threads if caps.get("amx_bf16") else None}
    return out


def child_bare(args) -> dict:
    import torch
    import torch.nn.functional as F

    from alexnet import build_model
    from alexnet.augment import normalize
    from pipelines import precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.child == "bare":  # plain torch.nn, fp32 on CPU (bf16 + channels_last on GPU)
        model = plain_paper_alexnet(args.classes, args.groups).to(device) \
            if args.variant == "paper" else build_model(args.variant, args.classes,
                                                        init="default").to(device)
        amp_on = args.gpu
        if args.gpu:
            model = model.to(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.gpu)
    else:  # bare-amp: the workflow's model and precision in a bare loop
        model = build_model(args.variant, args.classes, groups=args.groups,
                            init="default").to(device)
        model = precision.prepare_model(model, device, amp=True)
        amp_on = precision.amp_dtype(device, True) is not None
        amp = precision.autocast(device, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randint(0, 256, (args.batch_size, args.crop, args.crop, 3),
                           dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (args.batch_size,))
    mean, std = torch.tensor([120.0, 115, 100], device=device), torch.tensor([60.0, 58, 57],
                                                                               device=device)

    def step():
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
        if not amp_on:  # a plain fp32 loop feeds NCHW (what ToTensor gives)
            x = x.contiguous()
        x = normalize(x, mean, std)
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
            "threads": torch.get_num_threads(), "amp": amp_on}


def child_ray(args) -> dict:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{WORK / 'mlflow.db'}"
    import ray
    from mlflow import MlflowClient

    from pipelines import config
    from pipelines.train.launcher import run_train

    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = config.TrainConfig()
    cfg.data.data, cfg.data.crop, cfg.data.val_split = args.data, args.crop, "none"
    cfg.data.loader_workers = args.loader_workers
    cfg.model.variant, cfg.model.init, cfg.model.groups = args.variant, "default", args.groups
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


CHILDREN = {"bare": child_bare, "bare-amp": child_bare, "ray": child_ray}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=192, help="training images (one epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="Ray run epochs (last is timed)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = worker CPUs")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--groups", type=int, default=None,
                        help="paper variant's groups (default: train's, ModelSection.groups)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--data")
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()
    if args.groups is None:
        from pipelines import config

        args.groups = config.ModelSection().groups if args.variant == "paper" else 1
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
              "--groups", str(args.groups), "--crop", str(args.crop), "--epochs",
              str(args.epochs), "--loader-workers", str(args.loader_workers)] \
        + (["--gpu"] if args.gpu else [])
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = {}
    for label, kind in (("bare (before)", "bare"), ("bare-amp", "bare-amp"), ("ray", "ray"),
                        ("bare (after)", "bare")):
        # OMP_NUM_THREADS as Ray sets it for a worker with --threads CPUs: set_num_threads
        # alone leaves OpenMP's larger team spinning (measured: 35% slower on 1 thread).
        results[label] = run_child_cmd([sys.executable, __file__, "--child", kind, *common],
                                       env={"OMP_NUM_THREADS": str(args.threads)})
        print(f"{label:14s} {json.dumps(results[label])}", flush=True)
    bare = (results["bare (before)"]["images_per_s"] + results["bare (after)"]["images_per_s"]) / 2
    bare_cpu = (results["bare (before)"]["images_per_cpu_s"]
                + results["bare (after)"]["images_per_cpu_s"]) / 2
    amp_r, ray_r = results["bare-amp"], results["ray"]
    print(f"\n{args.variant} (groups {args.groups}) {args.crop}px, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.loader_workers} loader process(es), "
          f"{'GPU' if args.gpu else 'CPU'}; workflow precision: "
          f"{'bf16 autocast + channels_last' if amp_r['amp'] else 'fp32'}")
    print(f"bare plain-nn fp32:   {bare:8.2f} images/s   peak PSS "
          f"{results['bare (before)']['peak_pss_mb']:.0f} MB")
    print(f"bare workflow model:  {amp_r['images_per_s']:8.2f} images/s   peak PSS "
          f"{amp_r['peak_pss_mb']:.0f} MB (fused LRN, precision as train)")
    print(f"Ray Train loop:       {ray_r['images_per_s']:8.2f} images/s   peak PSS "
          f"{ray_r['peak_pss_mb']:.0f} MB (driver + Ray + worker + loader)")
    print(f"ratio workflow train / bare fp32: {ray_r['images_per_s'] / bare:.3f}  "
          f"(goal >= 1.8, stretch 2.2)")
    print(f"ratio bare workflow model / bare fp32: {amp_r['images_per_s'] / bare:.3f}; "
          f"Ray Train / bare workflow model: {ray_r['images_per_s'] / amp_r['images_per_s']:.3f}"
          f"; data-wait fraction {ray_r['data_wait_fraction']:.3f}")
    print(f"per CPU second of the training process (load-proof): bare fp32 {bare_cpu:.2f}, "
          f"bare workflow model {amp_r['images_per_cpu_s']:.2f}, Ray Train "
          f"{ray_r['images_per_cpu_s']:.2f} images; ratio Ray Train / bare fp32 "
          f"{ray_r['images_per_cpu_s'] / bare_cpu:.3f}")
    if not args.gpu:
        flops = forward_flops(args)
        pk = peaks(args.threads)
        step = 3 * flops / 1e9  # GFLOP per training image: forward + 2x for backward

        def gf(ips):
            return step * ips

        peak_txt = ", ".join(f"{k} {v:.0f}" for k, v in pk.items() if k != "clock_ghz" and v)
        print(f"compute: {flops / 1e9:.3f} GFLOP forward per image, ~{step:.2f} per training "
              f"image (3x); peak GFLOP/s of {args.threads} core(s) at {pk['clock_ghz']} GHz: "
              f"{peak_txt}")
        for name, ips in (("bare fp32", bare), ("bare workflow model", amp_r["images_per_s"]),
                          ("Ray Train", ray_r["images_per_s"])):
            fracs = ", ".join(f"{100 * gf(ips) / v:.1f}% of {k}"
                              for k, v in pk.items() if k != "clock_ghz" and v)
            print(f"  {name:20s} {gf(ips):7.1f} GFLOP/s  ({fracs})")
    print(f"whole job (Ray + MLflow start, {args.epochs} epochs, checkpoints): "
          f"{ray_r['job_images_per_s']:.2f} images/s over {ray_r['job_seconds']} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
