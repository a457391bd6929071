"""Hinton KD (docs/spec.md §4) at the logit shapes of real configurations.

N×100 (CIFAR-100) and N×1000 (ImageNet) with N = 256, N×32000 and N×128256
(language-model vocabularies) with N = 64 on a GPU and 16 on the CPU; T = 4,
``reduction="batchmean"`` (RepDistiller's ``DistillKL`` / mdistiller's ``kd_loss``).
Student logits require grad, teacher logits do not. Minimum traffic: the
forward reads both logits once; the backward reads both again and writes the
student's gradient.
"""
from __future__ import annotations

from typing import List

import torch

import kdkernels
from harness import Case, DTYPE_LABEL, dtype_suffix
from kdkernels.reference.kd import kd_loss as _reference_kd

TEMPERATURE = 4.0
CPU_PLAN = [(256, 100, torch.float32), (256, 1000, torch.float32), (16, 32000, torch.float32),
            (16, 128256, torch.float32)]
CUDA_PLAN = [(256, 100, torch.float32), (256, 1000, torch.float32), (64, 32000, torch.float32),
             (64, 128256, torch.float32), (256, 1000, torch.bfloat16), (64, 128256, torch.bfloat16)]
QUICK_PLAN = [(8, 100, torch.float32), (2, 1000, torch.float32)]
CUDA_QUICK_PLAN = [(256, 1000, torch.float32), (64, 32000, torch.bfloat16)]  # GPU quick mode

LABEL = {100: "CIFAR-100", 1000: "ImageNet", 32000: "LM 32k vocab", 128256: "LM 128k vocab"}


def reference(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's DistillKL(4): log_softmax / softmax / kl_div(sum) * T² / N."""
    return _reference_kd(logits_s, logits_t, TEMPERATURE)


def _case(n: int, c: int, dtype: torch.dtype, device: str) -> Case:
    esize = torch.empty((), dtype=dtype).element_size()

    def make_inputs():
        s = (torch.randn(n, c, device=device) * 2.0).to(dtype).requires_grad_()
        t = (torch.randn(n, c, device=device) * 2.0).to(dtype)
        return s, t

    return Case(
        name=f"{LABEL.get(c, f'{c} classes')} b{n}" + dtype_suffix(dtype),
        shape=f"{n}×{c}",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=lambda s, t, backend=None: kdkernels.kd_loss(s, t, TEMPERATURE, backend=backend),
        backend_op="kd_loss",
        bytes_fwd=2 * n * c * esize,  # read both logits
        bytes_bwd=3 * n * c * esize,  # read both logits, write the student's gradient
        dtype=DTYPE_LABEL[dtype],
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick:
        plan = CUDA_QUICK_PLAN if device == "cuda" else QUICK_PLAN
    else:
        plan = CUDA_PLAN if device == "cuda" else CPU_PLAN
    return [_case(n, c, dt, device) for n, c, dt in plan]
