"""``python -m kdkernels smoke``: every op once on CPU with the compiled kernels, against the reference.

Used to check an installed wheel: fails (exit 1) when ``_C`` did not load or an
op's ``cpp`` backend disagrees with the plain-PyTorch reference.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check_hcl() -> float:
    import kdkernels
    from kdkernels.reference import hcl as ref

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 7, 7), (2, 8, 4, 4), (2, 8, 1, 1)]
    fs = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    ft = [torch.randn(s, generator=g) for s in shapes]
    loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
    loss.backward()
    fs64 = [f.detach().double().requires_grad_() for f in fs]
    ref_loss = ref.hcl_loss(fs64, [t.double() for t in ft])
    ref_loss.backward()
    return max([_rel(loss, ref_loss)] + [_rel(a.grad, b.grad) for a, b in zip(fs, fs64)])


CHECKS: Dict[str, Callable[[], float]] = {"hcl_loss": _check_hcl}


def main() -> int:
    from kdkernels import _native

    if _native.native() is None:
        print(f"FAIL: kdkernels._C did not load: {_native.load_error()}")
        return 1
    failed: List[str] = []
    for name, check in CHECKS.items():
        err = check()
        ok = err < 1e-5
        print(f"{'ok  ' if ok else 'FAIL'} {name:<12} cpp vs reference: relative error {err:.1e}")
        if not ok:
            failed.append(name)
    print("smoke:", "all ops served by kdkernels._C" if not failed else f"failed: {failed}")
    return 1 if failed else 0
