"""``ABF``: ReviewKD's attention-based fusion module, a drop-in with the fused fusion step."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._autocast import autocast_dtype
from ..ops.abf import abf_fuse

Size = Union[int, Tuple[int, int]]


def _pair(size: Size, name: str) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"ABF: {name} must be an int or an (h, w) tuple, got {size!r}")


class ABF(nn.Module):
    """ReviewKD's ABF with the reference's layers, state_dict keys and initialisation.

    Layers: ``conv1`` = 1x1 conv (in -> mid, no bias) + BN; ``conv2`` = 3x3 conv
    (mid -> out, no bias) + BN; ``att_conv`` = 1x1 conv (2 mid -> 2) + sigmoid
    when ``fuse`` (else None). Parameters are created in the reference's order
    and conv1/conv2 weights re-initialised with ``kaiming_uniform_(a=1)``, so the
    same seed gives the same parameters as the reference.

    ``forward(x, y=None, shape=None, out_shape=None)`` with x (N, in, H, W) and,
    when fusing, the deeper residual y (N, mid, h, w) returns
    ``(conv2(x'), x')`` where x' (N, mid, ...) is ``conv1(x)`` fused with
    ``up(y)`` by :func:`kdkernels.abf_fuse` (att_conv's weights; the sigmoid is
    inside the fused op) and nearest-upsampled to ``out_shape``. ``shape`` and
    ``out_shape`` may be ints (the reference's square maps) or (h, w) tuples.

    Dtypes: outside autocast, ``y`` must have the dtype of ``conv1(x)`` (the
    module's), else TypeError - the reference's ``cat`` + conv raises too; under
    autocast the conv rule applies (inputs cast to the autocast dtype, float64
    never cast, so a float64 ``y`` is an error there as well).
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, shape: Optional[Size] = None,
                out_shape: Optional[Size] = None, backend: Optional[str] = None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ABF: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"ABF: x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if y is not None and not isinstance(y, torch.Tensor):
            raise TypeError(f"ABF: y must be a torch.Tensor or None, got {type(y).__name__}")
        x = self.conv1(x)
        if self.att_conv is not None:
            if y is None or shape is None:
                raise ValueError("ABF: a fusing ABF needs the deeper residual y and the fusion shape")
            size = _pair(shape, "shape")
            if tuple(x.shape[-2:]) != size:
                raise ValueError(f"ABF: shape {size} must equal the size of conv1(x) {tuple(x.shape[-2:])}")
            conv = self.att_conv[0]
            if autocast_dtype(x.device) is None:
                # as the reference's cat + conv would: no silent cast of the residual
                for name, t in (("y", y), ("att_conv.0.weight", conv.weight), ("att_conv.0.bias", conv.bias)):
                    if t.dtype != x.dtype:
                        raise TypeError(f"ABF: {name} has dtype {t.dtype} but conv1(x) has {x.dtype} "
                                        f"(x {tuple(x.shape)}, y {tuple(y.shape)}); outside autocast every "
                                        f"input must have the module's dtype, as for nn.Conv2d")
            # under autocast abf_fuse casts its inputs as a conv does (float64 is never cast)
            x = abf_fuse(x, y, conv.weight, conv.bias, backend=backend)
        if out_shape is not None:
            out_size = _pair(out_shape, "out_shape")
            # an int is the reference's test (the last dim only); a tuple compares both dims
            resize = x.shape[-1] != out_shape if isinstance(out_shape, int) else tuple(x.shape[-2:]) != out_size
            if resize:
                x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x
