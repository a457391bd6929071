"""LinearDistillKL and the causal-LM distiller on a tiny Hugging Face-style model (no download)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels.reference.kd import kd_loss
from kdkernels.train import CausalLM, CausalLMKD

from _util import DEVICE, assert_rel_close

VOCAB = 53


class TinyBaseModel(nn.Module):
    """What a HF base model (``LlamaModel``) looks like from outside: forward(input_ids,
    attention_mask=None) returns an object with ``last_hidden_state`` (B, L, D) and ``hidden_states``."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(dim, dim)
        self.calls_with_mask = 0

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        if attention_mask is not None:
            self.calls_with_mask += 1
            x = x * attention_mask[..., None].to(x.dtype)
        # causal: each position sees the mean of its prefix
        prefix = torch.cumsum(x, 1) / torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        h = torch.tanh(self.mix(prefix))
        return SimpleNamespace(last_hidden_state=h, hidden_states=(x, h))


def _pair(dim, seed, bias):
    model = TinyBaseModel(dim, seed)
    head = nn.Linear(dim, VOCAB, bias=bias)
    return model.to(DEVICE), head.to(DEVICE)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask


def _materialised(student, teacher, ids, mask, T, ce_weight):
    """The plain recipe: full logits, shift, drop padded targets, KD + CE."""
    logits_s = student[1](student[0](ids, attention_mask=mask).last_hidden_state)[:, :-1]
    with torch.no_grad():
        logits_t = teacher[1](teacher[0](ids, attention_mask=mask).last_hidden_state)[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    keep = (target != -100).reshape(-1)
    zs, zt = logits_s.reshape(-1, VOCAB), logits_t.reshape(-1, VOCAB)
    kd = kd_loss(zs[keep], zt[keep], T)
    ce = F.cross_entropy(zs, target.reshape(-1), ignore_index=-100)
    return kd, ce_weight * ce


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_causal_lm_distiller_matches_the_materialised_recipe(backend):
    student, teacher = _pair(8, 1, bias=True), _pair(12, 2, bias=False)
    distiller = CausalLMKD(student, teacher, temperature=2.0, ce_weight=0.5, backend=backend)
    ids, mask = _batch()
    logits, losses = distiller(ids, attention_mask=mask)
    assert logits is None and list(losses) == ["kd", "ce"]  # one fused call, the CE term reported apart
    sum(losses.values()).backward()
    ours = {n: p.grad.clone() for n, p in distiller.named_parameters()}
    assert set(ours) == {"student.model.embed.weight", "student.model.mix.weight", "student.model.mix.bias",
                         "student.lm_head.weight", "student.lm_head.bias"}
    assert student[0].calls_with_mask == 1 and teacher[0].calls_with_mask == 1
    distiller.zero_grad()
    ref_kd, ref_ce = _materialised(student, teacher, ids, mask, 2.0, 0.5)
    (ref_kd + ref_ce).backward()
    assert_rel_close(losses["kd"], ref_kd, 1e-5, "KD term")
    assert_rel_close(losses["ce"], ref_ce, 1e-5, "CE term")
    for n, p in distiller.named_parameters():
        assert_rel_close(ours[n], p.grad, 1e-5, f"grad {n}")
    assert all(p.grad is None for p in teacher[0].parameters()) and teacher[1].weight.grad is None


def test_causal_lm_distiller_trains():
    """A few AdamW steps lower the distillation loss on a fixed batch."""
    student, teacher = _pair(8, 3, bias=False), _pair(8, 4, bias=False)
    distiller = CausalLMKD(student, teacher, temperature=1.0, ce_weight=0.0)
    opt = torch.optim.AdamW(distiller.parameters(), lr=3e-2)
    ids, mask = _batch(1)
    first = None
    for _ in range(15):
        opt.zero_grad()
        _, losses = distiller(ids, attention_mask=mask)
        loss = sum(losses.values())
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first, (first, loss.item())
    assert "teacher" not in "".join(distiller.state_dict())  # the teacher stays outside the module tree


def test_labels_and_bad_input():
    student, teacher = _pair(8, 5, bias=False), _pair(8, 6, bias=False)
    distiller = CausalLMKD(student, teacher, temperature=2.0, ce_weight=1.0)
    ids, _ = _batch(2)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not trained on
    _, losses = distiller(ids, labels=labels)
    logits_s = student[1](student[0](ids).last_hidden_state)[:, :-1].reshape(-1, VOCAB)
    logits_t = teacher[1](teacher[0](ids).last_hidden_state)[:, :-1].reshape(-1, VOCAB).detach()
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    ref = kd_loss(logits_s[keep], logits_t[keep], 2.0) + F.cross_entropy(logits_s, target, ignore_index=-100)
    assert_rel_close(losses["kd"] + losses["ce"], ref, 1e-5, "loss with labels")
    with pytest.raises(ValueError, match=r"needs L >= 2"):
        distiller(ids[:, :1])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 8\) but input_ids has \(3, 9\)"):
        distiller(ids, attention_mask=torch.ones(3, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="different vocabularies"):
        CausalLMKD(student, (teacher[0], nn.Linear(8, VOCAB + 1)))
    with pytest.raises(TypeError, match=r"must be a \(model, lm_head\) pair"):
        CausalLMKD(student[0], teacher)
    assert isinstance(distiller.student, CausalLM)


def test_linear_distill_kl_module():
    g = torch.Generator().manual_seed(7)
    h_s = torch.randn(2, 5, 6, generator=g).requires_grad_()
    h_t = torch.randn(2, 5, 4, generator=g)
    head_s, head_t = nn.Linear(6, 30), nn.Linear(4, 30)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    labels[0, 0] = -100
    crit = kdkernels.nn.LinearDistillKL(3.0, ignore_index=-100, ce_weight=0.25)
    loss = crit(h_s, head_s, h_t, head_t, labels)
    keep = labels.reshape(-1) != -100
    zs = head_s(h_s).reshape(-1, 30)
    zt = head_t(h_t).reshape(-1, 30).detach()
    ref = kd_loss(zs[keep], zt[keep], 3.0) + 0.25 * F.cross_entropy(zs, labels.reshape(-1), ignore_index=-100)
    assert_rel_close(loss, ref, 1e-5, "LinearDistillKL")
    loss.backward()
    assert head_s.weight.grad is not None and head_t.weight.grad is not None  # the module's heads are trainable
    # a bare weight tensor as head, DistillKL's value
    plain = kdkernels.nn.LinearDistillKL(3.0)(h_s[0], head_s.weight, h_t[0], head_t.weight)
    assert_rel_close(plain, kdkernels.nn.DistillKL(3.0)(h_s[0] @ head_s.weight.T, h_t[0] @ head_t.weight.T),
                     1e-5, "weights only")
    assert repr(crit) == "LinearDistillKL(T=3.0, ignore_index=-100, ce_weight=0.25)"
    with pytest.raises(ValueError, match="must agree in every dimension but the last"):
        crit(h_s, head_s, h_t[:1], head_t)
    with pytest.raises(TypeError, match="head_s must be an nn.Linear"):
        crit(h_s, "head", h_t, head_t)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_causal_lm_terms_are_reported_apart_and_only_their_sum_back_propagates(backend):
    """"ce" is the student's next-token CE (weighted), "kd" the KL term, from one fused pass; fit's
    history reports them apart; a backward through one term alone would get the wrong gradient: it raises."""
    student, teacher = _pair(8, 11, bias=False), _pair(8, 12, bias=False)
    distiller = CausalLMKD(student, teacher, temperature=2.0, kd_weight=0.5, ce_weight=0.25, backend=backend)
    ids, mask = _batch(3)
    _, losses = distiller(ids, attention_mask=mask)
    ref_kd, ref_ce = _materialised(student, teacher, ids, mask, 2.0, 0.5)  # ce_weight / kd_weight inside
    assert_rel_close(losses["kd"], 0.5 * ref_kd, 1e-5, "kd = kd_weight T^2 KL")
    assert_rel_close(losses["ce"], 0.5 * ref_ce, 1e-5, "ce = ce_weight CE")
    with pytest.raises(RuntimeError, match="gradient of their sum only"):
        losses["kd"].backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="gradient of their sum only"):
        (losses["kd"] + 2 * losses["ce"]).backward(retain_graph=True)
    distiller.zero_grad()
    (losses["kd"] + losses["ce"]).backward()
    assert student[1].weight.grad is not None

    seen = []
    loader = [(ids, ids)] * 2
    opt = torch.optim.SGD(distiller.parameters(), lr=0.0)
    history = kdkernels.train.fit(distiller, loader, epochs=1, optimizer=opt, progress=False,
                                  on_step=lambda info: seen.append(info["losses"]))
    row = history[0]
    assert set(seen[0]) == {"kd", "ce"}
    _, plain = distiller(ids, labels=ids)
    assert_rel_close(torch.tensor(row["ce"]), plain["ce"].detach().double(), 1e-5, "fit's reported CE")
    assert_rel_close(torch.tensor(row["loss"]), (plain["kd"] + plain["ce"]).detach().double(), 1e-5, "fit's loss")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_linear_kd_loss_terms_back_propagate_their_sum_only(reduction):
    """Both terms with one grad_output give linear_kd_loss's gradients, however the sum is formed
    (one tensor handed to both, views of one tensor, or two equal tensors); one term alone, or the
    two with different weights, raises."""
    from kdkernels.ops.linear_kd import linear_kd_loss_terms

    g = torch.Generator().manual_seed(4)
    h_s, w_s = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    h_t, w_t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (6,), generator=g)
    y[3] = -100
    kw = dict(temperature=1.5, labels=y, ignore_index=-100, ce_weight=0.4, reduction=reduction, chunk=4, backend="cpp")
    leaves = [x.requires_grad_() for x in (h_s, w_s)]
    whole = kdkernels.linear_kd_loss(h_s, w_s, h_t, w_t, **kw)
    ref = torch.autograd.grad(whole.sum() * 1.3, leaves)
    sums = {"kd + ce": lambda kd, ce: (kd + ce).sum() * 1.3,
            "kd.sum() + ce.sum()": lambda kd, ce: (kd.sum() + ce.sum()) * 1.3,
            "1.3 kd + 1.3 ce": lambda kd, ce: (1.3 * kd).sum() + (1.3 * ce).sum()}
    for name, total in sums.items():
        kd, ce = linear_kd_loss_terms(h_s, w_s, h_t, w_t, **kw)
        for a, b in zip(torch.autograd.grad(total(kd, ce), leaves), ref):
            assert_rel_close(a, b, 1e-12, name)
    wrong = {"kd alone": lambda kd, ce: kd.sum(), "ce alone": lambda kd, ce: ce.sum(),
             "kd + 2 ce": lambda kd, ce: (kd + 2 * ce).sum(), "2 kd + ce": lambda kd, ce: (2 * kd + ce).sum()}
    for name, total in wrong.items():
        kd, ce = linear_kd_loss_terms(h_s, w_s, h_t, w_t, **kw)
        with pytest.raises(RuntimeError, match="gradient of their sum only"):
            torch.autograd.grad(total(kd, ce), leaves)


