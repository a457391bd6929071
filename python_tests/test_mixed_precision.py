"""fp16 training with a loss scaler, and losses that keep their full precision.

What a user training in fp16 does: the forward under ``torch.autocast`` with
fp16 and the loss times a GradScaler's scale (65,536 at the start) before
``backward``. bf16 needs no scaler (scale 1). For every op, module and
distiller, on every backend:

* each loss is float32 (float64 for float64 inputs), inside and outside
  autocast, and equals the float32 reference computed on the same rounded
  inputs to 1e-4 relative: no round trip through fp16/bf16;
* every gradient is finite, in its input's dtype, and equals the reference's
  scaled float32 gradient rounded to the dtype the op saw, within that dtype's
  resolution: grad_output reaches the kernels in float32, so 65,536 does not
  overflow on the way.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import train
from kdkernels.reference import abf as ref_abf
from kdkernels.reference import hcl as ref_hcl
from kdkernels.reference import hint as ref_hint
from kdkernels.reference import kd as ref_kd

from _models import StageNet
from _util import DEVICE, assert_rel_close, backends_for, rel_error

# (autocast dtype, loss scale): fp16 with GradScaler's initial scale; bf16 needs none
AMP = [(torch.float16, 65536.0), (torch.bfloat16, 1.0)]
AMP_IDS = ["fp16x65536", "bf16"]
LOSS_TOL = 1e-4


def _leaves(specs, seed):
    """Leaf tensors that require grad; ``specs`` = [(shape, dtype, scale)]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE).requires_grad_()
            for shape, dtype, scale in specs]


def _assert_grad(grad: torch.Tensor, want: torch.Tensor, low: torch.dtype, what: str, eps_units: float = 1.0) -> None:
    """``grad`` finite (where ``want`` is) and equal to ``want`` (already rounded to ``low``)
    within ``low``'s resolution: a relative error (2-norm) below ``low``'s eps.

    Normwise, not elementwise: the Triton hint kernel feeds its gradient GEMMs the
    residual rounded to the input dtype (as an eager conv under autocast gets its
    grad_output), and the Triton interpreter stores bf16 by truncation, not to
    nearest; either moves single elements by a few units in the last place, the
    norm by well under one eps."""
    assert grad is not None, f"{what}: no gradient"
    finite = torch.isfinite(want)
    bad = torch.isfinite(grad) != finite
    assert not bad.any(), f"{what}: {int(bad.sum())} elements are non-finite where the reference is not (or not where it is)"
    assert torch.equal(grad[~finite], want[~finite]), f"{what}: overflows of the wrong sign"
    err = rel_error(grad[finite], want[finite])
    tol = eps_units * torch.finfo(low).eps
    assert err <= tol, f"{what}: relative error {err:.2e} > {eps_units} x {low}'s eps {torch.finfo(low).eps:.1e}"


def _check(fn, ref_fn, inputs, low, scale, autocast=True, expect=torch.float32, eps_units=1.0):
    """``fn(*inputs)`` (under autocast ``low`` when ``autocast``) against ``ref_fn`` in float32.

    The reference sees each input rounded to ``low`` (what the op reads under
    the autocast rules) and computes in float32; its scaled gradient rounded to
    ``low`` is what the op's gradient must equal."""
    ctx = torch.autocast(DEVICE.type, dtype=low) if autocast else contextlib.nullcontext()
    with ctx:
        loss = fn(*inputs)
    assert loss.dtype == expect, f"the loss is {loss.dtype}, expected {expect}"
    (loss.sum() * scale).backward()
    ref_in = [x.detach().to(low).to(torch.float32).requires_grad_() for x in inputs]
    ref_loss = ref_fn(*ref_in)
    assert ref_loss.dtype == torch.float32
    (ref_loss.sum() * scale).backward()
    assert_rel_close(loss, ref_loss, LOSS_TOL, "loss vs the float32 reference on the rounded inputs")
    for k, (x, r) in enumerate(zip(inputs, ref_in)):
        assert x.grad is not None and x.grad.dtype == x.dtype, f"input {k}: gradient dtype"
        _assert_grad(x.grad, r.grad.to(low), low, f"input {k} ({tuple(x.shape)}, {x.dtype})", eps_units)
    return loss


CONTEXTS = [True, False]
CTX_IDS = ["autocast", "plain"]


