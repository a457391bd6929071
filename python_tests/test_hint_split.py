"""hint_loss's Triton kernels with the teacher channels split across programs.

When one program per 32-pixel tile gives fewer programs than the GPU wants
(2 x its SM count), the launcher also splits the teacher channels into groups:
program (pixel group, channel group) writes its channels' rows of the weight-
and bias-gradient partials and of the teacher gradient, and its share of W^T r
into a partial of fs's size that the reduction sums over the groups in a fixed
order. On the GPU that happens at large channel counts (64-channel chunks); here
the tests lower the chunk (``_SPLIT_CT``) and raise the target
(``_TARGET_PROGRAMS``) so that the interpreter runs the split on small inputs,
and check each case really took it (``_plan``): uneven pixel groups with several
tiles per program, several channel chunks per group, one chunk per group.
"""
from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.reference import hint as ref

from _util import DEVICE, REL_TOL, assert_bitwise_repeatable, assert_rel_close

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="forces the split under the Triton interpreter")

GRAD_OUT = 1.7


@pytest.fixture
def tri(monkeypatch):
    """The Triton launcher module, with 16-channel split chunks (the target: per test)."""
    from kdkernels.triton import hint as tri

    monkeypatch.setattr(tri, "_SPLIT_CT", 16)
    return tri


def _plan(tri, fs, ct, needs=(True, True)):
    n, cs, h, w = fs.shape
    prec = "ieee"
    return tri._plan(n * h * w, cs, ct, fs.dtype, prec, None, 4, *needs, (h * w) % 16 == 0)


