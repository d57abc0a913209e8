"""The per-worker training loop that Ray Train runs in every worker process.

Launched by `pipelines/train.py` (`python workflow.py train`); never run directly.
One call of `train_loop_per_worker` = one worker of one attempt: after a failure Ray restarts
the whole group and this function starts again from `ray.train.get_checkpoint()`.

The pieces that do not need Ray (one epoch of training, evaluation, the schedule and early
stopping, writing and reading the training state) are plain functions, so
`tests/test_train.py` checks them on real shards in one process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from alexnet import build_model
from alexnet.augment import normalize, pca_lighting
from alexnet.metrics import ErrorMeter, topk_correct
from pipelines import config as C
from pipelines import precision
from pipelines.ingest import decode_crop_batch, make_loader
from pipelines.model_package import save_bundle
from pipelines.shards import read_manifest, split_readers

STATE, CONFUSION, CONFIG = "state.pt", "val_confusion.npy", "config.yaml"
# Environment variable of the chaos hook (see `Chaos`); the launcher forwards it to workers.
CHAOS_ENV = "ALEXNET_CHAOS"


class RankZero:
    """Runs rank-0-only work (MLflow logging, writing checkpoints); a no-op on other ranks."""

    def __init__(self, rank: int):
        self.active = rank == 0

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs) if self.active else None


class MetricLogger:
    """Logs one epoch's metrics to the driver's MLflow run, each epoch at most once."""

    KEY = "train_loss"

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        from pipelines.tracking import logged_steps

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.done = logged_steps(self.client, run_id, self.KEY)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch in self.done:
            return
        self.log(epoch, metrics)
        self.done.add(epoch)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=batch)


@dataclass
class Chaos:
    """A real failure on purpose, to rehearse recovery: the worker of `rank` SIGKILLs its own
    process at `step` of `epoch` (no exception, no cleanup: what the OOM killer or a lost node
    does). It fires once: it first writes `marker`, and a restarted attempt that finds the
    marker goes on. Set by `ALEXNET_CHAOS='{"rank": 1, "epoch": 2, "step": 1, "marker":
    "/shared/path"}'` in the launcher's environment; `tests/test_train.py` uses it."""

    rank: int
    epoch: int
    step: int
    marker: str

    @classmethod
    def from_config(cls, value: dict | None) -> Chaos | None:
        return cls(**value) if value else None

    def maybe_kill(self, rank: int, epoch: int, step: int) -> None:
        if (rank, epoch, step) != (self.rank, self.epoch, self.step):
            return
        if os.path.exists(self.marker):
            return
        with open(self.marker, "w") as fh:
            fh.write(f"killed pid {os.getpid()} rank {rank} epoch {epoch} step {step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def make_scheduler(cfg: C.TrainConfig, optimizer: torch.optim.Optimizer, lr: float):
    o = cfg.optim
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=0.1)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.run.epochs)
    # The paper: divide by 10 when the validation error stops improving, three times in all.
    # min_lr stops the fourth drop (0.999: float rounding must not block the third), and eps
    # (1% of the last rate) makes the 0.1% step from the third rate to min_lr a no-op.
    last = lr * 0.1 ** o.max_lr_drops
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=o.lr_patience, min_lr=last * 0.999,
        eps=last * 0.01)


def step_scheduler(cfg: C.TrainConfig, scheduler, score: float) -> None:
    """Once per epoch: plateau looks at the epoch's score (val top-1 error), others count."""
    if cfg.optim.schedule == "plateau":
        scheduler.step(score)
    else:
        scheduler.step()


