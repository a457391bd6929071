r"""Triton kernels of the linear + KD loss over one chunk of M tokens (kdkernels/ops/linear_kd.py).

Inputs of a chunk: h_s (M, D_s), h_t (M, D_t), lm_head weights w_s (V, D_s),
w_t (V, D_t), optional biases (V,) and labels (M,). The logits
z = h w^T + b are formed tile by tile, [BM tokens, BV vocabulary entries], with
``tl.dot`` over BK-wide slices of D (fp32 accumulation; fp32 inputs in full
fp32, ``input_precision="ieee"``, no TF32).

``_lkd_fwd_kernel``, grid (token blocks, SPLIT vocabulary segments): each
program streams its segment's tiles once and keeps, per token, the online
states of three softmaxes (csrc/common/kd.h derives the first two):

    student at 1/T:  m_s, S_s = sum exp(z_s / T - e(m_s))
    teacher at 1/T:  m_t, S_t, W = sum exp(a_t) (a_t - a_s),  a = z / T - e(m)
    student at 1:    m_1, S_1 = sum exp(z_s - e(m_1)),  and z_y = z_s[label]

(e(m) = 0 for m = -inf). A larger maximum rescales the sums: S <- S exp(e(m) - e(m')),
W <- alpha_t (W - dc S_t) with dc = (e(m'_t) - e(m_t)) - (e(m'_s) - e(m_s)).
With STORE it also writes the chunk's two logit tiles to (M, V) scratch buffers
(what the gradient pass reads); without it (no gradient wanted) nothing of
size V leaves the registers. The program writes its segment's 8 states to
its own slot; ``_lkd_combine_kernel`` (one program per token) merges a token's
SPLIT slots in index order (deterministic, no atomics) into

    stats = (e(m_s), log S_s, e(m_t), log S_t, W / S_t, e(m_1), log S_1)
    KL    = W / S_t + log(S_s / S_t)
    CE    = e(m_1) + log S_1 - z_y      (NaN when the label is not in [0, V))

The merge also writes the token's loss row k (T^2 KL + ce_weight CE) (k = 1 for
a kept token, 0 for an ignored one) straight into the batch's row buffer, so a
chunk's forward is these two launches; ``_lkd_finish_kernel`` (one program, a
fixed order) sums the rows into the loss after the last chunk.

``_lkd_dlogits_kernel``, grid (tokens, vocabulary blocks), elementwise over the
scratch logits, in place: with per-token weights r_kd = rw T and r_ce = rw ce_weight
(formed in the kernel from the row weights rw),

    dz_s = r_kd (p_s - p_t) + r_ce (softmax(z_s) - onehot(label))
    dz_t = r_kd p_t ((a_t - a_s) - W / S_t)

The host then multiplies the gradient logits into dh = dz w and dw += dz^T h
with two GEMMs per chunk (torch.mm), summed over the chunks in order.

1/T enters as a float32 head plus the float32 rounding of the rest (Triton
passes Python floats as float32), exact enough for float64 inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch_counts
from ._host import f32_split, interpreted
from .kd import _eff, _max_keep, load_segments, merge_segments, store_stats  # the online-softmax pieces kd_loss's kernels use

STATS = 7
PARTS = 8
# Tile sizes (tokens, vocabulary, hidden). Module variables so that the tests can
# shrink them and run several tiles through the interpreter at small sizes.
_BM = 64
_BV = 64
_BK = 32
_TARGET_PROGRAMS = 512  # split the vocabulary until the grid has about this many programs
_EW_BLOCK = 1024        # vocabulary entries per program of the elementwise gradient kernel
_NUM_WARPS = 8  # sm_90 compile, BM = BV = 64, BK = 32: fp32 192 registers, no spill; bf16 128, 40 bytes


@triton.jit
def _tile_logits(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, D,
                 HAS_B: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """z[BM, BV] = h[rows] w[cols]^T (+ b[cols]) in ACC, over BK-wide slices of D."""
    if DOT_F32:
        dot_ty = tl.float32
    else:
        dot_ty = h_ptr.dtype.element_ty
    acc = tl.zeros([BM, BV], ACC)
    ks = tl.arange(0, BK)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * D
    w_rows = w_ptr + cols[:, None].to(tl.int64) * D
    for k0 in range(0, D, BK):
        kk = k0 + ks
        kmask = kk < D
        h = tl.load(h_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(h.to(dot_ty), tl.trans(w.to(dot_ty)), acc, input_precision=PREC, out_dtype=ACC)
    if HAS_B:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _lkd_fwd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, zs_ptr, zt_ptr, part_ptr,
    M, V, DS, DT, SEG, inv_head, inv_tail,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_Y: tl.constexpr, STORE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    nseg = tl.num_programs(1).to(tl.int64)
    inv_t = (tl.zeros([], ACC) + inv_head) + inv_tail
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < M
    if HAS_Y:
        y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    else:
        y = tl.full([BM], -1, tl.int64)
    start = seg * SEG
    end = tl.minimum(start + SEG, V)
    ms = tl.full([BM], float("-inf"), ACC)
    mt = tl.full([BM], float("-inf"), ACC)
    m1 = tl.full([BM], float("-inf"), ACC)
    ss = tl.zeros([BM], ACC)
    st = tl.zeros([BM], ACC)
    s1 = tl.zeros([BM], ACC)
    w = tl.zeros([BM], ACC)
    zy = tl.zeros([BM], ACC)
    for v0 in range(start, end, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < end
        zs = _tile_logits(hs_ptr, ws_ptr, bs_ptr, rows, rmask, cols, cmask, DS, HAS_BS, ACC, PREC, DOT_F32,
                          BM, BV, BK)
        zt = _tile_logits(ht_ptr, wt_ptr, bt_ptr, rows, rmask, cols, cmask, DT, HAS_BT, ACC, PREC, DOT_F32,
                          BM, BV, BK)
        if STORE:
            offs = rows[:, None] * V + cols[None, :]
            smask = rmask[:, None] & cmask[None, :]
            tl.store(zs_ptr + offs, zs, mask=smask)
            tl.store(zt_ptr + offs, zt, mask=smask)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], zs, 0.0), axis=1)
        z1 = tl.where(cmask[None, :], zs, float("-inf"))
        zs = tl.where(cmask[None, :], zs * inv_t, float("-inf"))
        zt = tl.where(cmask[None, :], zt * inv_t, float("-inf"))
        # grow the maxima; exp(-inf - e) = 0 drops an empty prefix
        ms_new = _max_keep(ms, tl.max(zs, axis=1))
        mt_new = _max_keep(mt, tl.max(zt, axis=1))
        m1_new = _max_keep(m1, tl.max(z1, axis=1))
        alpha_t = tl.exp(mt - _eff(mt_new))
        dc = (_eff(mt_new) - _eff(mt)) - (_eff(ms_new) - _eff(ms))
        w = tl.where(st == 0.0, 0.0, alpha_t * (w - dc * st))
        ss = ss * tl.exp(ms - _eff(ms_new))
        st = st * alpha_t
        s1 = s1 * tl.exp(m1 - _eff(m1_new))
        ms = ms_new
        mt = mt_new
        m1 = m1_new
        a_s = zs - _eff(ms)[:, None]
        a_t = zt - _eff(mt)[:, None]
        e_t = tl.exp(a_t)
        ss += tl.sum(tl.exp(a_s), axis=1)
        st += tl.sum(e_t, axis=1)
        s1 += tl.sum(tl.exp(z1 - _eff(m1)[:, None]), axis=1)
        on = e_t > 0.0  # where the teacher's term counts (also keeps -inf - -inf out)
        w += tl.sum(e_t * (tl.where(on, a_t, 0.0) - tl.where(on, a_s, 0.0)), axis=1)
    out = part_ptr + (rows * nseg + seg) * 8
    tl.store(out + 0, ms, mask=rmask)
    tl.store(out + 1, mt, mask=rmask)
    tl.store(out + 2, ss, mask=rmask)
    tl.store(out + 3, st, mask=rmask)
    tl.store(out + 4, w, mask=rmask)
    tl.store(out + 5, m1, mask=rmask)
    tl.store(out + 6, s1, mask=rmask)
    tl.store(out + 7, zy, mask=rmask)


@triton.jit
def _lkd_combine_kernel(part_ptr, y_ptr, keep_ptr, stats_ptr, rows_ptr, ce_ptr, SPLIT, V,
                        t2_head, t2_tail, cw_head, cw_tail,
                        HAS_Y: tl.constexpr, CE: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge a token's SPLIT segment states in index order; write its stats and its loss row
    k (T^2 KL + ce_weight CE), and with CE its k CE (k: the kept-row flag; 0 where not kept)."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_S)
    mask = k < SPLIT
    p = part_ptr + (row * SPLIT + k) * 8
    ms_k, mt_k, ss_k, st_k, w_k = load_segments(p, mask, ACC)
    m1_k = tl.load(p + 5, mask=mask, other=float("-inf")).to(ACC)
    s1_k = tl.load(p + 6, mask=mask, other=0.0).to(ACC)
    zy = tl.sum(tl.load(p + 7, mask=mask, other=0.0).to(ACC), axis=0)
    ms = tl.max(ms_k, axis=0)
    mt = tl.max(mt_k, axis=0)
    m1 = tl.max(m1_k, axis=0)
    # the gaps' reference is e(m_s) here (no rho): dc's second term is e(m_s) - e(m_s[k])
    ss, st, w = merge_segments(ms_k, mt_k, ss_k, st_k, w_k, ms, mt, _eff(ms_k), _eff(ms))
    s1 = tl.sum(tl.exp(m1_k - _eff(m1)) * s1_k, axis=0)
    out = stats_ptr + row * 7
    ec = store_stats(out, ms, ss, mt, st, w)
    tl.store(out + 5, _eff(m1))
    tl.store(out + 6, tl.log(s1))
    kl = ec + tl.log(ss / st)
    keep = tl.load(keep_ptr + row) != 0
    loss = kl * ((tl.zeros([], ACC) + t2_head) + t2_tail)
    if CE:
        ce = _eff(m1) + tl.log(s1) - zy
        if HAS_Y:
            y = tl.load(y_ptr + row).to(tl.int64)
            ce = tl.where((y >= 0) & (y < V), ce, float("nan"))
        loss = loss + ((tl.zeros([], ACC) + cw_head) + cw_tail) * ce
        tl.store(ce_ptr + row, tl.where(keep, ce, 0.0))
    else:
        tl.store(ce_ptr + row, tl.zeros([], ACC))
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))


@triton.jit(do_not_specialize=["N"])
def _lkd_finish_kernel(rows_ptr, ce_ptr, keep_ptr, loss_ptr, kept_ptr, ce_out_ptr, N,
                       REDUCE: tl.constexpr, CE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program, the batch's rows in a fixed order: K = sum k_n; with REDUCE (1 "sum",
    2 "batchmean") also loss = sum rows (/ K) and ce = sum ce_rows (/ K; 0 without CE)."""
    offs = tl.arange(0, BLOCK)
    acc_k = tl.zeros([BLOCK], ACC)
    acc_r = tl.zeros([BLOCK], ACC)
    acc_c = tl.zeros([BLOCK], ACC)
    for i0 in range(0, N, BLOCK):
        i = i0 + offs
        ok = i < N
        acc_k += tl.load(keep_ptr + i, mask=ok, other=0).to(ACC)
        if REDUCE != 0:
            acc_r += tl.load(rows_ptr + i, mask=ok, other=0.0)
            if CE:
                acc_c += tl.load(ce_ptr + i, mask=ok, other=0.0)
    kept = tl.sum(acc_k, axis=0)
    tl.store(kept_ptr, kept)
    if REDUCE != 0:
        loss = tl.sum(acc_r, axis=0)
        ce = tl.sum(acc_c, axis=0)
        if REDUCE == 2:
            loss = loss / kept
            ce = ce / kept
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
        if CE:
            tl.store(ce_out_ptr, ce.to(ce_out_ptr.dtype.element_ty))
        else:
            tl.store(ce_out_ptr, tl.zeros([], ce_out_ptr.dtype.element_ty))


