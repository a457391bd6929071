"""``HCLLoss``: the hierarchical context loss as a module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.hcl import hcl_loss


class HCLLoss(nn.Module):
    """ReviewKD's ``hcl`` as a module: ``HCLLoss()(fstudent, fteacher)`` -> 0-dim loss.

    Args:
        backend: passed to :func:`kdkernels.hcl_loss` (``None`` = environment/auto).

    Shapes: lists of (N, C, H, W) tensors, pairwise equal (see :func:`kdkernels.hcl_loss`).
    """

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, fstudent, fteacher) -> torch.Tensor:
        return hcl_loss(fstudent, fteacher, backend=self.backend)
