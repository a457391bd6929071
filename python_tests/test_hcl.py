"""HCL (docs/spec.md §1): every backend against the float64 reference, and the op's contracts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.ops._common import acc_dtype
from kdkernels import backends
from kdkernels.reference import hcl as ref

from _util import DEVICE, DTYPES, REL_TOL, assert_bitwise_repeatable, assert_rel_close, backends_for, plane_cases

BACKENDS = backends_for("hcl_loss")
FAST = [b for b in BACKENDS if b != "torch"]
# rows of 16 and 32 have their own compiled C++ loops (csrc/cpu/hcl.cpp, hcl_nested.h): square, with
# overlapping row bins (7, 5 rows), and with a single row
SHAPES = [(2, 3, h, h) for h in (1, 2, 3, 4, 5, 7, 8, 14, 16, 32)] + [
    (1, 3, 56, 56), (2, 5, 7, 9), (2, 5, 9, 7), (1, 1, 14, 3), (3, 1, 1, 6),
    (2, 3, 7, 16), (1, 3, 1, 16), (2, 3, 5, 32)]
GRAD_OUT = 1.7


def _cases():
    """Every backend × dtype × shape, except the torch backend in fp16/bf16: that is the
    reference run in low precision, so it would only test the reference against itself."""
    return [p for p in plane_cases(BACKENDS, SHAPES)
            if not (p.values[0] == "torch" and p.values[1] in (torch.float16, torch.bfloat16))]


def _features(shapes, dtype, seed=0, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_() for s in shapes]
    ft = [(torch.randn(s, generator=g) * 0.5 + 0.1).to(DEVICE, dtype).requires_grad_(teacher_grad)
          for s in shapes]
    return fs, ft


def _reference(fs, ft):
    """float64 reference loss and gradients w.r.t. both sides (times GRAD_OUT)."""
    fs64 = [f.detach().double().requires_grad_() for f in fs]
    ft64 = [f.detach().double().requires_grad_() for f in ft]
    loss = ref.hcl_loss(fs64, ft64)
    (loss * GRAD_OUT).backward()
    return loss, [f.grad for f in fs64], [f.grad for f in ft64]


def test_expected_backends_are_available():
    """CI must really run the fused kernels: a missing _C or Triton is a failure, not a skip."""
    have = backends.available_backends("hcl_loss", DEVICE)
    missing = [b for b in BACKENDS if b not in have]
    assert not missing, f"backends {missing} unavailable: {backends.backend_status('hcl_loss', DEVICE)}"


@pytest.mark.parametrize("backend, dtype, shape", list(_cases()))
def test_matches_reference(backend, dtype, shape):
    fs, ft = _features([shape], dtype)
    loss = kdkernels.hcl_loss(fs, ft, backend=backend)
    assert loss.dtype == acc_dtype(dtype) and loss.shape == ()  # never rounded to fp16/bf16
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, _ = _reference(fs, ft)
    tol = REL_TOL[dtype]
    assert_rel_close(loss, ref_loss, tol, "loss")
    assert_rel_close(fs[0].grad, ref_gs[0], tol, "grad fstudent")
    assert ft[0].grad is None


# planes of more than 16,384 elements: short rows (15, 31) past the batched kernel's scratch
# limit, and long rows (130); one plane each, so that the test stays quick
WIDE_PLANES = [(1, 2, 1093, 15), (1, 1, 530, 31), (1, 1, 130, 130)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", WIDE_PLANES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_plane_kernel_on_planes_over_16384_elements(shape, dtype):
    assert shape[2] * shape[3] > 16384
    fs, ft = _features([shape], dtype, seed=5)
    loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, REL_TOL[dtype], "loss")
    assert_rel_close(fs[0].grad, ref_gs[0], REL_TOL[dtype], "grad fstudent")


# The C++ tile path (csrc/cpu/hcl_nested.h) serves planes whose largest pool divides H and W:
# 8 x 8 float has its own vector code, 8 / 16 / 32 square and 28 x 28 their compiled sizes, rows of
# 16, 32 and 56 theirs (float: as register vectors, of 4 floats at 28, else 8), the rest the generic
# loops (L = 4, 2 and 1); the "miss" shapes are one row or column off and take the overlapping-bin
# kernels instead.
TILE_HIT = [(3, 5, 8, 8), (2, 3, 16, 16), (1, 2, 32, 32), (2, 3, 8, 12), (2, 3, 12, 8), (1, 3, 28, 28),
            (2, 3, 4, 6), (2, 3, 2, 5), (1, 2, 8, 32), (1, 2, 56, 56), (2, 3, 4, 56), (1, 2, 20, 16),
            (2, 1, 12, 32)]
TILE_MISS = [(2, 3, 8, 10), (2, 3, 10, 8), (2, 3, 9, 8), (2, 3, 3, 4), (2, 3, 6, 6), (2, 3, 8, 7)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", TILE_HIT + TILE_MISS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pattern", ["random", "tiles"])
def test_cpp_tile_path_and_its_neighbours(shape, dtype, pattern):
    """Random data, and data whose bin means dominate the loss (a large value per row and
    per column, little noise), so that a sum landing in the wrong tile or bin shows."""
    fs, ft = _features([shape], dtype, seed=7)
    if pattern == "tiles":
        n, c, h, w = shape
        g = torch.Generator().manual_seed(8)
        rows = torch.randn(n, c, h, 1, generator=g) * 3
        cols = torch.randn(n, c, 1, w, generator=g) * 3
        base = rows + cols + 0.1 * torch.randn(shape, generator=g)
        fs = [base.to(DEVICE, dtype).requires_grad_()]
        ft = [torch.zeros(shape, device=DEVICE, dtype=dtype)]
    loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, REL_TOL[dtype], "loss")
    assert_rel_close(fs[0].grad, ref_gs[0], REL_TOL[dtype], "grad fstudent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multilevel_with_teacher_grad(backend):
    shapes = [(2, 4, 14, 14), (2, 8, 7, 7), (2, 8, 4, 4), (2, 8, 1, 1)]
    fs, ft = _features(shapes, torch.float32, seed=1, teacher_grad=True)
    loss = kdkernels.hcl_loss(fs, ft, backend=backend)
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, ref_gt = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    for k in range(len(shapes)):
        assert_rel_close(fs[k].grad, ref_gs[k], 1e-5, f"grad fstudent[{k}]")
        assert_rel_close(ft[k].grad, ref_gt[k], 1e-5, f"grad fteacher[{k}]")


def test_closed_form_overlapping_bins():
    """H = W = 7, pool 4: bins [0,2) [1,4) [3,6) [5,7) overlap; check against explicit bin means."""
    d = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    bins = ref.adaptive_bins(7, 4)
    assert bins == [(0, 2), (1, 4), (3, 6), (5, 7)]
    pooled = torch.tensor([[d[0, 0, a:b, c:e].mean() for (c, e) in bins] for (a, b) in bins])
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(d, 4)[0, 0])
    p2 = torch.tensor([[d[0, 0, a:b, c:e].mean() for (c, e) in ref.adaptive_bins(7, 2)]
                       for (a, b) in ref.adaptive_bins(7, 2)])
    expected = ((d ** 2).mean() + 0.5 * (pooled ** 2).mean() + 0.25 * (p2 ** 2).mean()
                + 0.125 * d.mean() ** 2) / 1.875
    zero = torch.zeros_like(d)
    for backend in BACKENDS:
        got = kdkernels.hcl_loss(d.to(DEVICE), zero.to(DEVICE), backend=backend)
        assert abs(got.item() - expected.item()) < 1e-12 * abs(expected.item()), backend


@pytest.mark.parametrize("height, normaliser", [(1, 1.0), (2, 1.5), (3, 1.75), (4, 1.75), (5, 1.875), (9, 1.875)])
def test_level_plan(height, normaliser):
    pools, weights, tot = ref.hcl_level_plan(height)
    assert tot == normaliser
    assert all(l < height for l in pools)
    assert list(weights) == [2.0 ** -(j + 1) for j in range(len(pools))]


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    # small: gradcheck runs ~4 forwards per input element, slow in the Triton interpreter
    shapes = [(1, 2, 5, 5), (1, 1, 3, 2), (1, 2, 1, 1)]
    fs, ft = _features(shapes, torch.float64, seed=2, teacher_grad=True)
    fn = lambda *xs: kdkernels.hcl_loss(list(xs[:3]), list(xs[3:]), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, fs + ft)


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    fs, ft = _features([(2, 3, 7, 7), (1, 2, 3, 5)], torch.float32, seed=3)
    torch.library.opcheck(torch.ops.kdkernels.hcl_loss.default, (fs, ft, backend))
    ft_grad = [f.detach().clone().requires_grad_() for f in ft]
    torch.library.opcheck(torch.ops.kdkernels.hcl_loss.default, (fs, ft_grad, backend))
    grad = torch.tensor(1.3, device=DEVICE)
    fs_d, ft_d = [f.detach() for f in fs], [f.detach() for f in ft]
    _, sums = torch.ops.kdkernels.hcl_loss(fs_d, ft_d, backend)
    torch.library.opcheck(torch.ops.kdkernels.hcl_loss_backward.default, (grad, fs_d, ft_d, sums, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    fs, ft = _features([(2, 3, 7, 7), (2, 3, 4, 4)], torch.float32, seed=4)
    compiled = torch.compile(lambda a, b: kdkernels.hcl_loss(a, b, backend=backend) * GRAD_OUT,
                             fullgraph=True, backend="aot_eager")
    loss = compiled(fs, ft)
    loss.backward()
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss * GRAD_OUT, 1e-5, "loss")
    assert_rel_close(fs[0].grad, ref_gs[0], 1e-5, "grad")


@pytest.mark.parametrize("backend", FAST)
def test_saves_inputs_and_bin_sums(backend):
    """The graph keeps the inputs and, on CPU, every plane's bin sums (21 per 7 x 7 plane,
    4 + 1 per 4 x 4 plane, none for 1 x 1; csrc/cpu/hcl.cpp gives the layout): the backward
    reads them instead of summing the planes again. The GPU backends recompute them (an
    empty tensor is saved)."""
    fs, ft = _features([(2, 3, 7, 7), (1, 2, 4, 4), (2, 2, 1, 1)], torch.float32, seed=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = kdkernels.hcl_loss(fs, ft, backend=backend)
    assert len(saved) == 7
    assert [t.data_ptr() for t in saved[:6]] == [t.data_ptr() for t in fs + ft]
    sums = saved[6]
    assert sums.dtype == torch.float32 and sums.dim() == 1
    if backend != "cpp":
        assert sums.numel() == 0
        return
    assert sums.numel() == 2 * 3 * 21 + 2 * 5

    def bins(level, n, c, h):  # plane (n, c)'s bin sums of d, pool by pool, row-major
        d = (fs[level] - ft[level]).detach().double()[n, c]
        return torch.stack([d[(i * h) // l:-((-(i + 1) * h) // l), (k * h) // l:-((-(k + 1) * h) // l)].sum()
                            for l in (4, 2, 1) if l < h for i in range(l) for k in range(l)])

    # 7 x 7: one batch of 6 planes, bin-major (bin b of plane p at 6 b + p)
    assert_rel_close(sums[0:126:6].double(), bins(0, 0, 0, 7), 1e-6, "7 x 7 plane 0")
    assert_rel_close(sums[5:126:6].double(), bins(0, 1, 2, 7), 1e-6, "7 x 7 plane 5")
    # 4 x 4: plane after plane, 5 bins each
    assert_rel_close(sums[126 + 5:126 + 10].double(), bins(1, 0, 1, 4), 1e-6, "4 x 4 plane 1")
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_channels_last(backend):
    fs, ft = _features([(2, 6, 9, 7)], torch.float32, seed=6)
    base = kdkernels.hcl_loss(fs, ft, backend=backend)
    cl = [f.detach().to(memory_format=torch.channels_last).requires_grad_() for f in fs]
    sliced = torch.randn(2, 12, 9, 7, device=DEVICE)[:, ::2]
    assert not sliced.is_contiguous()
    loss_cl = kdkernels.hcl_loss(cl, [t.to(memory_format=torch.channels_last) for t in ft], backend=backend)
    loss_cl.backward()
    assert_rel_close(loss_cl, base, 1e-6, "channels_last loss")
    assert_rel_close(kdkernels.hcl_loss(sliced, ft[0], backend=backend),
                     ref.hcl_loss([sliced.double()], [ft[0].double()]), 1e-5, "sliced")
    _, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(cl[0].grad, ref_gs[0] / GRAD_OUT, 1e-5, "channels_last grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Bitwise-identical loss and gradients (student and teacher, every level) over 5 runs (cpp: 1 or 2 threads)."""
    nc = (2, 3) if backend == "triton" and DEVICE.type == "cpu" else (4, 8)  # the interpreter is slow
    shapes = [(*nc, 14, 14), (*nc, 7, 7), (*nc, 1, 1)]
    fs, ft = _features(shapes, torch.float32, seed=8, teacher_grad=True)

    def run():
        loss = kdkernels.hcl_loss(fs, ft, backend=backend)
        return [loss, *torch.autograd.grad(loss, fs + ft)]

    assert_bitwise_repeatable(run, what=f"hcl_loss[{backend}]", vary_threads=backend == "cpp")


