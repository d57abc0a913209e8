"""pipelines.precision: what --amp means on this machine, and that the paper AlexNet trains
under it (bf16 autocast + channels_last + the fused LRN) where the CPU has native bf16."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from alexnet import build_model
from pipelines import precision


def test_cpu_choice_follows_native_bf16_and_the_flag():
    native = precision.cpu_has_native_bf16()
    assert isinstance(native, bool)
    # Only a oneDNN build that has bf16 kernels can say yes.
    if native:
        assert torch.backends.mkldnn.is_available()
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
    factory, channels_last = precision.mixed_precision("cpu", amp=True)
    assert channels_last == native
    assert precision.amp_dtype("cpu", True) == (torch.bfloat16 if native else None)
    factory, channels_last = precision.mixed_precision("cpu", amp=False)  # --no-amp: fp32
    assert factory is contextlib.nullcontext and not channels_last
    assert precision.amp_dtype("cpu", False) is None
    with precision.autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")


def test_compile_is_skipped_on_cpu_and_keeps_the_state_dict(capsys):
    model = build_model("cifar", 10)
    keys = list(model.state_dict())
    out = precision.prepare_model(model, "cpu", amp=True, compile=True)
    assert out is model and list(out.state_dict()) == keys  # no _orig_mod. prefixes
    assert "--compile: skipped on CPU" in capsys.readouterr().err
    if precision.cpu_has_native_bf16():
        assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_paper_step_under_the_cpu_precision():
    """One SGD step of the paper variant as the training loop runs it: bf16 logits where
    the CPU has native bf16 (fp32 otherwise), finite loss and gradients, fp32 weights."""
    torch.manual_seed(0)
    model = precision.prepare_model(build_model("paper", 10), "cpu", amp=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = (torch.rand(2, 224, 224, 3) * 255 - 120).permute(0, 3, 1, 2)  # NHWC batch as loaded
    with precision.autocast("cpu", True):
        logits = model(x)
    want = torch.bfloat16 if precision.cpu_has_native_bf16() else torch.float32
    assert logits.dtype == want
    loss = F.cross_entropy(logits.float(), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