def _inputs(n, cs, ct, hw, dtype, bias=True, teacher_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    fs = torch.randn(n, cs, h, w, generator=g).to(dtype).requires_grad_()
    ft = (torch.randn(n, ct, h, w, generator=g) * 0.5 + 0.1).to(dtype).requires_grad_(teacher_grad)
    wt = (torch.randn(ct, cs, 1, 1, generator=g) / cs ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(ct, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    return fs, ft, wt, b


def _check(fs, ft, w, b, grad_out, tol):
    loss = kdkernels.hint_loss(fs, ft, w, b, backend="triton")
    (loss * grad_out).backward()
    xs = [x.detach().double().requires_grad_(x.requires_grad) if x is not None else None for x in (fs, ft, w, b)]
    rl = ref.hint_loss(*xs)
    (rl * grad_out).backward()
    assert_rel_close(loss, rl.detach(), tol, "loss")
    for name, x, x64 in zip(("fs", "ft", "weight", "bias"), (fs, ft, w, b), xs):
        if x is None:
            continue
        if x64.grad is None:
            assert x.grad is None, f"{name} got a gradient it did not ask for"
        else:
            assert x.grad is not None and x.grad.dtype == x.dtype, name
            assert_rel_close(x.grad, x64.grad, tol, f"grad {name}")


# (N, Cs, Ct, (H, W), target programs): what the split looks like is checked in the test
SHAPES = [
    (3, 5, 33, (7, 7), 6),     # 5 tiles in 2 pixel groups (2 and 3 tiles), 3 groups of one 16-channel chunk
    (3, 7, 64, (7, 7), 6),     # 5 tiles, 2 channel groups of 2 chunks (the fs partial summed over chunks)
    (1, 3, 48, (3, 5), 8),     # batch 1, 15 pixels: one tile, 3 channel groups
    (2, 9, 40, (1, 1), 8),     # H = W = 1: 2 pixels; the last chunk half masked
    (2, 16, 35, (3, 7), 9),    # non-square, odd Ct
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _cases():
    """Each shape in two dtypes (every dtype twice over the shapes), bias and teacher grad cycled."""
    k = 0
    for i, shape in enumerate(SHAPES):
        for dtype in (DTYPES[i % 4], DTYPES[(i + 2) % 4]):
            bias, teacher = k % 2 == 0, k % 3 == 0
            k += 1
            name = f"{shape[0]}x{shape[1]}x{shape[3][0]}x{shape[3][1]}->{shape[2]}-{str(dtype)[6:]}" \
                   f"{'-bias' if bias else ''}{'-teacher' if teacher else ''}"
            yield pytest.param(shape, dtype, bias, teacher, id=name)


@pytest.mark.parametrize("shape, dtype, bias, teacher", list(_cases()))
def test_split_matches_reference(tri, monkeypatch, shape, dtype, bias, teacher):
    n, cs, ct, hw, target = shape
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", target)
    fs, ft, w, b = _inputs(n, cs, ct, hw, dtype, bias=bias, teacher_grad=teacher, seed=cs * 100 + ct)
    plan = _plan(tri, fs, ct)
    assert plan.ct_groups > 1, plan  # the case runs the split
    _check(fs, ft, w, b, GRAD_OUT, REL_TOL[dtype])


def test_split_plans_cover_every_layout(tri, monkeypatch):
    """The shapes above take the split in each of its layouts: several tiles per program in
    uneven pixel groups, several chunks per channel group, one chunk per group."""
    seen = set()
    for n, cs, ct, hw, target in SHAPES:
        monkeypatch.setattr(tri, "_TARGET_PROGRAMS", target)
        fs = torch.empty(n, cs, *hw)
        p = _plan(tri, fs, ct)
        chunks = -(-ct // p.cfg.block_ct)
        assert p.ct_groups > 1 and chunks % p.ct_groups == 0, (n, cs, ct, hw, p)
        assert p.pix_groups * p.ct_groups >= min(target, p.num_tiles * chunks), p
        seen.add("multi-tile" if p.max_tiles > 1 else "one tile")
        seen.add("several chunks" if chunks > p.ct_groups else "one chunk")
        if p.num_tiles % p.pix_groups:
            seen.add("uneven pixel groups")
    assert seen >= {"multi-tile", "one tile", "several chunks", "one chunk", "uneven pixel groups"}, seen


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)],
                         ids=["fs only", "weight only", "no grad"])
def test_split_partial_gradients(tri, monkeypatch, needs):
    """Only some inputs require grad: the split with and without the fs partials."""
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 6)
    fs, ft, w, b = _inputs(3, 5, 33, (7, 7), torch.float32, seed=4)
    fs.requires_grad_(needs[0])
    w.requires_grad_(needs[1])
    b.requires_grad_(needs[1])
    assert _plan(tri, fs, 33, needs).ct_groups > 1
    if not any(needs):
        with torch.no_grad():
            loss = kdkernels.hint_loss(fs, ft, w, b, backend="triton")
        assert_rel_close(loss, ref.hint_loss(fs.double(), ft.double(), w.double(), b.double()), 1e-5, "loss")
        return
    _check(fs, ft, w, b, 1.0, 1e-5)  # grad_output exactly 1 as well


def test_split_deterministic(tri, monkeypatch):
    """Bitwise-identical loss and gradients over repeated runs of the split path."""
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 6)
    fs, ft, w, b = _inputs(3, 7, 64, (7, 7), torch.float32, teacher_grad=True, seed=5)
    assert _plan(tri, fs, 64).ct_groups > 1

    def run():
        loss = kdkernels.hint_loss(fs, ft, w, b, backend="triton")
        return [loss, *torch.autograd.grad(loss * GRAD_OUT, (fs, ft, w, b))]

    assert_bitwise_repeatable(run, what="hint_loss[triton, split]")


def test_split_gradcheck_float64(tri, monkeypatch):
    monkeypatch.setattr(tri, "_TARGET_PROGRAMS", 6)
    fs, ft, w, b = _inputs(1, 2, 33, (1, 2), torch.float64, teacher_grad=True, seed=6)  # 3 channel groups
    assert _plan(tri, fs, 33).ct_groups > 1
    assert torch.autograd.gradcheck(lambda *xs: kdkernels.hint_loss(*xs, backend="triton"), (fs, ft, w, b))


def test_reduce_grid_reaches_the_target(tri, monkeypatch):
    """The reduction's grid: narrower column blocks (down to 32) until it reaches the target."""
    assert tri._reduce_block(128 * 128, 128, 0, 264) == 32  # 512 + 4 + 1 programs
    assert tri._reduce_block(256 * 256, 256, 0, 264) == 128  # 512 + 2 + 1
    assert tri._reduce_block(256 * 256, 256, 2048, 264) == 256  # the fs sums fill the grid already
    assert tri._reduce_block(32 * 32, 32, 0, 264) == 32  # 32 + 1 + 1: all the work allows
