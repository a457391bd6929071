r"""``torch.ops.kdkernels.kd_loss``: Hinton's KD loss in one streaming pass per row (docs/spec.md §4).

For (N, C) logits and temperature T, p = softmax(logits / T)::

    rows_n = T^2 * KL(p_t[n] || p_s[n]) = T^2 * sum_c p_t (log p_t - log p_s)
    loss   = rows (reduction "none"), or sum_n rows_n times 1/N ("batchmean"),
             1/(N*C) ("mean") or 1 ("sum")

The custom op ``kd_loss(logits_s, logits_t, temperature, reduction, backend)``
returns ``(loss, stats)``: the loss in the accumulation dtype (float32, or
float64 for float64 logits; never rounded to fp16/bf16) and ``stats``.
Every backend reads each row once in the forward, with an online softmax of
both inputs (csrc/common/kd.h derives it), and writes 6 floats per row in the
accumulation dtype: the two log-sum-exps, split into max and log-sum so that
they stay exact for logits around 1e4, plus what the teacher's gradient needs:
a reference rho and E = E_{p_t}[g] of the gaps g = (z_t - e(m_t)) - (z_s - rho).
The Triton and C++ CPU kernels take rho = the student's logit at the teacher's
argmax, so that g is exactly 0 where p_t is largest and the teacher's gradient
does not lose digits to cancellation there. The layout belongs to the backend
that wrote it: the Triton and CUDA kernels write ``(e(m_s), log S_s, e(m_t),
log S_t, E, rho)`` of z = x / T (CUDA with rho = e(m_s)), the C++ CPU kernels
``(e(m_s), log2 S_s, e(m_t), log2 S_t, E, rho)`` of the raw logits (they work
in base 2, csrc/cpu/kd.cpp). Autograd saves the two inputs and ``stats``, so the
backward is a single elementwise pass (g_n: grad_output of row n's T^2 KL)::

    d loss / d logits_s[n] = g_n T (p_s - p_t)
    d loss / d logits_t[n] = g_n T p_t (log p_t - log p_s - KL_n)   (only when the teacher requires grad)
                           = g_n T p_t (g - E)

:func:`kd_loss` calls the custom op in eager mode and under ``torch.compile`` alike.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import check_choice, check_float_tensor, check_same_dtype_device, check_temperature, check_tensor
from ..reference import kd as reference
from ._common import acc_dtype
from . import _native_args
from ._dispatch import PublicOp

OP = "kd_loss"
STATS = _native_args.KD_STATS
REDUCTIONS = reference.REDUCTIONS
backends.register_op(OP, ("triton", "cuda", "cpp", "torch"))

# The CUDA forward (csrc/cuda/kd.cu) streams a row per block; with fewer rows than
# about _CUDA_TARGET_BLOCKS (8 blocks of 256 threads per SM of a 132-SM H100, a
# few waves on smaller GPUs) it cuts long rows into segments of at least
# _CUDA_MIN_SEGMENT classes (8 per thread of a 256-thread block), one block
# each, and merges their states in a second small kernel (deterministic).
_CUDA_TARGET_BLOCKS = 1024
_CUDA_MIN_SEGMENT = 2048
CUDA_PART = _native_args.KD_CUDA_PART  # a segment's state in the CUDA forward's scratch: m_s, m_t, S_s, S_t, W


def _cuda_split(rows: int, cols: int) -> int:
    """Segments per row of the CUDA forward for (rows, cols) logits (shapes only)."""
    if rows == 0 or rows >= _CUDA_TARGET_BLOCKS or cols < 2 * _CUDA_MIN_SEGMENT:
        return 1
    return min(-(-_CUDA_TARGET_BLOCKS // rows), cols // _CUDA_MIN_SEGMENT)


def _fwd(backend: str, s: Tensor, t: Tensor, stats: Tensor, kl: Tensor, inv_t: float) -> None:
    """The GPU forwards: stats and the rows' KL into ``kl`` (N,), accumulation dtype."""
    if backend == "triton":
        from ..triton import kd as tri

        tri.kd_fwd(s, t, stats, kl, inv_t)
        return
    rows, cols = s.shape
    split = _cuda_split(rows, cols)
    part = torch.empty(rows * split * CUDA_PART, dtype=stats.dtype, device=s.device) if split > 1 else None
    _native_args.call("kd_fwd_cuda", s.dtype, s=s, t=t, stats=stats, kl=kl, part=part, rows=rows, cols=cols,
                      split=split, inv_t=inv_t)


