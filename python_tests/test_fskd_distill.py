"""kdkernels.fskd.distill: hooks, schedules and merging on small VGG- and ResNet-like nets."""
import copy
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkernels import fskd

from _models import BasicBlock, randomize_bns


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "result has NaN/inf"
    return float((a - b).norm() / b.norm())




def vgg(widths=(8, 8, 16, 16), seed=0):
    torch.manual_seed(seed)
    layers, cin = [], 3
    for i, w in enumerate(widths, 1):
        layers += [(f"conv{i}", nn.Conv2d(cin, w, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(w)), (f"relu{i}", nn.ReLU(inplace=True))]
        if i == 2:
            layers.append(("pool", nn.MaxPool2d(2)))
        cin = w
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(cin, 5))]
    return randomize_bns(nn.Sequential(OrderedDict(layers)), seed)


class ResNetLike(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 5)
        randomize_bns(self, seed)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


VGG_BLOCKS = [("conv2", "bn2", "bn2"), ("conv4", "bn4", "bn4")]
RES_BLOCKS = [("layer1.conv2", "layer1.bn2", "layer1.bn2"), ("layer2.conv2", "layer2.bn2", "layer2.bn2")]


def identity_bn(c):
    bn = nn.BatchNorm2d(c).eval()
    bn.running_var.fill_(1 - bn.eps)
    return bn


def mixed_student(teacher, blocks, seed=1):
    """Student whose aligned outputs are P_b times the teacher's: FSKD can undo it exactly."""
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    for conv_name, bn_name, _ in blocks:
        conv, bn = student.get_submodule(conv_name), student.get_submodule(bn_name)
        c = conv.out_channels
        p = torch.eye(c) + 0.3 * torch.randn(c, c, generator=g) / c ** 0.5
        parent, _, leaf = conv_name.rpartition(".")
        setattr(student.get_submodule(parent), leaf, fskd.absorb(conv, p, bn))
        parent, _, leaf = bn_name.rpartition(".")
        setattr(student.get_submodule(parent), leaf, identity_bn(c).to(conv.weight.device))
    return student


def data(n_batches=4, n=8, size=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(n_batches)]


def out_err(a, b, x):
    with torch.no_grad():
        return rel_err(a(x), b(x))


@pytest.mark.parametrize("make, blocks", [(vgg, VGG_BLOCKS), (ResNetLike, RES_BLOCKS)], ids=["vgg", "resnet"])
def test_greedy_recovers_a_mixed_student_exactly(make, blocks, device):
    teacher = make().to(device)
    student = mixed_student(teacher, blocks)
    x = data(1, 16, seed=9)[0].to(device)
    assert out_err(student, teacher, x) > 1e-2
    out = fskd.distill(student, teacher, blocks, data(), alpha=0.0, progress=False)  # CPU batches
    assert out_err(out, teacher, x) < 1e-4
    # the student's structure and keys: the weight in the conv, each BN an identity-plus-bias
    assert list(out.state_dict()) == list(student.state_dict())
    for conv_name, bn_name, _ in blocks:
        assert isinstance(out.get_submodule(bn_name), nn.BatchNorm2d)
        bias = out.get_submodule(conv_name).bias  # the BN carries the whole merged bias
        assert bias is None or not bias.any()
    # the structure-changing merge: BN dropped, conv with bias (BN affine 2C -> conv bias C)
    folded = fskd.distill(student, teacher, blocks, data(), alpha=0.0, progress=False, keep_structure=False)
    assert out_err(folded, teacher, x) < 1e-4
    for conv_name, bn_name, _ in blocks:
        assert isinstance(folded.get_submodule(bn_name), nn.Identity)
        assert folded.get_submodule(conv_name).bias is not None
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("make, blocks", [(vgg, VGG_BLOCKS), (ResNetLike, RES_BLOCKS)], ids=["vgg", "resnet"])
def test_joint_schedule_recovers_a_mixed_student_exactly(make, blocks, device):
    teacher = make().to(device)
    student = mixed_student(teacher, blocks)
    x = data(1, 16, seed=9)[0].to(device)
    out = fskd.distill(student, teacher, blocks, data(), schedule="joint", alpha=0.0, joint_steps=10,
                       progress=False)
    assert out_err(out, teacher, x) < 1e-4
    # the joint Q's are merged like greedy's: the student keeps its structure and keys
    assert type(out) is type(student) and out.state_dict().keys() == student.state_dict().keys()


