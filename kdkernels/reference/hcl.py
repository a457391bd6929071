r"""ReviewKD's hierarchical context loss (HCL), docs/spec.md §1.

Per level k, with d = fs - ft of shape (N, C, H, W)::

    L_k = ( mean(d^2) + sum_j w_j * mean(P_{l_j}(d)^2) ) / (1 + sum_j w_j)

where the pool sizes l_j are taken from (4, 2, 1) in that order keeping those
with l < H (height only), w_j = 2^-(j+1), and P_l is
``adaptive_avg_pool2d(., (l, l))`` whose bins may overlap (bin i along an axis
of length A covers [floor(i*A/l), ceil((i+1)*A/l))). The loss is sum_k L_k.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

POOL_SIZES = (4, 2, 1)


def hcl_level_plan(height: int) -> Tuple[Tuple[int, ...], Tuple[float, ...], float]:
    """Pool sizes, their weights and the normaliser for a level of height ``height``.

    Returns ``(pools, weights, tot)``: e.g. ``((4, 2, 1), (0.5, 0.25, 0.125), 1.875)``
    for H >= 5 and ``((), (), 1.0)`` for H = 1.
    """
    pools = tuple(l for l in POOL_SIZES if l < height)
    weights = tuple(2.0 ** -(j + 1) for j in range(len(pools)))
    return pools, weights, 1.0 + sum(weights)


def hcl_level(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Loss of one level: fs, ft (N, C, H, W) -> scalar, exactly the ReviewKD code."""
    pools, weights, tot = hcl_level_plan(fs.shape[2])
    loss = F.mse_loss(fs, ft, reduction="mean")
    for l, w in zip(pools, weights):
        loss = loss + w * F.mse_loss(
            F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l)), reduction="mean"
        )
    return loss / tot


def hcl_loss(fstudent: Sequence[torch.Tensor], fteacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of :func:`hcl_level`; lists of (N, C, H, W) tensors -> scalar."""
    total = None
    for fs, ft in zip(fstudent, fteacher):
        level = hcl_level(fs, ft)
        total = level if total is None else total + level
    return total


def adaptive_bins(length: int, l: int) -> List[Tuple[int, int]]:
    """The [start, end) ranges of adaptive_avg_pool's l bins along an axis of ``length``."""
    return [((i * length) // l, -((-(i + 1) * length) // l)) for i in range(l)]
