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
the partial sum. Grids: pixel tiles shrink (down to 8 pixels) until the grid
has about four programs per SM of an H100, and a backward program walks
several tiles so the partials stay few. When the whole channel range fits one
tile ([C, BLOCK_P] <= 4096 elements: C <= 512) x, u (and g) are read once;
beyond that C is walked twice, the second walk mostly from L2. Scales and
spans are rounded to float32 on the host in pure Python (_host.py): no tensor
and no device read per call.

Index widths: every offset that includes the sample n or a channel c (n*C*H*W,
c*H*W, the partial slots) is formed in int64, so N*C*H*W may pass 2^31. Pixel
indices inside one plane (p, q, r*W + col) stay int32 for speed: the host
refuses planes of 2^31 - 2^16 or more pixels (_check_plane), so p + BLOCK and
H*W never wrap.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import f32_ratio as float32_ratio


@triton.jit
def _src_index(i, scale, n_in):
    """Legacy nearest: min(floor(i * scale), n_in - 1), float32 like PyTorch."""
    return tl.minimum((i.to(tl.float32) * scale).to(tl.int32), n_in - 1)


@triton.jit
def _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC: tl.constexpr):
    """x and u tiles [len(c), len(p)] of channels c, and their share of the two logits [len(p)]."""
    cm = c < C
    m = cm[:, None] & pm[None, :]
    xv = tl.load(xb + c[:, None].to(tl.int64) * H * W + p[None, :], mask=m, other=0.0).to(ACC)
    uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
    w0x = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
    w0u = tl.load(w_ptr + C + c, mask=cm, other=0.0).to(ACC)
    w1x = tl.load(w_ptr + 2 * C + c, mask=cm, other=0.0).to(ACC)
    w1u = tl.load(w_ptr + 3 * C + c, mask=cm, other=0.0).to(ACC)
    a0 = tl.sum(w0x[:, None] * xv + w0u[:, None] * uv, axis=0)
    a1 = tl.sum(w1x[:, None] * xv + w1u[:, None] * uv, axis=0)
    return xv, uv, a0, a1


@triton.jit
def _grad_chunk(gb, xb, yb, c, p, pm, q, C, H, W, h, w, ACC: tl.constexpr):
    """g, x, u tiles of channels c and their shares of s_0 = sum g x, s_1 = sum g u."""
    m = (c < C)[:, None] & pm[None, :]
    offs = c[:, None].to(tl.int64) * H * W + p[None, :]
    gv = tl.load(gb + offs, mask=m, other=0.0).to(ACC)
    xv = tl.load(xb + offs, mask=m, other=0.0).to(ACC)
    uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
    return gv, xv, uv, tl.sum(gv * xv, axis=0), tl.sum(gv * uv, axis=0)


