r"""``torch.ops.kdkernels.abf_fuse``: ReviewKD's attention-based fusion step, fused (docs/spec.md §2).

x (N, C, H, W), y (N, C, h, w) with h <= H, w <= W, att_weight (2, 2C, 1, 1),
att_bias (2,)::

    u = up(y) (legacy nearest),  z = sigmoid(conv1x1(cat[x, u]) + b),  out = x z_0 + u z_1

Neither u, the concatenation nor the logits are materialised; the forward
saves its inputs and the two attention maps z (N, 2, H, W) in the
accumulation dtype (float32; float64 for float64 inputs). The backward (math
in kdkernels/triton/abf.py) writes grad_x and grad_y directly and reduces
grad_w, grad_b from per-program (Triton) or per-work-unit (C++) partial sums
in a fixed order: deterministic, no atomics.

Backends: ``triton`` (CUDA default; CPU tensors under TRITON_INTERPRET=1),
``cpp`` (CPU default, csrc/cpu/abf.cpp) and ``torch`` (the reference).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float_tensor, check_same_dtype_device, check_tensor
from ..reference import abf as reference
from ..reference.abf import float32_ratio
from ._common import acc_dtype
from . import _native_args
from ._dispatch import PublicOp

OP = "abf_fuse"
backends.register_op(OP, ("triton", "cpp", "torch"))


@torch.library.custom_op("kdkernels::abf_fuse", mutates_args=())
def abf_fuse_op(x: Tensor, y: Tensor, att_weight: Tensor, att_bias: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (N, C, H, W), z (N, 2, H, W) in the accumulation dtype; z is saved for the
    backward and not differentiable)."""
    x, y = x.contiguous(), y.contiguous()
    wt, b = att_weight.contiguous().reshape(-1), att_bias.contiguous()
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    out = torch.empty_like(x)
    z = torch.empty(N, 2, H, W, dtype=acc_dtype(x.dtype), device=x.device)
    if backend == "triton":
        from ..triton import abf as tri

        tri.abf_fwd(x, y, wt, b, out, z)
    else:
        _native_args.call("abf_fwd_cpu", x.dtype, x=x, y=y, weight=wt, bias=b, out=out, z=z, N=N, C=C, H=H, W=W, h=h, w=w,
                          scale_h=float32_ratio(h, H), scale_w=float32_ratio(w, W))
    return out, z


@abf_fuse_op.register_fake
def _(x, y, att_weight, att_bias, backend):
    N, C, H, W = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((N, 2, H, W), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("kdkernels::abf_fuse_backward", mutates_args=())
def abf_fuse_backward_op(grad: Tensor, x: Tensor, y: Tensor, att_weight: Tensor, z: Tensor,
                         backend: str) -> List[Tensor]:
    """[grad_x, grad_y, grad_att_weight (2, 2C, 1, 1), grad_att_bias (2,)] for grad = d loss / d out."""
    grad, x, y = grad.contiguous(), x.contiguous(), y.contiguous()
    wt = att_weight.contiguous().reshape(-1)
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    gx, gy = torch.empty_like(x), torch.empty_like(y)
    if backend == "triton":
        from ..triton import abf as tri

        gw, gb = tri.abf_bwd(grad, x, y, wt, z, gx, gy)
    else:
        acc = acc_dtype(x.dtype)
        gw = torch.empty(4 * C, dtype=acc, device=x.device)
        gb = torch.empty(2, dtype=acc, device=x.device)
        _native_args.call("abf_bwd_cpu", x.dtype, g=grad, x=x, y=y, weight=wt, z=z, gx=gx, gy=gy, gw=gw, gb=gb, N=N, C=C,
                          H=H, W=W, h=h, w=w, scale_h=float32_ratio(h, H), scale_w=float32_ratio(w, W))
    return [gx, gy, gw.to(att_weight.dtype).reshape(att_weight.shape), gb.to(att_weight.dtype)]


@abf_fuse_backward_op.register_fake
def _(grad, x, y, att_weight, z, backend):
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(att_weight, memory_format=torch.contiguous_format),
            att_weight.new_empty((2,))]


def _setup_context(ctx, inputs, output):
    x, y, att_weight, att_bias, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, y, att_weight, output[1])
    # z is saved for the backward, not a differentiable result; and autograd must not
    # zero-fill (N, 2, H, W) for its gradient (one launch per backward)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_z):
    if grad_out is None:  # unmaterialised: the output was not used
        return None, None, None, None, None
    x, y, att_weight, z = ctx.saved_tensors
    gx, gy, gw, gb = torch.ops.kdkernels.abf_fuse_backward(grad_out, x, y, att_weight, z, ctx.backend)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gy if need[1] else None, gw if need[2] else None,
            gb if need[3] else None, None)


abf_fuse_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, y, att_weight, att_bias) -> tuple:
    for name, t in (("x", x), ("y", y), ("att_weight", att_weight), ("att_bias", att_bias)):
        check_tensor(t, OP, name)
    check_float_tensor(x, OP, "x", 4)
    check_float_tensor(y, OP, "y", 4)
    N, C, H, W = x.shape
    if y.shape[0] != N or y.shape[1] != C:
        raise ValueError(f"{OP}: y {tuple(y.shape)} must have the batch and channels of x {tuple(x.shape)}")
    if y.shape[2] > H or y.shape[3] > W:
        raise ValueError(f"{OP}: y {tuple(y.shape)} is larger than x {tuple(x.shape)}; up(y) only upsamples")
    if tuple(att_weight.shape) != (2, 2 * C, 1, 1):
        raise ValueError(f"{OP}: att_weight must have shape (2, {2 * C}, 1, 1) for x {tuple(x.shape)}, "
                         f"got {tuple(att_weight.shape)}")
    if tuple(att_bias.shape) != (2,):
        raise ValueError(f"{OP}: att_bias must have shape (2,), got {tuple(att_bias.shape)}")
    check_same_dtype_device("x", x, [("y", y), ("att_weight", att_weight), ("att_bias", att_bias)], OP)
    return x, y, att_weight, att_bias


_PUBLIC = PublicOp(OP, check=_check, reference=reference.abf_fuse, autocast="cast", cast_back=True,
                   kernel=lambda backend, x, y, w, b: torch.ops.kdkernels.abf_fuse(x, y, w, b, backend)[0])


def abf_fuse(x: Tensor, y: Tensor, att_weight: Tensor, att_bias: Tensor, backend: Optional[str] = None) -> Tensor:
    """ABF fusion: ``x * z0 + up(y) * z1`` with ``z = sigmoid(conv1x1(cat[x, up(y)]) + b)``.

    Args:
        x: (N, C, H, W) features of this level (after ABF's conv1).
        y: (N, C, h, w) residual of the deeper level, h <= H, w <= W; upsampled
            with the legacy ``mode="nearest"`` rule, never materialised.
        att_weight: (2, 2C, 1, 1) weight of ABF's ``att_conv[0]``.
        att_bias: (2,) its bias.
        backend: None (environment / auto), "auto", "triton", "cpp" or "torch".

    Returns:
        (N, C, H, W) tensor in x's dtype (under autocast: every input is cast to
        the autocast dtype first, as a conv does; see ``kdkernels/ops/_autocast.py``); gradients flow to all four inputs.
    """
    return _PUBLIC(x, y, att_weight, att_bias, backend=backend)
