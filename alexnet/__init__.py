"""AlexNet in pure PyTorch: model variants, paper initialisation, augmentations, metrics.

Imports only torch (and numpy for the CPU-side crops); Ray and MLflow live in ``pipelines``.
"""

from alexnet.model import (
    INPUT_SIZE,
    PAPER_INIT_BIAS,
    VARIANTS,
    AlexNet,
    AlexNetPaper,
    CifarAlexNet,
    alexnet_cifar,
    alexnet_paper,
    alexnet_torchvision,
    build_model,
    check_variant,
    init_paper_,
    min_input_size,
)

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