@dataclass
class Progress:
    """The best score so far and the epochs since it improved (early stopping, the third
    seed's idea: stop after `patience` epochs without a better score; 0 never stops)."""

    best: float = math.inf
    since_best: int = 0

    def update(self, score: float) -> bool:
        if score < self.best:
            self.best, self.since_best = score, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.since_best >= patience


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's epoch (dropout masks, PCA alphas): distinct per rank,
    and a function of the epoch, so a restart from a checkpoint draws what an uninterrupted
    run would have drawn."""
    return zlib.crc32(f"{seed}/{epoch}/{rank}".encode())


def inference_info(cfg: C.TrainConfig, manifest: dict, num_classes: int) -> dict:
    return {"variant": cfg.model.variant, "groups": cfg.model.groups,
            "num_classes": num_classes, "input_size": cfg.data.crop,
            "resize": manifest["preprocess"]["resize"],
            "mean": manifest["stats"]["mean"], "std": manifest["stats"]["std"],
            "classes": manifest["classes"]}


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)  # a sync point across workers: once per epoch, not per step
    return t


def to_model_input(x_nchw_uint8: torch.Tensor, stats: dict, pca: dict | None) -> torch.Tensor:
    """uint8 [N, 3, H, W] on the training device -> PCA lighting (training) -> normalised."""
    x = x_nchw_uint8
    if pca is not None:
        x = pca_lighting(x, stats["eigval"], stats["eigvec"], **pca)
    return normalize(x, stats["mean"], stats["std"])


class DeviceBatches:
    """Turns loader batches into `(uint8 [N, 3, H, W] on device, labels on device, skipped)`.

    CPU-decoded batches are NHWC uint8 (pinned on GPU); they are copied with
    `non_blocking=True` and permuted to NCHW, which is channels_last in memory at no cost.
    With `gpu_decode` the batch holds JPEG bytes and crop boxes and is decoded on the device.
    Corrupt records (ok=False) are dropped here and counted."""

    def __init__(self, device: torch.device, crop: int, gpu_decode: bool):
        self.device, self.crop, self.gpu_decode = device, crop, gpu_decode

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.gpu_decode:
            datas, labels, ok, boxes = batch
            x, ok = decode_crop_batch(datas, boxes, ok, self.crop, self.device)
        else:
            images, labels, ok = batch
            if not bool(ok.all()):  # indexing copies (and unpins): only when needed
                images = images[ok]
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        labels = labels[ok].to(self.device, non_blocking=True)
        return x, labels, int((~ok).sum())


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    to_device: DeviceBatches, stats: dict, pca: dict | None, amp,
                    on_step=None) -> dict:
    """One pass over this worker's share. Returns the epoch's sums (an ErrorMeter, still on
    the device), skipped records, seconds, the seconds spent waiting for input, and the CPU
    seconds of this process (all its threads; not the DataLoader processes): on a shared
    machine, images per CPU second is the figure that load does not bend."""
    model.train()
    meter = ErrorMeter()
    skipped, wait, steps = 0, 0.0, 0
    cpu0 = time.process_time()
    t0 = tick = time.perf_counter()
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - tick
        if on_step is not None:
            on_step(step)
        x, labels, bad = to_device(batch)
        skipped += bad
        with amp:
            logits = model(to_model_input(x, stats, pca))
        if labels.numel():
            loss = F.cross_entropy(logits.float(), labels)
        else:  # every record of the batch was corrupt: a zero step keeps DDP ranks in step
            loss = logits.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if labels.numel():
            # detach() keeps the sums on the device: no CPU-GPU sync per step.
            meter.update(loss.detach() * labels.numel(),
                         topk_correct(logits.detach(), labels), labels.numel())
        steps += 1
        tick = time.perf_counter()
    return {"meter": meter, "skipped": skipped, "seconds": time.perf_counter() - t0,
            "wait": wait, "steps": steps, "cpu_seconds": time.process_time() - cpu0}


def evaluate(net: torch.nn.Module, loader, device, stats: dict, ten_crop: bool,
             world: int, num_classes: int, amp=None) -> tuple[dict, np.ndarray]:
    """Loss, top-1/top-5 error over the whole val split (each record once across workers),
    and the confusion matrix `[true, predicted]` (int64). With `ten_crop` the softmax of the
    ten crops is averaged, as in the paper, and the loss is the NLL of that average."""
    net.eval()
    amp = amp if amp is not None else torch.autocast("cpu", enabled=False)
    meter = ErrorMeter()
    skipped = torch.zeros(1, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    with torch.inference_mode():
        for images, labels, ok in loader:
            skipped += (~ok).sum()
            images, labels = images[ok].to(device), labels[ok].to(device)
            if labels.numel() == 0:
                continue
            if ten_crop:  # [N, 10, H, W, 3]: average the softmax of the ten crops
                n = images.shape[0]
                x = to_model_input(images.flatten(0, 1).permute(0, 3, 1, 2), stats, None)
                with amp:
                    out = net(x)
                probs = F.softmax(out.float(), dim=1).view(n, 10, -1).mean(1)
                logits = probs.log()
                loss = F.nll_loss(logits, labels, reduction="sum")
            else:
                with amp:
                    logits = net(to_model_input(images.permute(0, 3, 1, 2), stats, None))
                logits = logits.float()
                loss = F.cross_entropy(logits, labels, reduction="sum")
            meter.update(loss, topk_correct(logits, labels), labels.numel())
            confusion += torch.bincount(labels * num_classes + logits.argmax(1),
                                        minlength=num_classes * num_classes)
    reduced = ErrorMeter.from_tensor(_all_reduce(meter.as_tensor(device), world))
    out = {f"val_{k}": v for k, v in reduced.result().items()}
    out["val_images"] = reduced.n
    out["val_skipped_records"] = float(_all_reduce(skipped, world).item())
    matrix = _all_reduce(confusion, world).view(num_classes, num_classes).cpu().numpy()
    return out, matrix


def save_training_state(directory: str | Path, net: torch.nn.Module, optimizer, scheduler,
                        epoch: int, progress: Progress, run_id: str, info: dict,
                        cfg: C.TrainConfig, confusion: np.ndarray | None = None) -> Path:
    """A checkpoint: a model bundle (weights.pt + inference.json, servable as is), the
    training state (state.pt: optimiser, scheduler, epoch, best metric, RNG, MLflow run id;
    tensors and plain types only, read with weights_only=True), the resolved config and the
    val confusion matrix of this epoch."""
    directory = Path(directory)
    save_bundle(directory, net.state_dict(), {**info, "epoch": epoch})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "best": progress.best, "since_best": progress.since_best,
                "rng": rng, "run_id": run_id}, directory / STATE)
    (directory / CONFIG).write_text(C.to_yaml(cfg))
    if confusion is not None:
        np.save(directory / CONFUSION, confusion, allow_pickle=False)
    return directory


def load_training_state(directory: str | Path, net: torch.nn.Module, optimizer, scheduler,
                        device) -> tuple[int, Progress, str]:
    """Restore what `save_training_state` wrote into the given objects; returns (next epoch,
    progress, MLflow run id)."""
    directory = Path(directory)
    state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    net.load_state_dict(torch.load(directory / "weights.pt", map_location=device,
                                   weights_only=True))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["epoch"] + 1, Progress(state["best"], state["since_best"]), state["run_id"]


def _node_monitor(loop_config: dict, rank_ctx):
    """MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of this
    worker's node, under `system/node<N>/`, from local rank 0 of every node but the driver's
    (the driver's `log_system_metrics=True` covers that one): GPU figures come from where
    the GPUs are."""
    import ray

    if rank_ctx.get_local_rank() != 0:
        return None
    if ray.get_runtime_context().get_node_id() == loop_config.get("driver_node_id"):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(loop_config["run_id"], resume_logging=True,
                                   node_id=f"node{rank_ctx.get_node_rank()}",
                                   tracking_uri=loop_config["tracking_uri"])
    monitor.start()
    return monitor


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg: C.TrainConfig = C.from_dict(C.TrainConfig, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rank_zero = RankZero(rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if cfg.data.decode_on_gpu and not on_gpu:
        raise RuntimeError("--decode-on-gpu needs a CUDA device in every worker; this worker "
                           f"has {device} (run with --gpu on GPU nodes, or drop the flag)")
    torch.manual_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts it)

    data_dir = cfg.data.data
    if cfg.data.cache_dir:  # shards not on shared storage: one verified local copy per node
        from pipelines.shard_cache import localize

        data_dir, _ = localize(cfg.data.data, cfg.data.cache_dir,
                               (cfg.data.train_split, cfg.data.val_split))
    manifest = read_manifest(data_dir)
    num_classes = len(manifest["classes"])
    s = manifest["stats"]
    stats = {k: torch.tensor(s[k], dtype=torch.float32, device=device)
             for k in ("mean", "std", "eigval", "eigvec")}
    has_val = cfg.data.val_split in manifest["splits"] and \
        manifest["splits"][cfg.data.val_split]["records"] > 0

    init = None if cfg.model.init == "auto" else cfg.model.init
    model = build_model(cfg.model.variant, num_classes, groups=cfg.model.groups,
                        dropout=cfg.model.dropout, init=init)
    model = precision.prepare_model(model, device, cfg.run.amp, cfg.run.compile)
    model = ray.train.torch.prepare_model(model)
    net = unwrap(model)  # the one name for the bare module: eval, checkpoints, export

    global_batch = cfg.optim.batch_size * world
    lr = cfg.optim.lr * global_batch / 128  # linear scaling rule, documented in README
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, lr)
    start_epoch, progress = 0, Progress()
    logger = rank_zero(MetricLogger, loop_config["tracking_uri"], loop_config["run_id"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch, progress, _ = load_training_state(d, net, optimizer, scheduler,
                                                           device)
        # One point per restore (after a failure or --resume): the UI shows where runs
        # picked up again.
        rank_zero(MetricLogger.log, logger, start_epoch, {"restored_at_epoch": start_epoch})

    train_loader = make_loader(split_readers(data_dir, manifest, cfg.data.train_split),
                               cfg.data.crop, "train", cfg.optim.batch_size, rank, world,
                               cfg.run.seed, cfg.data.loader_workers, on_gpu,
                               gpu_decode=cfg.data.decode_on_gpu)
    # Validation always decodes on the CPU: it is 4% of ImageNet and needs the ten crops.
    val_loader = make_loader(split_readers(data_dir, manifest, cfg.data.val_split),
                             cfg.data.crop, "ten" if cfg.run.ten_crop else "center",
                             cfg.optim.batch_size, rank, world, cfg.run.seed,
                             cfg.data.loader_workers, on_gpu) if has_val else None
    pca = {"alphastd": cfg.data.pca_alphastd} if cfg.data.pca_alphastd > 0 else None
    amp = precision.autocast(device, cfg.run.amp)  # bf16 on GPU and native-bf16 CPUs
    to_device = DeviceBatches(device, cfg.data.crop, cfg.data.decode_on_gpu)
    chaos = Chaos.from_config(loop_config.get("chaos"))
    info = inference_info(cfg, manifest, num_classes)
    monitor = _node_monitor(loop_config, ctx)

    try:
        for epoch in range(start_epoch, cfg.run.epochs):
            torch.manual_seed(epoch_seed(cfg.run.seed, epoch, rank))
            train_loader.sampler.set_epoch(epoch)
            on_step = (lambda step, e=epoch: chaos.maybe_kill(rank, e, step)) if chaos else None
            ep = train_one_epoch(model, train_loader, optimizer, to_device, stats, pca, amp,
                                 on_step)
            seconds = ep["seconds"]
            local_images = ep["meter"].n
            train = ErrorMeter.from_tensor(
                _all_reduce(ep["meter"].as_tensor(device), world)).result()
            totals = torch.tensor([local_images / seconds, ep["skipped"]], dtype=torch.float64,
                                  device=device)
            _all_reduce(totals, world)
            metrics = {"train_loss": train["loss"], "train_top1_error": train["top1_error"],
                       "train_top5_error": train["top5_error"],
                       "lr": optimizer.param_groups[0]["lr"],
                       "images_per_s_worker": local_images / seconds,
                       "images_per_s": float(totals[0]),
                       "data_wait_fraction": ep["wait"] / seconds,
                       "train_skipped_records": float(totals[1]),
                       "epoch_seconds": seconds,
                       "worker_cpu_seconds": ep["cpu_seconds"]}
            confusion = None
            if val_loader is not None:
                val, confusion = evaluate(net, val_loader, device, stats, cfg.run.ten_crop,
                                          world, num_classes, amp)
                metrics.update(val)
            score = metrics.get("val_top1_error", metrics["train_loss"])
            metrics["score"] = score
            step_scheduler(cfg, scheduler, score)
            progress.update(score)
            rank_zero(MetricLogger.log_epoch, logger, epoch, metrics)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = rank_zero(_checkpoint, tmp, net, optimizer, scheduler, epoch, progress,
                                 loop_config["run_id"], info, cfg, confusion)
                ray.train.report({**metrics, "epoch": epoch}, checkpoint=ckpt)
            if progress.should_stop(cfg.optim.early_stop_patience):
                break
    finally:
        if monitor is not None:
            monitor.finish()


def _checkpoint(tmp: str, *args):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(save_training_state(tmp, *args)))


def read_confusion(directory: str | Path) -> np.ndarray | None:
    path = Path(directory) / CONFUSION
    return np.load(path, allow_pickle=False) if path.is_file() else None


def read_checkpoint_info(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "inference.json").read_text())
