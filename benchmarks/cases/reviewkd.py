"""ReviewKD's whole distillation head (docs/spec.md §1–§2): every ABF, then HCL, forward and backward.

Inputs are the student's features (shallow → deep, the last the pooled N×C×1×1
vector, requiring grad), the teacher's features and the ABF parameters. The ABFs
run deep to shallow as the official ``ReviewKD.forward`` does: 1×1 conv + BN,
the attention fusion with the previous residual (not for the deepest),
nearest resize to the output size, 3×3 conv + BN; the outputs go to HCL
against the teacher. ``eager`` is that code with the reference fusion and HCL;
``kdkernels`` is the same code with ``abf_fuse`` and ``hcl_loss``. The ABF
parameters are passed as tensors (BN in training mode without running
statistics) so that ``compile`` is specialised on shapes, not on module
identities. The 3×3 convolutions dominate, so expect modest end-to-end gains.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import kdkernels
from harness import Case, shape_label
from kdkernels.reference.abf import abf_fuse as ref_fuse
from kdkernels.reference.hcl import hcl_loss as ref_hcl

# label: (student channels, teacher channels, shapes deepest first, mid channel), shallow → deep channels
CONFIGS = {
    "resnet32x4→resnet8x4": ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], 256),
    "ResNet34→ResNet18": ([64, 128, 256, 512, 512], [64, 128, 256, 512, 512], [1, 7, 14, 28, 56], 512),
}
# CPU: one small batch (the 3×3 convs and compile's first call dominate the run time;
# ResNet34→ResNet18 b2 takes another ~90 s here, mostly compiling: run it with --device cuda)
CPU_PLAN = [("resnet32x4→resnet8x4", 8)]
CUDA_PLAN = [("resnet32x4→resnet8x4", 64), ("resnet32x4→resnet8x4", 128), ("ResNet34→ResNet18", 64)]
CUDA_QUICK = [("resnet32x4→resnet8x4", 64)]  # GPU quick mode
TINY = ([4, 8, 8], [6, 8, 8], [1, 4, 8], 8)


def _bn(x, gamma, beta):
    return F.batch_norm(x, None, None, gamma, beta, training=True)


def _head(fs, ft, params, shapes, fuse, loss):
    """The official forward over the ABFs (deep to shallow), then the loss on the outputs."""
    feats = fs[::-1]
    results: List[torch.Tensor] = []
    res = None
    for k, (x, p) in enumerate(zip(feats, params)):
        size = shapes[k]
        x = _bn(F.conv2d(x, p[0]), p[1], p[2])
        if k > 0:
            x = fuse(x, res, p[6], p[7])
        if x.shape[-1] != size:
            x = F.interpolate(x, (size, size), mode="nearest")
        res = x
        results.insert(0, _bn(F.conv2d(x, p[3], padding=1), p[4], p[5]))
    return loss(results, ft)


def _case(label, cin, cout, shapes, mid, batch, device, dtype=torch.float32) -> Case:
    sizes = shapes[::-1]  # shallow → deep, like the channels

    def make_inputs():
        fs = [torch.randn(batch, c, s, s, device=device, dtype=dtype).requires_grad_() for c, s in zip(cin, sizes)]
        ft = [torch.randn(batch, c, s, s, device=device, dtype=dtype) for c, s in zip(cout, sizes)]
        params = []
        for k in range(len(cin) - 1, -1, -1):  # deep → shallow, the order abfs[] runs in
            p = [torch.randn(mid, cin[k], 1, 1) / cin[k] ** 0.5, torch.ones(mid), torch.zeros(mid),
                 torch.randn(cout[k], mid, 3, 3) / (9 * mid) ** 0.5, torch.ones(cout[k]), torch.zeros(cout[k])]
            if k < len(cin) - 1:
                p += [torch.randn(2, 2 * mid, 1, 1) / (2 * mid) ** 0.5, torch.zeros(2)]
            params.append([t.to(device, dtype).requires_grad_() for t in p])
        return fs, ft, params

    def reference(fs, ft, params):
        return _head(fs, ft, params, shapes, ref_fuse, ref_hcl)

    def fused(fs, ft, params, backend=None):
        fuse = lambda x, y, w, b: kdkernels.abf_fuse(x, y, w, b, backend=backend)  # noqa: E731
        return _head(fs, ft, params, shapes, fuse, kdkernels.hcl_loss)

    inner = ", ".join(shape_label((c, s, s)) for c, s in zip(cin, sizes))
    return Case(
        name=f"{label} b{batch}",
        shape=f"{batch}×[{inner}] mid {mid}",
        make_inputs=make_inputs,
        reference=reference,
        kdkernels=fused,
        backend_op="abf_fuse",
        dtype="fp32",
        # some gradients are nearly zero in exact arithmetic (a conv feeding BN over a
        # 1×1 map), so even eager float32 is ~1e-4 off the float64 oracle there
        tol=2e-3,
    )


def cases(device: str, quick: bool) -> List[Case]:
    if quick and device != "cuda":
        return [_case("tiny", *TINY, 2, device)]
    plan = (CUDA_QUICK if quick else CUDA_PLAN) if device == "cuda" else CPU_PLAN
    return [_case(label, *CONFIGS[label], batch, device) for label, batch in plan]
