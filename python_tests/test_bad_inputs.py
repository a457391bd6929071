"""Bad inputs to every public function and module: a ValueError or TypeError naming the argument.

One table, one job. Each case is (id, call, exception, argument, *fragments): the
call must raise exactly that exception type, its message must contain the
argument's name (``pytest.raises(match=...)``) and every fragment (shapes,
dtypes, devices). Device mismatches use a "meta" tensor, which works on a
CPU-only machine; a real CPU/CUDA mismatch is added when the tests run on CUDA.

Zero-size policy (README): every op, module and ``GramStats.update`` rejects a
zero-size tensor (batch 0 or any dimension 0) with a ValueError that names the
argument and its shape; nothing returns a silent 0 or NaN for an empty batch.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import kdkernels
from kdkernels import fskd, train
from kdkernels.nn import ABF, ConvReg, DistillKL, HCLLoss, HintLoss, ReviewKD, ReviewKDLoss, least_squares_init_

from _util import DEVICE

CASES = []


def case(case_id, call, exc, arg, *fragments):
    CASES.append(pytest.param(call, exc, arg, fragments, id=case_id))


def _randn(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype).to(device)


META = "meta"

# ------------------------------------------------------------------ hcl_loss / HCLLoss / ReviewKDLoss
a, b = _randn(2, 3, 4, 4), _randn(2, 3, 4, 5)
case("hcl-levels-mismatch", lambda: kdkernels.hcl_loss([a, a], [a]), ValueError, "fteacher", "2 levels", "1")
case("hcl-list-vs-tensor", lambda: kdkernels.hcl_loss([a, a], a), ValueError, "fteacher", "2 levels")
case("hcl-shape-mismatch", lambda: kdkernels.hcl_loss([a], [b]), ValueError, "fteacher[0]",
     "(2, 3, 4, 4)", "(2, 3, 4, 5)")
case("hcl-empty-lists", lambda: kdkernels.hcl_loss([], []), ValueError, "fstudent", "empty list")
case("hcl-empty-teacher-list", lambda: kdkernels.hcl_loss([a], []), ValueError, "fteacher", "0")
case("hcl-rank3", lambda: kdkernels.hcl_loss([a[0]], [a[0]]), ValueError, "fstudent[0]", "4-D", "(3, 4, 4)")
case("hcl-rank5", lambda: kdkernels.hcl_loss(a[None], a[None]), ValueError, "fstudent[0]", "4-D")
case("hcl-teacher-dtype", lambda: kdkernels.hcl_loss([a], [a.double()]), TypeError, "fteacher[0]", "float64")
case("hcl-level-dtype", lambda: kdkernels.hcl_loss([a, a.double()], [a, a.double()]), TypeError, "fstudent[1]",
     "float64")
case("hcl-int-dtype", lambda: kdkernels.hcl_loss([a.int()], [a.int()]), TypeError, "fstudent[0]", "int32")
case("hcl-not-a-list", lambda: kdkernels.hcl_loss("features", [a]), TypeError, "fstudent", "str")
case("hcl-teacher-none", lambda: kdkernels.hcl_loss(a, None), TypeError, "fteacher", "NoneType")
case("hcl-non-tensor-element", lambda: kdkernels.hcl_loss([a, 3], [a, a]), TypeError, "fstudent[1]", "int")
case("hcl-device", lambda: kdkernels.hcl_loss([a], [torch.empty(2, 3, 4, 4, device=META)]), ValueError,
     "fteacher[0]", "meta")
case("hcl-zero-batch", lambda: kdkernels.hcl_loss([a, a[:0]], [a, a[:0]]), ValueError, "fstudent[1]", "empty",
     "(0, 3, 4, 4)")
case("hcl-zero-height", lambda: kdkernels.hcl_loss(a[:, :, :0], a[:, :, :0]), ValueError, "fstudent[0]", "empty",
     "(2, 3, 0, 4)")
case("hcl-bad-backend", lambda: kdkernels.hcl_loss(a, a, backend="fortran"), ValueError, "backend", "'fortran'")
case("HCLLoss-bad-backend", lambda: HCLLoss(backend="fortran")(a, a), ValueError, "backend", "'fortran'")
case("HCLLoss-shape-mismatch", lambda: HCLLoss()([a], [b]), ValueError, "fteacher[0]", "(2, 3, 4, 5)")
case("ReviewKDLoss-negative-weight", lambda: ReviewKDLoss(weight=-1.0), ValueError, "weight", "-1")
case("ReviewKDLoss-weight-str", lambda: ReviewKDLoss(weight="1"), TypeError, "weight", "str")
case("ReviewKDLoss-negative-warmup", lambda: ReviewKDLoss(warmup_epochs=-1), ValueError, "warmup_epochs")
case("ReviewKDLoss-empty-batch", lambda: ReviewKDLoss()([a[:0]], [a[:0]], epoch=1), ValueError, "fstudent[0]",
     "(0, 3, 4, 4)")

# ------------------------------------------------------------------ kd_loss / DistillKL
s, s11 = _randn(4, 10), _randn(4, 11)


def kd(**kw):
    return lambda: kdkernels.kd_loss(**kw)


for temperature in (0.0, -1.0, float("nan"), float("inf")):
    case(f"kd-temperature-{temperature}", kd(logits_s=s, logits_t=s, temperature=temperature), ValueError,
         "temperature")
case("kd-temperature-bool", kd(logits_s=s, logits_t=s, temperature=True), TypeError, "temperature")
case("kd-temperature-str", kd(logits_s=s, logits_t=s, temperature="4"), TypeError, "temperature", "str")
case("kd-shape-mismatch", kd(logits_s=s, logits_t=s11), ValueError, "logits_t", "(4, 10)", "(4, 11)")
case("kd-rank1", kd(logits_s=s.flatten(), logits_t=s.flatten()), ValueError, "logits_s", "2-D", "(40,)")
case("kd-rank3", kd(logits_s=s, logits_t=s[..., None]), ValueError, "logits_t", "2-D", "(4, 10, 1)")
case("kd-dtype-mismatch", kd(logits_s=s, logits_t=s.double()), TypeError, "logits_t", "float64", "(4, 10)")
case("kd-int-dtype", kd(logits_s=s.long(), logits_t=s.long()), TypeError, "logits_s", "int64")
case("kd-zero-batch", kd(logits_s=s[:0], logits_t=s[:0]), ValueError, "logits_s", "empty", "(0, 10)")
case("kd-zero-classes", kd(logits_s=s[:, :0], logits_t=s[:, :0]), ValueError, "logits_s", "empty", "(4, 0)")
case("kd-reduction", kd(logits_s=s, logits_t=s, reduction="avg"), ValueError, "reduction", "'avg'")
case("kd-reduction-none-object", kd(logits_s=s, logits_t=s, reduction=None), ValueError, "reduction", "None")
case("kd-non-tensor-teacher", kd(logits_s=s, logits_t=[1.0]), TypeError, "logits_t", "list")
case("kd-non-tensor-student", kd(logits_s=s.tolist(), logits_t=s), TypeError, "logits_s", "list")
case("kd-device", kd(logits_s=s, logits_t=torch.empty(4, 10, device=META)), ValueError, "logits_t", "meta",
     "(4, 10)")
case("kd-bad-backend", kd(logits_s=s, logits_t=s, backend="fortran"), ValueError, "backend", "'fortran'")
case("DistillKL-T-zero", lambda: DistillKL(0.0), ValueError, "T", "0")
case("DistillKL-T-negative", lambda: DistillKL(-4), ValueError, "T", "-4")
case("DistillKL-T-str", lambda: DistillKL("4"), TypeError, "T", "str")
case("DistillKL-reduction", lambda: DistillKL(4.0, reduction="avg"), ValueError, "reduction", "'avg'")
case("DistillKL-bad-backend", lambda: DistillKL(4.0, backend="fortran")(s, s), ValueError, "backend")
case("DistillKL-shape-mismatch", lambda: DistillKL(4.0)(s, s11), ValueError, "logits_t", "(4, 11)")

# ------------------------------------------------------------------ abf_fuse / ABF / ReviewKD
x, y, w, bias2 = _randn(2, 4, 8, 8), _randn(2, 4, 4, 4), _randn(2, 8, 1, 1), _randn(2)


def abf(*args, **kw):
    return lambda: kdkernels.abf_fuse(*args, **kw)


case("abf-y-channels", abf(x, y[:, :3], w, bias2), ValueError, "y", "(2, 3, 4, 4)", "(2, 4, 8, 8)")
case("abf-y-batch", abf(x, y[:1], w, bias2), ValueError, "y", "(1, 4, 4, 4)")
case("abf-y-larger", abf(x, _randn(2, 4, 16, 16), w, bias2), ValueError, "y", "larger than x", "(2, 4, 16, 16)")
case("abf-att-weight-shape", abf(x, y, w[:, :6], bias2), ValueError, "att_weight", "(2, 8, 1, 1)", "(2, 6, 1, 1)")
case("abf-att-bias-shape", abf(x, y, w, bias2[:1]), ValueError, "att_bias", "(1,)")
case("abf-x-rank3", abf(x[0], y, w, bias2), ValueError, "x", "4-D")
case("abf-y-rank3", abf(x, y[0], w, bias2), ValueError, "y", "4-D")
case("abf-y-dtype", abf(x, y.double(), w, bias2), TypeError, "y", "float64")
case("abf-att-bias-dtype", abf(x, y, w, bias2.double()), TypeError, "att_bias", "float64")
case("abf-int-dtype", abf(x.int(), y.int(), w, bias2), TypeError, "x", "int32")
case("abf-x-list", abf(x.tolist(), y, w, bias2), TypeError, "x", "list")
case("abf-att-weight-list", abf(x, y, [1.0], bias2), TypeError, "att_weight", "list")
case("abf-att-bias-none", abf(x, y, w, None), TypeError, "att_bias", "NoneType")
case("abf-zero-batch", abf(x[:0], y[:0], w, bias2), ValueError, "x", "empty", "(0, 4, 8, 8)")
case("abf-zero-size-y", abf(x, y[:, :, :0], w, bias2), ValueError, "y", "empty", "(2, 4, 0, 4)")
case("abf-device", abf(x, torch.empty(2, 4, 4, 4, device=META), w, bias2), ValueError, "y", "meta")
case("abf-bad-backend", abf(x, y, w, bias2, backend="fortran"), ValueError, "backend", "'fortran'")
case("abf-backend-not-implemented", abf(x, y, w, bias2, backend="cuda"), ValueError, "backend", "'cuda'")
abf_module = ABF(4, 3, 5, True)
x6, y3 = torch.randn(1, 4, 6, 10), torch.randn(1, 3, 3, 5)
case("ABF-wrong-fusion-shape", lambda: abf_module(x6, y3, 8, 8), ValueError, "shape", "(8, 8)", "(6, 10)")
case("ABF-missing-residual", lambda: abf_module(x6), ValueError, "y", "residual")
case("ABF-bad-out-shape", lambda: abf_module(x6, y3, (6, 10), "big"), TypeError, "out_shape", "'big'")
case("ABF-bad-shape-type", lambda: abf_module(x6, y3, 6.5), TypeError, "shape", "6.5")
case("ABF-x-list", lambda: abf_module(x6.tolist(), y3, (6, 10)), TypeError, "x", "list")
case("ABF-x-rank3", lambda: abf_module(x6[0], y3, (6, 10)), ValueError, "x", "(4, 6, 10)")
case("ABF-y-list", lambda: abf_module(x6, y3.tolist(), (6, 10)), TypeError, "y", "list")
case("ABF-zero-batch", lambda: abf_module(x6[:0], y3[:0], (6, 10)), ValueError, "x", "empty", "(0, 3, 6, 10)")
case("ABF-bad-backend", lambda: abf_module(x6, y3, (6, 10), backend="fortran"), ValueError, "backend")
case("ReviewKD-level-counts", lambda: ReviewKD(nn.Identity(), [8, 16], [16, 32, 64], [1, 8]), ValueError,
     "in_channels", "one entry per level")
case("ReviewKD-out-shapes", lambda: ReviewKD(nn.Identity(), [8, 16], [16, 32], [1, 8], out_shapes=[1]),
     ValueError, "out_shapes")

# ------------------------------------------------ hint_loss / HintLoss / ConvReg / least_squares_init_
fs, ft, hw, hb = _randn(2, 3, 4, 5), _randn(2, 6, 4, 5), _randn(6, 3, 1, 1), _randn(6)


def hint(**kw):
    args = {"fs": fs, "ft": ft, "weight": hw, "bias": hb, **kw}
    return lambda: kdkernels.hint_loss(args.pop("fs"), args.pop("ft"), args.pop("weight"), args.pop("bias"), **args)


case("hint-spatial-mismatch", hint(ft=ft[..., :4]), ValueError, "ft", "(2, 3, 4, 5)", "(2, 6, 4, 4)")
case("hint-batch-mismatch", hint(ft=ft[:1]), ValueError, "ft", "(2, 3, 4, 5)", "(1, 6, 4, 5)")
case("hint-weight-kernel", hint(weight=_randn(6, 3, 3, 3)), ValueError, "weight", "(6, 3, 3, 3)", "(6, 3, 1, 1)")
case("hint-weight-out-channels", hint(weight=hw[:5]), ValueError, "weight", "(5, 3, 1, 1)")
case("hint-weight-rank1", hint(weight=hb), ValueError, "weight", "(6,)")
case("hint-bias-shape", hint(bias=hb[:5]), ValueError, "bias", "(5,)")
case("hint-fs-rank3", hint(fs=fs[0]), ValueError, "fs", "4-D", "(3, 4, 5)")
case("hint-ft-rank2", hint(ft=ft[0, 0]), ValueError, "ft", "4-D")
case("hint-zero-batch", hint(fs=fs[:0], ft=ft[:0]), ValueError, "fs", "empty", "(0, 3, 4, 5)")
case("hint-zero-width", hint(fs=fs[..., :0], ft=ft[..., :0]), ValueError, "fs", "empty", "(2, 3, 4, 0)")
case("hint-ft-dtype", hint(ft=ft.double()), TypeError, "ft", "float64")
case("hint-weight-dtype", hint(weight=hw.half()), TypeError, "weight", "float16")
case("hint-int-dtype", hint(fs=fs.long()), TypeError, "fs", "int64")
case("hint-fs-list", hint(fs=[fs]), TypeError, "fs", "list")
case("hint-weight-none", hint(weight=None), TypeError, "weight", "NoneType")
case("hint-bias-float", hint(bias=1.0), TypeError, "bias", "float")
case("hint-allow-tf32-str", hint(allow_tf32="yes"), TypeError, "allow_tf32", "str")
case("hint-device", hint(ft=torch.empty(2, 6, 4, 5, device=META)), ValueError, "ft", "meta")
case("hint-bad-backend", hint(backend="fortran"), ValueError, "backend", "'fortran'")
case("hint-backend-not-implemented", hint(backend="cuda"), ValueError, "backend", "not implemented")
conv1x1 = nn.Conv2d(3, 6, 1).to(DEVICE)
case("HintLoss-shape-mismatch", lambda: HintLoss()(fs, ft), ValueError, "f_s", "(2, 3, 4, 5)", "(2, 6, 4, 5)")
case("HintLoss-f_s-list", lambda: HintLoss()([fs], ft), TypeError, "f_s", "list")
case("HintLoss-f_t-none", lambda: HintLoss()(fs, None, conv1x1), TypeError, "f_t", "NoneType")
case("HintLoss-regressor-not-module", lambda: HintLoss()(fs, ft, "conv"), TypeError, "regressor", "str")
case("HintLoss-fused-zero-batch", lambda: HintLoss()(fs[:0], ft[:0], conv1x1), ValueError, "fs", "(0, 3, 4, 5)")
case("HintLoss-bad-backend", lambda: HintLoss(backend="fortran")(fs, ft, conv1x1), ValueError, "backend")
for s_shape, t_shape in (((2, 16, 4, 4), (2, 8, 6, 6)),     # upsampling by 1.5: none of the branches
                         ((2, 16, 8, 4), (2, 8, 6, 6)),     # Hs >= Ht but Ws < Wt
                         ((2, 16, 8, 16), (2, 8, 4, 4))):   # stride 2 gives 4x8, not the teacher's 4x4
    case(f"ConvReg-{s_shape}-{t_shape}", lambda s_shape=s_shape, t_shape=t_shape: ConvReg(s_shape, t_shape),
         ValueError, "s_shape", str(s_shape), str(t_shape))
case("ConvReg-s_shape-rank3", lambda: ConvReg((16, 8, 8), (2, 8, 8, 8)), ValueError, "s_shape", "(16, 8, 8)")
case("ConvReg-t_shape-int", lambda: ConvReg((2, 16, 8, 8), 8), ValueError, "t_shape", "8")
case("ConvReg-t_shape-zero", lambda: ConvReg((2, 16, 8, 8), (2, 0, 8, 8)), ValueError, "t_shape", "(2, 0, 8, 8)")
convreg = ConvReg((2, 16, 8, 8), (2, 8, 8, 8))
case("ConvReg-input-channels", lambda: convreg(torch.randn(2, 12, 8, 8)), ValueError, "x", "(2, 12, 8, 8)")
lsq_s, lsq_t = torch.randn(2, 4, 2, 2), torch.randn(2, 3, 2, 2)
case("lsq-not-1x1", lambda: least_squares_init_(nn.Conv2d(4, 3, 3), [(lsq_s, lsq_t)]), TypeError, "regressor",
     "plain 1x1")
case("lsq-no-batches", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), []), ValueError, "batches")
case("lsq-not-a-pair", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), [(lsq_s,)]), TypeError, "batches[0]")
case("lsq-bare-tensor", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), lsq_s[:2]), TypeError, "batches", "tensor")
case("lsq-tensor-in-list", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), [lsq_s[:2]]), TypeError, "batches[0]")
case("lsq-channels", lambda: least_squares_init_(nn.Conv2d(5, 3, 1), [(lsq_s, lsq_t)]), ValueError, "s",
     "4 channels")
case("lsq-negative-alpha", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), [(lsq_s, lsq_t)], alpha=-1.0),
     ValueError, "alpha", "-1.0")
case("lsq-empty-batch", lambda: least_squares_init_(nn.Conv2d(4, 3, 1), [(lsq_s[:0], lsq_t[:0])]), ValueError,
     "s", "(0, 4, 2, 2)")

# ------------------------------------------------------------------ fskd.GramStats / solve / absorb


def stats_update(s_, t_, *args, **kw):
    return lambda: fskd.GramStats(*(args or (3,)), **kw).update(s_, t_)


r4 = torch.randn(2, 3, 5, 5)
case("GramStats-rank3", stats_update(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "s",
     "(N, C, H, W) or (N, C)", "(2, 3, 4)")
case("GramStats-s-channels", stats_update(torch.randn(2, 4, 5, 5), r4), ValueError, "s", "4 channels",
     "(2, 4, 5, 5)")
case("GramStats-t-channels", stats_update(r4, torch.randn(2, 4, 5, 5)), ValueError, "t", "4 channels")
case("GramStats-spatial", stats_update(r4, torch.randn(2, 3, 4, 5)), ValueError, "t", "same batch and spatial",
     "(2, 3, 4, 5)")
case("GramStats-batch", stats_update(r4, torch.randn(3, 3, 5, 5)), ValueError, "t", "same batch")
case("GramStats-device", stats_update(r4, torch.empty(2, 3, 5, 5, device=META)), ValueError, "t", "one device")
case("GramStats-stats-device", stats_update(r4, r4, device=META), ValueError, "s", "statistics live on meta")
case("GramStats-int-dtype", stats_update(torch.ones(2, 3, 4, 4, dtype=torch.long), torch.randn(2, 3, 4, 4)),
     TypeError, "s", "torch.int64")
case("GramStats-t-list", stats_update(r4, [1.0]), TypeError, "t", "list")
case("GramStats-zero-batch", stats_update(r4[:0], r4[:0]), ValueError, "s", "empty", "(0, 3, 5, 5)")
case("GramStats-zero-spatial", stats_update(r4[:, :, :0], r4[:, :, :0]), ValueError, "s", "empty", "(2, 3, 0, 5)")
case("GramStats-zero-rows-2d", stats_update(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "s", "(0, 3)")
case("GramStats-c_in-zero", lambda: fskd.GramStats(0), ValueError, "c_in", ">= 1")
case("GramStats-c_out-float", lambda: fskd.GramStats(3, 2.5), TypeError, "c_out", "float")


def _stats(cs=4, ct=3, m=20, seed=14):
    g = torch.Generator().manual_seed(seed)
    return fskd.GramStats(cs, ct).update(torch.randn(m, cs, generator=g, dtype=torch.float64),
                                         torch.randn(m, ct, generator=g, dtype=torch.float64))


st43 = _stats()
case("solve-identity-prior-widths", lambda: fskd.solve(st43), ValueError, "prior", "Cs=4, Ct=3")
case("solve-negative-alpha", lambda: fskd.solve(st43, alpha=-1.0, prior="zero"), ValueError, "alpha", "-1.0")
case("solve-alpha-str", lambda: fskd.solve(st43, alpha="big", prior="zero"), TypeError, "alpha", "str")
case("solve-prior", lambda: fskd.solve(st43, prior="eye"), ValueError, "prior", "'identity', 'zero'", "'eye'")
case("solve-no-samples", lambda: fskd.solve(fskd.GramStats(3)), ValueError, "block 0", "no samples")
case("solve-non-stats-element", lambda: fskd.solve([st43, torch.eye(3)], prior="zero"), TypeError, "stats[1]",
     "Tensor")
case("solve-tensor", lambda: fskd.solve(torch.eye(3)), TypeError, "stats", "Tensor")
case("solve-empty-list", lambda: fskd.solve([]), ValueError, "stats", "empty")
case("solve-names-length", lambda: fskd.solve(st43, prior="zero", names=["a", "b"]), ValueError, "names", "2")
case("solve-max-retries", lambda: fskd.solve(st43, prior="zero", max_retries=-1), ValueError, "max_retries")


def _on_meta():
    st = fskd.GramStats(4, 3, device=META)
    st.count = 20
    return st


case("solve-devices", lambda: fskd.solve([st43, _on_meta()], prior="zero"), ValueError, "stats", "one device")
conv433 = nn.Conv2d(3, 4, 3)
case("absorb-q-shape", lambda: fskd.absorb(conv433, torch.randn(4, 5)), ValueError, "q",
     "(P, 4)", "(4, 3, 3, 3)", "(4, 5)")
case("absorb-q-rank4", lambda: fskd.absorb(conv433, torch.randn(4, 4, 1, 1)), ValueError, "q", "(4, 4, 1, 1)")
case("absorb-q-int", lambda: fskd.absorb(conv433, torch.eye(4, dtype=torch.long)), TypeError, "q", "int64")
case("absorb-q-list", lambda: fskd.absorb(conv433, [[1.0]]), TypeError, "q", "list")
case("absorb-q-nan", lambda: fskd.absorb(conv433, torch.full((4, 4), float("nan"))), ValueError, "q", "NaN or inf")
case("absorb-bn-features", lambda: fskd.absorb(conv433, torch.eye(4), nn.BatchNorm2d(5)), ValueError, "bn",
     "5 features", "4 output channels")
case("absorb-bn-no-stats", lambda: fskd.absorb(conv433, torch.eye(4), nn.BatchNorm2d(4, track_running_stats=False)),
     ValueError, "bn", "no running statistics")
case("absorb-bn-type", lambda: fskd.absorb(conv433, torch.eye(4), nn.ReLU()), TypeError, "bn", "ReLU")
case("absorb-conv-linear", lambda: fskd.absorb(nn.Linear(3, 4), torch.eye(4)), TypeError, "conv", "Linear")
case("absorb-conv-transpose", lambda: fskd.absorb(nn.ConvTranspose2d(4, 4, 3), torch.eye(4)), TypeError, "conv",
     "ConvTranspose2d")


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / self.weight.std()
        return self._conv_forward(x, w, self.bias)


case("absorb-conv-overridden", lambda: fskd.absorb(StdConv(3, 4, 3), torch.eye(4)), TypeError, "conv",
     "StdConv overrides the convolution")
# fskd.distill: its argument checks need real student/teacher pairs: python_tests/test_fskd_distill.py


# ------------------------------------------------------------------ kdkernels.train
class Net(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.layer1 = nn.Conv2d(1, w, 3, padding=1)
        self.layer2 = nn.Conv2d(w, w, 3, padding=1)
        self.fc = nn.Linear(w, 5)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


sample = torch.randn(2, 1, 6, 6)


def kd_distiller(**kw):
    return lambda: train.KD(Net(2), Net(4), **kw)


def fitnets(**kw):
    return lambda: train.FitNets(Net(2), Net(4), "layer1", "layer1", sample, **kw)


def reviewkd(s_layers=("layer1", "layer2"), t_layers=("layer1", "layer2"), **kw):
    return lambda: train.ReviewKD(Net(2), Net(4), list(s_layers), list(t_layers), sample, **kw)


case("Distiller-student-not-module", lambda: train.KD(lambda x: x, Net(4)), TypeError, "student", "function")
case("Distiller-teacher-not-module", lambda: train.KD(Net(2), "resnet"), TypeError, "teacher", "str")
case("Distiller-same-module", lambda: train.KD(*[Net(2)] * 2), ValueError, "student and teacher")
case("KD-temperature-zero", kd_distiller(temperature=0.0), ValueError, "temperature", "0")
case("KD-temperature-str", kd_distiller(temperature="4"), TypeError, "temperature", "str")
case("KD-negative-kd-weight", kd_distiller(kd_weight=-1.0), ValueError, "kd_weight")
case("KD-ce-weight-none", kd_distiller(ce_weight=None), TypeError, "ce_weight", "NoneType")
case("FitNets-regressor", fitnets(regressor="mlp"), ValueError, "regressor", "'mlp'")
case("FitNets-temperature", fitnets(temperature=-3.0), ValueError, "temperature", "-3")
case("FitNets-kd-weight-triple", fitnets(kd_weight=(4.0, 2.0, 1.0)), ValueError, "kd_weight")
case("FitNets-negative-hint-weight", fitnets(hint_weight=-1.0), ValueError, "hint_weight")
case("FitNets-bad-layer", lambda: train.FitNets(Net(2), Net(4), "layr1", "layer1", sample), ValueError, "layr1")
case("ReviewKD-layer-counts", reviewkd(t_layers=("layer1",)), ValueError, "teacher_layers", "2 and 1")
case("ReviewKD-no-layers", reviewkd(s_layers=(), t_layers=()), ValueError, "student_layers")
case("ReviewKD-temperature", reviewkd(temperature=0), ValueError, "temperature")
case("ReviewKD-negative-warmup", reviewkd(warmup_epochs=-1), ValueError, "warmup_epochs")
case("SSKD-layer-counts", lambda: train.SSKD(Net(2), Net(4), ["layer1"], [], sample), ValueError,
     "teacher_layers", "1 and 0")
case("SSKD-feature-weight", lambda: train.SSKD(Net(2), Net(4), ["layer1"], ["layer1"], sample, feature_weight="x"),
     TypeError, "feature_weight", "str")
fskd_blocks = [("layer1", None, "layer1")]
case("FSKD-negative-alpha", lambda: train.FSKD(Net(2), Net(2), fskd_blocks, alpha=-1e-4), ValueError, "alpha")
case("FSKD-schedule", lambda: train.FSKD(Net(2), Net(2), fskd_blocks, schedule="paper"), ValueError, "schedule",
     "'paper'")
case("FSKD-num-samples", lambda: train.FSKD(Net(2), Net(2), fskd_blocks, num_samples=0), ValueError, "num_samples")
case("FeatureTaps-model", lambda: train.FeatureTaps("net", ["layer1"]), TypeError, "model", "str")
case("FeatureTaps-no-names", lambda: train.FeatureTaps(Net(2), []), ValueError, "names")
case("FeatureTaps-clone", lambda: train.FeatureTaps(Net(2), ["layer1"], clone="never"), ValueError, "clone")


def fit(**kw):
    d = train.KD(Net(2), Net(4))
    args = {"epochs": 1, "optimizer": torch.optim.SGD(d.parameters(), lr=0.1), "progress": False, **kw}
    return lambda: train.fit(d, [(sample, torch.tensor([0, 1]))], **args)


case("fit-epochs", fit(epochs=0), ValueError, "epochs", "0")
case("fit-amp", fit(amp="fp8"), ValueError, "amp", "'fp8'")
case("fit-scheduler-step", fit(scheduler_step="batch"), ValueError, "scheduler_step", "'batch'")
case("fit-no-optimizer", fit(optimizer=None), TypeError, "optimizer")


@pytest.mark.parametrize("call, exc, arg, fragments", CASES)
def test_bad_input_names_the_argument(call, exc, arg, fragments):
    with pytest.raises(exc, match=re.escape(arg)) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a CPU/CUDA mismatch needs CUDA tensors")
def test_cpu_cuda_mismatch_names_the_argument():
    cpu = a.cpu()
    with pytest.raises(ValueError, match=re.escape("fteacher[0]")):
        kdkernels.hcl_loss([a], [cpu])
    with pytest.raises(ValueError, match="logits_t"):
        kdkernels.kd_loss(s, s.cpu())
    with pytest.raises(ValueError, match="y"):
        kdkernels.abf_fuse(x, y.cpu(), w, bias2)
    with pytest.raises(ValueError, match="ft"):
        kdkernels.hint_loss(fs, ft.cpu(), hw, hb)


def test_non_string_backend_is_a_type_error():
    with pytest.raises(TypeError, match="backend"):
        kdkernels.hcl_loss(a, a, backend=3)
