"""ABF fusion (docs/spec.md §2, step 2): every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels import backends
from kdkernels.reference import abf as ref

from _util import (DEVICE, REL_TOL, assert_bitwise_repeatable, assert_rel_close, backends_for, plane_cases,
                   rel_error)

BACKENDS = backends_for("abf_fuse")
FAST = [b for b in BACKENDS if b != "torch"]
# (N, C, H, W, h, w): H in {1, 2, 3, 7, 14, 56} with h = H/2, H/4 or 1; non-square; odd C
SHAPES = [(2, 3, 1, 1, 1, 1), (1, 4, 2, 2, 1, 1), (2, 5, 3, 3, 3, 3), (2, 3, 7, 7, 3, 3), (1, 6, 7, 7, 1, 1),
          (2, 5, 14, 14, 7, 7), (1, 3, 14, 14, 3, 3), (1, 7, 5, 9, 2, 4), (1, 2, 56, 56, 28, 28), (1, 2, 56, 56, 14, 14)]


def _cases():
    return plane_cases(BACKENDS, SHAPES)


def _inputs(shape, dtype, seed=0):
    N, C, H, W, h, w = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return mk(N, C, H, W), mk(N, C, h, w), mk(2, 2 * C, 1, 1), mk(2)


def _grads(out_fn, inputs, gout):
    out = out_fn(*inputs)
    grads = torch.autograd.grad(out, inputs, gout)
    return out, grads


@pytest.mark.parametrize("backend, dtype, shape", list(_cases()))
def test_matches_reference(backend, dtype, shape):
    inputs = _inputs(shape, dtype)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype) * 1.7
    out, grads = _grads(lambda *a: kdkernels.abf_fuse(*a, backend=backend), inputs, gout)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(ref.abf_fuse, inputs64, gout.double())
    tol = REL_TOL[dtype] if backend != "torch" or dtype in (torch.float32, torch.float64) else 3e-2
    assert out.dtype == dtype
    assert_rel_close(out, ref_out, tol, "out")
    for name, g, r in zip(("x", "y", "att_weight", "att_bias"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_rel_close(g, r, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST)
def test_low_precision_error_at_most_twice_eager(backend, dtype):
    """Against float64, the fused op is no worse than about twice plain PyTorch in the same dtype."""
    shape = (2, 6, 7, 7, 3, 3)
    inputs = _inputs(shape, dtype, seed=9)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(10)).to(DEVICE, dtype)
    ours = _grads(lambda *a: kdkernels.abf_fuse(*a, backend=backend), inputs, gout)
    eager = _grads(ref.abf_fuse, inputs, gout)
    exact = _grads(ref.abf_fuse, [t.detach().double().requires_grad_() for t in inputs], gout.double())
    for a, b, r in zip([ours[0], *ours[1]], [eager[0], *eager[1]], [exact[0], *exact[1]]):
        assert rel_error(a, r) <= 2 * rel_error(b, r) + 1e-3, (rel_error(a, r), rel_error(b, r))


def test_expected_backends_are_available():
    have = backends.available_backends("abf_fuse", DEVICE)
    assert all(b in have for b in BACKENDS), backends.backend_status("abf_fuse", DEVICE)


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    inputs = _inputs((1, 3, 5, 4, 2, 3), torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda *a: kdkernels.abf_fuse(*a, backend=backend), inputs)


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    inputs = _inputs((2, 3, 7, 7, 3, 3), torch.float32, seed=3)
    torch.library.opcheck(torch.ops.kdkernels.abf_fuse.default, (*inputs, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    inputs = _inputs((2, 3, 7, 7, 3, 3), torch.float32, seed=4)
    fn = torch.compile(lambda *a: kdkernels.abf_fuse(*a, backend=backend).square().sum(), fullgraph=True,
                       backend="aot_eager")
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_loss = ref.abf_fuse(*inputs).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-5, "grad")


@pytest.mark.parametrize("backend", FAST)
def test_saves_no_upsampled_or_concat(backend):
    x, y, w, b = _inputs((2, 3, 8, 8, 2, 2), torch.float32, seed=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kdkernels.abf_fuse(x, y, w, b, backend=backend)
    sizes = sorted(t.numel() for t in saved)
    # x, y, att_weight and the two attention maps (N*2*H*W); nothing of up(y) or the concat
    assert sizes == sorted([x.numel(), y.numel(), w.numel(), 2 * 2 * 8 * 8]), sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Bitwise-identical output and gradients of x, y, att_weight, att_bias over 5 runs."""
    inputs = _inputs((3, 5, 8, 8, 4, 4), torch.float32, seed=6)
    gout = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def run():
        out, grads = _grads(lambda *a: kdkernels.abf_fuse(*a, backend=backend), inputs, gout)
        return [out, *grads]

    assert_bitwise_repeatable(run, what=f"abf_fuse[{backend}]")