@pytest.mark.parametrize("autocast", CONTEXTS, ids=CTX_IDS)
@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", backends_for("hcl_loss"))
def test_hcl_loss(backend, low, scale, autocast):
    fs1, ft1, fs2, ft2 = _leaves([((2, 3, 7, 5), low, 1.0), ((2, 3, 7, 5), low, 1.0),
                                  ((2, 4, 4, 4), low, 1.0), ((2, 4, 4, 4), low, 1.0)], seed=1)
    _check(lambda a, b, c, d: kdkernels.hcl_loss([a, c], [b, d], backend=backend),
           lambda a, b, c, d: ref_hcl.hcl_loss([a, c], [b, d]), [fs1, ft1, fs2, ft2], low, scale, autocast)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("autocast", CONTEXTS, ids=CTX_IDS)
@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", backends_for("kd_loss"))
def test_kd_loss(backend, low, scale, autocast, reduction):
    s, t = _leaves([((4, 37), low, 3.0), ((4, 37), low, 3.0)], seed=2)
    _check(lambda a, b: kdkernels.kd_loss(a, b, 2.0, reduction, backend=backend),
           lambda a, b: ref_kd.kd_loss(a, b, 2.0, reduction), [s, t], low, scale, autocast)


def _hint_eps_units(backend: str, low: torch.dtype) -> float:
    """The Triton hint backward stores the forward's bf16 gradient, scaled, into a new bf16
    tensor: two bf16 stores, and the Triton interpreter truncates each (a compiled kernel
    rounds to nearest), so through the interpreter the bound is two eps, not one."""
    return 2.0 if backend == "triton" and low == torch.bfloat16 and DEVICE.type == "cpu" else 1.0


@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", backends_for("hint_loss"))
def test_hint_loss_under_autocast(backend, low, scale):
    # fp32 parameters, as a model holds them: the regressor casts them (the conv rule)
    fs, ft = _leaves([((2, 5, 4, 6), low, 1.0), ((2, 7, 4, 6), low, 1.0)], seed=3)
    w, b = _leaves([((7, 5, 1, 1), torch.float32, 0.5), ((7,), torch.float32, 0.5)], seed=4)
    _check(lambda *a: kdkernels.hint_loss(*a, backend=backend), ref_hint.hint_loss, [fs, ft, w, b], low, scale,
           eps_units=_hint_eps_units(backend, low))


@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", backends_for("hint_loss"))
def test_hint_loss_low_precision_outside_autocast(backend, low, scale):
    fs, ft, w, b = _leaves([((2, 5, 4, 6), low, 1.0), ((2, 7, 4, 6), low, 1.0), ((7, 5, 1, 1), low, 0.5),
                            ((7,), low, 0.5)], seed=3)
    _check(lambda *a: kdkernels.hint_loss(*a, backend=backend), ref_hint.hint_loss, [fs, ft, w, b], low, scale,
           autocast=False, eps_units=_hint_eps_units(backend, low))


@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", backends_for("abf_fuse"))
def test_abf_fuse_follows_the_conv_rule_with_scaled_grads(backend, low, scale):
    x, y = _leaves([((2, 3, 6, 5), low, 1.0), ((2, 3, 3, 2), low, 1.0)], seed=5)
    w, b = _leaves([((2, 6, 1, 1), torch.float32, 0.5), ((2,), torch.float32, 0.5)], seed=6)
    with torch.autocast(DEVICE.type, dtype=low):
        assert kdkernels.abf_fuse(x, y, w, b, backend=backend).dtype == low
    # a float32 loss of the low-precision output, as a loss downstream would compute it; the
    # reference's output is rounded the same way, so both losses send the same grad_output back
    rounded = _interpreter_bf16 if (backend == "triton" and DEVICE.type == "cpu" and low == torch.bfloat16) \
        else (lambda out: out.to(low))
    _check(lambda *a: kdkernels.abf_fuse(*a, backend=backend).float().square().mean(),
           lambda *a: rounded(ref_abf.abf_fuse(*a)).float().square().mean(), [x, y, w, b], low, scale)


class _Truncate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        return grad.float()