def test_linear_kd_loss_terms_compile_without_graph_breaks():
    """Under torch.compile(fullgraph=True) the terms' sum gives linear_kd_loss's gradients; the
    compiled backward cannot raise on terms weighted apart (it reads nothing on the host), so
    their gradients are NaN instead of silently wrong."""
    from kdkernels.ops.linear_kd import linear_kd_loss_terms

    g = torch.Generator().manual_seed(5)
    h_s, w_s = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    h_t, w_t = torch.randn(6, 3, generator=g), torch.randn(9, 3, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    kw = dict(temperature=1.5, labels=y, ce_weight=0.4, chunk=4, backend="cpp")
    leaves = [x.requires_grad_() for x in (h_s, w_s)]
    ref = torch.autograd.grad(kdkernels.linear_kd_loss(h_s, w_s, h_t, w_t, **kw) * 1.3, leaves)
    torch._dynamo.reset()
    for name, weights, expect_nan in (("kd + ce", (1.3, 1.3), False), ("2 kd + ce", (2.0, 1.0), True)):
        def step(h_s, w_s, a=weights[0], b=weights[1]):
            kd, ce = linear_kd_loss_terms(h_s, w_s, h_t, w_t, **kw)
            return a * kd + b * ce
        grads = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves), leaves)
        for a, b in zip(grads, ref):
            if expect_nan:
                assert torch.isnan(a).all(), f"{name}: a compiled backward of terms weighted apart must give NaN"
            else:
                assert_rel_close(a, b, 1e-5, f"compiled {name}")


