"""kdkernels.fskd.absorb: q o bn o conv merged into one conv, exactly."""
import copy

import pytest
import torch
from torch import nn

from kdkernels import fskd


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "result has NaN/inf"
    return float((a - b).norm() / b.norm())


def random_bn(c, g, affine=True):
    bn = nn.BatchNorm2d(c, affine=affine)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    if affine:
        with torch.no_grad():
            bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def block_diag_q(p, o, groups, g):
    blocks = [torch.randn(p // groups, o // groups, generator=g) for _ in range(groups)]
    return torch.block_diag(*blocks)


def reference(conv, bn, q, x):
    """q(bn(conv(x))) computed in float64 with the original modules."""
    conv64 = copy.deepcopy(conv).double()
    y = conv64(x.double())
    if bn is not None:
        y = copy.deepcopy(bn).double().eval()(y)
    return torch.einsum("po,no...->np...", q.double().to(y.device), y)


CASES = {
    # name: (in, out, kernel, stride, padding, dilation, groups, bias, bn, q rows)
    "stride2_bn": (6, 8, 3, 2, 1, 1, 1, False, True, 8),
    "padding_bias": (5, 7, 3, 1, 2, 1, 1, True, False, 7),
    "dilation_bn_bias": (4, 6, 3, 1, 2, 2, 1, True, True, 6),
    "nonsquare_rect_q": (3, 5, (3, 1), (2, 1), (1, 0), 1, 1, False, True, 9),
    "grouped_bn": (8, 12, 3, 1, 1, 1, 4, False, True, 12),
    "depthwise": (6, 6, 3, 2, 1, 1, 6, True, True, 6),
    "plain_1x1": (7, 7, 1, 1, 0, 1, 1, False, False, 7),
}


@pytest.mark.parametrize("name", list(CASES))
def test_merged_conv_equals_q_bn_conv(name, device):
    cin, cout, k, stride, pad, dil, groups, bias, use_bn, p = CASES[name]
    g = torch.Generator().manual_seed(list(CASES).index(name))
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    bn = random_bn(cout, g) if use_bn else None
    q = block_diag_q(p, cout, groups, g) if groups > 1 else torch.randn(p, cout, generator=g)
    x = torch.randn(2, cin, 11, 9, generator=g).to(device)
    conv, bn = conv.to(device), (bn.to(device) if bn is not None else None)
    merged = fskd.absorb(conv, q, bn)
    assert merged.weight.device.type == device.type
    assert type(merged) is nn.Conv2d and merged.bias is not None
    assert merged.weight.shape == (p, cin // groups) + tuple(conv.weight.shape[2:])
    assert (merged.stride, merged.padding, merged.dilation, merged.groups) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        assert rel_err(merged(x), reference(conv, bn, q, x)) < 1e-6


def test_bn_in_train_mode_is_folded_with_eval_stats_and_inputs_untouched():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    bn = random_bn(4, g).train()
    q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    before = [t.clone() for t in (conv.weight, conv.bias, bn.running_mean, bn.weight, q)]
    merged = fskd.absorb(conv, q, bn)
    assert bn.training  # the BN itself is not switched
    for b, a in zip(before, (conv.weight, conv.bias, bn.running_mean, bn.weight, q)):
        assert torch.equal(b, a)
    x = torch.randn(3, 3, 6, 6, generator=g)
    with torch.no_grad():
        assert rel_err(merged(x), reference(conv, bn, q, x)) < 1e-6


def test_bn_without_affine_and_padding_mode():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", bias=False)
    bn = random_bn(5, g, affine=False)
    q = torch.randn(5, 5, generator=g)
    merged = fskd.absorb(conv, q, bn)
    assert merged.padding_mode == "reflect"
    x = torch.randn(2, 3, 7, 7, generator=g)
    with torch.no_grad():
        assert rel_err(merged(x), reference(conv, bn, q, x)) < 1e-6


def test_conv1d_and_flags_and_parameter_count():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False).train()
    conv.weight.requires_grad_(False)
    bn = nn.BatchNorm1d(6).eval()
    q = torch.randn(6, 6, generator=g)
    merged = fskd.absorb(conv, q, bn)
    assert type(merged) is nn.Conv1d and merged.training and not merged.weight.requires_grad
    n_before = sum(t.numel() for t in conv.parameters()) + sum(t.numel() for t in bn.parameters())
    assert sum(t.numel() for t in merged.parameters()) < n_before  # conv bias C < BN affine 2C
    x = torch.randn(2, 4, 17, generator=g)
    with torch.no_grad():
        assert rel_err(merged(x), reference(conv, bn, q, x)) < 1e-6


def test_computed_in_fp64_then_cast_back():
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(3, 4, 1, bias=True).to(torch.bfloat16)
    bn = random_bn(4, g).to(torch.bfloat16)
    q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    merged = fskd.absorb(conv, q, bn)
    assert merged.weight.dtype == torch.bfloat16 and merged.bias.dtype == torch.bfloat16
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = q @ (scale[:, None] * conv.weight.double().flatten(1))
    b = q @ ((conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double())
    assert torch.equal(merged.weight.flatten(1), w.to(torch.bfloat16))
    assert torch.equal(merged.bias, b.to(torch.bfloat16))


def test_grouped_conv_needs_block_diagonal_q():
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(8, 12, 3, groups=4)
    q = block_diag_q(12, 12, 4, g)
    q[0, 11] = 0.5  # mixes group 0 with group 3
    with pytest.raises(ValueError, match=r"groups=4 \(weight \(12, 2, 3, 3\)\): q \(12, 12\) must be block-diagonal"):
        fskd.absorb(conv, q)
    with pytest.raises(ValueError, match=r"multiple of 4 rows, got q of shape \(10, 12\)"):
        fskd.absorb(conv, torch.randn(10, 12))
