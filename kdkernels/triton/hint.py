r"""Triton kernel of the FitNets hint loss through a 1x1 regressor (docs/spec.md §3).

Pixels are the long dimension: pixel q in [0, N*H*W) is (n, p) = (q // P, q % P)
with P = H*W, and fs[n, c, p] sits at n*Cs*P + c*P + p (contiguous NCHW). Pixel,
channel-plane and partial-slot offsets are all formed in int64, so N*H*W and
N*Cs*H*W may pass 2^31. Program pid owns the pixel tile pid of BLOCK_Q pixels
(or, past _MAX_PARTIAL, a run of T consecutive tiles). For each tile and each
chunk of BLOCK_CT teacher channels it computes the residual tile in registers,

    r[ct, q] = sum_cs W[ct, cs] fs[cs, q] + b[ct] - ft[ct, q]        (tl.dot over Cs chunks)

and, in the epilogue, while r is still in registers:

    loss_part[pid]       = sum r^2
    gb_part[pid, ct]     = sum_q r[ct, q]                 (NEED_B)
    gft[ct, q]           = r                              (NEED_FT)
    gfs[cs, q]          += sum_ct W[ct, cs] r[ct, q]     (NEED_FS: tl.dot(W^T, r))
    gw_part[pid, ct, cs] = sum_q r[ct, q] fs[cs, q]       (NEED_W: tl.dot(r, fs^T))

Each partial slot is stored once by the one program that owns it (no zero
fill, no atomics; with T > 1 tiles a program adds its later tiles to its own
slot in a fixed order), and a second kernel sums the G partials column by
column in a fixed order and writes the loss (times 1/numel), the weight and
the bias gradients: two launches, deterministic. The gradients are *unscaled*
(no 2/numel, no grad_output): the backward applies that factor in the
accumulation dtype (one launch, :func:`scale_grads`), so fp16/bf16 storage
never holds the tiny scaled values. The regressed map is never written; fs is
read from DRAM once (the second read of a tile in the gradient loop hits the
cache).

Precision: fp32 inputs are multiplied with ``input_precision="ieee"`` (full
fp32, no TF32) unless ``allow_tf32``; fp64 in fp64; fp16/bf16 inputs go to
the tensor cores in their own dtype with fp32 accumulation, and the gradient
products use r rounded to that dtype (as eager PyTorch stores r).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import interpreted

_MAX_PARTIAL = 1 << 23  # elements of the (G, Ct, Cs) weight-gradient partials (32 MB in fp32)


# Q and num_tiles only bound masks and loops: specialising them on divisibility by 16
# would compile a new kernel per batch size for nothing (P, Cs, Ct set alignments: kept)
@triton.jit(do_not_specialize=["Q", "num_tiles"])
def _hint_fused_kernel(
    fs_ptr, ft_ptr, w_ptr, b_ptr,
    loss_ptr, gfs_ptr, gw_ptr, gb_ptr, gft_ptr,
    Q, P, Cs, Ct, num_tiles, tiles_per_prog,
    HAS_BIAS: tl.constexpr, NEED_FS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    NEED_FT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SINGLE_CT: tl.constexpr,
    DOT_F32: tl.constexpr, MULTI: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_CT: tl.constexpr,
):
    pid = tl.program_id(0)
    # operands of tl.dot: the input dtype, or fp32 with DOT_F32 (bf16 under the
    # interpreter, whose numpy dot cannot read bf16)
    if DOT_F32:
        dot_ty = tl.float32
    else:
        dot_ty = fs_ptr.dtype.element_ty
    loss = tl.zeros([BLOCK_CT], ACC)
    gw_base = pid.to(tl.int64) * Ct * Cs  # this program's slot of the partials
    gb_base = pid.to(tl.int64) * Ct
    for i in range(0, tiles_per_prog):
        # tiles pid * T .. pid * T + T - 1 (T = 1 unless MULTI); tile < num_tiles fits
        # int32, but its first pixel tile * BLOCK_Q (and every offset below) is int64:
        # N*H*W may pass 2^31. Tiles past num_tiles (the last program's) are all masked.
        tile = pid * tiles_per_prog + i
        q = tile.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        n = q // P
        p = q - n * P
        fs_q = n * Cs * P + p  # offset of fs[n, 0, p]
        ft_q = n * Ct * P + p  # offset of ft[n, 0, p]
        for ct0 in range(0, Ct, BLOCK_CT):
            ct = ct0 + tl.arange(0, BLOCK_CT)
            ct_ok = ct < Ct
            # ---- r = W fs + b - ft on this (ct chunk, pixel tile)
            acc = tl.zeros([BLOCK_CT, BLOCK_Q], ACC)
            for cs0 in range(0, Cs, BLOCK_CS):
                cs = cs0 + tl.arange(0, BLOCK_CS)
                cs_ok = cs < Cs
                w = tl.load(w_ptr + ct[:, None].to(tl.int64) * Cs + cs[None, :],
                            mask=ct_ok[:, None] & cs_ok[None, :], other=0.0)
                x = tl.load(fs_ptr + fs_q[None, :] + cs[:, None].to(tl.int64) * P,
                            mask=cs_ok[:, None] & q_ok[None, :], other=0.0)
                acc = tl.dot(w.to(dot_ty), x.to(dot_ty), acc, input_precision=PREC, out_dtype=ACC)
            tile_ok = ct_ok[:, None] & q_ok[None, :]
            ft_offs = ft_q[None, :] + ct[:, None].to(tl.int64) * P
            y = tl.load(ft_ptr + ft_offs, mask=tile_ok, other=0.0).to(ACC)
            r = acc - y
            if HAS_BIAS:
                r += tl.load(b_ptr + ct, mask=ct_ok, other=0.0).to(ACC)[:, None]
            r = tl.where(tile_ok, r, 0.0)
            # ---- epilogue: loss and the gradients, from r in registers
            loss += tl.sum(r * r, axis=1)
            if NEED_FT:
                tl.store(gft_ptr + ft_offs, r.to(gft_ptr.dtype.element_ty), mask=tile_ok)
            if NEED_B:
                gb_offs = gb_base + ct
                gb = tl.sum(r, axis=1)
                if MULTI:  # later tiles of this program add to what its first tile stored
                    gb += tl.load(gb_ptr + gb_offs, mask=ct_ok & (i > 0), other=0.0)
                tl.store(gb_ptr + gb_offs, gb, mask=ct_ok)
            if NEED_FS or NEED_W:
                rd = r.to(fs_ptr.dtype.element_ty).to(dot_ty)  # r rounded to the input dtype
                for cs0 in range(0, Cs, BLOCK_CS):
                    cs = cs0 + tl.arange(0, BLOCK_CS)
                    cs_ok = cs < Cs
                    if NEED_FS:
                        # W^T chunk [CS, CT]: element (cs, ct) = W[ct, cs]
                        wt = tl.load(w_ptr + ct[None, :].to(tl.int64) * Cs + cs[:, None],
                                     mask=ct_ok[None, :] & cs_ok[:, None], other=0.0)
                        g = tl.dot(wt.to(dot_ty), rd, input_precision=PREC, out_dtype=ACC)  # [CS, Q]
                        g_ok = cs_ok[:, None] & q_ok[None, :]
                        g_offs = fs_q[None, :] + cs[:, None].to(tl.int64) * P
                        if not SINGLE_CT:  # later ct chunks add to what earlier ones stored
                            g += tl.load(gfs_ptr + g_offs, mask=g_ok & (ct0 > 0), other=0.0).to(ACC)
                        tl.store(gfs_ptr + g_offs, g.to(gfs_ptr.dtype.element_ty), mask=g_ok)
                    if NEED_W:
                        # fs^T tile [Q, CS] (the tile was read above: it comes from the cache)
                        xt = tl.load(fs_ptr + fs_q[:, None] + cs[None, :].to(tl.int64) * P,
                                     mask=q_ok[:, None] & cs_ok[None, :], other=0.0)
                        gw_offs = gw_base + ct[:, None].to(tl.int64) * Cs + cs[None, :]
                        gw_ok = ct_ok[:, None] & cs_ok[None, :]
                        gw = tl.dot(rd, xt.to(dot_ty), input_precision=PREC, out_dtype=ACC)
                        if MULTI:
                            gw += tl.load(gw_ptr + gw_offs, mask=gw_ok & (i > 0), other=0.0)
                        tl.store(gw_ptr + gw_offs, gw, mask=gw_ok)
    tl.store(loss_ptr + pid, tl.sum(loss, axis=0))


@triton.jit
def _sum_rows(part_ptr, out_ptr, col0, n_cols, rows, scale,
              ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """out[c] = scale * sum_g part[g, c] for BLOCK columns from col0, rows in a fixed order."""
    cols = col0 + tl.arange(0, BLOCK)
    c_ok = cols < n_cols
    acc = tl.zeros([BLOCK_G, BLOCK], ACC)
    for g0 in range(0, rows, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        acc += tl.load(part_ptr + g[:, None].to(tl.int64) * n_cols + cols[None, :],
                       mask=(g < rows)[:, None] & c_ok[None, :], other=0.0)
    tl.store(out_ptr + cols, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty), mask=c_ok)


# G (the partials' rows) and numel only bound loops and scale: no specialisation per batch size
@triton.jit(do_not_specialize=["G", "numel"])
def _hint_reduce_kernel(loss_part, gw_part, gb_part, loss_ptr, gw_ptr, gb_ptr,
                        G, n_w, n_b, numel, w_progs, b_progs,
                        ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """Sums the G per-program partials, each column in a fixed order (deterministic):
    programs [0, w_progs) the weight gradient, then b_progs the bias gradient, then one
    program the loss (times 1 / numel: the mean)."""
    pid = tl.program_id(0)
    one = tl.full([], 1.0, ACC)
    if pid < w_progs:
        _sum_rows(gw_part, gw_ptr, pid * BLOCK, n_w, G, one, ACC, BLOCK_G, BLOCK)
    elif pid < w_progs + b_progs:
        _sum_rows(gb_part, gb_ptr, (pid - w_progs) * BLOCK, n_b, G, one, ACC, BLOCK_G, BLOCK)
    else:
        acc = tl.zeros([BLOCK], ACC)
        for g0 in range(0, G, BLOCK):
            g = g0 + tl.arange(0, BLOCK)
            acc += tl.load(loss_part + g, mask=g < G, other=0.0)
        # times fl(1 / numel) as the eager op multiplies by the Python float 1 / numel
        tl.store(loss_ptr, tl.sum(acc, axis=0) * (one / numel.to(ACC)))


@triton.jit
def _scale_block(src_ptr, dst_ptr, blk, n, s, BLOCK: tl.constexpr):
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(src_ptr + offs, mask=ok, other=0.0).to(s.dtype)
    tl.store(dst_ptr + offs, (x * s).to(dst_ptr.dtype.element_ty), mask=ok)


# the sizes that grow with the batch are not specialised (no new kernel for a last, smaller batch)
@triton.jit(do_not_specialize=["numel", "n_fs", "end_fs", "end_w", "end_b", "n_ft"])
def _hint_scale_kernel(grad_ptr, numel,
                       fs_src, fs_dst, n_fs, end_fs, w_src, w_dst, n_w, end_w,
                       b_src, b_dst, n_b, end_b, ft_src, ft_dst, n_ft,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The backward: every saved gradient times s = grad_output * (2 / numel) (the
    teacher's times -s), in the accumulation dtype, cast to its input's dtype; one
    launch for all four (programs [0, end_fs) fs, then weight, bias, teacher)."""
    pid = tl.program_id(0)
    two = tl.full([], 2.0, ACC)
    s = tl.load(grad_ptr).to(ACC) * (two / numel.to(ACC))
    if pid < end_fs:
        _scale_block(fs_src, fs_dst, pid, n_fs, s, BLOCK)
    elif pid < end_w:
        _scale_block(w_src, w_dst, pid - end_fs, n_w, s, BLOCK)
    elif pid < end_b:
        _scale_block(b_src, b_dst, pid - end_w, n_b, s, BLOCK)
    else:
        _scale_block(ft_src, ft_dst, pid - end_b, n_ft, -s, BLOCK)