def test_linear_kd_loss_terms_sum_to_the_loss():
    from kdkernels.ops.linear_kd import linear_kd_loss_terms

    g = torch.Generator().manual_seed(9)
    h_s, w_s = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    h_t, w_t = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (7,), generator=g)
    y[2] = -100
    for reduction in ("batchmean", "sum", "none"):
        kw = dict(temperature=1.5, labels=y, ignore_index=-100, ce_weight=0.3, reduction=reduction, chunk=3)
        kd, ce = linear_kd_loss_terms(h_s, w_s, h_t, w_t, backend="cpp", **kw)
        assert_rel_close(kd + ce, kdkernels.linear_kd_loss(h_s, w_s, h_t, w_t, backend="torch", **kw), 1e-12, "sum")
        only_kd = dict(kw, ce_weight=0.0)
        assert_rel_close(kd, kdkernels.linear_kd_loss(h_s, w_s, h_t, w_t, backend="torch", **only_kd), 1e-12, "kd")


def _next_token_lm(vocab: int) -> CausalLM:
    """A causal LM that predicts token i + 1 (mod V) after token i: one-hot hidden states and a
    cyclic-shift lm_head."""
    embed = nn.Embedding(vocab, vocab)
    head = nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        embed.weight.copy_(torch.eye(vocab))
        head.weight.copy_(torch.roll(torch.eye(vocab), 1, 0))  # row j has its 1 at column j - 1
    return CausalLM(embed, head)


