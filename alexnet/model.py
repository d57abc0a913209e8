"""AlexNet model variants.

Three layouts, one builder each, plus :func:`build_model` that picks one by name:

- :class:`AlexNetPaper` (``"paper"``): Krizhevsky, Sutskever & Hinton (2012), 224x224 input.
  96-256-384-384-256 filters, local response normalisation after conv1 and conv2.
  60,965,224 parameters with the two-GPU grouping (``groups=2``), 62,378,344 without.
- :class:`AlexNet` (``"torchvision"``): the "one weird trick" layout (Krizhevsky 2014) that
  ``torchvision.models.alexnet`` implements, with the same module names, so torchvision
  state dicts load unchanged. 224x224 input, 61,100,840 parameters.
- :class:`CifarAlexNet` (``"cifar"``): the same idea scaled to 32x32 inputs.
  5,871,434 parameters for 10 classes.

Only torch is imported here: the training and serving code around it (Ray, MLflow) stays out.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from alexnet.lrn import LocalResponseNorm

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

VARIANTS: tuple[str, ...] = ("paper", "torchvision", "cifar")
#: Side of the square input each variant is designed for (the crop size, not the stored size).
INPUT_SIZE: dict[str, int] = {"paper": 224, "torchvision": 224, "cifar": 32}

_INITS = ("paper", "default")
#: The positive bias of the paper init used here (the paper: 1; see :func:`init_paper_`).
PAPER_INIT_BIAS = 0.1

# The paper's LRN: b = a / (k + alpha * sum_{n neighbours} a^2) ** beta, k=2, n=5,
# alpha=1e-4, beta=0.75. nn.LocalResponseNorm divides alpha by n (the Caffe convention), so
# the paper's alpha is passed as alpha * n; passing 1e-4 would weaken the normalisation 5x.
_LRN_SIZE = 5
_LRN_ALPHA = 1e-4
_LRN_BETA = 0.75
_LRN_K = 2.0


def _lrn() -> LocalResponseNorm:
    # alexnet.lrn's fused LRN: nn.LocalResponseNorm's semantics and (empty) state dict, with
    # an analytic backward, 2-3x faster on CPU; it also takes bf16 inputs (sums in fp32).
    return LocalResponseNorm(_LRN_SIZE, alpha=_LRN_ALPHA * _LRN_SIZE, beta=_LRN_BETA, k=_LRN_K)


def init_paper_(model: nn.Module, std: float = 0.01, bias: float = 1.0) -> nn.Module:
    """Initialise ``model`` in place as the paper does, and return it.

    Every conv and linear weight ~ N(0, ``std``). Biases are 1 in the 2nd, 4th and 5th conv
    layers and in every linear layer but the last ("accelerates the early stages of learning
    by providing the ReLUs with positive inputs"), 0 elsewhere. Layers are found in
    registration order, so this fits all three variants here (5 convs, 3 linears each).

    ``bias`` is the value of those positive biases: 1 in the paper. The models here default
    to :data:`PAPER_INIT_BIAS` (0.1) instead, as Caffe's bvlc_alexnet does ("initialization
    to 1 gave flat loss"): with 1, every fc7 ReLU output starts near 1, so fc8's gradient
    step grows with ``||h7||^2 ~ 4096`` and the logits overshoot; the loss blows up to
    several times ln(num_classes) in the first epoch and then sits at chance.

    N(0, 0.01) ignores fan-in; it was chosen for inputs that are only mean-subtracted (pixel
    units, std ~ 60), which is how the training recipe feeds the paper variant.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    one_bias = {id(convs[i]) for i in (1, 3, 4) if i < len(convs)}
    one_bias |= {id(m) for m in linears[:-1]}
    with torch.no_grad():
        for m in convs + linears:
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias if id(m) in one_bias else 0.0)
    return model


def _apply_init(model: nn.Module, init: str, bias: float) -> None:
    if init == "paper":
        init_paper_(model, bias=bias)
    elif init != "default":
        raise ValueError(f"unknown init {init!r}; expected one of {_INITS}")


