"""Which precision and memory layout the model runs in, on this device: one place for the
training loop, `predict` and `batch-infer`.

- CUDA: bf16 autocast (fp16 for inference on GPUs without bf16) and channels_last.
- A CPU with native bf16 (AVX512_BF16 or AMX-BF16 on x86; oneDNN has bf16 kernels for it):
  bf16 autocast and channels_last. Measured on a 2-core AVX512_BF16/AMX Xeon, paper AlexNet,
  batch 64: see benchmarks/train_step.py. bf16 keeps fp32's exponent range, so LRN's sums of
  squares cannot overflow (alexnet.lrn sums them in fp32 anyway), and no loss scaling is
  needed.
- Any other CPU: fp32, NCHW. oneDNN would emulate bf16 there (AVX512 without BF16 converts
  in software), which is slower than fp32, not faster.

`amp=False` (`--no-amp`) forces fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch

__all__ = ["autocast", "cpu_has_native_bf16", "mixed_precision", "prepare_model"]

# torch.cpu.get_capabilities() names (cpuinfo's, as PyTorch reports them) of the ISA
# extensions that compute bf16 natively: x86 AVX512_BF16 and AMX-BF16; Arm's BF16 / SVE-BF16.
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16() -> bool:
    """True when PyTorch's oneDNN build has bf16 kernels for this CPU *and* the CPU computes
    bf16 natively. `torch.ops.mkldnn._is_mkldnn_bf16_supported()` alone is not enough: it is
    also True on plain AVX512 CPUs, where oneDNN emulates bf16 (slower than fp32). Asks
    PyTorch (cpuinfo through `torch.cpu.get_capabilities()`), never /proc/cpuinfo."""
    try:
        if not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build
        return False
    return any(bool(caps.get(name)) for name in _NATIVE_BF16)


def amp_dtype(device: torch.device | str, amp: bool, inference: bool = False) -> torch.dtype | None:
    """The autocast dtype for `device`, or None for fp32."""
    device = torch.device(device)
    if not amp:
        return None
    if device.type == "cuda":
        # Training stays bf16 (fp16 would need a GradScaler); inference on a pre-Ampere GPU
        # takes fp16, whose range a softmax over logits does not exceed.
        if inference and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def mixed_precision(device: torch.device | str, amp: bool, inference: bool = False
                    ) -> tuple[Callable[[], ContextManager], bool]:
    """(autocast context factory, use channels_last) for `device` and the `--amp` flag.

    channels_last goes with autocast: oneDNN's bf16 convolutions (and cuDNN's tensor-core
    ones) run NHWC natively, and the training batches arrive NHWC already, so NCHW would
    cost a reorder of every activation. fp32 keeps the model NCHW, as before."""
    device = torch.device(device)
    dtype = amp_dtype(device, amp, inference)
    if dtype is None:
        return contextlib.nullcontext, False
    return (lambda: torch.autocast(device.type, dtype=dtype)), True


def autocast(device: torch.device | str, amp: bool, inference: bool = False) -> ContextManager:
    """One (re-enterable, not nestable) autocast context for `device`, or a no-op one."""
    factory, _ = mixed_precision(device, amp, inference)
    return factory()


def prepare_model(model: torch.nn.Module, device: torch.device | str, amp: bool,
                  compile: bool = False) -> torch.nn.Module:  # noqa: A002 - the flag's name
    """Lay `model` out for its precision (channels_last with autocast) and, with `compile`
    on a GPU, compile it in place (`nn.Module.compile`: the state dict keeps its keys, so
    checkpoints and bundles do not change). On a CPU `compile` is skipped with a note: a
    whole-model compile measured slower than eager bf16 on the 2-core development CPU, and
    it needs a C++ toolchain and minutes of compile time per worker."""
    device = torch.device(device)
    _, channels_last = mixed_precision(device, amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        if device.type == "cuda":
            model.compile()
        else:
            print("--compile: skipped on CPU (a whole-model compile measured slower than eager "
                  "bf16 there); it applies to GPU runs", file=sys.stderr, flush=True)
    return model
