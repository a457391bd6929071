"""kdkernels.nn.ReviewKD / ABF called exactly as the official ReviewKD code calls them.

The CIFAR students return one feature more than there are ABFs (the stem
output) and the CIFAR configs pass ``shapes=[1, 8, 16, 32, 32]``; the ImageNet
code calls ``ReviewKD(student, in_channels, out_channels, mid_channel)`` with
its own shapes ``[1, 7, 14, 28, 56]``. The official wrapper's ``zip`` drops
the extras; kdkernels must give the same numbers, warning once.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.nn import ABF, ReviewKD

from _official_models import CifarResNet, ImageNetResNet
from test_reviewkd_modules import RefABF, RefReviewKD


def test_cifar_student_with_stem_feature_and_five_shapes():
    """Official CIFAR config: 4 levels, 5 features from the student, 5 shapes."""
    chans = [4, 8, 16, 16]
    with pytest.warns(UserWarning, match="shapes has 5 entries for 4 levels"):
        torch.manual_seed(0)
        ours = ReviewKD(CifarResNet(), chans, chans, [1, 8, 16, 32, 32], None, 16)
    torch.manual_seed(0)
    ref = RefReviewKD(CifarResNet(pooled_4d=True), chans, chans, [1, 8, 16, 32, 32], None, 16)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="returned 5 features for 4 levels"):
        res, logits = ours(x)
    res_ref, logits_ref = ref(x)
    assert [r.shape for r in res] == [r.shape for r in res_ref]
    assert [tuple(r.shape[1:]) for r in res] == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (16, 1, 1)]
    for a, b in zip(res, res_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_ref)
    with warnings.catch_warnings():  # once per wrapper, not every step
        warnings.simplefilter("error")
        ours(x)


def test_fewer_features_than_levels_is_still_an_error():
    chans = [4, 4, 8, 16, 16]
    model = ReviewKD(CifarResNet(), chans, chans, [1, 8, 16, 32, 32], None, 16)
    model(torch.randn(2, 3, 32, 32))  # five features for five levels: fine, no extra
    chans6 = chans + [16]
    with pytest.raises(ValueError, match="shapes has 5 entries, fewer than the 6 levels"):
        ReviewKD(CifarResNet(), chans6, chans6, [1, 8, 16, 32, 32], None, 16)
    model = ReviewKD(CifarResNet(), chans6, chans6, [1, 8, 8, 16, 32, 32], None, 16)
    with pytest.raises(ValueError, match="returned 5 features, fewer than the 6 levels"):
        model(torch.randn(2, 3, 32, 32))


def test_imagenet_positional_mid_channel_and_default_shapes():
    """``ReviewKD(student, in_channels, out_channels, mid_channel)``: shapes [1, 7, 14, 28, 56], no
    resize of the outputs (the ImageNet ABF has no out_shape)."""
    chans = [4, 8, 8, 8, 8]
    torch.manual_seed(0)
    ours = ReviewKD(ImageNetResNet(), chans, [4, 8, 8, 16, 16], 6)
    assert ours.shapes == [1, 7, 14, 28, 56]
    assert ours.abfs[0].conv1[0].out_channels == 6  # the given mid_channel, not min(512, 8)
    x = torch.randn(2, 3, 56, 56)
    res, logits = ours(x)
    assert [tuple(r.shape[1:]) for r in res] == [(4, 56, 56), (8, 28, 28), (8, 14, 14), (16, 7, 7), (16, 1, 1)]

    # the official ImageNet forward: abfs[0](x[0]) alone, then abf(features, res, shape)
    feats, _ = ours.student(x, is_feat=True)
    feats = [f.reshape(f.shape[0], f.shape[1], 1, 1) if f.dim() == 2 else f for f in feats][::-1]
    ref_abfs = [RefABF(a.conv1[0].in_channels, 6, a.conv2[0].out_channels, a.att_conv is not None)
                for a in ours.abfs]
    for r, a in zip(ref_abfs, ours.abfs):
        r.load_state_dict(a.state_dict())
    expect = []
    out, resid = ref_abfs[0](feats[0], out_shape=feats[0].shape[-1])
    expect.append(out)
    for f, abf, shape in zip(feats[1:], ref_abfs[1:], [1, 7, 14, 28, 56][1:]):
        out, resid = abf(f, resid, shape, f.shape[-1])
        expect.insert(0, out)
    for a, b in zip(res, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_imagenet_keyword_form():
    chans = [4, 8, 8, 8, 8]
    ours = ReviewKD(ImageNetResNet(), chans, chans, mid_channel=8)
    assert ours.shapes == [1, 7, 14, 28, 56]
    res, _ = ours(torch.randn(2, 3, 56, 56))
    assert len(res) == 5


# ---------------------------------------------------------------- ABF dtypes
def test_abf_rejects_fp64_y_outside_autocast():
    """The official module raises for an fp64 residual next to fp32 features; so does ABF."""
    torch.manual_seed(0)
    abf = ABF(4, 6, 5, True).eval()
    ref = RefABF(4, 6, 5, True).eval()
    ref.load_state_dict(abf.state_dict())
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        ref(x, y, 8, 8)
    with pytest.raises(TypeError, match="y has dtype torch.float64 but conv1\\(x\\) has torch.float32"):
        abf(x, y, 8, 8)
    with pytest.raises(TypeError, match="y has dtype torch.float16"):
        abf(x, y.half(), 8, 8)


def test_abf_float64_module_and_autocast_follow_the_conv_rule():
    torch.manual_seed(0)
    abf = ABF(4, 6, 5, True).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    out, _ = abf.double()(x.double(), y.double(), 8, 8)  # one dtype everywhere: fine
    assert out.dtype == torch.float64
    abf.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, res = abf(x, y, 8, 8)  # fp32 y is cast as a conv's input would be
        assert res.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="float64"):  # autocast never casts float64, as for a conv
            abf(x, y.double(), 8, 8)
