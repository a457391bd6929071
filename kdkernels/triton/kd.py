r"""Triton kernels of Hinton's KD loss (docs/spec.md §4).

Notation (csrc/common/kd.h has the same derivation): z = x / T per row,
running maxima m_s, m_t, e(m) = 0 if m = -inf else m, a = z - e(m) (<= 0), a
reference rho (below), and

    S_s = sum exp(a_s),   S_t = sum exp(a_t),   W = sum exp(a_t) * g,   g = a_t - (z_s - rho)
    KL  = sum p_t (log p_t - log p_s) = W / S_t + (e(m_s) - rho) + log(S_s / S_t)

(terms with exp(a_t) == 0 add 0 to W, so a teacher logit of -inf is harmless).
rho is the student's z at the teacher's (first) argmax, or e(m_s) where that
is not finite. The teacher's gradient is p_t (g - W / S_t), and at the
teacher's argmax, where p_t is largest, g is exactly 0: with rho = e(m_s)
instead, g - W / S_t there is a difference of two numbers of the size of the
logits' spread that nearly cancel when the teacher is peaked (a relative error
of 3e-4 in the teacher's gradient at N=1, C=5, T=0.5).
When the maxima grow to m' (and rho moves to rho'), the sums are rescaled with
alpha = exp(e(m) - e(m')): S <- alpha S, and W <- alpha_t (W - dc S_t) with
dc = (e(m'_t) - e(m_t)) - (rho' - rho).

Grid of the forward: (row, segment). A row is cut into SPLIT segments of SEG
classes (a multiple of BLOCK; SPLIT > 1 only when there are too few rows to
fill the GPU), each streamed once in BLOCK chunks with the online update above.
With one segment the program writes the row's results; otherwise it writes its
state (m_s, m_t, S_s, S_t, W) and ``_kd_combine_kernel`` merges a row's states
in one fixed-order reduction (deterministic). Outputs per row, in the
accumulation dtype: stats = (e(m_s), log S_s, e(m_t), log S_t, W / S_t, rho), kl = KL.

The backward (same grid) is elementwise: with G = grad_output * T per row,

    grad_s = G (p_s - p_t),   grad_t = G p_t (g - W / S_t),   p = exp(a - log S).

1/T enters as two float32 scalars (head + tail), since Triton passes Python
floats as float32; their sum is exact enough for float64 logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import f32_split

_MAX_BLOCK = 2048        # classes per chunk of a program
_TARGET_PROGRAMS = 1024  # split long rows until the grid has about this many programs
STATS = 6
PART = 7  # a segment's state: m_s, m_t, S_s, S_t, W, the student's z at the teacher's argmax, rho


@triton.jit
def _eff(m):
    """e(m): 0 for -inf (an empty or all -inf prefix), else m."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def store_stats(out, ms, ss, mt, st, w):
    """Fields 0-4 of a finished row's stats at ``out``: (e(m_s), log S_s, e(m_t), log S_t, W / S_t);
    returns W / S_t."""
    ec = w / st
    tl.store(out + 0, _eff(ms))
    tl.store(out + 1, tl.log(ss))
    tl.store(out + 2, _eff(mt))
    tl.store(out + 3, tl.log(st))
    tl.store(out + 4, ec)
    return ec


@triton.jit
def _store_row(stats_ptr, kl_ptr, row, ms, ss, mt, st, w, rho):
    """A finished row: stats (max_s, log sum_s, max_t, log sum_t, E_t[g], rho) and its KL."""
    out = stats_ptr + row * 6
    ec = store_stats(out, ms, ss, mt, st, w)
    tl.store(out + 5, rho)
    tl.store(kl_ptr + row, (ec + (_eff(ms) - rho)) + tl.log(ss / st))


@triton.jit
def _rho(r, ms):
    """The reference of the gaps: r (the student's z at the teacher's argmax) if finite, else e(m_s)."""
    return tl.where((r == r) & (tl.abs(r) < float("inf")), r, _eff(ms))


@triton.jit
def _max_keep(a, b):
    """max(a, b) that never picks a NaN b (a NaN element still reaches the sums)."""
    return tl.where(b > a, b, a)


@triton.jit
def load_segments(p, mask, ACC: tl.constexpr):
    """(m_s, m_t, S_s, S_t, W) of the segment states at pointers p (fields 0-4 of each slot;
    masked slots read as empty: -inf maxima, zero sums)."""
    ms_k = tl.load(p + 0, mask=mask, other=float("-inf")).to(ACC)
    mt_k = tl.load(p + 1, mask=mask, other=float("-inf")).to(ACC)
    ss_k = tl.load(p + 2, mask=mask, other=0.0).to(ACC)
    st_k = tl.load(p + 3, mask=mask, other=0.0).to(ACC)
    w_k = tl.load(p + 4, mask=mask, other=0.0).to(ACC)
    return ms_k, mt_k, ss_k, st_k, w_k


