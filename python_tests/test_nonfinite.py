"""NaN and +-inf in the student or the teacher reach the loss (and the gradient), on every backend.

A non-finite input must give a non-finite loss: never a finite number that hides
it, never a crash, in the forward and in the backward. One exception, by design:
``kd_loss`` treats a teacher logit of -inf as probability 0 (a masked class,
see test_kd.py::test_teacher_minus_inf), so that loss stays finite.
"""
from __future__ import annotations

import pytest
import torch

import kdkernels

from _util import DEVICE, backends_for

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
SIDES = ["student", "teacher"]

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _poison(t, index, value):
    t = t.detach().clone()
    t[index] = value
    return t


def _check(loss, student, expect_finite=False, finite_grad=False):
    """The loss is non-finite (finite where stated); the backward runs and carries it into the
    gradient (unless ``finite_grad``: the gradient's true limit is finite)."""
    if expect_finite:
        assert torch.isfinite(loss).all(), f"loss {loss} should stay finite"
    else:
        assert not torch.isfinite(loss).all(), f"a non-finite input gave the finite loss {loss}"
    loss.sum().backward()
    assert student.grad is not None
    if expect_finite or finite_grad:
        assert torch.isfinite(student.grad).all(), "a finite gradient limit came out non-finite"
    else:
        assert not torch.isfinite(student.grad).all(), "the gradient hides the non-finite input"


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", backends_for("hcl_loss"))
def test_hcl_loss(backend, side, value):
    # two levels (H = 5: pools 4, 2, 1 with overlapping bins; H = 1: plain MSE); the bad value in the last element
    fs = [_randn(2, 3, 5, 5, seed=1), _randn(2, 3, 1, 1, seed=2)]
    ft = [_randn(2, 3, 5, 5, seed=3), _randn(2, 3, 1, 1, seed=4)]
    level = 0 if value == "nan" else 1
    if side == "student":
        fs[level] = _poison(fs[level], (1, 2, -1, -1), VALUES[value])
    else:
        ft[level] = _poison(ft[level], (1, 2, -1, -1), VALUES[value])
    fs = [f.requires_grad_() for f in fs]
    loss = kdkernels.hcl_loss(fs, ft, backend=backend)
    _check(loss, fs[level])


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", backends_for("kd_loss"))
def test_kd_loss(backend, side, value):
    s, t = _randn(3, 37, seed=5), _randn(3, 37, seed=6)
    if side == "student":
        s = _poison(s, (1, 36), VALUES[value])
    else:
        t = _poison(t, (1, 36), VALUES[value])
    s.requires_grad_()
    masked = side == "teacher" and value == "-inf"
    rows = kdkernels.kd_loss(s, t, reduction="none", backend=backend)
    # the bad row only: the other rows stay finite
    assert torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(rows[1]) == masked, rows
    s.grad = None
    # a student logit of -inf: p_s = 0 there, the loss is +inf, and the gradient T (p_s - p_t) its finite limit
    _check(kdkernels.kd_loss(s, t, backend=backend), s, expect_finite=masked,
           finite_grad=side == "student" and value == "-inf")


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", backends_for("hint_loss"))
def test_hint_loss(backend, side, value):
    fs, ft = _randn(2, 3, 3, 5, seed=7), _randn(2, 4, 3, 5, seed=8)
    w, b = (_randn(4, 3, 1, 1, seed=9) / 2).requires_grad_(), _randn(4, seed=10).requires_grad_()
    if side == "student":
        fs = _poison(fs, (1, 2, 2, 4), VALUES[value])
    else:
        ft = _poison(ft, (1, 3, 2, 4), VALUES[value])
    fs.requires_grad_()
    _check(kdkernels.hint_loss(fs, ft, w, b, backend=backend), fs)
    assert not torch.isfinite(w.grad).all(), "the weight gradient hides the non-finite input"


@pytest.mark.parametrize("value", VALUES, ids=list(VALUES))
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("backend", backends_for("abf_fuse"))
def test_abf_fuse(backend, side, value):
    """abf_fuse is not a loss, but its output pixels must carry a non-finite x or up(y) value too."""
    x, y = _randn(1, 2, 4, 4, seed=11), _randn(1, 2, 2, 2, seed=12)
    w, b = _randn(2, 4, 1, 1, seed=13).requires_grad_(), _randn(2, seed=14).requires_grad_()
    if side == "x":
        x = _poison(x, (0, 1, 2, 3), VALUES[value])
        bad = (slice(None), slice(None), slice(2, 3), slice(3, 4))  # that pixel only
    else:
        y = _poison(y, (0, 1, 1, 1), VALUES[value])
        bad = (slice(None), slice(None), slice(2, 4), slice(2, 4))  # the 2x2 pixels up(y) copies it to
    x.requires_grad_()
    y.requires_grad_()
    out = kdkernels.abf_fuse(x, y, w, b, backend=backend)
    assert not torch.isfinite(out[bad]).all(), out[bad]
    good = torch.ones_like(out, dtype=torch.bool)
    good[bad] = False
    assert torch.isfinite(out[good]).all(), "a non-finite value leaked into other pixels"
    out.sum().backward()
    assert not torch.isfinite(w.grad).all(), "the attention weight gradient hides the non-finite input"