@triton.jit
def _lkd_dlogits_kernel(
    zs_ptr, zt_ptr, stats_ptr, y_ptr, keep_ptr, rw_ptr, V, inv_head, inv_tail, t_head, t_tail, cw_head, cw_tail,
    HAS_Y: tl.constexpr, CE: tl.constexpr, TEACHER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place: z_s -> dz_s, and z_t -> dz_t when TEACHER (see the module docstring);
    r_kd = rw T and r_ce = rw ce_weight from the row weight rw (0 where the row is not kept)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    inv_t = (tl.zeros([], ACC) + inv_head) + inv_tail
    st = stats_ptr + row * 7
    ms = tl.load(st + 0)
    ls = tl.load(st + 1)
    mt = tl.load(st + 2)
    lt = tl.load(st + 3)
    ec = tl.load(st + 4)
    rw = tl.where(tl.load(keep_ptr + row) != 0, tl.load(rw_ptr + row).to(ACC), 0.0)
    r_kd = rw * ((tl.zeros([], ACC) + t_head) + t_tail)
    offs = row * V + cols
    z = tl.load(zs_ptr + offs, mask=mask, other=0.0)
    a_s = z * inv_t - ms
    a_t = tl.load(zt_ptr + offs, mask=mask, other=0.0) * inv_t - mt
    p_s = tl.exp(a_s - ls)
    p_t = tl.exp(a_t - lt)
    dz = r_kd * (p_s - p_t)
    if CE:
        m1 = tl.load(st + 5)
        l1 = tl.load(st + 6)
        r_ce = rw * ((tl.zeros([], ACC) + cw_head) + cw_tail)
        hot = tl.zeros([BLOCK], ACC)
        if HAS_Y:
            y = tl.load(y_ptr + row).to(tl.int64)
            hot = tl.where(cols == y, 1.0, 0.0).to(ACC)
        dz += r_ce * (tl.exp(z - m1 - l1) - hot)
    tl.store(zs_ptr + offs, dz, mask=mask)
    if TEACHER:
        on = p_t > 0.0
        gap = tl.where(on, a_t, 0.0) - tl.where(on, a_s, 0.0)
        tl.store(zt_ptr + offs, r_kd * p_t * (gap - ec), mask=mask)


def _tiles(dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BM, BV, BK, num_warps) of the forward kernel. float64 takes quarter tiles: at
    BM = BV = 64 its two [BM, BV] fp64 accumulators spilled 1,064 B on sm_80 (compile tier)."""
    if dtype == torch.float64:
        return min(_BM, 32), min(_BV, 32), min(_BK, 16), 4
    return _BM, _BV, _BK, _NUM_WARPS


def _plan(m: int, v: int, bm: int = None, bv: int = None) -> Tuple[int, int, int]:
    """(SEG, SPLIT, token blocks) of the forward grid: shapes only."""
    bm, bv = bm or _BM, bv or _BV
    blocks = triton.cdiv(m, bm)
    tiles = triton.cdiv(v, bv)
    split = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, blocks)))
    seg = triton.cdiv(tiles, split) * bv
    return seg, triton.cdiv(v, seg), blocks


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def lkd_fwd(h_s: torch.Tensor, w_s: torch.Tensor, b_s: Optional[torch.Tensor], h_t: torch.Tensor,
            w_t: torch.Tensor, b_t: Optional[torch.Tensor], labels: Optional[torch.Tensor], keep: torch.Tensor,
            temperature: float, ce_weight: float, rows: torch.Tensor, ce_rows: torch.Tensor, store: bool):
    """One chunk's forward. Writes ``rows`` (M,) = k (T^2 KL + ce_weight CE) and ``ce_rows``
    (M,) = k CE (zeros when ``ce_weight`` is 0; k = ``keep`` (M,) bool; accumulation dtype,
    contiguous, may be views of the whole batch's buffers). Returns (stats (M, 7), z_s, z_t):
    with ``store`` the chunk's logits as (M, V) accumulation-dtype tensors, else None, None."""
    m, ds = h_s.shape
    v, dt = w_s.shape[0], h_t.shape[1]
    acc_t = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    dev = h_s.device
    bm, bv, bk, warps = _tiles(h_s.dtype)
    seg, split, blocks = _plan(m, v, bm, bv)
    part = torch.empty(m * split * PARTS, dtype=acc_t, device=dev)
    zs = torch.empty(m, v, dtype=acc_t, device=dev) if store else part
    zt = torch.empty(m, v, dtype=acc_t, device=dev) if store else part
    head, tail = f32_split(1.0 / temperature)
    _lkd_fwd_kernel[(blocks, split)](
        h_s, w_s, b_s if b_s is not None else part, h_t, w_t, b_t if b_t is not None else part,
        labels if labels is not None else part, zs, zt, part, m, v, ds, dt, seg, head, tail,
        HAS_BS=b_s is not None, HAS_BT=b_t is not None, HAS_Y=labels is not None, STORE=store,
        ACC=_acc(h_s.dtype), PREC="ieee",
        DOT_F32=h_s.dtype == torch.bfloat16 and interpreted(),  # the interpreter's numpy dot has no bf16
        BM=bm, BV=bv, BK=bk, num_warps=warps,
    )
    launch_counts["linear_kd_fwd"] += 1
    stats = torch.empty(m, STATS, dtype=acc_t, device=dev)
    _lkd_combine_kernel[(m,)](
        part, labels if labels is not None else part, keep, stats, rows, ce_rows,
        split, v, *f32_split(temperature * temperature), *f32_split(ce_weight),
        HAS_Y=labels is not None, CE=ce_weight != 0.0, ACC=_acc(h_s.dtype),
        BLOCK_S=triton.next_power_of_2(split), num_warps=1,
    )
    launch_counts["linear_kd_combine"] += 1
    return stats, (zs if store else None), (zt if store else None)


def lkd_dlogits(zs: torch.Tensor, zt: torch.Tensor, stats: torch.Tensor, labels: Optional[torch.Tensor],
                keep: torch.Tensor, rw: torch.Tensor, temperature: float, ce_weight: float, teacher: bool) -> None:
    """Turn the stored logits into the gradient logits in place (zs -> dz_s; zt -> dz_t when
    ``teacher``), with the row weights rw (M,) (any float dtype, or bool: weights 1 and 0) where
    keep (M,) is set and 0 elsewhere: r_kd = rw T, r_ce = rw ce_weight (no CE term at 0)."""
    m, v = zs.shape
    block = min(_EW_BLOCK, triton.next_power_of_2(v))
    _lkd_dlogits_kernel[(m, triton.cdiv(v, block))](
        zs, zt, stats, labels if labels is not None else stats, keep, rw, v, *f32_split(1.0 / temperature),
        *f32_split(temperature), *f32_split(ce_weight),
        HAS_Y=labels is not None, CE=ce_weight != 0.0, TEACHER=teacher,
        ACC=_acc(zs.dtype), BLOCK=block, num_warps=4,
    )
    launch_counts["linear_kd_dlogits"] += 1


_FINISH_BLOCK = 1024
_REDUCE = {"none": 0, "sum": 1, "batchmean": 2}


def lkd_finish(rows: torch.Tensor, ce_rows: torch.Tensor, keep: torch.Tensor, reduction: str, ce: bool,
               dtype: torch.dtype):
    """(loss, K, ce) of the batch from its rows (N,) and ce_rows (N,) (accumulation dtype) and
    keep (N,) bool, in one launch: K = the kept rows (0-dim, accumulation dtype); loss and ce
    reduced by ``reduction`` (0-dim, ``dtype``; ce = 0 unless ``ce``), or for "none" the rows
    themselves as ``dtype``."""
    kept = torch.empty((), dtype=rows.dtype, device=rows.device)
    if reduction == "none":
        loss, ce_out = rows.to(dtype), ce_rows.to(dtype)
    else:
        loss = torch.empty((), dtype=dtype, device=rows.device)
        ce_out = torch.empty((), dtype=dtype, device=rows.device)
    _lkd_finish_kernel[(1,)](rows, ce_rows, keep, loss, kept, ce_out, rows.shape[0], REDUCE=_REDUCE[reduction],
                             CE=ce, ACC=_acc(rows.dtype), BLOCK=_FINISH_BLOCK, num_warps=4)
    launch_counts["linear_kd_finish"] += 1
    return loss, kept, ce_out