def test_independent_schedule_is_gone():
    teacher = vgg()
    with pytest.raises(ValueError, match=r"schedule='independent' is not FSKD's.*use 'greedy' .* or 'joint'"):
        fskd.distill(teacher, teacher, VGG_BLOCKS, data(1), schedule="independent")


def block_losses(student, teacher, blocks, batches):
    """Each block's sum ||S_k - T_k||^2 / ||T_k - mean(T_k)||^2 over the batches (the student's
    aligned point after merging: the module at the BN's name, or the conv's)."""
    sq = [0.0] * len(blocks)
    tt = [[] for _ in blocks]
    with torch.no_grad():
        for x in batches:
            outs = {}
            hooks = []
            for k, (conv_name, bn_name, t_name) in enumerate(blocks):
                hooks.append(student.get_submodule(bn_name or conv_name).register_forward_hook(
                    lambda m, i, o, k=k: outs.__setitem__(("s", k), o.detach().clone())))
                hooks.append(teacher.get_submodule(t_name).register_forward_hook(
                    lambda m, i, o, k=k: outs.__setitem__(("t", k), o.detach().clone())))
            student(x)
            teacher(x)
            for h in hooks:
                h.remove()
            for k in range(len(blocks)):
                sq[k] += float(((outs[("s", k)] - outs[("t", k)]).double() ** 2).sum())
                tt[k].append(outs[("t", k)].double())
    losses = []
    for k in range(len(blocks)):
        t = torch.cat(tt[k])
        losses.append(sq[k] / float(((t - t.mean((0, 2, 3), keepdim=True)) ** 2).sum()))
    return losses


@pytest.mark.parametrize("seed", [0, 3])
def test_joint_never_ends_worse_than_greedy_on_the_block_losses(seed):
    teacher = vgg(seed=seed)
    student = prune_half(teacher, [(1, 2), (3, 4)])
    blocks = VGG_BLOCKS
    batches = data(seed=seed + 2)
    greedy = fskd.distill(student, teacher, blocks, batches, schedule="greedy", progress=False)
    joint = fskd.distill(student, teacher, blocks, batches, schedule="joint", joint_steps=20, progress=False)
    lg, lj = block_losses(greedy, teacher, blocks, batches), block_losses(joint, teacher, blocks, batches)
    assert sum(lj) <= sum(lg) * (1 + 1e-6)
    assert sum(lj) < sum(lg) * (1 - 1e-3)  # it does improve on greedy here
    # the first block's greedy Q is its own least-squares optimum: joint can only trade it away
    assert lj[0] >= lg[0] * (1 - 1e-6)


def test_joint_steps_zero_is_greedy_and_bad_steps_raise():
    teacher = vgg()
    student = prune_half(teacher, [(1, 2), (3, 4)])
    x = data(1, 16, seed=9)[0]
    greedy = fskd.distill(student, teacher, VGG_BLOCKS, data(), progress=False)
    joint0 = fskd.distill(student, teacher, VGG_BLOCKS, data(), schedule="joint", joint_steps=0, progress=False)
    assert out_err(joint0, greedy, x) < 1e-6
    with pytest.raises(ValueError, match=r"joint_steps must be an int >= 0"):
        fskd.distill(student, teacher, VGG_BLOCKS, data(), schedule="joint", joint_steps=-1)


def prune_half(teacher, pairs):
    """L1 filter pruning of conv_a's outputs (and bn_a, conv_b's inputs) by half."""
    student = copy.deepcopy(teacher)
    for a, b in pairs:
        conv_a, bn_a, conv_b = (student.get_submodule(n) for n in (f"conv{a}", f"bn{a}", f"conv{b}"))
        keep = conv_a.weight.abs().sum((1, 2, 3)).argsort(descending=True)[: conv_a.out_channels // 2].sort().values
        new_a = nn.Conv2d(conv_a.in_channels, len(keep), 3, padding=1, bias=False)
        new_a.weight.data = conv_a.weight.data[keep].clone()
        new_bn = nn.BatchNorm2d(len(keep)).eval()
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).data = getattr(bn_a, name).data[keep].clone()
        new_b = nn.Conv2d(len(keep), conv_b.out_channels, 3, padding=1, bias=False)
        new_b.weight.data = conv_b.weight.data[:, keep].clone()
        setattr(student, f"conv{a}", new_a)
        setattr(student, f"bn{a}", new_bn)
        setattr(student, f"conv{b}", new_b)
    return student


