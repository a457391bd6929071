"""``_dispatch.scale_grad``, the shared backward of the ops whose forward computes their gradients
(hint, linear KD): one pass over the saved gradient, bitwise the result of casting it to the
factor's dtype, multiplying there and casting the product to the gradient's dtype."""
from __future__ import annotations

import itertools

import pytest
import torch

from kdkernels.ops._dispatch import scale_grad

from _launches import recording
from _util import DEVICE

# (saved gradient's dtype, factor's dtype = the accumulation dtype, result's dtype): hint saves
# the fs/ft gradients in the input dtype; linear KD saves all in the accumulation dtype
CASES = [(torch.float16, torch.float32, torch.float16), (torch.bfloat16, torch.float32, torch.bfloat16),
         (torch.float32, torch.float32, torch.float16), (torch.float32, torch.float32, torch.bfloat16),
         (torch.float32, torch.float32, torch.float32), (torch.float64, torch.float64, torch.float64)]
# 2/numel of large maps (under float16's smallest subnormal 6e-8), tiny, large, negative, non-finite
FACTORS = [1.0, 0.5, 2.0 / (64 * 256 * 56 * 56), 1e-10, 3.7e5, -1.7, float("nan"), float("inf"), 0.0]


def _three_passes(g, s, dtype):
    """What scale_grad computed before it became one pass: cast, multiply, cast back."""
    return (g if g.dtype == s.dtype else g.to(s.dtype)).mul(s).to(dtype)


def _saved(dtype, shape=(5, 37)):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.logspace(-9, 4, shape[-1], dtype=torch.float64)
    g = g.to(DEVICE, dtype)
    flat = g.view(-1)
    extremes = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), torch.finfo(dtype).tiny,
                torch.finfo(dtype).max, -torch.finfo(dtype).max]
    flat[:len(extremes)] = torch.tensor(extremes, dtype=dtype)
    return g


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("g_dtype, s_dtype, dtype", CASES, ids=lambda d: str(d)[6:])
def test_one_pass_equals_three_passes_bitwise(g_dtype, s_dtype, dtype):
    g = _saved(g_dtype)
    for value, shape in itertools.product(FACTORS, [(), (1,)]):
        s = torch.full(shape, value, dtype=s_dtype, device=DEVICE)
        got, want = scale_grad(g, s, dtype), _three_passes(g, s, dtype)
        assert got.dtype == dtype and got.shape == g.shape and got.is_contiguous()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), value
        assert torch.equal(_bits(got[~nan]), _bits(want[~nan])), f"factor {value}"
        assert got.data_ptr() != g.data_ptr()  # a fresh tensor, never the saved one


def test_the_test_catches_a_plain_mul():
    """A 0-dim float32 factor times a float16 tensor is computed in float16 (type promotion):
    the factor 2/numel underflows; the cases above would see it."""
    g = _saved(torch.float16)
    s = torch.tensor(FACTORS[2], dtype=torch.float32, device=DEVICE)
    assert not torch.equal(g.mul(s), _three_passes(g, s, torch.float16))


@pytest.mark.parametrize("g_dtype, s_dtype, dtype", CASES, ids=lambda d: str(d)[6:])
def test_one_launch(g_dtype, s_dtype, dtype):
    g = _saved(g_dtype, (3, 4))
    s = torch.tensor(0.25, dtype=s_dtype, device=DEVICE)
    with recording() as rec:
        scale_grad(g, s, dtype)
    assert rec.launches == ["torch:mul"], rec.launches
    assert not rec.host, rec.host


def test_zero_dim_and_empty_gradients():
    s = torch.tensor(0.5, device=DEVICE)
    for g in (torch.tensor(3.0, device=DEVICE, dtype=torch.float16), torch.empty(0, 4, device=DEVICE)):
        got = scale_grad(g, s, g.dtype)
        assert got.shape == g.shape and torch.equal(got, _three_passes(g, s, g.dtype))