@triton.jit
def merge_segments(ms_k, mt_k, ss_k, st_k, w_k, ms, mt, ref_k, ref):
    """A row's (S_s, S_t, W) from its segments' states (vectors over the segments), in index order.

    ms, mt: the row's maxima (the max of ms_k, mt_k); ref, ref_k: the reference of
    the gaps for the row and each segment (rho here, e(m_s) in kdkernels/triton/linear_kd.py).
    Each segment's sums are rescaled to the row's maxima and reference
    (S <- alpha S, W <- alpha_t (W - dc S_t), the module docstring) and summed.
    """
    alpha_s = tl.exp(ms_k - _eff(ms))
    alpha_t = tl.exp(mt_k - _eff(mt))
    dc = (_eff(mt) - _eff(mt_k)) - (ref - ref_k)
    w_k = tl.where(st_k == 0.0, 0.0, alpha_t * (w_k - dc * st_k))
    return tl.sum(alpha_s * ss_k, axis=0), tl.sum(alpha_t * st_k, axis=0), tl.sum(w_k, axis=0)


@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, part_ptr, stats_ptr, kl_ptr, C, SEG, inv_head, inv_tail,
    ACC: tl.constexpr, BLOCK: tl.constexpr, FINAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    nseg = tl.num_programs(1).to(tl.int64)
    inv_t = (tl.zeros([], ACC) + inv_head) + inv_tail  # Python floats in the interpreter, fp32 when compiled
    start = seg * SEG
    end = tl.minimum(start + SEG, C)
    s_row = s_ptr + row * C
    t_row = t_ptr + row * C
    cols = tl.arange(0, BLOCK)
    ms = tl.full([], float("-inf"), ACC)
    mt = tl.full([], float("-inf"), ACC)
    ss = tl.zeros([], ACC)
    st = tl.zeros([], ACC)
    w = tl.zeros([], ACC)
    r = tl.full([], float("-inf"), ACC)  # none yet: rho = e(m_s)
    rho = tl.zeros([], ACC)
    for c0 in range(start, end, BLOCK):
        offs = c0 + cols
        mask = offs < end
        zs = tl.load(s_row + offs, mask=mask, other=0.0).to(ACC) * inv_t
        zt = tl.load(t_row + offs, mask=mask, other=0.0).to(ACC) * inv_t
        zs = tl.where(mask, zs, float("-inf"))
        zt = tl.where(mask, zt, float("-inf"))
        # grow the maxima; exp(-inf - e) = 0 drops the empty prefix
        bt = tl.max(zt, axis=0)
        ms_new = _max_keep(ms, tl.max(zs, axis=0))
        mt_new = _max_keep(mt, bt)
        # the student's z at the teacher's first argmax so far
        r_blk = tl.sum(tl.where(cols == tl.argmax(zt, axis=0), zs, 0.0), axis=0)
        r = tl.where(bt > mt, r_blk, r)
        rho_new = _rho(r, ms_new)
        alpha_s = tl.exp(ms - _eff(ms_new))
        alpha_t = tl.exp(mt - _eff(mt_new))
        dc = (_eff(mt_new) - _eff(mt)) - (rho_new - rho)
        w = tl.where(st == 0.0, 0.0, alpha_t * (w - dc * st))
        ss = ss * alpha_s
        st = st * alpha_t
        ms = ms_new
        mt = mt_new
        rho = rho_new
        # this chunk's terms
        a_s = zs - _eff(ms)
        a_t = zt - _eff(mt)
        e_s = tl.exp(a_s)
        e_t = tl.exp(a_t)
        ss += tl.sum(e_s, axis=0)
        st += tl.sum(e_t, axis=0)
        on = e_t > 0.0  # where the teacher's term counts (also keeps -inf - -inf out)
        w += tl.sum(e_t * (tl.where(on, a_t, 0.0) - tl.where(on, zs - rho, 0.0)), axis=0)
    if FINAL:
        _store_row(stats_ptr, kl_ptr, row, ms, ss, mt, st, w, rho)
    else:
        out = part_ptr + (row * nseg + seg) * 7
        tl.store(out + 0, ms)
        tl.store(out + 1, mt)
        tl.store(out + 2, ss)
        tl.store(out + 3, st)
        tl.store(out + 4, w)
        tl.store(out + 5, r)
        tl.store(out + 6, rho)


