r"""Batched ridge solve of the FSKD normal equations (SPEC section 5).

For every block b, with G (Cs, Cs), Hc (Ct, Cs) from :class:`GramStats`,

    Q_b = argmin_Q ||Q S - T||^2 + lam ||Q - Q0||^2
        = (Hc + lam Q0) (G + lam I)^-1,          Q_b of shape (Ct, Cs)

with lam = alpha * trace(G) / Cs (relative ridge) and Q0 = I ("identity",
needs Cs = Ct) or 0 ("zero"). A channel whose diagonal G_ii is 0 (dead: it was
0 on every pixel) gets A_ii = 1 and keeps its prior column, Q[:, i] = Q0[:, i].

All blocks go through ONE fp64 ``cholesky_ex`` on a (B, C, C) batch: block b
sits in the top-left corner of an identity matrix of the widest size, so the
padded system is blockdiag(A_b, I) and its solution restricted to the corner is
exactly Q_b. Nothing is read back to the host per block: the only sync is one
``any()`` over the error flags at the end. Entries whose factorisation failed
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


def solve(stats: Union[GramStats, Sequence[GramStats]], alpha: float = 1e-4,
          prior: str = "identity", *, max_retries: int = 10,
          names: Optional[Sequence[str]] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Solve every block's Q in one batched fp64 Cholesky.

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
        raise ValueError(f"all statistics must live on one device, got {sorted(map(str, devices))}")

    qs = ridge_solve([st.G for st in blocks], [st.Hc for st in blocks], alpha,
                     prior == "identity", max_retries, names)
    return qs[0] if single else qs


def ridge_solve(gs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor], alpha: float,
                identity_prior: bool, max_retries: int = 10,
                names: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
    """Q_b = (Hc_b + lam_b Q0_b)(G_b + lam_b I)^-1 for all b in one padded batch.

    gs[b]: (Cs_b, Cs_b), hs[b]: (Ct_b, Cs_b), any float dtype, one device.
    Returns fp64 (Ct_b, Cs_b) tensors. No host sync unless a factorisation fails.
    """
    nb = len(gs)
    names = names or [f"block {i}" for i in range(nb)]
    dev = gs[0].device
    f64 = torch.float64
    cs_list = [g.shape[0] for g in gs]
    ct_list = [h.shape[0] for h in hs]
    cs_max, ct_max = max(cs_list), max(ct_list)

    # padded batch: A = blockdiag(G_b, I), R = Hc_b in the corner, Q0 = I or 0
    a = torch.eye(cs_max, dtype=f64, device=dev).repeat(nb, 1, 1)
    r = torch.zeros(nb, ct_max, cs_max, dtype=f64, device=dev)
    for b, (g, h) in enumerate(zip(gs, hs)):
        a[b, : cs_list[b], : cs_list[b]] = g
        r[b, : ct_list[b], : cs_list[b]] = h
    q0 = torch.zeros_like(r)
    if identity_prior:
        q0.diagonal(dim1=1, dim2=2).fill_(1.0)
    # valid[b, j]: channel j exists in block b (host-built, one small copy)
    widths = torch.tensor(cs_list, device=dev)
    valid = torch.arange(cs_max, device=dev)[None, :] < widths[:, None]  # (B, Cs_max)

    diag = a.diagonal(dim1=1, dim2=2)  # view (B, Cs_max)
    trace = torch.where(valid, diag, torch.zeros((), dtype=f64, device=dev)).sum(1)
    lam = alpha * trace / widths.to(f64)  # (B,)
    dead = valid & (diag == 0)
    diag.add_(torch.where(valid, lam[:, None], torch.zeros((), dtype=f64, device=dev)))
    diag.masked_fill_(dead, 1.0)
    r.add_(lam[:, None, None] * q0)
    r = torch.where(dead[:, None, :], q0, r)
    nonfinite = ~(torch.isfinite(a).flatten(1).all(1) & torch.isfinite(r).flatten(1).all(1))

    chol, info = torch.linalg.cholesky_ex(a)
    bad = (info != 0) | nonfinite
    if bool(bad.any()):  # the one host sync
        chol = _retry(a, chol, bad, nonfinite, max_retries, names)

    # Q A = R with A symmetric  <=>  A Q^T = R^T
    q = torch.cholesky_solve(r.transpose(1, 2), chol).transpose(1, 2)
    return [q[b, : ct_list[b], : cs_list[b]].contiguous() for b in range(nb)]


def _retry(a, chol, bad, nonfinite, max_retries, names):
    """Refactorise the failed entries alone with growing jitter; raise if any stays failed."""
    nonfinite_idx = nonfinite.nonzero().flatten().tolist()
    if nonfinite_idx:
        which = ", ".join(names[i] for i in nonfinite_idx)
        raise ValueError(f"{which}: the statistics contain NaN or inf (check the features)")
    idx = bad.nonzero().flatten()
    scale = a[idx].diagonal(dim1=1, dim2=2).mean(1)  # (F,)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    jitter = JITTER0
    for _ in range(max_retries):
        l_try, info = torch.linalg.cholesky_ex(a[idx] + (jitter * scale)[:, None, None] * eye)
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
