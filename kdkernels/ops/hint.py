r"""``kdkernels.hint_loss``: FitNets' hint loss through a fused 1x1 regressor (docs/spec.md §3).

With r = conv1x1(fs; W, b) - ft (never materialised) and numel = N*Ct*H*W::

    loss = sum r^2 / numel

Since the loss is a scalar, the gradients are computed in the *same pass* as the
loss when any input requires grad (one read of fs and ft, three GEMMs in all):
the private op ``torch.ops.kdkernels.hint_loss_fused`` returns the loss and the
unscaled gradients

    W^T r  (like fs),   sum r fs^T  (like W, fp32/fp64),
    sum r  (Ct, fp32/fp64),   r  (like ft)

(each only when the matching input requires grad; an empty tensor otherwise),
and its backward multiplies them by 2 * grad_output / numel, in the
accumulation dtype, into fresh tensors (kdkernels/ops/_dispatch.py
``scale_grad``, the same backward as linear_kd_loss's; never in place, since a
retained graph reads them again). Nothing of the regressed map's size is saved
for backward (the residual r only when the *teacher* requires grad, as its
gradient).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float_tensor, check_same_dtype_device, check_tensor
from ..reference import hint as reference
from ._common import acc_dtype
from . import _native_args
from ._dispatch import PublicOp, eager_triton_backward, grad_enabled_for, scale_grad

OP = "hint_loss"
backends.register_op(OP, ("triton", "cpp", "torch"))


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _outputs_like(fs: Tensor, ft: Tensor, weight: Tensor, bias: Optional[Tensor], needs: Sequence[bool]):
    """Empty outputs (loss, gfs, gw, gb, gft) with the shapes and dtypes the op returns."""
    acc = acc_dtype(fs.dtype)
    need_fs, need_w, need_b, need_ft = needs
    loss = fs.new_empty((), dtype=acc)
    gfs = torch.empty_like(fs, memory_format=torch.contiguous_format) if need_fs else _empty(fs, fs.dtype)
    gw = fs.new_empty(weight.shape, dtype=acc) if need_w else _empty(fs, acc)
    gb = fs.new_empty((ft.shape[1],), dtype=acc) if (need_b and bias is not None) else _empty(fs, acc)
    gft = torch.empty_like(ft, memory_format=torch.contiguous_format) if need_ft else _empty(ft, ft.dtype)
    return loss, gfs, gw, gb, gft


@torch.library.custom_op("kdkernels::hint_loss_fused", mutates_args=())
def hint_loss_fused_op(fs: Tensor, ft: Tensor, weight: Tensor, bias: Optional[Tensor], needs: Sequence[bool],
                       backend: str, allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss and unscaled gradients in one pass; ``needs`` = [fs, weight, bias, ft] flags.

    Returns (loss 0-dim in the accumulation dtype, W^T r like fs, sum r fs^T like weight in
    the accumulation dtype, sum r (Ct,) in the accumulation dtype, r like ft); a gradient
    that is not needed is an empty (0,) tensor.
    """
    if len(needs) != 4:
        raise ValueError(f"hint_loss_fused: needs must hold 4 flags (fs, weight, bias, ft), got {list(needs)}")
    fs, ft, w = fs.contiguous(), ft.contiguous(), weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    loss, gfs, gw, gb, gft = _outputs_like(fs, ft, weight, bias, needs)
    need_fs, need_w, need_b, need_ft = needs
    need_b = bool(need_b and b is not None)
    n, cs, h, wd = fs.shape
    ct = ft.shape[1]
    acc = acc_dtype(fs.dtype)
    if backend == "triton":
        from ..triton import hint as tri

        # two launches: the fused pass and the reduction that writes loss, gw and gb in place
        tri.hint_fused(fs, ft, w, b, loss, gfs if need_fs else None, gw if need_w else None,
                       gb if need_b else None, gft if need_ft else None, allow_tf32)
    elif backend == "cpp":
        loss_sum = torch.empty(1, dtype=acc)
        _native_args.call("hint_fwd_cpu", fs.dtype, fs=fs, ft=ft, w=w, b=b, loss=loss_sum,
                          gfs=gfs if need_fs else None, gw=gw if need_w else None, gb=gb if need_b else None,
                          gft=gft if need_ft else None, N=n, Cs=cs, Ct=ct, P=h * wd)
        loss.copy_(loss_sum.reshape(()) * (1.0 / (n * ct * h * wd)))
    else:
        raise ValueError(f"hint_loss_fused: backend {backend!r} has no fused kernel (use 'triton' or 'cpp')")
    return loss, gfs, gw, gb, gft


