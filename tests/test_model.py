"""Model variants: shapes, exact parameter counts, paper init, torchvision parity, summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alexnet import (
    INPUT_SIZE,
    VARIANTS,
    AlexNet,
    AlexNetPaper,
    alexnet_cifar,
    alexnet_paper,
    alexnet_torchvision,
    build_model,
)
from alexnet.summary import format_table, layer_table


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("variant", "num_classes"), [("paper", 1000), ("torchvision", 1000), ("cifar", 10)]
)
def test_output_shape(variant: str, num_classes: int) -> None:
    model = build_model(variant, num_classes).eval()
    size = INPUT_SIZE[variant]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, num_classes)


def test_paper_groups2_output_shape_and_other_input_sizes() -> None:
    model = alexnet_paper().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
        # The adaptive pool lets bigger inputs through (e.g. 256 test images uncropped).
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_paper_conv1_gives_55() -> None:
    model = AlexNetPaper()
    assert model.features[0](torch.zeros(1, 3, 224, 224)).shape == (1, 96, 55, 55)


def test_param_counts() -> None:
    assert n_params(alexnet_paper(groups=2)) == 60_965_224
    assert n_params(AlexNetPaper(groups=1)) == 62_378_344
    assert n_params(alexnet_torchvision()) == 61_100_840
    assert n_params(alexnet_cifar()) == 5_871_434
    assert n_params(alexnet_cifar(100)) == 5_963_684


def test_builders_agree_with_build_model() -> None:
    assert n_params(build_model("paper", 1000, groups=2)) == 60_965_224
    assert isinstance(build_model("torchvision", 1000), AlexNet)
    assert VARIANTS == ("paper", "torchvision", "cifar")
    assert INPUT_SIZE == {"paper": 224, "torchvision": 224, "cifar": 32}


def test_unknown_variant_raises() -> None:
    with pytest.raises(ValueError, match="paper.*torchvision.*cifar"):
        build_model("vgg", 1000)
    with pytest.raises(ValueError):
        build_model("paper", 1000, init="xavier")
    with pytest.raises(ValueError):
        build_model("torchvision", 1000, groups=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_finite_gradient(variant: str) -> None:
    num_classes = 10
    model = build_model(variant, num_classes, groups=2 if variant == "paper" else 1)
    # Each variant's own default init (paper init for "paper"): its 1-biases keep ReLUs alive.
    size = INPUT_SIZE[variant]
    x = torch.randn(2, 3, size, size)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_paper_init_statistics() -> None:
    model = alexnet_paper()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # The paper's positive biases are 1; the default here is 0.1 (PAPER_INIT_BIAS).
    expected_bias = [0, 0.1, 0, 0.1, 0.1] + [0.1, 0.1, 0]
    for m, b in zip(convs + fcs, expected_bias, strict=True):
        assert torch.all(m.bias == b), (m, b)
        assert m.weight.mean().abs() < 2e-3
        assert m.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_default_init_is_not_paper_init() -> None:
    model = AlexNetPaper(init="default")
    assert not torch.all(model.features[4].bias == 0.1)
    # torchvision layout takes the paper init on request, same bias pattern.
    tv = AlexNet(init="paper", init_bias=1.0)
    assert torch.all(tv.features[3].bias == 1) and torch.all(tv.features[0].bias == 0)
    assert torch.all(tv.classifier[4].bias == 1) and torch.all(tv.classifier[6].bias == 0)


def test_lrn_follows_paper_formula() -> None:
    # b = a / (k + alpha * sum over 5 neighbouring channels of a^2) ** beta, alpha=1e-4, k=2.
    lrn = AlexNetPaper().features[2]
    a = torch.randn(1, 8, 3, 3) * 30
    sq = nn.functional.pad(a.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i : i + 8] for i in range(5))
    expected = a / (2 + 1e-4 * window) ** 0.75
    torch.testing.assert_close(lrn(a), expected)


def test_torchvision_parity() -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = AlexNet().eval()
    ours.load_state_dict(reference.state_dict())  # strict: same names and shapes
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in reference.named_modules()]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)


def test_layer_table_paper() -> None:
    rows = layer_table(alexnet_paper())
    assert rows
    assert sum(r["params"] for r in rows) == 60_965_224
    first = rows[0]
    assert first["name"] == "features.0" and first["type"] == "Conv2d"
    assert first["output_shape"] == (1, 96, 55, 55)
    assert rows[-1]["output_shape"] == (1, 1000)
    pool = [r for r in rows if r["name"] == "features.14"][0]
    assert pool["output_shape"] == (1, 256, 6, 6)
    text = format_table(rows)
    assert "Total params: 60,965,224" in text
    assert "features.0" in text and "Conv2d" in text


def test_layer_table_cifar_restores_training_mode() -> None:
    model = alexnet_cifar()
    rows = layer_table(model, (1, 3, 32, 32))
    assert model.training
    assert sum(r["params"] for r in rows) == 5_871_434
    assert rows[-1]["output_shape"] == (1, 10)
