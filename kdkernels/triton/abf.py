r"""Triton kernels of ReviewKD's ABF fusion (docs/spec.md §2, step 2).

Layout: x, out, grad_x (N, C, H, W); y, grad_y (N, C, h, w); z, da (N, 2, H, W)
in the accumulation dtype; w = att_weight viewed as (2, 2C): w[k, c] acts on x,
w[k, C + c] on u = up(y). Pixel p = (r, q) of the output reads y at
(src(r), src(q)), src(i) = min(floor(i * in/out), in - 1) in float32 (the
legacy nearest rule), so u is gathered on the fly and never stored.

Forward, per pixel:  a_k = sum_c w[k, c] x_c + w[k, C + c] u_c + b_k,  z_k = sigmoid(a_k),
                     out_c = x_c z_0 + u_c z_1.
Backward, with g = grad_out:
    s_0 = sum_c g_c x_c,  s_1 = sum_c g_c u_c,  da_k = s_k z_k (1 - z_k)
    grad_x_c = g_c z_0 + w[0, c] da_0 + w[1, c] da_1
    grad_u_c = g_c z_1 + w[0, C + c] da_0 + w[1, C + c] da_1
    grad_y[q] = sum of grad_u over the output pixels whose source is q (a gather:
                each program owns y pixels, so no atomics)
    grad_w[k, c] = sum_pixels da_k x_c,  grad_w[k, C + c] = sum_pixels da_k u_c,  grad_b[k] = sum da_k
The weight/bias sums are written as per-program partials and summed over the
programs in a fixed order by one small kernel: deterministic, no atomics.

Launches: one forward kernel; backward, the pixel kernel, the grad_y kernel and
the partial sum (autograd fills no gradient for z: it is not differentiable).
Grids: pixel tiles shrink (down to 8 pixels) until the grid has about four
programs per SM of an H100, and a backward program walks several tiles so the
partials stay few. When the whole channel range fits one tile ([C, BLOCK_P] <=
2048 elements, BLOCK_P down to 4: C <= 512) x, u (and g) are read once; beyond
that C is walked twice, the second walk mostly from L2. A 4096-element tile
spilled in the backward (three tiles live plus the weight sums) and held one
block per SM. grad_y visits only the contributing output pixels when the
upsampling factor is an exact integer on both axes (the benchmark levels), and
walks a 1 x 1 y's plane in contiguous tiles. Scales and spans are rounded to
float32 on the host in pure Python (_host.py): no tensor and no device read per
call.

Index widths: every offset that includes the sample n (n*C*H*W, the partial
slots) is formed in int64, so N*C*H*W may pass 2^31; in-sample channel offsets
(c*H*W) are int32 unless one sample's C*H*W nears 2^31 (constexpr BIG), which
keeps the backward's per-tile addresses in fewer registers. Pixel indices
inside one plane (p, q, r*W + col) stay int32: the host refuses planes of
2^31 - 2^16 or more pixels (_check_plane), so p + BLOCK and H*W never wrap.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import f32, f32_ratio as float32_ratio


@triton.jit
def _src_index(i, scale, n_in):
    """Legacy nearest: min(floor(i * scale), n_in - 1), float32 like PyTorch."""
    return tl.minimum((i.to(tl.float32) * scale).to(tl.int32), n_in - 1)


@triton.jit
def _from_source(ok, i, n_out, src, scale, n_in, MODE: tl.constexpr):
    """ok & (output index i, a candidate along one axis, lies in [0, n_out) and its nearest
    source is src). MODE 1 (exact integer factor): every candidate is, so ok unchanged."""
    if MODE == 1:
        return ok
    else:
        return ok & (i >= 0) & (i < n_out) & (_src_index(tl.maximum(i, 0), scale, n_in) == src)


@triton.jit
def _rows(c, plane, BIG: tl.constexpr):
    """[len(c), 1] offsets of channel rows c in planes of ``plane`` elements: int32 when one
    sample's C * plane fits (BIG False; fewer registers), int64 otherwise."""
    if BIG:
        return c[:, None].to(tl.int64) * plane
    else:
        return c[:, None] * plane


