"""Comparison helpers that say what went wrong (NaN/inf apart, first bad indices)."""
from __future__ import annotations

import os
import socket

import torch

DEVICE = torch.device(os.environ.get("KDKERNELS_TEST_DEVICE", "cpu"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# the backends tested on each device, in this order; an op is tested on those it implements
_TESTED = {"cpu": ("triton", "cpp", "torch"), "cuda": ("triton", "cuda", "torch")}

# relative-error bounds against a float64 reference (docs/design.md "Tests")
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are exactly zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Shapes equal, non-finite values in the same places, relative error below ``tol``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    o_bad, r_bad = ~torch.isfinite(o), ~torch.isfinite(r)
    if not torch.equal(o_bad, r_bad):
        idx = (o_bad != r_bad).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite values differ from the reference at {idx}")
    err = rel_error(o[~o_bad], r[~r_bad]) if o_bad.any() else rel_error(o, r)
    if not err < tol:  # `not <` so that a NaN error fails
        diff = (o - r).abs()
        worst = diff.flatten().topk(min(5, diff.numel())).indices.tolist()
        raise AssertionError(
            f"{what}: relative error {err:.3e} >= {tol:.1e}; worst flat indices {worst}, "
            f"values {[o.flatten()[i].item() for i in worst]} vs {[r.flatten()[i].item() for i in worst]}"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DETERMINISM_RUNS = 5


def assert_bitwise_repeatable(run, runs: int = DETERMINISM_RUNS, what: str = "run",
                              vary_threads: bool = False) -> None:
    """``run()`` returns a list of tensors (loss and every gradient); ``runs`` calls give identical bits.

    ``vary_threads``: alternate torch's thread count between 1 and at least 2
    (the C++ kernels split their work by shape, never by thread count).
    """
    threads = torch.get_num_threads()
    try:
        _compare_runs(run, runs, what, (lambda k: torch.set_num_threads(1 if k % 2 else max(2, threads)))
                      if vary_threads else (lambda k: None))
    finally:
        torch.set_num_threads(threads)


def _compare_runs(run, runs: int, what: str, before) -> None:
    before(0)
    first = [t.detach().clone() for t in run()]
    assert first, f"{what}: nothing to compare"
    for k in range(1, runs):
        before(k)
        again = run()
        assert len(again) == len(first), f"{what}: run {k} returned {len(again)} tensors, run 0 {len(first)}"
        for i, (a, b) in enumerate(zip(first, again)):
            # equal bits: NaN == NaN here, and -0.0 != 0.0
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
                a.contiguous().view(-1).view(torch.uint8), b.detach().contiguous().view(-1).view(torch.uint8))
            assert same, f"{what}: output {i} of run {k} differs from run 0"


def backends_for(op: str) -> list:
    """The backends ``op`` implements that run on DEVICE (CPU: Triton through the interpreter)."""
    import kdkernels.ops  # noqa: F401  (each op module registers its backends on import)
    from kdkernels.backends import implemented_backends

    return [b for b in _TESTED[DEVICE.type] if b in implemented_backends(op)]


def plane_cases(backends, shapes):
    """pytest params (backend, dtype, shape) over every dtype; shapes are (N, C, H, W, ...).
    The CPU Triton interpreter gets planes over 256 pixels in float32 only (it is slow)."""
    import pytest

    for backend in backends:
        for dtype in DTYPES:
            for shape in shapes:
                slow = backend == "triton" and DEVICE.type == "cpu" and shape[2] * shape[3] > 256
                if not slow or dtype == torch.float32:
                    yield pytest.param(backend, dtype, shape,
                                       id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}")
