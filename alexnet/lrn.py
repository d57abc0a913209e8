"""Local response normalisation with a fused forward and an analytic backward.

:class:`LocalResponseNorm` is a drop-in for ``torch.nn.LocalResponseNorm``: the same
constructor arguments and semantics (Caffe's convention, ``alpha`` divided by ``size``; zero
padding across channels; the window of channel ``c`` is ``[c - size//2, c + (size-1)//2]``)
and the same empty state dict, so checkpoints of either load into the other.

Why: ``nn.LocalResponseNorm`` is ``pow -> pad -> avg_pool3d -> mul -> add -> pow -> div``,
and autograd keeps every intermediate and differentiates each op, avg_pool3d's backward
included; on a CPU it was 35-40 % of the paper AlexNet's training step. Here the channel
window sum is a few shifted in-place adds (one pass over memory each) and the backward is
the closed form

    d_c   = k + alpha/size * sum_{j in win(c)} x_j^2,   y_c = x_c * d_c^-beta
    dx_i  = g_i * d_i^-beta - 2*alpha*beta/size * x_i * sum_{c: i in win(c)} g_c x_c d_c^(-beta-1)

which needs only ``x``, ``d^-beta`` and ``d^(-beta-1)`` (saved by the forward; about 3x the
input's size in fp32, less than the intermediates autograd keeps for the nn version). Both
passes run over the batch a slice at a time, so that their ~15 element-wise steps stay in
the L2 cache.

Mixed precision: a bf16 (or fp16) input is squared and summed in fp32 (a sum of squares in
bf16 would lose the small terms beside the large ones); the output and the input gradient
come back in the input's dtype. Only torch is imported.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LocalResponseNorm", "local_response_norm"]


def _window_sum_(acc: torch.Tensor, src: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """acc[:, c] += sum of src[:, c - before .. c + after] without c itself (zero outside),
    in place along dim 1: one pass over memory per neighbour, no padded copy."""
    channels = src.shape[1]
    for o in range(1, min(before, channels - 1) + 1):
        acc[:, o:] += src[:, :-o]
    for o in range(1, min(after, channels - 1) + 1):
        acc[:, :-o] += src[:, o:]
    return acc


# Elements per chunk: every pass below works on a slice of the batch this big (about one
# conv1 or conv2 image of AlexNet, ~1 MB in fp32), so the ~15 passes over it run out of the
# L2 cache instead of memory, and temporaries are small allocations instead of fresh
# activation-sized pages. Measured fwd+bwd in bf16 on 2 (shared) cores, wall ms, whole
# batch -> 2**18 chunks: [64, 96, 55, 55] 548 -> 291, [64, 256, 27, 27] 1632 -> 194
# (2**20: 322 and 165). In fp32 the chunked passes were 2-9x slower (more, smaller
# parallel regions; no casts to save), so fp32 runs whole-batch passes.
_CHUNK = 1 << 18


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format in which `x` is dense, so that x[i:j] is one block of memory."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
            and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float):
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32, else as is
        fmt = _layout(x)
        x = x.contiguous(memory_format=fmt)
        # Chunks only pay off for bf16/fp16 inputs (their fp32 copies and casts are the
        # extra passes); an fp32 input measured slower in chunks than in whole-batch passes.
        per = max(1, _CHUNK // max(1, x[0].numel())) if x.dtype != acc else x.shape[0]
        out = torch.empty_like(x)
        scale = torch.empty_like(x, dtype=acc)   # d^-beta, saved
        ratio = torch.empty_like(x, dtype=acc)   # d^(-beta-1), saved
        for i in range(0, x.shape[0], per):
            j = i + per
            xf = x[i:j].to(acc)  # a view when x is fp32: never written to
            sq = torch.mul(xf, xf).mul_(alpha / size)
            d = _window_sum_(sq + k, sq, size // 2, (size - 1) // 2)
            if beta == 0.75:
                # d^-0.75 = rsqrt(d) * sqrt(rsqrt(d)), d^-1.75 = d^-0.75 * rsqrt(d)^2: cheap
                # vector ops instead of exp(log(d) * -beta), measured 2x faster.
                r = torch.rsqrt(d, out=ratio[i:j])
                sc = torch.sqrt(r, out=scale[i:j]).mul_(r)
                r.mul_(r).mul_(sc)
            else:
                sc = torch.pow(d, -beta, out=scale[i:j])
                torch.div(sc, d, out=ratio[i:j])
            if out.dtype == acc:
                torch.mul(xf, sc, out=out[i:j])
            else:
                out[i:j].copy_(sq.copy_(xf).mul_(sc))  # sq is spent: reuse it
        ctx.save_for_backward(x, scale, ratio)
        ctx.conf = (size, alpha, beta, per, fmt)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, ratio = ctx.saved_tensors
        size, alpha, beta, per, fmt = ctx.conf
        acc = scale.dtype
        grad = grad.contiguous(memory_format=fmt)
        dx = torch.empty_like(x)
        for i in range(0, x.shape[0], per):
            j = i + per
            g, xf = grad[i:j].to(acc), x[i:j].to(acc)
            t = torch.mul(g, xf).mul_(ratio[i:j])             # g_c x_c d_c^(-beta-1)
            # Output c read the inputs in win(c), so input i was read by c in [i-after, i+before].
            ts = _window_sum_(t.clone(), t, (size - 1) // 2, size // 2)
            res = dx[i:j] if dx.dtype == acc else t           # t is spent: reuse its memory
            torch.mul(g, scale[i:j], out=res).addcmul_(xf, ts, value=-2.0 * alpha * beta / size)
            if res is t:
                dx[i:j].copy_(t)
        return dx, None, None, None, None


def local_response_norm(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """Functional form of :class:`LocalResponseNorm` (``F.local_response_norm``'s arguments)."""
    if x.dim() < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {x.dim()} dimensions)")
    if x.numel() == 0:
        return x
    return _LRNFunction.apply(x, size, alpha, beta, k)


class LocalResponseNorm(nn.Module):
    """``torch.nn.LocalResponseNorm`` with a fused forward and an analytic backward.

    Args and semantics as ``nn.LocalResponseNorm``: ``b_c = a_c * (k + alpha/n *
    sum_{c' in win(c)} a_{c'}^2) ** -beta``. No parameters or buffers.
    """

    __constants__ = ["size", "alpha", "beta", "k"]

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn's name
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return "{size}, alpha={alpha}, beta={beta}, k={k}".format(**self.__dict__)
