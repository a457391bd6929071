"""FitNets modules (docs/spec.md §3): ConvReg, HintLoss, and the least-squares 1x1 regressor."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
from kdkernels.nn import ConvReg, HintLoss, is_plain_1x1, least_squares_init_

from _util import DEVICE, assert_rel_close


class _SpecConvReg(nn.Module):
    """The regressor as docs/spec.md §3 describes the originals (test oracle for structure and init)."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


@pytest.mark.parametrize("s_shape, t_shape, conv_type", [
    ((2, 16, 8, 8), (2, 32, 4, 4), nn.Conv2d),           # stride-2 3x3
    ((2, 16, 4, 4), (2, 8, 8, 8), nn.ConvTranspose2d),   # 4x4 transposed
    ((2, 16, 8, 8), (2, 24, 6, 6), nn.Conv2d),           # (3, 3) kernel
    ((2, 16, 7, 5), (2, 24, 7, 5), nn.Conv2d),           # same size: 1x1 conv
    ((2, 16, 9, 9), (2, 8, 5, 5), nn.Conv2d),            # 9 -> 5: a (5, 5) kernel
])
@pytest.mark.parametrize("use_relu", [True, False])
def test_convreg_matches_spec(s_shape, t_shape, conv_type, use_relu):
    torch.manual_seed(0)
    ours = ConvReg(s_shape, t_shape, use_relu=use_relu)
    torch.manual_seed(0)
    spec = _SpecConvReg(s_shape, t_shape, use_relu=use_relu)
    assert type(ours.conv) is conv_type
    sd, sd_spec = ours.state_dict(), spec.state_dict()
    assert list(sd) == list(sd_spec) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked"]
    assert all(torch.equal(sd[k], sd_spec[k]) for k in sd)
    x = torch.randn(s_shape)
    y, y_spec = ours(x.clone()), spec(x.clone())
    assert y.shape == t_shape and torch.equal(y, y_spec)
    assert (y >= 0).all() if use_relu else (y < 0).any()



def test_is_plain_1x1():
    assert is_plain_1x1(nn.Conv2d(3, 4, 1))
    assert is_plain_1x1(nn.Conv2d(3, 4, 1, bias=False))
    assert not is_plain_1x1(nn.Conv2d(3, 4, 3))
    assert not is_plain_1x1(nn.Conv2d(3, 4, 1, stride=2))
    assert not is_plain_1x1(nn.Conv2d(4, 4, 1, groups=2))
    assert not is_plain_1x1(ConvReg((2, 3, 4, 4), (2, 4, 4, 4)))


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.fused += func is torch.ops.kdkernels.hint_loss_fused.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
def test_hintloss_fused_with_plain_1x1(bias):
    torch.manual_seed(1)
    reg = nn.Conv2d(12, 20, 1, bias=bias).to(DEVICE)
    fs = torch.randn(3, 12, 5, 6, device=DEVICE, requires_grad=True)
    ft = torch.randn(3, 20, 5, 6, device=DEVICE)
    with _Calls() as calls:
        loss = HintLoss()(fs, ft, reg)
        loss.backward()
    assert calls.fused == 1
    grads = [fs.grad] + [p.grad for p in reg.parameters()]
    fs.grad = None
    reg.zero_grad()
    expected = F.mse_loss(reg(fs), ft)
    expected.backward()
    assert_rel_close(loss, expected, 1e-5, "loss")
    for g, e in zip(grads, [fs.grad] + [p.grad for p in reg.parameters()]):
        assert_rel_close(g, e, 1e-5, "grad")


def test_hintloss_plain_and_convreg():
    torch.manual_seed(2)
    fs, ft = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    assert torch.equal(HintLoss()(fs, ft), F.mse_loss(fs, ft))  # RepDistiller's HintLoss
    assert HintLoss().state_dict() == {}
    reg = ConvReg((2, 6, 8, 8), (2, 8, 4, 4))
    x = torch.randn(2, 6, 8, 8)
    with _Calls() as calls:
        loss = HintLoss()(x, ft, reg)
    assert calls.fused == 0
    assert torch.equal(loss, F.mse_loss(reg(x), ft))
    with pytest.raises(ValueError) as info:
        HintLoss()(fs, torch.randn(2, 8, 2, 2))
    assert "(2, 8, 4, 4)" in str(info.value) and "(2, 8, 2, 2)" in str(info.value)


def test_hintloss_casts_parameters_to_feature_dtype():
    reg = nn.Conv2d(4, 6, 1)  # fp32 parameters, bf16 features (as under autocast)
    fs = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    ft = torch.randn(2, 6, 3, 3, dtype=torch.bfloat16)
    loss = HintLoss()(fs, ft, reg)
    loss.backward()
    assert loss.dtype == torch.float32 and reg.weight.grad.dtype == torch.float32
    expected = F.mse_loss(reg(fs.detach().float()), ft.float())
    assert_rel_close(loss, expected, 2e-2, "bf16 loss")


