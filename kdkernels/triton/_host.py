"""Host-side float32 arithmetic for the launchers, in pure Python.

Triton passes Python floats to kernels as float32 scalars; a launcher that
needs the exact float32 value of a ratio (as PyTorch computes it) or a
float32 head/tail split must round on the host. Doing that with
``torch.tensor(...).item()`` builds a CPU tensor and reads it back on every
call; these helpers round through ``struct`` instead (IEEE binary32,
round-to-nearest-even, as the C cast from double does).

Division is exact enough: for float32 operands a and b, fl32(fl64(a / b)) is
the correctly rounded float32 quotient, because binary64 carries more than
2*24 + 2 bits (double rounding is innocuous for +, -, *, / at that width).
"""
from __future__ import annotations

import math
import os
import struct

_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float; +-inf past the range."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # rounds to +-inf (struct refuses; a C cast and torch give inf)
        return math.copysign(math.inf, x)


def f32_ratio(num: int, den: int) -> float:
    """float32(num) / float32(den) rounded to float32: PyTorch's nearest-upsampling scale."""
    return f32(f32(float(num)) / f32(float(den)))


def f32_split(x: float):
    """(head, tail): head = float32(x), tail = x - head (rounded to float32 when a compiled
    kernel receives it), so head + tail carries ~48 bits of x."""
    head = f32(x)
    return head, x - head


def interpreted() -> bool:
    """True when Triton runs kernels through its interpreter (TRITON_INTERPRET=1): the
    launchers then pick what the interpreter can run, e.g. no bf16 operands of tl.dot."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
