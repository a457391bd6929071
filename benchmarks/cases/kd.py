"""Hinton KD (docs/spec.md §4) at the logit shapes of real configurations.

N×100 (CIFAR-100) and N×1000 (ImageNet) with N = 256, N×32000 and N×128256
(language-model vocabularies) with N = 64 on a GPU and 16 on the CPU; T = 4,
``reduction="batchmean"`` (RepDistiller's ``DistillKL`` / mdistiller's ``kd_loss``).
Student logits require grad, teacher logits do not. Minimum traffic: the
forward reads both logits once; the backward reads both again and writes the
student's gradient.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from harness import Case

TEMPERATURE = 4.0
CPU_PLAN = [(256, 100, torch.float32), (256, 1000, torch.float32), (16, 32000, torch.float32),
            (16, 128256, torch.float32)]
CUDA_PLAN = [(256, 100, torch.float32), (256, 1000, torch.float32), (64, 32000, torch.float32),
             (64, 128256, torch.float32), (256, 1000, torch.bfloat16), (64, 128256, torch.bfloat16)]
QUICK_PLAN = [(8, 100, torch.float32), (2, 1000, torch.float32)]
DTYPE_LABEL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LABEL = {100: "CIFAR-100", 1000: "ImageNet", 32000: "LM 32k vocab", 128256: "LM 128k vocab"}


def reference(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's DistillKL(4): log_softmax / softmax / kl_div(sum) * T² / N."""
    from kdkernels.reference.kd import kd_loss

    return kd_loss(logits_s, logits_t, TEMPERATURE)


def _kdkernels() -> Tuple[Optional[object], str]:
    """(kdkernels.kd_loss or None, why missing)."""
    try:
        import kdkernels

        return kdkernels.kd_loss, ""
    except Exception as exc:
        return None, f"kdkernels.kd_loss is not importable: {type(exc).__name__}: {exc}"


def _case(n: int, c: int, dtype: torch.dtype, device: str, kd, why: str) -> Case:
    esize = torch.empty((), dtype=dtype).element_size()

    def make_inputs():
        s = (torch.randn(n, c, device=device) * 2.0).to(dtype).requires_grad_()
        t = (torch.randn(n, c, device=device) * 2.0).to(dtype)
        return s, t

    return Case(
        name=f"{LABEL.get(c, f'{c} classes')} b{n}",
        shape=f"{n}×{c}",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=(lambda s, t, backend=None: kd(s, t, TEMPERATURE, backend=backend)) if kd is not None else None,
        backend_op="kd_loss",
        bytes_fwd=2 * n * c * esize,  # read both logits
        bytes_bwd=3 * n * c * esize,  # read both logits, write the student's gradient
        dtype=DTYPE_LABEL[dtype],
        note=why,
    )


def cases(device: str, quick: bool) -> List[Case]:
    kd, why = _kdkernels()
    plan = QUICK_PLAN if quick else (CUDA_PLAN if device == "cuda" else CPU_PLAN)
    return [_case(n, c, dt, device, kd, why) for n, c, dt in plan]
