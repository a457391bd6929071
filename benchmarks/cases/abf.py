"""ABF fusion step (ReviewKD, docs/spec.md §2, step 2) at the fusion levels of real configurations.

Each case is one fusion level: x (N, mid, H, H) fused with the deeper residual
y (N, mid, h, h), att_weight (2, 2 mid, 1, 1). Minimum traffic: the forward
reads x and y and writes out; the backward reads grad_out, x, y and writes
grad_x and grad_y (the attention maps are 2/mid of that, ignored).
"""
from __future__ import annotations

from typing import List

import torch

import kdkernels
from harness import Case
from kdkernels.reference.abf import abf_fuse as reference

# configuration: its fusion levels (mid, H, h), deep to shallow: x (N, mid, H, H) fused with
# the residual of the level below, y (N, mid, h, h)
LEVELS = {
    "resnet32x4→resnet8x4": [(256, 8, 1), (256, 16, 8), (256, 32, 16)],
    "ResNet34→ResNet18": [(512, 7, 1), (512, 14, 7), (512, 28, 14), (512, 56, 28)],
}
CPU_PLAN = [("resnet32x4→resnet8x4", 64), ("ResNet34→ResNet18", 4)]
CUDA_PLAN = [("resnet32x4→resnet8x4", 64), ("ResNet34→ResNet18", 64)]
# GPU quick mode: two fusion levels of one real configuration, one per kernel path
# (point 8²←1², halves 32²←16²), as (label, batch, mid, H, h)
CUDA_QUICK = [("resnet32x4→resnet8x4", 64, 256, 8, 1), ("resnet32x4→resnet8x4", 64, 256, 32, 16)]


def _case(label, batch, mid, H, h, device, dtype=torch.float32) -> Case:
    def make_inputs():
        x = torch.randn(batch, mid, H, H, device=device, dtype=dtype).requires_grad_()
        y = torch.randn(batch, mid, h, h, device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(2, 2 * mid, 1, 1, device=device, dtype=dtype) / (2 * mid) ** 0.5).requires_grad_()
        b = torch.zeros(2, device=device, dtype=dtype).requires_grad_()
        return x, y, w, b

    esize = torch.empty((), dtype=dtype).element_size()
    big, small = batch * mid * H * H * esize, batch * mid * h * h * esize
    return Case(
        name=f"{label} b{batch} {H}²←{h}²",
        shape=f"x {batch}×{mid}×{H}², y {batch}×{mid}×{h}²",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=lambda x, y, w, b, backend=None: kdkernels.abf_fuse(x, y, w, b, backend=backend),
        backend_op="abf_fuse",
        bytes_fwd=2 * big + small,
        bytes_bwd=3 * big + 2 * small,
        dtype="fp32",
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick:
        return [_case(*q, device) for q in CUDA_QUICK] if device == "cuda" else [_case("tiny", 2, 8, 8, 4, device)]
    plan = CUDA_PLAN if device == "cuda" else CPU_PLAN
    return [_case(label, batch, mid, H, h, device) for label, batch in plan for mid, H, h in LEVELS[label]]