def _lm_eval_batch(ignore_index: int):
    ids = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 0]])
    labels = ids.clone()
    labels[0, 2] = ignore_index  # the target of position 1: left out
    labels[1, 3] = 2  # the target of position 2 (predicted 6): wrong
    return ids, labels  # shifted: 6 of 7 kept targets right; unshifted: none


def test_evaluate_causal_lm_is_next_token_accuracy():
    """A CausalLM's (B, L, V) logits are scored as CausalLMKD's loss scores them: position i
    against label i + 1, ignore_index left out; labels default to the input ids."""
    lm = _next_token_lm(7)
    ids, labels = _lm_eval_batch(-100)
    assert kdkernels.train.evaluate(lm, [(ids, labels)]) == pytest.approx(100.0 * 6 / 7)
    assert kdkernels.train.evaluate(lm, [(ids[:1], labels[:1]), (ids[1:], labels[1:])]) == pytest.approx(100.0 * 6 / 7)
    assert kdkernels.train.evaluate(lm, [ids]) == pytest.approx(100.0)  # the ids themselves are the labels
    assert kdkernels.train.evaluate(lm, [(ids, labels)], ignore_index=2) == pytest.approx(100.0 * 6 / 7)
    # any model with (B, L, V) logits, told it is a causal LM
    plain = nn.Sequential(lm.model, lm.lm_head)
    assert kdkernels.train.evaluate(plain, [(ids, labels)], causal_lm=True) == pytest.approx(100.0 * 6 / 7)


def test_fit_evaluates_causal_lm_kd_by_next_token_accuracy():
    """fit's val_acc for CausalLMKD: the student's next-token accuracy with the distiller's ignore_index."""
    student, teacher = _next_token_lm(7), _next_token_lm(7)
    distiller = CausalLMKD(student, teacher, temperature=2.0, ignore_index=-1, backend="cpp")
    ids, labels = _lm_eval_batch(-1)
    history = kdkernels.train.fit(distiller, [(ids, labels)], epochs=1, progress=False, eval_loader=[(ids, labels)],
                                  optimizer=torch.optim.SGD(distiller.parameters(), lr=0.0))
    assert history[0]["val_acc"] == pytest.approx(100.0 * 6 / 7)
