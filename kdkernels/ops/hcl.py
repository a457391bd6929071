r"""``torch.ops.kdkernels.hcl_loss``: the fused hierarchical context loss (docs/spec.md §1).

Every backend computes, per level, with c0 = 1/(tot*N*C*H*W) and the ratios
r_l = w_l*H*W/l^2 of :func:`level_plan` (exact in any float format)::

    loss_level = c0 * sum over planes of ( sum(d^2) + sum_l r_l * sum_bins (S_l/area_l)^2 )
    d loss / d fs = grad_output * c0 * 2 * ( d + sum_l r_l * scatter_l(S_l / area_l^2) )

The C++ kernels take every level in one call each way (``hcl_loss_cpu`` /
``hcl_loss_backward_cpu``): the forward sums the planes' partials and applies
each level's c0 in float64 inside the call (in an order fixed by the shapes) and
saves every plane's bin sums S_l (:func:`_native_args.hcl_saved_sums` of them, in the
accumulation dtype: 21 per plane of H >= 5, a few % of the features' size); the
backward reads them and writes every level's gradient in one pass over fs and ft
(it summed each plane again before: on CPU, where the features stay in the last-level
cache between forward and backward, that pass was compute, not memory).
The CUDA kernels write one partial per
(n, c) plane, in the accumulation dtype, and the host sums them
(deterministically) and applies c0, level by level. The Triton path takes every level in one launch (a level table)
plus one fixed-order sum, and one backward launch (kdkernels/triton/hcl.py).
On the GPU backends the forward saves only its inputs (its ``sums`` output is empty)
and the backward recomputes the bin sums: a second read of a plane, in the same
program, costs less there than a round trip of the sums through memory.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import as_tensor_list, check_feature_pairs
from ..reference import hcl as reference
from ._common import acc_dtype
from . import _native_args
from ._dispatch import PublicOp

OP = "hcl_loss"
backends.register_op(OP, ("triton", "cuda", "cpp", "torch"))


def level_plan(shape: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[float, ...], float]:
    """(pools, ratios r_l, c0) of one (N, C, H, W) level."""
    n, c, h, w = shape
    pools, weights, tot = reference.hcl_level_plan(h)
    ratios = tuple(wt * h * w / (l * l) for l, wt in zip(pools, weights))
    return pools, ratios, 1.0 / (tot * n * c * h * w)


@functools.lru_cache(maxsize=256)
def _cpu_plan(shapes: Tuple[Tuple[int, int, int, int], ...]) -> Dict[str, list]:
    """The per-level sizes and coefficients of the one-call CPU entry points, for the levels'
    (N, C, H, W) shapes: computed once per set of shapes (a training run has one), so that a
    call does no per-level Python work beyond checking its tensors. Read-only."""
    plan: Dict[str, list] = {k: [] for k in ("planes", "H", "W", "coef_mse", "pools", "coefs", "scale")}
    for shape in shapes:
        n, c, h, w = shape
        pools, ratios, c0 = level_plan(shape)
        for key, value in (("planes", n * c), ("H", h), ("W", w), ("coef_mse", 1.0), ("pools", list(pools)),
                           ("coefs", list(ratios)), ("scale", c0)):
            plan[key].append(value)
    return plan


def _fwd_level_cuda(fs: Tensor, ft: Tensor, partial: Tensor, pools, ratios) -> None:
    n, c, h, w = fs.shape
    _native_args.call("hcl_fwd_cuda", fs.dtype, fs=fs, ft=ft,
                      partial=partial, planes=n * c, H=h, W=w, coef_mse=1.0, pools=list(pools), coefs=list(ratios))


def _bwd_level_cuda(fs: Tensor, ft: Tensor, g: Tensor, grad: Tensor, pools, ratios) -> None:
    n, c, h, w = fs.shape
    _native_args.call("hcl_bwd_cuda", fs.dtype, fs=fs, ft=ft, gout=g,
                      grad=grad, planes=n * c, H=h, W=w, coef_mse=1.0, pools=list(pools), coefs=list(ratios))


def _saved_sums(shapes, backend: str) -> int:
    """Length of the forward's ``sums`` output for levels of these (N, C, H, W) shapes (ints,
    or symbolic sizes in the fake kernel)."""
    if backend != "cpp":
        return 0
    return _native_args.hcl_saved_sums([n * c for n, c, _, _ in shapes],
                                       [level_plan(shape)[0] for shape in shapes])


@torch.library.custom_op("kdkernels::hcl_loss", mutates_args=())
def hcl_loss_op(fstudent: List[Tensor], fteacher: List[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Fused HCL forward: lists of (N, C, H, W) -> (0-dim loss in the accumulation dtype, sums).

    ``sums``: 1-D, accumulation dtype, what the backward op needs besides the inputs: with
    ``cpp`` every plane's bin sums (``_saved_sums`` of them), else empty."""
    if backend == "triton":  # every level in one launch (kdkernels/triton/hcl.py)
        from ..triton import hcl as tri

        fs, ft = [f.contiguous() for f in fstudent], [f.contiguous() for f in fteacher]
        loss = tri.hcl_fwd(fs, ft, [level_plan(f.shape) for f in fs])
        return loss, loss.new_empty(0)
    acc = acc_dtype(fstudent[0].dtype)
    if backend == "cpp":  # every level in one native call, the sum included
        fs, ft = [f.contiguous() for f in fstudent], [f.contiguous() for f in fteacher]
        shapes = tuple(tuple(f.shape) for f in fs)
        plan = _cpu_plan(shapes)
        out = torch.empty((), dtype=acc)
        sums = torch.empty(_native_args.hcl_saved_sums(plan["planes"], plan["pools"]), dtype=acc)
        _native_args.call("hcl_loss_cpu", fs[0].dtype, fs=fs, ft=ft, out=out, sums=sums, **plan)
        return out, sums
    total = None
    for fs, ft in zip(fstudent, fteacher):
        fs, ft = fs.contiguous(), ft.contiguous()
        pools, ratios, c0 = level_plan(fs.shape)
        partial = torch.empty(fs.shape[0] * fs.shape[1], dtype=acc, device=fs.device)
        _fwd_level_cuda(fs, ft, partial, pools, ratios)
        level = partial.sum() * c0
        total = level if total is None else total + level
    return total, total.new_empty(0)


