"""FSKD (docs/spec.md §5): the statistics update and the batched solve, at ResNet-18 shapes.

Two cases, forward only (nothing here has gradients):

* ``gramstats``: one ``GramStats.update(s, t)`` of a batch at a ResNet-18 block
  output (C = 64..512 at 56²..7²), against the naive accumulation a user writes
  first: two fp64 matmuls ``G += s sᵀ``, ``Hc += t sᵀ`` on upcast copies. The
  GramStats object persists across repetitions, as in a streaming pass, so its
  work buffer is reused; its output is (G, Hc). Minimum traffic: read s and t.
  Its floor is one fp32 GEMM of the same size, (2C, M) @ (M, C) with M = N*H*W,
  on operands already laid out as (channels, pixels) -- what GramStats computes,
  minus the layout change, the shift and the fp64 sums.
* ``solve``: Q for all 8 ResNet-18 BasicBlocks (widths 64, 64, 128, 128, 256,
  256, 512, 512) and for the 27 blocks of a CIFAR resnet56 (9 each of 16, 32,
  64) with the batched fp64 Cholesky of ``kdkernels.fskd.solve``, against a
  per-block loop of ``torch.linalg.solve`` on the same ridge systems.

Targets (CPU): the batched solve at least 3x faster than the loop; the update
within 1.5x of one fp32 GEMM of the same size.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from harness import Case, shape_label
from kdkernels.fskd import GramStats
from kdkernels.fskd.solve import ridge_solve
from kdkernels.fskd.stats import ieee_fp32_matmul

ALPHA = 1e-4
RESNET18 = [(64, 56), (128, 28), (256, 14), (512, 7)]  # block output C, H (= W)
RESNET18_WIDTHS = [64, 64, 128, 128, 256, 256, 512, 512]
RESNET56_WIDTHS = [16] * 9 + [32] * 9 + [64] * 9


def naive_update(s: torch.Tensor, t: torch.Tensor, stats=None, z=None):
    """G = sum s sᵀ and Hc = sum t sᵀ with two fp64 matmuls (``stats``, ``z`` unused)."""
    cs, ct = s.shape[1], t.shape[1]
    s2 = s.detach().double().transpose(0, 1).reshape(cs, -1)
    t2 = t.detach().double().transpose(0, 1).reshape(ct, -1)
    return s2 @ s2.T, t2 @ s2.T


def _gramstats_case(c: int, h: int, batch: int, device: str) -> Case:
    shape = (batch, c, h, h)

    def make_inputs():
        s = torch.randn(shape, device=device) + 1.0  # pre-activation-like: a mean offset
        t = torch.randn(shape, device=device) + 1.0
        z = torch.randn(2 * c, batch * h * h, device=device)  # the floor's operand, [s; t] as (2C, M)
        return s, t, GramStats(c, c, device=device), z

    def kd(s, t, stats, z=None, backend=None):
        stats.update(s, t)
        return stats.G, stats.Hc

    return Case(
        name=f"gramstats C{c} {h}² b{batch}",
        shape=f"2×{shape_label(shape)}",
        make_inputs=make_inputs,
        reference=naive_update,
        kdkernels=kd,
        bytes_fwd=2 * batch * c * h * h * 4,
        dtype="fp32",
        modes=("forward",),
        floor=("fp32 GEMM", fp32_gemm),
    )


def fp32_gemm(s, t, stats, z):
    """One full-precision fp32 GEMM (2C, M) @ (M, C): the yardstick of an update."""
    with ieee_fp32_matmul(z.device):
        return torch.mm(z, z[: z.shape[0] // 2].T)


def loop_solve(gs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor]):
    """Q_b = (Hc_b + lam I)(G_b + lam I)^-1, one ``torch.linalg.solve`` per block."""
    out = []
    for g, h in zip(gs, hs):
        c = g.shape[0]
        lam = ALPHA * torch.trace(g) / c
        eye = torch.eye(c, dtype=g.dtype, device=g.device)
        out.append(torch.linalg.solve(g + lam * eye, (h + lam * eye).T).T)
    return out


def _solve_case(widths: List[int], device: str, label: str) -> Case:
    def make_inputs():
        gen = torch.Generator(device="cpu").manual_seed(0)
        gs, hs = [], []
        for c in widths:
            x = torch.randn(c, 8 * c, generator=gen, dtype=torch.float64)  # 8c pixels
            g = x @ x.T
            gs.append(g.to(device))
            hs.append((torch.randn(c, c, generator=gen, dtype=torch.float64) @ g / c).to(device))
        return gs, hs

    def kd(gs, hs, backend=None):
        return ridge_solve(gs, hs, ALPHA, True)

    return Case(
        name=f"solve {label}",
        shape="[" + ", ".join(f"{widths.count(c)}×{c}²" for c in sorted(set(widths))) + "]",
        make_inputs=make_inputs,
        reference=loop_solve,
        kdkernels=kd,
        dtype="fp64",
        modes=("forward",),
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick and device == "cuda":  # GPU quick mode: one real block and the real solve
        return [_gramstats_case(128, 28, 64, device), _solve_case(RESNET18_WIDTHS, device, "ResNet-18 (8 blocks)")]
    if quick:
        return [_gramstats_case(8, 8, 2, device), _solve_case([4, 8, 8], device, "tiny")]
    batch = 64 if device == "cuda" else 16  # CPU: keep the default run near a minute
    out = [_gramstats_case(c, h, batch, device) for c, h in RESNET18]
    out.append(_solve_case(RESNET18_WIDTHS, device, "ResNet-18 (8 blocks)"))
    out.append(_solve_case(RESNET56_WIDTHS, device, "resnet56 (27 blocks)"))
    return out
