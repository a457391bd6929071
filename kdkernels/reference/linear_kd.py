r"""Distillation of language-model logits through the two lm_heads (the oracle: it materialises them).

Shapes: hidden states h_s (N, D_s), h_t (N, D_t); lm_head weights w_s (V, D_s),
w_t (V, D_t); optional biases b_s, b_t (V,); optional labels (N,) (integers).
With z_s = h_s w_s^T + b_s and z_t = h_t w_t^T + b_t (N, V), temperature T and
p = softmax(z / T) along the vocabulary::

    KL_n = sum_v p_t[n, v] (log p_t[n, v] - log p_s[n, v])        (Hinton's KD, as kd_loss)
    CE_n = logsumexp_v z_s[n, v] - z_s[n, labels_n]                 (cross-entropy at T = 1)
    k_n  = 0 if labels_n == ignore_index else 1                     (1 for every row without labels)
    L_n  = k_n (T^2 KL_n + ce_weight CE_n)

``reduction``: ``"batchmean"`` sum_n L_n / K with K = sum_n k_n, the rows kept
(``kl_div(..., "batchmean")`` and ``cross_entropy(..., ignore_index=...)``
both divide by the rows that count; K = 0 gives NaN, as cross_entropy's mean
does), ``"sum"`` sum_n L_n, ``"none"`` the (N,) rows L_n (0 for ignored rows).

Gradients, with g_n = grad_output of row n's L_n, P1 = softmax(z_s) and e_y the one-hot of labels_n::

    dL/dz_s[n] = g_n k_n (T (p_s - p_t) + ce_weight (P1 - e_y))
    dL/dz_t[n] = g_n k_n T p_t (log p_t - log p_s - KL_n)
    dh_s = dz_s w_s,   dw_s = dz_s^T h_s,   db_s = sum_n dz_s[n]   (and the same for the teacher)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kd import kd_loss

REDUCTIONS = ("batchmean", "sum", "none")


def kept_rows(labels: Optional[torch.Tensor], ignore_index: Optional[int], n: int,
              device: torch.device) -> torch.Tensor:
    """k (N,) bool: False where labels == ignore_index (all True without labels or ignore_index)."""
    if labels is None or ignore_index is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels != ignore_index


def linear_kd_loss(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, *,
                   temperature: float, bias_s: Optional[torch.Tensor] = None,
                   bias_t: Optional[torch.Tensor] = None, reduction: str = "batchmean",
                   ignore_index: Optional[int] = None, labels: Optional[torch.Tensor] = None,
                   ce_weight: float = 0.0) -> torch.Tensor:
    """The loss of the module docstring in plain PyTorch, with both (N, V) logits materialised.

    Returns a 0-dim tensor, or (N,) for ``reduction="none"``, in the inputs' dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    z_s = F.linear(h_s, w_s, bias_s)
    z_t = F.linear(h_t, w_t, bias_t)
    keep = kept_rows(labels, ignore_index, h_s.shape[0], h_s.device)
    rows = kd_loss(z_s, z_t, temperature, "none")
    if ce_weight != 0.0:
        if labels is None:
            raise ValueError("linear_kd_loss: ce_weight != 0 needs labels")
        safe = torch.where(keep, labels, torch.zeros_like(labels))  # ignored rows: any valid class, masked below
        rows = rows + ce_weight * F.cross_entropy(z_s, safe, reduction="none")
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().to(total.dtype)
