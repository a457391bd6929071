"""Input validation shared by the public ops: clear errors, nothing broadcast."""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def as_tensor_list(x: Union[torch.Tensor, Sequence[torch.Tensor]], op: str, arg: str) -> List[torch.Tensor]:
    """A single tensor becomes a one-element list; a list/tuple is copied; else TypeError."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        for k, t in enumerate(x):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {arg}[{k}] must be a torch.Tensor, got {type(t).__name__}")
        return list(x)
    raise TypeError(f"{op}: {arg} must be a tensor or a list of tensors, got {type(x).__name__}")


def check_float_tensor(t: torch.Tensor, op: str, arg: str, ndim: int) -> None:
    """``t`` has ``ndim`` dims, a floating dtype and no zero-size dimension."""
    if t.dim() != ndim:
        raise ValueError(f"{op}: {arg} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be float32/float64/float16/bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {arg} is empty (shape {tuple(t.shape)}); zero-size inputs are not accepted")


def check_feature_pairs(fs: List[torch.Tensor], ft: List[torch.Tensor], op: str) -> None:
    """Student/teacher NCHW lists of equal length, pairwise equal shape, one dtype, one device."""
    if len(fs) == 0:
        raise ValueError(f"{op}: fstudent is an empty list")
    if len(fs) != len(ft):
        raise ValueError(f"{op}: fstudent has {len(fs)} levels but fteacher has {len(ft)}")
    dtype, device = fs[0].dtype, fs[0].device
    for k, (s, t) in enumerate(zip(fs, ft)):
        check_float_tensor(s, op, f"fstudent[{k}]", 4)
        check_float_tensor(t, op, f"fteacher[{k}]", 4)
        if s.shape != t.shape:
            raise ValueError(
                f"{op}: level {k}: fstudent[{k}] has shape {tuple(s.shape)} "
                f"but fteacher[{k}] has shape {tuple(t.shape)}"
            )
        for arg, x in ((f"fstudent[{k}]", s), (f"fteacher[{k}]", t)):
            if x.dtype != dtype:
                raise TypeError(
                    f"{op}: level {k}: {arg} has dtype {x.dtype} (shape {tuple(x.shape)}) "
                    f"but fstudent[0] has {dtype}"
                )
            if x.device != device:
                raise ValueError(
                    f"{op}: level {k}: {arg} is on {x.device} (shape {tuple(x.shape)}) "
                    f"but fstudent[0] is on {device}"
                )


def check_temperature(value: Any, op: str, arg: str = "temperature") -> float:
    """A temperature: a real number (not a bool), finite and > 0; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {arg} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{op}: {arg} must be finite and > 0, got {value}")
    return value


def check_choice(value: Any, op: str, arg: str, choices: Sequence[str]) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{op}: {arg} must be one of {tuple(choices)}, got {value!r}")
    return value
