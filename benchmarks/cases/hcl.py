"""HCL (ReviewKD's hierarchical context loss, docs/spec.md §1) at the shapes of real configurations.

Per sample C×H×W, shallow → deep, the last level being the pooled 1×1 feature
(docs/spec.md "Shapes that real configurations use"). Student features require grad,
teacher features do not. Minimum traffic: the forward reads fs and ft; the
backward reads both again and writes the gradient of fs. That traffic, moved by
torch's own memory-bound ops (:func:`traffic_floor`), is timed as the case's
floor: the lower bound the CPU kernel's time is stated against.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

import kdkernels
from harness import Case, DTYPE_LABEL, dtype_suffix, shape_label
from kdkernels.reference.hcl import hcl_loss as reference

Level = Tuple[int, int, int]  # C, H, W

PAIRS = {
    "resnet56→resnet20": [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)],
    "resnet32x4→resnet8x4": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
    "wrn_40_2→wrn_16_2": [(32, 32, 32), (64, 16, 16), (128, 8, 8), (128, 1, 1)],
    "ResNet34→ResNet18": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512, 1, 1)],
    "ResNet50→MobileNetV1": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7), (2048, 1, 1)],
}
# Tiny, for --quick: includes H = 7 (overlapping adaptive-pool bins) and a 1×1 level.
TINY = [(8, 8, 8), (16, 7, 7), (16, 1, 1)]

# (pair, batch, dtype) per device. CPU batches keep the default run near a minute on
# 2 cores; batch 64 at resnet32x4→resnet8x4 is where the CPU targets are stated.
CPU_PLAN = [
    ("resnet56→resnet20", 64, torch.float32),
    ("resnet32x4→resnet8x4", 64, torch.float32),
    ("wrn_40_2→wrn_16_2", 64, torch.float32),
    ("ResNet34→ResNet18", 16, torch.float32),
]
CUDA_PLAN = [
    ("resnet56→resnet20", 64, torch.float32),
    ("resnet56→resnet20", 128, torch.float32),
    ("resnet32x4→resnet8x4", 64, torch.float32),
    ("resnet32x4→resnet8x4", 128, torch.float32),
    ("wrn_40_2→wrn_16_2", 64, torch.float32),
    ("wrn_40_2→wrn_16_2", 128, torch.float32),
    ("ResNet34→ResNet18", 64, torch.float32),
    ("ResNet50→MobileNetV1", 64, torch.float32),
    ("resnet32x4→resnet8x4", 128, torch.bfloat16),
    ("ResNet50→MobileNetV1", 64, torch.bfloat16),
]
# GPU quick mode: one CIFAR and one ImageNet configuration (every level plan: H = 1, 7, 8, ≥ 14)
CUDA_QUICK = [("resnet32x4→resnet8x4", 64, torch.float32), ("ResNet34→ResNet18", 64, torch.bfloat16)]



class _TrafficFloor(torch.autograd.Function):
    """An HCL step's minimum traffic at the speed of torch's own memory-bound ops.

    Forward: one read of every fs and ft (a dot product, nothing written).
    Backward: a second read of both and one write of a gradient of fs's shape
    (fs - ft). Five passes over the tensors: no fused kernel can move less.
    """

    @staticmethod
    def forward(ctx, *tensors):
        half = len(tensors) // 2
        ctx.save_for_backward(*tensors)
        return sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(tensors[:half], tensors[half:]))

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        half = len(tensors) // 2
        return tuple(torch.sub(a, b) for a, b in zip(tensors[:half], tensors[half:])) + (None,) * half


def traffic_floor(fs: Sequence[torch.Tensor], ft: Sequence[torch.Tensor]) -> torch.Tensor:
    """The floor provider: see :class:`_TrafficFloor`."""
    return _TrafficFloor.apply(*fs, *ft)


def _case(label: str, levels: Sequence[Level], batch: int, dtype: torch.dtype, device: str) -> Case:
    shapes = [(batch, c, h, w) for c, h, w in levels]
    numel = sum(n * c * h * w for n, c, h, w in shapes)
    esize = torch.empty((), dtype=dtype).element_size()

    def make_inputs():
        fs = [torch.randn(s, device=device, dtype=dtype).requires_grad_() for s in shapes]
        ft = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        return fs, ft

    inner = ", ".join(shape_label(l) for l in levels)
    return Case(
        name=f"{label} b{batch}" + dtype_suffix(dtype),
        shape=f"{batch}×[{inner}]",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=lambda fs, ft, backend=None: kdkernels.hcl_loss(fs, ft, backend=backend),
        backend_op="hcl_loss",
        bytes_fwd=2 * numel * esize,  # read fs, ft
        bytes_bwd=3 * numel * esize,  # read fs, ft; write d loss / d fs
        dtype=DTYPE_LABEL[dtype],
        floor=("five passes", traffic_floor),
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick and device == "cuda":
        plan = [(p, PAIRS[p], b, dt) for p, b, dt in CUDA_QUICK]
    elif quick:
        plan = [("tiny", TINY, 2, torch.float32)]
    else:
        plan = [(p, PAIRS[p], b, dt) for p, b, dt in (CUDA_PLAN if device == "cuda" else CPU_PLAN)]
    return [_case(label, levels, b, dt, device) for label, levels, b, dt in plan]
