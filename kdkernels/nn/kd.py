"""``DistillKL``: Hinton's KD loss as a module, a drop-in for RepDistiller's class."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

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
        if isinstance(T, bool) or not isinstance(T, numbers.Real):
            raise TypeError(f"DistillKL: T must be a real number, got {type(T).__name__}")
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"DistillKL: T (the temperature) must be finite and > 0, got {T}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"DistillKL: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.T = T
        self.reduction = reduction
        self.backend = backend

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        return kd_loss(y_s, y_t, self.T, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"T={self.T}" + (f", reduction={self.reduction!r}" if self.reduction != "batchmean" else "")
