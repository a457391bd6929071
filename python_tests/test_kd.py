"""Hinton KD (docs/spec.md §4): every backend against the float64 reference, and the op's contracts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.ops._common import acc_dtype
from kdkernels import backends
from kdkernels.reference import kd as ref

from _util import DEVICE, DTYPES, REL_TOL, assert_bitwise_repeatable, assert_rel_close, backends_for

BACKENDS = backends_for("kd_loss")
FAST = [b for b in BACKENDS if b != "torch"]
NATIVE = {"cpu": "cpp", "cuda": "cuda"}[DEVICE.type]
CLASSES = [1, 2, 100, 1000, 4099]
GRAD_OUT = 1.7


def _logits(n, c, dtype, seed=0, teacher_grad=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    t = (torch.randn(n, c, generator=g) * scale + 0.5).to(DEVICE, dtype).requires_grad_(teacher_grad)
    return s, t


def _reference(s, t, temperature, reduction="batchmean", grad_out=GRAD_OUT):
    """float64 reference loss and gradients w.r.t. both logits (backward of sum(loss * grad_out))."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss = ref.kd_loss(s64, t64, temperature, reduction)
    (loss * grad_out).sum().backward()
    return loss.detach(), s64.grad, t64.grad


def _backend_dtypes(backends, dtypes):
    """(backend, dtype) pairs, without the torch backend in fp16/bf16: that is the reference
    run in low precision, so it would only test the reference against itself."""
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in backends for d in dtypes
            if not (b == "torch" and d in (torch.float16, torch.bfloat16))]


def test_expected_backends_are_available():
    """CI must really run the fused kernels: a missing _C or Triton is a failure, not a skip."""
    have = backends.available_backends("kd_loss", DEVICE)
    missing = [b for b in BACKENDS if b not in have]
    assert not missing, f"backends {missing} unavailable: {backends.backend_status('kd_loss', DEVICE)}"


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("backend, dtype", _backend_dtypes(BACKENDS, DTYPES))
def test_matches_reference(backend, dtype, classes, temperature):
    s, t = _logits(3, classes, dtype, seed=classes, teacher_grad=True)
    loss = kdkernels.kd_loss(s, t, temperature, backend=backend)
    assert loss.dtype == acc_dtype(dtype) and loss.shape == ()  # never rounded to fp16/bf16
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, ref_gt = _reference(s, t, temperature)
    tol = REL_TOL[dtype]
    if classes == 1:  # one class: p = 1 on both sides, loss and gradients exactly 0
        assert loss.item() == 0 and not s.grad.any() and not t.grad.any()
        return
    assert_rel_close(loss, ref_loss, tol, "loss")
    assert_rel_close(s.grad, ref_gs, tol, "grad logits_s")
    assert_rel_close(t.grad, ref_gt, tol, "grad logits_t")


