"""H100 roofline floors of the benchmark cases: minimum bytes, FLOPs, and the time they imply.

For each case of the GPU plan (``benchmarks/cases/<op>.py``, ``CUDA_PLAN``) this
computes, per forward and per backward (the backward with the gradients the
benchmark asks for):

* bytes: what any implementation must move through HBM (read every input once,
  write every output once; nothing recomputed, no intermediate stored);
* FLOPs: the arithmetic of the op's math (multiply-add = 2 FLOPs; exp, sigmoid,
  log count as one);
* floor = max(bytes / HBM bandwidth, FLOPs / peak of the unit the op runs on).

H100 SXM figures: 3.35 TB/s HBM3; 67 TFLOP/s fp32 and fp64 on CUDA cores (the
elementwise ops and the fp32 "ieee" GEMMs), ~400 TFLOP/s TF32 and ~990 TFLOP/s
bf16 on the tensor cores (dense). A measured GPU time divided by the floor is
the efficiency the GPU run reports against.

Usage: ``python benchmarks/roofline.py`` prints the table; ``rows()`` returns it.
The case shape lists are read from ``benchmarks/cases`` (not modified).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

HBM = 3.35e12      # bytes/s
FP32 = 67e12       # FLOP/s, CUDA cores (fp64 the same on H100 SXM)
TF32 = 400e12      # FLOP/s, tensor cores
BF16 = 990e12      # FLOP/s, tensor cores

_ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@dataclass
class Row:
    op: str
    case: str
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float
    flops_bwd: float
    peak: float          # FLOP/s of the unit the FLOPs run on
    peak_name: str

    def floor(self, nbytes: float, flops: float) -> Tuple[float, str]:
        mem, comp = nbytes / HBM, flops / self.peak
        return max(mem, comp), ("memory" if mem >= comp else self.peak_name)

    @property
    def fwd(self) -> Tuple[float, str]:
        return self.floor(self.bytes_fwd, self.flops_fwd)

    @property
    def bwd(self) -> Tuple[float, str]:
        return self.floor(self.bytes_bwd, self.flops_bwd)


def _dtype_name(dtype) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
            "torch.float64": "fp64"}.get(str(dtype), str(dtype))


def hcl(levels: Sequence[Tuple[int, int, int]], batch: int, dtype: str) -> Tuple[float, float, float, float]:
    """(bytes fwd, bytes bwd, FLOPs fwd, FLOPs bwd) of hcl_loss over levels (C, H, W).

    Forward reads fs and ft; backward reads them again and writes grad fs (the
    teacher has no gradient). Per element: d = fs - ft, d^2 accumulated (3 FLOPs)
    and one add into each of up to three pool bins; the backward adds the three
    scattered bin terms and scales (about 5)."""
    es = _ESIZE[dtype]
    elems = sum(batch * c * h * w for c, h, w in levels)
    return 2 * elems * es, 3 * elems * es, 6 * elems, 8 * elems


def abf(batch: int, mid: int, H: int, h: int, dtype: str) -> Tuple[float, float, float, float]:
    """abf_fuse of x (N, mid, H, H) with y (N, mid, h, h).

    Forward: read x, y; write out (the saved attention maps, 2/mid of out, are
    not counted). Two logits of 2*mid MACs and out = x z0 + u z1 (3 FLOPs) per
    channel and pixel: ~11 FLOPs per element of x. Backward: read grad_out, x, y;
    write grad_x, grad_y; s0, s1 (4), grad_x (5), grad_w (8), grad_u (5) per
    element: ~22."""
    es = _ESIZE[dtype]
    big, small = batch * mid * H * H, batch * mid * h * h
    return (2 * big + small) * es, (3 * big + 2 * small) * es, 11 * big, 22 * big


def kd(rows: int, classes: int, dtype: str) -> Tuple[float, float, float, float]:
    """kd_loss of (rows, classes) logits. Forward: read both logits; two exps, the
    online max/sum updates and the KL term: ~10 FLOPs per class. Backward: read
    both, write grad_s; two exps and the difference: ~8."""
    es = _ESIZE[dtype]
    n = rows * classes
    return 2 * n * es, 3 * n * es, 10 * n, 8 * n


def hint(batch: int, cs: int, ct: int, h: int, w: int, dtype: str) -> Tuple[float, float, float, float]:
    """hint_loss through a 1x1 regressor. The fused op computes the loss and every
    gradient in its forward: three GEMMs of Q = N*H*W by Cs by Ct (r = W fs,
    W^T r, r fs^T), 6*Q*Cs*Ct FLOPs; it reads fs, ft (and W), writes grad fs and
    grad W. The backward only scales the stored gradients (counted as 0 here)."""
    es = _ESIZE[dtype]
    q = batch * h * w
    nbytes = (q * (2 * cs + ct) + 2 * ct * cs) * es
    return nbytes, 0.0, 6.0 * q * cs * ct, 0.0


def _cases_module(op: str):
    import importlib
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    # as benchmarks/run.py: an installed kdkernels, else this checkout
    if importlib.util.find_spec("kdkernels") is None:
        sys.path.append(os.path.dirname(here))
    return importlib.import_module(f"cases.{op}")


def _hcl_rows() -> List[Row]:
    m = _cases_module("hcl")
    out = []
    for pair, batch, dtype in m.CUDA_PLAN:
        d = _dtype_name(dtype)
        out.append(Row("hcl", f"{pair} b{batch} {d}", *hcl(m.PAIRS[pair], batch, d), FP32, "fp32"))
    return out


def _abf_rows() -> List[Row]:
    m = _cases_module("abf")
    out = []
    for label, batch in m.CUDA_PLAN:
        for mid, H, h in m.LEVELS[label]:
            out.append(Row("abf", f"{label} b{batch} {H}²←{h}² fp32", *abf(batch, mid, H, h, "fp32"), FP32, "fp32"))
    return out


def _kd_rows() -> List[Row]:
    m = _cases_module("kd")
    out = []
    for rows, classes, dtype in m.CUDA_PLAN:
        d = _dtype_name(dtype)
        out.append(Row("kd", f"{m.LABEL.get(classes, classes)} {rows}×{classes} {d}", *kd(rows, classes, d),
                       FP32, "fp32"))
    return out


def _hint_rows() -> List[Row]:
    m = _cases_module("hint")
    out = []
    for label, batch, cs, ct, h, w, dtype in m.PLAN + m.CUDA_EXTRA:
        d = _dtype_name(dtype)
        sizes = hint(batch, cs, ct, h, w, d)
        if d == "fp32":  # the fp32 GEMMs: full precision on CUDA cores, or TF32 on tensor cores
            out.append(Row("hint", f"{label} b{batch} {cs}→{ct} {h}² fp32 ieee", *sizes, FP32, "fp32"))
            out.append(Row("hint", f"{label} b{batch} {cs}→{ct} {h}² fp32 tf32", *sizes, TF32, "tf32"))
        else:
            out.append(Row("hint", f"{label} b{batch} {cs}→{ct} {h}² {d}", *sizes, BF16, d))
    return out


BUILDERS: Dict[str, Callable[[], List[Row]]] = {
    "hcl": _hcl_rows, "abf": _abf_rows, "kd": _kd_rows, "hint": _hint_rows}


def rows(ops: Sequence[str] = tuple(BUILDERS)) -> List[Row]:
    """The table's rows for ``ops`` (default: every op with a single-op roofline)."""
    out: List[Row] = []
    for op in ops:
        out.extend(BUILDERS[op]())
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.1f} MB" if b else "-"


def _fmt_flops(f: float) -> str:
    return f"{f / 1e9:.2f} GF" if f else "-"


def _fmt_time(t: Tuple[float, str]) -> str:
    return f"{t[0] * 1e6:.1f} µs ({t[1]})" if t[0] else "-"


def table(rs: Sequence[Row]) -> str:
    """Markdown table: op, case, bytes, FLOPs and floors, forward and backward."""
    lines = ["| op | case | bytes fwd | bytes bwd | FLOPs fwd | FLOPs bwd | floor fwd | floor bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r.op} | {r.case} | {_fmt_bytes(r.bytes_fwd)} | {_fmt_bytes(r.bytes_bwd)} | "
                     f"{_fmt_flops(r.flops_fwd)} | {_fmt_flops(r.flops_bwd)} | {_fmt_time(r.fwd)} | "
                     f"{_fmt_time(r.bwd)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"H100 roofline floors (HBM {HBM / 1e12:.2f} TB/s; fp32 {FP32 / 1e12:.0f}, TF32 {TF32 / 1e12:.0f}, "
          f"bf16 {BF16 / 1e12:.0f} TFLOP/s)")
    print(table(rows()))