@pytest.mark.parametrize("schedule", ["greedy", "joint"])
def test_pruned_vgg_gets_closer_to_teacher(schedule):
    teacher = vgg()
    student = prune_half(teacher, [(1, 2), (3, 4)])
    x = data(1, 16, seed=9)[0]
    out = fskd.distill(student, teacher, VGG_BLOCKS, data(), schedule=schedule, joint_steps=10,
                       progress=False)
    assert out_err(out, teacher, x) < 0.7 * out_err(student, teacher, x)
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_distill_equals_the_manual_pipeline():
    teacher = vgg()
    student = prune_half(teacher, [(1, 2)])
    batches = data()
    out = fskd.distill(student, teacher, [("conv2", "bn2", "bn2")], batches, alpha=1e-3, progress=False)
    # by hand: S = student bn2 output, T = teacher bn2 output (before the in-place ReLU)
    st = fskd.GramStats(8)
    caught = {}
    hs = [student.bn2.register_forward_hook(lambda m, i, o: caught.__setitem__("s", o.clone())),
          teacher.bn2.register_forward_hook(lambda m, i, o: caught.__setitem__("t", o.clone()))]
    with torch.no_grad():
        for x in batches:
            student(x), teacher(x)
            st.update(caught["s"], caught["t"])
    for h in hs:
        h.remove()
    merged = fskd.absorb(student.conv2, fskd.solve(st, alpha=1e-3), student.bn2)
    assert rel_err(out.conv2.weight, merged.weight) < 1e-6
    assert rel_err(out.bn2.bias, merged.bias) < 1e-6  # the BN carries the merged bias


def test_num_samples_and_one_shot_iterators():
    teacher = vgg()
    student = prune_half(teacher, [(1, 2)])
    batches = data(3, 4)
    blocks = [("conv2", "bn2", "bn2")]
    a = fskd.distill(student, teacher, blocks, batches, num_samples=10, progress=False)
    b = fskd.distill(student, teacher, blocks, [batches[0], batches[1], batches[2][:2]], progress=False)
    c = fskd.distill(student, teacher, blocks, ((x, 0) for x in batches), num_samples=10, progress=False)
    assert torch.equal(a.conv2.weight, b.conv2.weight) and torch.equal(a.conv2.weight, c.conv2.weight)
    d = fskd.distill(student, teacher, blocks, batches, progress=False)
    assert not torch.equal(a.conv2.weight, d.conv2.weight)


def test_modes_inplace_and_early_stop():
    teacher = vgg().train()
    student = prune_half(teacher, [(1, 2), (3, 4)]).train()
    original = copy.deepcopy(student)
    out = fskd.distill(student, teacher, VGG_BLOCKS, data(3), progress=False)
    assert out is not student and torch.equal(student.conv2.weight, original.conv2.weight)
    assert isinstance(student.bn2, nn.BatchNorm2d)
    aligned = {out.get_submodule(bn) for _, bn, _ in VGG_BLOCKS}
    assert all(not m.training for m in aligned)  # identity-plus-bias only in eval mode
    assert all(m.training for m in out.modules() if m not in aligned)
    assert all(m.training for m in teacher.modules())

    calls = {"s": 0, "t": 0}
    student.fc.register_forward_hook(lambda *a: calls.__setitem__("s", calls["s"] + 1))
    teacher.fc.register_forward_hook(lambda *a: calls.__setitem__("t", calls["t"] + 1))
    same = fskd.distill(student, teacher, VGG_BLOCKS, data(3), inplace=True, progress=False)
    assert same is student and student.bn2.running_var.eq(1 - student.bn2.eps).all()
    assert calls == {"s": 1, "t": 1}  # only the check run reaches the head; passes stop early


def test_progress_bar_tqdm_and_plain(capsys, monkeypatch):
    teacher = vgg()
    student = prune_half(teacher, [(1, 2)])
    fskd.distill(student, teacher, [("conv2", "bn2", "bn2")], data(3))
    assert "fskd greedy 1/1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    fskd.distill(student, teacher, [("conv2", "bn2", "bn2")], data(3), schedule="joint", joint_steps=2)
    err = capsys.readouterr().err
    assert "fskd greedy 1/1: 3/3 batches" in err and "fskd joint" in err


