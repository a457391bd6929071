r"""Triton kernels of the hierarchical context loss (docs/spec.md §1): every level in one launch.

Per level, with d = fs - ft on one (n, c) plane (H x W) and, for each kept pool
size l, the adaptive-pool bin sums S_l[i, k] = sum of d over rows
[r0_i, r1_i) x cols [c0_k, c1_k) (bins may overlap), the plane's share of the loss is

    loss_plane = c0 * ( sum(d^2) + sum_l r_l * sum_{i,k} (S_l[i,k] / area_l[i,k])^2 )

with c0 = 1/(tot*N*C*H*W) and r_l = c_l/c0 = w_l*H*W/l^2, where c_l = w_l/(tot*N*C*l^2)
(r_l is a power of two times an integer: exact in fp32). The gradient is

    dL/dd[r, c] = 2*c0 * ( d[r, c] + sum_l r_l * sum_{bins (i,k) covering (r,c)} S_l[i,k] / area_l[i,k]^2 ).

Launches. The levels are a table (tuples of pointers, sizes, ratios and tile
shapes, up to MAX_LEVELS per launch); the grid is the concatenation of every
level's programs and a program finds its level from the table's start offsets.
The forward writes one partial (c0 * the loss of its planes, accumulation
dtype) per program and a one-program kernel sums the partials in a fixed order
into the 0-dim loss (deterministic, no atomics): two launches. The backward is
one launch: it reads grad_output itself and writes every level's gradient.

Programs. A level whose planes fit one tile holds PB whole planes per program
(a [PB, BLOCK_H, BLOCK_W] tile, PB chosen so the level still has enough
programs to fill the GPU): an 8 x 8 level is not 16,384 programs of 64
elements. Larger planes are walked in row chunks (the backward then reads the
plane twice, the second time from L2). A level without pools (H = 1: the
pooled 1 x 1 feature) is a flat elementwise sum of squares over contiguous
blocks. When W is a multiple of 4 (2) the row starts are declared multiples of
4 (2), so rows load as vectors; W = 7 and 14 rows start unaligned and load as
coalesced scalars.

Bin sums are separable: with 0/1 membership matrices R_l (l x H) and C_l
(l x W), S_l = R_l d C_l^T and the scatter back is R_l^T (S/area^2) C_l, both
evaluated as broadcast-multiply-reduce over tiny l (4, 2, 1).

c0 enters the kernels as two float32 scalars (head + tail, see _host.py): their
sum in the accumulation dtype is c0 to ~2^-48, which keeps float64 inputs at
float64 accuracy although Triton passes Python floats as float32.

Index widths: plane ids are int64 before they multiply H*W, and row offsets
inside the plane are int64 too, so N*C*H*W may pass 2^31. The bin edges
(i*A // L, ((i+1)*A + L - 1) // L for A = H or W) stay int32: the host keeps
H, W < 2^28 (_check_plane, the same limits as csrc/common/hcl.h), so 4*A + 3
cannot wrap.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import f32_split

MAX_LEVELS = 8      # levels per launch (more levels take one more launch per 8)
_TILE = 1024        # elements of one [PB, BLOCK_H, BLOCK_W] tile
_FLAT = 4096        # elements per program of a level without pools
_TARGET = 2 * 132   # programs per level worth keeping (two per SM of an H100) before packing planes
_SUM_BLOCK = 1024   # lanes of the partial-sum kernel
_NUM_WARPS = 4


@triton.jit
def _bin_membership(L: tl.constexpr, A, pos):
    """[L, len(pos)] 0/1 matrix: bin i of adaptive pooling to L covers position pos[j]."""
    i = tl.arange(0, L)
    start = (i * A) // L
    end = ((i + 1) * A + L - 1) // L
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside


@triton.jit
def _bin_area(L: tl.constexpr, H, W):
    """[L, L] number of elements of each bin (rows x cols)."""
    i = tl.arange(0, L)
    rows = ((i + 1) * H + L - 1) // L - (i * H) // L
    cols = ((i + 1) * W + L - 1) // L - (i * W) // L
    return rows[:, None].to(tl.float32) * cols[None, :].to(tl.float32)


@triton.jit
def _bin_sums(d, rows, cols, H, W, L: tl.constexpr):
    """[PB, L, L] sums of the [PB, BH, BW] tile d over each bin (S = R d C^T per plane)."""
    cm = _bin_membership(L, W, cols).to(d.dtype)  # [L, BW]
    rm = _bin_membership(L, H, rows).to(d.dtype)  # [L, BH]
    t = tl.sum(d[:, :, None, :] * cm[None, None, :, :], axis=3)  # [PB, BH, L]
    return tl.sum(rm[None, :, :, None] * t[:, None, :, :], axis=2)  # [PB, L, L]


@triton.jit
def _bin_scatter(q, rows, cols, H, W, L: tl.constexpr):
    """[PB, BH, BW] value at each element of the sum of q [PB, L, L] over the bins covering it."""
    cm = _bin_membership(L, W, cols).to(q.dtype)  # [L, BW]
    rm = _bin_membership(L, H, rows).to(q.dtype)  # [L, BH]
    u = tl.sum(rm[None, :, :, None] * q[:, :, None, :], axis=1)  # [PB, BH, L]
    return tl.sum(u[:, :, :, None] * cm[None, None, :, :], axis=2)  # [PB, BH, BW]


@triton.jit
def _tile_offsets(planes, rows, cols, H, W, n_planes, ALIGN: tl.constexpr):
    """(offsets, mask) of the [PB, BH, BW] tile of planes x rows x cols (int64 offsets)."""
    row_start = planes[:, None, None].to(tl.int64) * H * W + rows[None, :, None].to(tl.int64) * W
    if ALIGN > 1:
        row_start = tl.multiple_of(row_start, (ALIGN, ALIGN, ALIGN))
    offs = row_start + cols[None, None, :]
    mask = (planes[:, None, None] < n_planes) & (rows[None, :, None] < H) & (cols[None, None, :] < W)
    return offs, mask


@triton.jit
def _load_diff(fs_ptr, ft_ptr, offs, mask, ACC: tl.constexpr):
    """d = fs - ft at offs in the accumulation dtype (0 where masked)."""
    fs = tl.load(fs_ptr + offs, mask=mask, other=0.0).to(ACC)
    ft = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(ACC)
    return fs - ft


@triton.jit
def _plane_sums(fs_ptr, ft_ptr, planes, n_planes, H, W, NPOOL: tl.constexpr, ACC: tl.constexpr,
                PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr):
    """Per plane of the tile: (sum d^2 [PB], S_4 [PB,4,4], S_2 [PB,2,2], S_1 [PB,1,1])."""
    cols = tl.arange(0, BW)
    sq = tl.zeros([PB, BH, BW], ACC)
    s4 = tl.zeros([PB, 4, 4], ACC)
    s2 = tl.zeros([PB, 2, 2], ACC)
    s1 = tl.zeros([PB, 1, 1], ACC)
    for r0 in range(0, H, BH):
        rows = r0 + tl.arange(0, BH)
        offs, mask = _tile_offsets(planes, rows, cols, H, W, n_planes, ALIGN)
        d = _load_diff(fs_ptr, ft_ptr, offs, mask, ACC)
        sq += d * d
        if NPOOL >= 3:
            s4 += _bin_sums(d, rows, cols, H, W, 4)
        if NPOOL >= 2:
            s2 += _bin_sums(d, rows, cols, H, W, 2)
        if NPOOL >= 1:
            s1 += _bin_sums(d, rows, cols, H, W, 1)
    return tl.sum(tl.sum(sq, axis=2), axis=1), s4, s2, s1


@triton.jit
def _pool_term(s, L: tl.constexpr, H, W, ACC: tl.constexpr):
    """[PB] sum over bins of (S_l / area_l)^2."""
    p = s / _bin_area(L, H, W).to(ACC)[None, :, :]
    return tl.sum(tl.sum(p * p, axis=2), axis=1)


@triton.jit
def _c0(head, tail, ACC: tl.constexpr):
    return (tl.zeros([], ACC) + head) + tail


@triton.jit
def _level_fwd(fs_ptr, ft_ptr, j, n_planes, n_elems, H, W, r4, r2, r1, NPOOL: tl.constexpr, ACC: tl.constexpr,
               PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr):
    """Loss / c0 of program j of one level (PB planes, or a flat block when NPOOL == 0)."""
    if NPOOL == 0:  # no pools: sum of squares over a contiguous block of the level
        offs = j.to(tl.int64) * (BH * BW) + tl.arange(0, BH * BW)
        d = _load_diff(fs_ptr, ft_ptr, offs, offs < n_elems, ACC)
        total = tl.sum(d * d, axis=0)
    else:
        planes = j.to(tl.int64) * PB + tl.arange(0, PB)
        sq, s4, s2, s1 = _plane_sums(fs_ptr, ft_ptr, planes, n_planes, H, W, NPOOL, ACC, PB, BH, BW, ALIGN)
        per_plane = sq
        if NPOOL >= 3:
            per_plane += r4 * _pool_term(s4, 4, H, W, ACC)
        if NPOOL >= 2:
            per_plane += r2 * _pool_term(s2, 2, H, W, ACC)
        if NPOOL >= 1:
            per_plane += r1 * _pool_term(s1, 1, H, W, ACC)
        total = tl.sum(per_plane, axis=0)
    return total


@triton.jit
def _hcl_fwd_kernel(fs, ft, partial_ptr, starts, n_planes, n_elems, hs, ws, r4, r2, r1, c0_head, c0_tail,
                    NLEV: tl.constexpr, NPOOL: tl.constexpr, PB: tl.constexpr, BH: tl.constexpr,
                    BW: tl.constexpr, ALIGN: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr):
    """partial[pid] = c0 * (loss / c0 of the planes of program pid); levels in a table of tuples."""
    pid = tl.program_id(0)
    for i in tl.static_range(NLEV):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            total = _level_fwd(fs[i], ft[i], pid - starts[i], n_planes[i], n_elems[i], hs[i], ws[i], r4[i], r2[i], r1[i],
                               NPOOL[i], ACC, PB[i], BH[i], BW[i], ALIGN[i])
            tl.store(partial_ptr + pid, total * _c0(c0_head[i], c0_tail[i], ACC))


@triton.jit
def _sum_kernel(partial_ptr, out_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[0] = sum of partial[:n] (one program; lanes then a tree, a fixed order), in out's dtype."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for k in range(0, n, BLOCK):
        acc += tl.load(partial_ptr + k + lanes, mask=k + lanes < n, other=0.0).to(ACC)
    tl.store(out_ptr, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _grad_tile(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL: tl.constexpr):
    """Gradient of one [PB, BH, BW] tile; q_l = r_l*S_l/area_l^2 [PB, l, l], gs = 2*c0*grad_output."""
    grad = d
    if NPOOL >= 3:
        grad += _bin_scatter(q4, rows, cols, H, W, 4)
    if NPOOL >= 2:
        grad += _bin_scatter(q2, rows, cols, H, W, 2)
    if NPOOL >= 1:
        grad += _bin_scatter(q1, rows, cols, H, W, 1)
    return grad * gs


@triton.jit
def _level_bwd(fs_ptr, ft_ptr, grad_ptr, j, n_planes, n_elems, H, W, r4, r2, r1, gs, NPOOL: tl.constexpr,
               ACC: tl.constexpr, PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr,
               SINGLE: tl.constexpr):
    out_ty = grad_ptr.dtype.element_ty
    if NPOOL == 0:
        offs = j.to(tl.int64) * (BH * BW) + tl.arange(0, BH * BW)
        mask = offs < n_elems
        d = _load_diff(fs_ptr, ft_ptr, offs, mask, ACC)
        tl.store(grad_ptr + offs, (d * gs).to(out_ty), mask=mask)
    else:
        planes = j.to(tl.int64) * PB + tl.arange(0, PB)
        cols = tl.arange(0, BW)
        if SINGLE:  # the whole plane is one tile (BH >= H): read it once, keep it in registers
            rows = tl.arange(0, BH)
            offs, mask = _tile_offsets(planes, rows, cols, H, W, n_planes, ALIGN)
            d = _load_diff(fs_ptr, ft_ptr, offs, mask, ACC)
            s4 = tl.zeros([PB, 4, 4], ACC)
            s2 = tl.zeros([PB, 2, 2], ACC)
            s1 = tl.zeros([PB, 1, 1], ACC)
            if NPOOL >= 3:
                s4 = _bin_sums(d, rows, cols, H, W, 4)
            if NPOOL >= 2:
                s2 = _bin_sums(d, rows, cols, H, W, 2)
            if NPOOL >= 1:
                s1 = _bin_sums(d, rows, cols, H, W, 1)
        else:
            _, s4, s2, s1 = _plane_sums(fs_ptr, ft_ptr, planes, n_planes, H, W, NPOOL, ACC, PB, BH, BW, ALIGN)
        a4 = _bin_area(4, H, W).to(ACC)[None, :, :]
        a2 = _bin_area(2, H, W).to(ACC)[None, :, :]
        a1 = _bin_area(1, H, W).to(ACC)[None, :, :]
        q4 = r4 * s4 / (a4 * a4)
        q2 = r2 * s2 / (a2 * a2)
        q1 = r1 * s1 / (a1 * a1)
        if SINGLE:
            grad = _grad_tile(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL)
            tl.store(grad_ptr + offs, grad.to(out_ty), mask=mask)
        else:
            for r0 in range(0, H, BH):
                rows = r0 + tl.arange(0, BH)
                offs, mask = _tile_offsets(planes, rows, cols, H, W, n_planes, ALIGN)
                d = _load_diff(fs_ptr, ft_ptr, offs, mask, ACC)
                grad = _grad_tile(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL)
                tl.store(grad_ptr + offs, grad.to(out_ty), mask=mask)


@triton.jit
def _hcl_bwd_kernel(fs, ft, grads, g_ptr, starts, n_planes, n_elems, hs, ws, r4, r2, r1, c0_head, c0_tail,
                    NLEV: tl.constexpr, NPOOL: tl.constexpr, PB: tl.constexpr, BH: tl.constexpr,
                    BW: tl.constexpr, ALIGN: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr):
    """grads[i] = d loss / d fs[i] * grad_output (g_ptr: the 0-dim grad_output, any float dtype)."""
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(ACC)
    for i in tl.static_range(NLEV):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            gs = 2.0 * g * _c0(c0_head[i], c0_tail[i], ACC)
            _level_bwd(fs[i], ft[i], grads[i], pid - starts[i], n_planes[i], n_elems[i], hs[i], ws[i], r4[i], r2[i], r1[i],
                       gs, NPOOL[i], ACC, PB[i], BH[i], BW[i], ALIGN[i], SINGLE[i])


def _check_plane(H: int, W: int) -> None:
    if H >= 2**28 or W >= 2**28 or H * W >= 2**31:
        raise ValueError(f"hcl_loss: a {H} x {W} plane is too large; one plane must have fewer than "
                         f"2^31 elements and H, W < 2^28")


def level_config(shape: Sequence[int], npool: int) -> Tuple[int, int, int, int, int]:
    """(programs, PB, BLOCK_H, BLOCK_W, ALIGN) of one (N, C, H, W) level; shapes only.

    Without pools the level is flat: programs of BLOCK_H * BLOCK_W contiguous
    elements (BLOCK_H = 1). Otherwise PB planes of BLOCK_H x BLOCK_W per tile.
    """
    n, c, h, w = shape
    planes = n * c
    if npool == 0:
        block = min(_FLAT, triton.next_power_of_2(planes * h * w))
        return triton.cdiv(planes * h * w, block), 1, 1, block, 1
    bw = triton.next_power_of_2(w)
    bh = min(triton.next_power_of_2(h), max(1, _TILE // bw))
    pb = 1
    if bh >= h:  # whole planes per tile: pack planes while the level keeps enough programs
        while pb * 2 * bh * bw <= _TILE and triton.cdiv(planes, pb * 2) >= _TARGET:
            pb *= 2
    align = 4 if w % 4 == 0 else (2 if w % 2 == 0 else 1)
    return triton.cdiv(planes, pb), pb, bh, bw, align


def _ratios(pools: Sequence[int], ratios: Sequence[float]):
    by_size = dict(zip(pools, ratios))
    return by_size.get(4, 0.0), by_size.get(2, 0.0), by_size.get(1, 0.0)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_table(fs: List[torch.Tensor], ft: List[torch.Tensor], plans) -> Tuple[int, tuple, dict]:
    """(grid size, level-table arguments, constexprs) of one launch over these levels.

    ``plans``: per level (pools, ratios r_l, c0) as ``kdkernels.ops.hcl.level_plan`` gives.
    """
    starts, n_planes, n_elems, hs, ws, r4s, r2s, r1s, heads, tails = [0], [], [], [], [], [], [], [], [], []
    npool, pbs, bhs, bws, aligns, singles = [], [], [], [], [], []
    for f, (pools, ratios, c0) in zip(fs, plans):
        n, c, h, w = f.shape
        _check_plane(h, w)
        progs, pb, bh, bw, align = level_config(f.shape, len(pools))
        r4, r2, r1 = _ratios(pools, ratios)
        head, tail = f32_split(c0)
        starts.append(starts[-1] + progs)
        for lst, v in ((n_planes, n * c), (n_elems, n * c * h * w), (hs, h), (ws, w), (r4s, r4), (r2s, r2), (r1s, r1), (heads, head),
                       (tails, tail), (npool, len(pools)), (pbs, pb), (bhs, bh), (bws, bw), (aligns, align),
                       (singles, bh >= h)):
            lst.append(v)
    args = tuple(tuple(x) for x in (starts, n_planes, n_elems, hs, ws, r4s, r2s, r1s, heads, tails))
    consts = dict(NLEV=len(fs), NPOOL=tuple(npool), PB=tuple(pbs), BH=tuple(bhs), BW=tuple(bws),
                  ALIGN=tuple(aligns), SINGLE=tuple(singles), ACC=_acc(fs[0].dtype))
    return starts[-1], args, consts


def _groups(n: int):
    return [range(k, min(k + MAX_LEVELS, n)) for k in range(0, n, MAX_LEVELS)]


def hcl_fwd(fs: List[torch.Tensor], ft: List[torch.Tensor], plans) -> torch.Tensor:
    """0-dim loss in the accumulation dtype (float32; float64 for float64) of contiguous NCHW levels: one launch per MAX_LEVELS levels, then one sum."""
    tables = [launch_table([fs[i] for i in grp], [ft[i] for i in grp], [plans[i] for i in grp])
              for grp in _groups(len(fs))]
    acc_t = torch.float64 if fs[0].dtype == torch.float64 else torch.float32
    total = sum(t[0] for t in tables)
    partial = torch.empty(total, dtype=acc_t, device=fs[0].device)
    offset = 0
    for grp, (grid, args, consts) in zip(_groups(len(fs)), tables):
        _hcl_fwd_kernel[(grid,)](tuple(fs[i] for i in grp), tuple(ft[i] for i in grp), partial[offset:],
                                 *args, **consts, num_warps=_NUM_WARPS)
        launch_counts["hcl_fwd"] += 1
        offset += grid
    loss = torch.empty((), dtype=acc_t, device=fs[0].device)
    _sum_kernel[(1,)](partial, loss, total, ACC=_acc(fs[0].dtype), BLOCK=_SUM_BLOCK, num_warps=_NUM_WARPS)
    launch_counts["hcl_sum"] += 1
    return loss


def hcl_bwd(grad: torch.Tensor, fs: List[torch.Tensor], ft: List[torch.Tensor], plans) -> List[torch.Tensor]:
    """d loss / d fs[k] * grad for every level (grad: the 0-dim grad_output): one launch per MAX_LEVELS."""
    out = [torch.empty_like(f) for f in fs]
    for grp in _groups(len(fs)):
        grid, args, consts = launch_table([fs[i] for i in grp], [ft[i] for i in grp], [plans[i] for i in grp])
        _hcl_bwd_kernel[(grid,)](tuple(fs[i] for i in grp), tuple(ft[i] for i in grp),
                                 tuple(out[i] for i in grp), grad, *args, **consts, num_warps=_NUM_WARPS)
        launch_counts["hcl_bwd"] += 1
    return out
