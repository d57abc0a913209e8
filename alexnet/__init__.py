"""AlexNet in pure PyTorch: model variants, paper initialisation, augmentations, metrics.

Imports only torch (and numpy for the CPU-side crops); Ray and MLflow live in ``pipelines``.
The names below are loaded on first use (PEP 562), so ``alexnet.crops`` (NumPy only) imports
without torch.
"""

import importlib

__all__ = [
    "INPUT_SIZE",
    "PAPER_INIT_BIAS",
    "VARIANTS",
    "AlexNet",
    "AlexNetPaper",
    "CifarAlexNet",
    "alexnet_cifar",
    "alexnet_paper",
    "alexnet_torchvision",
    "build_model",
    "check_variant",
    "init_paper_",
    "min_input_size",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("alexnet.model"), name)
    raise AttributeError(f"module 'alexnet' has no attribute {name!r}")
