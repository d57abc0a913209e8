"""The per-worker training loop that Ray Train runs in every worker process.

Launched by `pipelines/train.py` (`python workflow.py train`); never run directly.
One call of `train_loop_per_worker` = one worker of one attempt: after a failure Ray restarts
the whole group and this function starts again from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alexnet import build_model
from alexnet.augment import normalize, pca_lighting
from alexnet.metrics import ErrorMeter, topk_correct
from pipelines import config as C
from pipelines.ingest import make_loader
from pipelines.model_package import save_bundle
from pipelines.shards import read_manifest, split_readers

STATE = "state.pt"


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
        from mlflow.entities import Metric

        if epoch in self.done:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self.client.log_batch(self.run_id, metrics=batch)
        self.done.add(epoch)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def make_scheduler(cfg: C.TrainConfig, optimizer: torch.optim.Optimizer, lr: float):
    o = cfg.optim
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=0.1)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.run.epochs)
    # The paper: divide by 10 when the validation error stops improving, three times in all.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=o.lr_patience,
        min_lr=lr * 0.1 ** o.max_lr_drops * 0.999)


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


def evaluate(net: torch.nn.Module, loader, device, stats: dict, ten_crop: bool,
             world: int) -> dict:
    net.eval()
    meter = ErrorMeter()
    skipped = torch.zeros(1, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for images, labels, ok in loader:
            skipped += (~ok).sum()
            images, labels = images[ok].to(device), labels[ok].to(device)
            if labels.numel() == 0:
                continue
            if ten_crop:  # [N, 10, H, W, 3]: average the softmax of the ten crops
                n = images.shape[0]
                x = _to_model_input(images.flatten(0, 1), stats, device, None)
                probs = F.softmax(net(x).float(), dim=1).view(n, 10, -1).mean(1)
                logits = probs.log()
            else:
                logits = net(_to_model_input(images, stats, device, None)).float()
            loss = F.nll_loss(logits, labels, reduction="sum") if ten_crop else \
                F.cross_entropy(logits, labels, reduction="sum")
            meter.update(loss, topk_correct(logits, labels).to(device), labels.numel())
    reduced = ErrorMeter.from_tensor(_all_reduce(meter.as_tensor(device), world))
    out = {f"val_{k}": v for k, v in reduced.result().items()}
    out["val_images"] = reduced.n
    out["val_skipped_records"] = float(_all_reduce(skipped, world).item())
    return out


def _to_model_input(images_nhwc: torch.Tensor, stats: dict, device, pca) -> torch.Tensor:
    # NHWC uint8 -> NCHW view: the result is channels_last in memory without a copy.
    x = images_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if pca is not None:
        x = pca_lighting(x, stats["eigval"], stats["eigvec"], **pca)
    return normalize(x, stats["mean"], stats["std"])


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg: C.TrainConfig = C.from_dict(C.TrainConfig, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rank_zero = RankZero(rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts it)

    manifest = read_manifest(cfg.data.data)
    num_classes = len(manifest["classes"])
    s = manifest["stats"]
    stats = {k: torch.tensor(s[k], dtype=torch.float32, device=device)
             for k in ("mean", "std", "eigval", "eigvec")}
    has_val = cfg.data.val_split in manifest["splits"] and \
        manifest["splits"][cfg.data.val_split]["records"] > 0

    init = None if cfg.model.init == "auto" else cfg.model.init
    model = build_model(cfg.model.variant, num_classes, groups=cfg.model.groups,
                        dropout=cfg.model.dropout, init=init)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    net = unwrap(model)  # the one name for the bare module: eval, checkpoints, export

    global_batch = cfg.optim.batch_size * world
    lr = cfg.optim.lr * global_batch / 128  # linear scaling rule, documented in README
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, lr)
    start_epoch, best, since_best = 0, math.inf, 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
            net.load_state_dict(torch.load(Path(d) / "weights.pt", map_location=device,
                                           weights_only=True))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, best, since_best = state["epoch"] + 1, state["best"], state["since_best"]

    train_loader = make_loader(split_readers(cfg.data.data, manifest, cfg.data.train_split),
                               cfg.data.crop, "train", cfg.optim.batch_size, rank, world,
                               cfg.run.seed, cfg.data.loader_workers, on_gpu)
    val_loader = make_loader(split_readers(cfg.data.data, manifest, cfg.data.val_split),
                             cfg.data.crop, "ten" if cfg.run.ten_crop else "center",
                             cfg.optim.batch_size, rank, world, cfg.run.seed,
                             cfg.data.loader_workers, on_gpu) if has_val else None
    logger = rank_zero(MetricLogger, loop_config["tracking_uri"], loop_config["run_id"])
    pca = {"alphastd": cfg.data.pca_alphastd} if cfg.data.pca_alphastd > 0 else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and cfg.run.amp)

    for epoch in range(start_epoch, cfg.run.epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        meter = ErrorMeter()
        skipped = torch.zeros(1, dtype=torch.float64, device=device)
        wait = 0.0
        t0 = tick = time.perf_counter()
        for images, labels, ok in train_loader:
            wait += time.perf_counter() - tick
            skipped += (~ok).sum()
            images, labels = images[ok], labels[ok].to(device, non_blocking=True)
            x = _to_model_input(images, stats, device, pca)
            with amp:
                logits = model(x)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # detach() keeps the sums on the device: no CPU-GPU sync per step.
            meter.update(loss.detach() * labels.numel(),
                         topk_correct(logits.detach(), labels).to(device), labels.numel())
            tick = time.perf_counter()
        seconds = time.perf_counter() - t0
        local_images = meter.n
        train = ErrorMeter.from_tensor(_all_reduce(meter.as_tensor(device), world)).result()
        metrics = {"train_loss": train["loss"], "train_top1_error": train["top1_error"],
                   "train_top5_error": train["top5_error"],
                   "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s_worker": local_images / seconds,
                   "data_wait_fraction": wait / seconds,
                   "train_skipped_records": float(_all_reduce(skipped, world).item())}
        ips = torch.tensor([local_images / seconds], dtype=torch.float64, device=device)
        metrics["images_per_s"] = float(_all_reduce(ips, world).item())
        if val_loader is not None:
            metrics.update(evaluate(net, val_loader, device, stats, cfg.run.ten_crop, world))
        score = metrics.get("val_top1_error", metrics["train_loss"])
        metrics["score"] = score
        if cfg.optim.schedule == "plateau":
            scheduler.step(score)
        else:
            scheduler.step()
        improved = score < best
        best, since_best = (score, 0) if improved else (best, since_best + 1)
        metrics["epoch"] = epoch
        logged = {k: v for k, v in metrics.items() if k != "epoch"}
        rank_zero(MetricLogger.log_epoch, logger, epoch, logged)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = rank_zero(_write_checkpoint, tmp, cfg, net, optimizer, scheduler, epoch, best,
                             since_best, manifest, num_classes, loop_config)
            ray.train.report(metrics, checkpoint=ckpt)
        stop = cfg.optim.early_stop_patience and since_best >= cfg.optim.early_stop_patience
        if stop:
            break


def _write_checkpoint(tmp: str, cfg, net, optimizer, scheduler, epoch: int, best: float,
                      since_best: int, manifest: dict, num_classes: int, loop_config: dict):
    """A checkpoint is a model bundle (weights.pt + inference.json, servable as is) plus the
    training state (state.pt) and the resolved config."""
    from ray.train import Checkpoint

    save_bundle(tmp, net.state_dict(), {**inference_info(cfg, manifest, num_classes),
                                        "epoch": epoch})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "best": best, "since_best": since_best,
                "rng": torch.get_rng_state(), "run_id": loop_config["run_id"]},
               Path(tmp) / STATE)
    (Path(tmp) / "config.yaml").write_text(C.to_yaml(cfg))
    return Checkpoint.from_directory(tmp)

