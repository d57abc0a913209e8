"""A training checkpoint, as every epoch writes it and a restart or `--resume` reads it back:
a servable bundle (weights.pt + inference.json), the training state (state.pt: optimiser,
scheduler, epoch, best score, RNG, MLflow run id; tensors and plain types only, read with
`weights_only=True`), the resolved config and the val confusion matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines import config
from pipelines.serve.model import save_bundle
from pipelines.train.recipe import Progress

STATE, CONFUSION, CONFIG = "state.pt", "val_confusion.npy", "config.yaml"


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


def read_confusion(directory: str | Path) -> np.ndarray | None:
    path = Path(directory) / CONFUSION
    return np.load(path, allow_pickle=False) if path.is_file() else None
