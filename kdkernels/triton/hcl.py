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
blocks.

Vector loads. A 16-byte access holds VEC = 16 / element size elements (4 fp32,
8 fp16/bf16, 2 fp64). Two layouts keep every access of the feature data 16
bytes wide when the level's pointers are 16-byte aligned (the launcher checks
data_ptr(); Triton specialises the kernel on it):

- rows (W a multiple of VEC: 8, 16, 28, 32, 56 in fp32): the row starts are
  declared multiples of VEC and the mask constant over VEC columns, so each
  row loads as W / VEC vectors.
- flat (other widths, whole planes per tile: 7 x 7, 14 x 14): a group of
  G = VEC / gcd(H*W, VEC) consecutive planes is contiguous and starts on a
  16-byte boundary (4 planes of 49 fp32, 1 of 196), so a program's PB planes
  (PB a multiple of G) are loaded as one flat block of vectors and regrouped
  into the [PB, BLOCK_H, BLOCK_W] tile with tl.gather (the gradient goes back
  through the inverse gather and a flat vector store).

A level whose element count is not a multiple of VEC (a plane count that is
not a multiple of G) loads its last < VEC elements through a second, scalar
load (the constexpr TAIL; never at the benchmark shapes, whose N*C are
multiples of 64). Rows of other widths in planes larger than one tile, and
misaligned pointers (a view with a storage offset), take the rows layout with
the alignment W allows (down to scalar loads). Triton gives each thread
min(VEC, block / (32 * num_warps)) consecutive elements, so a program whose
block is under 512 fp32 elements (a level of few planes, where the planner
keeps programs to fill the GPU rather than packing planes) loads 8- or
4-byte pieces; every benchmark level's block is 512 elements or more.

Bin sums are separable: with 0/1 membership matrices R_l (l x H) and C_l
(l x W), S_l = R_l d C_l^T and the scatter back is R_l^T (S/area^2) C_l, both
evaluated as broadcast-multiply-reduce over tiny l (4, 2, 1).

c0 enters the kernels as two float32 scalars (head + tail, see _host.py): their
sum in the accumulation dtype is c0 to ~2^-48, which keeps float64 inputs at
float64 accuracy although Triton passes Python floats as float32.

