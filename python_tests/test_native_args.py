"""The checked native-argument builder (kdkernels/ops/_native_args.py) rejects a wrong call.

A native entry point takes raw pointers and sizes: a buffer one float short per
row, a transposed view or a tensor of the wrong dtype would be read or written
past its end. Each case below is such a call; the builder must raise a clear
error (naming the entry point and the argument) *before* any pointer reaches
``kdkernels._C``: ``_native.native`` is replaced by a stub that fails the test
if it is ever asked for the library, so no case can touch memory.
"""
from __future__ import annotations

import re

import pytest
import torch

from kdkernels import _native
from kdkernels.ops import _native_args
from kdkernels.ops._native_args import ENTRIES, KD_STATS, call


@pytest.fixture
def no_native(monkeypatch):
    def refuse():
        raise AssertionError("the builder reached kdkernels._C with arguments it should have rejected")

    monkeypatch.setattr(_native, "native", refuse)


def _kd_fwd(rows=8, cols=10, stats_width=KD_STATS, dtype=torch.float32, **over):
    s, t = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(s=s, t=t, stats=torch.empty(rows, stats_width, dtype=acc), out=torch.empty(rows, dtype=acc),
                rows=rows, cols=cols, inv_t=0.25, out_scale=1.0, reduce=False)
    args.update(over)
    return args


def test_kd_stats_one_float_short_per_row_is_rejected(no_native):
    """The stats layout grew from 5 to 6 floats per row; a caller still allocating 5 gets an error, not an overflow."""
    with pytest.raises(ValueError, match=r"kd_fwd_cpu: stats \(8, 5\) holds 40 elements, but the kernel touches 48"):
        call("kd_fwd_cpu", torch.float32, **_kd_fwd(stats_width=KD_STATS - 1))


def test_too_small_output_and_input_are_rejected(no_native):
    with pytest.raises(ValueError, match=re.escape("kd_fwd_cpu: out (7,)")):
        call("kd_fwd_cpu", torch.float32, **_kd_fwd(out=torch.empty(7)))
    args = _kd_fwd()
    with pytest.raises(ValueError, match=re.escape("kd_fwd_cpu: t (8, 9)")):
        call("kd_fwd_cpu", torch.float32, **dict(args, t=args["t"][:, :9]))
    # sizes that claim more than the tensors hold
    with pytest.raises(ValueError, match="kd_fwd_cpu: s .* touches 88"):
        call("kd_fwd_cpu", torch.float32, **dict(args, cols=11))


def test_non_contiguous_tensor_is_rejected(no_native):
    args = _kd_fwd(rows=10, cols=10)
    with pytest.raises(ValueError, match=r"kd_fwd_cpu: t \(10, 10\) with strides \(1, 10\) is not contiguous"):
        call("kd_fwd_cpu", torch.float32, **dict(args, t=args["t"].t()))


def test_wrong_dtype_is_rejected(no_native):
    args = _kd_fwd()
    with pytest.raises(TypeError, match=r"kd_fwd_cpu: t \(8, 10\) has dtype torch.float64, but the kernel reads it "
                                        r"as torch.float32"):
        call("kd_fwd_cpu", torch.float32, **dict(args, t=args["t"].double()))
    # fp16 logits accumulate in float32: fp16 stats are half the bytes the kernel writes
    args = _kd_fwd(dtype=torch.float16)
    with pytest.raises(TypeError, match="stats .* has dtype torch.float16, but the kernel reads it as torch.float32"):
        call("kd_fwd_cpu", torch.float16, **dict(args, stats=args["stats"].half()))
    with pytest.raises(TypeError, match="float32/float64/float16/bfloat16, got torch.int32"):
        call("kd_fwd_cpu", torch.int32, **_kd_fwd())


def test_wrong_device_and_mixed_devices_are_rejected(no_native):
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _kd_fwd().items()}
    with pytest.raises(ValueError, match="kd_fwd_cpu: serves cpu tensors, got tensors on meta"):
        call("kd_fwd_cpu", torch.float32, **meta)
    args = _kd_fwd()
    with pytest.raises(ValueError, match="kd_fwd_cpu: stats .* is on meta, but the call runs on cpu"):
        call("kd_fwd_cpu", torch.float32, **dict(args, stats=args["stats"].to("meta")))


