r"""Hinton's knowledge-distillation loss (KD), docs/spec.md §4.

For logits (N, C) of the student (s) and the teacher (t) and a temperature T,
with p = softmax(logits / T) along the classes::

    KL_n   = sum_c p_t[n, c] * (log p_t[n, c] - log p_s[n, c])
    loss   = T^2 * reduce(KL)

``reduction``:

- ``"batchmean"`` (default): sum_n KL_n / N. This is RepDistiller's
  ``DistillKL`` (``kl_div(..., size_average=False) * T**2 / N``) and
  mdistiller's ``kd_loss`` (``kl_div(..., reduction="none").sum(1).mean() * T**2``).
- ``"sum"``: sum_n KL_n.
- ``"mean"``: sum_n KL_n / (N * C), the mean over elements of torch's ``kl_div``.
- ``"none"``: the per-row losses T^2 * KL_n, shape (N,) (torch's ``kl_div``
  would return (N, C) elements; here the rows are summed).

Gradients (grad_output g_n of row n)::

    d loss_n / d logits_s[n, c] = g_n * T * (p_s[n, c] - p_t[n, c])
    d loss_n / d logits_t[n, c] = g_n * T * p_t[n, c] * (log p_t[n, c] - log p_s[n, c] - KL_n)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 4.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * KL(p_t || p_s) of (N, C) logits, reduced as ``reduction`` says (see the module doc).

    Plain PyTorch, as the reference repositories write it: a 0-dim tensor, or
    (N,) for ``reduction="none"``, in the logits' dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    t2 = temperature * temperature
    if reduction == "none":
        return F.kl_div(log_p_s, p_t, reduction="none").sum(1) * t2
    if reduction == "mean":  # torch's kl_div "mean", written out (torch warns that it will change)
        return F.kl_div(log_p_s, p_t, reduction="sum") * t2 / logits_s.numel()
    return F.kl_div(log_p_s, p_t, reduction=reduction) * t2
