"""The moving parts of the training recipe, as plain functions of the config (no Ray, so
`tests/test_train.py` checks them in one process): the optimiser and its parameter groups
(no decay on biases, a fine-tuning's body at a fraction of the rate, frozen layers left
out), the lr schedule (plateau, step, cosine) with its warmup, early stopping, and the
per-rank, per-epoch seeds.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from pipelines import config


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
