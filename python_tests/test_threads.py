"""Two Python threads calling the same C++ kernel at once get the single-threaded results, bitwise.

The cpp kernels hold no global state (scratch, thread counts and partial sums
are per call), so concurrent calls on different inputs must not interfere. Each
op runs forward and backward; each thread checks every iteration against the
result computed alone beforehand. The C++ entry points release the GIL
(csrc/bindings.cpp), so the kernels really overlap, and the worker pool that
every kernel shares (csrc/common/parallel.h) sees a concurrent caller. A forked
child process (a DataLoader worker) must get a working pool of its own.
"""
from __future__ import annotations

import multiprocessing
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



def _kd_forward_two_threads(s, t):
    """The native KD forward on two threads (the shared pool), without torch's intra-op threads."""
    from kdkernels.ops._native_args import KD_STATS, call

    stats, kl = torch.empty(s.shape[0], KD_STATS), torch.empty(s.shape[0])
    call("kd_fwd_cpu", s.dtype, s=s, t=t, stats=stats, out=kl, rows=s.shape[0], cols=s.shape[1], inv_t=0.25,
         out_scale=1.0, reduce=False, num_threads=2)
    return stats, kl


def _child(s, t, queue):
    torch.set_num_threads(1)  # torch's own OpenMP pool cannot run in a forked child (torch's rule, not ours)
    # numpy arrays: tensors would travel as shared-memory handles, which need the child alive
    queue.put([x.numpy().copy() for x in _kd_forward_two_threads(s, t)])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork() on this platform")
def test_forked_child_gets_its_own_pool():
    """The parent's pool threads do not exist in a forked child (a DataLoader worker): the
    pool must start afresh there, neither hang nor change the result."""
    if "cpp" not in backends.available_backends("kd_loss", "cpu"):
        why = {name: reason for name, _, reason in backends.backend_status("kd_loss", "cpu")}["cpp"]
        pytest.skip(f"the cpp backend is not available here: {why}")
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(64, 1000, generator=g), torch.randn(64, 1000, generator=g)
    expected = _kd_forward_two_threads(s, t)  # starts the pool's threads in the parent
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(s, t, queue))
    proc.start()
    try:
        got = queue.get(timeout=120)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0, f"the child exited with {proc.exitcode}"
    for name, a, b in zip(("stats", "kl"), got, expected):
        assert torch.equal(torch.from_numpy(a), b), f"{name} of the forked child differs from the parent's"


_POOL_SCRIPT = """
import sys, numpy, torch
sys.path.insert(0, {tests!r})
import test_threads as T
from kdkernels import _native
torch.set_num_threads(2)
assert _native.native().build_info()["threads"] == "persistent std::thread pool"
numpy.savez({out!r}, *[t.detach().numpy() for op in T.OPS for t in T.OPS[op](seed=3)()])
"""


def test_thread_pool_fallback_gives_the_same_bits(tmp_path):
    """KDKERNELS_CPU_THREADS=pool (the fallback when torch's OpenMP team is not found) and the
    default team give bitwise-identical results on two threads."""
    import os
    import subprocess
    import sys

    import numpy as np

    for op in OPS:
        if "cpp" not in backends.available_backends(op, "cpu"):
            pytest.skip(f"the cpp backend of {op} is not available here")
    out = tmp_path / "pool.npz"
    script = _POOL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out))
    env = dict(os.environ, KDKERNELS_CPU_THREADS="pool")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = [t.detach() for op in OPS for t in OPS[op](seed=3)()]
    finally:
        torch.set_num_threads(threads)
    with np.load(out) as pool:
        got = [torch.from_numpy(pool[f"arr_{i}"]) for i in range(len(pool.files))]
    assert len(got) == len(here)
    for i, (a, b) in enumerate(zip(got, here)):
        assert torch.equal(a, b), f"result {i}: the thread pool and the default team differ"
