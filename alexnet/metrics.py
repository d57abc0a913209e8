"""Top-k error, the paper's metric, accumulated without host syncs.

:class:`ErrorMeter` keeps its sums in one float64 tensor on the device the batches live on,
so ``update`` never calls ``.item()`` (each would stall the GPU pipeline once a step); the
only transfer is in :meth:`ErrorMeter.result`. The same tensor is what a distributed
``all_reduce(SUM)`` adds up across workers (:meth:`ErrorMeter.as_tensor` /
:meth:`ErrorMeter.from_tensor`). float64 counts stay exact far beyond ImageNet's 1.28M images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ErrorMeter", "topk_correct"]


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """How many rows have ``target`` among their ``k`` highest logits, for each ``k`` in ``ks``.

    ``logits``: ``[N, C]``; ``target``: ``[N]`` class indices. Returns ``[len(ks)]`` float64 on
    ``logits``' device. ``k`` is clipped to ``C`` (top-5 of a 3-class problem is top-3). Ties
    are broken by ``torch.topk``'s order. One ``topk`` for the largest ``k`` serves them all.
    """
    num_classes = logits.shape[1]
    kmax = min(max(ks), num_classes)
    pred = logits.topk(kmax, dim=1).indices  # [N, kmax], best first
    hit = pred.eq(target.view(-1, 1))
    # Cumulative "found within the first j" per row; column k-1 answers top-k.
    found = hit.cumsum(dim=1).clamp_(max=1)
    counts = [found[:, min(k, num_classes) - 1].sum() for k in ks]
    return torch.stack(counts).to(torch.float64)


class ErrorMeter:
    """Sums of loss, top-k hits and examples over an epoch.

    ``update(loss_sum, correct, n)`` takes the loss summed over the batch (not the mean, so
    uneven last batches weigh right), :func:`topk_correct`'s counts and the batch size.
    Tensors or plain numbers are accepted.
    """

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks: tuple[int, ...] = tuple(ks)
        # Layout: [loss_sum, correct_k for each k, n]. Created on the first update's device.
        self._sums: Tensor | None = None

    def _zeros(self, device: torch.device | str | None = None) -> Tensor:
        return torch.zeros(len(self.ks) + 2, dtype=torch.float64, device=device)

    def update(self, loss_sum: Tensor | float, correct: Tensor | Sequence[float], n: int) -> None:
        device = next(
            (v.device for v in (loss_sum, correct) if isinstance(v, Tensor)),
            self._sums.device if self._sums is not None else None,
        )
        if self._sums is None:
            self._sums = self._zeros(device)
        loss = torch.as_tensor(loss_sum, dtype=torch.float64, device=self._sums.device)
        hits = torch.as_tensor(correct, dtype=torch.float64, device=self._sums.device)
        if hits.numel() != len(self.ks):
            raise ValueError(f"expected {len(self.ks)} correct counts, got {hits.numel()}")
        self._sums[0] += loss.detach().reshape(())
        self._sums[1:-1] += hits.detach().reshape(-1)
        self._sums[-1] += n

    def reset(self) -> None:
        self._sums = None

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """A float64 copy ``[loss_sum, correct_k..., n]``, on ``device`` when given."""
        t = self._sums.clone() if self._sums is not None else self._zeros(device)
        return t.to(device) if device is not None else t

    @classmethod
    def from_tensor(cls, t: Tensor, ks: Sequence[int] = (1, 5)) -> ErrorMeter:
        """A meter holding the sums in ``t`` (for instance after ``all_reduce``)."""
        meter = cls(ks)
        if t.numel() != len(meter.ks) + 2:
            raise ValueError(f"expected {len(meter.ks) + 2} values, got {t.numel()}")
        meter._sums = t.detach().to(torch.float64).reshape(-1).clone()
        return meter

    @property
    def n(self) -> int:
        return 0 if self._sums is None else int(self._sums[-1].item())

    def result(self) -> dict[str, float]:
        """``loss`` (mean per example) and ``top{k}_error`` as fractions 0-1; NaN when empty."""
        values = self.as_tensor().tolist()
        n = values[-1]
        if n == 0:
            return {"loss": math.nan} | {f"top{k}_error": math.nan for k in self.ks}
        out = {"loss": values[0] / n}
        for k, hits in zip(self.ks, values[1:-1], strict=True):
            out[f"top{k}_error"] = 1.0 - hits / n
        return out
