"""What a trained model is outside training: weights plus everything inference needs.

A model bundle is a directory with
  - `weights.pt`: the unwrapped state dict (torch.save of tensors only; read back with
    `torch.load(weights_only=True)`, so loading a bundle never runs pickled code);
  - `inference.json`: variant, groups, num_classes, input size, resize, mean/std (pixel units),
    the class index (`[{index, wnid, name}]`) and the dataset manifest digest.

The same bundle is a local checkpoint that `batch-infer --model DIR` accepts, and the
artifacts of the MLflow model: it is logged as "models from code" (`pipelines/serve/pyfunc_model.py`
is copied, not pickled), so `mlflow.pyfunc.load_model(uri).predict(images)` works anywhere the
project's code is importable, and the Model Registry holds nothing unpickled on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

WEIGHTS, INFERENCE = "weights.pt", "inference.json"


def save_bundle(directory: str | os.PathLike, state_dict: dict, info: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, directory / WEIGHTS)
    (directory / INFERENCE).write_text(json.dumps(info, indent=1))
    return directory


def load_info(directory: str | os.PathLike) -> dict:
    path = Path(directory) / INFERENCE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {INFERENCE}: not a model bundle")
    return json.loads(path.read_text())


def load_bundle(directory: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from code and load its weights safely; returns (model in eval, info)."""
    from alexnet import build_model

    info = load_info(directory)
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
    from alexnet.augment import center_crop
    from pipelines.data.decode import rescale

    img = rescale(rgb, info["resize"], center_crop=False)
    return center_crop(img, info["input_size"])


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