@hcl_loss_op.register_fake
def _(fstudent, fteacher, backend):
    acc = acc_dtype(fstudent[0].dtype)
    return (fstudent[0].new_empty((), dtype=acc),
            fstudent[0].new_empty(_saved_sums([f.shape for f in fstudent], backend), dtype=acc))


@torch.library.custom_op("kdkernels::hcl_loss_backward", mutates_args=())
def hcl_loss_backward_op(grad: Tensor, fstudent: List[Tensor], fteacher: List[Tensor], sums: Tensor,
                         backend: str) -> List[Tensor]:
    """d(loss)/d(fstudent[k]) * grad for every level; grad is the 0-dim grad_output (accumulation
    dtype), sums the forward's second output."""
    if backend == "triton":
        from ..triton import hcl as tri

        fs, ft = [f.contiguous() for f in fstudent], [f.contiguous() for f in fteacher]
        return tri.hcl_bwd(grad, fs, ft, [level_plan(f.shape) for f in fs])
    acc = acc_dtype(fstudent[0].dtype)
    if backend == "cpp":  # every level in one native call; level l's factor grad * c0_l is formed there
        fs, ft = [f.contiguous() for f in fstudent], [f.contiguous() for f in fteacher]
        grads = [torch.empty_like(f) for f in fs]
        _native_args.call("hcl_loss_backward_cpu", fs[0].dtype, fs=fs, ft=ft, gout=grad.to(acc).reshape(1),
                          sums=sums, grad=grads, **_cpu_plan(tuple(tuple(f.shape) for f in fs)))
        return grads
    g_acc = grad.to(acc).reshape(1)
    grads = []
    for fs, ft in zip(fstudent, fteacher):
        fs, ft = fs.contiguous(), ft.contiguous()
        pools, ratios, c0 = level_plan(fs.shape)
        out = torch.empty_like(fs)
        _bwd_level_cuda(fs, ft, g_acc * c0, out, pools, ratios)
        grads.append(out)
    return grads