def _interpreter_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 as the Triton interpreter stores it: truncated (a compiled kernel rounds to nearest)."""
    return _Truncate.apply(x)


@pytest.mark.parametrize("backend", backends_for("kd_loss"))
def test_float64_losses_stay_float64(backend):
    s, t = _leaves([((3, 9), torch.float64, 1.0), ((3, 9), torch.float64, 1.0)], seed=7)
    fs, ft = s.reshape(3, 1, 3, 3), t.reshape(3, 1, 3, 3)
    for ctx in (torch.autocast(DEVICE.type, dtype=torch.float16), contextlib.nullcontext()):
        with ctx:
            assert kdkernels.kd_loss(s, t, backend=backend).dtype == torch.float64
            assert kdkernels.hcl_loss([fs], [ft], backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_grad_output_beyond_fp16_range(backend):
    """grad_output = 1e5 (past fp16's 65,504): the fp16 gradients are finite wherever the true value fits."""
    big = 1e5
    s, t = _leaves([((2, 6), torch.float16, 1.0), ((2, 6), torch.float16, 1.0)], seed=8)
    fs, ft = _leaves([((1, 2, 3, 3), torch.float16, 1.0), ((1, 2, 3, 3), torch.float16, 1.0)], seed=9)
    w = _leaves([((2, 2, 1, 1), torch.float16, 0.5)], seed=10)[0]
    cases = [("kd_loss", lambda: kdkernels.kd_loss(s, t, 1.0, backend=backend),
              lambda a, b: ref_kd.kd_loss(a, b, 1.0), [s, t]),
             ("hcl_loss", lambda: kdkernels.hcl_loss([fs], [ft], backend=backend),
              lambda a, b: ref_hcl.hcl_loss([a], [b]), [fs, ft]),
             ("hint_loss", lambda: kdkernels.hint_loss(fs, ft, w, backend=backend),
              lambda a, b, c: ref_hint.hint_loss(a, b, c), [fs, ft, w])]
    for name, fn, ref_fn, inputs in cases:
        loss = fn()
        grads = torch.autograd.grad(loss, inputs, loss.new_tensor(big))
        ref_in = [x.detach().float().requires_grad_() for x in inputs]
        ref_grads = torch.autograd.grad(ref_fn(*ref_in), ref_in)
        for k, (g, r) in enumerate(zip(grads, ref_grads)):
            _assert_grad(g, (r * big).half(), torch.float16, f"{name} input {k}")


# ------------------------------------------------------------------ modules
@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
def test_modules(low, scale):
    fs, ft, s, t = _leaves([((2, 3, 5, 5), low, 1.0), ((2, 3, 5, 5), low, 1.0), ((3, 11), low, 2.0),
                            ((3, 11), low, 2.0)], seed=9)
    _check(lambda a, b: kdkernels.nn.HCLLoss()([a], [b]), lambda a, b: ref_hcl.hcl_loss([a], [b]), [fs, ft], low,
           scale)
    for x in (fs, ft):
        x.grad = None
    _check(lambda a, b: kdkernels.nn.ReviewKDLoss(weight=0.5, warmup_epochs=2)([a], [b], epoch=1),
           lambda a, b: 0.25 * ref_hcl.hcl_loss([a], [b]), [fs, ft], low, scale)
    _check(lambda a, b: kdkernels.nn.DistillKL(4.0)(a, b), lambda a, b: ref_kd.kd_loss(a, b, 4.0), [s, t], low,
           scale)
    for x in (s, t):
        x.grad = None
    _check(lambda a, b: kdkernels.nn.HintLoss()(a, b), F.mse_loss, [s, t], low, scale)


@pytest.mark.parametrize("autocast", CONTEXTS, ids=CTX_IDS)
@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
def test_hintloss_with_regressors(low, scale, autocast):
    """The fused 1x1 path and the plain path (a 3x3 regressor) both return float32."""
    torch.manual_seed(10)
    fs, ft = _leaves([((2, 4, 6, 6), low, 1.0), ((2, 6, 6, 6), low, 1.0)], seed=10)
    for reg in (nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)):
        reg = reg.to(DEVICE)
        if not autocast:
            reg = reg.to(low)
        ctx = torch.autocast(DEVICE.type, dtype=low) if autocast else contextlib.nullcontext()
        with ctx:
            loss = kdkernels.nn.HintLoss()(fs, ft, reg)
        assert loss.dtype == torch.float32, f"{reg}: {loss.dtype}"
        (loss * scale).backward()
        for name, p in [("fs", fs), ("ft", ft), *reg.named_parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{reg}: {name}"
        fs.grad = ft.grad = None


# ------------------------------------------------------------------ distillers
def _Net(w, classes=5):
    """The two-stage StageNet (no layer3): stem -> layer1 -> layer2 -> pool -> fc."""
    return StageNet(w, classes, stages=2)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).to(DEVICE), torch.randint(0, 5, (n,), generator=g).to(DEVICE)