@triton.jit
def _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC: tl.constexpr, BIG: tl.constexpr):
    """x and u tiles [len(c), len(p)] of channels c, and their share of the two logits [len(p)]."""
    cm = c < C
    m = cm[:, None] & pm[None, :]
    xv = tl.load(xb + (_rows(c, H * W, BIG) + p[None, :]), mask=m, other=0.0).to(ACC)
    uv = tl.load(yb + (_rows(c, h * w, BIG) + q[None, :]), mask=m, other=0.0).to(ACC)
    w0x = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
    w0u = tl.load(w_ptr + C + c, mask=cm, other=0.0).to(ACC)
    w1x = tl.load(w_ptr + 2 * C + c, mask=cm, other=0.0).to(ACC)
    w1u = tl.load(w_ptr + 3 * C + c, mask=cm, other=0.0).to(ACC)
    a0 = tl.sum(w0x[:, None] * xv + w0u[:, None] * uv, axis=0)
    a1 = tl.sum(w1x[:, None] * xv + w1u[:, None] * uv, axis=0)
    return xv, uv, a0, a1


@triton.jit
def _grad_chunk(gb, xb, yb, c, p, pm, q, C, H, W, h, w, ACC: tl.constexpr, BIG: tl.constexpr):
    """g, x, u tiles of channels c and their shares of s_0 = sum g x, s_1 = sum g u."""
    m = (c < C)[:, None] & pm[None, :]
    offs = _rows(c, H * W, BIG) + p[None, :]
    gv = tl.load(gb + offs, mask=m, other=0.0).to(ACC)
    xv = tl.load(xb + offs, mask=m, other=0.0).to(ACC)
    uv = tl.load(yb + (_rows(c, h * w, BIG) + q[None, :]), mask=m, other=0.0).to(ACC)
    return gv, xv, uv, tl.sum(gv * xv, axis=0), tl.sum(gv * uv, axis=0)


@triton.jit
def _abf_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, z_ptr, C, H, W, h, w, scale_h, scale_w,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, BIG: tl.constexpr,
):
    """BLOCK_P pixels of one sample. ONE_PASS (BLOCK_C >= C): the [C, BLOCK_P] tiles
    of x and u stay in registers between the logits and the output, so x and y are
    read once; otherwise C is walked twice (the second walk mostly from L2)."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < H * W
    q = _src_index(p // W, scale_h, h) * w + _src_index(p % W, scale_w, w)
    xb = x_ptr + n * C * H * W
    yb = y_ptr + n * C * h * w
    ob = out_ptr + n * C * H * W
    if ONE_PASS:
        c = tl.arange(0, BLOCK_C)
        xv, uv, a0, a1 = _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC, BIG)
    else:
        a0 = tl.zeros([BLOCK_P], ACC)
        a1 = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            _, _, d0, d1 = _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC, BIG)
            a0 += d0
            a1 += d1
    z0 = 1.0 / (1.0 + tl.exp(-(a0 + tl.load(b_ptr).to(ACC))))
    z1 = 1.0 / (1.0 + tl.exp(-(a1 + tl.load(b_ptr + 1).to(ACC))))
    zb = z_ptr + n * 2 * H * W
    tl.store(zb + p, z0, mask=pm)
    tl.store(zb + H * W + p, z1, mask=pm)
    if ONE_PASS:
        c = tl.arange(0, BLOCK_C)
        m = (c < C)[:, None] & pm[None, :]
        res = xv * z0[None, :] + uv * z1[None, :]
        tl.store(ob + (_rows(c, H * W, BIG) + p[None, :]), res.to(out_ptr.dtype.element_ty), mask=m)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = (c < C)[:, None] & pm[None, :]
            xv = tl.load(xb + (_rows(c, H * W, BIG) + p[None, :]), mask=m, other=0.0).to(ACC)
            uv = tl.load(yb + (_rows(c, h * w, BIG) + q[None, :]), mask=m, other=0.0).to(ACC)
            res = xv * z0[None, :] + uv * z1[None, :]
            tl.store(ob + (_rows(c, H * W, BIG) + p[None, :]), res.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _abf_bwd_pixel_kernel(
    g_ptr, x_ptr, y_ptr, w_ptr, z_ptr, gx_ptr, da_ptr, pw_ptr, pb_ptr,
    C, H, W, h, w, scale_h, scale_w, TILES,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, BIG: tl.constexpr,
):
    """grad_x, da (N, 2, H, W), and per-program partials of grad_w (4C) and grad_b (2).

    A program walks TILES consecutive pixel tiles of one sample (TILES > 1 only with
    ONE_PASS), adding their weight/bias sums in registers, and writes one partial
    row: few partials even when tiles are small. ONE_PASS (BLOCK_C >= C) keeps the
    [C, BLOCK_P] tiles of g, x and u in registers between the two halves.

    Registers: the loop over tiles must not carry full-tile pointer tensors (the
    compiler hoists loop-invariant ones and keeps them live across iterations), so
    each tile's addresses are a per-tile scalar base plus in-sample offsets that are
    int32 unless BIG; and the weight-gradient sums are kept per element and reduced
    over the pixels once after the loop."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    prog = n * tl.num_programs(0) + pid_p
    xb = x_ptr + n * C * H * W
    gb = g_ptr + n * C * H * W
    gxb = gx_ptr + n * C * H * W
    yb = y_ptr + n * C * h * w
    zb = z_ptr + n * 2 * H * W
    dab = da_ptr + n * 2 * H * W
    pwb = pw_ptr + prog * 4 * C
    cw = tl.arange(0, BLOCK_C)
    cm = cw < C
    pr = tl.arange(0, BLOCK_P)
    gw0x = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    gw0u = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    gw1x = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    gw1u = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    gb0 = tl.zeros([], ACC)
    gb1 = tl.zeros([], ACC)
    for t in range(pid_p * TILES, (pid_p + 1) * TILES):
        p0 = t * BLOCK_P
        p = p0 + pr
        pm = p < H * W
        q = _src_index(p // W, scale_h, h) * w + _src_index(p % W, scale_w, w)
        if ONE_PASS:
            m = cm[:, None] & pm[None, :]
            offs = _rows(cw, H * W, BIG) + pr[None, :]  # in-tile offsets; the tile's base is scalar
            gv = tl.load((gb + p0) + offs, mask=m, other=0.0).to(ACC)
            xv = tl.load((xb + p0) + offs, mask=m, other=0.0).to(ACC)
            uv = tl.load(yb + (_rows(cw, h * w, BIG) + q[None, :]), mask=m, other=0.0).to(ACC)
            s0 = tl.sum(gv * xv, axis=0)
            s1 = tl.sum(gv * uv, axis=0)
        else:
            s0 = tl.zeros([BLOCK_P], ACC)
            s1 = tl.zeros([BLOCK_P], ACC)
            for c0 in range(0, C, BLOCK_C):
                _, _, _, e0, e1 = _grad_chunk(gb, xb, yb, c0 + cw, p, pm, q, C, H, W, h, w, ACC, BIG)
                s0 += e0
                s1 += e1
        z0 = tl.load(zb + p, mask=pm, other=0.0)
        z1 = tl.load(zb + H * W + p, mask=pm, other=0.0)
        da0 = s0 * z0 * (1.0 - z0)
        da1 = s1 * z1 * (1.0 - z1)
        tl.store(dab + p, da0, mask=pm)
        tl.store(dab + H * W + p, da1, mask=pm)
        gb0 += tl.sum(da0, axis=0)
        gb1 += tl.sum(da1, axis=0)
        if ONE_PASS:  # gv, xv, uv still hold the whole [C, BLOCK_P] tile
            w0x = tl.load(w_ptr + cw, mask=cm, other=0.0).to(ACC)
            w1x = tl.load(w_ptr + 2 * C + cw, mask=cm, other=0.0).to(ACC)
            gx = gv * z0[None, :] + w0x[:, None] * da0[None, :] + w1x[:, None] * da1[None, :]
            tl.store((gxb + p0) + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
            gw0x += xv * da0[None, :]
            gw0u += uv * da0[None, :]
            gw1x += xv * da1[None, :]
            gw1u += uv * da1[None, :]
        else:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cw
                cmc = c < C
                mc = cmc[:, None] & pm[None, :]
                offc = _rows(c, H * W, BIG) + p[None, :]
                gv = tl.load(gb + offc, mask=mc, other=0.0).to(ACC)
                xv = tl.load(xb + offc, mask=mc, other=0.0).to(ACC)
                uv = tl.load(yb + (_rows(c, h * w, BIG) + q[None, :]), mask=mc, other=0.0).to(ACC)
                w0x = tl.load(w_ptr + c, mask=cmc, other=0.0).to(ACC)
                w1x = tl.load(w_ptr + 2 * C + c, mask=cmc, other=0.0).to(ACC)
                gx = gv * z0[None, :] + w0x[:, None] * da0[None, :] + w1x[:, None] * da1[None, :]
                tl.store(gxb + offc, gx.to(gx_ptr.dtype.element_ty), mask=mc)
                tl.store(pwb + c, tl.sum(xv * da0[None, :], axis=1), mask=cmc)
                tl.store(pwb + C + c, tl.sum(uv * da0[None, :], axis=1), mask=cmc)
                tl.store(pwb + 2 * C + c, tl.sum(xv * da1[None, :], axis=1), mask=cmc)
                tl.store(pwb + 3 * C + c, tl.sum(uv * da1[None, :], axis=1), mask=cmc)
    if ONE_PASS:  # the weight sums over this program's pixels, reduced once
        tl.store(pwb + cw, tl.sum(gw0x, axis=1), mask=cm)
        tl.store(pwb + C + cw, tl.sum(gw0u, axis=1), mask=cm)
        tl.store(pwb + 2 * C + cw, tl.sum(gw1x, axis=1), mask=cm)
        tl.store(pwb + 3 * C + cw, tl.sum(gw1u, axis=1), mask=cm)
    tl.store(pb_ptr + prog * 2, gb0)
    tl.store(pb_ptr + prog * 2 + 1, gb1)


@triton.jit
def _abf_reduce_kernel(pw_ptr, pb_ptr, gw_ptr, gb_ptr, rows, C, ACC: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """Column j of the partials summed over the rows (deterministic: BLOCK_R rows per
    step in a fixed tree, the steps in order): gw[j] for j < 4C from pw (rows, 4C),
    then gb[j - 4C] from pb (rows, 2); stored in the outputs' dtype. Narrow column
    blocks give many programs; each step reads BLOCK_R rows at once."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_w = j < 4 * C
    in_b = (j >= 4 * C) & (j < 4 * C + 2)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK], ACC)
    # row r0 + r: a 64-bit base pointer per step, so rows * 4C may pass 2^31
    pw_row = pw_ptr + j[None, :]
    pb_row = pb_ptr + (j[None, :] - 4 * C)
    for r0 in range(0, rows, BLOCK_R):
        rm = (r0 + r < rows)[:, None]
        vw = tl.load(pw_row + r[:, None] * (4 * C), mask=rm & in_w[None, :], other=0.0)
        vb = tl.load(pb_row + r[:, None] * 2, mask=rm & in_b[None, :], other=0.0)
        acc += vw.to(ACC) + vb.to(ACC)
        pw_row += BLOCK_R * 4 * C
        pb_row += BLOCK_R * 2
    tot = tl.sum(acc, axis=0)
    tl.store(gw_ptr + j, tot.to(gw_ptr.dtype.element_ty), mask=in_w)
    tl.store(gb_ptr + (j - 4 * C), tot.to(gb_ptr.dtype.element_ty), mask=in_b)


@triton.jit
def _abf_bwd_y_kernel(
    g_ptr, w_ptr, z_ptr, da_ptr, gy_ptr, C, H, W, h, w, scale_h, scale_w, inv_h, inv_w, span_h, span_w,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr, BIG: tl.constexpr,
):
    """grad_y[c, q] = sum over output pixels p with src(p) = q of grad_u[c, p].

    MODE 1, exact integer factors (src(i) = i // k on both axes; span_h, span_w are
    k_h, k_w): the k_h x k_w output pixels of q are visited directly, every load
    useful. MODE 2, y of one pixel (h = w = 1): grad_y[c] is a sum over the whole
    plane, walked in contiguous [BLOCK_C, BLOCK_Q]-pixel tiles. MODE 0, any other
    ratio: the output rows whose source row is qr lie in [trunc(qr / scale) - 1,
    + span_h); each candidate is kept only if its source index really is qr (same
    for columns). The spans are runtime loop bounds: a large factor loops, it does
    not unroll. Every mode sums in a fixed order: deterministic.
    """
    n = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    w0u = tl.load(w_ptr + C + c, mask=cm, other=0.0).to(ACC)
    w1u = tl.load(w_ptr + 3 * C + c, mask=cm, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_Q], ACC)
    gb = g_ptr + n * C * H * W
    zb = z_ptr + n * 2 * H * W
    db = da_ptr + n * 2 * H * W
    gyb = gy_ptr + n * C * h * w
    if MODE == 2:
        pr = tl.arange(0, BLOCK_Q)
        for p0 in range(0, H * W, BLOCK_Q):
            p = p0 + pr
            ok = p < H * W
            z1 = tl.load(zb + H * W + p, mask=ok, other=0.0)
            da0 = tl.load(db + p, mask=ok, other=0.0)
            da1 = tl.load(db + H * W + p, mask=ok, other=0.0)
            gv = tl.load(gb + (_rows(c, H * W, BIG) + p[None, :]), mask=cm[:, None] & ok[None, :],
                         other=0.0).to(ACC)
            acc += gv * z1[None, :] + w0u[:, None] * da0[None, :] + w1u[:, None] * da1[None, :]
        tot = tl.sum(acc, axis=1)
        tl.store(gyb + c, tot.to(gy_ptr.dtype.element_ty), mask=cm)
    else:
        qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qm = qi < h * w
        qr = qi // w
        qc = qi % w
        if MODE == 1:
            r_start = qr * span_h
            c_start = qc * span_w
        else:
            r_start = (qr.to(tl.float32) * inv_h).to(tl.int32) - 1
            c_start = (qc.to(tl.float32) * inv_w).to(tl.int32) - 1
        for dr in range(span_h):
            r = r_start + dr
            rok = _from_source(qm, r, H, qr, scale_h, h, MODE)
            for dc in range(span_w):
                col = c_start + dc
                ok = _from_source(rok, col, W, qc, scale_w, w, MODE)
                p = tl.where(ok, r * W + col, 0)
                z1 = tl.load(zb + H * W + p, mask=ok, other=0.0)
                da0 = tl.load(db + p, mask=ok, other=0.0)
                da1 = tl.load(db + H * W + p, mask=ok, other=0.0)
                m = cm[:, None] & ok[None, :]
                gv = tl.load(gb + (_rows(c, H * W, BIG) + p[None, :]), mask=m, other=0.0).to(ACC)
                acc += gv * z1[None, :] + w0u[:, None] * da0[None, :] + w1u[:, None] * da1[None, :]
        m = cm[:, None] & qm[None, :]
        tl.store(gyb + (_rows(c, h * w, BIG) + qi[None, :]), acc.to(gy_ptr.dtype.element_ty), mask=m)


_MAX_PLANE = 2**31 - 2**16  # pixels of one plane: in-plane indices are int32 (see the top)


def _check_plane(H: int, W: int) -> None:
    if H * W >= _MAX_PLANE:
        raise ValueError(f"abf_fuse: an H x W = {H} x {W} plane has {H * W} pixels; "
                         f"the Triton kernels take fewer than 2^31 - 2^16 per plane")


_FWD_TILE = 2048  # elements of a [C, BLOCK_P] tile kept in registers (x and u forward; g, x, u backward)
_BWD_TILE = 2048  # (4096 spilled in the backward and took 1 block of 8 warps per SM)
_MIN_PROGRAMS = 4 * 132  # grid worth reaching: four programs per SM of an H100
_GRID_BLOCK_P = 8        # pixels of a tile shrunk for the grid: 32 contiguous bytes per channel row in fp32
_MIN_BLOCK_P = 4         # and shrunk for the tile size (C = 512): 16 bytes
_GRID_FLOOR = 2 * 132    # the reduction's grid aims at two programs per SM of an H100
_I32 = 2**31


def _config(N: int, C: int, P: int, dtype: torch.dtype, tile: int = _FWD_TILE):
    """(acc, BLOCK_P, BLOCK_C, ONE_PASS) for N samples of C channels and P pixels; shapes only.

    BLOCK_P shrinks (down to 8) until the (pixel tiles x N) grid reaches _MIN_PROGRAMS,
    then (down to 4) until the whole [C, BLOCK_P] tile fits ``tile`` elements: C is then
    one chunk and the kernels read x, u (and g) once."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    block_p = min(64, triton.next_power_of_2(P))
    while block_p > _GRID_BLOCK_P and triton.cdiv(P, block_p) * N < _MIN_PROGRAMS:
        block_p //= 2
    full_c = triton.next_power_of_2(C)
    while block_p > _MIN_BLOCK_P and full_c * block_p > tile:
        block_p //= 2
    if full_c * block_p <= tile:
        return acc, block_p, full_c, True
    return acc, min(64, triton.next_power_of_2(P)), min(32, full_c), False


def _num_warps(block_p: int, block_c: int) -> int:
    return 8 if block_p * block_c >= 2048 else 4


def _big(C: int, plane: int) -> bool:
    """Whether one sample's C x plane elements need int64 in-sample offsets."""
    return C * plane >= _I32 - 2**16


def _tiles_per_program(N: int, blocks_p: int, one_pass: bool) -> int:
    """Pixel tiles per backward program: enough programs to fill the GPU, few partial rows."""
    if not one_pass:
        return 1
    return max(1, min(blocks_p, (N * blocks_p) // _MIN_PROGRAMS))


@functools.lru_cache(maxsize=256)
def _exact_factor(n_out: int, n_in: int) -> int:
    """k when the float32 nearest rule maps output index i to i // k for every i < n_out
    (n_out = k * n_in; always so for power-of-two k, checked for the others), else 0."""
    if n_out % n_in:
        return 0
    k = n_out // n_in
    if k & (k - 1) == 0:
        return k
    scale = float32_ratio(n_in, n_out)
    ok = all(min(int(f32(float(i) * scale)), n_in - 1) == i // k for i in range(n_out))
    return k if ok else 0


def _y_plan(H: int, W: int, h: int, w: int):
    """(MODE, span_h, span_w, BLOCK_Q) of the grad_y kernel (modes in its docstring)."""
    if h == 1 and w == 1:
        return 2, 1, 1, min(256, triton.next_power_of_2(H * W))
    kh, kw = _exact_factor(H, h), _exact_factor(W, w)
    block_q = min(64, triton.next_power_of_2(h * w))
    if kh and kw:
        return 1, kh, kw, block_q
    # rows of source row qr: within [trunc(qr * H/h) - 1, + ceil(H/h) + 2) in float32
    # (checked exhaustively for H <= 4096); candidates outside the run are masked
    return 0, -(-H // h) + 2, -(-W // w) + 2, block_q


def _reduce_plan(cols: int):
    """(BLOCK, BLOCK_R) of the partial-sum kernel: column blocks of 2 to 64 so that the grid
    reaches _GRID_FLOOR programs where there are columns for it (C = 256: 4C + 2 = 1,026
    columns, 257 programs of 4 but 513 of 2); [BLOCK_R, BLOCK] tiles of 1024 elements."""
    block = 64
    while block > 2 and triton.cdiv(cols, block) < _GRID_FLOOR:
        block //= 2
    return block, 1024 // block


def abf_fwd(x, y, weight, bias, out, z) -> None:
    """out (N, C, H, W) and z (N, 2, H, W) from contiguous x, y, weight (2*2C,), bias (2,)."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    acc, block_p, block_c, one_pass = _config(N, C, H * W, x.dtype, _FWD_TILE)
    grid = (triton.cdiv(H * W, block_p), N)
    _abf_fwd_kernel[grid](x, y, weight, bias, out, z, C, H, W, h, w, sh, sw,
                          ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, ONE_PASS=one_pass, BIG=_big(C, H * W),
                          num_warps=_num_warps(block_p, block_c))
    launch_counts["abf_fwd"] += 1


def abf_bwd(g, x, y, weight, z, gx, gy):
    """Fill gx, gy; return (grad_w (4C,), grad_b (2,)) in weight's dtype (summed in the accumulation dtype)."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    big = _big(C, H * W)
    acc, block_p, block_c, one_pass = _config(N, C, H * W, x.dtype, _BWD_TILE)
    blocks_p = triton.cdiv(H * W, block_p)
    tiles = _tiles_per_program(N, blocks_p, one_pass)
    progs_p = triton.cdiv(blocks_p, tiles)
    rows = N * progs_p
    da = torch.empty_like(z)
    pw = torch.empty(rows, 4 * C, dtype=z.dtype, device=x.device)
    pb = torch.empty(rows, 2, dtype=z.dtype, device=x.device)
    # the last program of a sample may own fewer tiles: its extra tiles are masked (p >= H*W)
    _abf_bwd_pixel_kernel[(progs_p, N)](g, x, y, weight, z, gx, da, pw, pb, C, H, W, h, w, sh, sw, tiles,
                                         ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, ONE_PASS=one_pass, BIG=big,
                                         num_warps=_num_warps(block_p, block_c), num_stages=1)
    block_yc = min(16, triton.next_power_of_2(C))
    mode, span_h, span_w, block_q = _y_plan(H, W, h, w)
    inv_h, inv_w = float32_ratio(H, h), float32_ratio(W, w)
    grid = (1 if mode == 2 else triton.cdiv(h * w, block_q), N, triton.cdiv(C, block_yc))
    _abf_bwd_y_kernel[grid](g, weight, z, da, gy, C, H, W, h, w, sh, sw, inv_h, inv_w, span_h, span_w,
                            ACC=acc, BLOCK_Q=block_q, BLOCK_C=block_yc, MODE=mode, BIG=big, num_stages=1)
    gw = torch.empty(4 * C, dtype=weight.dtype, device=x.device)
    gb = torch.empty(2, dtype=weight.dtype, device=x.device)
    block, block_r = _reduce_plan(4 * C + 2)
    _abf_reduce_kernel[(triton.cdiv(4 * C + 2, block),)](pw, pb, gw, gb, rows, C, ACC=acc, BLOCK=block,
                                                          BLOCK_R=block_r)
    launch_counts["abf_bwd"] += 1
    return gw, gb