Index widths: plane ids are int64 before they multiply H*W, and row offsets
inside the plane are int64 too, so N*C*H*W may pass 2^31; the flat layout's
block start is int64 and its gather indices stay inside one program's block
(< PB * BLOCK_H * BLOCK_W elements, int32). The bin edges
(i*A // L, ((i+1)*A + L - 1) // L for A = H or W) stay int32: the host keeps
H, W < 2^28 (_check_plane, the same limits as csrc/common/hcl.h), so 4*A + 3
cannot wrap.
"""
from __future__ import annotations

import math
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
    offs = row_start + cols[None, None, :]
    mask = (planes[:, None, None] < n_planes) & (rows[None, :, None] < H) & (cols[None, None, :] < W)
    if ALIGN > 1:  # W % ALIGN == 0: rows start on ALIGN elements and the mask changes only at W
        offs = tl.multiple_of(row_start, (ALIGN, ALIGN, ALIGN)) + cols[None, None, :]
        mask = tl.max_constancy(mask, (1, 1, ALIGN))
    return offs, mask


@triton.jit
def _flat_block(j, H, W, PB: tl.constexpr, FB: tl.constexpr, VEC: tl.constexpr):
    """(offsets [FB] int64, inside [FB]) of the PB consecutive planes of program j as one flat
    block (PB * H * W is a multiple of VEC: the host makes PB a multiple of G)."""
    base = tl.multiple_of(j.to(tl.int64) * PB * H * W, VEC)
    local = tl.arange(0, FB)
    return base + local, local < PB * H * W


@triton.jit
def _load_flat(ptr, offs, inside, n_elems, VEC: tl.constexpr, TAIL: tl.constexpr, ACC: tl.constexpr):
    """ptr[offs] where inside and offs < n_elems, else 0, in ACC: VEC-element vectors up to the
    last multiple of VEC of the level, the TAIL (< VEC elements) through a second load."""
    n_vec = (n_elems // VEC) * VEC
    x = tl.load(ptr + offs, mask=tl.max_constancy(inside & (offs < n_vec), (VEC,)), other=0.0).to(ACC)
    if TAIL:
        x += tl.load(ptr + offs, mask=inside & (offs >= n_vec) & (offs < n_elems), other=0.0).to(ACC)
    return x


@triton.jit
def _store_flat(ptr, offs, x, inside, n_elems, VEC: tl.constexpr, TAIL: tl.constexpr):
    """ptr[offs] = x where inside and offs < n_elems (vectors, then the TAIL as _load_flat)."""
    n_vec = (n_elems // VEC) * VEC
    tl.store(ptr + offs, x, mask=tl.max_constancy(inside & (offs < n_vec), (VEC,)))
    if TAIL:
        tl.store(ptr + offs, x, mask=inside & (offs >= n_vec) & (offs < n_elems))


@triton.jit
def _flat_to_tile(x, H, W, PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """[PB, BH, BW] tile of the flat block x [FB] of PB planes (0 outside the H x W planes)."""
    t = tl.arange(0, PB * BH * BW)
    r = (t // BW) % BH
    c = t % BW
    inside = (r < H) & (c < W)
    v = tl.gather(x, tl.where(inside, (t // (BH * BW)) * (H * W) + r * W + c, 0), 0)
    return tl.reshape(tl.where(inside, v, 0.0), [PB, BH, BW])


@triton.jit
def _tile_to_flat(g, H, W, PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, FB: tl.constexpr):
    """The flat block [FB] of PB planes from their [PB, BH, BW] tile g (the inverse of _flat_to_tile)."""
    e = tl.arange(0, FB)
    q = e % (H * W)
    idx = (e // (H * W)) * (BH * BW) + (q // W) * BW + q % W
    return tl.gather(tl.reshape(g, [PB * BH * BW]), tl.where(e < PB * H * W, idx, 0), 0)


@triton.jit
def _flat_diff(fs_ptr, ft_ptr, j, n_elems, H, W, ACC: tl.constexpr, PB: tl.constexpr, BH: tl.constexpr,
               BW: tl.constexpr, FB: tl.constexpr, VEC: tl.constexpr, TAIL: tl.constexpr):
    """d = fs - ft of program j's PB planes as a [PB, BH, BW] tile, loaded as one flat block."""
    offs, inside = _flat_block(j, H, W, PB, FB, VEC)
    d = _load_flat(fs_ptr, offs, inside, n_elems, VEC, TAIL, ACC) - _load_flat(ft_ptr, offs, inside, n_elems, VEC,
                                                                                 TAIL, ACC)
    return _flat_to_tile(d, H, W, PB, BH, BW)


@triton.jit
def _load_diff(fs_ptr, ft_ptr, offs, mask, ACC: tl.constexpr):
    """d = fs - ft at offs in the accumulation dtype (0 where masked)."""
    fs = tl.load(fs_ptr + offs, mask=mask, other=0.0).to(ACC)
    ft = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(ACC)
    return fs - ft


@triton.jit
def _plane_sums(fs_ptr, ft_ptr, j, planes, n_planes, n_elems, H, W, NPOOL: tl.constexpr, ACC: tl.constexpr,
                PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr, FLAT: tl.constexpr,
                FB: tl.constexpr, VEC: tl.constexpr, TAIL: tl.constexpr):
    """Per plane of the tile: (sum d^2 [PB], S_4 [PB,4,4], S_2 [PB,2,2], S_1 [PB,1,1]).
    FLAT: program j's planes are one tile (BH >= H), loaded as a flat block."""
    cols = tl.arange(0, BW)
    sq = tl.zeros([PB, BH, BW], ACC)
    s4 = tl.zeros([PB, 4, 4], ACC)
    s2 = tl.zeros([PB, 2, 2], ACC)
    s1 = tl.zeros([PB, 1, 1], ACC)
    for r0 in range(0, H, BH):
        rows = r0 + tl.arange(0, BH)
        if FLAT:
            d = _flat_diff(fs_ptr, ft_ptr, j, n_elems, H, W, ACC, PB, BH, BW, FB, VEC, TAIL)
        else:
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
               PB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr, FLAT: tl.constexpr,
               FB: tl.constexpr, VEC: tl.constexpr, TAIL: tl.constexpr):
    """Loss / c0 of program j of one level (PB planes, or a flat block when NPOOL == 0)."""
    if NPOOL == 0:  # no pools: sum of squares over a contiguous block of the level
        offs, inside = _flat_block(j, 1, 1, BH * BW, BH * BW, VEC)
        d = _load_flat(fs_ptr, offs, inside, n_elems, VEC, TAIL, ACC) - _load_flat(ft_ptr, offs, inside, n_elems,
                                                                                     VEC, TAIL, ACC)
        total = tl.sum(d * d, axis=0)
    else:
        planes = j.to(tl.int64) * PB + tl.arange(0, PB)
        sq, s4, s2, s1 = _plane_sums(fs_ptr, ft_ptr, j, planes, n_planes, n_elems, H, W, NPOOL, ACC, PB, BH, BW, ALIGN,
                                     FLAT, FB, VEC, TAIL)
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
                    BW: tl.constexpr, ALIGN: tl.constexpr, SINGLE: tl.constexpr, FLAT: tl.constexpr,
                    FB: tl.constexpr, TAIL: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    """partial[pid] = c0 * (loss / c0 of the planes of program pid); levels in a table of tuples."""
    pid = tl.program_id(0)
    for i in tl.static_range(NLEV):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            total = _level_fwd(fs[i], ft[i], pid - starts[i], n_planes[i], n_elems[i], hs[i], ws[i], r4[i], r2[i], r1[i],
                               NPOOL[i], ACC, PB[i], BH[i], BW[i], ALIGN[i], FLAT[i], FB[i], VEC, TAIL[i])
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
               SINGLE: tl.constexpr, FLAT: tl.constexpr, FB: tl.constexpr, VEC: tl.constexpr, TAIL: tl.constexpr):
    out_ty = grad_ptr.dtype.element_ty
    if NPOOL == 0:
        offs, inside = _flat_block(j, 1, 1, BH * BW, BH * BW, VEC)
        d = _load_flat(fs_ptr, offs, inside, n_elems, VEC, TAIL, ACC) - _load_flat(ft_ptr, offs, inside, n_elems,
                                                                                     VEC, TAIL, ACC)
        _store_flat(grad_ptr, offs, (d * gs).to(out_ty), inside, n_elems, VEC, TAIL)
    else:
        planes = j.to(tl.int64) * PB + tl.arange(0, PB)
        cols = tl.arange(0, BW)
        if SINGLE:  # the whole plane is one tile (BH >= H): read it once, keep it in registers
            rows = tl.arange(0, BH)
            if FLAT:
                d = _flat_diff(fs_ptr, ft_ptr, j, n_elems, H, W, ACC, PB, BH, BW, FB, VEC, TAIL)
            else:
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
            _, s4, s2, s1 = _plane_sums(fs_ptr, ft_ptr, j, planes, n_planes, n_elems, H, W, NPOOL, ACC, PB, BH, BW,
                                        ALIGN, False, FB, VEC, TAIL)
        a4 = _bin_area(4, H, W).to(ACC)[None, :, :]
        a2 = _bin_area(2, H, W).to(ACC)[None, :, :]
        a1 = _bin_area(1, H, W).to(ACC)[None, :, :]
        q4 = r4 * s4 / (a4 * a4)
        q2 = r2 * s2 / (a2 * a2)
        q1 = r1 * s1 / (a1 * a1)
        if SINGLE:
            grad = _grad_tile(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL)
            if FLAT:
                offs, inside = _flat_block(j, H, W, PB, FB, VEC)
                _store_flat(grad_ptr, offs, _tile_to_flat(grad, H, W, PB, BH, BW, FB).to(out_ty), inside, n_elems,
                            VEC, TAIL)
            else:
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
                    BW: tl.constexpr, ALIGN: tl.constexpr, SINGLE: tl.constexpr, FLAT: tl.constexpr,
                    FB: tl.constexpr, TAIL: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    """grads[i] = d loss / d fs[i] * grad_output (g_ptr: the 0-dim grad_output, any float dtype)."""
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(ACC)
    for i in tl.static_range(NLEV):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            gs = 2.0 * g * _c0(c0_head[i], c0_tail[i], ACC)
            _level_bwd(fs[i], ft[i], grads[i], pid - starts[i], n_planes[i], n_elems[i], hs[i], ws[i], r4[i], r2[i], r1[i],
                       gs, NPOOL[i], ACC, PB[i], BH[i], BW[i], ALIGN[i], SINGLE[i], FLAT[i], FB[i], VEC, TAIL[i])