def _distillers():
    x, _ = _batch()
    torch.manual_seed(0)
    yield "kd", train.KD(_Net(2), _Net(4), temperature=4.0)
    torch.manual_seed(0)
    yield "fitnets", train.FitNets(_Net(2), _Net(4), "layer2", "layer2", sample=x, two_stage=False)
    torch.manual_seed(0)
    yield "reviewkd", train.ReviewKD(_Net(2), _Net(4), ["layer1", "layer2", "pool"], ["layer1", "layer2", "pool"],
                                     sample=x, warmup_epochs=1)
    torch.manual_seed(0)
    yield "sskd", train.SSKD(_Net(2), _Net(4), ["layer1", "layer2"], ["layer1", "layer2"], sample=x)


def _scaled_grads(d, x, y, low, scale):
    """Loss terms and parameter gradients of one autocast forward and scaled backward of distiller ``d``."""
    d = d.to(DEVICE).train()
    d.set_epoch(1, 2)
    with torch.autocast(DEVICE.type, dtype=low):
        _, losses = d(x, y)
    (sum(losses.values()) * scale).backward()
    return losses, {k: p.grad for k, p in d.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("low, scale", AMP, ids=AMP_IDS)
def test_distillers_losses_are_float32_and_scaled_grads_finite(low, scale, monkeypatch):
    """Every loss term float32; every gradient finite wherever the eager reference's is.

    With FitNets' hint weight of 100 (and ReviewKD's HCL) times 65,536, the
    student's own fp16 conv backward overflows in the eager code too: that is
    what the GradScaler's first skipped steps are for, and not kdkernels' doing."""
    x, y = _batch()
    eager = {}
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    for name, d in _distillers():
        eager[name] = _scaled_grads(d, x, y, low, scale)[1]
    monkeypatch.delenv("KDKERNELS_BACKEND")
    for name, d in _distillers():
        losses, grads = _scaled_grads(d, x, y, low, scale)
        for term, v in losses.items():
            assert v.dtype == torch.float32, f"{name}: loss {term} is {v.dtype}"
        assert grads.keys() == eager[name].keys()
        for pname, g in grads.items():
            bad = ~torch.isfinite(g) & torch.isfinite(eager[name][pname])
            assert not bad.any(), f"{name}: {pname} has non-finite gradients where the eager code's are finite"
        if name in ("kd", "sskd"):
            assert all(torch.isfinite(g).all() for g in grads.values()), name


def _skipped_steps(d, tmp_path, name):
    """fit() 20 steps of fp16 autocast + GradScaler; how many steps the scaler skipped (each halves the scale)."""
    x, y = _batch(40, seed=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    ckpt = str(tmp_path / f"{name}.pt")
    hist = train.fit(d, loader, epochs=1, optimizer=opt, amp="fp16", device=DEVICE, progress=False, checkpoint=ckpt)
    assert len(loader) == 20 and all(math.isfinite(v) for v in hist[0].values()), hist
    scale = torch.load(ckpt, weights_only=False)["scaler"]["scale"]
    return round(math.log2(65536.0 / scale))


def test_fit_fp16_with_a_scaler_skips_no_step(tmp_path, monkeypatch):
    """KD and SSKD skip no step in their first 20; FitNets and ReviewKD skip exactly as many as the eager
    reference does (its student's own fp16 backward overflows at 100 x 65,536, see above)."""
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    eager = {name: _skipped_steps(d, tmp_path, name) for name, d in _distillers()}
    monkeypatch.delenv("KDKERNELS_BACKEND")
    for name, d in _distillers():
        skipped = _skipped_steps(d, tmp_path, name)
        if name in ("kd", "sskd"):
            assert skipped == 0, f"{name}: {skipped} of the first 20 steps were skipped"
        assert skipped == eager[name], f"{name}: {skipped} skipped steps, the eager reference {eager[name]}"
