r"""Batched solve of the FSKD normal equations (docs/spec.md §5).

For every block b, with G (Cs, Cs), Hc (Ct, Cs) from :class:`GramStats`,

    Q_b = argmin_Q ||Q S - T||^2 + lam ||Q - Q0||^2
        = (Hc + lam Q0) (G + lam I)^-1,          Q_b of shape (Ct, Cs)

with Q0 = I ("identity", needs Cs = Ct) or 0 ("zero").

The ridge. By default there is none: on a well-posed block Q is the fp64 least
squares solution, with no bias toward Q0. A ridge is used only where the
problem needs one, and always relative to the *centred* covariance

    scale_b = trace(G - sum_s sum_s^T / M) / Cs     (the mean channel variance x M),

not to trace(G): pre-ReLU features have channel means large next to their
spread, and trace(G) grows with the squared means, so a ridge scaled by it
(1e-4 * trace(G) / Cs in earlier versions) shrinks the informative small
directions of an ill-conditioned block (cond(S - mean) = 4e3, means 50: 11 % of
||T - mean(T)|| lost against 1e-7 for least squares). Where it is needed:

* M < Cs (fewer pixels than channels): warn, lam = UNDERDETERMINED_RIDGE *
  scale_b, which picks, among the fits of the pixels, the one closest to Q0;
* a singular G (its Cholesky factorisation fails): warn, retry with
  lam = eps * scale_b, eps = 1e-12, 1e-11, ... (x10 per try, at most
  ``max_retries`` tries); a block that still fails, or whose statistics are not
  finite, raises with its name;
* ``alpha=a`` asks for shrinkage explicitly: lam = a * scale_b.

A channel whose diagonal G_ii is 0 (dead: it was 0 on every pixel) gets
A_ii = 1 and keeps its prior column, Q[:, i] = Q0[:, i]. When the centred
scale is 0 (every channel constant), trace(G) / Cs stands in, then 1.

Blocks are solved in batched fp64 ``cholesky_ex`` calls (upper factor
A = U^T U) and one ``cholesky_solve`` per batch on (B, C, C) stacks:
block b sits in the top-left corner of an identity matrix of its batch's widest
size, so the padded system is blockdiag(A_b, I) and its solution restricted to
the corner is exactly Q_b. Blocks of similar width (>= 0.8 x the widest of the
batch) share one batch; much narrower ones get their own, because padding a
64-channel block to 512 would cost 512^3 instead of 64^3 flops (for ResNet-18's
eight blocks, one single padded batch is ~3x the flops of four batches, one per
width). Nothing is read back to the host per block: the only sync is one
``any()`` over all error flags at the end. ``torch.linalg.lstsq`` is never used
(its CUDA driver assumes full rank).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch

from .._checks import check_choice, check_real
from .stats import GramStats

PRIORS = ("identity", "zero")
JITTER0 = 1e-12
GROUP_RATIO = 0.8
#: relative ridge of a block with fewer pixels than channels (default solve only)
UNDERDETERMINED_RIDGE = 1e-6

Alpha = Union[None, float, Sequence[float]]


def solve(stats: Union[GramStats, Sequence[GramStats]], alpha: Optional[float] = None,
          prior: str = "identity", *, max_retries: int = 10,
          names: Optional[Sequence[str]] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Solve every block's Q with batched fp64 Cholesky (one batch per width group).

    Args:
        stats: one :class:`GramStats` or a sequence of them (may differ in width).
        alpha: ``None`` (default): least squares, a ridge only where the block
            needs one (fewer pixels than channels, singular G; module docstring).
            A float asks for shrinkage toward Q0 explicitly: lam = alpha * trace
            of the centred covariance / Cs (0 is plain least squares).
        prior: ``"identity"`` (Q0 = I, needs Cs = Ct) or ``"zero"`` (Q0 = 0).
        max_retries: jittered refactorisations of a singular block (x10 each).
        names: optional block names used in warnings and errors.

    Returns:
        fp64 Q of shape (Ct, Cs) on the statistics' device: one tensor for one
        ``GramStats``, else a list in the input order.

    Warns (``RuntimeWarning``) when a block has fewer pixels than channels or a
    singular G; raises ``ValueError`` on empty statistics, mixed devices or an
    identity prior with Cs != Ct.
    """
    single = isinstance(stats, GramStats)
    blocks = [stats] if single else list(stats) if isinstance(stats, (list, tuple)) else None
    if blocks is None:
        raise TypeError(f"stats must be a GramStats or a list of them, got {type(stats).__name__}")
    if not blocks:
        raise ValueError("stats is empty: nothing to solve")
    if alpha is not None:
        alpha = check_real(alpha, "alpha", bound=">= 0")
    check_choice(prior, "prior", PRIORS)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if names is None:
        names = [f"block {i}" for i in range(len(blocks))]
    elif len(names) != len(blocks):
        raise ValueError(f"names has {len(names)} entries for {len(blocks)} blocks")
    alphas = []
    for i, st in enumerate(blocks):
        if not isinstance(st, GramStats):
            raise TypeError(f"stats[{i}] must be a GramStats, got {type(st).__name__}")
        if st.count == 0:
            raise ValueError(f"{names[i]}: no samples were accumulated (count 0)")
        if prior == "identity" and st.c_in != st.c_out:
            raise ValueError(
                f"{names[i]}: prior='identity' needs as many student as teacher channels, "
                f"got Cs={st.c_in}, Ct={st.c_out} (Q would be {st.c_out}x{st.c_in}); use prior='zero'")
        a = alpha
        if st.count < st.c_in:
            if a is None:
                a = UNDERDETERMINED_RIDGE
            warnings.warn(
                f"{names[i]}: {st.count} pixels for {st.c_in} channels: underdetermined, "
                f"the ridge toward the prior (alpha={a:g} x the centred covariance) decides the solution",
                RuntimeWarning, stacklevel=2)
        alphas.append(0.0 if a is None else a)
    devices = {st.device for st in blocks}
    if len(devices) != 1:
        raise ValueError(f"stats: all statistics must live on one device, got {sorted(map(str, devices))}")

    scales = [centred_scale(st.G, st.sum_s, st.count) for st in blocks]
    qs = ridge_solve([st.G for st in blocks], [st.Hc for st in blocks], alphas,
                     prior == "identity", max_retries, names, scales=scales)
    return qs[0] if single else qs


