"""``ReviewKD`` (the official student wrapper) and ``ReviewKDLoss`` (HCL with warm-up)."""
from __future__ import annotations

import inspect
import math
import numbers
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..ops.hcl import hcl_loss
from .abf import ABF, Size


class ReviewKD(nn.Module):
    """ReviewKD's student wrapper (SPEC section 2), state_dict-compatible with the official one.

    Args:
        student: returns ``(features, logits)`` (called with ``is_feat=True`` when its
            forward accepts it, as the official students do); ``features`` are the
            stage outputs shallow -> deep, the last being the pooled feature
            ((N, C) or (N, C, 1, 1)).
        in_channels / out_channels: student / teacher channels per level, shallow -> deep.
        shapes / out_shapes: spatial size per level, **deepest first** as in the official
            code (e.g. ``[1, 8, 16, 32]`` for CIFAR ResNets): ints, or (h, w) tuples.
            ``shapes[i]`` is the fusion size of the i-th ABF from the deep end,
            ``out_shapes[i]`` the size of its output; ``out_shapes`` defaults to ``shapes``.
        mid_channel: ABF width; default ``min(512, in_channels[-1])``.

    ``forward(x)`` returns ``(results, logits)``: one (N, out_channels[i], ...)
    map per level, shallow -> deep, to compare with the teacher's features.
    ABFs are built shallow-first and reversed, so ``abfs.0`` is the deepest (no
    att_conv).
    """

    def __init__(self, student: nn.Module, in_channels: Sequence[int], out_channels: Sequence[int],
                 shapes: Sequence[Size], out_shapes: Optional[Sequence[Size]] = None,
                 mid_channel: Optional[int] = None):
        super().__init__()
        if not (len(in_channels) == len(out_channels) == len(shapes)):
            raise ValueError(f"ReviewKD: in_channels ({len(in_channels)}), out_channels ({len(out_channels)}) "
                             f"and shapes ({len(shapes)}) must have one entry per level")
        self.student = student
        self.shapes = list(shapes)
        self.out_shapes = list(shapes if out_shapes is None else out_shapes)
        if len(self.out_shapes) != len(self.shapes):
            raise ValueError(f"ReviewKD: out_shapes has {len(self.out_shapes)} entries, shapes {len(self.shapes)}")
        mid = min(512, in_channels[-1]) if mid_channel is None else mid_channel
        abfs = nn.ModuleList(
            ABF(c_in, mid, out_channels[i], i < len(in_channels) - 1) for i, c_in in enumerate(in_channels)
        )
        self.abfs = abfs[::-1]
        # the official wrapper calls student(x, is_feat=True); pass it wherever the forward accepts it
        forward = getattr(student, "forward", None)
        try:
            params = inspect.signature(forward).parameters.values() if forward is not None else ()
            self._is_feat = any(q.name == "is_feat" or q.kind is inspect.Parameter.VAR_KEYWORD for q in params)
        except (TypeError, ValueError):
            self._is_feat = False

    def forward(self, x: torch.Tensor):
        out = self.student(x, is_feat=True) if self._is_feat else self.student(x)
        features, logits = out[0], out[1]
        feats = [f if f.dim() == 4 else f.reshape(f.shape[0], f.shape[1], 1, 1) for f in features]
        if len(feats) != len(self.abfs):
            raise ValueError(f"ReviewKD: the student returned {len(feats)} features, expected {len(self.abfs)}")
        feats = feats[::-1]
        results: List[torch.Tensor] = []
        out_features, res_features = self.abfs[0](feats[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features_k, abf, shape, out_shape in zip(feats[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features_k, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results, logits


class ReviewKDLoss(nn.Module):
    """``weight * min(1, epoch / warmup_epochs) * hcl_loss(fstudent, fteacher)`` (SPEC section 2).

    ``forward(fstudent, fteacher, epoch)``: lists of (N, C, H, W), pairwise equal;
    ``epoch`` counts as the caller's loop does (the reference passes the 1-based epoch).
    """

    def __init__(self, weight: float = 1.0, warmup_epochs: float = 20, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("weight", weight), ("warmup_epochs", warmup_epochs)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"ReviewKDLoss: {name} must be a real number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ReviewKDLoss: {name} must be finite and >= 0, got {value}")
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        self.backend = backend

    def factor(self, epoch: float) -> float:
        """The loss weight at ``epoch``."""
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, epoch / self.warmup_epochs)
        return self.weight * ramp

    def forward(self, fstudent, fteacher, epoch: float) -> torch.Tensor:
        return self.factor(epoch) * hcl_loss(fstudent, fteacher, backend=self.backend)