def _classifier(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """torchvision's head: dropout on the inputs of fc6 and fc7. Same indices as torchvision
    (0 Dropout, 1 fc6, 2 ReLU, 3 Dropout, 4 fc7, 5 ReLU, 6 fc8), so its weights load."""
    return nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def _paper_classifier(in_features: int, hidden: int, num_classes: int,
                      dropout: float) -> nn.Sequential:
    """The paper's head (and Caffe's bvlc_alexnet): dropout on the outputs of fc6 and fc7,
    after their ReLUs: 0 fc6, 1 ReLU, 2 Dropout, 3 fc7, 4 ReLU, 5 Dropout, 6 fc8. pool5's
    9,216 features reach fc6 whole, which the paper's N(0, 0.01) init relies on."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )


class _FeaturesPoolClassifier(nn.Module):
    """The forward pass every variant shares: features -> avgpool -> flatten -> classifier
    (torchvision's module names, so state dicts stay interchangeable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNetPaper(_FeaturesPoolClassifier):
    """AlexNet as in the 2012 paper. Input ``[N, 3, 224, 224]``, output ``[N, num_classes]``.

    Parameters (``num_classes=1000``): 60,965,224 with ``groups=2`` (conv2, conv4 and conv5
    each see only their own GPU's half of the previous layer, as in the paper's figure 2);
    62,378,344 with ``groups=1``. conv3 and the FC layers always connect to everything.

    conv1 uses padding 2 so that 224 gives 55x55 (the paper's 224 with no padding does not
    divide; 227 with none would give the same 55). The AdaptiveAvgPool2d((6, 6)) is the
    identity at 224 and lets other input sizes reach the 9216-wide classifier.

    Args:
        num_classes: width of the last layer.
        groups: 1 (one device) or 2 (the paper's two-GPU connectivity).
        dropout: drop probability on the outputs of fc6 and fc7 (0.5 in the paper).
        init: ``"paper"`` (N(0, 0.01) weights, some biases positive; see
            :func:`init_paper_`) or ``"default"`` (PyTorch's own initialisation).
        init_bias: the positive biases of the paper init (0.1; the paper's 1 stalls).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        groups: int = 1,
        dropout: float = 0.5,
        init: str = "paper",
        init_bias: float = PAPER_INIT_BIAS,
    ) -> None:
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 or 2, got {groups}")
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),  # 0 conv1 -> 55x55
            nn.ReLU(inplace=True),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 3 -> 27x27
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=groups),  # 4 conv2
            nn.ReLU(inplace=True),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 7 -> 13x13
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # 8 conv3: crosses the GPUs
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=groups),  # 10 conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=groups),  # 12 conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 14 -> 6x6
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _paper_classifier(256 * 6 * 6, 4096, num_classes, dropout)
        _apply_init(self, init, init_bias)


class AlexNet(_FeaturesPoolClassifier):
    """torchvision's AlexNet ("one weird trick" layout). Input ``[N, 3, 224, 224]``.

    61,100,840 parameters for 1000 classes: 64-192-384-256-256 filters, no LRN, no groups.
    Module names and indices equal ``torchvision.models.AlexNet``'s, so
    ``load_state_dict(torchvision.models.alexnet(weights=...).state_dict())`` works and gives
    the same outputs; torchvision is not imported here.

    Args:
        num_classes: width of the last layer.
        dropout: drop probability before fc6 and fc7.
        init: ``"default"`` (PyTorch's initialisation, as torchvision) or ``"paper"``.
    """

    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.5, init: str = "default",
        init_bias: float = PAPER_INIT_BIAS,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(256 * 6 * 6, 4096, num_classes, dropout)
        _apply_init(self, init, init_bias)


class CifarAlexNet(_FeaturesPoolClassifier):
    """AlexNet scaled to 32x32 inputs (CIFAR-10/100). Input ``[N, 3, 32, 32]``.

    5,871,434 parameters for 10 classes (5,963,684 for 100).

    Five convs (64@5x5, 192@5x5, 384, 256, 256 @3x3), stride 1 everywhere, LRN after the
    first two as in the paper, and three overlapping 3/2 max-pools: 32 -> 15 -> 7 -> 3.
    An 11x11 stride-4 first layer would leave 7x7 after one conv, so it is 5x5 stride 1.
    The classifier is 2304 -> 1024 -> 1024 -> classes (3.4M of the parameters): 4096-wide
    layers would hold ~26M for 50k training images and mostly memorise them.

    Args:
        num_classes: width of the last layer.
        dropout: drop probability before the two hidden FC layers.
        init: ``"default"`` (PyTorch's initialisation) or ``"paper"``.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, init: str = "default",
                 init_bias: float = PAPER_INIT_BIAS) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 32 -> 15
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 15 -> 7
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 7 -> 3
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = _classifier(256 * 3 * 3, 1024, num_classes, dropout)
        _apply_init(self, init, init_bias)


def alexnet_paper(num_classes: int = 1000, groups: int = 2, **kwargs: Any) -> AlexNetPaper:
    """The paper's AlexNet, two-GPU grouping by default (60,965,224 parameters)."""
    return AlexNetPaper(num_classes=num_classes, groups=groups, **kwargs)


def alexnet_torchvision(num_classes: int = 1000, **kwargs: Any) -> AlexNet:
    """torchvision's AlexNet layout (61,100,840 parameters), state dicts interchangeable."""
    return AlexNet(num_classes=num_classes, **kwargs)


def alexnet_cifar(num_classes: int = 10, **kwargs: Any) -> CifarAlexNet:
    """AlexNet for 32x32 inputs (5,871,434 parameters for 10 classes)."""
    return CifarAlexNet(num_classes=num_classes, **kwargs)


def check_variant(variant: str, groups: int = 1) -> None:
    """Raise ValueError unless ``variant``/``groups`` name a model :func:`build_model` makes.

    Cheap (builds nothing), so a launcher can refuse bad flags before it starts any worker.
    ``groups`` is checked only for ``"paper"`` (1 or 2); other variants must leave it at 1.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {VARIANTS}")
    if variant == "paper" and groups not in (1, 2):
        raise ValueError(f"--groups must be 1 or 2 for the paper variant, got {groups}")
    if variant != "paper" and groups != 1:
        raise ValueError(f"--groups {groups} applies only to the 'paper' variant, not {variant!r}")


@functools.cache
def min_input_size(variant: str) -> int:
    """The smallest square input side ``variant``'s layers accept (the paper layout: 63 px).

    Found by running the features on the meta device (shapes only: no memory, no FLOPs), so
    a launcher can refuse a too-small ``--crop`` before any worker starts.
    """
    check_variant(variant)
    with torch.device("meta"):
        features = build_model(variant, 10, init="default").features

        def fits(size: int) -> bool:
            try:
                features(torch.empty(1, 3, size, size))
            except RuntimeError:  # a layer's output would be empty
                return False
            return True

        low, high = 1, 1024  # fits(high); bigger inputs always fit when a smaller one does
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def build_model(
    variant: str,
    num_classes: int,
    groups: int = 1,
    dropout: float = 0.5,
    init: str | None = None,
    init_bias: float = PAPER_INIT_BIAS,
) -> nn.Module:
    """Build a variant by name: ``"paper"``, ``"torchvision"`` or ``"cifar"``.

    ``init=None`` means the paper's initialisation for ``"paper"`` and PyTorch's default for
    the others. ``groups`` only exists in the paper layout; asking another variant for
    ``groups != 1`` is an error rather than silently ignored.
    """
    check_variant(variant, groups)
    if init is not None and init not in _INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {_INITS}")
    if variant == "paper":
        return AlexNetPaper(num_classes, groups=groups, dropout=dropout, init=init or "paper",
                            init_bias=init_bias)
    cls = AlexNet if variant == "torchvision" else CifarAlexNet
    return cls(num_classes, dropout=dropout, init=init or "default", init_bias=init_bias)
