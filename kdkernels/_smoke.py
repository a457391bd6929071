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


def _compare(fast: Callable, ref: Callable, inputs: List[torch.Tensor]) -> float:
    """Worst relative error of the output and every input gradient, cpp (fp32) vs reference (fp64)."""
    ins = [t.clone().requires_grad_() for t in inputs]
    out = fast(*ins)
    out.backward(torch.ones_like(out))
    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = ref(*ins64)
    ref_out.backward(torch.ones_like(ref_out))
    return max([_rel(out, ref_out)] + [_rel(a.grad, b.grad) for a, b in zip(ins, ins64)])


def _randn(*shapes) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in shapes]


def _check_hcl() -> float:
    import kdkernels
    from kdkernels.reference import hcl as ref

    shapes = [(2, 4, 7, 7), (2, 8, 4, 4), (2, 8, 1, 1)]
    return _compare(lambda *t: kdkernels.hcl_loss(list(t[:3]), list(t[3:]), backend="cpp"),
                    lambda *t: ref.hcl_loss(list(t[:3]), list(t[3:])), _randn(*shapes, *shapes))


def _check_abf() -> float:
    import kdkernels
    from kdkernels.reference import abf as ref

    return _compare(lambda *t: kdkernels.abf_fuse(*t, backend="cpp"), ref.abf_fuse,
                    _randn((2, 3, 7, 6), (2, 3, 4, 3), (2, 6, 1, 1), (2,)))


def _check_hint() -> float:
    import kdkernels
    from kdkernels.reference import hint as ref

    return _compare(lambda *t: kdkernels.hint_loss(*t, backend="cpp"), ref.hint_loss,
                    _randn((2, 5, 6, 7), (2, 3, 6, 7), (3, 5, 1, 1), (3,)))


def _check_kd() -> float:
    import kdkernels
    from kdkernels.reference import kd as ref

    return _compare(lambda s, t: kdkernels.kd_loss(s, t, 4.0, backend="cpp"),
                    lambda s, t: ref.kd_loss(s, t, 4.0), _randn((5, 1000), (5, 1000)))


def _check_linear_kd() -> float:
    """The chunked CPU pass (two chunks, a bias, the CE term, an ignored row) vs the materialising reference."""
    import kdkernels
    from kdkernels.reference import linear_kd as ref

    labels = torch.tensor([3, -100, 0, 6, 2])
    kw = dict(temperature=2.0, labels=labels, ignore_index=-100, ce_weight=0.5)
    return _compare(lambda hs, ws, bs, ht, wt: kdkernels.linear_kd_loss(hs, ws, ht, wt, bias_s=bs, bias_t=None,
                                                                         chunk=3, backend="cpp", **kw),
                    lambda hs, ws, bs, ht, wt: ref.linear_kd_loss(hs, ws, ht, wt, bias_s=bs, **kw),
                    _randn((5, 4), (7, 4), (7,), (5, 6), (7, 6)))


CHECKS: Dict[str, Callable[[], float]] = {
    "hcl_loss": _check_hcl, "abf_fuse": _check_abf, "hint_loss": _check_hint, "kd_loss": _check_kd,
    "linear_kd_loss": _check_linear_kd}


def main() -> int:
    from kdkernels import _native

    if _native.native() is None:
        print(f"FAIL: kdkernels._C did not load: {_native.load_error()}")
        return 1
    failed: List[str] = []
    for name, check in CHECKS.items():
        err = check()
        ok = err < 1e-5
        print(f"{'ok  ' if ok else 'FAIL'} {name:<14} cpp vs reference: relative error {err:.1e}")
        if not ok:
            failed.append(name)
    print("smoke:", "all ops served by kdkernels._C" if not failed else f"failed: {failed}")
    return 1 if failed else 0