def test_misnamed_missing_or_null_arguments_are_rejected(no_native):
    args = _kd_fwd()
    with pytest.raises(TypeError, match=r"missing arguments \['stats'\], unexpected arguments \['stat'\]"):
        call("kd_fwd_cpu", torch.float32, **dict({k: v for k, v in args.items() if k != "stats"},
                                                 stat=args["stats"]))
    with pytest.raises(ValueError, match="kd_fwd_cpu: stats is required"):
        call("kd_fwd_cpu", torch.float32, **dict(args, stats=None))
    with pytest.raises(TypeError, match="kd_fwd_cpu: size rows must be an int, got float"):
        call("kd_fwd_cpu", torch.float32, **dict(args, rows=8.0))
    with pytest.raises(ValueError, match="kd_fwd_cpu: size cols must be >= 0, got -1"):
        call("kd_fwd_cpu", torch.float32, **dict(args, cols=-1))


def test_strided_grad_output_is_checked(no_native):
    """kd_bwd_cpu reads grad_output at a stride: a 0-dim value, or one per row."""
    rows, cols = 6, 5
    base = dict(s=torch.randn(rows, cols), t=torch.randn(rows, cols), stats=torch.empty(rows, KD_STATS),
                gout_scale=1.0, grad_s=torch.empty(rows, cols), grad_t=None, rows=rows, cols=cols, inv_t=1.0)
    with pytest.raises(ValueError, match=re.escape("kd_bwd_cpu: gout (4,) holds 4 elements, but the kernel touches 6")):
        call("kd_bwd_cpu", torch.float32, **dict(base, gout=torch.ones(4)))
    with pytest.raises(ValueError, match=re.escape("kd_bwd_cpu: gout (6, 1) must be 0-dim or 1-D")):
        call("kd_bwd_cpu", torch.float32, **dict(base, gout=torch.ones(6, 1)))


def test_hint_and_abf_buffers_follow_their_sizes(no_native):
    n, cs, ct, p = 2, 3, 4, 5
    fs, ft = torch.randn(n, cs, p), torch.randn(n, ct, p)
    w, loss = torch.randn(ct, cs), torch.empty(1)
    # the weight gradient is in the accumulation dtype: float64 for float64 inputs
    with pytest.raises(TypeError, match=r"hint_fwd_cpu: gw \(4, 3\) has dtype torch.float32, but the kernel reads "
                                        r"it as torch.float64"):
        call("hint_fwd_cpu", torch.float64, fs=fs.double(), ft=ft.double(), w=w.double(), b=None, loss=loss.double(),
             gfs=None, gw=torch.empty(ct, cs), gb=None, gft=None, N=n, Cs=cs, Ct=ct, P=p)
    with pytest.raises(ValueError, match=re.escape("hint_fwd_cpu: gb (3,) holds 3 elements, but the kernel "
                                                   "touches 4")):
        call("hint_fwd_cpu", torch.float32, fs=fs, ft=ft, w=w, b=None, loss=loss, gfs=None, gw=None,
             gb=torch.empty(3), gft=None, N=n, Cs=cs, Ct=ct, P=p)
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    z = torch.empty(2, 2, 4, 4)
    with pytest.raises(ValueError, match=re.escape("abf_fwd_cpu: weight (2, 3) holds 6 elements, but the kernel "
                                                   "touches 12")):
        call("abf_fwd_cpu", torch.float32, x=x, y=y, weight=torch.randn(2, 3), bias=torch.randn(2),
             out=torch.empty_like(x), z=z, N=2, C=3, H=4, W=4, h=2, w=2, scale_h=0.5, scale_w=0.5)


def _signature(fn) -> list:
    first = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", first[first.index("(") + 1:])


def test_every_entry_matches_the_native_signature():
    """The table's names are exactly the entry points' keyword arguments (a renamed C++ argument fails here)."""
    mod = _native.native()
    if mod is None:
        pytest.skip(f"kdkernels._C did not load: {_native.load_error()}")
    for name, entry in ENTRIES.items():
        built = {"dtype", "num_threads" if entry.device == "cpu" else "stream", *entry.sizes, *entry.scalars}
        for key, ptr in entry.ptrs.items():
            built.add(ptr.arg or key + "_ptr")
            if ptr.strided:
                built.add(ptr.strided)
        assert set(_signature(getattr(mod, name))) == built, name


def test_a_right_call_runs():
    """The same arguments, well formed, run the kernel: the KD rows' KL against torch."""
    if _native.native() is None:
        pytest.skip(f"kdkernels._C did not load: {_native.load_error()}")
    args = _kd_fwd()
    call("kd_fwd_cpu", torch.float32, **args)
    z_s, z_t = args["s"] * 0.25, args["t"] * 0.25
    kl = (torch.softmax(z_t, 1) * (torch.log_softmax(z_t, 1) - torch.log_softmax(z_s, 1))).sum(1)
    torch.testing.assert_close(args["out"], kl, rtol=1e-5, atol=1e-6)
    assert _native_args.KD_STATS == 6


def _hcl_levels(shapes=((2, 3, 4, 4), (2, 5, 1, 1)), dtype=torch.float32):
    fs = [torch.randn(s, dtype=dtype) for s in shapes]
    ft = [torch.randn(s, dtype=dtype) for s in shapes]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(fs=fs, ft=ft, out=torch.empty((), dtype=acc), sums=torch.empty(6 * 5, dtype=acc),
                planes=[n * c for n, c, _, _ in shapes], H=[s[2] for s in shapes], W=[s[3] for s in shapes],
                coef_mse=[1.0] * len(shapes), pools=[[2, 1], []], coefs=[[1.0, 1.0], []], scale=[1.0, 1.0])


def test_hcl_every_level_call_checks_each_level(no_native):
    """hcl_loss_cpu takes per-level lists: each level's tensors are checked against that level's sizes."""
    args = _hcl_levels()
    with pytest.raises(ValueError, match=re.escape("hcl_loss_cpu: ft[1] (2, 4, 1, 1) holds 8 elements, but the "
                                                   "kernel touches 10")):
        call("hcl_loss_cpu", torch.float32, **dict(args, ft=[args["ft"][0], torch.randn(2, 4, 1, 1)]))
    with pytest.raises(ValueError, match="hcl_loss_cpu: H has 1 items, but planes has 2"):
        call("hcl_loss_cpu", torch.float32, **dict(args, H=[4]))
    with pytest.raises(ValueError, match="hcl_loss_cpu: fs has 1 items, but planes has 2"):
        call("hcl_loss_cpu", torch.float32, **dict(args, fs=args["fs"][:1]))
    with pytest.raises(TypeError, match="hcl_loss_cpu: W must be a list"):
        call("hcl_loss_cpu", torch.float32, **dict(args, W=4))
    with pytest.raises(TypeError, match=r"hcl_loss_cpu: fs\[0\] \(2, 3, 4, 4\) has dtype torch.float64"):
        call("hcl_loss_cpu", torch.float32, **dict(args, fs=[args["fs"][0].double(), args["fs"][1]]))
    with pytest.raises(ValueError, match=r"hcl_loss_cpu: ft\[0\] .* is not contiguous"):
        call("hcl_loss_cpu", torch.float32, **dict(args, ft=[args["ft"][0].transpose(2, 3), args["ft"][1]]))
    grads = [torch.empty_like(f) for f in args["fs"]]
    with pytest.raises(ValueError, match=re.escape("hcl_loss_backward_cpu: grad[0] (2, 3, 4, 3) holds 72 elements, but the kernel touches 96")):
        call("hcl_loss_backward_cpu", torch.float32, fs=args["fs"], ft=args["ft"], gout=torch.ones(1),
             sums=args["sums"],              grad=[grads[0][..., :3].contiguous(), grads[1]],
             **{k: args[k] for k in ("planes", "H", "W", "coef_mse", "pools", "coefs", "scale")})
    # the bin sums: 6 planes x (2 x 2 + 1 x 1) bins of the 4 x 4 level, none of the 1 x 1 level
    with pytest.raises(ValueError, match=re.escape("hcl_loss_cpu: sums (29,) holds 29 elements, but the kernel "
                                                   "touches 30")):
        call("hcl_loss_cpu", torch.float32, **dict(args, sums=torch.empty(29)))
    with pytest.raises(TypeError, match=re.escape("hcl_loss_backward_cpu: sums (30,) has dtype torch.float16")):
        call("hcl_loss_backward_cpu", torch.float16, fs=[f.half() for f in args["fs"]],
             ft=[f.half() for f in args["ft"]], gout=torch.ones(1), sums=args["sums"].half(),
             grad=[g.half() for g in grads], **{k: args[k] for k in ("planes", "H", "W", "coef_mse", "pools", "coefs",
                                                                     "scale")})
