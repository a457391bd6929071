"""``ReviewKD`` (the official student wrapper) and ``ReviewKDLoss`` (HCL with warm-up)."""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..ops.hcl import hcl_loss
from .abf import ABF, Size


#: the official ImageNet wrapper's fusion sizes, deepest first (ResNet / MobileNet at 224x224)
IMAGENET_SHAPES = [1, 7, 14, 28, 56]


class ReviewKD(nn.Module):
    """ReviewKD's student wrapper (docs/spec.md section 2), state_dict-compatible with the official one.

    Two calling forms, those of the official CIFAR and ImageNet code:

    * ``ReviewKD(student, in_channels, out_channels, shapes, out_shapes, mid_channel)`` (CIFAR);
    * ``ReviewKD(student, in_channels, out_channels, mid_channel)`` (ImageNet): the fourth
      positional argument is an int, the shapes are :data:`IMAGENET_SHAPES` and the ABF
      outputs are never resized (the ImageNet ABF has no ``out_shape``). Leaving ``shapes``
      out (``mid_channel=`` as a keyword) is the same form.

    Args:
        student: returns ``(features, logits)`` (called with ``is_feat=True`` when its
            forward accepts it, as the official students do); ``features`` are the
            stage outputs shallow -> deep, the last being the pooled feature
            ((N, C) or (N, C, 1, 1)). A student may return more features than
            there are levels - the official CIFAR students return the stem output
            first - and the shallowest extras are then ignored, as the official
            wrapper's ``zip`` ignores them (one warning per wrapper).
        in_channels / out_channels: student / teacher channels per level, shallow -> deep.
        shapes / out_shapes: spatial size per level, **deepest first** as in the official
            code (e.g. ``[1, 8, 16, 32]`` for CIFAR ResNets): ints, or (h, w) tuples.
            ``shapes[i]`` is the fusion size of the i-th ABF from the deep end,
            ``out_shapes[i]`` the size of its output; ``out_shapes`` defaults to ``shapes``.
            Entries beyond the number of levels (the official CIFAR configs pass
            ``[1, 8, 16, 32, 32]`` for four levels) are ignored with a warning.
        mid_channel: ABF width; default ``min(512, in_channels[-1])``.

    ``forward(x)`` returns ``(results, logits)``: one (N, out_channels[i], ...)
    map per level, shallow -> deep, to compare with the teacher's features.
    ABFs are built shallow-first and reversed, so ``abfs.0`` is the deepest (no
    att_conv).
    """

    def __init__(self, student: nn.Module, in_channels: Sequence[int], out_channels: Sequence[int],
                 shapes: Union[Sequence[Size], int, None] = None,
                 out_shapes: Optional[Sequence[Size]] = None, mid_channel: Optional[int] = None):
        super().__init__()
        if isinstance(shapes, numbers.Integral) and not isinstance(shapes, bool):
            # the ImageNet form: ReviewKD(student, in_channels, out_channels, mid_channel)
            if mid_channel is not None:
                raise TypeError(f"ReviewKD: got mid_channel twice ({shapes} as the fourth positional "
                                f"argument and mid_channel={mid_channel})")
            shapes, mid_channel = None, int(shapes)
        levels = len(in_channels)
        if levels == 0 or len(out_channels) != levels:
            raise ValueError(f"ReviewKD: in_channels ({levels}) and out_channels ({len(out_channels)}) "
                             f"must have one entry per level (at least one)")
        resize = True
        if shapes is None:  # the ImageNet wrapper: its own shapes, no out_shape
            if out_shapes is not None:
                raise ValueError("ReviewKD: out_shapes needs shapes (the ImageNet form has neither)")
            if levels > len(IMAGENET_SHAPES):
                raise ValueError(f"ReviewKD: {levels} levels need shapes; the ImageNet default "
                                 f"{IMAGENET_SHAPES} has {len(IMAGENET_SHAPES)}")
            shapes, resize = IMAGENET_SHAPES, False
        self.student = student
        self.shapes = self._levels(list(shapes), levels, "shapes", warn=resize)
        out = shapes if out_shapes is None else out_shapes
        #: per level, the size the ABF output is resized to (None: never resized)
        self.out_shapes = self._levels(list(out), levels, "out_shapes") if resize else [None] * levels
        mid = min(512, in_channels[-1]) if mid_channel is None else mid_channel
        abfs = nn.ModuleList(
            ABF(c_in, mid, out_channels[i], i < levels - 1) for i, c_in in enumerate(in_channels)
        )
        self.abfs = abfs[::-1]
        self._warned_extra = False
        # the official wrapper calls student(x, is_feat=True); pass it wherever the forward accepts it
        forward = getattr(student, "forward", None)
        try:
            params = inspect.signature(forward).parameters.values() if forward is not None else ()
            self._is_feat = any(q.name == "is_feat" or q.kind is inspect.Parameter.VAR_KEYWORD for q in params)
        except (TypeError, ValueError):
            self._is_feat = False

    @staticmethod
    def _levels(sizes: list, levels: int, name: str, warn: bool = True) -> list:
        """``sizes`` (deepest first) cut to ``levels`` entries: the official ``zip`` ignores the rest."""
        if len(sizes) < levels:
            raise ValueError(f"ReviewKD: {name} has {len(sizes)} entries, fewer than the {levels} levels "
                             f"(in_channels)")
        if len(sizes) > levels and warn:
            warnings.warn(f"ReviewKD: {name} has {len(sizes)} entries for {levels} levels; the shallowest "
                          f"{len(sizes) - levels} ({sizes[levels:]}) are ignored, as the official wrapper "
                          f"ignores them", UserWarning, stacklevel=3)
        return sizes[:levels]

    def forward(self, x: torch.Tensor):
        out = self.student(x, is_feat=True) if self._is_feat else self.student(x)
        features, logits = out[0], out[1]
        feats = [f if f.dim() == 4 else f.reshape(f.shape[0], f.shape[1], 1, 1) for f in features]
        levels = len(self.abfs)
        if len(feats) < levels:
            raise ValueError(f"ReviewKD: the student returned {len(feats)} features, fewer than the "
                             f"{levels} levels")
        if len(feats) > levels:
            if not self._warned_extra:
                self._warned_extra = True
                warnings.warn(f"ReviewKD: the student returned {len(feats)} features for {levels} levels; "
                              f"the shallowest {len(feats) - levels} (e.g. the stem output of the official "
                              f"CIFAR students) are ignored, as the official wrapper ignores them",
                              UserWarning, stacklevel=2)
            feats = feats[len(feats) - levels:]
        feats = feats[::-1]
        results: List[torch.Tensor] = []
        out_features, res_features = self.abfs[0](feats[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features_k, abf, shape, out_shape in zip(feats[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features_k, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results, logits


class ReviewKDLoss(nn.Module):
    """``weight * min(1, epoch / warmup_epochs) * hcl_loss(fstudent, fteacher)`` (docs/spec.md section 2).

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