@hint_loss_fused_op.register_fake
def _(fs, ft, weight, bias, needs, backend, allow_tf32):
    return _outputs_like(fs, ft, weight, bias, needs)


def _setup_context(ctx, inputs, output):
    fs, ft, weight, bias, needs, backend, allow_tf32 = inputs
    _, gfs, gw, gb, gft = output
    ctx.mark_non_differentiable(gfs, gw, gb, gft)
    ctx.set_materialize_grads(False)  # no zero-filled fs-sized "gradients" for those outputs
    ctx.needs = list(needs)
    ctx.has_bias = bias is not None
    ctx.numel = ft.numel()
    ctx.backend = backend
    ctx.dtypes = (fs.dtype, ft.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(gfs, gw, gb, gft)


def _backward(ctx, grad, *_unused):
    gfs, gw, gb, gft = ctx.saved_tensors
    if grad is None:  # the loss was not used: nothing flows back
        return (None,) * 7
    need_fs, need_w, need_b, need_ft = ctx.needs
    want_fs, want_ft, want_w, want_b = ctx.needs_input_grad[:4]
    missing = [name for name, want, have in (("fs", want_fs, need_fs), ("ft", want_ft, need_ft),
                                             ("weight", want_w, need_w), ("bias", want_b, need_b)) if want and not have]
    if missing:
        raise RuntimeError(f"hint_loss_fused: gradients for {missing} were not computed in the forward "
                           "(call kdkernels.hint_loss, which sets `needs` from requires_grad)")
    fs_dtype, ft_dtype, w_dtype, b_dtype = ctx.dtypes
    if eager_triton_backward(ctx.backend, grad, gfs if want_fs else None):
        # all four gradients scaled in one launch, out of place
        from ..triton import hint as tri

        grad_fs, grad_w, grad_b, grad_ft = tri.scale_grads(
            grad, ctx.numel, [gfs if want_fs else None, gw if want_w else None,
                              gb if (want_b and ctx.has_bias) else None, gft if want_ft else None],
            [fs_dtype, w_dtype, b_dtype, ft_dtype], False)
        return grad_fs, grad_ft, grad_w, grad_b, None, None, None
    s = grad.to(acc_dtype(fs_dtype)) * (2.0 / ctx.numel)
    grad_fs = scale_grad(gfs, s, fs_dtype) if want_fs else None
    grad_ft = scale_grad(gft, -s, ft_dtype) if want_ft else None
    grad_w = scale_grad(gw, s, w_dtype) if want_w else None
    grad_b = scale_grad(gb, s, b_dtype) if (want_b and ctx.has_bias) else None
    return grad_fs, grad_ft, grad_w, grad_b, None, None, None


hint_loss_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _check(fs, ft, weight, bias, allow_tf32) -> None:
    for arg, t in (("fs", fs), ("ft", ft), ("weight", weight)):
        check_tensor(t, OP, arg)
    check_tensor(bias, OP, "bias", optional=True)
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise TypeError(f"{OP}: allow_tf32 must be a bool or None, got {type(allow_tf32).__name__}")
    check_float_tensor(fs, OP, "fs", 4)
    check_float_tensor(ft, OP, "ft", 4)
    if weight.dim() not in (2, 4):
        raise ValueError(f"{OP}: weight must be (Ct, Cs, 1, 1) or (Ct, Cs), got shape {tuple(weight.shape)}")
    check_float_tensor(weight, OP, "weight", weight.dim())
    fs_shape, ft_shape = tuple(fs.shape), tuple(ft.shape)
    if fs_shape[0] != ft_shape[0] or fs_shape[2:] != ft_shape[2:]:
        raise ValueError(f"{OP}: fs has shape {fs_shape} and ft has shape {ft_shape}: they must agree in "
                         "batch and spatial size (N, ., H, W)")
    cs, ct = fs_shape[1], ft_shape[1]
    # element-wise, not `tuple in (tuples)`: dynamo mis-traces that membership test
    w_shape = tuple(weight.shape)
    if w_shape[0] != ct or w_shape[1] != cs or any(d != 1 for d in w_shape[2:]):
        raise ValueError(f"{OP}: weight has shape {tuple(weight.shape)} but fs {fs_shape} and ft {ft_shape} "
                         f"need ({ct}, {cs}, 1, 1) (Ct, Cs, 1, 1)")
    if bias is not None:
        check_float_tensor(bias, OP, "bias", 1)
        if tuple(bias.shape) != (ct,):
            raise ValueError(f"{OP}: bias has shape {tuple(bias.shape)} but ft {ft_shape} needs ({ct},)")
    check_same_dtype_device("fs", fs, [("ft", ft), ("weight", weight), ("bias", bias)], OP)


@torch.compiler.assume_constant_result  # torch.compile reads the flag once, when it traces
def torch_allows_tf32() -> bool:
    """Whether eager ``conv2d`` on fp32 CUDA tensors may use TF32: cuDNN's conv precision
    (``torch.backends.cudnn.conv.fp32_precision``, "none" inheriting from cuDNN, then the
    global setting; ``torch.backends.cudnn.allow_tf32`` before torch 2.9)."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):
        return bool(cudnn.allow_tf32)
    for prec in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if prec != "none":
            return prec == "tf32"
    return False


def _checked(fs, ft, weight, bias, allow_tf32) -> tuple:
    _check(fs, ft, weight, bias, allow_tf32)
    return fs, ft, weight, bias, torch_allows_tf32() if allow_tf32 is None else allow_tf32


def _kernel(backend: str, fs: Tensor, ft: Tensor, weight: Tensor, bias: Optional[Tensor], allow_tf32: bool) -> Tensor:
    needs = grad_enabled_for(fs, weight, bias, ft)
    return torch.ops.kdkernels.hint_loss_fused(fs, ft, weight, bias, needs, backend, allow_tf32)[0]


_PUBLIC = PublicOp(OP, check=_checked, kernel=_kernel, autocast="cast",
                   reference=lambda fs, ft, weight, bias, allow_tf32: reference.hint_loss(fs, ft, weight, bias))


def hint_loss(fs: Tensor, ft: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
              allow_tf32: Optional[bool] = None, backend: Optional[str] = None) -> Tensor:
    """FitNets hint loss through a 1x1 regressor, fused: ``mean((conv1x1(fs; weight, bias) - ft)^2)``.

    The regressed map (N, Ct, H, W) is never written to memory, forward or
    backward. When an input requires grad, the gradients are computed in the
    same pass as the loss and the backward only scales them by grad_output.

    Args:
        fs: student features (N, Cs, H, W).
        ft: teacher features (N, Ct, H, W) (no gradient unless it requires one).
        weight: the regressor's weight, (Ct, Cs, 1, 1) as in ``nn.Conv2d(Cs, Ct, 1)``, or (Ct, Cs).
        bias: (Ct,) or None.
        allow_tf32: whether the Triton backend may multiply float32 inputs on TF32
            tensor cores (faster, ~1e-3 relative error) instead of in full fp32
            (``input_precision="ieee"``). ``None`` (default) follows PyTorch's flag
            for the eager 1x1 conv this replaces (:func:`torch_allows_tf32`:
            cuDNN's conv precision, TF32 unless switched off), so the drop-in
            computes what the eager code computes; True/False override it. The
            C++ kernels always use fp32; the ``torch`` backend is the eager conv.
        backend: ``None`` (use $KDKERNELS_BACKEND, default ``"auto"``), or one of
            ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``.

    Returns:
        0-dim tensor in the accumulation dtype (float32; float64 for float64
        inputs), inside autocast and outside (under autocast the regressor's
        inputs are cast to the autocast dtype, as a conv's would be; see
        ``kdkernels/ops/_autocast.py``). All inputs share one dtype and device.

    Gradients: with r the residual and s = 2 * grad_output / (N*Ct*H*W):
    ``d/d fs = s W^T r``, ``d/d W = s sum r fs^T``, ``d/d b = s sum r``, ``d/d ft = -s r``.
    Double backward is not supported.
    """
    return _PUBLIC(fs, ft, weight, bias, allow_tf32, backend=backend)
