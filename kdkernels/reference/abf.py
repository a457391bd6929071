r"""ReviewKD's attention-based fusion step (docs/spec.md §2, step 2), in plain PyTorch.

With x (N, C, H, W), y (N, C, h, w), h <= H, w <= W, att_weight (2, 2C, 1, 1),
att_bias (2,)::

    u   = up(y)                                   nearest, legacy rule: src = floor(dst * (in/out)) in float32
    z   = sigmoid(conv1x1(cat[x, u]; att_weight) + att_bias)     (N, 2, H, W)
    out = x * z[:, 0] + u * z[:, 1]                               (N, C, H, W)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def float32_ratio(num: int, den: int) -> float:
    """num / den rounded to float32, as PyTorch's nearest upsampling computes its scale."""
    return float(torch.tensor(num, dtype=torch.float32) / torch.tensor(den, dtype=torch.float32))


def nearest_source_index(out_size: int, in_size: int) -> torch.Tensor:
    """Source index of each of ``out_size`` positions under legacy ``mode="nearest"`` (int64)."""
    scale = torch.tensor(float32_ratio(in_size, out_size), dtype=torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32)
    return torch.clamp(torch.floor(dst * scale).long(), max=in_size - 1)


def abf_fuse(x: torch.Tensor, y: torch.Tensor, att_weight: torch.Tensor, att_bias: torch.Tensor) -> torch.Tensor:
    """The ABF fusion exactly as the ReviewKD code runs it; returns (N, C, H, W)."""
    u = F.interpolate(y, size=tuple(x.shape[-2:]), mode="nearest")
    z = torch.sigmoid(F.conv2d(torch.cat([x, u], dim=1), att_weight, att_bias))
    return x * z[:, 0:1] + u * z[:, 1:2]
