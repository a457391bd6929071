"""kdkernels.train: feature taps, distillers (one or two steps on tiny models), fit."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import train
# What the distillers below call: imported by name so that a renamed op or module fails
# this file at collection instead of passing unnoticed.
from kdkernels import hcl_loss, hint_loss, kd_loss  # noqa: F401
from kdkernels.nn import ConvReg, HintLoss, ReviewKD, ReviewKDLoss  # noqa: F401

from _models import StageNet as Net  # 8x8 input: layer1 8x8, layer2 4x4, layer3 2x2


class Block(nn.Module):
    """A torchvision-like block: bn output edited in place, one ReLU module called twice."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def pair(seed=0, ws=2, wt=4):
    torch.manual_seed(seed)
    return Net(ws), Net(wt)


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def changed(before, model):
    now = model.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


def steps(distiller, n=2, lr=0.1):
    """n SGD steps over distiller.parameters(); returns the last losses and the grads' names."""
    opt = torch.optim.SGD(distiller.parameters(), lr=lr)
    distiller.train()
    x, y = batch()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        logits, losses = distiller(x, y)
        loss = sum(losses.values())
        assert torch.isfinite(loss), losses
        loss.backward()
        with_grad = {k for k, p in distiller.named_parameters() if p.grad is not None}
        opt.step()
    return logits, losses, with_grad


# ------------------------------------------------------------------ taps
def test_taps_probe_keeps_teacher_bn_and_modes():
    _, teacher = pair()
    teacher.train()
    teacher.layer2.eval()  # a mixed state must come back as it was
    before = state(teacher)
    taps = train.FeatureTaps(teacher, ["layer1", "layer2.1", "pool"])
    shapes = taps.probe(batch()[0])
    assert [tuple(s) for s in shapes] == [(4, 8, 8), (8, 4, 4), (16, 1, 1)]
    assert same(before, state(teacher))
    assert teacher.training and teacher.layer1.training and not teacher.layer2.training
    # the hooks are dormant outside the taps' own calls
    out = teacher(batch()[0])
    assert out.shape == (8, 5) and taps._feats == []
    taps.remove()
    assert not teacher.layer1._forward_hooks


def test_taps_inplace_input_and_repeated_modules():
    torch.manual_seed(0)
    blk = Block(3).eval()
    x = torch.randn(2, 3, 5, 5)
    taps = train.FeatureTaps(blk, ["bn2", "relu:input", "relu"])
    taps.probe(x)
    assert taps.calls == [1, 2, 2]
    assert taps.clone_flags[0] and taps.clone_flags[1]  # bn2 output gets `+= x`, the relu input is ReLU'd in place
    out, (bn2, pre, post) = taps(x)
    with torch.no_grad():
        h = F.relu(blk.bn1(blk.conv1(x)))
        want_bn2 = blk.bn2(blk.conv2(h))
    torch.testing.assert_close(bn2, want_bn2)
    torch.testing.assert_close(pre, want_bn2 + x)  # last call of relu: the pre-activation sum
    torch.testing.assert_close(post, out)
    taps2 = train.FeatureTaps(blk, ["bn2"], clone=False)
    taps2.probe(x)
    with pytest.raises(RuntimeError, match="in place"):
        taps2(x)


