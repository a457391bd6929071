"""FitNets hint loss through a 1×1 regressor (docs/spec.md §3) at the hint shapes of real configurations.

Batch 64, student and teacher hint layers of equal width (docs/spec.md "Shapes that real configurations use"):
128×16² (resnet8x4 → resnet32x4), 32×16², 64×16², 256×8². As in the hint stage,
the student features and the regressor's weight and bias require grad, the
teacher features do not. The reference (``eager``) is ``mse_loss(conv2d(fs, W, b), ft)``,
which writes the (N, Ct, H, W) regressed map and its gradient; the fused op
writes neither. The work is three GEMMs of N·H·W × Cs × Ct either way, so it is
compute-bound: the minimum traffic below (read fs and ft, write the gradient of
fs) is a floor for the bandwidth column, not what limits it.
"""
from __future__ import annotations

from typing import List

import torch

import kdkernels
from harness import Case, DTYPE_LABEL, dtype_suffix, shape_label
from kdkernels.reference.hint import hint_loss as _reference_hint

# (label, batch, Cs, Ct, H, W, dtype)
PLAN = [
    ("resnet8x4→resnet32x4", 64, 128, 128, 16, 16, torch.float32),
    ("resnet20 hint", 64, 32, 32, 16, 16, torch.float32),
    ("wrn_16_2 hint", 64, 64, 64, 16, 16, torch.float32),
    ("resnet8x4 layer3", 64, 256, 256, 8, 8, torch.float32),
]
CUDA_EXTRA = [
    ("resnet8x4→resnet32x4", 128, 128, 128, 16, 16, torch.float32),
    ("resnet8x4→resnet32x4", 64, 128, 128, 16, 16, torch.bfloat16),
    ("resnet8x4 layer3", 64, 256, 256, 8, 8, torch.bfloat16),
]
QUICK = [("tiny", 2, 16, 24, 7, 7, torch.float32), ("tiny 1×1", 8, 33, 16, 1, 1, torch.float32)]
# GPU quick mode: the real hint shape, in fp32 and bf16
CUDA_QUICK = [PLAN[0], CUDA_EXTRA[1]]



def reference(fs: torch.Tensor, ft: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the original code runs: conv2d(fs; W, b), then mse_loss against ft."""
    return _reference_hint(fs, ft, weight, bias)


def _case(label: str, n: int, cs: int, ct: int, h: int, w: int, dtype: torch.dtype, device: str) -> Case:
    esize = torch.empty((), dtype=dtype).element_size()

    def make_inputs():
        fs = torch.randn(n, cs, h, w, device=device, dtype=dtype).requires_grad_()
        ft = torch.randn(n, ct, h, w, device=device, dtype=dtype)
        weight = (torch.randn(ct, cs, 1, 1, device=device) / cs ** 0.5).to(dtype).requires_grad_()
        bias = torch.zeros(ct, device=device, dtype=dtype).requires_grad_()
        return fs, ft, weight, bias

    return Case(
        name=f"{label} b{n}" + dtype_suffix(dtype),
        shape=f"{shape_label((n, cs, h, w))} → {ct}",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=lambda fs, ft, wt, b, backend=None: kdkernels.hint_loss(fs, ft, wt, b, backend=backend),
        backend_op="hint_loss",
        bytes_fwd=n * (cs + ct) * h * w * esize,  # read fs, ft
        bytes_bwd=n * cs * h * w * esize,  # write d loss / d fs
        dtype=DTYPE_LABEL[dtype],
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick:
        plan = CUDA_QUICK if device == "cuda" else QUICK
    else:
        plan = PLAN + (CUDA_EXTRA if device == "cuda" else [])
    return [_case(*p, device) for p in plan]
