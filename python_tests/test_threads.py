"""Two Python threads calling the same C++ kernel at once get the single-threaded results, bitwise.

The cpp kernels hold no global state (scratch, thread counts and partial sums
are per call), so concurrent calls on different inputs must not interfere. Each
op runs forward and backward; each thread checks every iteration against the
result computed alone beforehand. The C++ entry points release the GIL
(csrc/bindings.cpp), so the kernels really overlap; hint_loss's shared worker
pool is exercised by its shape.
"""
from __future__ import annotations

import threading

import pytest
import torch

import kdkernels
from kdkernels import backends

ITERATIONS = 40
THREADS = 2


def _randn(g, *shape, requires_grad=True):
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def hcl(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 8, 14, 14), (2, 16, 7, 7), (2, 16, 1, 1)]
    fs = [_randn(g, *s) for s in shapes]
    ft = [_randn(g, *s) for s in shapes]

    def run():
        loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
        grads = torch.autograd.grad(loss, fs + ft)
        return (loss.detach(), *grads)
    return run


def abf(seed):
    g = torch.Generator().manual_seed(seed)
    x, y, w, b = _randn(g, 2, 64, 20, 20), _randn(g, 2, 64, 10, 10), _randn(g, 2, 128, 1, 1), _randn(g, 2)
    gout = torch.randn(2, 64, 20, 20, generator=g)

    def run():
        out = kdkernels.abf_fuse(x, y, w, b, backend="cpp")
        return (out.detach(), *torch.autograd.grad(out, (x, y, w, b), gout))
    return run


def hint(seed):
    g = torch.Generator().manual_seed(seed)
    # big enough for several pixel blocks, so the kernel's shared worker pool is used
    fs, ft = _randn(g, 4, 48, 16, 16), _randn(g, 4, 80, 16, 16)
    w, b = _randn(g, 80, 48, 1, 1), _randn(g, 80)

    def run():
        loss = kdkernels.hint_loss(fs, ft, w, b, backend="cpp")
        return (loss.detach(), *torch.autograd.grad(loss, (fs, ft, w, b)))
    return run


def kd(seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, 16, 1000) * 3, _randn(g, 16, 1000) * 3

    def run():
        loss = kdkernels.kd_loss(s, t, temperature=4.0, backend="cpp")
        return (loss.detach(), *torch.autograd.grad(loss, (s, t)))
    return run


OPS = {"hcl_loss": hcl, "abf_fuse": abf, "hint_loss": hint, "kd_loss": kd}


@pytest.mark.parametrize("op", OPS)
def test_concurrent_calls_match_single_threaded(op):
    if "cpp" not in backends.available_backends(op, "cpu"):
        why = {name: reason for name, _, reason in backends.backend_status(op, "cpu")}["cpp"]
        pytest.skip(f"the cpp backend is not available for {op} here: {why}")
    runs = [OPS[op](seed=100 + k) for k in range(THREADS)]
    expected = [run() for run in runs]  # one at a time
    assert not all(torch.equal(a, b) for a, b in zip(*expected)), "the threads must work on different inputs"
    barrier = threading.Barrier(THREADS)
    failures = []

    def worker(k):
        try:
            barrier.wait()
            for it in range(ITERATIONS):
                got = runs[k]()
                bad = [i for i, (a, b) in enumerate(zip(got, expected[k])) if not torch.equal(a, b)]
                if bad:
                    failures.append(f"thread {k}, iteration {it}: outputs {bad} differ from the single-threaded run")
                    return
        except Exception as exc:  # report it in the main thread, not as an unraisable warning
            failures.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures
