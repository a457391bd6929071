r"""``kdkernels.linear_kd_loss``: KD (and cross-entropy) of two lm_heads' logits, never materialised.

Shapes: h_s (N, D_s), w_s (V, D_s), h_t (N, D_t), w_t (V, D_t), biases (V,),
labels (N,). With z = h w^T + b, p = softmax(z / T) and k_n = [labels_n != ignore_index]::

    L_n  = k_n (T^2 KL(p_t[n] || p_s[n]) + ce_weight CE(z_s[n], labels_n))
    loss = sum_n L_n / sum_n k_n  ("batchmean"),  sum_n L_n  ("sum"),  (L_n)_n  ("none")

(kdkernels/reference/linear_kd.py spells out the math and the gradients.) The
tokens are processed ``chunk`` at a time (kdkernels/ops/_linear_kd_pass.py):
no (N, V) matrix is ever allocated, forward or backward.

Since a reduced loss is a scalar, its gradients are computed in the *same pass*
as the loss (the logits of a chunk are formed once, turned into gradient
logits, and multiplied back into dh, dw, db): the private op
``torch.ops.kdkernels.linear_kd_loss_fused`` returns the loss, the number of
kept rows K and the gradients of sum_n L_n in the accumulation dtype (each only
when the matching input requires grad; an empty tensor otherwise), and its
backward multiplies them by grad_output (/ K for "batchmean"). With ``reduction="none"``
the row weights are known only in the backward: the forward saves the inputs
and ``linear_kd_loss_backward`` runs the chunked pass again with them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends
from .._checks import (check_choice, check_float_tensor, check_real, check_same_dtype_device, check_temperature,
                       check_tensor)
from ..reference import linear_kd as reference
from ._common import acc_dtype
from ._dispatch import PublicOp, eager_triton_backward, grad_enabled_for, scale_grad
from . import _linear_kd_pass

OP = "linear_kd_loss"
REDUCTIONS = reference.REDUCTIONS
backends.register_op(OP, ("triton", "cpp", "torch"))
# Default chunk: about this many logits (M x V) per block. On the CPU the GEMMs
# set the pace and BLAS needs M in the hundreds to reach its peak (M = 32 ran the
# logit GEMM at a quarter of M = 512's rate): 32M logits (128 MiB fp32, a few
# blocks live at once) give M = 256 at V = 128,256 and M = 1,024 at V = 32,000.
_CHUNK_ELEMENTS = {"cpu": 1 << 25, "other": 1 << 22}


def default_chunk(n: int, v: int, device_type: str = "cuda") -> int:
    """Tokens per chunk: a power of two with chunk * V near the block budget, within [16, N].

    The budget is 32M logits on the CPU (GEMMs large enough for BLAS), 4M (16 MiB
    in fp32) elsewhere.
    """
    budget = _CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "other"]
    c = 1 << max(4, (budget // max(v, 1)).bit_length() - 1)
    return max(1, min(n, c))


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _grad_outputs_like(h_s, w_s, b_s, h_t, w_t, b_t, needs) -> List[Tensor]:
    acc = acc_dtype(h_s.dtype)
    shapes = [h_s.shape, w_s.shape, None if b_s is None else b_s.shape,
              h_t.shape, w_t.shape, None if b_t is None else b_t.shape]
    return [h_s.new_empty(shape, dtype=acc) if (need and shape is not None) else _empty(h_s, acc)
            for need, shape in zip(needs, shapes)]


def _prepare(h_s, w_s, b_s, h_t, w_t, b_t, labels, ignore_index, backend):
    """Contiguous inputs, the kept-row mask, and contiguous labels; for the CPU backend's
    gather the ignored rows' labels are set to class 0 (the Triton kernels mask those rows
    with the kept-row mask, whatever their label)."""
    h_s, w_s, h_t, w_t = (x.contiguous() for x in (h_s, w_s, h_t, w_t))
    b_s = b_s.contiguous() if b_s is not None else None
    b_t = b_t.contiguous() if b_t is not None else None
    keep = reference.kept_rows(labels, ignore_index, h_s.shape[0], h_s.device)
    if labels is not None and backend != "triton":
        labels = torch.where(keep, labels, torch.zeros_like(labels)).to(torch.int64).contiguous()
    elif labels is not None:
        labels = labels.contiguous()
    return h_s, w_s, b_s, h_t, w_t, b_t, labels, keep


@torch.library.custom_op("kdkernels::linear_kd_loss_fused", mutates_args=())
def linear_kd_loss_fused_op(h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], h_t: Tensor, w_t: Tensor,
                            b_t: Optional[Tensor], labels: Optional[Tensor], temperature: float, ce_weight: float,
                            ignore_index: Optional[int], reduction: str, needs: Sequence[bool], backend: str,
                            chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                 Tensor]:
    """(loss, K, ce, gh_s, gw_s, gb_s, gh_t, gw_t, gb_t); ``needs`` = 6 flags (h_s, w_s, b_s, h_t, w_t, b_t).

    loss: 0-dim ((N,) for "none") in h_s's dtype; K: 0-dim, the kept rows, in the
    accumulation dtype; ce: the unweighted cross-entropy term reduced like the loss
    (sum_n k_n CE_n, / K for "batchmean"), shaped and typed like loss, zeros when
    ce_weight = 0 (not differentiable: it reports the CE inside ``loss``); the gradients of sum_n L_n (unscaled) in the accumulation
    dtype, an empty (0,) tensor where not needed (always with "none"). The backward
    scales them into fresh tensors (never in place: a retained graph reads them again).
    """
    if len(needs) != 6:
        raise ValueError(f"linear_kd_loss_fused: needs must hold 6 flags, got {list(needs)}")
    h_s, w_s, b_s, h_t, w_t, b_t, y, keep = _prepare(h_s, w_s, b_s, h_t, w_t, b_t, labels, ignore_index, backend)
    acc = acc_dtype(h_s.dtype)
    rw = None if reduction == "none" or not any(needs) else keep
    rows, ce_rows, *grads = _linear_kd_pass.run(backend, h_s, w_s, b_s, h_t, w_t, b_t, y, keep, rw, temperature,
                                                ce_weight, chunk, needs)
    if backend == "triton":  # one launch for K and the reductions
        from ..triton import linear_kd as tri

        return (*tri.lkd_finish(rows, ce_rows, keep, reduction, ce_weight != 0.0, h_s.dtype), *grads)
    kept = keep.sum(dtype=acc)

    def reduce(r: Tensor) -> Tensor:
        if reduction == "none":
            return r.to(h_s.dtype)
        total = r.sum() if reduction == "sum" else r.sum() / kept
        return total.to(h_s.dtype)

    loss = reduce(rows)
    ce = reduce(ce_rows) if ce_weight != 0.0 else torch.zeros_like(loss)
    return (loss, kept, ce, *grads)


@linear_kd_loss_fused_op.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, ce_weight, ignore_index, reduction, needs, backend,
      chunk):
    n = h_s.shape[0]
    loss = h_s.new_empty((n,) if reduction == "none" else ())
    kept = h_s.new_empty((), dtype=acc_dtype(h_s.dtype))
    fused = [bool(x) and reduction != "none" for x in needs]
    return (loss, kept, torch.empty_like(loss), *_grad_outputs_like(h_s, w_s, b_s, h_t, w_t, b_t, fused))


@torch.library.custom_op("kdkernels::linear_kd_loss_backward", mutates_args=())
def linear_kd_loss_backward_op(grad: Tensor, h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], h_t: Tensor,
                               w_t: Tensor, b_t: Optional[Tensor], labels: Optional[Tensor], temperature: float,
                               ce_weight: float, ignore_index: Optional[int], needs: Sequence[bool], backend: str,
                               chunk: int) -> List[Tensor]:
    """Gradients of sum_n grad_n L_n (``reduction="none"``; grad (N,)), in the accumulation dtype."""
    h_s, w_s, b_s, h_t, w_t, b_t, y, keep = _prepare(h_s, w_s, b_s, h_t, w_t, b_t, labels, ignore_index, backend)
    rw = grad.contiguous()  # taken where keep is set (the pass masks it)
    _, _, *grads = _linear_kd_pass.run(backend, h_s, w_s, b_s, h_t, w_t, b_t, y, keep, rw, temperature, ce_weight,
                                       chunk, needs)
    return grads


@linear_kd_loss_backward_op.register_fake
def _(grad, h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, ce_weight, ignore_index, needs, backend, chunk):
    return _grad_outputs_like(h_s, w_s, b_s, h_t, w_t, b_t, needs)


_NAMES = ("h_s", "w_s", "bias_s", "h_t", "w_t", "bias_t")


def _setup_context(ctx, inputs, output):
    (h_s, w_s, b_s, h_t, w_t, b_t, labels, temperature, ce_weight, ignore_index, reduction, needs, backend,
     chunk) = inputs
    _, kept, ce, *grads = output
    ctx.mark_non_differentiable(kept, ce, *grads)
    ctx.set_materialize_grads(False)
    ctx.needs = [bool(x) for x in needs]
    ctx.reduction = reduction
    ctx.backend = backend
    ctx.dtypes = [None if x is None else x.dtype for x in (h_s, w_s, b_s, h_t, w_t, b_t)]
    if reduction == "none":
        ctx.args = (temperature, ce_weight, ignore_index, backend, chunk)
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels)
    else:
        ctx.save_for_backward(kept, *grads)


def _backward(ctx, grad, *_unused):
    none = (None,) * 14
    if grad is None:
        return none
    wanted = ctx.needs_input_grad[:6]
    missing = [name for name, want, have in zip(_NAMES, wanted, ctx.needs) if want and not have]
    if missing:
        raise RuntimeError(f"linear_kd_loss_fused: gradients for {missing} were not computed in the forward "
                           "(call kdkernels.linear_kd_loss, which sets `needs` from requires_grad)")
    if ctx.reduction == "none":
        h_s, w_s, b_s, h_t, w_t, b_t, labels = ctx.saved_tensors
        needs = [bool(w) for w in wanted]
        grads = torch.ops.kdkernels.linear_kd_loss_backward(grad, h_s, w_s, b_s, h_t, w_t, b_t, labels, *ctx.args[:3],
                                                            needs, *ctx.args[3:])
        out = [g.to(dt) if w else None for g, dt, w in zip(grads, ctx.dtypes, wanted)]
        return (*out,) + (None,) * 8
    kept, *saved = ctx.saved_tensors
    if eager_triton_backward(ctx.backend, grad, kept, *saved):
        from ..triton import scale

        out = scale.scale_grads(grad, kept if ctx.reduction == "batchmean" else None,
                                [g if w else None for g, w in zip(saved, wanted)], ctx.dtypes, name="linear_kd_scale")
        return (*out,) + (None,) * 8
    s = grad.to(kept.dtype)
    if ctx.reduction == "batchmean":
        s = s / kept
    out = [scale_grad(g, s, dt) if w else None for g, dt, w in zip(saved, ctx.dtypes, wanted)]
    return (*out,) + (None,) * 8


linear_kd_loss_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _check(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight, chunk):
    """Validate everything; returns (temperature, ce_weight) as floats."""
    named = (("h_s", h_s), ("w_s", w_s), ("h_t", h_t), ("w_t", w_t))
    for arg, x in named:
        check_tensor(x, OP, arg)
    for arg, x in (("bias_s", bias_s), ("bias_t", bias_t), ("labels", labels)):
        check_tensor(x, OP, arg, optional=True)
    for arg, x in named:
        check_float_tensor(x, OP, arg, 2)
    shapes = (f"h_s {tuple(h_s.shape)}, w_s {tuple(w_s.shape)}, h_t {tuple(h_t.shape)}, "
              f"w_t {tuple(w_t.shape)}")
    if h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"{OP}: h_s is (N, D_s) and w_s (V, D_s): their D differ ({shapes})")
    if h_t.shape[1] != w_t.shape[1]:
        raise ValueError(f"{OP}: h_t is (N, D_t) and w_t (V, D_t): their D differ ({shapes})")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"{OP}: w_s and w_t must have the same vocabulary size V ({shapes})")
    if h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"{OP}: h_s and h_t must have the same number of tokens N ({shapes})")
    v, n = w_s.shape[0], h_s.shape[0]
    for arg, b in (("bias_s", bias_s), ("bias_t", bias_t)):
        if b is not None:
            check_float_tensor(b, OP, arg, 1)
            if b.shape[0] != v:
                raise ValueError(f"{OP}: {arg} has shape {tuple(b.shape)} but the vocabulary needs ({v},) ({shapes})")
    check_same_dtype_device("h_s", h_s, [("w_s", w_s), ("h_t", h_t), ("w_t", w_t), ("bias_s", bias_s),
                                         ("bias_t", bias_t)], OP)
    temperature = check_temperature(temperature, OP)
    ce_weight = check_real(ce_weight, "ce_weight", OP)
    check_choice(reduction, "reduction", REDUCTIONS, OP)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"{OP}: ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{OP}: labels must hold integer class indices, got {labels.dtype}")
        if labels.shape != (n,):
            raise ValueError(f"{OP}: labels has shape {tuple(labels.shape)} but h_s {tuple(h_s.shape)} needs ({n},)")
        if labels.device != h_s.device:
            raise ValueError(f"{OP}: labels is on {labels.device} (shape {tuple(labels.shape)}) "
                             f"but h_s is on {h_s.device}")
    elif ce_weight != 0.0:
        raise ValueError(f"{OP}: ce_weight={ce_weight} needs labels (N,)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{OP}: chunk must be a positive int (tokens per chunk) or None, got {chunk!r}")
    return temperature, ce_weight


def _checked(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
             chunk) -> tuple:
    temperature, ce_weight = _check(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction,
                                    ignore_index, ce_weight, chunk)
    return h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight, chunk


def _reference(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
               chunk) -> Tensor:
    return reference.linear_kd_loss(h_s, w_s, h_t, w_t, temperature=temperature, bias_s=bias_s, bias_t=bias_t,
                                    reduction=reduction, ignore_index=ignore_index, labels=labels,
                                    ce_weight=ce_weight)


def _fused(backend, h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
           chunk) -> Tuple[Tensor, ...]:
    needs = grad_enabled_for(h_s, w_s, bias_s, h_t, w_t, bias_t)
    if chunk is None:
        chunk = default_chunk(h_s.shape[0], w_s.shape[0], h_s.device.type)
    return torch.ops.kdkernels.linear_kd_loss_fused(h_s, w_s, bias_s, h_t, w_t, bias_t, labels, temperature,
                                                     ce_weight, ignore_index, reduction, needs, backend, chunk)


def _kernel(backend, *args) -> Tensor:
    return _fused(backend, *args)[0]


def _kernel_terms(backend, *args) -> Tuple[Tensor, Tensor]:
    """(loss, the unweighted CE term reduced like it, not differentiable) from one fused pass."""
    out = _fused(backend, *args)
    return out[0], out[2]


def _reference_terms(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
                     chunk) -> Tuple[Tensor, Tensor]:
    loss = _reference(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
                      chunk)
    if ce_weight == 0.0:
        return loss, torch.zeros_like(loss.detach())
    with torch.no_grad():
        with_ce = _reference(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, 1.0,
                             chunk)
        without = _reference(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, 0.0,
                             chunk)
    return loss, with_ce - without


# no autocast rule: linear_kd_loss takes its inputs as they come, and its reference runs as called
_PUBLIC = PublicOp(OP, check=_checked, reference=_reference, kernel=_kernel, autocast=None, reference_in_acc=False)
_TERMS = PublicOp(OP, check=_checked, reference=_reference_terms, kernel=_kernel_terms, autocast=None,
                  reference_in_acc=False)


def linear_kd_loss(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, *, temperature: float,
                   bias_s: Optional[Tensor] = None, bias_t: Optional[Tensor] = None, reduction: str = "batchmean",
                   ignore_index: Optional[int] = None, labels: Optional[Tensor] = None, ce_weight: float = 0.0,
                   chunk: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    r"""Hinton's KD loss (plus an optional cross-entropy) of two lm_heads' logits, never materialised.

    The value of ``kd_loss(h_s @ w_s.T + bias_s, h_t @ w_t.T + bias_t, temperature, reduction)``
    plus ``ce_weight * cross_entropy(h_s @ w_s.T + bias_s, labels)``, computed
    ``chunk`` tokens at a time, so that no (N, V) logits exist in memory.

    Args:
        h_s: (N, D_s) student hidden states (the input of its lm_head), float32/float64/float16/bfloat16.
        w_s: (V, D_s) student lm_head weight (``nn.Linear(D_s, V).weight``).
        h_t: (N, D_t) teacher hidden states; w_t: (V, D_t) teacher lm_head weight.
            The teacher gets gradients only for the tensors that require them.
        temperature: T > 0 (keyword only).
        bias_s, bias_t: (V,) lm_head biases or None.
        reduction: with L_n = k_n (T^2 KL(p_t[n] || p_s[n]) + ce_weight CE_n),
            p = softmax(z / T), CE_n = logsumexp(z_s[n]) - z_s[n, labels_n]:
            ``"batchmean"`` sum_n L_n / K, K = the number of kept rows (so ignored
            tokens change neither sum nor count, as ``kl_div(..., "batchmean")`` over the
            kept rows and ``cross_entropy(..., ignore_index=...)`` compute it; K = 0 gives NaN);
            ``"sum"`` sum_n L_n; ``"none"`` the (N,) rows L_n, 0 for ignored rows.
        ignore_index: rows whose label equals it are dropped (k_n = 0) from both
            terms and from K. None (the default): every row is kept. Needs ``labels``
            to have an effect (HF causal LMs use -100 for padding and the last token).
        labels: (N,) integer classes in [0, V) (or ``ignore_index``); needed when
            ``ce_weight != 0``. A label outside [0, V) that is not ignored raises on
            the CPU backends and gives a NaN loss on the Triton backend.
        ce_weight: weight of the cross-entropy of the student's logits (at T = 1).
        chunk: tokens per chunk; None picks one from the shapes and device (:func:`default_chunk`:
            about 32M logits per block on the CPU, 4M on a GPU).
        backend: ``None`` ($KDKERNELS_BACKEND, default ``"auto"``), ``"triton"``, ``"cpp"``
            (CPU: BLAS for the logits, the fused C++ KD kernels for the softmaxes) or
            ``"torch"`` (the reference: materialises both (N, V) logits).

    Returns:
        0-dim tensor, or (N,) for ``"none"``, in the inputs' dtype (sums in float32,
        float64 for float64 inputs). Gradients (``g`` = grad_output / K for batchmean)::

            dz_s = g k (T (p_s - p_t) + ce_weight (softmax(z_s) - onehot(labels)))
            dz_t = g k T p_t (log p_t - log p_s - KL)
            dh = dz w,  dw = dz^T h,  db = sum_n dz   (for each model)

        computed in the forward pass for the scalar reductions (the backward only
        scales them); double backward is not supported.
    """
    return _PUBLIC(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
                   chunk, backend=backend)


def _one_grad(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are one tensor, or the same view of one memory (an expand of a 0-dim
    grad_output by two ``sum`` backwards): equal without reading them. (Traced tensors, fake or
    functional subclasses, and torch.compile's traces have no memory to compare: only identity
    counts for them.)"""
    if a is b:
        return True
    if torch.compiler.is_compiling():
        return False
    return (type(a) is Tensor and type(b) is Tensor and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
            and a.device == b.device and a.shape == b.shape and a.stride() == b.stride())


class _SumOnly(torch.autograd.Function):
    """(total - part, part) from ``total`` and a detached ``part`` of it; the backward passes the
    common grad_output to ``total``, so both outputs must be back-propagated together, alike.

    What the backward checks: one output without a gradient (one term alone) raises at once.
    When autograd hands both outputs one tensor (``kd + ce``, ``sum(losses.values())``, any
    function of that sum) or two identical views of one memory (``kd.sum() + ce.sum()``), they
    are equal and nothing is read. Otherwise (the terms weighted apart, ``2 * kd + ce``, or
    equal weights applied to each, ``2 * kd + 2 * ce``) the two are compared on the host
    (``torch.equal``: one device synchronisation in that backward) and differing ones raise.
    Under ``torch.compile`` nothing can be read on the host: where they differ, the gradient
    is NaN instead.
    """

    @staticmethod
    def forward(ctx, total: Tensor, part: Tensor):
        ctx.set_materialize_grads(False)
        return total - part, part.clone()

    @staticmethod
    def backward(ctx, g_rest, g_part):
        if g_rest is not None and g_part is not None and not _one_grad(g_rest, g_part) \
                and torch.compiler.is_compiling():
            # A traced backward cannot read the grad_outputs on the host to raise. Where they differ
            # the fused pass has no gradient to give: NaN, so that the step cannot pass unnoticed.
            return torch.where(g_rest == g_part, g_rest, torch.full_like(g_rest, float("nan"))), None
        if g_rest is None or g_part is None or not (_one_grad(g_rest, g_part) or torch.equal(g_rest, g_part)):
            raise RuntimeError(
                "linear_kd_loss_terms: its two terms come from one fused pass, which computes the gradient of "
                "their sum only: back-propagate kd + ce (e.g. sum(losses.values())), not one term alone or the "
                "terms with different weights (for that, call linear_kd_loss once per term)")
        return g_rest, None


def linear_kd_loss_terms(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, *, temperature: float,
                         bias_s: Optional[Tensor] = None, bias_t: Optional[Tensor] = None,
                         reduction: str = "batchmean", ignore_index: Optional[int] = None,
                         labels: Optional[Tensor] = None, ce_weight: float = 0.0, chunk: Optional[int] = None,
                         backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    r"""(kd, ce) with kd + ce = :func:`linear_kd_loss` (same arguments), from its one fused pass.

    kd = the T^2 KL term, ce = ``ce_weight`` times the cross-entropy term, each reduced as
    ``reduction`` says (0-dim, or (N,) for ``"none"``), so that a training loop can report
    them apart. The pass computes the gradient of the sum only, so the two must be
    back-propagated together with the same grad_output (``(kd + ce).backward()``, or
    ``sum(losses.values())`` with both in ``losses``); a backward through one term alone,
    or through the two with different weights, raises RuntimeError. Back-propagated as
    ``kd + ce`` (or any function of that sum) the check reads nothing on the host; weighting
    the terms apart, even alike (``2 * kd + 2 * ce``), costs a device synchronisation per
    backward to compare the two grad_outputs.
    """
    return scaled_terms(1.0, h_s, w_s, h_t, w_t, temperature=temperature, bias_s=bias_s, bias_t=bias_t,
                        reduction=reduction, ignore_index=ignore_index, labels=labels, ce_weight=ce_weight,
                        chunk=chunk, backend=backend)


def scaled_terms(scale: float, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, *, temperature: float,
                 bias_s: Optional[Tensor] = None, bias_t: Optional[Tensor] = None, reduction: str = "batchmean",
                 ignore_index: Optional[int] = None, labels: Optional[Tensor] = None, ce_weight: float = 0.0,
                 chunk: Optional[int] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(scale kd, scale ce) of :func:`linear_kd_loss_terms`, the factor applied to the fused loss
    before it is split, so that ``kd + ce`` hands the split one grad_output (weighting the
    two terms after the split would give it two tensors to compare on the host)."""
    total, ce = _TERMS(h_s, w_s, h_t, w_t, bias_s, bias_t, labels, temperature, reduction, ignore_index, ce_weight,
                       chunk, backend=backend)
    scale = check_real(scale, "scale", OP)
    if scale != 1.0:
        total = total * scale
    part = (ce * (float(ce_weight) * scale)).detach().to(total.dtype)
    if not total.requires_grad:
        return total - part, part
    return _SumOnly.apply(total, part)
