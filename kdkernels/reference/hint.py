r"""FitNets hint loss through a 1x1 regressor (docs/spec.md §3).

With fs (N, Cs, H, W), ft (N, Ct, H, W), weight (Ct, Cs, 1, 1) and bias (Ct,)
or None, the regressed map is y = conv1x1(fs; weight, bias), i.e. per sample n
and pixel p, y[n, :, p] = W fs[n, :, p] + b, and

    loss = mean((y - ft)^2) = sum r^2 / (N*Ct*H*W),       r = y - ft

Its gradients (what the fused kernels compute) are, with s = 2 / (N*Ct*H*W),

    d loss / d fs[n]   = s * W^T r[n]                       (Cs, H*W)
    d loss / d W       = s * sum_n r[n] fs[n]^T            (Ct, Cs)
    d loss / d b       = s * sum over n, p of r[n, :, p]    (Ct,)
    d loss / d ft      = -s * r

This module materialises y: it is the oracle and the CPU fallback, not the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def regress(fs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv1x1(fs; weight, bias): (N, Cs, H, W) -> (N, Ct, H, W); weight (Ct, Cs, 1, 1) or (Ct, Cs)."""
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    return F.conv2d(fs, weight, bias)


def hint_loss(fs: torch.Tensor, ft: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean((conv1x1(fs; weight, bias) - ft)^2): a 0-dim tensor in the inputs' dtype."""
    return F.mse_loss(regress(fs, weight, bias), ft, reduction="mean")
