"""The one place that calls the native entry points of ``kdkernels._C``, with checked arguments.

The entry points take raw data pointers, sizes and a dtype code, so a swapped
argument or a buffer allocated one float short does not raise: the kernel reads
or writes past the end of a tensor. :func:`call` builds every native call from
*named* tensors and sizes instead, checks each tensor against what the kernel
will touch, and passes the arguments to ``_C`` by keyword::

    call("kd_fwd_cpu", s.dtype, s=s, t=t, stats=stats, out=loss, rows=rows, cols=cols,
         inv_t=..., out_scale=..., reduce=...)

For every pointer argument the table below says the element dtype (the
dtype code's, ``IN``, or its accumulation dtype, ``ACC``) and how many elements
the kernel touches, from the sizes (e.g. KD's stats: rows x KD_STATS). Before
the call each tensor must be a tensor of that dtype, on the entry point's
device, contiguous (or, for a strided argument, laid out as its stride says),
and hold at least that many elements; optional pointers take None (a null
pointer: the kernel skips that output). Sizes must be ints >= 0. A wrong call
raises a ValueError or TypeError naming the entry point, the argument and the
shapes, before any memory is touched. The call then adds the thread count
(CPU) or, inside the tensors' device guard, the current stream (CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from ._common import DTYPE_CODE, acc_dtype, stream_of

KD_STATS = 6  # floats per row of the KD kernels' stats (csrc/common/kd.h, kKdStats)
KD_CUDA_PART = 5  # floats per row segment of the CUDA KD forward's scratch (csrc/common/kd.h, kKdCudaPart)

IN, ACC = "input", "accumulation"

Sizes = Mapping[str, int]


@dataclass(frozen=True)
class Ptr:
    """One pointer argument: its element dtype (IN or ACC) and the elements the kernel touches."""

    dtype: str
    extent: Callable[[Sizes], int]
    optional: bool = False
    strided: Optional[str] = None  # the entry point's stride argument; the builder passes t.stride(0) (0 for 0-dim)
    arg: Optional[str] = None  # the entry point's argument when it is not ``<name>_ptr``
    per_level: bool = False  # a list of tensors, one per level, each checked with its level's sizes


@dataclass(frozen=True)
class Entry:
    """One entry point: the device it serves, its pointer arguments (by name, without ``_ptr``),
    its integer sizes and its other scalars, all passed by keyword (ABF's weight and bias are
    ``weight`` and ``bias`` here: its ``w`` is the width of y)."""

    device: str
    ptrs: Dict[str, Ptr]
    sizes: Tuple[str, ...]
    scalars: Tuple[str, ...] = ()
    levels: bool = False  # every size is a list (one int per level, all of one length)


def _hcl(device: str, backward: bool) -> Entry:
    plane = lambda s: s["planes"] * s["H"] * s["W"]  # noqa: E731
    ptrs = {"fs": Ptr(IN, plane), "ft": Ptr(IN, plane)}
    if backward:
        ptrs.update(gout=Ptr(ACC, lambda s: 1), grad=Ptr(IN, plane))
    else:
        ptrs.update(partial=Ptr(ACC, lambda s: s["planes"]))
    return Entry(device, ptrs, ("planes", "H", "W"), ("coef_mse", "pools", "coefs"))


def hcl_saved_sums(planes, pools) -> int:
    """Bin sums the CPU forward saves for its backward: per level, planes x the bins of its
    pools (pool l has l x l; 21 for (4, 2, 1)); ``planes``, ``pools``: one entry per level."""
    return sum(p * sum(l * l for l in ls) for p, ls in zip(planes, pools))


def _hcl_levels(backward: bool) -> Entry:
    """The CPU entry points that take every level in one call: per level its fs, ft (and grad)
    tensors and its sizes; per level coef_mse, pools, coefs and scale (c0) as lists; one
    buffer of every plane's bin sums (the forward writes it, the backward reads it)."""
    plane = lambda s: s["planes"] * s["H"] * s["W"]  # noqa: E731
    ptrs = {"fs": Ptr(IN, plane, arg="fs_ptrs", per_level=True), "ft": Ptr(IN, plane, arg="ft_ptrs", per_level=True),
            "sums": Ptr(ACC, lambda s: hcl_saved_sums(s["planes"], s["pools"]))}
    if backward:
        ptrs.update(gout=Ptr(ACC, lambda s: 1), grad=Ptr(IN, plane, arg="grad_ptrs", per_level=True))
    else:
        ptrs.update(out=Ptr(ACC, lambda s: 1))
    return Entry("cpu", ptrs, ("planes", "H", "W"), ("coef_mse", "pools", "coefs", "scale"), levels=True)