@pytest.mark.parametrize("classes", [1, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", FAST)
def test_inexact_temperature(backend, dtype, classes):
    """T = 3: x / T is rounded (with T = 1 or 4 it is exact), and one class still gives exactly 0."""
    s, t = _logits(4, classes, dtype, seed=7, teacher_grad=True)
    loss = kdkernels.kd_loss(s, t, 3.0, backend=backend)
    (loss * GRAD_OUT).backward()
    if classes == 1:
        assert loss.item() == 0 and not s.grad.any() and not t.grad.any()
        return
    ref_loss, ref_gs, ref_gt = _reference(s, t, 3.0)
    assert_rel_close(loss, ref_loss, REL_TOL[dtype], "loss")
    assert_rel_close(s.grad, ref_gs, REL_TOL[dtype], "grad logits_s")
    assert_rel_close(t.grad, ref_gt, REL_TOL[dtype], "grad logits_t")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, reduction):
    s, t = _logits(5, 37, torch.float32, seed=1, teacher_grad=True)
    loss = kdkernels.kd_loss(s, t, 2.0, reduction, backend=backend)
    grad_out = torch.linspace(-1.0, 2.0, 5, device=DEVICE) if reduction == "none" else torch.tensor(GRAD_OUT)
    assert loss.shape == ((5,) if reduction == "none" else ())
    (loss * grad_out).sum().backward()
    ref_loss, ref_gs, ref_gt = _reference(s, t, 2.0, reduction, grad_out.double().cpu())
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(s.grad, ref_gs, 1e-5, "grad logits_s")
    assert_rel_close(t.grad, ref_gt, 1e-5, "grad logits_t")


@pytest.mark.parametrize("backend, dtype", _backend_dtypes([NATIVE, "torch"], [torch.float32, torch.bfloat16]))
def test_llama_vocabulary_row(backend, dtype):
    """One row of 128256 classes (several segments of the native kernels)."""
    s, t = _logits(1, 128256, dtype, seed=2)
    loss = kdkernels.kd_loss(s, t, 4.0, backend=backend)
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, _ = _reference(s, t, 4.0)
    assert_rel_close(loss, ref_loss, REL_TOL[dtype], "loss")
    assert_rel_close(s.grad, ref_gs, REL_TOL[dtype], "grad logits_s")


def _closed_form_teacher_grad(s, t, temperature, grad_out):
    """T p_t (log p_t - log p_s - KL) * grad_out / N in float64 (autograd of xlogy is NaN where p_t == 0)."""
    log_ps = F.log_softmax(s.detach().double() / temperature, dim=1)
    log_pt = F.log_softmax(t.detach().double() / temperature, dim=1)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(1, keepdim=True)
    return grad_out * temperature * pt * (log_pt - log_ps - kl) / s.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, dtype, temperature):
    """Logits of +-1e4: finite everywhere, still accurate."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randint(0, 2, (4, 300), generator=g) * 2e4 - 1e4 + torch.randn(4, 300, generator=g))
    t = (torch.randint(0, 2, (4, 300), generator=g) * 2e4 - 1e4 + torch.randn(4, 300, generator=g))
    s = s.to(DEVICE, dtype).requires_grad_()
    t = t.to(DEVICE, dtype).requires_grad_()
    loss = kdkernels.kd_loss(s, t, temperature, backend=backend)
    (loss * GRAD_OUT).backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if backend == "torch":
        return  # the reference's own teacher gradient is NaN where p_t underflows to 0
    assert torch.isfinite(t.grad).all()
    ref_loss, ref_gs, _ = _reference(s, t, temperature)
    tol = REL_TOL[dtype]
    assert_rel_close(loss, ref_loss, tol, "loss")
    assert_rel_close(s.grad, ref_gs, tol, "grad logits_s")
    assert_rel_close(t.grad, _closed_form_teacher_grad(s, t, temperature, GRAD_OUT), tol, "grad logits_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_minus_inf(backend):
    """A masked teacher class (-inf, p_t = 0) adds nothing, as in kl_div."""
    s, t = _logits(3, 50, torch.float32, seed=4)
    t = t.detach().clone()
    t[:, 7] = float("-inf")
    t[1, :20] = float("-inf")
    loss = kdkernels.kd_loss(s, t, 2.0, backend=backend)
    (loss * GRAD_OUT).backward()
    ref_loss, ref_gs, _ = _reference(s, t, 2.0)
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    assert_rel_close(s.grad, ref_gs, 1e-5, "grad logits_s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad(backend):
    s, t = _logits(2, 10, torch.float32, seed=5)
    kdkernels.kd_loss(s, t, backend=backend).backward()
    assert s.grad is not None and t.grad is None
    s2 = s.detach()
    t2 = t.detach().requires_grad_()
    kdkernels.kd_loss(s2, t2, backend=backend).backward()
    assert t2.grad is not None and torch.isfinite(t2.grad).all()


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_float64(backend):
    shape = (2, 5) if backend == "triton" and DEVICE.type == "cpu" else (3, 11)  # the interpreter is slow
    s, t = _logits(*shape, torch.float64, seed=6, teacher_grad=True, scale=1.0)
    for reduction in ("batchmean", "none"):
        fn = lambda a, b: kdkernels.kd_loss(a, b, 3.0, reduction, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    s, t = _logits(3, 33, torch.float32, seed=7)
    op = torch.ops.kdkernels.kd_loss.default
    torch.library.opcheck(op, (s, t, 4.0, "batchmean", backend))
    torch.library.opcheck(op, (s, t.detach().clone().requires_grad_(), 2.0, "none", backend))
    loss, stats = op(s.detach(), t.detach(), 4.0, "none", backend)
    assert loss.shape == (3,) and stats.shape == (3, 6) and stats.dtype == torch.float32
    grad = torch.linspace(0.5, 2.0, 3, device=DEVICE)
    for teacher_grad in (False, True):
        torch.library.opcheck(torch.ops.kdkernels.kd_loss_backward.default,
                              (grad, s.detach(), t.detach(), stats, 4.0, "none", backend, teacher_grad))
    torch.library.opcheck(torch.ops.kdkernels.kd_loss_backward.default,
                          (torch.tensor(1.3, device=DEVICE), s.detach(), t.detach(), stats, 4.0, "mean", backend,
                           True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    s, t = _logits(4, 100, torch.float32, seed=8, teacher_grad=True)
    compiled = torch.compile(lambda a, b: kdkernels.kd_loss(a, b, 4.0, backend=backend) * GRAD_OUT,
                             fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    loss.backward()
    ref_loss, ref_gs, ref_gt = _reference(s, t, 4.0)
    assert_rel_close(loss, ref_loss * GRAD_OUT, 1e-5, "loss")
    assert_rel_close(s.grad, ref_gs, 1e-5, "grad logits_s")
    assert_rel_close(t.grad, ref_gt, 1e-5, "grad logits_t")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("backend", FAST)
def test_eager_path_equals_custom_op(backend, reduction):
    """Eager mode skips the custom-op dispatch; both run the same code, bit for bit."""
    s, t = _logits(3, 300, torch.float32, seed=17, teacher_grad=True)
    grad = torch.linspace(0.5, 2.0, 3, device=DEVICE) if reduction == "none" else torch.tensor(1.3)
    eager = kdkernels.kd_loss(s, t, 2.0, reduction, backend=backend)
    eager.backward(grad)
    s2 = s.detach().clone().requires_grad_()
    t2 = t.detach().clone().requires_grad_()
    op, _ = torch.ops.kdkernels.kd_loss(s2, t2, 2.0, reduction, backend)
    op.backward(grad)
    assert torch.equal(eager, op) and torch.equal(s.grad, s2.grad) and torch.equal(t.grad, t2.grad)


@pytest.mark.parametrize("backend", FAST)
def test_saves_inputs_and_row_stats_only(backend):
    s, t = _logits(6, 300, torch.float32, seed=9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        kdkernels.kd_loss(s, t, backend=backend)
    big = [x for x in saved if x.numel() >= s.numel()]
    assert {x.data_ptr() for x in big} == {s.data_ptr(), t.data_ptr()}
    small = [x for x in saved if x.numel() < s.numel()]
    assert [tuple(x.shape) for x in small] == [(6, 6)]  # per row: e(m_s), log S_s, e(m_t), log S_t, mean gap, rho


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend):
    s, t = _logits(5, 40, torch.float32, seed=10)
    base = kdkernels.kd_loss(s, t, backend=backend)
    s_t = s.detach().t().contiguous().t().requires_grad_()  # column-major (N, C)
    t_sliced = torch.stack([t.detach(), torch.zeros_like(t)], dim=2)[..., 0]  # equal to t, strides (80, 2)
    assert not s_t.is_contiguous() and not t_sliced.is_contiguous()
    loss = kdkernels.kd_loss(s_t, t_sliced, backend=backend)
    loss.backward()
    assert_rel_close(loss, base, 1e-6, "loss")
    _, ref_gs, _ = _reference(s, t, 4.0, grad_out=1.0)
    assert_rel_close(s_t.grad, ref_gs, 1e-5, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Bitwise-identical loss and gradients of both logits over 5 runs (cpp: 1 or 2 threads)."""
    s, t = _logits(8, 5000, torch.float32, seed=12, teacher_grad=True)

    def run():
        loss = kdkernels.kd_loss(s, t, backend=backend)
        return [loss, *torch.autograd.grad(loss, (s, t))]

    assert_bitwise_repeatable(run, what=f"kd_loss[{backend}]", vary_threads=backend == "cpp")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton interpreter is the CPU test path")