@hcl_loss_backward_op.register_fake
def _(grad, fstudent, fteacher, sums, backend):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in fstudent]


def _level_grads(ctx, grad: Tensor, saved: Sequence[Tensor], need_teacher: Sequence[bool]):
    """(student gradients, teacher gradients or None per level) of the saved (fs..., ft..., sums)."""
    n = ctx.levels
    fs, ft, sums = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n]
    grads = torch.ops.kdkernels.hcl_loss_backward(grad, fs, ft, sums, ctx.backend)
    return list(grads), [-g if need else None for g, need in zip(grads, need_teacher)]


def _setup_context(ctx, inputs, output):
    fstudent, fteacher, backend = inputs
    ctx.levels = len(fstudent)
    ctx.backend = backend
    ctx.save_for_backward(*fstudent, *fteacher, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_sums):
    # needs_input_grad[1] is a list with one flag per teacher level
    grads_s, grads_t = _level_grads(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[1])
    return grads_s, grads_t, None


# For callers of torch.ops.kdkernels.hcl_loss (and opcheck); kdkernels.hcl_loss goes through _HCL.
hcl_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _HCL(torch.autograd.Function):
    """``kdkernels.hcl_loss``'s autograd node, in eager mode and under torch.compile alike: the
    forward custom op over the levels' tensors passed flat, ``(levels, backend, *fs, *ft)``,
    and the backward custom op (the same formula as the op's own registration above).

    Why not the op's own registration: for tensor-list arguments torch.library wraps it so that
    every call flattens and rebuilds the lists with pytree, forward and backward; inside this
    function's forward grad mode is off, and the op takes its plain path. Measured on the
    development CPU, one whole step of four 1-element levels (host work only): 316-385 us
    through the op's registration, 241-272 us through this node.
    """

    @staticmethod
    def forward(ctx, levels: int, backend: str, *tensors: Tensor) -> Tensor:
        ctx.levels, ctx.backend = levels, backend
        loss, sums = torch.ops.kdkernels.hcl_loss(list(tensors[:levels]), list(tensors[levels:]), backend)
        ctx.save_for_backward(*tensors, sums)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grads_s, grads_t = _level_grads(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[2 + ctx.levels:])
        return (None, None, *grads_s, *grads_t)


def _check(fstudent, fteacher) -> tuple:
    fs = as_tensor_list(fstudent, OP, "fstudent")
    ft = as_tensor_list(fteacher, OP, "fteacher")
    check_feature_pairs(fs, ft, OP)
    return fs, ft


_PUBLIC = PublicOp(OP, check=_check, reference=reference.hcl_loss, autocast="promote",
                   kernel=lambda backend, fs, ft: _HCL.apply(len(fs), backend, *fs, *ft))


def hcl_loss(fstudent, fteacher, backend: Optional[str] = None) -> Tensor:
    """ReviewKD's hierarchical context loss, fused (docs/spec.md §1).

    Args:
        fstudent: a (N, C, H, W) tensor or a list of them, one per level.
        fteacher: the same number of tensors, pairwise of the same shape,
            dtype and device (no gradient unless it requires one).
        backend: ``None`` (use $KDKERNELS_BACKEND, default ``"auto"``), or one of
            ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``.

    Returns:
        0-dim tensor in the accumulation dtype (float32; float64 for float64
        inputs), inside autocast and outside (see ``kdkernels/ops/_autocast.py``):
        sum over levels of
        ``(mse(d) + sum_j w_j * mse(P_l_j(d))) / (1 + sum_j w_j)``, d = fs - ft,
        pools l from (4, 2, 1) kept when l < H, w_j = 2^-(j+1).
        Accumulated in float32 (float64 for float64 inputs).
    """
    return _PUBLIC(fstudent, fteacher, backend=backend)