def test_too_few_pixels_warns():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    student = copy.deepcopy(teacher)
    batches = [torch.randn(2, 3, 1, 1) for _ in range(2)]  # 4 pixels, 16 channels
    with pytest.warns(RuntimeWarning, match=r"'1' -> teacher '1'.*4 pixels for 16 channels: underdetermined"):
        out = fskd.distill(student, teacher, [("0", "1", "1")], batches, progress=False)
    assert torch.isfinite(out[0].weight).all()


class ConvAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


@pytest.mark.parametrize("student, blocks, match", [
    (ConvAct(nn.ReLU()), [("conv", "bn", "conv")], r"between conv 'conv' and BN 'bn' \(e.g. a ReLU or pooling\)"),
    (ConvAct(nn.ReLU(inplace=True)), [("conv", "bn", "conv")], r"modified in place between conv 'conv' and BN 'bn'"),
    (ConvAct(nn.Identity()), [("conv", "bn", "conv2")], r"teacher module 'conv2' is not a submodule.*did you mean 'conv'"),
    (ConvAct(nn.Identity()), [("cnv", "bn", "conv")], r"student conv 'cnv' is not a submodule.*did you mean 'conv'"),
    (ConvAct(nn.Identity()), [("conv", None, "down")], r"student output \(2, 4, 6, 6\) and teacher output \(2, 4, 3, 3\)"),
    (ConvAct(nn.Identity()), [("conv", None, "narrow")], r"student output \(2, 4, 6, 6\) and teacher output \(2, 2, 6, 6\)"),
    (Twice(), [("conv", None, "conv")], r"student module 'conv' ran 2 times"),
    (ConvAct(nn.Identity()), [("conv", None, "conv"), ("conv", "bn", "conv")], r"'conv' appears in more than one block"),
    (ConvAct(nn.Identity()), [("conv", "bn")], r"blocks\[0\] must be a \(student_conv"),
    (ConvAct(nn.Identity()), [], r"blocks is empty"),
])
def test_bad_blocks(student, blocks, match):
    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.narrow = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.down(y), self.narrow(y)

    teacher = Teacher() if not isinstance(student, Twice) else Twice()
    with pytest.raises(ValueError, match=match):
        fskd.distill(student, teacher, blocks, [torch.randn(2, 3, 6, 6)], progress=False)


def test_bad_arguments():
    teacher = vgg()
    blocks = [("conv2", "bn2", "bn2")]
    x = data(1)
    with pytest.raises(ValueError, match=r"schedule must be one of 'greedy', 'joint', got 'paper'"):
        fskd.distill(teacher, teacher, blocks, x, schedule="paper")
    with pytest.raises(ValueError, match=r"alpha must be finite and >= 0"):
        fskd.distill(teacher, teacher, blocks, x, alpha=-1e-4)
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 1"):
        fskd.distill(teacher, teacher, blocks, x, num_samples=0)
    with pytest.raises(TypeError, match=r"student must be an nn.Module, got function"):
        fskd.distill(lambda x: x, teacher, blocks, x)
    with pytest.raises(ValueError, match=r"batches is empty"):
        fskd.distill(teacher, teacher, blocks, [])
    with pytest.raises(TypeError, match=r"batches must yield tensors or \(input, ...\) tuples, got dict"):
        fskd.distill(teacher, teacher, blocks, [{"x": x[0]}], progress=False)
    with pytest.raises(TypeError, match=r"batches must be an iterable"):
        fskd.distill(teacher, teacher, blocks, 3)
    with pytest.raises(TypeError, match=r"student BN 'relu2' must be a BatchNorm module, got ReLU"):
        fskd.distill(teacher, teacher, [("conv2", "relu2", "bn2")], x)
    with pytest.raises(TypeError, match=r"student conv must be a module name \(str\), got int"):
        fskd.distill(teacher, teacher, [(2, "bn2", "bn2")], x)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"student conv '0' is grouped \(groups=2\)"):
        fskd.distill(grouped, grouped, [("0", "1", "1")], [torch.randn(2, 4, 5, 5)])