def _abf(backward: bool) -> Entry:
    big = lambda s: s["N"] * s["C"] * s["H"] * s["W"]  # noqa: E731
    small = lambda s: s["N"] * s["C"] * s["h"] * s["w"]  # noqa: E731
    maps = lambda s: s["N"] * 2 * s["H"] * s["W"]  # noqa: E731
    weight = lambda s: 4 * s["C"]  # noqa: E731
    if backward:
        ptrs = {"g": Ptr(IN, big), "x": Ptr(IN, big), "y": Ptr(IN, small), "weight": Ptr(IN, weight, arg="w_ptr"),
                "z": Ptr(ACC, maps), "gx": Ptr(IN, big), "gy": Ptr(IN, small), "gw": Ptr(ACC, weight),
                "gb": Ptr(ACC, lambda s: 2)}
    else:
        ptrs = {"x": Ptr(IN, big), "y": Ptr(IN, small), "weight": Ptr(IN, weight, arg="w_ptr"),
                "bias": Ptr(IN, lambda s: 2, arg="b_ptr"),
                "out": Ptr(IN, big), "z": Ptr(ACC, maps)}
    return Entry("cpu", ptrs, ("N", "C", "H", "W", "h", "w"), ("scale_h", "scale_w"))


_logits = lambda s: s["rows"] * s["cols"]  # noqa: E731
_stats = lambda s: s["rows"] * KD_STATS  # noqa: E731
_per_row = lambda s: s["rows"]  # noqa: E731
_hint_fs = lambda s: s["N"] * s["Cs"] * s["P"]  # noqa: E731
_hint_ft = lambda s: s["N"] * s["Ct"] * s["P"]  # noqa: E731
_hint_w = lambda s: s["Ct"] * s["Cs"]  # noqa: E731
_hint_b = lambda s: s["Ct"]  # noqa: E731

