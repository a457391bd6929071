"""``LinearDistillKL``: KD of two language models' lm_heads without materialising their logits."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.linear_kd import REDUCTIONS, linear_kd_loss

Head = Union[nn.Linear, Tensor]


def _weight_bias(head: Head, arg: str) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, Tensor):
        return head, None
    raise TypeError(f"LinearDistillKL: {arg} must be an nn.Linear or a (V, D) weight tensor, "
                    f"got {type(head).__name__}")


class LinearDistillKL(nn.Module):
    r"""``T^2 KL(softmax(head_t(h_t)/T) || softmax(head_s(h_s)/T))`` (+ ``ce_weight`` CE), fused with the heads.

    The same value as ``DistillKL(T)(head_s(h_s), head_t(h_t))`` (plus
    ``ce_weight * cross_entropy(head_s(h_s), labels, ignore_index=...)``), but
    through :func:`kdkernels.linear_kd_loss`: the (tokens, vocabulary) logits
    are never held in memory, forward or backward.

    Args:
        T: temperature (> 0).
        reduction: ``"batchmean"`` (sum over kept tokens / their number), ``"sum"`` or ``"none"``.
        ignore_index: tokens whose label equals it are left out (e.g. -100, HF's padding label).
        ce_weight: weight of the student's cross-entropy against ``labels`` (at T = 1).
        chunk: tokens per chunk (None: from the shapes).
        backend: passed to :func:`kdkernels.linear_kd_loss`.

    Shapes: ``forward(h_s, head_s, h_t, head_t, labels=None)`` with hidden
    states (..., D_s) and (..., D_t) of equal leading shape (flattened to N
    tokens), heads ``nn.Linear(D, V)`` or (V, D) weights, labels (...) -> 0-dim
    loss, or (N,) for ``"none"``.
    """

    def __init__(self, T: float, reduction: str = "batchmean", ignore_index: Optional[int] = None,
                 ce_weight: float = 0.0, chunk: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, numbers.Real):
            raise TypeError(f"LinearDistillKL: T must be a real number, got {type(T).__name__}")
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"LinearDistillKL: T (the temperature) must be finite and > 0, got {T}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"LinearDistillKL: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.T = T
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.chunk = chunk
        self.backend = backend

    def forward(self, h_s: Tensor, head_s: Head, h_t: Tensor, head_t: Head,
                labels: Optional[Tensor] = None) -> Tensor:
        w_s, b_s = _weight_bias(head_s, "head_s")
        w_t, b_t = _weight_bias(head_t, "head_t")
        for arg, h in (("h_s", h_s), ("h_t", h_t)):
            if not isinstance(h, Tensor) or h.dim() < 1:
                raise ValueError(f"LinearDistillKL: {arg} must be a tensor (..., D), got "
                                 f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
        if h_s.shape[:-1] != h_t.shape[:-1]:
            raise ValueError(f"LinearDistillKL: h_s {tuple(h_s.shape)} and h_t {tuple(h_t.shape)} must agree in "
                             "every dimension but the last")
        if labels is not None and labels.shape != h_s.shape[:-1]:
            raise ValueError(f"LinearDistillKL: labels has shape {tuple(labels.shape)} but h_s "
                             f"{tuple(h_s.shape)} needs {tuple(h_s.shape[:-1])}")
        return linear_kd_loss(h_s.reshape(-1, h_s.shape[-1]), w_s, h_t.reshape(-1, h_t.shape[-1]), w_t,
                              temperature=self.T, bias_s=b_s, bias_t=b_t, reduction=self.reduction,
                              ignore_index=self.ignore_index, labels=None if labels is None else labels.reshape(-1),
                              ce_weight=self.ce_weight, chunk=self.chunk, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"T={self.T}"]
        if self.reduction != "batchmean":
            parts.append(f"reduction={self.reduction!r}")
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.ce_weight:
            parts.append(f"ce_weight={self.ce_weight}")
        return ", ".join(parts)