# cpp only: several work units per sample, several chunks per unit, a source row split across chunks
CPP_BIG = [(1, 256, 20, 128, 10, 64), (2, 256, 20, 130, 1, 1), (1, 96, 37, 300, 12, 97)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("shape", CPP_BIG, ids=lambda s: "x".join(map(str, s)))
def test_cpp_units_and_chunks_independent_of_threads(shape):
    inputs = _inputs(shape, torch.float32, seed=7)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(lambda *a: kdkernels.abf_fuse(*a, backend="cpp"), inputs, gout)
        torch.set_num_threads(max(2, threads))
        many = _grads(lambda *a: kdkernels.abf_fuse(*a, backend="cpp"), inputs, gout)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and all(torch.equal(a, b) for a, b in zip(one[1], many[1]))
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(ref.abf_fuse, inputs64, gout.double())
    assert_rel_close(many[0], ref_out, REL_TOL[torch.float32], "out")
    for name, g, r in zip(("x", "y", "att_weight", "att_bias"), many[1], ref_grads):
        assert_rel_close(g, r, REL_TOL[torch.float32], f"grad {name}")


# cpp only: many row chunks in one work unit. A unit covers about 2,048 output pixels (8 rows
# of 256 here); a chunk about 1 MiB of one full-size tensor, so with C = 1024 channels of 256
# columns a chunk is 1 row (2 for whole row pairs, 2 in 16-bit dtypes): 4 to 8 chunks per unit,
# on each shape path (halves, point, general).
CPP_CHUNKED = [(1, 1024, 12, 256, 6, 128), (1, 1024, 12, 256, 1, 1), (1, 1024, 11, 256, 4, 100)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", CPP_CHUNKED, ids=lambda s: "x".join(map(str, s)))
def test_cpp_several_chunks_per_unit(shape, dtype):
    inputs = _inputs(shape, dtype, seed=11)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(12)).to(dtype)
    out, grads = _grads(lambda *a: kdkernels.abf_fuse(*a, backend="cpp"), inputs, gout)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(ref.abf_fuse, inputs64, gout.double())
    assert_rel_close(out, ref_out, REL_TOL[dtype], "out")
    for name, g, r in zip(("x", "y", "att_weight", "att_bias"), grads, ref_grads):
        assert_rel_close(g, r, REL_TOL[dtype], f"grad {name}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("which", range(9))
def test_cpp_entry_points_reject_null_pointers(which):
    """The native entry points check every pointer before touching memory (a 0 would crash)."""
    from kdkernels import _native

    lib = _native.native()
    big = lambda: torch.randn(1, 2, 4, 4)  # noqa: E731  (N, C, H, W)
    small = lambda: torch.randn(1, 2, 2, 2)  # noqa: E731  (N, C, h, w)
    sizes = (1, 2, 4, 4, 2, 2, 0.5, 0.5, 1)
    keep = []

    def ptrs(*tensors):
        keep.extend(tensors)
        out = [t.data_ptr() for t in tensors]
        out[which % len(out)] = 0
        return out

    # x, y, att_weight, att_bias, out, z
    with pytest.raises(ValueError, match="abf_fwd_cpu: null data pointer"):
        lib.abf_fwd_cpu(0, *ptrs(big(), small(), torch.randn(8), torch.randn(2), big(), big()), *sizes)
    # grad, x, y, att_weight, z, grad_x, grad_y, grad_w, grad_b
    with pytest.raises(ValueError, match="abf_bwd_cpu: null data pointer"):
        lib.abf_bwd_cpu(0, *ptrs(big(), big(), small(), torch.randn(8), big(), big(), small(), torch.randn(8),
                                 torch.randn(2)), *sizes)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_interpreter_really_ran():
    from triton.runtime.interpreter import InterpretedFunction

    from kdkernels.triton import abf as tri
    from kdkernels.triton import launch_counts

    assert isinstance(tri._abf_fwd_kernel, InterpretedFunction)
    before = (launch_counts["abf_fwd"], launch_counts["abf_bwd"])
    x, y, w, b = _inputs((1, 2, 4, 4, 2, 2), torch.float32)
    kdkernels.abf_fuse(x, y, w, b, backend="triton").sum().backward()
    assert (launch_counts["abf_fwd"], launch_counts["abf_bwd"]) == (before[0] + 1, before[1] + 1)


def test_triton_channels_past_one_tile():
    """C = 600 > 512: the Triton kernels walk the channels in chunks (two passes) instead of one tile."""
    from kdkernels.triton import abf as tri

    shape = (1, 600, 3, 5, 2, 3)
    assert not tri._config(1, 600, 15, torch.float32)[3]  # not ONE_PASS
    inputs = _inputs(shape, torch.float32, seed=5)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(6)).to(DEVICE) * 1.7
    out, grads = _grads(lambda *a: kdkernels.abf_fuse(*a, backend="triton"), inputs, gout)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_grads = _grads(ref.abf_fuse, inputs64, gout.double())
    assert_rel_close(out, ref_out, REL_TOL[torch.float32], "out")
    for name, g, r in zip(("x", "y", "att_weight", "att_bias"), grads, ref_grads):
        assert_rel_close(g, r, REL_TOL[torch.float32], f"grad {name}")


@pytest.mark.parametrize("backend", FAST)
def test_attention_maps_get_no_zero_filled_gradient(backend):
    """The op's second output z (N, 2, H, W) is saved for the backward, not differentiated:
    autograd must not zero-fill a gradient for it (a launch per backward), and using it in
    a loss changes no gradient."""
    from _launches import recording

    inputs = _inputs((2, 3, 8, 8, 4, 4), torch.float32, seed=13)
    gout = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(14)).to(DEVICE) * 1.7
    out, z = torch.ops.kdkernels.abf_fuse(*inputs, backend)
    assert not z.requires_grad
    with recording() as rec:
        grads = torch.autograd.grad(out, inputs, gout, retain_graph=True)
    fills = [name for name in rec.launches if any(k in name for k in ("zero", "fill", "full"))]
    assert not fills, rec.launches
    with_z = torch.autograd.grad((out * gout).sum() + (3 * z).sum(), inputs)
    for a, b in zip(grads, with_z):
        assert torch.equal(a, b)


