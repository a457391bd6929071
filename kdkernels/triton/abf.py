r"""Triton kernels of ReviewKD's ABF fusion (SPEC section 2, step 2).

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
The weight/bias sums are written as per-program partials and reduced by the
host in a fixed order: deterministic.

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

from ..reference.abf import float32_ratio
from . import launch_counts


@triton.jit
def _src_index(i, scale, n_in):
    """Legacy nearest: min(floor(i * scale), n_in - 1), float32 like PyTorch."""
    return tl.minimum((i.to(tl.float32) * scale).to(tl.int32), n_in - 1)


@triton.jit
def _abf_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, z_ptr, C, H, W, h, w, scale_h, scale_w,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < H * W
    q = _src_index(p // W, scale_h, h) * w + _src_index(p % W, scale_w, w)
    xb = x_ptr + n * C * H * W
    yb = y_ptr + n * C * h * w
    a0 = tl.zeros([BLOCK_P], ACC)
    a1 = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m = cm[:, None] & pm[None, :]
        xv = tl.load(xb + c[:, None].to(tl.int64) * H * W + p[None, :], mask=m, other=0.0).to(ACC)
        uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
        w0x = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
        w0u = tl.load(w_ptr + C + c, mask=cm, other=0.0).to(ACC)
        w1x = tl.load(w_ptr + 2 * C + c, mask=cm, other=0.0).to(ACC)
        w1u = tl.load(w_ptr + 3 * C + c, mask=cm, other=0.0).to(ACC)
        a0 += tl.sum(w0x[:, None] * xv + w0u[:, None] * uv, axis=0)
        a1 += tl.sum(w1x[:, None] * xv + w1u[:, None] * uv, axis=0)
    z0 = 1.0 / (1.0 + tl.exp(-(a0 + tl.load(b_ptr).to(ACC))))
    z1 = 1.0 / (1.0 + tl.exp(-(a1 + tl.load(b_ptr + 1).to(ACC))))
    zb = z_ptr + n * 2 * H * W
    tl.store(zb + p, z0, mask=pm)
    tl.store(zb + H * W + p, z1, mask=pm)
    ob = out_ptr + n * C * H * W
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
    C, H, W, h, w, scale_h, scale_w,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x, da (N, 2, H, W), and per-program partials of grad_w (4C) and grad_b (2)."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    prog = n * tl.num_programs(0) + pid_p
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < H * W
    q = _src_index(p // W, scale_h, h) * w + _src_index(p % W, scale_w, w)
    xb = x_ptr + n * C * H * W
    gb = g_ptr + n * C * H * W
    yb = y_ptr + n * C * h * w
    s0 = tl.zeros([BLOCK_P], ACC)
    s1 = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = (c < C)[:, None] & pm[None, :]
        offs = c[:, None].to(tl.int64) * H * W + p[None, :]
        gv = tl.load(gb + offs, mask=m, other=0.0).to(ACC)
        xv = tl.load(xb + offs, mask=m, other=0.0).to(ACC)
        uv = tl.load(yb + c[:, None].to(tl.int64) * h * w + q[None, :], mask=m, other=0.0).to(ACC)
        s0 += tl.sum(gv * xv, axis=0)
        s1 += tl.sum(gv * uv, axis=0)
    zb = z_ptr + n * 2 * H * W
    z0 = tl.load(zb + p, mask=pm, other=0.0)
    z1 = tl.load(zb + H * W + p, mask=pm, other=0.0)
    da0 = s0 * z0 * (1.0 - z0)
    da1 = s1 * z1 * (1.0 - z1)
    tl.store(da_ptr + n * 2 * H * W + p, da0, mask=pm)
    tl.store(da_ptr + n * 2 * H * W + H * W + p, da1, mask=pm)
    tl.store(pb_ptr + prog * 2, tl.sum(da0, axis=0))
    tl.store(pb_ptr + prog * 2 + 1, tl.sum(da1, axis=0))
    pwb = pw_ptr + prog * 4 * C
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


def _config(C: int, P: int, dtype: torch.dtype):
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    block_p = min(64, triton.next_power_of_2(P))
    block_c = min(32, triton.next_power_of_2(C))
    return acc, block_p, block_c


def abf_fwd(x, y, weight, bias, out, z) -> None:
    """out (N, C, H, W) and z (N, 2, H, W) from contiguous x, y, weight (2*2C,), bias (2,)."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    acc, block_p, block_c = _config(C, H * W, x.dtype)
    grid = (triton.cdiv(H * W, block_p), N)
    _abf_fwd_kernel[grid](x, y, weight, bias, out, z, C, H, W, h, w, sh, sw,
                          ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c)
    launch_counts["abf_fwd"] += 1


def abf_bwd(g, x, y, weight, z, gx, gy):
    """Fill gx, gy; return (grad_w (4C,), grad_b (2,)) in the accumulation dtype."""
    N, C, H, W = x.shape
    h, w = y.shape[-2:]
    _check_plane(H, W)
    sh, sw = float32_ratio(h, H), float32_ratio(w, W)
    acc, block_p, block_c = _config(C, H * W, x.dtype)
    blocks_p = triton.cdiv(H * W, block_p)
    da = torch.empty_like(z)
    pw = torch.empty(N * blocks_p, 4 * C, dtype=z.dtype, device=x.device)
    pb = torch.empty(N * blocks_p, 2, dtype=z.dtype, device=x.device)
    _abf_bwd_pixel_kernel[(blocks_p, N)](g, x, y, weight, z, gx, da, pw, pb, C, H, W, h, w, sh, sw,
                                          ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c)
    block_q = min(64, triton.next_power_of_2(h * w))
    inv_h, inv_w = float32_ratio(H, h), float32_ratio(W, w)
    # rows of source row qr: within [trunc(qr * H/h) - 1, + ceil(H/h) + 2) in float32
    # (checked exhaustively for H <= 4096); candidates outside the run are masked
    span_h = -(-H // h) + 2
    span_w = -(-W // w) + 2
    grid = (triton.cdiv(h * w, block_q), N, triton.cdiv(C, block_c))
    _abf_bwd_y_kernel[grid](g, weight, z, da, gy, C, H, W, h, w, sh, sw, inv_h, inv_w, span_h, span_w,
                            ACC=acc, BLOCK_Q=block_q, BLOCK_C=block_c)
    launch_counts["abf_bwd"] += 1
    return pw.sum(0), pb.sum(0)
