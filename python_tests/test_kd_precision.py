"""KD's teacher gradient in float32 is as accurate as the eager float32 code's.

The teacher gradient is T p_t (g - E_{p_t}[g]) with the gaps g of the
log-probabilities. Where the teacher is peaked, the largest p_t multiplies a
difference g - E[g] of two nearly equal numbers; taken relative to the
student's own maximum (as the kernels once did) that difference loses up to
~10x the accuracy of the eager code. The kernels now take the gaps relative to
the teacher's argmax (g = 0 there exactly; csrc/common/kd.h).

The truth is float64 with the same care (gaps relative to the teacher's
argmax): the plain float64 reference itself rounds 1 - p to 0 where the
teacher is very peaked and is then the less accurate of the two.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import kdkernels
from kdkernels.reference import kd as ref

from _util import DEVICE, backends_for, rel_error

# Cases (n, log2 of the classes, temperature, logit scale, seed): the chosen ones first, then 25
# drawn from a fixed seed over the whole domain. Hypothesis drew them before (derandomized), but
# its draws lean on constants it collects from whatever modules are imported, so an unrelated
# change to the package, or another split of the tests between xdist workers, changed the cases
# run, and CI once met a failing one that no local run had tried (the last case below).
CHOSEN = [
    (1, 2.33, 0.5, 5.0, 3),  # C = 5
    (1, 9.97, 0.5, 5.0, 67),  # C = 1000, peaked
    (1, 14.29, 2.0, 20.0, 50),  # C = 20000, peaked
    (2, 7.3494803346443245, 0.5, 20.0, 470232521),  # eager's is NaN
    (1, math.log2(25830), 14.66, 20.0, 5511),  # C = 25,830: float32 row totals were not enough
]
_draw = random.Random(20261204)
DRAWN = [(_draw.randint(1, 2), _draw.uniform(1.0, 16.61), _draw.uniform(0.5, 20.0),
          _draw.choice([0.1, 1.0, 5.0, 20.0]), _draw.randint(0, 2**31 - 1)) for _ in range(25)]
# float32 cannot be asked for better than its own resolution: an error of one eps of the
# gradient's norm counts as as-good-as-eager even where eager happens to be closer
FLOOR = torch.finfo(torch.float32).eps


def _teacher_truth(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """d kd_loss(batchmean) / d t in float64, with the gaps taken relative to each row's teacher argmax."""
    lp_t, lp_s = torch.log_softmax(t / temperature, 1), torch.log_softmax(s / temperature, 1)
    p_t = lp_t.exp()
    gap = lp_t - lp_s
    gap = gap - gap.gather(1, t.argmax(1, keepdim=True))
    return temperature / s.shape[0] * p_t * (gap - (p_t * gap).sum(1, keepdim=True))


def _teacher_grad(fn, s, t):
    s = s.detach().to(DEVICE, torch.float32).requires_grad_()
    t = t.detach().to(DEVICE, torch.float32).requires_grad_()
    fn(s, t).backward()
    return t.grad


@pytest.mark.parametrize("n, log2_classes, temperature, scale, seed", CHOSEN + DRAWN)
def test_teacher_gradient_within_twice_eager_error(n, log2_classes, temperature, scale, seed):
    """C from 2 to 100k, T from 0.5 to 20, flat (scale 0.1) to peaked (scale 20) logits."""
    classes = max(2, round(2 ** log2_classes))
    g = torch.Generator().manual_seed(seed)
    # float32-representable logits, so that every float32 run sees exactly the float64 inputs
    s = (torch.randn(n, classes, generator=g, dtype=torch.float64) * scale).float().double()
    t = (torch.randn(n, classes, generator=g, dtype=torch.float64) * scale).float().double()
    truth = _teacher_truth(s, t, temperature)
    eager = rel_error(_teacher_grad(lambda a, b: ref.kd_loss(a, b, temperature), s, t), truth)
    # eager's teacher gradient is NaN where a teacher probability underflows to 0 in
    # float32 (0 * log 0 in the chain rule through softmax); the kernels must still be
    # within twice float32's eps of the truth there
    bound = 2 * max(eager, FLOOR) if math.isfinite(eager) else 2 * FLOOR
    for backend in [b for b in backends_for("kd_loss") if b != "torch"]:
        got = _teacher_grad(lambda a, b: kdkernels.kd_loss(a, b, temperature, backend=backend), s, t)
        err = rel_error(got, truth)
        assert err <= bound, (f"{backend}: teacher gradient error {err:.2e} > 2 x max(eager {eager:.2e}, "
                              f"eps {FLOOR:.1e}) at N={n}, C={classes}, T={temperature}, scale={scale}")