def _bwd(backend: str, s: Tensor, t: Tensor, stats: Tensor, gscale: Tensor, grad_s: Tensor,
         grad_t: Optional[Tensor], inv_t: float) -> None:
    """The GPU backwards, with gscale (N,) = grad_output * T per row in the accumulation dtype."""
    if backend == "triton":
        from ..triton import kd as tri

        tri.kd_bwd(s, t, stats, gscale, grad_s, grad_t, inv_t)
        return
    rows, cols = s.shape
    _native_args.call("kd_bwd_cuda", s.dtype, s=s, t=t, stats=stats, gscale=gscale, grad_s=grad_s, grad_t=grad_t,
                      rows=rows, cols=cols, inv_t=inv_t)


def _scale(reduction: str, rows: int, cols: int) -> float:
    """The factor of sum_n rows_n in the loss: 1/N, 1/(N*C), or 1 ("sum"; "none" is per row)."""
    return {"batchmean": 1.0 / rows, "mean": 1.0 / (rows * cols)}.get(reduction, 1.0)


def _forward(logits_s: Tensor, logits_t: Tensor, temperature: float, reduction: str,
             backend: str) -> Tuple[Tensor, Tensor]:
    """(loss, stats (N, STATS)), both in the accumulation dtype."""
    s, t = logits_s.contiguous(), logits_t.contiguous()
    rows, cols = s.shape
    acc = acc_dtype(s.dtype)
    stats = torch.empty(rows, STATS, dtype=acc, device=s.device)
    t2 = temperature * temperature
    if backend == "cpp":  # the kernel also reduces and scales the rows (csrc/common/kd.h)
        loss = torch.empty((rows,) if reduction == "none" else (), dtype=acc)
        _native_args.call("kd_fwd_cpu", s.dtype, s=s, t=t, stats=stats, out=loss, rows=rows, cols=cols,
                          inv_t=1.0 / temperature, out_scale=t2 * _scale(reduction, rows, cols),
                          reduce=reduction != "none")
        return loss, stats
    kl = torch.empty(rows, dtype=stats.dtype, device=s.device)
    _fwd(backend, s, t, stats, kl, 1.0 / temperature)
    if reduction == "none":
        loss = kl * t2
    else:
        loss = kl.sum() * (t2 * _scale(reduction, rows, cols))
    return loss, stats


def _backward(grad: Tensor, logits_s: Tensor, logits_t: Tensor, stats: Tensor, temperature: float,
              reduction: str, backend: str, teacher_grad: bool) -> List[Tensor]:
    """[d loss/d logits_s * grad] (+ the same for logits_t when ``teacher_grad``)."""
    s, t = logits_s.contiguous(), logits_t.contiguous()
    rows, cols = s.shape
    stats = stats.contiguous()
    grad_s = torch.empty_like(s)
    grad_t = torch.empty_like(t) if teacher_grad else None
    # per row: grad_output of the row's T^2 KL, times T (d (T^2 KL) / d logits = T (...))
    mult = temperature * _scale(reduction, rows, cols)
    if backend == "cpp":  # the kernel reads grad_output as it is: 0-dim, or (N,) with any stride
        gout = grad if grad.dtype == stats.dtype else grad.to(stats.dtype)
        _native_args.call("kd_bwd_cpu", s.dtype, s=s, t=t, stats=stats, gout=gout, gout_scale=mult, grad_s=grad_s,
                          grad_t=grad_t, rows=rows, cols=cols, inv_t=1.0 / temperature)
    else:
        gscale = (grad.to(stats.dtype) * mult).expand(rows).contiguous()
        _bwd(backend, s, t, stats, gscale, grad_s, grad_t, 1.0 / temperature)
    return [grad_s, grad_t] if teacher_grad else [grad_s]


@torch.library.custom_op("kdkernels::kd_loss", mutates_args=())
def kd_loss_op(logits_s: Tensor, logits_t: Tensor, temperature: float, reduction: str,
               backend: str) -> Tuple[Tensor, Tensor]:
    """(N, C) logits -> (loss: 0-dim, or (N,) for "none"; stats (N, STATS)), both in the accumulation dtype."""
    return _forward(logits_s, logits_t, temperature, reduction, backend)


