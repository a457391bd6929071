r"""Triton kernels of the hierarchical context loss (SPEC section 1).

One program per (n, c) plane of one level. With d = fs - ft on the plane
(H x W) and, for each kept pool size l, the adaptive-pool bin sums
S_l[i, k] = sum of d over rows [r0_i, r1_i) x cols [c0_k, c1_k) (bins may
overlap), the plane's share of the loss is

    loss_plane = c0 * ( sum(d^2) + sum_l r_l * sum_{i,k} (S_l[i,k] / area_l[i,k])^2 )

with c0 = 1/(tot*N*C*H*W) and r_l = c_l/c0 = w_l*H*W/l^2, where c_l = w_l/(tot*N*C*l^2).
The kernels get r_l (a power of two times an integer: exact in fp32, unlike
c0, which Triton would round to fp32 even for fp64 inputs); the host applies
c0 in the accumulation dtype. The gradient is

    dL/dd[r, c] = 2*c0 * ( d[r, c] + sum_l r_l * sum_{bins (i,k) covering (r,c)} S_l[i,k] / area_l[i,k]^2 ).

Bin sums are separable: with 0/1 membership matrices R_l (l x H) and
C_l (l x W), S_l = R_l d C_l^T and the scatter back is R_l^T (S/area^2) C_l.
Both are evaluated as broadcast-multiply-reduce over tiny l (4, 2, 1), which
costs about 7 multiply-adds per element in total. Planes that fit one tile
(BLOCK_H >= H) are read once per pass; larger planes are walked in row chunks
(the backward then reads the plane twice, the second time from L2).

Index widths: the plane id is cast to int64 before it multiplies H*W, and row
offsets inside the plane are int64 too, so N*C*H*W may pass 2^31. The bin
edges (i*A // L, ((i+1)*A + L - 1) // L for A = H or W) stay int32: the host
keeps H, W < 2^28 (_check_plane, the same limits as csrc/common/hcl.h), so
4*A + 3 cannot wrap.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import launch_counts

_MAX_TILE = 2048  # elements of one row chunk held by a program


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
    """[L, L] sums of the [BH, BW] chunk d over each bin (S = R d C^T)."""
    cm = _bin_membership(L, W, cols).to(d.dtype)  # [L, BW]
    rm = _bin_membership(L, H, rows).to(d.dtype)  # [L, BH]
    t = tl.sum(d[:, None, :] * cm[None, :, :], axis=2)  # [BH, L]
    return tl.sum(rm[:, :, None] * t[None, :, :], axis=1)  # [L, L]


@triton.jit
def _bin_scatter(q, rows, cols, H, W, L: tl.constexpr):
    """[BH, BW] value at each element of sum of q over the bins covering it (R^T q C)."""
    cm = _bin_membership(L, W, cols).to(q.dtype)  # [L, BW]
    rm = _bin_membership(L, H, rows).to(q.dtype)  # [L, BH]
    u = tl.sum(rm[:, :, None] * q[:, None, :], axis=0)  # [BH, L]
    return tl.sum(u[:, :, None] * cm[None, :, :], axis=1)  # [BH, BW]


@triton.jit
def _load_diff(fs_ptr, ft_ptr, base, rows, cols, H, W, ACC: tl.constexpr):
    """[BH, BW] chunk of d = fs - ft in the accumulation dtype (0 outside the plane)."""
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    offs = base + rows[:, None].to(tl.int64) * W + cols[None, :]
    fs = tl.load(fs_ptr + offs, mask=mask, other=0.0).to(ACC)
    ft = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(ACC)
    return fs - ft


@triton.jit
def _hcl_fwd_kernel(
    fs_ptr, ft_ptr, partial_ptr, H, W, r4, r2, r1,
    NPOOL: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    base = plane * H * W
    cols = tl.arange(0, BLOCK_W)
    sq = tl.zeros([BLOCK_H, BLOCK_W], ACC)
    s4 = tl.zeros([4, 4], ACC)
    s2 = tl.zeros([2, 2], ACC)
    s1 = tl.zeros([1, 1], ACC)
    for r0 in range(0, H, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        d = _load_diff(fs_ptr, ft_ptr, base, rows, cols, H, W, ACC)
        sq += d * d
        if NPOOL >= 3:
            s4 += _bin_sums(d, rows, cols, H, W, 4)
        if NPOOL >= 2:
            s2 += _bin_sums(d, rows, cols, H, W, 2)
        if NPOOL >= 1:
            s1 += _bin_sums(d, rows, cols, H, W, 1)
    total = tl.sum(tl.sum(sq, axis=1), axis=0)
    if NPOOL >= 3:
        p4 = s4 / _bin_area(4, H, W).to(ACC)
        total += r4 * tl.sum(tl.sum(p4 * p4, axis=1), axis=0)
    if NPOOL >= 2:
        p2 = s2 / _bin_area(2, H, W).to(ACC)
        total += r2 * tl.sum(tl.sum(p2 * p2, axis=1), axis=0)
    if NPOOL >= 1:
        p1 = s1 / _bin_area(1, H, W).to(ACC)
        total += r1 * tl.sum(tl.sum(p1 * p1, axis=1), axis=0)
    tl.store(partial_ptr + plane, total)


@triton.jit
def _hcl_grad_chunk(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL: tl.constexpr):
    """Gradient of one [BH, BW] chunk; q_l = r_l*S_l/area_l^2, gs = grad_output*2*c0."""
    grad = d
    if NPOOL >= 3:
        grad += _bin_scatter(q4, rows, cols, H, W, 4)
    if NPOOL >= 2:
        grad += _bin_scatter(q2, rows, cols, H, W, 2)
    if NPOOL >= 1:
        grad += _bin_scatter(q1, rows, cols, H, W, 1)
    return grad * gs


@triton.jit
def _hcl_bwd_kernel(
    fs_ptr, ft_ptr, g_ptr, grad_ptr, H, W, r4, r2, r1,
    NPOOL: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    SINGLE: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    base = plane * H * W
    cols = tl.arange(0, BLOCK_W)
    gs = 2.0 * tl.load(g_ptr).to(ACC)
    s4 = tl.zeros([4, 4], ACC)
    s2 = tl.zeros([2, 2], ACC)
    s1 = tl.zeros([1, 1], ACC)
    if SINGLE:
        # the whole plane is one chunk: read it once, keep it in registers
        rows = tl.arange(0, BLOCK_H)
        d = _load_diff(fs_ptr, ft_ptr, base, rows, cols, H, W, ACC)
        if NPOOL >= 3:
            s4 = _bin_sums(d, rows, cols, H, W, 4)
        if NPOOL >= 2:
            s2 = _bin_sums(d, rows, cols, H, W, 2)
        if NPOOL >= 1:
            s1 = _bin_sums(d, rows, cols, H, W, 1)
    else:
        for r0 in range(0, H, BLOCK_H):
            rows = r0 + tl.arange(0, BLOCK_H)
            d = _load_diff(fs_ptr, ft_ptr, base, rows, cols, H, W, ACC)
            if NPOOL >= 3:
                s4 += _bin_sums(d, rows, cols, H, W, 4)
            if NPOOL >= 2:
                s2 += _bin_sums(d, rows, cols, H, W, 2)
            if NPOOL >= 1:
                s1 += _bin_sums(d, rows, cols, H, W, 1)
    a4 = _bin_area(4, H, W).to(ACC)
    a2 = _bin_area(2, H, W).to(ACC)
    a1 = _bin_area(1, H, W).to(ACC)
    q4 = r4 * s4 / (a4 * a4)
    q2 = r2 * s2 / (a2 * a2)
    q1 = r1 * s1 / (a1 * a1)
    if SINGLE:
        rows = tl.arange(0, BLOCK_H)
        grad = _hcl_grad_chunk(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL)
        mask = (rows[:, None] < H) & (cols[None, :] < W)
        offs = base + rows[:, None].to(tl.int64) * W + cols[None, :]
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        for r0 in range(0, H, BLOCK_H):
            rows = r0 + tl.arange(0, BLOCK_H)
            d = _load_diff(fs_ptr, ft_ptr, base, rows, cols, H, W, ACC)
            grad = _hcl_grad_chunk(d, rows, cols, H, W, q4, q2, q1, gs, NPOOL)
            mask = (rows[:, None] < H) & (cols[None, :] < W)
            offs = base + rows[:, None].to(tl.int64) * W + cols[None, :]
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _check_plane(H: int, W: int) -> None:
    if H >= 2**28 or W >= 2**28 or H * W >= 2**31:
        raise ValueError(f"hcl_loss: a {H} x {W} plane is too large; one plane must have fewer than "
                         f"2^31 elements and H, W < 2^28")


def _launch_config(H: int, W: int, dtype: torch.dtype):
    block_w = triton.next_power_of_2(W)
    block_h = min(triton.next_power_of_2(H), max(1, _MAX_TILE // block_w))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    num_warps = 1 if block_h * block_w <= 256 else (4 if block_h * block_w <= 1024 else 8)
    return block_h, block_w, acc, num_warps


def _ratios(pools: Sequence[int], ratios: Sequence[float]):
    by_size = dict(zip(pools, ratios))
    return by_size.get(4, 0.0), by_size.get(2, 0.0), by_size.get(1, 0.0)


def hcl_fwd(fs: torch.Tensor, ft: torch.Tensor, partial: torch.Tensor,
            pools: Sequence[int], ratios: Sequence[float]) -> None:
    """Write each plane's loss / c0 into ``partial`` (N*C,); fs, ft contiguous NCHW."""
    n, c, h, w = fs.shape
    _check_plane(h, w)
    block_h, block_w, acc, num_warps = _launch_config(h, w, fs.dtype)
    r4, r2, r1 = _ratios(pools, ratios)
    _hcl_fwd_kernel[(n * c,)](
        fs, ft, partial, h, w, r4, r2, r1,
        NPOOL=len(pools), ACC=acc, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps,
    )
    launch_counts["hcl_fwd"] += 1


def hcl_bwd(fs: torch.Tensor, ft: torch.Tensor, g: torch.Tensor, grad: torch.Tensor,
            pools: Sequence[int], ratios: Sequence[float]) -> None:
    """Write d(loss)/d(fs) into ``grad``; ``g`` (1,) holds grad_output * c0."""
    n, c, h, w = fs.shape
    _check_plane(h, w)
    block_h, block_w, acc, num_warps = _launch_config(h, w, fs.dtype)
    r4, r2, r1 = _ratios(pools, ratios)
    _hcl_bwd_kernel[(n * c,)](
        fs, ft, g, grad, h, w, r4, r2, r1,
        NPOOL=len(pools), ACC=acc, BLOCK_H=block_h, BLOCK_W=block_w, SINGLE=block_h >= h,
        num_warps=num_warps,
    )
    launch_counts["hcl_bwd"] += 1
