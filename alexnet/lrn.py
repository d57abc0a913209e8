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
input's size in fp32, less than the intermediates autograd keeps for the nn version).

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


class _LRNFunction(torch.autograd.Function):
    # Every fresh activation-sized tensor costs page faults (~2x an in-place pass over the
    # same memory, measured at conv1's 74 MB), so the passes below work in place and the
    # forward allocates three tensors (two of them saved), the backward two.
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32, else as is
        sq = torch.mul(xf, xf)
        sq.mul_(alpha / size)
        d = _window_sum_(sq + k, sq, size // 2, (size - 1) // 2)
        if beta == 0.75:
            # d^-0.75 = rsqrt(d) * sqrt(rsqrt(d)) and d^-1.75 = d^-0.75 * rsqrt(d)^2: cheap
            # vector ops instead of exp(log(d) * -beta), about 2x faster here.
            r = torch.rsqrt(d, out=sq)                        # d^-0.5, in sq's memory
            scale = torch.sqrt(r, out=d).mul_(r)              # d^-0.75, in d's memory
            ratio = r.mul_(r).mul_(scale)                     # d^-1.75
        else:
            scale = torch.pow(d, -beta, out=sq)
            ratio = d.reciprocal_().mul_(scale)               # d^(-beta-1)
        out = torch.mul(xf, scale)
        ctx.save_for_backward(x, scale, ratio)
        ctx.conf = (size, alpha, beta)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, ratio = ctx.saved_tensors
        size, alpha, beta = ctx.conf
        acc = torch.promote_types(x.dtype, torch.float32)
        g, xf = grad.to(acc), x.to(acc)
        t = torch.mul(g, xf).mul_(ratio)                      # g_c x_c d_c^(-beta-1)
        # Output c read the inputs in win(c), so input i was read by c in [i-after, i+before].
        ts = _window_sum_(t.clone(), t, (size - 1) // 2, size // 2)
        dx = torch.mul(g, scale, out=t)                       # t is spent: reuse its memory
        dx.addcmul_(xf, ts, value=-2.0 * alpha * beta / size)
        return dx.to(x.dtype), None, None, None, None


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