def test_taps_stop_skips_later_layers():
    student, _ = pair()
    student.train()
    before = state(student)
    taps = train.FeatureTaps(student, ["layer1"])
    taps.probe(batch()[0])
    out, (f,) = taps(batch()[0], stop=True)
    assert out is None and f.shape == (8, 2, 8, 8)
    moved = changed(before, student)  # BN statistics of the layers that ran, nothing after
    assert moved == {f"{m}.1.{b}" for m in ("stem", "layer1")
                     for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_bad_tap_name():
    student, _ = pair()
    with pytest.raises(ValueError, match="layer1"):
        train.FeatureTaps(student, ["layr1"])


# ----------------------------------------------------------- distillers
def check_teacher_untouched(distiller, teacher, before):
    assert same(before, state(teacher)), "teacher parameters or BN buffers changed"
    assert teacher.training, "the teacher's own train/eval flag must be restored"
    ids = {id(p) for p in teacher.parameters()}
    assert not ids & {id(p) for p in distiller.parameters()}, "teacher parameters exposed to the optimiser"
    assert not any(k.startswith("teacher") for k in distiller.state_dict())


def test_kd_steps():
    student, teacher = pair()
    teacher.train()  # the distiller must still run it in eval mode
    before = state(teacher)
    d = train.KD(student, teacher, temperature=4.0)
    logits, losses, grads = steps(d)
    assert set(losses) == {"ce", "kd"} and logits.shape == (8, 5)
    assert grads == {k for k, _ in d.named_parameters()}
    check_teacher_untouched(d, teacher, before)
    # the KD term is kdkernels.kd_loss on the two logits
    x, y = batch()
    with torch.no_grad():
        _, losses = d(x, y)
        teacher.eval()
        want = kdkernels.kd_loss(student(x), teacher(x), temperature=4.0)
        teacher.train()
    torch.testing.assert_close(losses["kd"], want)


def test_distiller_moves_teacher_but_keeps_it_out_of_the_tree():
    student, teacher = pair()
    d = train.KD(student, teacher).double()
    assert next(teacher.parameters()).dtype == torch.float64
    assert "teacher" not in dict(d.named_children())
    assert all(k.startswith("student.") or k == "_extra_state" for k in d.state_dict())


def test_fitnets_stage1_trains_only_up_to_the_guided_layer():
    student, teacher = pair()
    teacher.train()
    t_before, s_before = state(teacher), state(student)
    d = train.FitNets(student, teacher, "layer1", "layer1.2", sample=batch()[0])
    assert d.stage == 1 and d.regressor_kind == "1x1"  # 2x8x8 -> 4x8x8
    logits, losses, grads = steps(d)
    assert logits is None and set(losses) == {"hint"}
    assert grads == {"regressor.weight", "regressor.bias", "student.stem.0.weight", "student.stem.1.weight",
                     "student.stem.1.bias", "student.layer1.0.weight", "student.layer1.1.weight",
                     "student.layer1.1.bias"}
    moved = changed(s_before, student)
    assert moved and all(k.startswith(("stem.", "layer1.")) for k in moved), moved
    check_teacher_untouched(d, teacher, t_before)


def test_fitnets_convreg_and_stage2():
    student, teacher = pair()
    teacher.train()
    t_before = state(teacher)
    d = train.FitNets(student, teacher, "layer1", "layer2", sample=batch()[0])  # 8x8 -> 4x4: ConvReg
    assert d.regressor_kind == "convreg"
    _, losses, grads = steps(d)
    assert set(losses) == {"hint"} and {g.split(".")[0] for g in grads} == {"regressor", "student"}
    d.set_stage(2)
    reg_before = state(d.regressor)
    d.set_epoch(1, 3)
    assert d.current_kd_weight() == 4.0
    d.set_epoch(3, 3)
    assert d.current_kd_weight() == 1.0
    d.set_epoch(2, 3)
    assert d.current_kd_weight() == 2.5
    logits, losses, grads = steps(d)
    assert logits.shape == (8, 5) and set(losses) == {"ce", "kd"}
    assert grads == {k for k in dict(d.named_parameters()) if k.startswith("student.")}
    assert same(reg_before, state(d.regressor)), "stage 2 must not touch the regressor or its BN"
    check_teacher_untouched(d, teacher, t_before)


def test_fitnets_single_stage():
    student, teacher = pair()
    d = train.FitNets(student, teacher, "layer2", "layer2", sample=batch(), two_stage=False)
    assert d.hint_weight == 100.0 and d.regressor_kind == "1x1"
    logits, losses, grads = steps(d)
    assert set(losses) == {"ce", "hint"} and logits.shape == (8, 5)
    assert grads == {k for k, _ in d.named_parameters()}
    with pytest.raises(ValueError):
        d.set_stage(2)


def test_reviewkd_steps():
    student, teacher = pair()
    teacher.train()
    t_before = state(teacher)
    d = train.ReviewKD(student, teacher, ["layer1", "layer2", "layer3", "pool"],
                       ["layer1.1", "layer2.1", "layer3.1", "pool"], sample=batch()[0], warmup_epochs=2)
    assert d.student is student
    d.set_epoch(1)
    logits, losses, grads = steps(d)
    assert logits.shape == (8, 5) and set(losses) == {"ce", "reviewkd"}
    assert float(losses["reviewkd"].detach()) > 0
    assert grads == {k for k, _ in d.named_parameters()}  # student and every ABF
    assert any(k.startswith("review.student.model.stem") for k in grads)
    check_teacher_untouched(d, teacher, t_before)


def test_sskd_freezes_what_it_says():
    student, teacher = pair()
    teacher.train()
    t_before = state(teacher)
    layers = ["layer1", "layer2", "layer3"]
    d = train.SSKD(student, teacher, layers, layers, sample=batch()[0])
    assert d.num_stages == 3 and sorted(d.adapters.keys()) == ["0", "1", "2"]  # widths 2w vs 4w differ

    s0 = state(student)
    _, losses, grads = steps(d)  # stage 1: stem + layer1 + adapter 0
    assert set(losses) == {"feat"}
    assert {k.split(".")[1] for k in grads} == {"stem", "layer1", "0"}
    assert {k.split(".")[0] for k in changed(s0, student)} == {"stem", "layer1"}

    d.set_stage(2)
    s1 = state(student)
    _, _, grads = steps(d)
    assert {k.split(".")[1] for k in grads} == {"layer2", "1"}
    # stage 1 is frozen: weights AND BN statistics; stage 3 and the head are not run
    assert {k.split(".")[0] for k in changed(s1, student)} == {"layer2"}

    d.set_stage("head")
    s2 = state(student)
    logits, losses, grads = steps(d)
    assert logits.shape == (8, 5) and set(losses) == {"ce"}
    assert grads == {"student.fc.weight", "student.fc.bias"}
    assert {k.split(".")[0] for k in changed(s2, student)} == {"fc"}
    check_teacher_untouched(d, teacher, t_before)
    d.close()
    assert all(p.requires_grad for p in student.parameters())


def test_sskd_unfrozen_previous_stages_train():
    student, teacher = pair(wt=2)  # equal widths: no adapters (identity weight)
    layers = ["layer1", "layer2"]
    d = train.SSKD(student, teacher, layers, layers, sample=batch(), freeze_previous=False)
    assert len(d.adapters) == 0
    d.set_stage(2)
    s1 = state(student)
    _, _, grads = steps(d)
    assert {k.split(".")[1] for k in grads} == {"stem", "layer1", "layer2"}
    assert {k.split(".")[0] for k in changed(s1, student)} == {"stem", "layer1", "layer2"}


def test_sskd_all_stages_at_once():
    student, teacher = pair()
    layers = ["layer1", "layer2", "layer3"]
    d = train.SSKD(student, teacher, layers, layers, sample=batch()[0])
    d.set_stage("all")  # the paper's ablation baseline: the stage losses summed, one run
    x, _ = batch()
    _, losses = d(x)
    assert set(losses) == {"feat"}
    manual = 0.0
    with torch.no_grad():
        fs = [student.layer1, student.layer2, student.layer3]
        ft = [teacher.layer1, teacher.layer2, teacher.layer3]
        hs, ht = student.stem(x), teacher.eval().stem(x)
        for i in range(3):
            hs, ht = fs[i](hs), ft[i](ht)
            manual += float(F.mse_loss(d.adapters[str(i)](hs), ht))
    assert abs(float(losses["feat"]) - manual) < 1e-4 * manual
    s0 = state(student)
    _, _, grads = steps(d)
    assert {k.split(".")[1] for k in grads} == {"stem", "layer1", "layer2", "layer3", "0", "1", "2"}
    assert {k.split(".")[0] for k in changed(s0, student)} == {"stem", "layer1", "layer2", "layer3"}
    with pytest.raises(ValueError, match=r"SSKD stage must be 1..3, 'all' or 'head', got 4"):
        d.set_stage(4)
    d.close()


def test_sskd_fit_head_converges_on_frozen_features():
    student, teacher = pair()
    layers = ["layer1", "layer2", "layer3"]
    d = train.SSKD(student, teacher, layers, layers, sample=batch()[0])
    x, y = batch(64, seed=5)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    backbone = {k: v for k, v in state(student).items() if not k.startswith("fc.")}
    info = d.fit_head(loader, weight_decay=1e-4)
    assert d.stage == "head" and info["iterations"] >= 1, info
    assert info["converged"], info
    # the backbone (weights and BN statistics) is untouched; the head is the regularised optimum:
    # the gradient of mean CE + wd/2 ||W||^2 is ~0 on the same data
    assert same(backbone, {k: v for k, v in state(student).items() if not k.startswith("fc.")})
    student.eval()
    with torch.no_grad():
        feats = student.pool(student.layer3(student.layer2(student.layer1(student.stem(x))))).flatten(1)
    w = student.fc.weight.detach().clone().requires_grad_(True)
    b = student.fc.bias.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(feats @ w.T + b, y) + 0.5 * 1e-4 * w.square().sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert float(torch.cat([gw.flatten(), gb]).abs().max()) < 1e-4
    assert abs(info["loss"] - float(loss)) < 1e-5
    d.close()


def test_fskd_distiller_through_fit():
    student_ref, teacher = pair(wt=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the student's bn output is diag(d) times the teacher's: Q = diag(1/d) is exact
        teacher.layer1[1].bias.uniform_(-0.5, 0.5)
        student.layer1[1].bias.copy_(teacher.layer1[1].bias * torch.tensor([0.5, 1.5]))
        student.layer1[1].weight.mul_(torch.tensor([0.5, 1.5]))
    x, y = batch(64)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    d = train.FSKD(student, teacher, [("layer1.0", "layer1.1", "layer1.1")], schedule="joint")
    hist = train.fit(d, loader, epochs=1, progress=False, eval_loader=loader)
    assert "val_acc" in hist[0]
    assert d.student is not student and list(d.student.state_dict()) == list(student.state_dict())
    bn = d.student.layer1[1]  # kept, as an identity-plus-bias in eval mode
    assert isinstance(bn, nn.BatchNorm2d) and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    teacher.eval()
    with torch.no_grad():
        err = (d.student.eval()(x) - teacher(x)).abs().max()
        err0 = (student.eval()(x) - teacher(x)).abs().max()
    assert err < 1e-3 < err0
    logits, losses = d(x, y)
    assert logits.shape == (64, 5) and set(losses) == {"ce"}


# ------------------------------------------------------------------- fit
def loader_of(n=32, bs=8, seed=3):
    x, y = batch(n, seed)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True)


def make_reviewkd(seed=0):
    student, teacher = pair(seed)
    torch.manual_seed(seed + 100)
    d = train.ReviewKD(student, teacher, ["layer1", "layer2", "layer3", "pool"],
                       ["layer1", "layer2", "layer3", "pool"], sample=batch()[0], warmup_epochs=2)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    return d, opt, sched


def test_fit_resume_gives_identical_next_step_losses(tmp_path):
    ckpt = str(tmp_path / "ck.pt")

    def run(epochs, **kw):
        torch.manual_seed(7)
        d, opt, sched = make_reviewkd()
        got = []
        hist = train.fit(d, loader_of(), epochs=epochs, optimizer=opt, scheduler=sched, progress=False,
                         on_step=lambda s: got.append((s["epoch"], float(s["loss"]))), **kw)
        return got, hist, d

    straight, hist_a, d_a = run(3)
    first, _, _ = run(1, checkpoint=ckpt)
    torch.manual_seed(12345)  # a different RNG state: the checkpoint must restore it
    resumed, hist_b, d_b = run(3, checkpoint=ckpt, resume=True)
    assert first == straight[:len(first)]
    assert resumed == straight[len(first):], "resumed run differs from the uninterrupted one"
    assert [h["epoch"] for h in hist_b] == [1, 2, 3]
    assert hist_b[1:] == [{**h, "time": hb["time"]} for h, hb in zip(hist_a[1:], hist_b[1:])]
    assert same(state(d_a), state(d_b))


def test_fit_bf16_autocast_on_cpu():
    student, teacher = pair()
    for d in (train.KD(student, teacher),
              train.FitNets(student, teacher, "layer2", "layer2", sample=batch(), two_stage=False),
              train.SSKD(*pair(), ["layer1", "layer2"], ["layer1", "layer2"], sample=batch())):
        opt = torch.optim.SGD(d.parameters(), lr=0.01)
        hist = train.fit(d, loader_of(), epochs=1, optimizer=opt, amp="bf16", progress=False,
                         eval_loader=loader_of())
        assert all(math.isfinite(v) for v in hist[0].values()), hist
        assert {"loss", "val_acc", "lr", "time"} <= set(hist[0])
        assert ("acc" in hist[0]) == (not isinstance(d, train.SSKD))  # SSKD stage 1 returns no logits
        assert all(p.dtype == torch.float32 for p in d.parameters())
    with pytest.raises(ValueError, match="bf16"):
        train.fit(d, loader_of(), epochs=1, optimizer=opt, amp="fp8", progress=False)


def test_fit_bf16_reviewkd():
    d, opt, _ = make_reviewkd()
    hist = train.fit(d, loader_of(16), epochs=1, optimizer=opt, amp=True, progress=False)
    assert math.isfinite(hist[0]["loss"]) and math.isfinite(hist[0]["reviewkd"])


def test_fit_grad_clip():
    student, teacher = pair()
    d = train.KD(student, teacher)
    before = [p.detach().clone() for p in d.parameters()]
    opt = torch.optim.SGD(d.parameters(), lr=1.0)
    ld = [batch(8)]
    train.fit(d, ld, epochs=1, optimizer=opt, grad_clip=1e-3, progress=False)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(d.parameters(), before)])
    assert 0 < step.norm() <= 1e-3 * (1 + 1e-4)


def test_evaluate_image_classification_is_top1_over_classes():
    """(B, C) logits and (B,) labels: top-1 accuracy over the batch, as before; other shapes are
    refused with both shapes named (a causal LM's (B, L, V) needs the next-token rule)."""
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 4))
    x = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0]])
    y = torch.tensor([0, 1, 2, 0, 2])  # predictions 0, 1, 2, 1, 0: three right
    assert train.evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == pytest.approx(60.0)
    seq = nn.Sequential(nn.Embedding(5, 3))  # (B, L) -> (B, L, 3): not a classifier's output
    with pytest.raises(ValueError, match=r"logits \(2, 4, 3\) and labels \(2, 4\)"):
        train.evaluate(seq, [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))])