def _check_plane(H: int, W: int) -> None:
    if H >= 2**28 or W >= 2**28 or H * W >= 2**31:
        raise ValueError(f"hcl_loss: a {H} x {W} plane is too large; one plane must have fewer than "
                         f"2^31 elements and H, W < 2^28")


def _vec(elem_size: int) -> int:
    """Elements of one 16-byte access."""
    return max(1, 16 // elem_size)


def level_layout(shape: Sequence[int], npool: int, elem_size: int = 4, aligned: bool = True) -> dict:
    """The launch configuration of one (N, C, H, W) level; shapes, element size and whether the
    level's pointers are 16-byte aligned only. Keys: programs, PB, BH, BW, ALIGN, FLAT, FB, TAIL.

    Without pools the level is flat: programs of BW contiguous elements (BH = 1). Otherwise PB
    planes of BH x BW per tile. ALIGN: the row starts' declared alignment (elements, a power of
    two dividing W and VEC). FLAT (whole planes per tile, W not a multiple of VEC, aligned
    pointers): the PB planes load as one flat block of FB (a power of two >= PB*H*W) elements,
    PB a multiple of G = VEC / gcd(H*W, VEC). TAIL: N*C*H*W is not a multiple of VEC.
    """
    n, c, h, w = shape
    planes = n * c
    vec = _vec(elem_size)
    tail = (planes * h * w) % vec != 0
    if npool == 0:
        block = min(_FLAT, max(vec, triton.next_power_of_2(planes * h * w)))
        return dict(programs=triton.cdiv(planes * h * w, block), PB=1, BH=1, BW=block, ALIGN=1, FLAT=False, FB=1,
                    TAIL=tail)
    bw = triton.next_power_of_2(w)
    bh = min(triton.next_power_of_2(h), max(1, _TILE // bw))
    group = vec // math.gcd(h * w, vec)
    flat = aligned and bh >= h and w % vec != 0 and group * bh * bw <= _TILE
    pb = group if flat else 1
    if bh >= h:  # whole planes per tile: pack planes while the level keeps enough programs
        while pb * 2 * bh * bw <= _TILE and triton.cdiv(planes, pb * 2) >= _TARGET:
            pb *= 2
    return dict(programs=triton.cdiv(planes, pb), PB=pb, BH=bh, BW=bw, ALIGN=math.gcd(w, vec), FLAT=flat,
                FB=triton.next_power_of_2(pb * h * w) if flat else 1, TAIL=tail)


def _ratios(pools: Sequence[int], ratios: Sequence[float]):
    by_size = dict(zip(pools, ratios))
    return by_size.get(4, 0.0), by_size.get(2, 0.0), by_size.get(1, 0.0)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _aligned(*tensors: torch.Tensor) -> bool:
    """Every tensor starts on a 16-byte boundary (a view with a storage offset may not)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def launch_table(fs: List[torch.Tensor], ft: List[torch.Tensor], plans,
                 grads: Sequence[torch.Tensor] = ()) -> Tuple[int, tuple, dict]:
    """(grid size, level-table arguments, constexprs) of one launch over these levels.

    ``plans``: per level (pools, ratios r_l, c0) as ``kdkernels.ops.hcl.level_plan`` gives;
    ``grads``: the backward's outputs (their alignment counts too).
    """
    starts, n_planes, n_elems, hs, ws, r4s, r2s, r1s, heads, tails = [0], [], [], [], [], [], [], [], [], []
    npool, pbs, bhs, bws, aligns, singles, flats, fbs, tails_ = [], [], [], [], [], [], [], [], []
    for k, (f, (pools, ratios, c0)) in enumerate(zip(fs, plans)):
        n, c, h, w = f.shape
        _check_plane(h, w)
        lay = level_layout(f.shape, len(pools), f.element_size(),
                           _aligned(f, ft[k], *([grads[k]] if len(grads) else [])))
        progs, pb, bh, bw, align = lay["programs"], lay["PB"], lay["BH"], lay["BW"], lay["ALIGN"]
        r4, r2, r1 = _ratios(pools, ratios)
        head, tail = f32_split(c0)
        starts.append(starts[-1] + progs)
        for lst, v in ((n_planes, n * c), (n_elems, n * c * h * w), (hs, h), (ws, w), (r4s, r4), (r2s, r2), (r1s, r1), (heads, head),
                       (tails, tail), (npool, len(pools)), (pbs, pb), (bhs, bh), (bws, bw), (aligns, align),
                       (singles, bh >= h), (flats, lay["FLAT"]), (fbs, lay["FB"]), (tails_, lay["TAIL"])):
            lst.append(v)
    args = tuple(tuple(x) for x in (starts, n_planes, n_elems, hs, ws, r4s, r2s, r1s, heads, tails))
    consts = dict(NLEV=len(fs), NPOOL=tuple(npool), PB=tuple(pbs), BH=tuple(bhs), BW=tuple(bws),
                  ALIGN=tuple(aligns), SINGLE=tuple(singles), FLAT=tuple(flats), FB=tuple(fbs), TAIL=tuple(tails_),
                  VEC=_vec(fs[0].element_size()), ACC=_acc(fs[0].dtype))
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
        grid, args, consts = launch_table([fs[i] for i in grp], [ft[i] for i in grp], [plans[i] for i in grp],
                                          [out[i] for i in grp])
        _hcl_bwd_kernel[(grid,)](tuple(fs[i] for i in grp), tuple(ft[i] for i in grp),
                                 tuple(out[i] for i in grp), grad, *args, **consts, num_warps=_NUM_WARPS)
        launch_counts["hcl_bwd"] += 1
    return out
