"""FitNets hint loss (docs/spec.md §3): every backend against the float64 reference, and the op's contracts."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
from kdkernels.ops._common import acc_dtype
from kdkernels import backends
from kdkernels.reference import hint as ref

from _util import DEVICE, DTYPES, REL_TOL, assert_bitwise_repeatable, assert_rel_close, backends_for

OP = "hint_loss"
BACKENDS = backends_for("hint_loss")
FAST = [b for b in BACKENDS if b != "torch"]
INTERPRETED = DEVICE.type == "cpu"  # Triton runs in the (slow) interpreter
CHANNELS = (1, 3, 16, 33, 128)
SPATIAL = ((1, 1), (3, 5), (7, 7), (16, 16))
GRAD_OUT = 1.7


def _combos():
    """(Cs, Ct, (H, W), bias): every channel pair once, spatial sizes and bias cycled over them."""
    for k, (cs, ct) in enumerate(itertools.product(CHANNELS, CHANNELS)):
        yield cs, ct, SPATIAL[k % len(SPATIAL)], k % 3 != 0


def _cases():
    """(backend, dtype, Cs, Ct, HW, bias): the full channel grid in fp32 for the compiled
    backends; the other dtypes (and the Triton interpreter) get every third combination."""
    for backend in BACKENDS:
        for dtype in DTYPES:
            if backend == "torch" and dtype in (torch.float16, torch.bfloat16):
                continue  # the reference in low precision: it would only be tested against itself
            for k, (cs, ct, hw, bias) in enumerate(_combos()):
                thin = (dtype != torch.float32) or (backend == "triton" and INTERPRETED)
                if thin and k % 3 != DTYPES.index(dtype) % 3:
                    continue
                if backend == "triton" and INTERPRETED and hw == (16, 16) and cs * ct > 16 * 33:
                    hw = (7, 7)  # keep the interpreter fast
                name = f"{backend}-{str(dtype)[6:]}-cs{cs}-ct{ct}-{hw[0]}x{hw[1]}-{'b' if bias else 'nob'}"
                yield pytest.param(backend, dtype, cs, ct, hw, bias, id=name)


def _inputs(n, cs, ct, hw, dtype, bias=True, seed=0, teacher_grad=False, weight_grad=True):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    fs = torch.randn(n, cs, h, w, generator=g).to(DEVICE, dtype).requires_grad_()
    ft = (torch.randn(n, ct, h, w, generator=g) * 0.5 + 0.1).to(DEVICE, dtype).requires_grad_(teacher_grad)
    wt = (torch.randn(ct, cs, 1, 1, generator=g) / cs ** 0.5).to(DEVICE, dtype).requires_grad_(weight_grad)
    b = (torch.randn(ct, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_(weight_grad) if bias else None
    return fs, ft, wt, b


def _reference(fs, ft, w, b):
    """float64 reference loss and gradients (times GRAD_OUT), None where no grad is wanted."""
    xs = [x.detach().double().requires_grad_(x.requires_grad) if x is not None else None for x in (fs, ft, w, b)]
    loss = ref.hint_loss(*xs)
    if any(x is not None and x.requires_grad for x in xs):
        (loss * GRAD_OUT).backward()
    return loss.detach(), [x.grad if x is not None else None for x in xs]


def _check_against_reference(fs, ft, w, b, backend, tol):
    loss = kdkernels.hint_loss(fs, ft, w, b, backend=backend)
    assert loss.dtype == acc_dtype(fs.dtype) and loss.shape == ()  # never rounded to fp16/bf16
    (loss * GRAD_OUT).backward()
    ref_loss, ref_grads = _reference(fs, ft, w, b)
    assert_rel_close(loss, ref_loss, tol, "loss")
    for name, x, gref in zip(("fs", "ft", "weight", "bias"), (fs, ft, w, b), ref_grads):
        if x is None:
            continue
        if gref is None:
            assert x.grad is None, f"{name} got a gradient it did not ask for"
        else:
            assert x.grad is not None and x.grad.dtype == x.dtype, name
            assert_rel_close(x.grad, gref, tol, f"grad {name}")


def test_expected_backends_are_available():
    """CI must really run the fused kernels: a missing _C or Triton is a failure, not a skip."""
    have = backends.available_backends(OP, DEVICE)
    missing = [b for b in BACKENDS if b not in have]
    assert not missing, f"backends {missing} unavailable: {backends.backend_status(OP, DEVICE)}"


@pytest.mark.parametrize("backend, dtype, cs, ct, hw, bias", list(_cases()))
def test_matches_reference(backend, dtype, cs, ct, hw, bias):
    fs, ft, w, b = _inputs(2, cs, ct, hw, dtype, bias=bias, seed=cs * 1000 + ct)
    _check_against_reference(fs, ft, w, b, backend, REL_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_grad_and_frozen_regressor(backend):
    # teacher requires grad; regressor frozen: only fs and ft get gradients
    fs, ft, w, b = _inputs(3, 5, 9, (4, 6), torch.float32, seed=1, teacher_grad=True, weight_grad=False)
    _check_against_reference(fs, ft, w, b, backend, 1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_larger_blocks(backend):
    """Several pixel blocks/tiles, Ct above one Triton channel chunk (130 > 128), odd batch."""
    n, hw = (3, (9, 11)) if backend == "triton" and INTERPRETED else (5, (16, 16))
    fs, ft, w, b = _inputs(n, 40, 130, hw, torch.float32, seed=2)
    _check_against_reference(fs, ft, w, b, backend, 1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    fs, ft, w, b = _inputs(2, 3, 4, (2, 3), torch.float64, seed=3, teacher_grad=True)
    fn = lambda *xs: kdkernels.hint_loss(*xs, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fs, ft, w, b))
    assert torch.autograd.gradcheck(lambda a, c: kdkernels.hint_loss(a, ft.detach(), c, backend=backend),
                                    (fs, w.view(4, 3)))


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    op = torch.ops.kdkernels.hint_loss_fused.default
    fs, ft, w, b = _inputs(2, 5, 7, (3, 4), torch.float32, seed=4, teacher_grad=True)
    torch.library.opcheck(op, (fs, ft, w, b, [True, True, True, True], backend, False))
    d = [x.detach() for x in (fs, ft, w, b)]
    torch.library.opcheck(op, (fs, d[1], d[2], None, [True, False, False, False], backend, False))
    torch.library.opcheck(op, (d[0], d[1], d[2], d[3], [False] * 4, backend, False))


def test_op_schema_has_no_dead_arguments():
    """The fused op takes what its kernels use: no gradient factor (the backward scales), no flag
    without effect."""
    names = [a.name for a in torch.ops.kdkernels.hint_loss_fused.default._schema.arguments]
    assert names == ["fs", "ft", "weight", "bias", "needs", "backend", "allow_tf32"], names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", FAST)
def test_grad_output_one(backend, dtype):
    """grad_output exactly 1 (a plain loss.backward()): the C++ path hands the forward's
    gradients over without a multiply; they must still be the reference's."""
    fs, ft, w, b = _inputs(2, 5, 7, (3, 4), dtype, seed=9, teacher_grad=True)
    kdkernels.hint_loss(fs, ft, w, b, backend=backend).backward()
    s64, t64, w64, b64 = (x.detach().double().requires_grad_() for x in (fs, ft, w, b))
    ref.hint_loss(s64, t64, w64, b64).backward()
    for name, x, x64 in zip(("fs", "ft", "weight", "bias"), (fs, ft, w, b), (s64, t64, w64, b64)):
        assert_rel_close(x.grad, x64.grad, REL_TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    fs, ft, w, b = _inputs(2, 6, 5, (3, 3), torch.float32, seed=5)
    compiled = torch.compile(lambda *xs: kdkernels.hint_loss(*xs, backend=backend) * GRAD_OUT,
                             fullgraph=True, backend="aot_eager")
    loss = compiled(fs, ft, w, b)
    loss.backward()
    ref_loss, ref_grads = _reference(fs, ft, w, b)
    assert_rel_close(loss, ref_loss * GRAD_OUT, 1e-5, "loss")
    for name, x, gref in zip(("fs", "weight", "bias"), (fs, w, b), (ref_grads[0], ref_grads[2], ref_grads[3])):
        assert_rel_close(x.grad, gref, 1e-5, f"grad {name}")


class _Spy(TorchDispatchMode):
    """Records the `needs` argument of every hint_loss_fused call."""

    def __init__(self):
        super().__init__()
        self.needs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.kdkernels.hint_loss_fused.default:
            self.needs.append(list(args[4]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", FAST)
def test_gradients_only_when_required(backend):
    fs, ft, w, b = _inputs(2, 3, 4, (3, 3), torch.float32, seed=6)
    with _Spy() as spy:
        kdkernels.hint_loss(fs.detach(), ft, w.detach(), b.detach(), backend=backend)
        with torch.no_grad():
            kdkernels.hint_loss(fs, ft, w, b, backend=backend)
        kdkernels.hint_loss(fs, ft, w.detach(), None, backend=backend)
    assert spy.needs == [[False] * 4, [False] * 4, [True, False, False, False]]
    # and the op then returns empty gradients
    outs = torch.ops.kdkernels.hint_loss_fused(fs.detach(), ft, w.detach(), None, [False] * 4, backend, False)
    assert [tuple(o.shape) for o in outs[1:]] == [(0,)] * 4


@pytest.mark.parametrize("backend", FAST)
def test_saves_nothing_of_the_regressed_map_size(backend):
    n, cs, ct, h, w_ = 2, 3, 16, 5, 5  # Cs != Ct: fs-sized is not map-sized
    fs, ft, w, b = _inputs(n, cs, ct, (h, w_), torch.float32, seed=7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = kdkernels.hint_loss(fs, ft, w, b, backend=backend)
    sizes = sorted(t.numel() for t in saved)
    assert n * ct * h * w_ not in sizes, sizes
    assert sum(sizes) <= fs.numel() + w.numel() + b.numel(), sizes  # W^T r, sum r fs^T, sum r, an empty
    assert all(t.data_ptr() not in (fs.data_ptr(), ft.data_ptr()) for t in saved if t.numel())


@pytest.mark.parametrize("backend", FAST)
def test_retain_graph_twice(backend):
    fs, ft, w, b = _inputs(2, 4, 6, (3, 2), torch.float32, seed=8)
    loss = kdkernels.hint_loss(fs, ft, w, b, backend=backend) * GRAD_OUT
    loss.backward(retain_graph=True)
    once = [x.grad.clone() for x in (fs, w, b)]
    loss.backward()
    for name, x, g in zip(("fs", "weight", "bias"), (fs, w, b), once):
        assert_rel_close(x.grad, 2 * g, 1e-6, f"twice grad {name}")
    _, ref_grads = _reference(fs, ft, w, b)
    assert_rel_close(once[0], ref_grads[0], 1e-5, "grad fs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_channels_last(backend):
    fs, ft, w, b = _inputs(2, 6, 5, (5, 7), torch.float32, seed=9)
    cl = fs.detach().to(memory_format=torch.channels_last).requires_grad_()
    loss = kdkernels.hint_loss(cl, ft.to(memory_format=torch.channels_last), w, b, backend=backend)
    (loss * GRAD_OUT).backward()
    ref_loss, ref_grads = _reference(fs, ft, w, b)
    assert_rel_close(loss, ref_loss, 1e-5, "channels_last loss")
    assert_rel_close(cl.grad, ref_grads[0], 1e-5, "channels_last grad")
    sliced = torch.randn(2, 12, 5, 7, device=DEVICE)[:, ::2]
    assert not sliced.is_contiguous()
    assert_rel_close(kdkernels.hint_loss(sliced, ft.detach(), w.detach(), b.detach(), backend=backend),
                     ref.hint_loss(sliced.double(), ft.double(), w.double(), b.double()), 1e-5, "sliced")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Bitwise-identical loss and gradients of fs, ft, weight, bias over 5 runs (cpp: 1 thread or all)."""
    shape = (3, 20, 40, (9, 9)) if backend == "triton" and INTERPRETED else (6, 48, 40, (12, 12))
    fs, ft, w, b = _inputs(*shape, torch.float32, seed=11, teacher_grad=True)

    def run():
        loss = kdkernels.hint_loss(fs, ft, w, b, backend=backend)
        return [loss, *torch.autograd.grad(loss, (fs, ft, w, b))]

    assert_bitwise_repeatable(run, what=f"hint_loss[{backend}]", vary_threads=backend == "cpp")


@pytest.mark.parametrize("backend", FAST)
def test_half_gradients_under_loss_scaling(backend):
    """fp16 with a large grad_output (AMP loss scaling): the gradient is scaled in fp32, so
    the tiny 2/numel factor never underflows in fp16 storage."""
    fs, ft, w, b = _inputs(4, 16, 16, (8, 8), torch.float16, seed=12)
    loss = kdkernels.hint_loss(fs, ft, w, b, backend=backend)
    (loss * 4096.0).backward()
    _, ref_grads = _reference(fs, ft, w, b)
    scale = 4096.0 / GRAD_OUT
    assert_rel_close(fs.grad, ref_grads[0] * scale, 1e-2, "grad fs")
    assert_rel_close(w.grad, ref_grads[2] * scale, 1e-2, "grad weight")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels serve CPU tensors")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpp_every_instruction_set(isa, monkeypatch):
    """Each compiled variant (the widest is picked at run time) against the reference;
    one the CPU lacks falls back to the next narrower one."""
    from kdkernels import _native

    monkeypatch.setenv("KDKERNELS_CPU_ISA", isa)
    ran = _native.native().hint_cpu_isa()
    assert ran == isa or (isa, ran) in {("avx512", "avx2"), ("avx512", "baseline"), ("avx2", "baseline")}
    for dtype, (cs, ct, hw) in [(torch.float32, (33, 70, (5, 7))), (torch.float64, (17, 6, (3, 3))),
                                (torch.bfloat16, (20, 13, (4, 4)))]:
        fs, ft, w, b = _inputs(3, cs, ct, hw, dtype, seed=14)
        _check_against_reference(fs, ft, w, b, "cpp", REL_TOL[dtype])
    monkeypatch.setenv("KDKERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KDKERNELS_CPU_ISA"):
        kdkernels.hint_loss(fs, ft, w, b, backend="cpp")


@pytest.mark.parametrize("backend", FAST)
def test_allow_tf32_flag(backend):
    fs, ft, w, b = _inputs(2, 16, 16, (4, 4), torch.float32, seed=13)
    loss = kdkernels.hint_loss(fs, ft, w, b, allow_tf32=True, backend=backend)
    assert_rel_close(loss, _reference(fs, ft, w, b)[0], 5e-3, "tf32 loss")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_interpreter_really_ran():
    from triton.runtime.interpreter import InterpretedFunction

    from kdkernels.triton import hint as tri
    from kdkernels.triton import launch_counts

    assert isinstance(tri._hint_fused_kernel, InterpretedFunction)
    before = launch_counts["hint_fused"]
    fs, ft, w, b = _inputs(1, 3, 4, (3, 3), torch.float32)
    kdkernels.hint_loss(fs, ft, w, b, backend="triton").backward()
    assert launch_counts["hint_fused"] == before + 1  # one launch: loss and all gradients


def test_backend_selection(monkeypatch):
    fs, ft, w, b = _inputs(1, 2, 3, (2, 2), torch.float32)
    default = {"cpu": "cpp", "cuda": "triton"}[DEVICE.type]
    assert backends.choose_backend(OP, DEVICE) == default
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert backends.choose_backend(OP, DEVICE) == "torch"


def test_public_api_and_weight_2d():
    fs, ft, w, b = _inputs(2, 3, 4, (2, 2), torch.float32)
    assert kdkernels.hint_loss is kdkernels.ops.hint_loss
    a = kdkernels.hint_loss(fs, ft, w, b)
    w2 = w.detach().view(4, 3).requires_grad_()
    c = kdkernels.hint_loss(fs, ft, w2, b)
    assert torch.equal(a, c)
    c.backward()
    assert w2.grad.shape == (4, 3)