@triton.jit
def _kd_combine_kernel(part_ptr, stats_ptr, kl_ptr, SPLIT, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the SPLIT segment states of a row: rescale each to the row's maxima and rho, add."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_S)
    mask = k < SPLIT
    p = part_ptr + (row * SPLIT + k) * 7
    ms_k, mt_k, ss_k, st_k, w_k = load_segments(p, mask, ACC)
    r_k = tl.load(p + 5, mask=mask, other=float("-inf")).to(ACC)
    rho_k = tl.load(p + 6, mask=mask, other=0.0).to(ACC)
    ms = tl.max(ms_k, axis=0)
    mt = tl.max(mt_k, axis=0)
    # the first segment holding the teacher's maximum holds its first argmax
    r = tl.sum(tl.where(k == tl.argmax(mt_k, axis=0), r_k, 0.0), axis=0)
    rho = _rho(r, ms)
    ss, st, w = merge_segments(ms_k, mt_k, ss_k, st_k, w_k, ms, mt, rho_k, rho)
    _store_row(stats_ptr, kl_ptr, row, ms, ss, mt, st, w, rho)


@triton.jit
def _kd_bwd_kernel(
    s_ptr, t_ptr, stats_ptr, g_ptr, gs_ptr, gt_ptr, C, SEG, inv_head, inv_tail,
    ACC: tl.constexpr, BLOCK: tl.constexpr, TEACHER: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1).to(tl.int64)
    inv_t = (tl.zeros([], ACC) + inv_head) + inv_tail  # Python floats in the interpreter, fp32 when compiled
    start = seg * SEG
    end = tl.minimum(start + SEG, C)
    stats = stats_ptr + row * 6
    ms = tl.load(stats + 0).to(ACC)
    ls = tl.load(stats + 1).to(ACC)
    mt = tl.load(stats + 2).to(ACC)
    lt = tl.load(stats + 3).to(ACC)
    ec = tl.load(stats + 4).to(ACC)
    rho = tl.load(stats + 5).to(ACC)
    g = tl.load(g_ptr + row).to(ACC)
    cols = tl.arange(0, BLOCK)
    base = row * C
    for c0 in range(start, end, BLOCK):
        offs = base + c0 + cols
        mask = c0 + cols < end
        zs = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t
        a_s = zs - ms
        a_t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t - mt
        p_s = tl.exp(a_s - ls)
        p_t = tl.exp(a_t - lt)
        tl.store(gs_ptr + offs, (g * (p_s - p_t)).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            on = p_t > 0.0
            gap = tl.where(on, a_t, 0.0) - tl.where(on, zs - rho, 0.0)
            tl.store(gt_ptr + offs, (g * p_t * (gap - ec)).to(gt_ptr.dtype.element_ty), mask=mask)


def _plan(rows: int, cols: int):
    """(BLOCK, SEG, SPLIT, num_warps) for (rows, cols) logits; shapes only."""
    block = min(triton.next_power_of_2(cols), _MAX_BLOCK)
    chunks = triton.cdiv(cols, block)
    split = max(1, min(chunks, triton.cdiv(_TARGET_PROGRAMS, rows)))
    seg = triton.cdiv(chunks, split) * block
    split = triton.cdiv(cols, seg)
    num_warps = max(1, min(8, block // 256))
    return block, seg, split, num_warps


def _inv_parts(inv_t: float):
    """1/T as a float32 head and the rest (rounded on the host in pure Python: no tensor per call)."""
    return f32_split(inv_t)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def kd_fwd(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, kl: torch.Tensor, inv_t: float) -> None:
    """Write stats (N, 5) and kl (N,) (accumulation dtype) of contiguous (N, C) logits."""
    rows, cols = s.shape
    block, seg, split, num_warps = _plan(rows, cols)
    head, tail = _inv_parts(inv_t)
    acc = _acc(s.dtype)
    part = stats if split == 1 else torch.empty(rows * split * PART, dtype=stats.dtype, device=s.device)
    _kd_fwd_kernel[(rows, split)](
        s, t, part, stats, kl, cols, seg, head, tail,
        ACC=acc, BLOCK=block, FINAL=split == 1, num_warps=num_warps,
    )
    launch_counts["kd_fwd"] += 1
    if split > 1:
        _kd_combine_kernel[(rows,)](
            part, stats, kl, split, ACC=acc, BLOCK_S=triton.next_power_of_2(split), num_warps=1,
        )
        launch_counts["kd_combine"] += 1


def kd_bwd(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, gscale: torch.Tensor,
           grad_s: torch.Tensor, grad_t, inv_t: float) -> None:
    """Write grad_s (and grad_t unless it is None); gscale (N,) = grad_output * T, accumulation dtype."""
    rows, cols = s.shape
    block, seg, split, num_warps = _plan(rows, cols)
    head, tail = _inv_parts(inv_t)
    _kd_bwd_kernel[(rows, split)](
        s, t, stats, gscale, grad_s, grad_t if grad_t is not None else grad_s, cols, seg, head, tail,
        ACC=_acc(s.dtype), BLOCK=block, TEACHER=grad_t is not None, num_warps=num_warps,
    )
    launch_counts["kd_bwd"] += 1
