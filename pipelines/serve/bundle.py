"""What a trained model is outside training, without torch: a bundle directory holding

  - `weights.pt`: the unwrapped state dict (tensors only; `pipelines/serve/model.py` loads
    it with `torch.load(weights_only=True)`, so loading a bundle never runs pickled code);
  - `inference.json`: everything inference needs, read here and nowhere else:
    `variant`, `groups`, `num_classes`, `input_size` (the crop), `resize` (the shorter side
    before cropping), `mean` and `std` (pixel units 0-255; std 1 for mean-only inputs),
    `classes` (`[{index, wnid, name}]`) and `epoch` (null for imported weights);

and the model's evaluation transform (rescale the shorter side, centre or ten crops), in
NumPy and OpenCV only: resolving a model, decoding images and cutting crops never import
torch (the driver and every decode worker of batch inference would pay seconds and ~200 MB).

A bundle is a local checkpoint that `batch-infer --model DIR` accepts, and the artifacts of
the MLflow model (logged as "models from code": `pipelines/serve/pyfunc_model.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

WEIGHTS, INFERENCE = "weights.pt", "inference.json"

def read_info(directory: str | os.PathLike) -> dict:
    """A bundle's inference.json."""
    path = Path(directory) / INFERENCE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {INFERENCE}: not a model bundle")
    return json.loads(path.read_text())


def write_info(directory: str | os.PathLike, info: dict) -> None:
    (Path(directory) / INFERENCE).write_text(json.dumps(info, indent=1))


def geometry(info: dict) -> tuple[int, int]:
    """(rescale side, input size): models that share it share their crops."""
    return int(info["resize"]), int(info["input_size"])


def make_crops(rgb: np.ndarray, geom: tuple[int, int], ten_crop: bool) -> np.ndarray:
    """uint8 crops of one decoded image: [S, S, 3] (centre) or [10, S, S, 3] (ten-crop):
    rescale the shorter side to `resize`, then the centre crop, or the paper's ten crops
    of the central resize x resize square (`alexnet.crops`, torchvision's order)."""
    from alexnet import crops
    from pipelines.data.decode import MAX_ASPECT, rescale

    resize, size = geom
    h, w = rgb.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w):  # the limit preprocess applies, for the same reason
        raise ValueError(f"aspect ratio {max(h, w)}:{min(h, w)} is beyond "
                         f"{MAX_ASPECT}:1; rescaling would need too much memory")
    if ten_crop:
        return crops.ten_crop(rescale(rgb, resize, center_crop=True), size)
    return crops.center_crop(rescale(rgb, resize, center_crop=False), size)
