"""Helpers every op module uses to hand tensors to the native and Triton kernels."""
from __future__ import annotations

import torch

# dtype codes of the native entry points (csrc/common/dtype.h)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream handle for ``t``'s device, as an int (0 on CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