def centred_scale(g: torch.Tensor, sum_s: torch.Tensor, count: int) -> torch.Tensor:
    """trace(G - sum_s sum_s^T / M) / Cs as a 0-dim fp64 tensor on G's device (no host sync):
    the ridge unit. Falls back to trace(G) / Cs, then 1, where it is not positive."""
    g = g.to(torch.float64)
    c = g.shape[0]
    raw = g.diagonal().sum() / c
    centred = raw - sum_s.to(torch.float64).square().sum() / (count * c)
    one = torch.ones((), dtype=torch.float64, device=g.device)
    return torch.where(centred > 0, centred, torch.where(raw > 0, raw, one))


def ridge_solve(gs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor], alpha: Alpha,
                identity_prior: bool, max_retries: int = 10,
                names: Optional[Sequence[str]] = None,
                scales: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Q_b = (Hc_b + lam_b Q0_b)(G_b + lam_b I)^-1 for all b, in padded batches.

    gs[b]: (Cs_b, Cs_b), hs[b]: (Ct_b, Cs_b), any float dtype, one device.
    lam_b = alpha_b * scales[b]; ``alpha`` is one float for all blocks or one per
    block (``None`` = 0); ``scales`` default to trace(G_b) / Cs_b, the centred scale
    when G_b is already centred (non-positive: 1). A block whose factorisation
    fails is warned about and retried with jitter eps * scales[b] (module docstring).
    Returns fp64 (Ct_b, Cs_b) tensors in input order. No host sync unless a
    factorisation fails, apart from one ``any()`` over all error flags.
    """
    nb = len(gs)
    names = list(names) if names is not None else [f"block {i}" for i in range(nb)]
    alphas = [0.0 if a is None else float(a) for a in
              (alpha if isinstance(alpha, (list, tuple)) else [alpha] * nb)]
    if len(alphas) != nb:
        raise ValueError(f"alpha has {len(alphas)} entries for {nb} blocks")
    if scales is None:
        scales = []
        for g in gs:
            raw = g.to(torch.float64).diagonal().sum() / g.shape[0]
            scales.append(torch.where(raw > 0, raw, torch.ones_like(raw)))
    groups = width_groups([g.shape[0] for g in gs])
    systems = [_padded_system([gs[i] for i in grp], [hs[i] for i in grp], [alphas[i] for i in grp],
                              torch.stack([scales[i] for i in grp]), identity_prior)
               for grp in groups]
    chols, bads = [], []
    for a, _, _, nonfinite in systems:
        chol, info = torch.linalg.cholesky_ex(a, upper=True)
        chols.append(chol)
        bads.append((info != 0) | nonfinite)
    if bool(torch.cat(bads).any()):  # the one host sync
        for grp, (_, _, _, nonfinite) in zip(groups, systems):
            bad_names = [names[grp[k]] for k in nonfinite.nonzero().flatten().tolist()]
            if bad_names:
                raise ValueError(f"{', '.join(bad_names)}: the statistics contain NaN or inf (check the features)")
        for j, (grp, (a, r, valid, _)) in enumerate(zip(groups, systems)):
            sc = torch.stack([scales[i] for i in grp])
            chols[j] = _retry(a, r, valid, chols[j], bads[j], sc, identity_prior, max_retries,
                              [names[i] for i in grp])

    out: List[Optional[torch.Tensor]] = [None] * nb
    for grp, (_, r, _, _), chol in zip(groups, systems, chols):
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


def _padded_system(gs, hs, alphas, scales, identity_prior: bool):
    """(A, R, valid, nonfinite) of one group: A (B, C, C) = blockdiag(G_b + lam_b I, I) with
    dead channels set to 1, R (B, Ct, C) = Hc_b + lam_b Q0_b (with the prior's column for
    a dead channel), valid (B, C) bool (channel j exists and is alive in block b),
    nonfinite (B,) bool; lam_b = alphas[b] * scales[b], scales (B,) fp64."""
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
        # exists[b, j]: channel j exists in block b (filled on the device: no host copy, no sync)
        exists = torch.zeros(nb, cs_max, dtype=torch.bool, device=dev)
        for b, c in enumerate(cs_list):
            exists[b, :c] = True
    else:
        exists = torch.ones(nb, cs_max, dtype=torch.bool, device=dev)
    dead = exists & (diag == 0)
    valid = exists & ~dead
    lam = torch.tensor(alphas, dtype=f64).to(dev, non_blocking=True) * scales  # (B,)
    if any(alphas):
        _add_ridge(a, r, valid, lam, identity_prior)
    diag.masked_fill_(dead, 1.0)  # a dead channel's row and column of G are 0: A_ii = 1
    if identity_prior:  # R[:, i] = Q0[:, i] = e_i for a dead channel i
        r.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1.0)
    return a, r, valid, nonfinite


def _add_ridge(a, r, valid, lam, identity_prior: bool) -> None:
    """A += lam I and (identity prior) R += lam I on the valid channels, in place; a, r (B, ., C),
    valid (B, C), lam (B,)."""
    lam_diag = lam[:, None] * valid
    a.diagonal(dim1=1, dim2=2).add_(lam_diag)
    if identity_prior:
        r.diagonal(dim1=1, dim2=2).add_(lam_diag)


def _retry(a, r, valid, chol, bad, scales, identity_prior, max_retries, names):
    """Refactorise the failed (singular) entries alone with growing ridge eps * scale, warn,
    and add the same ridge toward the prior to their right-hand side; raise if any stays failed."""
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return chol
    scale = scales[idx]  # (F,)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    eps = JITTER0
    for _ in range(max_retries):
        l_try, info = torch.linalg.cholesky_ex(a[idx] + (eps * scale)[:, None, None] * eye, upper=True)
        ok = info == 0
        fixed = idx[ok]
        if fixed.numel():
            chol[fixed] = l_try[ok]
            lam = eps * scale[ok]
            sub_a, sub_r = a[fixed], r[fixed]
            _add_ridge(sub_a, sub_r, valid[fixed], lam, identity_prior)
            r[fixed] = sub_r  # A is only used through its factor from here on
            for k in fixed.tolist():
                warnings.warn(f"{names[k]}: G is singular (Cholesky failed): regularised with "
                              f"lam = {eps:g} x the centred covariance's trace / C", RuntimeWarning,
                              stacklevel=4)
        idx, scale = idx[~ok], scale[~ok]
        if idx.numel() == 0:
            return chol
        eps *= 10.0
    which = ", ".join(names[i] for i in idx.tolist())
    tried = f"even with a ridge up to {eps / 10:g} x the centred scale" if max_retries else "(no retries)"
    raise torch.linalg.LinAlgError(
        f"{which}: Cholesky of G + lam*I failed {tried}; the features are degenerate "
        f"(raise alpha or use more samples)")
