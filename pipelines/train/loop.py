"""The per-worker training loop that Ray Train runs in every worker process.

Launched by `pipelines/train/launcher.py` (`python workflow.py train`); never run directly.
One call of `train_loop_per_worker` = one worker of one attempt: after a failure Ray restarts
the whole group and this function starts again from `ray.train.get_checkpoint()`.

The pieces that do not need Ray (one epoch of training, evaluation, the schedule and early
stopping, writing and reading the training state) are plain functions, so
`tests/test_train.py` checks them on real shards in one process.
"""

from __future__ import annotations

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
from pipelines import config, precision
from pipelines.data.shards import read_manifest, split_readers
from pipelines.serve.model import save_bundle
from pipelines.train.ingest import decode_crop_batch, make_loader

STATE, CONFUSION, CONFIG = "state.pt", "val_confusion.npy", "config.yaml"
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


def make_scheduler(cfg: config.TrainConfig, optimizer: torch.optim.Optimizer, lr: float):
    optim = cfg.optim
    if optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=0.1)
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.run.epochs)
    # The paper: divide by 10 when the validation error stops improving, three times in all.
    # min_lr stops the fourth drop (0.999: float rounding must not block the third), and eps
    # (1% of the last rate) makes the 0.1% step from the third rate to min_lr a no-op.
    # Per group: a fine-tuning's body runs at a fraction of the rate and drops as often.
    last = lr * 0.1 ** optim.max_lr_drops
    mults = [g.get("lr_mult", 1.0) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=optim.lr_patience,
        min_lr=[last * m * 0.999 for m in mults], eps=last * min(mults) * 0.01)


def step_scheduler(cfg: config.TrainConfig, scheduler, score: float) -> None:
    """Once per epoch: plateau looks at the epoch's score (val top-1 error), others count."""
    if cfg.optim.schedule == "plateau":
        scheduler.step(score)
    else:
        scheduler.step()


@dataclass
class Progress:
    """The best score so far and the epochs since it improved (early stopping:
    stop after `patience` epochs without a better score; 0 never stops)."""

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


def param_groups(net: torch.nn.Module, weight_decay: float, bias_decay: bool,
                 body_lr_mult: float = 1.0) -> list[dict]:
    """Optimiser parameter groups of the trainable parameters. Weights decay, biases (every
    1-d parameter) only with `bias_decay`, as in Caffe's bvlc_alexnet (decay_mult 0) and
    cuda-convnet's configs: decaying the positive init biases pulls the ReLUs they keep
    alive towards zero. With `body_lr_mult` (fine-tuning), every layer but the last runs at
    that fraction of the lr; each group's `lr_mult` says its share, and the groups at the
    full rate come first (their lr is the one logged)."""
    from pipelines.train.pretrained import HEAD

    groups: dict[tuple[float, bool], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:  # frozen (--freeze): not the optimiser's business
            continue
        mult = 1.0 if name.startswith(HEAD + ".") else body_lr_mult
        groups.setdefault((mult, p.ndim > 1), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, not k[1]))
    return [{"params": groups[k], "lr_mult": k[0],
             "weight_decay": weight_decay if k[1] or bias_decay else 0.0} for k in order]


def make_optimizer(cfg: config.TrainConfig, net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (the paper), Adam or AdamW, at `lr` x each group's `lr_mult`."""
    groups = param_groups(net, cfg.optim.weight_decay, cfg.optim.bias_decay,
                          cfg.model.body_lr_mult)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum)


def freeze(net: torch.nn.Module, what: str) -> list[str]:
    """`--freeze features`: the conv layers keep their (pretrained) values; returns the
    frozen parameter names. Done before DDP wraps the model, which then skips them."""
    if what == "none":
        return []
    frozen = [f"{what}.{n}" for n, _ in getattr(net, what).named_parameters()]
    for p in getattr(net, what).parameters():
        p.requires_grad_(False)
    return frozen


class Warmup:
    """Linear lr warmup per step over the first `epochs` epochs (Goyal et al. 2017): step i
    of the warmup runs at `scheduled lr x (i + 1) / warmup steps`. The schedulers never see
    the warmup rates: `end_epoch` puts the scheduled rates back before they step. A pure
    function of (epoch, step), so a run restored mid-warmup goes on where it was."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        self.epochs, self.steps_per_epoch = epochs, max(1, steps_per_epoch)
        self.scheduled: list[float] | None = None

    def active(self, epoch: int) -> bool:
        return epoch < self.epochs

    def step(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        if not self.active(epoch):
            return
        if self.scheduled is None:
            self.scheduled = [g["lr"] for g in optimizer.param_groups]
        done = epoch * self.steps_per_epoch + step + 1
        scale = min(1.0, done / (self.epochs * self.steps_per_epoch))
        for group, lr in zip(optimizer.param_groups, self.scheduled, strict=True):
            group["lr"] = lr * scale

    def end_epoch(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scheduled is not None:
            for group, lr in zip(optimizer.param_groups, self.scheduled, strict=True):
                group["lr"] = lr
            self.scheduled = None


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


def save_training_state(directory: str | Path, net: torch.nn.Module, optimizer, scheduler,
                        epoch: int, progress: Progress, run_id: str, info: dict,
                        cfg: config.TrainConfig, confusion: np.ndarray | None = None) -> Path:
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
    (directory / CONFIG).write_text(config.to_yaml(cfg))
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


def read_confusion(directory: str | Path) -> np.ndarray | None:
    path = Path(directory) / CONFUSION
    return np.load(path, allow_pickle=False) if path.is_file() else None

