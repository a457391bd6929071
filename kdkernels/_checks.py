"""Every input check of kdkernels, in one place: clear errors, nothing broadcast.

The ops, the nn modules, the FSKD tools and the training API check their
arguments with these functions, so an error reads the same everywhere: a
TypeError or ValueError that starts with the function it came from (``op``,
when given), names the argument and gives its shape, dtype or device.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _at(op: Optional[str]) -> str:
    return f"{op}: " if op else ""


def shape_str(x) -> str:
    """``(8, 64, 14, 14)`` for a tensor (or a size) of that shape."""
    dims = x.shape if isinstance(x, torch.Tensor) else x
    return "(" + ", ".join(str(d) for d in dims) + ")"


def check_tensor(x: Any, op: Optional[str], arg: str, optional: bool = False) -> None:
    """``x`` is a torch.Tensor (or None when ``optional``)."""
    if optional and x is None:
        return
    if not isinstance(x, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{_at(op)}{arg} must be {what}, got {type(x).__name__}")


def check_float_dtype(x: Any, arg: str, op: Optional[str] = None) -> torch.Tensor:
    """``x`` is a tensor of a real floating dtype (fp16, bf16, fp32 or fp64), any shape."""
    check_tensor(x, op, arg)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_at(op)}{arg} must be float32/float64/float16/bfloat16, got {x.dtype} "
                        f"(shape {shape_str(x)})")
    return x


def check_same_dtype_device(ref_arg: str, ref: torch.Tensor, named: Sequence[Tuple[str, Optional[torch.Tensor]]],
                            op: Optional[str], where: str = "") -> None:
    """Every tensor of ``named`` ((arg, tensor or None) pairs) has ``ref``'s dtype and device."""
    for arg, t in named:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{_at(op)}{where}{arg} has dtype {t.dtype} (shape {shape_str(t)}) "
                            f"but {ref_arg} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{_at(op)}{where}{arg} is on {t.device} (shape {shape_str(t)}) "
                             f"but {ref_arg} is on {ref.device}")


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
    check_float_dtype(t, arg, op)
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
        # every condition below at once (this runs on each training step); a level that fails
        # goes through them one by one, which word the error
        if (s.dim() == 4 and s.shape == t.shape and s.dtype == dtype and t.dtype == dtype and dtype in FLOAT_DTYPES
                and s.device == device and t.device == device and s.numel() > 0):
            continue
        check_float_tensor(s, op, f"fstudent[{k}]", 4)
        check_float_tensor(t, op, f"fteacher[{k}]", 4)
        if s.shape != t.shape:
            raise ValueError(
                f"{op}: level {k}: fstudent[{k}] has shape {tuple(s.shape)} "
                f"but fteacher[{k}] has shape {tuple(t.shape)}"
            )
        check_same_dtype_device("fstudent[0]", fs[0], ((f"fstudent[{k}]", s), (f"fteacher[{k}]", t)), op,
                                where=f"level {k}: ")


def check_real(value: Any, arg: str, op: Optional[str] = None, *, bound: Optional[str] = None) -> float:
    """A real number (not a bool), finite, and ``> 0`` or ``>= 0`` when ``bound`` says so; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_at(op)}{arg} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = {None: True, "> 0": value > 0.0, ">= 0": value >= 0.0}[bound]
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{_at(op)}{arg} must be finite{' and ' + bound if bound else ''}, got {value}")
    return value


def check_temperature(value: Any, op: str, arg: str = "temperature") -> float:
    """A temperature: a real number (not a bool), finite and > 0; returned as a float."""
    return check_real(value, arg, op, bound="> 0")


def check_count(value: Any, arg: str, minimum: int = 1, op: Optional[str] = None) -> int:
    """An int (not a bool) ``>= minimum`` (a channel count, a number of steps)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_at(op)}{arg} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{_at(op)}{arg} must be >= {minimum}, got {value}")
    return value


def check_choice(value: Any, arg: str, choices: Sequence[str], op: Optional[str] = None) -> str:
    """``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{_at(op)}{arg} must be one of {opts}, got {value!r}")
    return value
