"""The per-worker training loop that Ray Train runs in every worker process.

Launched by `pipelines/train/launcher.py` (`python workflow.py train`); never run directly.
One call of `train_loop_per_worker` = one worker of one attempt: after a failure Ray restarts
the whole group and this function starts again from `ray.train.get_checkpoint()`.

The pieces that do not need Ray are plain functions, so `tests/test_train.py` checks them on
real shards in one process: one epoch of training and evaluation here, the optimiser,
schedule and early stopping in `recipe.py`, the checkpoint in `checkpoint.py`.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from alexnet import build_model
from alexnet.augment import normalize, pca_lighting
from alexnet.metrics import ErrorMeter, topk_correct
from pipelines import config, precision
from pipelines.data.shards import read_manifest, split_readers
from pipelines.train.checkpoint import load_training_state, save_training_state
from pipelines.train.ingest import decode_crop_batch, make_loader
from pipelines.train.recipe import (
    Progress,
    Warmup,
    epoch_seed,
    freeze,
    make_optimizer,
    make_scheduler,
    step_scheduler,
)

# Environment variable of the chaos hook (see `Chaos`); the launcher forwards it to workers.
CHAOS_ENV = "ALEXNET_CHAOS"


class RankZero:
    """Runs rank-0-only work (MLflow logging, writing checkpoints); a no-op on other ranks."""

    def __init__(self, rank: int):
        self.active = rank == 0

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs) if self.active else None


class RunMetrics:
    """Rank 0's metrics: into the run's journal (durable, beside the checkpoints), then to
    MLflow by a background sender. Nothing here waits on MLflow (see pipelines/train/journal.py)."""

    def __init__(self, cfg: config.TrainConfig, tracking_uri: str, run_id: str):
        from pipelines.train.journal import JOURNAL, MetricJournal, MetricSender
        from pipelines.train.storage import storage_filesystem

        fs, root = storage_filesystem(cfg.run.storage)
        self.journal = MetricJournal(fs, f"{root}/{cfg.run.name}/{JOURNAL}")
        self.sender = MetricSender(self.journal, tracking_uri, run_id)
        self.sender.start()

    def log(self, key: str, step: int, metrics: dict[str, float]) -> None:
        if self.journal.append(key, step, metrics):
            self.sender.notify()

    def close(self) -> None:
        # Bounded: what is not sent now stays in the journal for the driver to send.
        self.sender.close(timeout=20.0)


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


def input_stats(cfg: config.TrainConfig, manifest: dict,
                source_stats: dict | None = None) -> dict[str, list]:
    """The manifest's pixel statistics as the model sees them: with `--normalize mean` (the
    paper's) the std is 1, so `normalize` only subtracts the mean. Training, evaluation and
    the served bundle (`inference.json`) all take mean/std from here, so they agree.
    `source_stats` (--init-from): the mean/std the pretrained layers were trained with,
    which they keep expecting; the PCA colour statistics stay the data's."""
    stats = manifest["stats"]
    std = [1.0, 1.0, 1.0] if config.resolve_auto(cfg).data.normalize == "mean" else stats["std"]
    mean = stats["mean"]
    if source_stats:
        mean, std = source_stats["mean"], source_stats["std"]
    return {"mean": mean, "std": std, "eigval": stats["eigval"], "eigvec": stats["eigvec"]}