def test_exact_factor_agrees_with_the_nearest_rule():
    """The grad_y kernel's direct path is taken exactly when the float32 nearest rule maps
    output index i to i // k (k = out / in), for every size pair up to 130 x 40."""
    from kdkernels.triton import abf as tri

    for n_in in range(1, 41):
        for n_out in range(n_in, 131):
            src = ref.nearest_source_index(n_out, n_in).cpu()
            k = n_out // n_in
            exact = n_out % n_in == 0 and torch.equal(src, torch.arange(n_out) // k)
            assert tri._exact_factor(n_out, n_in) == (k if exact else 0), (n_out, n_in)


def test_triton_grad_y_plans():
    """grad_y reads only contributing pixels where the factor is exact (2x at the benchmark
    levels: 4 loads per source pixel, not 16 candidates), sums a 1 x 1 y over contiguous
    tiles, and keeps the masked candidate walk for other ratios."""
    from kdkernels.triton import abf as tri

    assert tri._y_plan(16, 16, 8, 8)[:3] == (1, 2, 2)
    assert tri._y_plan(56, 56, 28, 28)[:3] == (1, 2, 2)
    assert tri._y_plan(14, 28, 7, 7)[:3] == (1, 2, 4)
    assert tri._y_plan(8, 8, 1, 1)[0] == 2 and tri._y_plan(7, 7, 1, 1)[0] == 2
    assert tri._y_plan(7, 7, 3, 3)[0] == 0 and tri._y_plan(12, 10, 6, 4)[0] == 0


# each grad_y path: exact factors 3 and 1 x 3, a 1 x 1 y, exact on one axis only, a 1 x w y
Y_PATHS = [(1, 4, 9, 12, 3, 4), (2, 3, 6, 9, 6, 3), (2, 5, 9, 7, 1, 1), (1, 3, 6, 10, 3, 4), (1, 2, 5, 8, 1, 3)]


@pytest.mark.parametrize("shape", Y_PATHS, ids=lambda s: "x".join(map(str, s)))
def test_triton_grad_y_paths(shape):
    inputs = _inputs(shape, torch.float32, seed=15)
    gout = torch.randn(shape[:4], generator=torch.Generator().manual_seed(16)).to(DEVICE) * 1.7
    _, grads = _grads(lambda *a: kdkernels.abf_fuse(*a, backend="triton"), inputs, gout)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    _, ref_grads = _grads(ref.abf_fuse, inputs64, gout.double())
    for name, g, r in zip(("x", "y", "att_weight", "att_bias"), grads, ref_grads):
        assert_rel_close(g, r, REL_TOL[torch.float32], f"grad {name}")