def test_single_tensors_and_module():
    fs, ft = _features([(2, 3, 5, 5)], torch.float32, seed=9)
    a = kdkernels.hcl_loss(fs[0], ft[0])
    b = kdkernels.nn.HCLLoss()(fs, ft)
    assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_interpreter_really_ran():
    from triton.runtime.interpreter import InterpretedFunction

    from kdkernels.triton import hcl as tri
    from kdkernels.triton import launch_counts

    assert isinstance(tri._hcl_fwd_kernel, InterpretedFunction)
    assert isinstance(tri._hcl_bwd_kernel, InterpretedFunction)
    before = (launch_counts["hcl_fwd"], launch_counts["hcl_sum"], launch_counts["hcl_bwd"])
    fs, ft = _features([(1, 2, 5, 5), (1, 2, 2, 2)], torch.float32)
    kdkernels.hcl_loss(fs, ft, backend="triton").backward()
    # both levels in one launch each way, plus the forward's one partial sum
    after = (launch_counts["hcl_fwd"], launch_counts["hcl_sum"], launch_counts["hcl_bwd"])
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_backend_selection(monkeypatch):
    fs, ft = _features([(1, 2, 3, 3)], torch.float32)
    default = {"cpu": "cpp", "cuda": "triton"}[DEVICE.type]
    assert backends.choose_backend("hcl_loss", DEVICE) == default
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert backends.choose_backend("hcl_loss", DEVICE) == "torch"
    other = "cuda" if DEVICE.type == "cpu" else "cpp"
    with pytest.raises(RuntimeError, match=f"backend '{other}' cannot run on {DEVICE.type}"):
        kdkernels.hcl_loss(fs, ft, backend=other)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_more_levels_than_one_launch_holds():
    """10 levels (more than the kernel's level table of 8): two launches each way, same loss and gradients."""
    from kdkernels.triton import hcl as tri
    from kdkernels.triton import launch_counts

    shapes = [(1, 2, h, w) for h, w in ((1, 1), (2, 2), (3, 4), (4, 4), (5, 5), (7, 7), (2, 9), (6, 3),
                                         (1, 5), (8, 8))]
    assert len(shapes) > tri.MAX_LEVELS
    fs, ft = _features(shapes, torch.float32, seed=11)
    before = (launch_counts["hcl_fwd"], launch_counts["hcl_bwd"])
    loss = kdkernels.hcl_loss(fs, ft, backend="triton")
    (loss * GRAD_OUT).backward()
    assert (launch_counts["hcl_fwd"], launch_counts["hcl_bwd"]) == (before[0] + 2, before[1] + 2)
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, REL_TOL[torch.float32], "loss")
    for k, (f, g) in enumerate(zip(fs, ref_gs)):
        assert_rel_close(f.grad, g, REL_TOL[torch.float32], f"grad of level {k}")


