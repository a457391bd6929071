"""Launch counts and host work of every op's GPU path (the Triton backend).

A GPU op is only as fast as its launches allow when the work is small (HCL at
CIFAR shapes moves less data than one launch costs), and any host round trip
(``.item()``, a tensor built from Python data) stalls the stream or adds a
transfer per call. The bounds: HCL at most 3 launches per forward and per
backward whatever the number of levels; every other op at most 4. Counted as
described in ``_launches.py``: Triton kernels plus the torch ops that launch a
device kernel (fills, reductions, arithmetic, casts, copies), from the public
call through the backward of the result. HCL's CPU path (the cpp backend) has
the same bound in native calls: one per direction for all levels.
"""
from __future__ import annotations

import pytest
import torch

import kdkernels

from _launches import recording
from _util import DEVICE

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cpu" and not torch.cuda.is_available(), reason="needs the CPU interpreter or a GPU")

HCL_MAX = 3
OTHER_MAX = 4


def _step(fn, inputs, grad_out):
    """(forward record, backward record, output) of fn(*inputs) and its backward with ``grad_out``."""
    with recording() as fwd:
        out = fn(*inputs)
    wrt = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    g = grad_out(out)
    with recording() as bwd:
        torch.autograd.grad(out, wrt, g)
    return fwd, bwd, out


def _rand(shape, dtype, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + len(shape) + sum(shape))
    return torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(grad)


def _report(what, rec):
    return f"{what}: {len(rec.launches)} launches {rec.launches}; host work {rec.host}"


# ---------------------------------------------------------------- HCL
HCL_LEVELS = {
    "one 8x8": [(2, 3, 8, 8)],
    "cifar 4 levels": [(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 1, 1)],
    "imagenet 5 levels": [(1, 4, 56, 56), (1, 8, 28, 28), (1, 8, 14, 14), (1, 16, 7, 7), (1, 16, 1, 1)],
    "every plan": [(2, 3, 1, 1), (2, 3, 2, 2), (2, 3, 3, 5), (2, 3, 4, 4), (2, 3, 5, 3), (2, 3, 7, 7),
                   (1, 2, 14, 14), (1, 2, 9, 16)],
}


def _hcl_inputs(levels, dtype):
    fs = [_rand(s, dtype, grad=True, seed=i) for i, s in enumerate(levels)]
    ft = [_rand(s, dtype, seed=10 + i) for i, s in enumerate(levels)]
    return fs, ft


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(HCL_LEVELS))
def test_hcl_launches_do_not_grow_with_levels(case, dtype):
    fs, ft = _hcl_inputs(HCL_LEVELS[case], dtype)
    fwd, bwd, _ = _step(lambda a, b: kdkernels.hcl_loss(a, b, backend="triton"), (fs, ft),
                        lambda out: torch.full_like(out, 1.7))
    assert len(fwd.launches) <= HCL_MAX, _report("forward", fwd)
    assert len(bwd.launches) <= HCL_MAX, _report("backward", bwd)
    assert not fwd.host and not bwd.host, _report("forward", fwd) + "\n" + _report("backward", bwd)


class _CountingNative:
    """kdkernels._C with every entry point call recorded by name (in ``calls``)."""

    def __init__(self, mod):
        self._mod = mod
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(self._mod, name)
        if not callable(fn):
            return fn

        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return counted


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpp backend serves CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(HCL_LEVELS))
def test_hcl_cpp_makes_one_native_call_each_way(case, dtype, monkeypatch):
    """The CPU path's host work is Python per native call (a few microseconds, next to a CIFAR
    level's few tens of microseconds of kernel): one call per direction takes every level,
    whatever their number."""
    from kdkernels import _native

    mod = _native.native()
    if mod is None:
        pytest.skip(f"kdkernels._C did not load: {_native.load_error()}")
    counting = _CountingNative(mod)
    monkeypatch.setattr(_native, "native", lambda: counting)
    fs, ft = _hcl_inputs(HCL_LEVELS[case], dtype)
    loss = kdkernels.hcl_loss(fs, ft, backend="cpp")
    fwd, counting.calls = counting.calls, []
    torch.autograd.grad(loss, fs, torch.full_like(loss, 1.7))
    assert fwd == ["hcl_loss_cpu"], f"forward of {len(fs)} levels: native calls {fwd}"
    assert counting.calls == ["hcl_loss_backward_cpu"], f"backward of {len(fs)} levels: native calls {counting.calls}"


