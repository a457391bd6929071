"""The launchers' pure-Python float32 rounding equals PyTorch's, value for value."""
from __future__ import annotations

import math
import random

import torch

from kdkernels.reference.abf import float32_ratio
from kdkernels.triton._host import f32, f32_ratio, f32_split


def _torch_f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def test_ratio_equals_the_tensor_version():
    rng = random.Random(0)
    pairs = [(a, b) for a in range(1, 130) for b in range(1, 130)]
    pairs += [(rng.randrange(1, 1 << 31), rng.randrange(1, 1 << 31)) for _ in range(3000)]
    # past 2^24 the integers themselves round to float32
    pairs += [((1 << 24) + k, 8 + k) for k in range(-5, 50)] + [(7, (1 << 25) + 1), ((1 << 31) - 1, 1)]
    bad = [(a, b, f32_ratio(a, b), float32_ratio(a, b)) for a, b in pairs if f32_ratio(a, b) != float32_ratio(a, b)]
    assert not bad, bad[:5]


def test_rounding_equals_torch():
    rng = random.Random(1)
    xs = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-45, 38) for _ in range(5000)]
    xs += [1 / 3, 2 / 3, 0.1, 1e-46, -1e-46, 1.4e-45, 3.4028235e38, 3.4028236e38, 3.5e38, -1e39, 1e300,
           0.0, -0.0, math.inf, -math.inf]
    xs += [1 + k * 2.0 ** -24 for k in range(-4, 5)]  # ties to even at 1
    for x in xs:
        assert f32(x) == _torch_f32(x) or (math.isnan(f32(x)) and math.isnan(_torch_f32(x))), x
    assert math.isnan(f32(math.nan))


def test_split_is_the_float32_head_and_the_rest():
    for t in (1.0, 3.0, 4.0, 0.7, 1e-3, 7.123456789):
        inv = 1.0 / t
        head, tail = f32_split(inv)
        assert head == _torch_f32(inv) and tail == inv - head