@kd_loss_op.register_fake
def _(logits_s, logits_t, temperature, reduction, backend):
    n = logits_s.shape[0]
    acc = acc_dtype(logits_s.dtype)
    return logits_s.new_empty((n,) if reduction == "none" else (), dtype=acc), logits_s.new_empty((n, STATS), dtype=acc)


@torch.library.custom_op("kdkernels::kd_loss_backward", mutates_args=())
def kd_loss_backward_op(grad: Tensor, logits_s: Tensor, logits_t: Tensor, stats: Tensor, temperature: float,
                        reduction: str, backend: str, teacher_grad: bool) -> List[Tensor]:
    """[d/d logits_s] (+ [d/d logits_t] when ``teacher_grad``) of the loss, times ``grad``."""
    return _backward(grad, logits_s, logits_t, stats, temperature, reduction, backend, teacher_grad)


@kd_loss_backward_op.register_fake
def _(grad, logits_s, logits_t, stats, temperature, reduction, backend, teacher_grad):
    out = [torch.empty_like(logits_s, memory_format=torch.contiguous_format)]
    if teacher_grad:
        out.append(torch.empty_like(logits_t, memory_format=torch.contiguous_format))
    return out


def _setup_context(ctx, inputs, output):
    logits_s, logits_t, temperature, reduction, backend = inputs
    _, stats = output
    ctx.args = (temperature, reduction, backend)
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits_s, logits_t, stats)


def _op_backward(ctx, grad, _grad_stats):
    logits_s, logits_t, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_s or need_t):
        return None, None, None, None, None
    grads = torch.ops.kdkernels.kd_loss_backward(grad, logits_s, logits_t, stats, *ctx.args, need_t)
    return (grads[0] if need_s else None), (grads[1] if need_t else None), None, None, None


kd_loss_op.register_autograd(_op_backward, setup_context=_setup_context)


def _check_inputs(logits_s, logits_t, temperature, reduction) -> tuple:
    check_tensor(logits_s, OP, "logits_s")
    check_tensor(logits_t, OP, "logits_t")
    check_float_tensor(logits_s, OP, "logits_s", 2)
    check_float_tensor(logits_t, OP, "logits_t", 2)
    shapes = f"logits_s {tuple(logits_s.shape)}, logits_t {tuple(logits_t.shape)}"
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"{OP}: logits_s and logits_t must have the same (N, C) shape, got {shapes}")
    check_same_dtype_device("logits_s", logits_s, [("logits_t", logits_t)], OP)
    temperature = check_temperature(temperature, OP)
    check_choice(reduction, "reduction", REDUCTIONS, OP)
    return logits_s, logits_t, temperature, reduction


def _kernel(backend: str, logits_s: Tensor, logits_t: Tensor, temperature: float, reduction: str) -> Tensor:
    return torch.ops.kdkernels.kd_loss(logits_s, logits_t, temperature, reduction, backend)[0]


_PUBLIC = PublicOp(OP, check=_check_inputs, reference=reference.kd_loss, kernel=_kernel, autocast="promote")


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0, reduction: str = "batchmean",
            backend: Optional[str] = None) -> Tensor:
    """Hinton's KD loss ``T^2 * KL(softmax(logits_t/T) || softmax(logits_s/T))``, fused (docs/spec.md §4).

    Equal to RepDistiller's ``DistillKL(T)(logits_s, logits_t)`` and mdistiller's
    ``kd_loss(logits_s, logits_t, T)`` with the default ``reduction``.

    Args:
        logits_s: (N, C) student logits (any float dtype; fp16/bf16 accumulate in fp32).
        logits_t: (N, C) teacher logits, same dtype and device. It gets a gradient
            only when it requires one.
        temperature: T > 0.
        reduction: ``"batchmean"`` (sum over rows / N), ``"sum"``, ``"mean"``
            (sum / (N*C), i.e. the element mean of ``torch.nn.functional.kl_div``)
            or ``"none"`` (the (N,) per-row losses T^2 * KL_n).
        backend: ``None`` (use $KDKERNELS_BACKEND, default ``"auto"``), or one of
            ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``.

    Returns:
        0-dim tensor (``(N,)`` for ``"none"``) in the accumulation dtype
        (float32; float64 for float64 logits), inside autocast and outside (see
        ``kdkernels/ops/_autocast.py``). Gradient
        w.r.t. logits_s of row n: ``g_n * T * (p_s - p_t)``.
    """
    return _PUBLIC(logits_s, logits_t, temperature, reduction, backend=backend)
