"""Helpers every op module uses to hand tensors to the native and Triton kernels and to the reference."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

# dtype codes of the native entry points (csrc/common/dtype.h)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (also the dtype of every loss)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream handle for ``t``'s device, as an int (0 on CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def _to_acc(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(acc_dtype(x.dtype))
    if isinstance(x, (list, tuple)):
        return [_to_acc(v) for v in x]
    return x


def run_reference(fn: Callable, args: Sequence, device: torch.device, cast_back: Optional[torch.dtype] = None):
    """The ``torch`` backend: ``fn(*args)`` on float tensors (also inside lists) cast to their
    accumulation dtype, with autocast off, so that it computes what the kernels compute
    (fp16/bf16 read, float32 arithmetic); the result cast to ``cast_back`` when given."""
    with torch.autocast(device.type, enabled=False):
        out = fn(*[_to_acc(a) for a in args])
    return out if cast_back is None else out.to(cast_back)
