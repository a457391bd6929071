r"""Batched ridge solve of the FSKD normal equations (SPEC section 5).

For every block b, with G (Cs, Cs), Hc (Ct, Cs) from :class:`GramStats`,

    Q_b = argmin_Q ||Q S - T||^2 + lam ||Q - Q0||^2
        = (Hc + lam Q0) (G + lam I)^-1,          Q_b of shape (Ct, Cs)

with lam = alpha * trace(G) / Cs (relative ridge) and Q0 = I ("identity",
needs Cs = Ct) or 0 ("zero"). A channel whose diagonal G_ii is 0 (dead: it was
0 on every pixel) gets A_ii = 1 and keeps its prior column, Q[:, i] = Q0[:, i].

Blocks are solved in batched fp64 ``cholesky_ex`` calls (upper factor
A = U^T U) and one ``cholesky_solve`` per batch on (B, C, C) stacks:
block b sits in the top-left corner of an identity matrix of its batch's widest
size, so the padded system is blockdiag(A_b, I) and its solution restricted to
the corner is exactly Q_b. Blocks of similar width (>= 0.8 x the widest of the
batch) share one batch; much narrower ones get their own, because padding a
64-channel block to 512 would cost 512^3 instead of 64^3 flops (for ResNet-18's
eight blocks, one single padded batch is ~3x the flops of four batches, one per
width). Nothing is read back to the host per block: the only sync is one
``any()`` over all error flags at the end. Entries whose factorisation failed
are refactorised alone with jitter eps * mean(diag A), eps = 1e-12, 1e-11, ...
(x10 per try, at most ``max_retries`` tries); a block that still fails, or whose
statistics are not finite, raises with its index. ``torch.linalg.lstsq`` is
never used (its CUDA driver assumes full rank).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch

from ._checks import check_alpha, check_choice
from .stats import GramStats

PRIORS = ("identity", "zero")
JITTER0 = 1e-12
GROUP_RATIO = 0.8


def solve(stats: Union[GramStats, Sequence[GramStats]], alpha: float = 1e-4,
          prior: str = "identity", *, max_retries: int = 10,
          names: Optional[Sequence[str]] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Solve every block's Q with batched fp64 Cholesky (one batch per width group).

    Args:
        stats: one :class:`GramStats` or a sequence of them (may differ in width).
        alpha: relative ridge, lam = alpha * trace(G) / Cs; 0 for plain least squares.
        prior: ``"identity"`` (Q0 = I, needs Cs = Ct) or ``"zero"`` (Q0 = 0).
        max_retries: jittered refactorisations of a failed block (x10 each).
        names: optional block names used in warnings and errors.

    Returns:
        fp64 Q of shape (Ct, Cs) on the statistics' device: one tensor for one
        ``GramStats``, else a list in the input order.

    Warns when a block has fewer pixels than channels (underdetermined: the
    ridge decides the solution); raises ``ValueError`` on empty statistics,
    mixed devices or an identity prior with Cs != Ct.
    """
    single = isinstance(stats, GramStats)
    blocks = [stats] if single else list(stats) if isinstance(stats, (list, tuple)) else None
    if blocks is None:
        raise TypeError(f"stats must be a GramStats or a list of them, got {type(stats).__name__}")
    if not blocks:
        raise ValueError("stats is empty: nothing to solve")
    alpha = check_alpha(alpha)
    check_choice(prior, "prior", PRIORS)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if names is None:
        names = [f"block {i}" for i in range(len(blocks))]
    elif len(names) != len(blocks):
        raise ValueError(f"names has {len(names)} entries for {len(blocks)} blocks")
    for i, st in enumerate(blocks):
        if not isinstance(st, GramStats):
            raise TypeError(f"stats[{i}] must be a GramStats, got {type(st).__name__}")
        if st.count == 0:
            raise ValueError(f"{names[i]}: no samples were accumulated (count 0)")
        if prior == "identity" and st.c_in != st.c_out:
            raise ValueError(
                f"{names[i]}: prior='identity' needs as many student as teacher channels, "
                f"got Cs={st.c_in}, Ct={st.c_out} (Q would be {st.c_out}x{st.c_in}); use prior='zero'")
        if st.count < st.c_in:
            warnings.warn(
                f"{names[i]}: {st.count} pixels for {st.c_in} channels: underdetermined, "
                f"the ridge (alpha={alpha}) decides the solution", RuntimeWarning, stacklevel=2)
    devices = {st.device for st in blocks}
    if len(devices) != 1:
        raise ValueError(f"stats: all statistics must live on one device, got {sorted(map(str, devices))}")

    qs = ridge_solve([st.G for st in blocks], [st.Hc for st in blocks], alpha,
                     prior == "identity", max_retries, names)
    return qs[0] if single else qs