def _target(device: torch.device) -> Tuple[Optional[int], int]:
    """(compute capability as 80, 90, ...; SM count) of the GPU the kernel is compiled for.

    CUDA tensors: their device. Under the interpreter: (None, 4), a few
    programs. Otherwise (CPU tensors without the interpreter: only the compile
    tier, python_tests/_aot.py, gets here) the target of Triton's active driver."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.major * 10 + props.minor, props.multi_processor_count
    if interpreted():
        return None, 4
    from triton.runtime.driver import driver

    active = driver.active
    props = active.utils.get_device_properties(active.get_current_device())
    return active.get_current_target().arch, props["multiprocessor_count"]


class _Config(NamedTuple):
    block_q: int
    block_cs: int
    block_ct: int
    num_warps: int
    num_stages: int


def _blocks(q: int, cs: int, ct: int, max_ct: int = 128, max_cs: int = 64, max_q: int = 32):
    # tl.dot needs every dimension >= 16
    block_ct = max(16, min(max_ct, triton.next_power_of_2(ct)))
    block_cs = max(16, min(max_cs, triton.next_power_of_2(cs)))
    block_q = max(16, min(max_q, triton.next_power_of_2(q)))
    return block_q, block_cs, block_ct


def _config(q: int, cs: int, ct: int, dtype: torch.dtype, prec: str, arch: Optional[int],
            grads: bool = True) -> _Config:
    """Tiles, warps and pipeline stages for one call; shapes, dtype, precision and arch only.

    32 pixels per tile everywhere: one tile per program, so 32-pixel tiles give
    the 2 x 132 programs an H100 wants from N*H*W >= 8,448 pixels (64 x 16 x 16
    is 512 programs). Full-precision fp32 (``ieee``) and fp64 products run on
    the FMA units, where a tl.dot operand holds its whole reduction length per
    thread: 64 (fp64: 32) teacher channels x 16 input channels per step on 4
    warps, which compiles without register spills on sm_80 and sm_90 with
    Triton 3.6 and 3.9 (64-pixel tiles on 8 warps spilled 20-44 B on 3.6); the
    fp32 forward alone (``grads`` False: no gradient products) on 8 warps (4
    spilled 4 B on sm_80 with 3.6).
    TF32, fp16 and bf16 go to the tensor cores through shared memory: 128
    teacher channels on 8 warps; on sm_80 (164 KB of shared memory per SM) two
    pipeline stages of 32 channels; on sm_90 three stages, of 64 channels for
    fp16/bf16 and 32 for TF32 (64 spilled on sm_90). ``arch`` None (the
    interpreter) takes sm_90's choice.
    """
    if prec == "ieee" and dtype in (torch.float32, torch.float64):
        wide = dtype == torch.float32
        block_q, block_cs, block_ct = _blocks(q, cs, ct, max_ct=64 if wide else 32, max_cs=16)
        return _Config(block_q, block_cs, block_ct, 4 if grads or not wide else 8, 2)
    small_smem = arch is not None and arch < 90
    block_q, block_cs, block_ct = _blocks(q, cs, ct, max_cs=32 if small_smem or prec == "tf32" else 64)
    num_warps = 8 if block_ct >= 128 else 4
    return _Config(block_q, block_cs, block_ct, num_warps, 2 if small_smem else 3)


def _num_programs(num_tiles: int, ct: int, cs: int) -> int:
    """Programs G: one per pixel tile (each writes its weight-gradient partial once),
    unless the (G, Ct, Cs) partials would pass _MAX_PARTIAL elements; then each of
    G programs sums a run of tiles into its own slot. Under the interpreter at most
    8 programs, so that the tests run both ways on small inputs."""
    g = min(num_tiles, max(1, _MAX_PARTIAL // max(1, ct * cs)))
    return min(g, 8) if interpreted() else g


_RED_BLOCK, _RED_ROWS = 256, 4  # the reduction's columns per program and rows per step
_SCALE_BLOCK = 1024  # the backward's elements per program


def hint_fused(fs: torch.Tensor, ft: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               loss: torch.Tensor, gfs: Optional[torch.Tensor], gw: Optional[torch.Tensor],
               gb: Optional[torch.Tensor], gft: Optional[torch.Tensor], allow_tf32: bool = False) -> None:
    """Run the fused kernel and the reduction (two launches): ``loss`` (0-dim, the
    accumulation dtype) gets mean r^2; ``gfs`` W^T r, ``gw`` sum_q r fs^T (Ct*Cs
    elements, accumulation dtype), ``gb`` sum_q r (Ct,), ``gft`` r, for those given.

    fs (N, Cs, H, W), ft (N, Ct, H, W) contiguous; weight contiguous with Ct*Cs
    elements; bias (Ct,) or None; gfs like fs, gft like ft (or None). The gradients
    are unscaled (no 2 / numel): the backward scales them (:func:`scale_grads`).
    """
    n, cs, h, w_ = fs.shape
    ct = ft.shape[1]
    p = h * w_
    q = n * p
    acc_t = torch.float64 if fs.dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if acc_t == torch.float64 else tl.float32
    prec = "tf32" if (allow_tf32 and fs.dtype == torch.float32) else "ieee"
    arch, _ = _target(fs.device)
    cfg = _config(q, cs, ct, fs.dtype, prec, arch, grads=gfs is not None or gw is not None)
    num_tiles = triton.cdiv(q, cfg.block_q)
    g = _num_programs(num_tiles, ct, cs)
    per_prog = triton.cdiv(num_tiles, g)
    g = triton.cdiv(num_tiles, per_prog)
    # partials: allocated, never filled (every program stores its slot before reading it)
    loss_part = torch.empty(g, dtype=acc_t, device=fs.device)
    gw_part = torch.empty((g, ct * cs) if gw is not None else (1,), dtype=acc_t, device=fs.device)
    gb_part = torch.empty((g, ct) if gb is not None else (1,), dtype=acc_t, device=fs.device)
    _hint_fused_kernel[(g,)](
        fs, ft, weight, bias if bias is not None else loss_part,
        loss_part, gfs if gfs is not None else fs, gw_part, gb_part, gft if gft is not None else ft,
        q, p, cs, ct, num_tiles, per_prog,
        HAS_BIAS=bias is not None, NEED_FS=gfs is not None, NEED_W=gw is not None, NEED_B=gb is not None,
        NEED_FT=gft is not None, ACC=acc_tl, PREC=prec,
        SINGLE_CT=ct <= cfg.block_ct, DOT_F32=fs.dtype == torch.bfloat16 and interpreted(), MULTI=per_prog > 1,
        BLOCK_Q=cfg.block_q, BLOCK_CS=cfg.block_cs, BLOCK_CT=cfg.block_ct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_counts["hint_fused"] += 1
    n_w = ct * cs if gw is not None else 0
    n_b = ct if gb is not None else 0
    w_progs, b_progs = triton.cdiv(n_w, _RED_BLOCK), triton.cdiv(n_b, _RED_BLOCK)
    _hint_reduce_kernel[(w_progs + b_progs + 1,)](
        loss_part, gw_part, gb_part, loss, gw if gw is not None else loss, gb if gb is not None else loss,
        g, n_w, n_b, n * ct * p, w_progs, b_progs,
        ACC=acc_tl, BLOCK_G=_RED_ROWS, BLOCK=_RED_BLOCK, num_warps=4,
    )
    launch_counts["hint_reduce"] += 1


def scale_grads(grad: torch.Tensor, numel: int, grads: Sequence[Optional[torch.Tensor]],
                dtypes: Sequence[Optional[torch.dtype]], in_place: bool) -> List[Optional[torch.Tensor]]:
    """The backward in one launch: [gfs, gw, gb, gft] (None where not wanted) times
    s = grad * 2 / numel (gft times -s), in the accumulation dtype, as ``dtypes``.

    ``in_place``: a gradient whose dtype is already its input's is overwritten
    (the forward's buffers are not read again); otherwise new tensors.
    """
    acc_t = torch.float64 if grad.dtype == torch.float64 else torch.float32
    outs: List[Optional[torch.Tensor]] = []
    args: List = []
    end = 0
    for i, (t, dt) in enumerate(zip(grads, dtypes)):
        if t is None:
            outs.append(None)
            src = dst = grad
            n = 0
        else:
            dst = t if (in_place and t.dtype == dt) else torch.empty(t.shape, dtype=dt, device=t.device)
            outs.append(dst)
            src, n = t, t.numel()
        end += triton.cdiv(n, _SCALE_BLOCK)
        args += [src, dst, n] + ([end] if i < 3 else [])
    if end:
        _hint_scale_kernel[(end,)](grad, numel, *args, ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
                                   BLOCK=_SCALE_BLOCK, num_warps=4)
        launch_counts["hint_scale"] += 1
    return outs
