"""Every op inside ``torch.autocast``: the dtype it returns and how close it stays to float32.

Policy (kdkernels/ops/_autocast.py): losses return float32 and read fp16/bf16
inputs without copying them up; mixed float dtypes are promoted; abf_fuse and
hint's regressor follow the conv policy (inputs cast to the autocast dtype).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.reference import abf as ref_abf
from kdkernels.reference import hcl as ref_hcl
from kdkernels.reference import hint as ref_hint
from kdkernels.reference import kd as ref_kd

from _util import DEVICE, assert_rel_close, backends_for

AMP_DTYPES = [torch.bfloat16, torch.float16]
# a bf16 forward through a conv and then the loss: each of the two rounds once
AMP_TOL = 2e-2


def _params(*shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE).requires_grad_() for s in shapes]


def _step(loss_fn, weights, amp):
    """Loss and weight gradients with autocast on (``amp`` a dtype) or off (None)."""
    for w in weights:
        w.grad = None
    if amp is None:
        loss = loss_fn()
    else:
        with torch.autocast(DEVICE.type, dtype=amp):
            loss = loss_fn()
    (loss * 1.3).backward()
    return loss, [w.grad.clone() for w in weights]


def _check(loss_fn, ref_fn, weights, amp, expect_dtype=torch.float32):
    loss, grads = _step(loss_fn, weights, amp)
    assert loss.dtype == expect_dtype, f"under autocast({amp}) the op returned {loss.dtype}"
    ref_loss, ref_grads = _step(ref_fn, weights, None)
    assert_rel_close(loss, ref_loss, AMP_TOL, "loss vs float32 reference")
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype == torch.float32
        assert_rel_close(g, rg, AMP_TOL, "weight gradient vs float32 reference")
    return loss


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", backends_for("hcl_loss"))
def test_hcl_loss(backend, amp):
    x, conv_w, target = _params((2, 3, 7, 5), (6, 3, 1, 1), (2, 6, 7, 5), seed=1)
    target = target.detach()  # fp32 teacher next to a low-precision student: promoted
    _check(lambda: kdkernels.hcl_loss([F.conv2d(x, conv_w)], [target], backend=backend),
           lambda: ref_hcl.hcl_loss([F.conv2d(x, conv_w)], [target]), [x, conv_w], amp)


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", backends_for("kd_loss"))
def test_kd_loss(backend, amp):
    x, lin_w, t = _params((4, 16), (37, 16), (4, 37), seed=2)
    t = t.detach() * 3
    for reduction in ("batchmean", "none"):
        _check(lambda: kdkernels.kd_loss(F.linear(x, lin_w), t, 2.0, reduction, backend=backend).sum(),
               lambda: ref_kd.kd_loss(F.linear(x, lin_w), t, 2.0, reduction).sum(), [x, lin_w], amp)


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", backends_for("hint_loss"))
def test_hint_loss(backend, amp):
    x, conv_w, reg_w, reg_b, ft = _params((2, 3, 5, 6), (5, 3, 1, 1), (7, 5, 1, 1), (7,), (2, 7, 5, 6), seed=3)
    ft = ft.detach()
    _check(lambda: kdkernels.hint_loss(F.conv2d(x, conv_w), ft, reg_w, reg_b, backend=backend),
           lambda: ref_hint.hint_loss(F.conv2d(x, conv_w), ft, reg_w, reg_b), [x, conv_w, reg_w, reg_b], amp)


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", backends_for("abf_fuse"))
def test_abf_fuse_follows_the_conv_policy(backend, amp):
    x, y, att_w, att_b = _params((2, 3, 6, 5), (2, 3, 3, 2), (2, 6, 1, 1), (2,), seed=4)
    # a sum of squares: no cancellation that would turn bf16 rounding into a large relative error
    out = _check(lambda: kdkernels.abf_fuse(x, y, att_w, att_b, backend=backend).float().square().sum(),
                 lambda: ref_abf.abf_fuse(x, y, att_w, att_b).square().sum(), [x, y, att_w, att_b], amp)
    assert out.dtype == torch.float32
    with torch.autocast(DEVICE.type, dtype=amp):
        assert kdkernels.abf_fuse(x, y, att_w, att_b, backend=backend).dtype == amp


def test_mixed_dtypes_are_an_error_outside_autocast():
    fs = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(TypeError, match="fteacher|dtype"):
        kdkernels.hcl_loss([fs], [fs.float()])
    with pytest.raises(TypeError, match="logits_t|dtype"):
        kdkernels.kd_loss(fs.flatten(1), fs.flatten(1).float())


def test_float64_is_left_alone():
    fs = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert kdkernels.hcl_loss([fs], [fs * 0.5]).dtype == torch.float64
        assert kdkernels.kd_loss(fs.flatten(1), fs.flatten(1) * 2).dtype == torch.float64


def test_fskd_statistics_ignore_autocast():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 6, 6, generator=g).to(DEVICE)
    t = torch.randn(2, 3, 6, 6, generator=g).to(DEVICE)
    plain = kdkernels.fskd.GramStats(4, 3)
    plain.update(s, t)
    amp = kdkernels.fskd.GramStats(4, 3)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        amp.update(s, t)
    assert torch.equal(plain.G, amp.G) and torch.equal(plain.Hc, amp.Hc)