ENTRIES: Dict[str, Entry] = {
    "hcl_loss_cpu": _hcl_levels(False),
    "hcl_loss_backward_cpu": _hcl_levels(True),
    "hcl_fwd_cuda": _hcl("cuda", False),
    "hcl_bwd_cuda": _hcl("cuda", True),
    "kd_fwd_cpu": Entry("cpu", {"s": Ptr(IN, _logits), "t": Ptr(IN, _logits), "stats": Ptr(ACC, _stats),
                                # the loss: one value per row, or the reduced 0-dim loss
                                "out": Ptr(ACC, lambda s: 1 if s["reduce"] else s["rows"])},
                        ("rows", "cols"), ("inv_t", "out_scale", "reduce")),
    "kd_bwd_cpu": Entry("cpu", {"s": Ptr(IN, _logits), "t": Ptr(IN, _logits), "stats": Ptr(ACC, _stats),
                                "gout": Ptr(ACC, _per_row, strided="gout_stride"),
                                "grad_s": Ptr(IN, _logits), "grad_t": Ptr(IN, _logits, optional=True)},
                        ("rows", "cols"), ("gout_scale", "inv_t")),
    # part: the segment states of rows cut into `split` segments (None when split is 1)
    "kd_fwd_cuda": Entry("cuda", {"s": Ptr(IN, _logits), "t": Ptr(IN, _logits), "stats": Ptr(ACC, _stats),
                                  "kl": Ptr(ACC, _per_row),
                                  "part": Ptr(ACC, lambda s: s["rows"] * s["split"] * KD_CUDA_PART, optional=True)},
                         ("rows", "cols", "split"), ("inv_t",)),
    "kd_bwd_cuda": Entry("cuda", {"s": Ptr(IN, _logits), "t": Ptr(IN, _logits), "stats": Ptr(ACC, _stats),
                                  "gscale": Ptr(ACC, _per_row), "grad_s": Ptr(IN, _logits),
                                  "grad_t": Ptr(IN, _logits, optional=True)}, ("rows", "cols"), ("inv_t",)),
    "hint_fwd_cpu": Entry("cpu", {"fs": Ptr(IN, _hint_fs), "ft": Ptr(IN, _hint_ft), "w": Ptr(IN, _hint_w),
                                  "b": Ptr(IN, _hint_b, optional=True), "loss": Ptr(ACC, lambda s: 1),
                                  "gfs": Ptr(IN, _hint_fs, optional=True), "gw": Ptr(ACC, _hint_w, optional=True),
                                  "gb": Ptr(ACC, _hint_b, optional=True), "gft": Ptr(IN, _hint_ft, optional=True)},
                          ("N", "Cs", "Ct", "P")),
    "abf_fwd_cpu": _abf(False),
    "abf_bwd_cpu": _abf(True),
}


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_size(entry: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{entry}: size {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{entry}: size {name} must be >= 0, got {value}")
    return value


def _pointer(entry: str, name: str, spec: Ptr, t, dtype: torch.dtype, device: Optional[torch.device],
             sizes: Sizes) -> Tuple[int, Optional[int]]:
    """(data pointer, stride or None) of ``t`` after checking it against ``spec``."""
    if t is None:
        if spec.optional:
            return 0, 0 if spec.strided else None
        raise ValueError(f"{entry}: {name} is required (only optional outputs may be None)")
    if not isinstance(t, Tensor):
        raise TypeError(f"{entry}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    want = dtype if spec.dtype == IN else acc_dtype(dtype)
    if t.dtype != want:
        raise TypeError(f"{entry}: {name} {_shape(t)} has dtype {t.dtype}, but the kernel reads it as {want} "
                        f"(the {spec.dtype} dtype of {dtype})")
    if device is not None and t.device != device:
        raise ValueError(f"{entry}: {name} {_shape(t)} is on {t.device}, but the call runs on {device}")
    need = spec.extent(sizes)
    stride = None
    if spec.strided:
        # a 0-dim or one-element tensor is read at stride 0 (the same value for every row)
        stride = t.stride(0) if t.dim() == 1 and t.numel() > 1 else 0
        if t.dim() > 1:
            raise ValueError(f"{entry}: {name} {_shape(t)} must be 0-dim or 1-D")
        if stride == 0:
            need = 1
    elif not t.is_contiguous():
        raise ValueError(f"{entry}: {name} {_shape(t)} with strides {t.stride()} is not contiguous; "
                         "the kernel reads it as a dense array")
    if t.numel() < need:
        shown = {k: v for k, v in sizes.items() if not isinstance(v, (list, float))}
        raise ValueError(f"{entry}: {name} {_shape(t)} holds {t.numel()} elements, but the kernel touches {need} "
                         f"(sizes {shown})")
    return t.data_ptr(), stride


def _check_levels(entry: str, spec: Entry, named) -> list:
    """The sizes of each level ({size: int}) of an entry whose sizes are per-level lists; every
    list (sizes and per-level tensors) must have one item per level."""
    count = None
    for name in (*spec.sizes, *(n for n, p in spec.ptrs.items() if p.per_level)):
        v = named[name]
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{entry}: {name} must be a list (one item per level), got {type(v).__name__}")
        if count is None:
            count = len(v)
        elif len(v) != count:
            raise ValueError(f"{entry}: {name} has {len(v)} items, but {spec.sizes[0]} has {count} (one per level)")
    for name in spec.sizes:
        for k, v in enumerate(named[name]):
            if type(v) is not int or v < 0:  # the common case in one test; _check_size words the error
                _check_size(entry, f"{name}[{k}]", v)
    return [{name: named[name][k] for name in spec.sizes} for k in range(count or 0)]


def _address(t, want: torch.dtype, device: Optional[torch.device], need: int) -> int:
    """``t``'s data pointer when it passes every check of a plain (not strided) pointer at once;
    0 when any check fails (or it is None, or empty), and :func:`_pointer` then says which."""
    if (isinstance(t, Tensor) and t.dtype == want and (device is None or t.device == device)
            and t.numel() >= need and t.is_contiguous()):
        return t.data_ptr()
    return 0


_NAMES = {name: frozenset(e.ptrs) | frozenset(e.sizes) | frozenset(e.scalars) for name, e in ENTRIES.items()}


def call(entry: str, dtype: torch.dtype, *, num_threads: Optional[int] = None, **named) -> None:
    """Check ``named`` (tensors by their pointer's name without ``_ptr``, sizes, scalars) against
    ``ENTRIES[entry]`` and call ``kdkernels._C.<entry>`` by keyword; ``dtype`` is the inputs' dtype.

    CPU entry points get ``num_threads`` (default ``torch.get_num_threads()``), CUDA ones the
    current stream of the tensors' device, inside that device's guard.

    Every pointer first takes one combined test (:func:`_address`); only a tensor that fails it
    goes through the step-by-step checks that word the error, so a valid call pays a few
    attribute reads per tensor (this runs on every step of every op).
    """
    spec = ENTRIES[entry]
    if dtype not in DTYPE_CODE:
        raise TypeError(f"{entry}: the native kernels take float32/float64/float16/bfloat16, got {dtype}")
    if named.keys() != _NAMES[entry]:
        missing, extra = sorted(_NAMES[entry] - named.keys()), sorted(named.keys() - _NAMES[entry])
        raise TypeError(f"{entry}: missing arguments {missing}, unexpected arguments {extra}")
    levels = _check_levels(entry, spec, named) if spec.levels else None
    if levels is None:
        for name in spec.sizes:
            _check_size(entry, name, named[name])
    device = None
    for name in spec.ptrs:
        t = named[name]
        if spec.ptrs[name].per_level and isinstance(t, (list, tuple)) and t:
            t = t[0]
        if isinstance(t, Tensor):
            device = t.device
            break
    if device is not None and device.type != spec.device:
        raise ValueError(f"{entry}: serves {spec.device} tensors, got tensors on {device}")
    kwargs = {name: named[name] for name in spec.sizes}
    kwargs.update((name, named[name]) for name in spec.scalars)
    sizes = kwargs  # extents read the sizes (and kd's reduce flag) from here
    wants = {IN: dtype, ACC: acc_dtype(dtype)}
    ptr_args = {"dtype": DTYPE_CODE[dtype]}
    for name, ptr in spec.ptrs.items():
        want = wants[ptr.dtype]
        if ptr.per_level:
            addresses = []
            for k, (t, level) in enumerate(zip(named[name], levels)):
                address = _address(t, want, device, ptr.extent(level))
                if not address:
                    address = _pointer(entry, f"{name}[{k}]", ptr, t, dtype, device, level)[0]
                addresses.append(address)
            ptr_args[ptr.arg or name + "_ptrs"] = addresses
            continue
        t = named[name]
        address = 0 if ptr.strided else _address(t, want, device, ptr.extent(sizes))
        if address:
            ptr_args[ptr.arg or name + "_ptr"] = address
            continue
        address, stride = _pointer(entry, name, ptr, t, dtype, device, sizes)
        ptr_args[ptr.arg or name + "_ptr"] = address
        if ptr.strided:
            ptr_args[ptr.strided] = stride
    kwargs.update(ptr_args)
    fn = getattr(_native.native(), entry)
    if spec.device == "cpu":
        fn(**kwargs, num_threads=torch.get_num_threads() if num_threads is None else num_threads)
        return
    with torch.cuda.device(device):
        fn(**kwargs, stream=stream_of(named[next(n for n in spec.ptrs if isinstance(named[n], Tensor))]))
