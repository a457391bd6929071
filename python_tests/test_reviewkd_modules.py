"""ABF / ReviewKD / ReviewKDLoss modules: drop-in parity with the official classes (docs/spec.md §2).

``RefABF`` and ``RefReviewKD`` below are plain-PyTorch copies of the official
classes written from docs/spec.md §2 (square maps only, as the originals).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.nn import ABF, ReviewKD, ReviewKDLoss
from kdkernels.reference.hcl import hcl_loss as ref_hcl

from _models import BasicBlock
from _util import assert_rel_close

BACKENDS = ["cpp", "triton", "torch"]


class RefABF(nn.Module):
    """The official ABF: conv1, optional attention fusion, resize, conv2."""

    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1,
                                             bias=False), nn.BatchNorm2d(out_channel))
        if fuse:
            self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


class RefReviewKD(nn.Module):
    """The official wrapper: ABFs built shallow-first then reversed, outputs inserted at the front."""

    def __init__(self, student, in_channels, out_channels, shapes, out_shapes, mid_channel):
        super().__init__()
        self.student = student
        self.shapes = shapes
        self.out_shapes = shapes if out_shapes is None else out_shapes
        abfs = nn.ModuleList()
        for idx, in_channel in enumerate(in_channels):
            abfs.append(RefABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
        self.abfs = abfs[::-1]

    def forward(self, x):
        student_features = self.student(x, is_feat=True)
        logit = student_features[1]
        x = student_features[0][::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results, logit


class TinyResNet(nn.Module):
    """A small ResNet-like student (residual blocks, three stages, pooled feature as N×C×1×1)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x, is_feat=False):
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        pooled = F.adaptive_avg_pool2d(f3, 1)
        logits = self.fc(pooled.flatten(1))
        return ([f1, f2, f3, pooled], logits) if is_feat else logits


def _abf_pair(fuse, seed=0, sizes=(6, 5, 7)):
    torch.manual_seed(seed)
    ours = ABF(*sizes, fuse)
    torch.manual_seed(seed)
    theirs = RefABF(*sizes, fuse)
    return ours, theirs


def _assert_same_state(a: nn.Module, b: nn.Module, exact: bool = True):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("fuse", [True, False])
def test_abf_same_parameters_keys_and_strict_round_trip(fuse):
    ours, theirs = _abf_pair(fuse)
    expected = ["conv1.0.weight"] + [f"conv1.1.{k}" for k in
                                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    expected += [k.replace("conv1", "conv2") for k in expected]
    expected += ["att_conv.0.weight", "att_conv.0.bias"] if fuse else []
    assert list(ours.state_dict()) == expected
    _assert_same_state(ours, theirs)
    # a reference checkpoint (with non-trivial running stats) loads strictly, and back
    theirs.train()(torch.randn(2, 6, 4, 4), torch.randn(2, 5, 2, 2) if fuse else None, 4, 4)
    fresh = ABF(6, 5, 7, fuse)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_state(fresh, theirs)
    back = RefABF(6, 5, 7, fuse)
    back.load_state_dict(fresh.state_dict(), strict=True)
    _assert_same_state(back, theirs)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_abf_outputs_and_all_gradients(train, backend):
    ours, theirs = _abf_pair(True, seed=1)
    ours.train(train), theirs.train(train)
    x = torch.randn(2, 6, 8, 8)
    y = torch.randn(2, 5, 4, 4)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    a, ares = ours(xa, ya, 8, 16, backend=backend)
    b, bres = theirs(xb, yb, 8, 16)
    assert a.shape == (2, 7, 16, 16) and ares.shape == (2, 5, 16, 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ares, bres, rtol=1e-5, atol=1e-5)
    g, gres = torch.randn_like(a), torch.randn_like(ares)  # both outputs feed the loss, as in ReviewKD
    torch.autograd.backward([a, ares], [g, gres])
    torch.autograd.backward([b, bres], [g, gres])
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-4, atol=1e-5)
    for (k, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.grad is not None, k
        assert_rel_close(p.grad, q.grad, 1e-5, f"grad {k}")
    _assert_same_state(ours, theirs, exact=False)  # running stats updated alike


@pytest.mark.parametrize("train", [True, False])
def test_abf_without_fusion(train):
    ours, theirs = _abf_pair(False, seed=2)
    ours.train(train), theirs.train(train)
    x = torch.randn(3, 6, 1, 1)
    a, ares = ours(x, out_shape=1)
    b, bres = theirs(x, out_shape=1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ares, bres)


def test_abf_non_square():
    torch.manual_seed(0)
    abf = ABF(4, 3, 5, True)
    x, y = torch.randn(1, 4, 6, 10), torch.randn(1, 3, 3, 5)
    out, res = abf(x, y, (6, 10), (12, 20))
    assert out.shape == (1, 5, 12, 20) and res.shape == (1, 3, 12, 20)
    # the same computation spelled out with the reference op
    conv = abf.att_conv[0]
    fused = kdkernels.reference.abf.abf_fuse(abf.conv1(x), y, conv.weight, conv.bias)
    torch.testing.assert_close(res, F.interpolate(fused, size=(12, 20), mode="nearest"), rtol=1e-5, atol=1e-6)


def _reviewkd_pair(seed=3):
    args = ([8, 16, 32, 32], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32], 32)
    torch.manual_seed(0)
    student = TinyResNet()
    torch.manual_seed(seed)
    ours = ReviewKD(copy.deepcopy(student), *args[:4], mid_channel=args[4])
    torch.manual_seed(seed)
    theirs = RefReviewKD(copy.deepcopy(student), *args)
    return ours, theirs


