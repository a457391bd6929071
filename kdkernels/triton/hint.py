r"""Triton kernel of the FitNets hint loss through a 1x1 regressor (docs/spec.md §3).

Pixels are the long dimension: pixel q in [0, N*H*W) is (n, p) = (q // P, q % P)
with P = H*W, and fs[n, c, p] sits at n*Cs*P + c*P + p (contiguous NCHW). Pixel,
channel-plane and partial-slot offsets are all formed in int64, so N*H*W and
N*Cs*H*W may pass 2^31. Program pid = (pixel group gq, channel group k), k
fastest, owns a balanced run of pixel tiles of BLOCK_Q pixels (one tile while
the grid fills the GPU) and the teacher channels of group k (all of them
unless the grid would be short; :func:`_plan`). For each tile and each chunk of
BLOCK_CT teacher channels of its group it computes the residual tile in
registers,

    r[ct, q] = sum_cs W[ct, cs] fs[cs, q] + b[ct] - ft[ct, q]        (tl.dot over Cs chunks)

and, in the epilogue, while r is still in registers:

    loss_part[pid]      = sum r^2
    gb_part[gq, ct]     = sum_q r[ct, q]                 (NEED_B)
    gft[ct, q]          = r                              (NEED_FT)
    gfs[cs, q]         += sum_ct W[ct, cs] r[ct, q]     (NEED_FS: tl.dot(W^T, r); with
                                                         channel groups: fs_part[k, cs, q])
    gw_part[gq, ct, cs] = sum_q r[ct, q] fs[cs, q]       (NEED_W: tl.dot(r, fs^T))

The channel groups own disjoint rows ct of gb_part, gw_part and gft, so those
are written once just as without groups (and have the same size); only W^T r
sums over every channel, so each group writes its share to its own fs-sized
partial. Each partial slot is stored once by the one program that owns it (no
zero fill, no atomics; a program with several tiles adds its later tiles to its
own slot, a group with several chunks its later chunks, in a fixed order), and
a second kernel sums the partials column by column in a fixed order and writes
the fs gradient (with channel groups), the loss (times 1/numel), the weight
and the bias gradients: two launches, deterministic. The gradients are
*unscaled* (no 2/numel, no grad_output): the backward applies that factor in
the accumulation dtype (one launch, :func:`scale_grads`), so fp16/bf16 storage
never holds the tiny scaled values. The regressed map is never written; fs is
read from DRAM once (the second read of a tile in the gradient loop, and the
other channel groups' reads of it, hit the cache).

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
from . import scale as _scale

_MAX_PARTIAL = 1 << 23  # elements of the (G, Ct, Cs) weight-gradient partials (32 MB in fp32)
# elements of all partials when the teacher channels are split (128 MB in fp32)
_MAX_SPLIT_PARTIAL = 1 << 25
_SPLIT_CT = 64  # at most this many teacher channels per chunk when they are split (tests lower it)
_TARGET_PROGRAMS: Optional[int] = None  # the grid to reach; None: 2 x the SM count (tests set it)


# the counts that grow with the batch only bound masks, loops and ranges: specialising them on
# divisibility by 16 would compile a new kernel per batch size for nothing (P, Cs, Ct set alignments: kept)
@triton.jit(do_not_specialize=["Q", "num_tiles", "pix_groups", "ct_groups"])
def _hint_fused_kernel(
    fs_ptr, ft_ptr, w_ptr, b_ptr,
    loss_ptr, gfs_ptr, gw_ptr, gb_ptr, gft_ptr,
    Q, P, Cs, Ct, num_tiles, pix_groups, ct_groups,
    HAS_BIAS: tl.constexpr, NEED_FS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    NEED_FT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, SINGLE_CT: tl.constexpr,
    DOT_F32: tl.constexpr, MULTI: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_CT: tl.constexpr,
):
    # program pid = (pixel group gq, teacher-channel group grp), the channel group fastest, so
    # that the groups of one pixel range run side by side and share its fs tile in the cache
    pid = tl.program_id(0)
    gq = pid // ct_groups
    grp = pid - gq * ct_groups
    # operands of tl.dot: the input dtype, or fp32 with DOT_F32 (bf16 under the
    # interpreter, whose numpy dot cannot read bf16)
    if DOT_F32:
        dot_ty = tl.float32
    else:
        dot_ty = fs_ptr.dtype.element_ty
    # this program's tiles [tile_lo, tile_hi) (balanced: 1 or 2 sizes) and channel chunks
    # [ch_lo, ch_hi) of BLOCK_CT (the launcher makes ct_groups divide the chunk count)
    tile_lo = ((gq.to(tl.int64) * num_tiles) // pix_groups).to(tl.int32)
    tile_hi = (((gq + 1).to(tl.int64) * num_tiles) // pix_groups).to(tl.int32)
    n_chunks = tl.cdiv(Ct, BLOCK_CT)
    ct_lo = (grp * n_chunks) // ct_groups * BLOCK_CT
    # one tile (not MULTI) and one chunk (SINGLE_CT) per program are constant trip counts:
    # straight-line code, as a loop they cost registers (spills on sm_80)
    if MULTI:
        my_tiles = tile_hi - tile_lo
    else:
        my_tiles = 1
    if SINGLE_CT:
        my_chunks = 1
    else:
        my_chunks = ((grp + 1) * n_chunks) // ct_groups - (grp * n_chunks) // ct_groups
    loss = tl.zeros([BLOCK_CT], ACC)
    gw_base = gq.to(tl.int64) * Ct * Cs  # this pixel group's slot of the partials (rows ct: this group's)
    gb_base = gq.to(tl.int64) * Ct
    # SPLIT: W^T r summed over this group's channels only, into the group's fs-sized partial
    # (the reduction sums the groups); otherwise the whole sum, into gfs itself
    if SPLIT:
        gfs_base = grp.to(tl.int64) * Q * Cs
    else:
        gfs_base = 0
    for i in range(0, my_tiles):
        # tile < num_tiles fits int32, but its first pixel tile * BLOCK_Q (and every
        # offset below) is int64: N*H*W may pass 2^31. A later tile (i > 0) adds to
        # what the program's first tile stored in its slot.
        tile = tile_lo + i
        q = tile.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        n = q // P
        p = q - n * P
        fs_q = n * Cs * P + p  # offset of fs[n, 0, p]
        ft_q = n * Ct * P + p  # offset of ft[n, 0, p]
        for c in range(0, my_chunks):
            ct0 = ct_lo + c * BLOCK_CT
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
                        g_offs = gfs_base + fs_q[None, :] + cs[:, None].to(tl.int64) * P
                        if not SINGLE_CT:  # later ct chunks of the group add to what earlier ones stored
                            g += tl.load(gfs_ptr + g_offs, mask=g_ok & (c > 0), other=0.0).to(ACC)
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
    """out[c] = scale * sum_g part[g, c] for BLOCK columns from col0 (int64), rows in a fixed order."""
    cols = col0 + tl.arange(0, BLOCK)
    c_ok = cols < n_cols
    acc = tl.zeros([BLOCK_G, BLOCK], ACC)
    for g0 in range(0, rows, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        acc += tl.load(part_ptr + g[:, None].to(tl.int64) * n_cols + cols[None, :],
                       mask=(g < rows)[:, None] & c_ok[None, :], other=0.0)
    tl.store(out_ptr + cols, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty), mask=c_ok)


# the counts that grow with the batch only bound loops and ranges: no specialisation per batch size
@triton.jit(do_not_specialize=["G", "pix_groups", "ct_groups", "n_fs", "numel", "fs_progs", "w_progs"])
def _hint_reduce_kernel(loss_part, gw_part, gb_part, fs_part, loss_ptr, gw_ptr, gb_ptr, gfs_ptr,
                        G, pix_groups, ct_groups, n_w, n_b, n_fs, numel, fs_progs, w_progs, b_progs,
                        ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_FS: tl.constexpr):
    """Sums the per-program partials, each column in a fixed order (deterministic):
    programs [0, fs_progs) the fs gradient over the ct_groups channel groups (BLOCK_FS
    columns each; none unless the fused pass split the teacher channels), then w_progs the
    weight gradient and b_progs the bias gradient over the pix_groups pixel groups (BLOCK
    columns each), then one program the loss over all G programs (times 1 / numel: the mean)."""
    pid = tl.program_id(0)
    one = tl.full([], 1.0, ACC)
    if pid < fs_progs:
        _sum_rows(fs_part, gfs_ptr, pid.to(tl.int64) * BLOCK_FS, n_fs, ct_groups, one, ACC, BLOCK_S, BLOCK_FS)
    elif pid < fs_progs + w_progs:
        _sum_rows(gw_part, gw_ptr, (pid - fs_progs).to(tl.int64) * BLOCK, n_w, pix_groups, one, ACC, BLOCK_G,
                  BLOCK)
    elif pid < fs_progs + w_progs + b_progs:
        _sum_rows(gb_part, gb_ptr, (pid - fs_progs - w_progs).to(tl.int64) * BLOCK, n_b, pix_groups, one, ACC,
                  BLOCK_G, BLOCK)
    else:
        acc = tl.zeros([BLOCK], ACC)
        for g0 in range(0, G, BLOCK):
            g = g0 + tl.arange(0, BLOCK)
            acc += tl.load(loss_part + g, mask=g < G, other=0.0)
        # times fl(1 / numel) as the eager op multiplies by the Python float 1 / numel
        tl.store(loss_ptr, tl.sum(acc, axis=0) * (one / numel.to(ACC)))


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
            grads: bool = True, aligned: bool = True) -> _Config:
    """Tiles, warps and pipeline stages for one call; shapes, dtype, precision and arch only.

    32 pixels per tile everywhere: one tile per program, so 32-pixel tiles give
    the 2 x 132 programs an H100 wants from N*H*W >= 8,448 pixels (64 x 16 x 16
    is 512 programs). Full-precision fp32 (``ieee``) and fp64 products run on
    the FMA units, where a tl.dot operand holds its whole reduction length per
    thread: 64 (fp64: 32) teacher channels x 16 input channels per step on 4
    warps, which compiles without register spills on sm_80 and sm_90 with
    Triton 3.6 and 3.9 (64-pixel tiles on 8 warps spilled 20-44 B on 3.6); the
    fp32 forward alone (``grads`` False: no gradient products) on 8 warps (4
    spilled 4 B on sm_80 with 3.6). fp32 with gradients when H*W is not a multiple of
    16 (``aligned`` False: the pixel loads are not vectorised and every element carries
    its own 64-bit address) on 8 warps and one stage: 7 x 7 at 512 -> 512 on 4 warps
    spilled 16-60 B on sm_90, on 8 warps and two stages 36 B on sm_80 with Triton 3.6.
    TF32, fp16 and bf16 go to the tensor cores through shared memory: 128
    teacher channels on 8 warps; on sm_80 (164 KB of shared memory per SM) two
    pipeline stages of 32 channels; on sm_90 three stages, of 64 channels for
    fp16/bf16 and 32 for TF32 (64 spilled on sm_90). ``arch`` None (the
    interpreter) takes sm_90's choice.
    """
    if prec == "ieee" and dtype in (torch.float32, torch.float64):
        wide = dtype == torch.float32
        block_q, block_cs, block_ct = _blocks(q, cs, ct, max_ct=64 if wide else 32, max_cs=16)
        if wide and grads and not aligned:
            return _Config(block_q, block_cs, block_ct, 8, 1)
        return _Config(block_q, block_cs, block_ct, 4 if grads or not wide else 8, 2)
    small_smem = arch is not None and arch < 90
    block_q, block_cs, block_ct = _blocks(q, cs, ct, max_cs=32 if small_smem or prec == "tf32" else 64)
    num_warps = 8 if block_ct >= 128 else 4
    return _Config(block_q, block_cs, block_ct, num_warps, 2 if small_smem else 3)


class _Plan(NamedTuple):
    cfg: _Config
    num_tiles: int
    pix_groups: int  # pixel groups: balanced runs of tiles; each has one weight-gradient partial slot
    ct_groups: int  # teacher-channel groups per pixel group (> 1: the fs gradient goes through partials)
    max_tiles: int  # most tiles one program takes (> 1: later tiles add into its slot)


def _split_choice(q: int, cs: int, ct: int, num_tiles: int, n_chunks: int, target: int, need_fs: bool,
                  need_w: bool, esize: int, acc_size: int, max_groups: int, multi_ok: bool = True) -> Tuple[int, int]:
    """(pixel groups, channel groups) for a grid that one program per pixel tile leaves short.

    Each divisor S of the channel-chunk count is a candidate with the fewest pixel groups
    G_q >= target / S (the weight-gradient partials grow with G_q). Its cost is the HBM
    traffic it adds: the (G_q, Ct, Cs) weight-gradient partials written and read, and
    S fs-sized partials of W^T r written and read (S > 1); the S - 1 more reads of fs
    only break ties (the groups of a pixel range run side by side: they hit the cache).
    Candidates whose partials pass _MAX_SPLIT_PARTIAL elements are out. The cheapest
    that reaches the target wins; if none does, the one with the most programs.
    ``multi_ok`` False: one tile per program only (fp64 split with several tiles per
    program spilled 16-20 B on sm_90)."""
    best = None
    for s in range(1, n_chunks + 1):
        if n_chunks % s:
            continue
        fs_part = s * q * cs if (s > 1 and need_fs) else 0
        room = _MAX_SPLIT_PARTIAL - fs_part
        if room <= 0:
            continue
        g_max = min(num_tiles, max_groups, room // (ct * cs) if need_w else num_tiles)
        if g_max < 1:
            continue
        g = min(g_max, -(-target // s))
        if not multi_ok and g < num_tiles:  # one tile per program, or not this candidate
            if g_max < num_tiles:
                continue
            g = num_tiles
        cost = (2 * g * ct * cs * acc_size if need_w else 0) + 2 * fs_part * acc_size
        key = (g * s < target, -(g * s) if g * s < target else 0, cost, (s - 1) * q * cs * esize)
        if best is None or key < best[0]:
            best = (key, g, s)
    return (best[1], best[2]) if best is not None else (1, 1)


def _plan(q: int, cs: int, ct: int, dtype: torch.dtype, prec: str, arch: Optional[int], sms: int,
          need_fs: bool, need_w: bool, aligned: bool = True) -> _Plan:
    """Tiles and grid of one call (shapes, dtype, precision and target only).

    One program per pixel tile, each writing its weight-gradient partial once, while
    that reaches the target (2 x the SM count; _TARGET_PROGRAMS when set) within
    _MAX_PARTIAL elements of partials; past the cap, balanced runs of tiles per
    program. When that leaves fewer programs than the target (few pixels, or the cap),
    the teacher channels are split too (_split_choice): program (pixel group, channel
    group) owns its channels' rows of the weight- and bias-gradient partials and of
    the teacher gradient (still written once, the same total size), and writes its
    channels' share of W^T r to a partial of fs's size, which the reduction sums over
    the groups in a fixed order. A split chunk holds at most _SPLIT_CT channels
    (tensor-core configurations come down from 128). Under the interpreter at most
    8 pixel groups, so that the tests run the multi-tile path on small inputs.
    """
    grads = need_fs or need_w
    cfg = _config(q, cs, ct, dtype, prec, arch, grads, aligned)
    num_tiles = triton.cdiv(q, cfg.block_q)
    cap = max(1, _MAX_PARTIAL // (ct * cs)) if need_w else num_tiles
    max_groups = 8 if interpreted() else num_tiles
    g0 = min(num_tiles, cap, max_groups)
    target = _TARGET_PROGRAMS if _TARGET_PROGRAMS is not None else 2 * sms
    split_ct = min(cfg.block_ct, _SPLIT_CT)
    if g0 < target and ct > split_ct:
        # narrower chunks than _config's 128 on tensor cores: 4 warps, as _config gives 64-channel tiles
        split_cfg = cfg._replace(block_ct=split_ct, num_warps=4) if split_ct < cfg.block_ct else cfg
        g, s = _split_choice(q, cs, ct, num_tiles, triton.cdiv(ct, split_ct), target, need_fs, need_w,
                             dtype.itemsize, 8 if dtype == torch.float64 else 4, max_groups,
                             multi_ok=dtype != torch.float64)
        if g * s > g0:
            return _Plan(split_cfg if s > 1 else cfg, num_tiles, g, s, triton.cdiv(num_tiles, g))
    return _Plan(cfg, num_tiles, g0, 1, triton.cdiv(num_tiles, g0))


_RED_TILE = 1024  # the reduction's elements per step, rows x columns (2048 spilled 12 B in fp64 on sm_80, Triton 3.6)


def _reduce_block(n_w: int, n_b: int, fs_progs: int, target: int) -> int:
    """Columns per program of the weight- and bias-gradient sums: the widest of 256 .. 32
    whose grid (with the fs sums' and the loss's programs) reaches the target."""
    for block in (256, 128, 64):
        if fs_progs + triton.cdiv(n_w, block) + triton.cdiv(n_b, block) + 1 >= target:
            return block
    return 32


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
    arch, sms = _target(fs.device)
    plan = _plan(q, cs, ct, fs.dtype, prec, arch, sms, gfs is not None, gw is not None, p % 16 == 0)
    cfg, g, s = plan.cfg, plan.pix_groups, plan.ct_groups
    split = s > 1 and gfs is not None
    # partials: allocated, never filled (every program stores its slot before reading it)
    dev = fs.device
    loss_part = torch.empty(g * s, dtype=acc_t, device=dev)
    gw_part = torch.empty((g, ct * cs) if gw is not None else (1,), dtype=acc_t, device=dev)
    gb_part = torch.empty((g, ct) if gb is not None else (1,), dtype=acc_t, device=dev)
    fs_part = torch.empty((s, q * cs), dtype=acc_t, device=dev) if split else loss_part
    n_chunks = triton.cdiv(ct, cfg.block_ct)
    _hint_fused_kernel[(g * s,)](
        fs, ft, weight, bias if bias is not None else loss_part,
        loss_part, fs_part if split else (gfs if gfs is not None else fs), gw_part, gb_part,
        gft if gft is not None else ft,
        q, p, cs, ct, plan.num_tiles, g, s,
        HAS_BIAS=bias is not None, NEED_FS=gfs is not None, NEED_W=gw is not None, NEED_B=gb is not None,
        NEED_FT=gft is not None, ACC=acc_tl, PREC=prec, SINGLE_CT=n_chunks == s,
        DOT_F32=fs.dtype == torch.bfloat16 and interpreted(), MULTI=plan.max_tiles > 1, SPLIT=split,
        BLOCK_Q=cfg.block_q, BLOCK_CS=cfg.block_cs, BLOCK_CT=cfg.block_ct,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_counts["hint_fused"] += 1
    n_w = ct * cs if gw is not None else 0
    n_b = ct if gb is not None else 0
    n_fs = q * cs if split else 0
    block_s = min(16, triton.next_power_of_2(s))  # the fs partials' rows (channel groups) per step
    block_fs = _RED_TILE // block_s
    fs_progs = triton.cdiv(n_fs, block_fs)
    block = _reduce_block(n_w, n_b, fs_progs, _TARGET_PROGRAMS if _TARGET_PROGRAMS is not None else 2 * sms)
    w_progs, b_progs = triton.cdiv(n_w, block), triton.cdiv(n_b, block)
    _hint_reduce_kernel[(fs_progs + w_progs + b_progs + 1,)](
        loss_part, gw_part, gb_part, fs_part, loss, gw if gw is not None else loss, gb if gb is not None else loss,
        gfs if split else loss,
        g * s, g, s, n_w, n_b, n_fs, n * ct * p, fs_progs, w_progs, b_progs,
        ACC=acc_tl, BLOCK_G=_RED_TILE // block, BLOCK=block, BLOCK_S=block_s, BLOCK_FS=block_fs, num_warps=4,
    )
    launch_counts["hint_reduce"] += 1


def scale_grads(grad: torch.Tensor, numel: int, grads: Sequence[Optional[torch.Tensor]],
                dtypes: Sequence[Optional[torch.dtype]], in_place: bool) -> List[Optional[torch.Tensor]]:
    """The backward in one launch: [gfs, gw, gb, gft] (None where not wanted) times
    s = grad * 2 / numel (gft times -s), in the accumulation dtype, as ``dtypes``.

    ``in_place``: a gradient whose dtype is already its input's is overwritten
    (the forward's buffers are not read again); otherwise new tensors.
    """
    return _scale.scale_grads(grad, numel, grads, dtypes, num=2.0, negate=(3,), in_place=in_place,
                              name="hint_scale")
