r"""Triton kernel of the FitNets hint loss through a 1x1 regressor (docs/spec.md §3).

Pixels are the long dimension: pixel q in [0, N*H*W) is (n, p) = (q // P, q % P)
with P = H*W, and fs[n, c, p] sits at n*Cs*P + c*P + p (contiguous NCHW). Pixel,
channel-plane and partial-slot offsets are all formed in int64, so N*H*W and
N*Cs*H*W may pass 2^31. A program owns the pixel tiles pid, pid + G, pid + 2G, ... of
BLOCK_Q pixels each (G programs). For each tile and each chunk of BLOCK_CT
teacher channels it computes the residual tile in registers,

    r[ct, q] = sum_cs W[ct, cs] fs[cs, q] + b[ct] - ft[ct, q]        (tl.dot over Cs chunks)

and, in the epilogue, while r is still in registers:

    loss_part[pid]      += sum r^2
    gb_part[pid, ct]    += sum_q r[ct, q]                 (NEED_B)
    gft[ct, q]           = r                              (NEED_FT)
    gfs[cs, q]          += sum_ct W[ct, cs] r[ct, q]     (NEED_FS: tl.dot(W^T, r))
    gw_part[pid, ct, cs] += sum_q r[ct, q] fs[cs, q]      (NEED_W: tl.dot(r, fs^T))

The gradients are *unscaled* (no 2/numel, no grad_output): the op applies
that factor later in the accumulation dtype, so fp16/bf16 storage never holds
the tiny scaled values. Every partial is owned by one program and updated by
that program only (read-modify-write of its own slot, in a fixed order), and
the host sums the G partials with ``torch.sum``: deterministic, no atomics.
The regressed map is never written; fs is read from DRAM once (the second read
of a tile in the gradient loop hits the cache).

Precision: fp32 inputs are multiplied with ``input_precision="ieee"`` (full
fp32, no TF32) unless ``allow_tf32``; fp64 in fp64; fp16/bf16 inputs go to
the tensor cores in their own dtype with fp32 accumulation, and the gradient
products use r rounded to that dtype (as eager PyTorch stores r).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import interpreted

_MAX_PARTIAL = 1 << 22  # elements of the (G, Ct, Cs) weight-gradient partials


# Q and num_tiles only bound masks and loops: specialising them on divisibility by 16
# would compile a new kernel per batch size for nothing (P, Cs, Ct set alignments: kept)
@triton.jit(do_not_specialize=["Q", "num_tiles"])
def _hint_fused_kernel(
    fs_ptr, ft_ptr, w_ptr, b_ptr,
    loss_ptr, gfs_ptr, gw_ptr, gb_ptr, gft_ptr,
    Q, P, Cs, Ct, num_tiles,
    HAS_BIAS: tl.constexpr, NEED_FS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    NEED_FT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SINGLE_CT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_CT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # operands of tl.dot: the input dtype, or fp32 with DOT_F32 (bf16 under the
    # interpreter, whose numpy dot cannot read bf16)
    if DOT_F32:
        dot_ty = tl.float32
    else:
        dot_ty = fs_ptr.dtype.element_ty
    loss = tl.zeros([BLOCK_CT], ACC)
    gw_base = pid.to(tl.int64) * Ct * Cs  # this program's slot of the partials
    gb_base = pid.to(tl.int64) * Ct
    for i in range(0, tl.cdiv(num_tiles - pid, nprog)):
        # tiles pid, pid + G, ...; tile < num_tiles fits int32, but its first pixel
        # tile * BLOCK_Q (and every offset below) is int64: N*H*W may pass 2^31.
        # (Not `for tile in range(pid, num_tiles, G)`: the interpreter runs that
        # loop on Python ints, and python_tests/test_large_index.py could not see
        # a missing cast.)
        tile = pid + i * nprog
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
                gb = tl.load(gb_ptr + gb_offs, mask=ct_ok, other=0.0)
                tl.store(gb_ptr + gb_offs, gb + tl.sum(r, axis=1), mask=ct_ok)
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
                        gw = tl.load(gw_ptr + gw_offs, mask=gw_ok, other=0.0)
                        gw = tl.dot(rd, xt.to(dot_ty), gw, input_precision=PREC, out_dtype=ACC)
                        tl.store(gw_ptr + gw_offs, gw, mask=gw_ok)
    tl.store(loss_ptr + pid, tl.sum(loss, axis=0))


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


def _num_programs(num_tiles: int, ct: int, cs: int, sm_count: int) -> int:
    """Programs G: two per SM on a GPU (a few under the interpreter), and
    never so many that the (G, Ct, Cs) partials pass _MAX_PARTIAL elements."""
    return max(1, min(num_tiles, 2 * sm_count, _MAX_PARTIAL // max(1, ct * cs)))


class _Config(NamedTuple):
    block_q: int
    block_cs: int
    block_ct: int
    num_warps: int
    num_stages: int


def _blocks(q: int, cs: int, ct: int, max_ct: int = 128, max_cs: int = 64, max_q: int = 64):
    # tl.dot needs every dimension >= 16
    block_ct = max(16, min(max_ct, triton.next_power_of_2(ct)))
    block_cs = max(16, min(max_cs, triton.next_power_of_2(cs)))
    block_q = max(16, min(max_q, triton.next_power_of_2(q)))
    return block_q, block_cs, block_ct


def _config(q: int, cs: int, ct: int, dtype: torch.dtype, prec: str, arch: Optional[int]) -> _Config:
    """Tiles, warps and pipeline stages for one call; shapes, dtype, precision and arch only.

    Full-precision fp32 (``ieee``) and fp64 products run on the FMA units, where a
    tl.dot operand holds its whole reduction length per thread: the tiles stay at
    64 x 64 (fp64: 32 x 32) with 16 input channels per step, which compiles to no
    register spills (128 registers at 8 warps for fp32 on sm_80, where 128 x 64
    tiles with 64 channels per step took 255 registers and spilled 1-2 KB).
    TF32, fp16 and bf16 go to the tensor cores through shared memory: a
    128 x 64 tile; on sm_80 (164 KB of shared memory per SM) two pipeline
    stages of 32 channels, where three stages of 64 needed 192 KB; on sm_90
    three stages, of 64 channels for fp16/bf16 and 32 for TF32.
    ``arch`` None (the interpreter) takes sm_90's choice.
    """
    if prec == "ieee" and dtype in (torch.float32, torch.float64):
        wide = dtype == torch.float32
        block_q, block_cs, block_ct = _blocks(q, cs, ct, max_ct=64 if wide else 32, max_cs=16,
                                              max_q=64 if wide else 32)
        num_warps = 8 if block_ct * block_q >= 64 * 64 else 4
        return _Config(block_q, block_cs, block_ct, num_warps, 2)
    small_smem = arch is not None and arch < 90
    # TF32 operands are 4 bytes: 64 channels per step spilled ~480 B on sm_90 (255 registers)
    block_q, block_cs, block_ct = _blocks(q, cs, ct, max_cs=32 if small_smem or prec == "tf32" else 64)
    num_warps = 8 if block_ct * block_q >= 128 * 64 else 4
    return _Config(block_q, block_cs, block_ct, num_warps, 2 if small_smem else 3)


def hint_fused(fs: torch.Tensor, ft: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               gfs: Optional[torch.Tensor], gft: Optional[torch.Tensor], need_w: bool, need_b: bool,
               allow_tf32: bool = False):
    """Run the fused kernel; returns (sum r^2, sum_q r fs^T or None, sum_q r or None) in the
    accumulation dtype, and fills ``gfs`` with W^T r and ``gft`` with r when they are given.

    fs (N, Cs, H, W), ft (N, Ct, H, W) contiguous; weight contiguous with Ct*Cs
    elements; bias (Ct,) or None; gfs like fs, gft like ft (or None).
    """
    n, cs, h, w_ = fs.shape
    ct = ft.shape[1]
    p = h * w_
    q = n * p
    acc_t = torch.float64 if fs.dtype == torch.float64 else torch.float32
    prec = "tf32" if (allow_tf32 and fs.dtype == torch.float32) else "ieee"
    arch, sm_count = _target(fs.device)
    cfg = _config(q, cs, ct, fs.dtype, prec, arch)
    num_tiles = triton.cdiv(q, cfg.block_q)
    g = _num_programs(num_tiles, ct, cs, sm_count)
    loss_part = torch.empty(g, dtype=acc_t, device=fs.device)
    gw_part = torch.zeros((g, ct, cs) if need_w else (1,), dtype=acc_t, device=fs.device)
    gb_part = torch.zeros((g, ct) if need_b else (1,), dtype=acc_t, device=fs.device)
    dummy = loss_part
    _hint_fused_kernel[(g,)](
        fs, ft, weight, bias if bias is not None else dummy,
        loss_part, gfs if gfs is not None else fs, gw_part, gb_part, gft if gft is not None else ft,
        q, p, cs, ct, num_tiles,
        HAS_BIAS=bias is not None, NEED_FS=gfs is not None, NEED_W=need_w, NEED_B=need_b,
        NEED_FT=gft is not None, ACC=tl.float64 if acc_t == torch.float64 else tl.float32, PREC=prec,
        SINGLE_CT=ct <= cfg.block_ct, DOT_F32=fs.dtype == torch.bfloat16 and interpreted(),
        BLOCK_Q=cfg.block_q, BLOCK_CS=cfg.block_cs, BLOCK_CT=cfg.block_ct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_counts["hint_fused"] += 1
    # second, small reduction over the G programs (fixed order: deterministic)
    loss_sum = loss_part.sum()
    gw = gw_part.sum(0) if need_w else None
    gb = gb_part.sum(0) if need_b else None
    return loss_sum, gw, gb
