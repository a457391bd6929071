"""KD of a language model's logits through the two lm_heads (``linear_kd_loss``), against materialised logits.

The work of a training step with D_s = D_t = D: the forward forms both (N, V)
logit matrices (2 GEMMs of 2·N·V·D FLOPs), the backward needs dh_s = dz w_s and
dw_s = dz^T h_s (2 more): 8·N·V·D FLOPs in all, the floor ``linear_kd_loss``
reaches (it forms the logits once, in the forward, and derives the gradients
in the same pass). H100 SXM roofline of those FLOPs (989 TFLOP/s bf16 dense,
67 TFLOP/s fp32 without TF32) is given in each case's note; the timed floor
below runs the same four GEMMs on the machine at hand (logits, then the two
gradient GEMMs of a plain ``sum`` loss), materialising the logits as eager does.

``eager`` is the plain recipe: ``F.linear`` for both models, then
``kd_loss`` (RepDistiller's ``DistillKL``, T = 2, batchmean). The student's
hidden states and lm_head weight require grad; the teacher's do not.

Shapes: N = 2,048 / 8,192 tokens, V = 32,000 / 128,256, D = 2,048 on a GPU.
A 2-core CPU cannot time those (eager at 2,048 × 32,000 × 2,048 is ~1 TFLOP per
step): the CPU plan keeps the vocabularies and scales N and D down.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from harness import Case, DTYPE_LABEL, dtype_suffix

TEMPERATURE = 2.0
CUDA_PLAN = [(n, v, 2048, dt) for dt in (torch.bfloat16, torch.float32) for v in (32000, 128256)
             for n in (2048, 8192)]
CPU_PLAN = [(256, 32000, 256, torch.float32), (128, 128256, 256, torch.float32)]
QUICK_PLAN = [(24, 500, 32, torch.float32)]
H100_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12, torch.float64: 67e12}


def reference(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Materialised logits of both models, then Hinton's KD (the eager recipe)."""
    from kdkernels.reference.kd import kd_loss

    return kd_loss(F.linear(h_s, w_s), F.linear(h_t, w_t), TEMPERATURE)


def gemm_floor(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """The four GEMMs alone: both logits forward; dh_s and dw_s backward (grad of a sum)."""
    return F.linear(h_s, w_s).sum() + F.linear(h_t, w_t).sum()


def _kdkernels() -> Tuple[Optional[object], str]:
    try:
        import kdkernels

        return kdkernels.linear_kd_loss, ""
    except Exception as exc:
        return None, f"kdkernels.linear_kd_loss is not importable: {type(exc).__name__}: {exc}"


def _case(n: int, v: int, d: int, dtype: torch.dtype, device: str, op, why: str) -> Case:
    esize = torch.empty((), dtype=dtype).element_size()
    flops = 8 * n * v * d
    note = f"8·N·V·D = {flops / 1e12:.3g} TFLOP; H100 roofline {flops / H100_FLOPS[dtype] * 1e3:.3g} ms"

    def make_inputs():
        h_s = torch.randn(n, d, device=device).to(dtype).requires_grad_()
        w_s = (torch.randn(v, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
        h_t = torch.randn(n, d, device=device).to(dtype)
        w_t = (torch.randn(v, d, device=device) / d ** 0.5).to(dtype)
        return h_s, w_s, h_t, w_t

    def fused(h_s, w_s, h_t, w_t, backend=None):
        return op(h_s, w_s, h_t, w_t, temperature=TEMPERATURE, backend=backend)

    return Case(
        name=f"LM vocab {v:,} N{n} D{d}" + dtype_suffix(dtype),
        shape=f"{n}×{d} · {v}×{d}",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=fused if op is not None else None,
        backend_op="linear_kd_loss",
        bytes_fwd=2 * (n + v) * d * esize,  # read both models' hidden states and lm_head weights
        bytes_bwd=(n + v) * d * esize,  # write dh_s and dw_s
        dtype=DTYPE_LABEL[dtype],
        note=(why + "; " if why else "") + note,
        floor=("4 GEMMs", gemm_floor),
    )


def cases(device: str, quick: bool) -> List[Case]:
    op, why = _kdkernels()
    plan = QUICK_PLAN if quick else (CUDA_PLAN if device == "cuda" else CPU_PLAN)
    return [_case(n, v, d, dt, device, op, why) for n, v, d, dt in plan]
