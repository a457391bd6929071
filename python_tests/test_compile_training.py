"""A training step through each op under ``torch.compile(fullgraph=True)``: no graph
breaks, the same loss and gradients as eager, and ``dynamic=True`` across batch sizes
without a recompile per size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kdkernels
from kdkernels import nn as knn

from _util import DEVICE, assert_rel_close

BACKEND = {"cpu": "cpp", "cuda": "triton"}[DEVICE.type]
# not equal to any other size in the step: dynamo's duck sizing would give a batch
# of 2 the same symbol as the (2, 2C, 1, 1) attention weight, which is static
BATCHES = (4, 8, 11)


class _Student(nn.Module):
    """conv -> features (N, 6, 7, 5) and a linear head -> logits (N, 10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return f, self.head(f.mean((2, 3)))


def _losses(student, reg, abf_w, abf_b, x, ft, lt):
    fs, logits = student(x)
    fused = kdkernels.abf_fuse(fs, fs[:, :, ::2, ::2], abf_w, abf_b, backend=BACKEND)
    return (kdkernels.hcl_loss([fused], [ft], backend=BACKEND)
            + kdkernels.hint_loss(fs, ft, reg.weight, reg.bias, backend=BACKEND)
            + kdkernels.kd_loss(logits, lt, 4.0, backend=BACKEND))


def _setup():
    torch.manual_seed(0)
    student = _Student().to(DEVICE)
    reg = nn.Conv2d(6, 6, 1).to(DEVICE)
    abf_w = (torch.randn(2, 12, 1, 1) * 0.3).to(DEVICE).requires_grad_()
    abf_b = torch.zeros(2, device=DEVICE).requires_grad_()
    return student, reg, abf_w, abf_b


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 7, 5, generator=g).to(DEVICE), torch.randn(n, 6, 7, 5, generator=g).to(DEVICE),
            torch.randn(n, 10, generator=g).to(DEVICE))


def _grads(params, fn, *args):
    for p in params:
        p.grad = None
    loss = fn(*args)
    (loss * 0.7).backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_step_compiles_without_graph_breaks_and_matches_eager(dynamic):
    torch._dynamo.reset()
    student, reg, abf_w, abf_b = _setup()
    params = list(student.parameters()) + list(reg.parameters()) + [abf_w, abf_b]
    step = lambda x, ft, lt: _losses(student, reg, abf_w, abf_b, x, ft, lt)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    frames = torch._dynamo.utils.counters["stats"]
    before = frames["unique_graphs"]
    for i, n in enumerate(BATCHES):
        data = _data(n, seed=i)
        loss, grads = _grads(params, compiled, *data)
        ref_loss, ref_grads = _grads(params, step, *data)
        assert_rel_close(loss, ref_loss, 1e-5, f"loss at batch {n}")
        for p, g, rg in zip(params, grads, ref_grads):
            assert_rel_close(g, rg, 1e-5, f"gradient of a {tuple(p.shape)} parameter at batch {n}")
    graphs = frames["unique_graphs"] - before
    if dynamic:
        assert graphs == 1, f"dynamic=True compiled {graphs} graphs for batches {BATCHES}"
    else:
        assert graphs >= 1


def test_explain_finds_no_graph_break_in_the_modules():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).to(DEVICE)
    abf_deep = knn.ABF(8, 6, 8, fuse=False).to(DEVICE)
    abf = knn.ABF(8, 6, 8, fuse=True).to(DEVICE)
    hint = knn.HintLoss().to(DEVICE)
    reg = knn.ConvReg((2, 8, 4, 4), (2, 8, 4, 4), use_relu=False).to(DEVICE)
    kd = knn.DistillKL(4.0)

    def step(x, ft, lt):
        f1 = student[:2](x)
        f2 = student[2:4](f1)
        out2, res2 = abf_deep(f2, out_shape=(4, 4))
        out1, _ = abf(f1, res2, shape=(8, 8), out_shape=(8, 8))
        return (kdkernels.hcl_loss([out1, out2], [ft8, ft]) + hint(reg(f2), ft) + kd(student[4:](f2), lt))

    x, ft, lt = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 10)
    ft8 = torch.randn(2, 8, 8, 8).to(DEVICE)
    explanation = torch._dynamo.explain(step)(x.to(DEVICE), ft.to(DEVICE), lt.to(DEVICE))
    assert explanation.graph_break_count == 0, explanation.break_reasons