def test_reviewkd_structure_and_checkpoint():
    ours, theirs = _reviewkd_pair()
    keys = list(ours.state_dict())
    assert keys == list(theirs.state_dict())
    assert not any(k.startswith("abfs.0.att_conv") for k in keys)
    assert any(k.startswith("abfs.1.att_conv") for k in keys)
    assert [a.conv2[0].out_channels for a in ours.abfs] == [64, 64, 32, 16]  # abfs.0 is the deepest
    _assert_same_state(ours, theirs)
    fresh = ReviewKD(TinyResNet(), [8, 16, 32, 32], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32], 32)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_state(fresh, theirs)


@pytest.mark.parametrize("train", [True, False])
def test_reviewkd_outputs_and_all_gradients(train):
    ours, theirs = _reviewkd_pair()
    ours.train(train), theirs.train(train)
    x = torch.randn(2, 3, 32, 32)
    (ra, la), (rb, lb) = ours(x), theirs(x)
    assert [tuple(r.shape) for r in ra] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 1, 1)]
    for a, b in zip(ra, rb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb)
    teacher = [torch.randn_like(r) for r in ra]
    (ReviewKDLoss(weight=1.0, warmup_epochs=20)(ra, teacher, epoch=10) + la.square().mean()).backward()
    (0.5 * ref_hcl(rb, teacher) + lb.square().mean()).backward()
    named = list(ours.named_parameters())
    assert len(named) == len(list(theirs.parameters()))
    for (k, p), (_, q) in zip(named, theirs.named_parameters()):
        assert p.grad is not None, k
        assert_rel_close(p.grad, q.grad, 1e-5, f"grad {k}")  # float32 rounding through the student's BNs


def test_reviewkd_compiles_fullgraph():
    ours, theirs = _reviewkd_pair()
    x = torch.randn(2, 3, 32, 32)
    results, logits = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    expected, _ = theirs(x)
    for a, b in zip(results, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    sum(r.square().mean() for r in results).backward()
    assert all(p.grad is not None for p in ours.abfs.parameters())


def test_reviewkd_default_mid_channel_and_plain_student():
    model = ReviewKD(TinyResNet(), [8, 16, 32, 32], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32])
    assert model.abfs[0].conv1[0].out_channels == 32

    class FeatsOnly(nn.Module):  # returns (features, logits) without an is_feat flag; pooled as (N, C)
        def __init__(self):
            super().__init__()
            self.net = TinyResNet()

        def forward(self, x):
            feats, logits = self.net(x, is_feat=True)
            return feats[:-1] + [feats[-1].flatten(1)], logits

    model = ReviewKD(FeatsOnly(), [8, 16, 32, 32], [16, 32, 64, 64], [1, 8, 16, 32])
    results, logits = model(torch.randn(2, 3, 32, 32))
    assert [tuple(r.shape[1:]) for r in results] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]
    assert logits.shape == (2, 10)


def test_reviewkd_loss_warmup():
    fs = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 1, 1, requires_grad=True)]
    ft = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)]
    loss_fn = ReviewKDLoss(weight=2.0, warmup_epochs=20)
    base = kdkernels.hcl_loss(fs, ft)
    torch.testing.assert_close(loss_fn(fs, ft, epoch=5), 2.0 * 0.25 * base)
    torch.testing.assert_close(loss_fn(fs, ft, epoch=40), 2.0 * base)
    assert ReviewKDLoss(warmup_epochs=0).factor(0) == 1.0