@triton.jit
def _abf_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, z_ptr, C, H, W, h, w, scale_h, scale_w,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
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
        xv, uv, a0, a1 = _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC)
    else:
        a0 = tl.zeros([BLOCK_P], ACC)
        a1 = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            _, _, d0, d1 = _logit_chunk(xb, yb, w_ptr, c, p, pm, q, C, H, W, h, w, ACC)
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
        tl.store(ob + c[:, None].to(tl.int64) * H * W + p[None, :], res.to(out_ptr.dtype.element_ty), mask=m)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = (c < C)[:, None] & pm[None, :]
            xv = tl.load(xb + c[:, None].to(tl.int64) * H * W + p[None, :], mask=m, other=0.0).to(ACC)
            uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
            res = xv * z0[None, :] + uv * z1[None, :]
            tl.store(ob + c[:, None].to(tl.int64) * H * W + p[None, :], res.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _abf_bwd_pixel_kernel(
    g_ptr, x_ptr, y_ptr, w_ptr, z_ptr, gx_ptr, da_ptr, pw_ptr, pb_ptr,
    C, H, W, h, w, scale_h, scale_w, TILES,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """grad_x, da (N, 2, H, W), and per-program partials of grad_w (4C) and grad_b (2).

    A program walks TILES consecutive pixel tiles of one sample (TILES > 1 only with
    ONE_PASS), adding their weight/bias sums in registers, and writes one partial
    row: few partials even when tiles are small. ONE_PASS (BLOCK_C >= C) keeps the
    [C, BLOCK_P] tiles of g, x and u in registers between the two halves."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    prog = n * tl.num_programs(0) + pid_p
    xb = x_ptr + n * C * H * W
    gb = g_ptr + n * C * H * W
    yb = y_ptr + n * C * h * w
    zb = z_ptr + n * 2 * H * W
    pwb = pw_ptr + prog * 4 * C
    cw = tl.arange(0, BLOCK_C)
    gw0x = tl.zeros([BLOCK_C], ACC)
    gw0u = tl.zeros([BLOCK_C], ACC)
    gw1x = tl.zeros([BLOCK_C], ACC)
    gw1u = tl.zeros([BLOCK_C], ACC)
    gb0 = tl.zeros([], ACC)
    gb1 = tl.zeros([], ACC)
    for t in range(pid_p * TILES, (pid_p + 1) * TILES):
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < H * W
        q = _src_index(p // W, scale_h, h) * w + _src_index(p % W, scale_w, w)
        if ONE_PASS:
            gv, xv, uv, s0, s1 = _grad_chunk(gb, xb, yb, cw, p, pm, q, C, H, W, h, w, ACC)
        else:
            s0 = tl.zeros([BLOCK_P], ACC)
            s1 = tl.zeros([BLOCK_P], ACC)
            for c0 in range(0, C, BLOCK_C):
                _, _, _, e0, e1 = _grad_chunk(gb, xb, yb, c0 + cw, p, pm, q, C, H, W, h, w, ACC)
                s0 += e0
                s1 += e1
        z0 = tl.load(zb + p, mask=pm, other=0.0)
        z1 = tl.load(zb + H * W + p, mask=pm, other=0.0)
        da0 = s0 * z0 * (1.0 - z0)
        da1 = s1 * z1 * (1.0 - z1)
        tl.store(da_ptr + n * 2 * H * W + p, da0, mask=pm)
        tl.store(da_ptr + n * 2 * H * W + H * W + p, da1, mask=pm)
        gb0 += tl.sum(da0, axis=0)
        gb1 += tl.sum(da1, axis=0)
        if ONE_PASS:  # gv, xv, uv still hold the whole [C, BLOCK_P] tile
            cm = cw < C
            m = cm[:, None] & pm[None, :]
            offs = cw[:, None].to(tl.int64) * H * W + p[None, :]
            w0x = tl.load(w_ptr + cw, mask=cm, other=0.0).to(ACC)
            w1x = tl.load(w_ptr + 2 * C + cw, mask=cm, other=0.0).to(ACC)
            gx = gv * z0[None, :] + w0x[:, None] * da0[None, :] + w1x[:, None] * da1[None, :]
            tl.store(gx_ptr + n * C * H * W + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
            gw0x += tl.sum(xv * da0[None, :], axis=1)
            gw0u += tl.sum(uv * da0[None, :], axis=1)
            gw1x += tl.sum(xv * da1[None, :], axis=1)
            gw1u += tl.sum(uv * da1[None, :], axis=1)
        else:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < C
                m = cm[:, None] & pm[None, :]
                offs = c[:, None].to(tl.int64) * H * W + p[None, :]
                gv = tl.load(gb + offs, mask=m, other=0.0).to(ACC)
                xv = tl.load(xb + offs, mask=m, other=0.0).to(ACC)
                uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
                w0x = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
                w1x = tl.load(w_ptr + 2 * C + c, mask=cm, other=0.0).to(ACC)
                gx = gv * z0[None, :] + w0x[:, None] * da0[None, :] + w1x[:, None] * da1[None, :]
                tl.store(gx_ptr + n * C * H * W + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
                tl.store(pwb + c, tl.sum(xv * da0[None, :], axis=1), mask=cm)
                tl.store(pwb + C + c, tl.sum(uv * da0[None, :], axis=1), mask=cm)
                tl.store(pwb + 2 * C + c, tl.sum(xv * da1[None, :], axis=1), mask=cm)
                tl.store(pwb + 3 * C + c, tl.sum(uv * da1[None, :], axis=1), mask=cm)
    if ONE_PASS:
        cm = cw < C
        tl.store(pwb + cw, gw0x, mask=cm)
        tl.store(pwb + C + cw, gw0u, mask=cm)
        tl.store(pwb + 2 * C + cw, gw1x, mask=cm)
        tl.store(pwb + 3 * C + cw, gw1u, mask=cm)
    tl.store(pb_ptr + prog * 2, gb0)
    tl.store(pb_ptr + prog * 2 + 1, gb1)


@triton.jit
def _abf_reduce_kernel(pw_ptr, pb_ptr, gw_ptr, gb_ptr, rows, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Column j of the partials summed over the rows in order (deterministic): gw[j] for
    j < 4C from pw (rows, 4C), then gb[j - 4C] from pb (rows, 2); stored in the outputs' dtype."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_w = j < 4 * C
    in_b = (j >= 4 * C) & (j < 4 * C + 2)
    acc = tl.zeros([BLOCK], ACC)
    pw_row = pw_ptr + j  # pointers step one row at a time: 64-bit, whatever rows * 4C is
    pb_row = pb_ptr + (j - 4 * C)
    for _ in range(0, rows):
        vw = tl.load(pw_row, mask=in_w, other=0.0)
        vb = tl.load(pb_row, mask=in_b, other=0.0)
        acc += vw.to(ACC) + vb.to(ACC)
        pw_row += 4 * C
        pb_row += 2
    tl.store(gw_ptr + j, acc.to(gw_ptr.dtype.element_ty), mask=in_w)
    tl.store(gb_ptr + (j - 4 * C), acc.to(gb_ptr.dtype.element_ty), mask=in_b)


@triton.jit
def _abf_bwd_y_kernel(
    g_ptr, w_ptr, z_ptr, da_ptr, gy_ptr, C, H, W, h, w, scale_h, scale_w, inv_h, inv_w, span_h, span_w,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_y[c, q] = sum over output pixels p with src(p) = q of grad_u[c, p].

    The output rows whose source row is qr lie in [trunc(qr / scale) - 1, + span_h);
    each candidate is kept only if its source index really is qr (same for columns).
    The spans are runtime loop bounds: h = 1 with a large H loops, it does not unroll.
    """
    n = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * BLOCK_C
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = qi < h * w
    qr = qi // w
    qc = qi % w
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    w0u = tl.load(w_ptr + C + c, mask=cm, other=0.0).to(ACC)
    w1u = tl.load(w_ptr + 3 * C + c, mask=cm, other=0.0).to(ACC)
    r_start = (qr.to(tl.float32) * inv_h).to(tl.int32) - 1
    c_start = (qc.to(tl.float32) * inv_w).to(tl.int32) - 1
    acc = tl.zeros([BLOCK_C, BLOCK_Q], ACC)
    gb = g_ptr + n * C * H * W
    zb = z_ptr + n * 2 * H * W
    db = da_ptr + n * 2 * H * W
    for dr in range(span_h):
        r = r_start + dr
        rok = (r >= 0) & (r < H) & (_src_index(tl.maximum(r, 0), scale_h, h) == qr)
        for dc in range(span_w):
            col = c_start + dc
            ok = qm & rok & (col >= 0) & (col < W) & (_src_index(tl.maximum(col, 0), scale_w, w) == qc)
            p = tl.where(ok, r * W + col, 0)
            z1 = tl.load(zb + H * W + p, mask=ok, other=0.0)
            da0 = tl.load(db + p, mask=ok, other=0.0)
            da1 = tl.load(db + H * W + p, mask=ok, other=0.0)
            m = cm[:, None] & ok[None, :]
            gv = tl.load(gb + c[:, None].to(tl.int64) * H * W + p[None, :], mask=m, other=0.0).to(ACC)
            acc += gv * z1[None, :] + w0u[:, None] * da0[None, :] + w1u[:, None] * da1[None, :]
    m = cm[:, None] & qm[None, :]
    tl.store(gy_ptr + n * C * h * w + c[:, None].to(tl.int64) * h * w + qi[None, :],
             acc.to(gy_ptr.dtype.element_ty), mask=m)


_MAX_PLANE = 2**31 - 2**16  # pixels of one plane: in-plane indices are int32 (see the top)


def _check_plane(H: int, W: int) -> None:
    if H * W >= _MAX_PLANE:
        raise ValueError(f"abf_fuse: an H x W = {H} x {W} plane has {H * W} pixels; "
                         f"the Triton kernels take fewer than 2^31 - 2^16 per plane")


_ONE_PASS_TILE = 4096  # elements of a [C, BLOCK_P] tile kept in registers (x and u; g too backward)
_MIN_PROGRAMS = 4 * 132  # grid worth reaching: four programs per SM of an H100
_MIN_BLOCK_P = 8         # pixels of a tile: 32 contiguous bytes per channel row in fp32


def _config(N: int, C: int, P: int, dtype: torch.dtype):
    """(acc, BLOCK_P, BLOCK_C, ONE_PASS) for N samples of C channels and P pixels; shapes only.

    BLOCK_P shrinks (down to 8) until the (pixel tiles x N) grid reaches _MIN_PROGRAMS;
    when the whole [C, BLOCK_P] tile fits _ONE_PASS_TILE, C is one chunk and the
    kernels read x, u (and g) once."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    block_p = min(64, triton.next_power_of_2(P))
    while block_p > _MIN_BLOCK_P and triton.cdiv(P, block_p) * N < _MIN_PROGRAMS:
        block_p //= 2
    full_c = triton.next_power_of_2(C)
    while block_p > _MIN_BLOCK_P and full_c * block_p > _ONE_PASS_TILE:
        block_p //= 2
    if full_c * block_p <= _ONE_PASS_TILE:
        return acc, block_p, full_c, True
    return acc, min(64, triton.next_power_of_2(P)), min(32, full_c), False


def _num_warps(block_p: int, block_c: int) -> int:
    return 8 if block_p * block_c >= 2048 else 4


def _tiles_per_program(N: int, blocks_p: int, one_pass: bool) -> int:
    """Pixel tiles per backward program: enough programs to fill the GPU, few partial rows."""
    if not one_pass:
        return 1
    return max(1, min(blocks_p, (N * blocks_p) // _MIN_PROGRAMS))


def abf_fwd(x, y, weight, bias, out, z) -> None:
    """out (N, C, H, W) and z (N, 2, H, W) from contiguous x, y, weight (2*2C,), bias (2,)."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    acc, block_p, block_c, one_pass = _config(N, C, H * W, x.dtype)
    grid = (triton.cdiv(H * W, block_p), N)
    _abf_fwd_kernel[grid](x, y, weight, bias, out, z, C, H, W, h, w, sh, sw,
                          ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, ONE_PASS=one_pass,
                          num_warps=_num_warps(block_p, block_c))
    launch_counts["abf_fwd"] += 1


def abf_bwd(g, x, y, weight, z, gx, gy):
    """Fill gx, gy; return (grad_w (4C,), grad_b (2,)) in weight's dtype (summed in the accumulation dtype)."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    acc, block_p, block_c, one_pass = _config(N, C, H * W, x.dtype)
    blocks_p = triton.cdiv(H * W, block_p)
    tiles = _tiles_per_program(N, blocks_p, one_pass)
    progs_p = triton.cdiv(blocks_p, tiles)
    rows = N * progs_p
    da = torch.empty_like(z)
    pw = torch.empty(rows, 4 * C, dtype=z.dtype, device=x.device)
    pb = torch.empty(rows, 2, dtype=z.dtype, device=x.device)
    # the last program of a sample may own fewer tiles: its extra tiles are masked (p >= H*W)
    _abf_bwd_pixel_kernel[(progs_p, N)](g, x, y, weight, z, gx, da, pw, pb, C, H, W, h, w, sh, sw, tiles,
                                         ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, ONE_PASS=one_pass,
                                         num_warps=_num_warps(block_p, block_c))
    block_yc = min(32, triton.next_power_of_2(C))
    block_q = min(64, triton.next_power_of_2(h * w))
    inv_h, inv_w = float32_ratio(H, h), float32_ratio(W, w)
    # rows of source row qr: within [trunc(qr * H/h) - 1, + ceil(H/h) + 2) in float32
    # (checked exhaustively for H <= 4096); candidates outside the run are masked
    span_h = -(-H // h) + 2
    span_w = -(-W // w) + 2
    grid = (triton.cdiv(h * w, block_q), N, triton.cdiv(C, block_yc))
    _abf_bwd_y_kernel[grid](g, weight, z, da, gy, C, H, W, h, w, sh, sw, inv_h, inv_w, span_h, span_w,
                            ACC=acc, BLOCK_Q=block_q, BLOCK_C=block_yc)
    gw = torch.empty(4 * C, dtype=weight.dtype, device=x.device)
    gb = torch.empty(2, dtype=weight.dtype, device=x.device)
    block_r = min(256, triton.next_power_of_2(4 * C + 2))
    _abf_reduce_kernel[(triton.cdiv(4 * C + 2, block_r),)](pw, pb, gw, gb, rows, C, ACC=acc, BLOCK=block_r)
    launch_counts["abf_bwd"] += 1
    return gw, gb
