"""kdkernels.train on models with the interfaces of the public KD code bases.

mdistiller's models return ``(logits, {"feats", "preact_feats", "pooled_feat"})``:
the distillers must find the logits, and features can be named by where they
lie in the output (:class:`kdkernels.train.Output`: keys and indices, or a
callable) next to module-name taps. A teacher level whose size cannot be the
student level's (upsampled by the one factor of the configuration) is an error
at the dry run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdkernels import hint_loss, kd_loss
from kdkernels.train import KD, FeatureTaps, FitNets, Output, ReviewKD, evaluate, fit

from _official_models import CifarResNet, DictResNet


def _pair(seed=0, teacher_widths=(8, 8, 16, 32), student_strides=(1, 2, 2)):
    torch.manual_seed(seed)
    # the distillers run the teacher in eval mode; so do the manual computations below
    return DictResNet(strides=student_strides), DictResNet(widths=teacher_widths).eval()


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_kd_finds_the_logits_of_a_logits_dict_model():
    student, teacher = _pair()
    x, y = _data()
    logits, losses = KD(student, teacher)(x, y)
    ls, lt = student(x)[0], teacher(x)[0]
    torch.testing.assert_close(logits, ls)
    torch.testing.assert_close(losses["kd"], kd_loss(ls, lt.detach(), temperature=4.0))
    assert evaluate(student, [(x, y)]) >= 0.0  # fit's evaluate reads the same outputs


def test_explicit_logits_key_index_and_callable():
    student, teacher = _pair()
    x, y = _data()
    ref = KD(student, teacher)(x, y)[1]["kd"]
    for sel_s, sel_t in ((0, 0), (Output(0), lambda out: out[0])):
        got = KD(student, teacher, student_logits=sel_s, teacher_logits=sel_t)(x, y)[1]["kd"]
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="logits of the student: Output\\('logits'\\): out is a tuple of 2: "
                                         "it has no key 'logits'"):
        KD(student, teacher, student_logits="logits")(x, y)


def test_output_taps_and_module_taps_fitnets():
    """The teacher's pre-activation feature exists only in the output dict: tap it there."""
    student, teacher = _pair()
    x, y = _data()
    d = FitNets(student, teacher, Output(1, "feats", 2), Output(1, "preact_feats", 2), sample=x,
                two_stage=False)
    logits, losses = d(x, y)
    fs = student(x)[1]["feats"][2]
    ft = teacher(x)[1]["preact_feats"][2]
    expect = 100.0 * hint_loss(fs, ft, d.regressor.weight, d.regressor.bias)
    torch.testing.assert_close(losses["hint"], expect, rtol=1e-5, atol=1e-6)
    losses["hint"].backward()
    assert student.layer2.conv1.weight.grad is not None
    assert student.layer3.conv1.weight.grad is None or student.layer3.conv1.weight.grad.abs().sum() == 0

    # a module-name tap on one side, a callable on the other
    d2 = FitNets(student, teacher, "layer2", lambda out: out[1]["preact_feats"][2], sample=x)
    _, l2 = d2(x, y)  # stage 1: the student up to layer2 only
    assert set(l2) == {"hint"}
    assert "student.layer3.conv1.weight" not in {n for n, p in d2.named_parameters() if p.requires_grad}


def test_feature_taps_output_selector_errors():
    student, _ = _pair()
    x, _ = _data()
    taps = FeatureTaps(student, [Output(1, "feats", 1), "layer1"])
    out, (a, b) = taps(x)
    torch.testing.assert_close(a, b)  # the dict entry is layer1's output
    with pytest.raises(ValueError, match="Output\\(1, 'feat'\\): out\\[1\\] is a dict with keys 'feats', 'preact_feats'.*no key 'feat'"):
        FeatureTaps(student, [Output(1, "feat")]).probe(x)
    with pytest.raises(TypeError, match="must be a module name .* or an Output"):
        FeatureTaps(student, [3])


def test_reviewkd_on_dict_models_matches_the_official_wrapper():
    from kdkernels.nn import ReviewKD as NNReviewKD, ReviewKDLoss

    student, teacher = _pair()
    x, y = _data()
    s_layers = [Output(1, "feats", i) for i in (1, 2, 3)] + [Output(1, "pooled_feat")]
    t_layers = [Output(1, "preact_feats", i) for i in (1, 2, 3)] + [Output(1, "pooled_feat")]
    torch.manual_seed(5)
    d = ReviewKD(student, teacher, s_layers, t_layers, sample=x)
    d.set_epoch(20)
    logits, losses = d(x, y)
    # the same numbers from kdkernels.nn.ReviewKD on the is_feat interface (same ABF weights)
    official = CifarResNet()
    official.load_state_dict(student.state_dict())
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="shapes has 5 entries"):
        wrapper = NNReviewKD(official, [4, 8, 16, 16], [8, 16, 32, 32], [1, 8, 16, 32, 32], None, 16)
    wrapper.abfs.load_state_dict(d.review.abfs.state_dict())
    with pytest.warns(UserWarning, match="returned 5 features"):
        res, logits_ref = wrapper(x)
    _, tf = teacher(x)
    t_feats = tf["preact_feats"][1:] + [tf["pooled_feat"][:, :, None, None]]
    torch.testing.assert_close(logits, logits_ref)
    torch.testing.assert_close(losses["reviewkd"], ReviewKDLoss()(res, t_feats, 20), rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    assert student.layer1.conv1.weight.grad is not None


def test_reviewkd_teacher_level_of_the_wrong_size_is_an_error():
    student, teacher = _pair()
    x, _ = _data()
    s_layers = [Output(1, "feats", i) for i in (1, 2, 3)] + [Output(1, "pooled_feat")]
    wrong = [Output(1, "preact_feats", i) for i in (2, 2, 3)] + [Output(1, "pooled_feat")]
    with pytest.raises(ValueError, match=r"teacher level 0 .* is 16x16 but student level 0 .* is 32x32"):
        ReviewKD(student, teacher, s_layers, wrong, sample=x)
    pooled_wrong = [Output(1, "preact_feats", i) for i in (1, 2, 3, 3)]
    with pytest.raises(ValueError, match=r"teacher level 3 .* is 8x8 but student level 3 .* is 1x1"):
        ReviewKD(student, teacher, s_layers, pooled_wrong, sample=x)


def test_reviewkd_teacher_upsampled_by_one_factor_is_accepted():
    """The official ShuffleNet / MobileNet configs: every teacher level twice the student's."""
    student, teacher = _pair(student_strides=(2, 2, 2))
    x, y = _data()
    s_layers = [Output(1, "feats", i) for i in (1, 2, 3)] + [Output(1, "pooled_feat")]
    t_layers = [Output(1, "preact_feats", i) for i in (1, 2, 3)] + [Output(1, "pooled_feat")]
    d = ReviewKD(student, teacher, s_layers, t_layers, sample=x)
    assert d.review.shapes == [1, 4, 8, 16] and d.review.out_shapes == [1, 8, 16, 32]
    d(x, y)
    mixed = [Output(1, "preact_feats", i) for i in (1, 2)] + ["layer2", Output(1, "pooled_feat")]
    with pytest.raises(ValueError, match="teacher level 2 .* is 16x16 but student level 2 .* is 4x4"):
        ReviewKD(student, teacher, s_layers, mixed, sample=x)


def test_fit_runs_an_mdistiller_style_pair():
    student, teacher = _pair()
    x, y = _data(8)
    d = KD(student, teacher)
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    fit(d, [(x, y)], epochs=1, optimizer=opt, eval_loader=[(x, y)], progress=False)
