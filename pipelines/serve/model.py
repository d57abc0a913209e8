"""A bundle's model in torch: save and load the weights (memory-mapped, `weights_only=True`),
turn uint8 crops into the model's normalised input, and run it to probabilities. What a
bundle holds and its evaluation crops are `pipelines/serve/bundle.py` (no torch there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipelines.serve.bundle import WEIGHTS, geometry, make_crops, read_info, write_info


def save_bundle(directory: str | os.PathLike, state_dict: dict, info: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, directory / WEIGHTS)
    write_info(directory, info)
    return directory


def load_bundle(directory: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from code and load its weights safely; returns (model in eval, info)."""
    from alexnet import build_model

    info = read_info(directory)
    # Memory-mapped, and the model built on the meta device and given the loaded tensors: no
    # random initialisation of 61M weights that the checkpoint replaces, no second copy
    # (0.55 -> 0.01 s for the 240 MB torchvision AlexNet; every batch-inference actor and
    # every `predict` pays it). Actors on one node share the file's pages.
    state = torch.load(Path(directory) / WEIGHTS, map_location="cpu", weights_only=True,
                       mmap=True)
    with torch.device("meta"):
        model = build_model(info["variant"], info["num_classes"], groups=info.get("groups", 1),
                            init="default")
    model.load_state_dict(state, assign=True)  # strict: a missing or extra key is an error
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{directory}: {WEIGHTS} has no values for {left}")
    return model.to(device).eval(), info


def preprocess_image(rgb: np.ndarray, info: dict) -> np.ndarray:
    """The model's own evaluation transform: rescale the shorter side, centre crop."""
    return make_crops(rgb, geometry(info), ten_crop=False)


def to_input(batch_hwc_uint8: np.ndarray | torch.Tensor, info: dict,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> normalised float [N, 3, H, W] on `device`."""
    from alexnet.augment import normalize

    x = torch.as_tensor(batch_hwc_uint8).to(device, non_blocking=True).permute(0, 3, 1, 2)
    mean = torch.tensor(info["mean"], device=device)
    std = torch.tensor(info["std"], device=device)
    return normalize(x, mean, std)


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, batch_hwc_uint8: np.ndarray, info: dict,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Softmax probabilities [N, classes] for already cropped uint8 images."""
    logits = model(to_input(batch_hwc_uint8, info, device))
    return torch.softmax(logits.float(), dim=1).cpu().numpy()
