"""FSKD on the official code's students: merged students keep their class and keys,
pruned students align to the teacher's kept channels, and a student that caches
tensors with grad gets an error that says what to do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkernels import fskd
from kdkernels.fskd.merge import absorb, absorb_into
from kdkernels.train import FSKD

from _models import randomize_bns
from _official_models import VGG, CachingVGG, pruned_vgg

BLOCKS = [("feature.conv1", "feature.bn1", "feature.bn1"), ("feature.conv2", "feature.bn2", "feature.bn2"),
          ("feature.conv3", "feature.bn3", "feature.bn3")]


def _batches(n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(n)]


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = randomize_bns(VGG(), seed)
    student = randomize_bns(VGG(), seed + 1)
    return teacher, student


# ------------------------------------------------------------ structure kept
def test_merged_student_keeps_its_class_and_loads_strictly():
    teacher, student = _pair()
    keys = list(student.state_dict())
    merged = fskd.distill(student, teacher, BLOCKS, _batches(), progress=False)
    assert type(merged) is VGG and list(merged.state_dict()) == keys
    assert merged.feature.conv1.bias is None and isinstance(merged.feature.bn1, nn.BatchNorm2d)
    bn = merged.feature.bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    torch.testing.assert_close(bn.running_var, torch.full_like(bn.running_var, 1 - bn.eps), rtol=0, atol=0)
    fresh = VGG()
    fresh.load_state_dict(merged.state_dict(), strict=True)  # the user's own class, strictly
    x = _batches(1, seed=7)[0]
    torch.testing.assert_close(fresh.eval()(x), merged(x), rtol=0, atol=0)

    # the same function as the structure-changing merge (BN folded away, conv with bias)
    folded = fskd.distill(student, teacher, BLOCKS, _batches(), progress=False, keep_structure=False)
    assert isinstance(folded.feature.bn1, nn.Identity) and folded.feature.conv1.bias is not None
    torch.testing.assert_close(merged(x), folded(x), rtol=1e-5, atol=1e-5)


def test_identity_plus_bias_bn_is_exact_in_eval_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=True), randomize_bns(nn.BatchNorm2d(6), 3)
    q = torch.randn(6, 6)
    x = torch.randn(2, 3, 7, 7)
    expect = absorb(conv, q, bn)(x)  # the one-conv merge: q o bn o conv
    absorb_into(conv, q, bn)
    torch.testing.assert_close(bn(conv(x)), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))  # the whole bias lives in the BN
    # eval BN = x + bias exactly
    y = torch.randn(2, 6, 5, 5)
    assert torch.equal(bn(y), y + bn.bias.view(1, -1, 1, 1))


def test_absorb_into_without_bn_and_with_a_non_affine_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    q = torch.randn(4, 4)
    x = torch.randn(2, 3, 6, 6)
    expect = absorb(conv, q)(x)
    absorb_into(conv, q)
    assert conv.bias is None  # Q.0 = 0: no bias is ever needed without a BN
    torch.testing.assert_close(conv(x), expect, rtol=1e-5, atol=1e-5)

    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = nn.BatchNorm2d(4, affine=False)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    expect = absorb(conv, q, bn)(x)
    absorb_into(conv, q, bn)  # no bias parameter anywhere: the BN's running mean carries it
    torch.testing.assert_close(bn(conv(x)), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q must be \\(4, 4\\)"):
        absorb_into(conv, torch.randn(5, 4))


def test_train_fskd_keeps_structure():
    teacher, student = _pair()
    d = FSKD(student, teacher, BLOCKS)
    merged = d.distill(_batches(), progress=False)
    VGG().load_state_dict(merged.state_dict(), strict=True)


# ---------------------------------------------------------------- pruned students
def _block_io(student, teacher, i, mask, x):
    """(S, T[:, mask]) at block i: student and teacher BN outputs."""
    out = {}
    hs = getattr(student.feature, f"bn{i}").register_forward_hook(lambda m, a, o: out.__setitem__("s", o))
    ht = getattr(teacher.feature, f"bn{i}").register_forward_hook(lambda m, a, o: out.__setitem__("t", o))
    with torch.no_grad():
        student.eval()(x)
        teacher.eval()(x)
    hs.remove()
    ht.remove()
    return out["s"], out["t"][:, mask]


def _pixels(f):
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double()


@pytest.mark.parametrize("form", ["mask", "index", "list"])
def test_pruned_student_aligns_to_the_kept_channels(form):
    teacher, student, masks = pruned_vgg()
    keep = {"mask": masks[1], "index": masks[1].nonzero().flatten(),
            "list": masks[1].nonzero().flatten().tolist()}[form]
    data = _batches()
    x = torch.cat(data)
    s, t = _block_io(student, teacher, 2, masks[1], x)
    S, T = _pixels(s), _pixels(t)
    q_ls = torch.linalg.lstsq(S, T).solution  # (Cs, Ct_kept): T ~ S q
    best = float((S @ q_ls - T).norm())
    before = float((S - T).norm())
    merged = fskd.distill(student, teacher, [("feature.conv2", "feature.bn2", "feature.bn2", keep)], data,
                          progress=False)
    s2, _ = _block_io(merged, teacher, 2, masks[1], x)
    got = float((_pixels(s2) - T).norm())
    scale = float((T - T.mean(0)).norm())
    assert got < before and got <= best + 1e-3 * scale, (before, best, got)
    VGG(merged.widths).load_state_dict(merged.state_dict(), strict=True)


def test_pruned_student_every_block_and_train_fskd():
    teacher, student, masks = pruned_vgg()
    blocks = [b + (m,) for b, m in zip(BLOCKS, masks)]
    x = torch.cat(_batches())
    err = lambda model: sum(float((_pixels(a) - _pixels(b)).norm()) for a, b in
                            (_block_io(model, teacher, i, masks[i - 1], x) for i in (1, 2, 3)))
    merged = FSKD(student, teacher, blocks).distill(_batches(), progress=False)
    assert err(merged) < err(student)
    assert type(merged) is VGG


def test_pruned_mask_errors():
    teacher, student, masks = pruned_vgg()
    bad = [(masks[1][:-1], "mask of 7 entries but the teacher module has 8 channels"),
           (masks[0], "keeps 5 teacher channels but the student has 6"),
           (torch.tensor([0, 1, 2, 3, 4, 9]), "index 9 is out of range for the 8 channels"),
           (torch.tensor([0, 1, 2, 3, 4, 4]), "repeats a channel"),
           (torch.rand(8), "boolean mask or an integer index")]
    for keep, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            fskd.distill(student, teacher, [("feature.conv2", "feature.bn2", "feature.bn2", keep)],
                         _batches(1), progress=False)


# ------------------------------------------------------------------ deepcopy
def test_student_caching_tensors_with_grad_gets_a_clear_error():
    torch.manual_seed(0)
    teacher, student = CachingVGG().eval(), CachingVGG()
    student(torch.randn(2, 3, 16, 16))  # a training step leaves features_cache with autograd graphs
    with pytest.raises(RuntimeError, match="cannot copy the student.*features_cache.*inplace=True"):
        fskd.distill(student, teacher, [("feature.conv1", "feature.bn1", "feature.bn1")], _batches(1),
                     progress=False)
    with pytest.raises(RuntimeError, match="features_cache"):
        FSKD(student, teacher, [("feature.conv1", "feature.bn1", "feature.bn1")]).distill(_batches(1),
                                                                                       progress=False)
    merged = fskd.distill(student, teacher, [("feature.conv1", "feature.bn1", "feature.bn1")], _batches(1),
                          progress=False, inplace=True)
    assert merged is student


def test_aligned_bns_are_left_in_eval_mode_and_train_mode_renormalises():
    teacher, student = _pair()
    student.train()
    merged = fskd.distill(student, teacher, BLOCKS[:1], _batches(), progress=False)
    assert not merged.feature.bn1.training  # an identity-plus-bias only in eval mode
    assert merged.feature.bn2.training and merged.classifier.training  # the rest as the caller left it
    x = _batches(1, seed=3)[0]
    merged.eval()
    before = merged(x)
    merged.train()  # documented: back in train mode the BN normalises with batch statistics again
    assert not torch.allclose(merged(x), before)