@pytest.mark.parametrize("backend", ["cpp", "triton"] if DEVICE.type == "cpu" else ["triton"])
def test_hcl_step_does_not_rebuild_the_level_lists(backend, monkeypatch):
    """A step's host work does not grow with pytree passes over the level lists: torch.library's
    autograd wrapper of an op with tensor-list arguments flattens and rebuilds them on every call,
    forward and backward (about a third of a CIFAR step's host time on the development CPU);
    kdkernels.hcl_loss's autograd node passes the tensors flat (ops/hcl.py, _HCL)."""
    if backend not in kdkernels.backends.available_backends("hcl_loss", DEVICE):
        pytest.skip(f"the {backend} backend cannot run on {DEVICE.type} here")
    from torch.utils import _pytree

    calls = []
    for name in ("tree_flatten", "tree_unflatten"):
        real = getattr(_pytree, name)
        monkeypatch.setattr(_pytree, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    fs, ft = _hcl_inputs(HCL_LEVELS["cifar 4 levels"], torch.float32)
    ft = [t.detach().requires_grad_() for t in ft]
    loss = kdkernels.hcl_loss(fs, ft, backend=backend)
    fwd, calls[:] = list(calls), []
    grads = torch.autograd.grad(loss, fs + ft, torch.full_like(loss, 1.7))
    assert fwd == [] and calls == [], f"pytree calls: forward {fwd}, backward {calls}"
    assert all(torch.equal(a, -b) for a, b in zip(grads[:4], grads[4:]))


# ---------------------------------------------------------------- ABF
ABF_SHAPES = [((2, 8, 8, 8), (4, 4)), ((1, 16, 7, 7), (4, 4)), ((2, 5, 6, 10), (3, 5))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xshape, yhw", ABF_SHAPES)
def test_abf_launches_and_no_host_work(xshape, yhw, dtype):
    n, c, _, _ = xshape
    x = _rand(xshape, dtype, grad=True)
    y = _rand((n, c) + yhw, dtype, grad=True, seed=1)
    w = _rand((2, 2 * c, 1, 1), dtype, grad=True, seed=2)
    b = _rand((2,), dtype, grad=True, seed=3)
    fwd, bwd, _ = _step(lambda *a: kdkernels.abf_fuse(*a, backend="triton"), (x, y, w, b),
                        lambda out: _rand(out.shape, dtype, seed=4))
    assert len(fwd.launches) <= OTHER_MAX, _report("forward", fwd)
    assert len(bwd.launches) <= OTHER_MAX, _report("backward", bwd)
    assert not fwd.host, _report("forward", fwd)
    assert not bwd.host, _report("backward", bwd)


# ---------------------------------------------------------------- KD
# (rows, classes): one segment per row; long rows split into segments (a combine pass)
KD_SHAPES = [(16, 100), (2, 50000)]


def _kd_params():
    for rows, cols in KD_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for reduction in ("batchmean", "none"):
                for teacher_grad in (False, True):
                    yield pytest.param(rows, cols, dtype, reduction, teacher_grad)


@pytest.mark.parametrize("rows, cols, dtype, reduction, teacher_grad", list(_kd_params()))
def test_kd_launches_and_no_host_work(rows, cols, dtype, reduction, teacher_grad):
    s = _rand((rows, cols), dtype, grad=True)
    t = _rand((rows, cols), dtype, grad=teacher_grad, seed=1)
    fwd, bwd, _ = _step(lambda a, b: kdkernels.kd_loss(a, b, 3.0, reduction, backend="triton"), (s, t),
                        lambda out: _rand(out.shape, out.dtype, seed=2))
    assert len(fwd.launches) <= OTHER_MAX, _report("forward", fwd)
    assert len(bwd.launches) <= OTHER_MAX, _report("backward", bwd)
    assert not fwd.host, _report("forward", fwd)
    assert not bwd.host, _report("backward", bwd)


# ---------------------------------------------------------------- hint
# (fs, ft) shapes: a few pixel tiles (one per program), and more tiles than the interpreter's
# 8 programs (each program then sums a run of tiles into its own partial)
HINT_SHAPES = [((2, 8, 4, 4), (2, 16, 4, 4)), ((3, 5, 12, 10), (3, 7, 12, 10))]


def _hint_params():
    for fs_shape, ft_shape in HINT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for grads in ("student", "all", "teacher only", "none"):
                yield pytest.param(fs_shape, ft_shape, dtype, grads, True)
    yield pytest.param((2, 8, 4, 4), (2, 16, 4, 4), torch.float32, "all", False)
    yield pytest.param((2, 8, 4, 4), (2, 16, 4, 4), torch.float64, "all", True)


@pytest.mark.parametrize("fs_shape, ft_shape, dtype, grads, bias", list(_hint_params()))
def test_hint_launches_and_no_host_work(fs_shape, ft_shape, dtype, grads, bias):
    cs, ct = fs_shape[1], ft_shape[1]
    student = grads in ("student", "all")
    fs = _rand(fs_shape, dtype, grad=student)
    ft = _rand(ft_shape, dtype, grad=grads in ("all", "teacher only"), seed=1)
    w = _rand((ct, cs, 1, 1), dtype, grad=student, seed=2)
    b = _rand((ct,), dtype, grad=student, seed=3) if bias else None
    if grads == "none":
        with recording() as fwd:
            kdkernels.hint_loss(fs, ft, w, b, backend="triton")
        assert len(fwd.launches) <= OTHER_MAX, _report("forward", fwd)
        assert not fwd.host, _report("forward", fwd)
        return
    fwd, bwd, _ = _step(lambda *a: kdkernels.hint_loss(*a, backend="triton"), (fs, ft, w, b),
                        lambda out: torch.full_like(out, 1.7))
    assert len(fwd.launches) <= OTHER_MAX, _report("forward", fwd)
    assert len(bwd.launches) <= OTHER_MAX, _report("backward", bwd)
    assert not fwd.host and not bwd.host, _report("forward", fwd) + "\n" + _report("backward", bwd)


# ---------------------------------------------------------------- linear_kd_loss_terms
def _lm_inputs(dtype):
    n, v, d_s, d_t = 6, 37, 5, 4
    h_s, w_s = _rand((n, d_s), dtype, grad=True), _rand((v, d_s), dtype, grad=True, seed=1)
    h_t, w_t = _rand((n, d_t), dtype, seed=2), _rand((v, d_t), dtype, seed=3)
    labels = torch.arange(n, device=DEVICE) % v
    labels[1] = -100
    return h_s, w_s, h_t, w_t, labels


# how a training loop back-propagates the two terms together: kd + ce, sum(dict.values()),
# a scaled sum (a GradScaler), and per-term sums of the "none" rows
TERMS_SUMS = {"kd + ce": lambda kd, ce: kd + ce,
              "sum(values)": lambda kd, ce: sum({"kd": kd, "ce": ce}.values()),
              "(kd + ce) * s": lambda kd, ce: (kd + ce) * 1.7,
              "kd.sum() + ce.sum()": lambda kd, ce: kd.sum() + ce.sum()}


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("how", list(TERMS_SUMS))
def test_linear_kd_terms_backward_has_no_host_work(how, reduction):
    """The backward of linear_kd_loss_terms checks that both terms got the same grad_output
    without reading it on the host (no torch.equal / .item() sync per step)."""
    from kdkernels.ops.linear_kd import linear_kd_loss_terms

    h_s, w_s, h_t, w_t, labels = _lm_inputs(torch.float32)
    kd, ce = linear_kd_loss_terms(h_s, w_s, h_t, w_t, temperature=2.0, labels=labels, ignore_index=-100,
                                  ce_weight=0.5, reduction=reduction, backend="triton")
    out = TERMS_SUMS[how](kd, ce)
    if out.dim():
        out = out.sum()
    with recording() as bwd:
        torch.autograd.grad(out, [h_s, w_s])
    assert not bwd.host, _report("backward", bwd)


def test_causal_lm_kd_backward_has_no_host_work():
    """CausalLMKD's two weighted terms, back-propagated as fit does (sum of the dict's values),
    reach the fused op's backward without a host comparison (kd_weight != 1 too)."""
    from torch import nn
    from kdkernels.train import CausalLMKD

    def lm(d, seed):
        torch.manual_seed(seed)
        return nn.Embedding(29, d).to(DEVICE), nn.Linear(d, 29).to(DEVICE)

    ids = torch.randint(0, 29, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for kd_weight in (1.0, 0.7):
        distiller = CausalLMKD(lm(6, 0), lm(4, 1), temperature=2.0, kd_weight=kd_weight, ce_weight=0.3,
                               backend="triton")
        _, losses = distiller(ids)
        assert set(losses) == {"kd", "ce"}
        loss = sum(losses.values())
        with recording() as bwd:
            loss.backward()
        assert not bwd.host, f"kd_weight={kd_weight}: " + _report("backward", bwd)


# ---------------------------------------------------------------- the recorder itself
def test_recorder_sees_launches_and_host_work():
    """The counting rules: what is a launch, what is host work (so the bounds above mean something)."""
    x = torch.randn(4, 4, device=DEVICE)
    with recording() as rec:
        y = torch.empty_like(x)         # allocation: not a launch
        v = x.view(16).reshape(4, 4)    # views: not launches
        same = x.to(x.dtype)            # returns x: not a launch
        s = (x * 2).sum()               # two launches
        torch.zeros(3, device=DEVICE)   # a fill: a launch
        torch.mul(x, 3, out=y)          # out=: a launch, though its output was an argument
        float(s)                        # host read
        torch.tensor(1.5)               # tensor from Python data
        torch.equal(x, y)               # a comparison answered on the host
        y.add_(1)                       # in place: a launch, though its result aliases y
        y[:2] = x[:2]                   # a slice assignment: copy_, a launch
        y.t_()                          # in place, metadata only: not a launch
    assert rec.launches == ["torch:mul", "torch:sum", "torch:zeros", "torch:mul", "torch:add_", "torch:copy_"], \
        rec.launches
    assert len(rec.host) == 3 and "_local_scalar_dense" in rec.host[0] and "lift_fresh" in rec.host[1], rec.host
    assert "equal" in rec.host[2], rec.host
    del y, v, same


# ---------------------------------------------------------------- linear_kd_loss
# linear_kd_loss is chunked by design (no (N, V) logits ever exist), and its GEMMs are
# torch's (cuBLAS on a GPU), so its launches grow with the chunks: per chunk, the
# logit/softmax pass and its merge (which writes the chunk's loss rows), the
# gradient-logit pass when gradients are formed, and one GEMM or column sum per
# gradient wanted (dh = dz w, dw += dz^T h, db += sum dz). Around the chunks at most
# LKD_FIXED_MAX launches per direction (the kept-row mask, the one-program reduction;
# the backward of a reduced loss is one scaling launch for all gradients).
LKD_FIXED_MAX = 4


def _lkd_count(reduction, ce_weight, grads, chunk):
    n, v, d_s, d_t = 6, 37, 5, 4
    s_grad, t_grad = grads in ("student", "all"), grads == "all"
    h_s, w_s = _rand((n, d_s), torch.float32, grad=s_grad), _rand((v, d_s), torch.float32, grad=s_grad, seed=1)
    h_t, w_t = _rand((n, d_t), torch.float32, grad=t_grad, seed=2), _rand((v, d_t), torch.float32, grad=t_grad,
                                                                          seed=3)
    b_s = _rand((v,), torch.float32, grad=s_grad, seed=4)
    labels = torch.arange(n, device=DEVICE) % v
    labels[1] = -100
    kw = dict(temperature=2.0, bias_s=b_s, labels=labels, ignore_index=-100, ce_weight=ce_weight,
              reduction=reduction, chunk=chunk, backend="triton")
    fwd, bwd, _ = _step(lambda *a: kdkernels.linear_kd_loss(*a, **kw), (h_s, w_s, h_t, w_t),
                        lambda out: torch.full_like(out, 1.7))
    gemms = 3 * s_grad + 2 * t_grad  # (dh, dw, db) of the student, (dh, dw) of the teacher
    return fwd, bwd, gemms, -(-n // chunk)


@pytest.mark.parametrize("grads", ["student", "all"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_linear_kd_launches_per_chunk_and_no_host_work(reduction, ce_weight, grads):
    for chunk in (6, 2):
        fwd, bwd, gemms, chunks = _lkd_count(reduction, ce_weight, grads, chunk)
        both = _report("forward", fwd) + "\n" + _report("backward", bwd)
        assert not fwd.host and not bwd.host, both
        if reduction == "none":  # the forward forms no gradient; the backward runs the pass again
            fwd_chunk, bwd_chunk = 2, 3 + gemms
        else:  # a scalar loss: the gradients come out of the forward's pass, the backward scales them
            fwd_chunk, bwd_chunk = 3 + gemms, 0
            assert bwd.launches == ["triton:_scale_grads_kernel"], both
        for name, rec, per in (("forward", fwd, fwd_chunk), ("backward", bwd, bwd_chunk)):
            per_chunk = ["_lkd_fwd_kernel", "_lkd_combine_kernel", "_lkd_dlogits_kernel"][:min(per, 3)]
            for kernel in per_chunk:
                assert rec.launches.count(f"triton:{kernel}") == chunks, f"chunk={chunk}, {kernel}: " + both
            fixed = len(rec.launches) - chunks * per
            assert 0 <= fixed <= LKD_FIXED_MAX, f"chunk={chunk}, {chunks} chunks x {per} + {fixed}: " + both
