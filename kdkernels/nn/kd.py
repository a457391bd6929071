"""``DistillKL``: Hinton's KD loss as a module, a drop-in for RepDistiller's class."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_choice, check_temperature
from ..ops.kd import REDUCTIONS, kd_loss


class DistillKL(nn.Module):
    """``DistillKL(T)(y_s, y_t)`` = T^2 * KL(softmax(y_t/T) || softmax(y_s/T)) summed over classes / N.

    The same constructor, attribute ``T``, forward signature, result and (empty)
    state_dict as RepDistiller's ``DistillKL``; the loss runs through
    :func:`kdkernels.kd_loss` (fused, one pass per row).

    Args:
        T: temperature (> 0).
        reduction: ``"batchmean"`` (the reference's), ``"sum"``, ``"mean"`` or ``"none"``.
        backend: passed to :func:`kdkernels.kd_loss` (``None`` = environment/auto).

    Shapes: y_s, y_t (N, C) logits -> 0-dim loss ((N,) for ``"none"``).
    """

    def __init__(self, T: float, reduction: str = "batchmean", backend: Optional[str] = None):
        super().__init__()
        check_temperature(T, "DistillKL", "T (the temperature)")
        check_choice(reduction, "reduction", REDUCTIONS, "DistillKL")
        self.T = T
        self.reduction = reduction
        self.backend = backend

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        return kd_loss(y_s, y_t, self.T, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"T={self.T}" + (f", reduction={self.reduction!r}" if self.reduction != "batchmean" else "")
