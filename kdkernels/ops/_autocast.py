"""What every public op does under ``torch.autocast``, declared in one place.

Losses (``hcl_loss``, ``hint_loss``, ``kd_loss``) follow autocast's float32
policy for losses (``mse_loss``, ``kl_div``, ``log_softmax`` run in float32
there): under autocast they return float32, so a drop-in gives the dtype the
reference gives. They do *not* copy fp16/bf16 features up to float32 first;
the kernels already read low precision and accumulate in float32. Inputs of
different float dtypes (a bf16 student next to an fp32 teacher) are promoted
to the widest, as autocast promotes them for the reference; the result, rounded
once to the inputs' dtype by the kernel, is then returned as float32.

``abf_fuse`` and the 1×1 regressor inside ``hint_loss`` follow the conv policy:
their floating inputs are cast to the autocast dtype (as ``nn.Conv2d`` does to
its input and weight), and ``abf_fuse`` returns that dtype.

Outside autocast nothing is cast: mixed dtypes are an error there, as everywhere
else in kdkernels.

The policy lives in the public functions (``kdkernels.hcl_loss`` and the rest,
and the modules built on them), which torch.compile traces like any Python; the
raw ``torch.ops.kdkernels.*`` ops register no autocast kernel, so called
directly they compute in whatever dtype they are given.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _floats(tensors: Sequence) -> List[Tensor]:
    return [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]


def promote(tensors: Sequence) -> list:
    """Cast the float tensors of ``tensors`` to their widest dtype; anything else passes through."""
    floats = _floats(tensors)
    if not floats:
        return list(tensors)
    widest = floats[0].dtype
    for t in floats[1:]:
        widest = torch.promote_types(widest, t.dtype)
    return [t.to(widest) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


def cast(tensors: Sequence, dtype: torch.dtype) -> list:
    """Cast the float tensors of ``tensors`` (not float64, as autocast) to ``dtype``."""
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t for t in tensors]


def float32_result(out: Tensor) -> Tensor:
    """A loss computed in fp16/bf16, returned as float32 (float64 stays float64)."""
    return out.float() if out.dtype in _LOW_PRECISION else out