def test_triton_interpreter_really_ran():
    from triton.runtime.interpreter import InterpretedFunction

    from kdkernels.triton import kd as tri
    from kdkernels.triton import launch_counts

    for fn in (tri._kd_fwd_kernel, tri._kd_combine_kernel, tri._kd_bwd_kernel):
        assert isinstance(fn, InterpretedFunction)
    names = ("kd_fwd", "kd_combine", "kd_bwd")
    before = [launch_counts[k] for k in names]
    s, t = _logits(2, 4099, torch.float32, seed=13)  # long enough to split rows: combine runs too
    kdkernels.kd_loss(s, t, backend="triton").backward()
    assert [launch_counts[k] for k in names] == [b + 1 for b in before]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="small blocks only make sense in the interpreter")
def test_triton_chunked_segments(monkeypatch):
    """Several chunks per segment and several segments per row, at small sizes."""
    from kdkernels.triton import kd as tri

    monkeypatch.setattr(tri, "_MAX_BLOCK", 32)
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 4)
    assert tri._plan(2, 300)[1:3] == (160, 2)  # SEG = 5 chunks of 32, SPLIT = 2
    for shape, seed in (((2, 300), 14), ((1, 97), 15)):
        s, t = _logits(*shape, torch.float32, seed=seed, teacher_grad=True)
        s.data[0, -1] = 40.0  # the running maximum grows late in a row
        loss = kdkernels.kd_loss(s, t, 1.5, backend="triton")
        (loss * GRAD_OUT).backward()
        ref_loss, ref_gs, ref_gt = _reference(s, t, 1.5)
        assert_rel_close(loss, ref_loss, 1e-5, "loss")
        assert_rel_close(s.grad, ref_gs, 1e-5, "grad logits_s")
        assert_rel_close(t.grad, ref_gt, 1e-5, "grad logits_t")