def ridge_solve(gs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor], alpha: float,
                identity_prior: bool, max_retries: int = 10,
                names: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
    """Q_b = (Hc_b + lam_b Q0_b)(G_b + lam_b I)^-1 for all b, in padded batches.

    gs[b]: (Cs_b, Cs_b), hs[b]: (Ct_b, Cs_b), any float dtype, one device.
    Returns fp64 (Ct_b, Cs_b) tensors in input order. No host sync unless a
    factorisation fails, apart from one ``any()`` over all error flags.
    """
    nb = len(gs)
    names = list(names) if names is not None else [f"block {i}" for i in range(nb)]
    groups = width_groups([g.shape[0] for g in gs])
    systems = [_padded_system([gs[i] for i in grp], [hs[i] for i in grp], alpha, identity_prior)
               for grp in groups]
    chols, bads = [], []
    for a, _, nonfinite in systems:
        chol, info = torch.linalg.cholesky_ex(a, upper=True)
        chols.append(chol)
        bads.append((info != 0) | nonfinite)
    if bool(torch.cat(bads).any()):  # the one host sync
        for grp, (_, _, nonfinite) in zip(groups, systems):
            bad_names = [names[grp[k]] for k in nonfinite.nonzero().flatten().tolist()]
            if bad_names:
                raise ValueError(f"{', '.join(bad_names)}: the statistics contain NaN or inf (check the features)")
        for j, (grp, (a, _, _)) in enumerate(zip(groups, systems)):
            chols[j] = _retry(a, chols[j], bads[j], max_retries, [names[i] for i in grp])

    out: List[Optional[torch.Tensor]] = [None] * nb
    for grp, (_, r, _), chol in zip(groups, systems, chols):
        # Q A = R  <=>  A Q^T = R^T (A symmetric). With MKL, the upper factor and the
        # transposed (column-major) views are what LAPACK wants: 1.1-2.5x faster than
        # the lower factor with two right-side triangular solves (benchmarks/cases/fskd.py).
        q = torch.cholesky_solve(r.transpose(1, 2), chol, upper=True).transpose(1, 2).contiguous()
        for k, i in enumerate(grp):
            qk = q[k, : hs[i].shape[0], : gs[i].shape[0]]
            out[i] = qk if qk.is_contiguous() else qk.contiguous()  # a view unless padded
    return out


def width_groups(widths: Sequence[int]) -> List[List[int]]:
    """Block indices grouped by width, widest first: a block joins the group of
    width W when its own width is at least ``GROUP_RATIO * W``, so padding never
    costs more than about 2x the flops of its own system (ResNet-18: 4 groups)."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    groups: List[List[int]] = []
    for i in order:
        if groups and widths[i] >= GROUP_RATIO * widths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _padded_system(gs, hs, alpha: float, identity_prior: bool):
    """(A, R, nonfinite) of one group: A (B, C, C) = blockdiag(G_b + lam_b I, I) with
    dead channels set to 1, R (B, Ct, C) = Hc_b + lam_b Q0_b (with the prior's
    column for a dead channel), nonfinite (B,) bool."""
    nb = len(gs)
    dev = gs[0].device
    f64 = torch.float64
    cs_list = [g.shape[0] for g in gs]
    ct_list = [h.shape[0] for h in hs]
    cs_max, ct_max = max(cs_list), max(ct_list)

    padded = not (min(cs_list) == cs_max and min(ct_list) == ct_max)
    if not padded:
        a = torch.stack(gs).to(f64)
        r = torch.stack(hs).to(f64)
    else:
        a = torch.eye(cs_max, dtype=f64, device=dev).repeat(nb, 1, 1)
        r = torch.zeros(nb, ct_max, cs_max, dtype=f64, device=dev)
        for b, (g, h) in enumerate(zip(gs, hs)):
            a[b, : cs_list[b], : cs_list[b]] = g
            r[b, : ct_list[b], : cs_list[b]] = h
    # NaN/inf anywhere makes the sum non-finite: one cheap reduction instead of isfinite()
    nonfinite = ~torch.isfinite(a.sum((1, 2)) + r.sum((1, 2)))

    diag = a.diagonal(dim1=1, dim2=2)  # view (B, C)
    if padded:
        # valid[b, j]: channel j exists in block b (filled on the device: no host copy, no sync)
        valid = torch.zeros(nb, cs_max, dtype=torch.bool, device=dev)
        for b, c in enumerate(cs_list):
            valid[b, :c] = True
        lam = alpha * (diag * valid).sum(1) / torch.tensor(cs_list, dtype=f64).to(dev, non_blocking=True)
        lam_diag = lam[:, None] * valid  # 0 on the padding
        dead = valid & (diag == 0)
    else:  # every channel is real: no mask
        lam = alpha * diag.sum(1) / cs_max
        lam_diag = lam[:, None]
        dead = diag == 0
    diag.add_(lam_diag)
    diag.masked_fill_(dead, 1.0)  # a dead channel's row and column of G are 0: A_ii = 1
    if identity_prior:  # R += lam I, and R[:, i] = Q0[:, i] = e_i for a dead channel i
        rdiag = r.diagonal(dim1=1, dim2=2)
        rdiag.add_(lam_diag)
        rdiag.masked_fill_(dead, 1.0)
    return a, r, nonfinite


def _retry(a, chol, bad, max_retries, names):
    """Refactorise the failed entries alone with growing jitter; raise if any stays failed."""
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return chol
    scale = a[idx].diagonal(dim1=1, dim2=2).mean(1)  # (F,)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    jitter = JITTER0
    for _ in range(max_retries):
        l_try, info = torch.linalg.cholesky_ex(a[idx] + (jitter * scale)[:, None, None] * eye, upper=True)
        ok = info == 0
        chol[idx[ok]] = l_try[ok]
        idx, scale = idx[~ok], scale[~ok]
        if idx.numel() == 0:
            return chol
        jitter *= 10.0
    which = ", ".join(names[i] for i in idx.tolist())
    tried = f"even with jitter up to {jitter / 10:g} * mean(diag A)" if max_retries else "(no retries)"
    raise torch.linalg.LinAlgError(
        f"{which}: Cholesky of G + lam*I failed {tried}; the features are degenerate "
        f"(raise alpha or use more samples)")