def inference_info(cfg: config.TrainConfig, manifest: dict, num_classes: int,
                   source_stats: dict | None = None) -> dict:
    stats = input_stats(cfg, manifest, source_stats)
    return {"variant": cfg.model.variant, "groups": cfg.model.groups,
            "num_classes": num_classes, "input_size": cfg.data.crop,
            "resize": manifest["preprocess"]["resize"],
            "mean": stats["mean"], "std": stats["std"], "classes": manifest["classes"]}


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
                # log(mean of the ten softmaxes), in log space: softmax(...).mean().log()
                # underflows to log(0) = -inf for a confident wrong prediction.
                logits = torch.logsumexp(F.log_softmax(out.float(), dim=1).view(n, 10, -1),
                                         dim=1) - math.log(10)
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

    try:  # a side channel: an unreachable MLflow must not stop the worker from starting
        monitor = SystemMetricsMonitor(loop_config["run_id"], resume_logging=True,
                                       node_id=f"node{rank_ctx.get_node_rank()}",
                                       tracking_uri=loop_config["tracking_uri"])
        monitor.start()
    except Exception:  # noqa: BLE001
        return None
    return monitor


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `ray.train.report` at INFO from every worker ("Reporting
    training result N: TrainingReport(...)", a screen of metrics an epoch, twice with two
    workers); the epoch line (progress.py) says it once, readably. Its logger is named by
    the file's path; warnings and errors still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its own logging, unchanged
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports()

    cfg: config.TrainConfig = config.resolve_auto(config.from_dict(config.TrainConfig, loop_config["cfg"]))
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
        from pipelines.data.shard_cache import localize

        data_dir, _ = localize(cfg.data.data, cfg.data.cache_dir,
                               (cfg.data.train_split, cfg.data.val_split))
    manifest = read_manifest(data_dir)
    num_classes = len(manifest["classes"])
    stats = {k: torch.tensor(v, dtype=torch.float32, device=device)
             for k, v in input_stats(cfg, manifest, loop_config.get("init_stats")).items()}
    has_val = cfg.data.val_split in manifest["splits"] and \
        manifest["splits"][cfg.data.val_split]["records"] > 0

    model = build_model(cfg.model.variant, num_classes, groups=cfg.model.groups,
                        dropout=cfg.model.dropout, init=cfg.model.init,
                        init_bias=cfg.model.init_bias)
    if loop_config.get("init_weights"):  # --init-from: fitted by the launcher (pretrained.py)
        model.load_state_dict(read_init_weights(cfg, loop_config["init_weights"]))
    freeze(model, cfg.model.freeze)
    model = precision.prepare_model(model, device, cfg.run.amp, cfg.run.compile)
    model = ray.train.torch.prepare_model(model)
    net = unwrap(model)  # the one name for the bare module: eval, checkpoints, export

    global_batch = cfg.optim.batch_size * world
    lr = cfg.optim.lr * global_batch / 128  # linear scaling rule (docs/train.md)
    optimizer = make_optimizer(cfg, net, lr)
    scheduler = make_scheduler(cfg, optimizer, lr)
    start_epoch, progress = 0, Progress()
    from pipelines.train.journal import prefer_short_requests

    prefer_short_requests()  # this worker only sends metrics: fail fast, the sender retries
    # Rank 0's metrics (None elsewhere): every `if metrics_log` below is "on rank 0".
    metrics_log = rank_zero(RunMetrics, cfg, loop_config["tracking_uri"],
                            loop_config["run_id"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch, progress, _ = load_training_state(d, net, optimizer, scheduler,
                                                           device)
        # One point per restore (after a failure or --resume): the UI shows where runs
        # picked up again.
        if metrics_log:
            metrics_log.log("restore", start_epoch, {"restored_at_epoch": start_epoch})

    train_loader = make_loader(split_readers(data_dir, manifest, cfg.data.train_split),
                               cfg.data.crop, "train", cfg.optim.batch_size, rank, world,
                               cfg.run.seed, cfg.data.loader_workers, on_gpu,
                               gpu_decode=cfg.data.decode_on_gpu,
                               pad=4 if cfg.model.variant == "cifar" else 0)
    # Validation always decodes on the CPU: it is 4% of ImageNet and needs the ten crops.
    val_loader = make_loader(split_readers(data_dir, manifest, cfg.data.val_split),
                             cfg.data.crop, "ten" if cfg.run.ten_crop else "center",
                             cfg.optim.batch_size, rank, world, cfg.run.seed,
                             cfg.data.loader_workers, on_gpu) if has_val else None
    pca = {"alphastd": cfg.data.pca_alphastd} if cfg.data.pca_alphastd > 0 else None
    amp = precision.autocast(device, cfg.run.amp)  # bf16 on GPU and native-bf16 CPUs
    to_device = DeviceBatches(device, cfg.data.crop, cfg.data.decode_on_gpu)
    warmup = Warmup(cfg.optim.warmup_epochs, len(train_loader))
    chaos = Chaos.from_config(loop_config.get("chaos"))
    info = inference_info(cfg, manifest, num_classes, loop_config.get("init_stats"))
    monitor = _node_monitor(loop_config, ctx)

    try:
        for epoch in range(start_epoch, cfg.run.epochs):
            torch.manual_seed(epoch_seed(cfg.run.seed, epoch, rank))
            train_loader.sampler.set_epoch(epoch)
            def on_step(step: int, e: int = epoch) -> None:
                warmup.step(optimizer, e, step)
                if chaos:
                    chaos.maybe_kill(rank, e, step)

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
            warmup.end_epoch(optimizer)
            if not (warmup.active(epoch) and cfg.optim.schedule == "plateau"):
                # No plateau drop while the rate is still climbing.
                step_scheduler(cfg, scheduler, score)
            progress.update(score)
            if metrics_log:
                metrics_log.log("epoch", epoch, metrics)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = rank_zero(_checkpoint, tmp, net, optimizer, scheduler, epoch, progress,
                                 loop_config["run_id"], info, cfg, confusion)
                # Ray keeps the best checkpoints by this; on a tie the earlier epoch ranks
                # first, as early stopping and best_checkpoint count it.
                ray.train.report({**metrics, "epoch": epoch,
                                  "checkpoint_score": score + epoch * 1e-9}, checkpoint=ckpt)
            if progress.should_stop(cfg.optim.early_stop_patience):
                break
    finally:
        if metrics_log:
            metrics_log.close()
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:  # noqa: BLE001 - system metrics are a side channel
                pass


def read_init_weights(cfg: config.TrainConfig, path: str) -> dict[str, torch.Tensor]:
    """The fitted start weights the launcher wrote beside the run's checkpoints (any
    storage Ray Train writes to, so workers on every node read the same file)."""
    import io

    from pipelines.train.storage import storage_filesystem

    fs, _ = storage_filesystem(cfg.run.storage)
    with fs.open_input_stream(path) as fh:
        return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)


def _checkpoint(tmp: str, *args):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(save_training_state(tmp, *args)))
