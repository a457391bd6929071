r"""The chunked pass of ``linear_kd_loss`` (kdkernels/ops/linear_kd.py): loss rows and gradients.

The N tokens are taken ``chunk`` at a time. For a chunk of M tokens the backend
forms the two (M, V) logit blocks, the per-token statistics of the softmaxes
and the rows' losses; when gradients are wanted it turns the logit blocks into
the gradient logits (in place on the GPU) and two GEMMs per model add the
chunk's share:

    dh[chunk] = dz w          (M, D)
    dw       += dz^T h[chunk] (V, D), in the accumulation dtype, chunk after chunk
                (the first chunk writes dw and db: no zero fill)
    db       += dz^T 1         (V,), a GEMV

So at most a few (M, V) blocks exist at a time, never an (N, V) matrix, and the
sums over chunks run in a fixed order (deterministic).

Backends of a chunk:

- ``triton``: kdkernels/triton/linear_kd.py forms the logits with ``tl.dot``
  and runs the online softmaxes; the gradient-logit kernel works in place.
- ``cpp``: the logits by ``torch.nn.functional.linear`` (the CPU's BLAS), the
  KD statistics and KD gradient logits by the fused C++ KD kernels
  (csrc/cpu/kd.cpp, one streaming pass each), the cross-entropy term in torch.

The GEMMs of fp16/bf16 inputs take the gradient logits rounded to the inputs'
dtype (as eager autograd stores them) and accumulate in fp32; on CPU the weight
gradient is one fp32 GEMM per chunk.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import acc_dtype
from . import _native_args
from ._native_args import KD_STATS as STATS


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


def _cpp_chunk(hs: Tensor, w_s: Tensor, b_s: Optional[Tensor], ht: Tensor, w_t: Tensor, b_t: Optional[Tensor],
               y: Optional[Tensor], inv_t: float, ce_on: bool, grad: bool):
    """(stats, KL, CE or None, z_s, z_t) of one chunk on the CPU; z in the accumulation dtype."""
    acc = acc_dtype(hs.dtype)
    zs = F.linear(hs, w_s, b_s).to(acc).contiguous()
    zt = F.linear(ht, w_t, b_t).to(acc).contiguous()
    m, v = zs.shape
    stats = torch.empty(m, STATS, dtype=acc)  # the C++ kernel's per-row layout (kdkernels/ops/kd.py)
    kl = torch.empty(m, dtype=acc)
    _native_args.call("kd_fwd_cpu", acc, s=zs, t=zt, stats=stats, out=kl, rows=m, cols=v, inv_t=inv_t, out_scale=1.0,
                      reduce=False)
    ce = None
    if ce_on:
        ce = torch.logsumexp(zs, 1) - zs.gather(1, y[:, None])[:, 0]
    return stats, kl, ce, zs, zt


def _cpp_dlogits(zs: Tensor, zt: Tensor, stats: Tensor, y: Optional[Tensor], r_kd: Tensor,
                 r_ce: Optional[Tensor], inv_t: float, teacher: bool):
    """(dz_s, dz_t or None) of one CPU chunk (see kdkernels/triton/linear_kd.py for the formulas)."""
    m, v = zs.shape
    dzs = torch.empty_like(zs)
    dzt = torch.empty_like(zt) if teacher else None
    r_kd = r_kd.contiguous()
    _native_args.call("kd_bwd_cpu", zs.dtype, s=zs, t=zt, stats=stats, gout=r_kd, gout_scale=1.0, grad_s=dzs,
                      grad_t=dzt, rows=m, cols=v, inv_t=inv_t)
    if r_ce is not None:
        p1 = torch.softmax(zs, 1)
        dzs.add_(p1.mul_(r_ce[:, None]))
        dzs.scatter_add_(1, y[:, None], -r_ce[:, None])
    return dzs, dzt


def _add_grads(dz: Tensor, h: Tensor, w: Tensor, gh: Optional[Tensor], gw: Optional[Tensor],
               gb: Optional[Tensor], ones: Optional[Tensor], first: bool) -> None:
    """gh = dz w (this chunk's rows), gw += dz^T h, gb += dz^T 1 (the column sums, one GEMV with
    ``ones`` (>= M,) in the accumulation dtype); the ``first`` chunk writes gw and gb instead of
    adding (so they need no zero fill). One launch per gradient."""
    low = dz.dtype != h.dtype
    if gh is not None:
        if low:
            gh.copy_(torch.mm(dz.to(h.dtype), w))
        else:
            torch.mm(dz, w, out=gh)
    if gw is not None:
        if not low:
            if first:
                torch.mm(dz.t(), h, out=gw)
            else:
                gw.addmm_(dz.t(), h)
        elif h.device.type == "cpu":
            if first:
                torch.mm(dz.t(), h.to(gw.dtype), out=gw)
            else:
                gw.addmm_(dz.t(), h.to(gw.dtype))
        else:
            part = torch.mm(dz.to(h.dtype).t(), h)
            gw.copy_(part) if first else gw.add_(part)
    if gb is not None:
        if first:
            torch.mv(dz.t(), ones[:dz.shape[0]], out=gb)
        else:
            gb.addmv_(dz.t(), ones[:dz.shape[0]])


def run(backend: str, h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], h_t: Tensor, w_t: Tensor,
        b_t: Optional[Tensor], labels: Optional[Tensor], keep: Tensor, rw: Optional[Tensor], temperature: float,
        ce_weight: float, chunk: int, needs: Sequence[bool]) -> List[Tensor]:
    """[rows, ce_rows, gh_s, gw_s, gb_s, gh_t, gw_t, gb_t] over chunks of ``chunk`` tokens.

    rows (N,): k_n (T^2 KL_n + ce_weight CE_n), accumulation dtype; ce_rows (N,):
    k_n CE_n (the CE term's own value, for reporting it apart; zeros when
    ``ce_weight`` is 0). ``keep`` (N,) bool: k_n. The gradients (accumulation
    dtype, shaped like their inputs; an empty (0,) tensor where ``needs`` says
    no) are those of sum_n k_n rw_n (T^2 KL_n + ce_weight CE_n) with the row
    weights ``rw`` (N,) (any float dtype, or bool for weights 1 and 0; read only
    where k_n = 1); ``rw=None``: no gradients. Inputs contiguous; labels (N,)
    integer, with the ignored rows set to a valid class for the CPU backend.
    """
    acc = acc_dtype(h_s.dtype)
    n, v = h_s.shape[0], w_s.shape[0]
    need_hs, need_ws, need_bs, need_ht, need_wt, need_bt = [bool(x) for x in needs]
    if rw is None:
        need_hs = need_ws = need_bs = need_ht = need_wt = need_bt = False
    need_bs, need_bt = need_bs and b_s is not None, need_bt and b_t is not None
    want_s = need_hs or need_ws or need_bs
    want_t = need_ht or need_wt or need_bt
    grad = want_s or want_t
    ce_on = ce_weight != 0.0
    inv_t = 1.0 / temperature
    t2 = temperature * temperature

    def buf(need: bool, shape) -> Tensor:
        # no zero fill: the first chunk writes the weight and bias gradients (_add_grads)
        return torch.empty(shape, dtype=acc, device=h_s.device) if need else _empty(h_s, acc)

    gh_s = buf(need_hs, h_s.shape)
    gw_s = buf(need_ws, w_s.shape)
    gb_s = buf(need_bs, (v,))
    gh_t = buf(need_ht, h_t.shape)
    gw_t = buf(need_wt, w_t.shape)
    gb_t = buf(need_bt, (v,))
    rows = torch.empty(n, dtype=acc, device=h_s.device)
    ones = torch.ones(min(n, chunk), dtype=acc, device=h_s.device) if (need_bs or need_bt) else None
    ce_rows = torch.empty(n, dtype=acc, device=h_s.device)
    if not ce_on and backend != "triton":  # the Triton merge writes the zeros itself
        ce_rows.zero_()
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        hs, ht = h_s[c0:c1], h_t[c0:c1]
        y = labels[c0:c1] if labels is not None else None
        k = keep[c0:c1]
        if backend == "triton":
            from ..triton import linear_kd as tri

            # the merge kernel writes the chunk's loss rows itself: two launches per chunk
            stats, zs, zt = tri.lkd_fwd(hs, w_s, b_s, ht, w_t, b_t, y, k, temperature, ce_weight, rows[c0:c1],
                                        ce_rows[c0:c1], grad)
        else:
            stats, kl, ce, zs, zt = _cpp_chunk(hs, w_s, b_s, ht, w_t, b_t, y, inv_t, ce_on, grad)
            row = kl * t2
            if ce is not None:
                row = row + ce_weight * ce
            rows[c0:c1] = torch.where(k, row, torch.zeros_like(row))
            if ce is not None:
                ce_rows[c0:c1] = torch.where(k, ce, torch.zeros_like(ce))
        if not grad:
            continue
        r = rw[c0:c1]
        if backend == "triton":
            tri.lkd_dlogits(zs, zt, stats, y, k, r, temperature, ce_weight, want_t)
            dzs, dzt = zs, (zt if want_t else None)
        else:
            r = torch.where(k, r.to(acc), torch.zeros((), dtype=acc, device=k.device))
            dzs, dzt = _cpp_dlogits(zs, zt, stats, y, r * temperature, r * ce_weight if ce_on else None, inv_t,
                                    want_t)
        if want_s:
            _add_grads(dzs, hs, w_s, gh_s[c0:c1] if need_hs else None, gw_s if need_ws else None,
                       gb_s if need_bs else None, ones, c0 == 0)
        if want_t:
            _add_grads(dzt, ht, w_t, gh_t[c0:c1] if need_ht else None, gw_t if need_wt else None,
                       gb_t if need_bt else None, ones, c0 == 0)
        del zs, zt, dzs, dzt
    return [rows, ce_rows, gh_s, gw_s, gb_s, gh_t, gw_t, gb_t]