def _spy_launch_tables(monkeypatch):
    """Record the constexprs of every HCL launch table the Triton launchers build."""
    from kdkernels.triton import hcl as tri

    seen = []
    real = tri.launch_table

    def spy(*args, **kwargs):
        grid, targs, consts = real(*args, **kwargs)
        seen.append(consts)
        return grid, targs, consts

    monkeypatch.setattr(tri, "launch_table", spy)
    return seen


# one launch of mixed levels: 7 x 7 (flat, G = 4 fp32 / 8 fp16 / 2 fp64 planes per aligned group;
# 15 planes are not a multiple of it and 735 elements leave a tail), 14 x 14 (flat in fp32, G = 1,
# and fp16, G = 2 with 3 planes; rows in fp64), 8 x 8 rows, 28 x 28 (rows; flat in fp16, whose
# vectors are 8 elements), 1 x 1 (no pools, 5 elements: a tail)
FLAT_MIX = [(3, 5, 7, 7), (1, 3, 14, 14), (2, 3, 8, 8), (1, 2, 28, 28), (1, 5, 1, 1)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_triton_flat_planes_mixed_with_row_levels(monkeypatch, dtype):
    """The flat layout (whole 7 x 7 / 14 x 14 planes loaded as 16-byte-aligned groups and
    regrouped by tl.gather, the gradient stored back the same way) next to the row layout and a
    pool-less level in one launch each way, with plane counts that are not a multiple of the
    group and element counts that leave a scalar tail: loss and gradient match the float64
    reference."""
    from kdkernels.triton import hcl as tri

    seen = _spy_launch_tables(monkeypatch)
    fs, ft = _features(FLAT_MIX, dtype, seed=13)
    loss = kdkernels.hcl_loss(fs, ft, backend="triton")
    (loss * GRAD_OUT).backward()
    assert len(seen) == 2  # one table forward, one backward: all levels in one launch each
    vec = 16 // fs[0].element_size()
    for consts in seen:
        assert consts["VEC"] == vec
        assert consts["FLAT"] == tuple(h > 1 and w % vec != 0 for n, c, h, w in FLAT_MIX)
        assert consts["FLAT"][0]
        for k, (n, c, h, w) in enumerate(FLAT_MIX):
            if consts["FLAT"][k]:
                group = vec // math.gcd(h * w, vec)
                assert consts["PB"][k] % group == 0 and consts["FB"][k] >= consts["PB"][k] * h * w
        assert consts["TAIL"] == tuple((n * c * h * w) % vec != 0 for n, c, h, w in FLAT_MIX)
    assert consts["TAIL"][0] and consts["TAIL"][4]  # the 7 x 7 and 1 x 1 levels have tails
    assert (3 * 5) % (vec // math.gcd(49, vec)) != 0  # the 7 x 7 planes are not whole groups
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, REL_TOL[dtype], "loss")
    for k, (f, g) in enumerate(zip(fs, ref_gs)):
        assert_rel_close(f.grad, g, REL_TOL[dtype], f"grad of level {k} {FLAT_MIX[k]}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_misaligned_view_falls_back_to_rows(monkeypatch):
    """A contiguous view with a storage offset of one element (4 bytes past a 16-byte boundary)
    takes the row layout, whose alignment hints hold for any base pointer; still correct."""
    seen = _spy_launch_tables(monkeypatch)
    shapes = [(2, 3, 7, 7), (1, 2, 14, 14)]
    g = torch.Generator().manual_seed(17)
    fs, ft = [], []
    for s in shapes:
        n = math.prod(s)
        a, b = torch.randn(n + 1, generator=g), torch.randn(n + 1, generator=g)
        fs.append(a[1:].view(s).requires_grad_())  # a leaf view: data_ptr() % 16 == 4
        ft.append(b[1:].view(s))
    assert all(f.data_ptr() % 16 == 4 and f.is_contiguous() for f in fs + ft)
    loss = kdkernels.hcl_loss(fs, ft, backend="triton")
    (loss * GRAD_OUT).backward()
    assert seen and all(consts["FLAT"] == (False, False) for consts in seen)
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(loss, ref_loss, REL_TOL[torch.float32], "loss")
    for k, (f, gr) in enumerate(zip(fs, ref_gs)):
        assert_rel_close(f.grad, gr, REL_TOL[torch.float32], f"grad of level {k}")


# Levels of several work items each (csrc/cpu/hcl.cpp splits a call into items of about 16K
# elements, by shape), in every kernel family: tiles (32, 8; rows of 16, 28 and 56 as register
# vectors), overlapping bins batched (14, 7, 5 x 3) and plain MSE (1 x 1).
MANY_ITEMS = [(2, 40, 32, 32), (3, 50, 14, 14), (1, 700, 7, 7), (2, 17, 5, 3), (4, 130, 8, 8), (1, 9000, 1, 1),
              (2, 70, 16, 16), (1, 25, 28, 28), (1, 8, 56, 56)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cpp_same_bits_for_any_thread_count_and_instruction_set(dtype, monkeypatch):
    """One call takes every level, split into work items by shape only: 1 or 2 threads, and
    the AVX2 or the baseline copy of the kernels ($KDKERNELS_CPU_ISA), give the same bits."""
    fs, ft = _features(MANY_ITEMS, dtype, seed=12, teacher_grad=True)

    def run():
        loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
        return [loss, *torch.autograd.grad(loss * GRAD_OUT, fs + ft)]

    assert_bitwise_repeatable(run, runs=4, what="hcl_loss[cpp]", vary_threads=True)
    first = run()
    monkeypatch.setenv("KDKERNELS_CPU_ISA", "baseline")
    for k, (a, b) in enumerate(zip(first, run())):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"output {k}: AVX2 != baseline"
    ref_loss, ref_gs, _ = _reference(fs, ft)
    assert_rel_close(first[0], ref_loss, REL_TOL[dtype], "loss")
    for k, g in enumerate(ref_gs):
        assert_rel_close(first[1 + k], g, REL_TOL[dtype], f"grad fstudent[{k}]")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("level", range(len(MANY_ITEMS)))
def test_cpp_nan_in_one_plane(level):
    """A NaN in one plane of one level: the loss is NaN, that plane's gradient is NaN where the
    reference's is, and every other plane's gradient is finite."""
    fs, ft = _features(MANY_ITEMS, torch.float32, seed=13)
    n, c, h, w = MANY_ITEMS[level]
    with torch.no_grad():
        fs[level][n - 1, c // 2, h // 2, w // 2] = float("nan")
    loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
    grads = torch.autograd.grad(loss, fs)
    _, ref_gs, _ = _reference(fs, ft)
    assert torch.isnan(loss)
    for k, (g, r) in enumerate(zip(grads, ref_gs)):
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"level {k}: NaN where the reference has none or v.v."
        assert torch.isnan(g).any() == (k == level)
