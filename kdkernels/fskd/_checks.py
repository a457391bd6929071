"""Argument checks shared by the FSKD modules: one place for the error messages."""
from __future__ import annotations

import math
from typing import Any

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(x) -> str:
    """``(8, 64, 14, 14)`` for a tensor (or a size) of that shape."""
    dims = x.shape if isinstance(x, torch.Tensor) else x
    return "(" + ", ".join(str(d) for d in dims) + ")"


def check_float_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` must be a real floating tensor (fp16, bf16, fp32 or fp64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype} "
            f"(shape {shape_str(x)})"
        )
    return x


def check_alpha(alpha: Any) -> float:
    """Ridge weight: a finite float >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float >= 0, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha}")
    return alpha


def check_channels(c: Any, name: str) -> int:
    """A channel count: an int >= 1."""
    if isinstance(c, bool) or not isinstance(c, int):
        raise TypeError(f"{name} must be an int, got {type(c).__name__}")
    if c < 1:
        raise ValueError(f"{name} must be >= 1, got {c}")
    return c


def check_choice(value: Any, name: str, choices: tuple) -> str:
    """``value`` must be one of the strings in ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {opts}, got {value!r}")
    return value