class _RepDistillerDistillKL(torch.nn.Module):
    """RepDistiller's DistillKL, written out here as the drop-in target."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * (self.T ** 2) / y_s.shape[0]


def _mdistiller_kd_loss(logits_student, logits_teacher, temperature):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


def test_distillkl_drop_in():
    s, t = _logits(16, 100, torch.float64, seed=16)
    ours, theirs = kdkernels.nn.DistillKL(4), _RepDistillerDistillKL(4)
    assert ours.T == 4 and ours.state_dict().keys() == theirs.state_dict().keys() == set()
    a = ours(s, t)
    b = theirs(s.detach(), t)
    assert_rel_close(a, b, 1e-12, "DistillKL")
    assert_rel_close(kdkernels.kd_loss(s, t, 3.0), _mdistiller_kd_loss(s.detach(), t, 3.0), 1e-12, "mdistiller")
    a.backward()
    s_ref = s.detach().requires_grad_()
    theirs(s_ref, t).backward()
    assert_rel_close(s.grad, s_ref.grad, 1e-12, "DistillKL grad")
    assert "T=4" in repr(ours)


def test_backend_selection(monkeypatch):
    s, t = _logits(2, 5, torch.float32)
    default = {"cpu": "cpp", "cuda": "triton"}[DEVICE.type]
    assert backends.choose_backend("kd_loss", DEVICE) == default
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    assert backends.choose_backend("kd_loss", DEVICE) == "torch"
    other = "cuda" if DEVICE.type == "cpu" else "cpp"
    with pytest.raises(RuntimeError, match=f"backend '{other}' cannot run on {DEVICE.type}"):
        kdkernels.kd_loss(s, t, backend=other)