def _linear_problem(n, cs, ct, hw, noise, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(ct, cs, generator=g, dtype=torch.float64)
    c = torch.randn(ct, generator=g, dtype=torch.float64)
    fs = torch.randn(n, cs, *hw, generator=g, dtype=torch.float64) * 2 + 3  # large channel means
    ft = torch.einsum("oc,nchw->nohw", a, fs) + c[:, None, None]
    ft = ft + noise * torch.randn(ft.shape, generator=g, dtype=torch.float64)
    return fs.to(DEVICE, dtype), ft.to(DEVICE, dtype), a, c


def _lstsq(fs, ft, bias):
    """Plain least squares on the pixel rows (float64, CPU), as a check."""
    x = fs.double().cpu().permute(0, 2, 3, 1).reshape(-1, fs.shape[1])
    y = ft.double().cpu().permute(0, 2, 3, 1).reshape(-1, ft.shape[1])
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(x, y).solution.T
    return (sol[:, :-1], sol[:, -1]) if bias else (sol, None)


@pytest.mark.parametrize("bias", [True, False])
def test_least_squares_init_is_the_least_squares_map(bias):
    fs, ft, _, _ = _linear_problem(6, 7, 5, (4, 3), noise=0.3)
    batches = [(fs[:2], ft[:2]), (fs[2:5], ft[2:5]), (fs[5:], ft[5:])]  # streamed over batches
    reg = least_squares_init_(nn.Conv2d(7, 5, 1, bias=bias).to(DEVICE), batches, alpha=0.0)
    w_ref, b_ref = _lstsq(fs, ft, bias)
    assert_rel_close(reg.weight.view(5, 7), w_ref, 1e-5, "weight")
    if bias:
        assert_rel_close(reg.bias, b_ref, 1e-5, "bias")
    # optimal: the hint loss is stationary at the solution
    w = reg.weight.detach().requires_grad_()
    b = reg.bias.detach().requires_grad_() if bias else None
    loss = kdkernels.hint_loss(fs.double(), ft.double(), w.double(), b.double() if bias else None)
    grads = torch.autograd.grad(loss, [w] + ([b] if bias else []))
    assert all(g.abs().max() < 1e-4 * loss.item() for g in grads)


def test_least_squares_init_recovers_exact_map_and_ridge():
    fs, ft, a, c = _linear_problem(4, 16, 33, (5, 5), noise=0.0, seed=1)
    exact = least_squares_init_(nn.Conv2d(16, 33, 1), (fs, ft), alpha=0.0)  # one pair
    assert_rel_close(exact.weight.view(33, 16), a, 1e-4, "weight")
    assert_rel_close(exact.bias, c, 1e-4, "bias")
    reg = least_squares_init_(nn.Conv2d(16, 33, 1), (fs, ft))  # default alpha=1e-4: a slight shrink
    assert kdkernels.hint_loss(fs, ft, reg.weight, reg.bias) < 1e-4 * ft.var()
    # a large ridge shrinks the weight toward 0 (prior 0)
    strong = least_squares_init_(nn.Conv2d(16, 33, 1), (fs, ft), alpha=10.0)
    assert strong.weight.norm() < 0.5 * reg.weight.norm()


# ---------------------------------------------------- the paper's regressor rule
def test_fitnets_regressor_equal_sizes_is_a_1x1_conv_with_the_hint_nonlinearity():
    from kdkernels.nn import FitNetsRegressor

    reg = FitNetsRegressor((2, 8, 5, 5), (2, 16, 5, 5))  # default nonlinearity: ReLU, no BN
    assert isinstance(reg.conv, nn.Conv2d) and reg.conv.kernel_size == (1, 1) and reg.conv.bias is not None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reg.modules())
    assert set(reg.state_dict()) == {"conv.weight", "conv.bias"}
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(reg(x), F.relu(reg.conv(x)))
    # a linear hint layer (e.g. a pre-activation tap): no nonlinearity
    lin = FitNetsRegressor((2, 8, 5, 5), (2, 16, 5, 5), nonlinearity=None)
    torch.testing.assert_close(lin(x), lin.conv(x))
    assert is_plain_1x1(lin.conv)
    # HintLoss with the regressor: mse(relu(conv(f_s)), f_t)
    ft = torch.randn(3, 16, 5, 5)
    torch.testing.assert_close(HintLoss()(x, ft, reg), F.mse_loss(F.relu(reg.conv(x)), ft))
    # no nonlinearity: the fused op on its 1x1 conv, here with the paper's scale
    paper = 0.5 * ((lin.conv(x) - ft) ** 2).sum() / 3
    torch.testing.assert_close(HintLoss(reduction="paper")(x, ft, lin), paper, rtol=1e-5, atol=1e-5)


def test_fitnets_regressor_larger_student_map_uses_the_paper_kernel():
    from kdkernels.nn import FitNetsRegressor

    reg = FitNetsRegressor((1, 4, 9, 7), (1, 6, 4, 5), nonlinearity=nn.Tanh())
    assert reg.conv.kernel_size == (6, 3) and reg.conv.stride == (1, 1)  # 1 + Hs - Ht, 1 + Ws - Wt
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(reg(x), torch.tanh(reg.conv(x)))
    assert reg(x).shape == (2, 6, 4, 5)
    with pytest.raises(ValueError, match=r"s_shape=\(1, 4, 3, 3\).*t_shape=\(1, 4, 5, 5\)"):
        FitNetsRegressor((1, 4, 3, 3), (1, 4, 5, 5))
    with pytest.raises(TypeError, match="nonlinearity"):
        FitNetsRegressor((1, 4, 3, 3), (1, 4, 3, 3), nonlinearity="relu")


def test_hint_loss_scale_paper_vs_mean():
    """The paper's L_HT = 1/2 ||f_t - r(f_s)||^2 (summed; per sample, averaged over the batch) is
    numel/(2 N) = C*H*W/2 times the mean this library (and RepDistiller) uses."""
    fs, ft = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    paper = 0.5 * ((fs - ft) ** 2).sum() / fs.shape[0]
    assert torch.allclose(paper, HintLoss()(fs, ft) * 8 * 3 * 3 / 2)
    assert torch.allclose(HintLoss(reduction="paper")(fs, ft), paper)
