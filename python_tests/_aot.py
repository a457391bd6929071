"""Compile kdkernels' Triton kernels for a GPU arch on a machine without a GPU.

The real launchers run, on CPU tensors, through the public ops with
``backend="triton"``; a stub driver reports the target (``GPUTarget("cuda",
arch, 32)``) and every kernel launch is turned into Triton's own warm-up
(compile, do not run). So what gets compiled is exactly what the launchers
choose: their block sizes, ``num_warps``, constexpr flags and the integer
specialisations of the shapes. The Triton wheel bundles ptxas, so each kernel
goes down to a cubin; ptxas's ``-v`` log gives registers and spills, Triton's
metadata the shared memory. Nothing is executed: the tensors' values are never
read (they are ``torch.empty``), and the outputs are garbage.

Run one group of cases for one arch in a fresh process (the compiler must not
be the interpreter; the process asserts it is not)::

    python python_tests/_aot.py --arch 90 --group hint > rows.json

``run_groups`` runs many (group, arch) jobs in parallel processes and returns
their rows; ``python python_tests/_aot.py --table OUT_DIR`` writes the
resource table (CSV and markdown) for every group on sm_80 and sm_90, and
``--cuda-table OUT_DIR`` the same for csrc/cuda through nvcc.

Which cases: ``GROUPS`` below. The shapes are the benchmark's (docs/spec.md,
"Shapes that real configurations use"), at the batch sizes of the CUDA
benchmark; the variants are every dtype, ``allow_tf32``, gradients on/off
(teacher's too) and every HCL level plan.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per-block shared-memory limit (opt-in maximum) and per-SM capacity, bytes
SMEM_PER_BLOCK = {80: 166_912, 90: 232_448}
SMEM_PER_SM = {80: 167_936, 90: 233_472}
SM_COUNT = {80: 108, 90: 132}  # A100, H100 SXM: the grid a launcher sizes from the SM count
MAX_SPILL = 256  # bytes; above this a row needs a written reason (SPILL_REASONS)
# (kernel name, key fragment) -> why its spills are accepted. Empty: none is.
SPILL_REASONS: Dict[Tuple[str, str], str] = {}
# Grids: at the benchmark shapes (BENCH_GROUPS) every launch has at least GRID_PER_SM programs
# per SM of the target (2 x 108 = 216 on sm_80, 2 x 132 = 264 on sm_90) unless the work cannot fill
# that many: (kernel name, case label prefix) -> why, with the numbers. A reason whose grids are all
# full again is stale and fails the tier (grid_problems).
GRID_PER_SM = 2
BENCH_GROUPS = ("hcl", "abf", "kd", "hint", "linear_kd")  # the groups that hold the benchmark shapes
_KD_ROWS = ("one program per row, 256 rows: 1.94 per SM of an H100 (sm_80's 216 is met). All are resident at "
            "once and each issues its whole row's loads, so each input is one DRAM round trip; rows cut in two "
            "give 512 programs with the same warps and bytes on the busiest SM (ceil(256/132) = 2 rows, "
            "ceil(512/132) = 4 halves)")
GRID_REASONS: Dict[Tuple[str, str], str] = {
    ("_kd_fwd_kernel", "kd 256x100 "): _KD_ROWS + " and a combine launch; at C = 100 a row is 1 warp, 100 KB "
                                                 "an input in all (0.03 us at 3.35 TB/s)",
    ("_kd_bwd_kernel", "kd 256x100 "): _KD_ROWS + "; at C = 100 a row is 1 warp, 100 KB an input in all",
    ("_kd_fwd_kernel", "kd 256x1000 "): _KD_ROWS + " and a combine launch; at C = 1,000 a row is 4 warps "
                                                  "(8 elements a lane), 1 MB an input in all (0.3 us at 3.35 TB/s)",
    ("_kd_bwd_kernel", "kd 256x1000 "): _KD_ROWS + " (2 warps each instead of 4); at C = 1,000, 1 MB an input",
    ("_kd_combine_kernel", "kd 64x"): "the merge of split rows: one 1-warp program per row, 64 rows, each "
                                      "merging its 16 segment states of 7 floats in a fixed order (28 KB in "
                                      "all); the forward before it has 64 x 16 = 1,024 programs",
    ("_sum_kernel", "hcl "): "HCL's final fixed-order sum of its forward's per-program partials: one 4-warp "
                             "program of 1,024 lanes over 2,049 (resnet56-resnet20, 8 KB) to 73,760 partials "
                             "(ResNet50-MobileNetV1, 295 KB, against the 772 MB that forward reads: 230 us at "
                             "3.35 TB/s); more programs in a fixed order need a second launch",
    ("_lkd_combine_kernel", "linear_kd N"): "the merge of a chunk's vocabulary segments: one 1-warp program per "
                                            "token, 128 tokens (V = 32,000) or 32 (V = 128,256), each merging "
                                            "its 250 / 501 segment states of 8 floats in a fixed order: 1.0 MB / "
                                            "513 KB in all (0.3 / 0.15 us of HBM at 3.35 TB/s) against the "
                                            "chunk forward's 33.6 GFLOP (34 us at 990 TFLOP/s bf16); cutting a "
                                            "token's merge across programs needs a second merge launch",
    ("_lkd_finish_kernel", "linear_kd N"): "the batch's final fixed-order sum of its N loss rows, CE rows and "
                                           "kept-row flags after the last chunk: one 4-warp program over 128 or "
                                           "32 rows here, 9 B a row (74 KB at N = 8,192: 0.02 us at 3.35 TB/s); "
                                           "more programs in a fixed order need a second launch",
}
# csrc/cuda: (demangled kernel name, arch) -> why it may spill at all. Empty: any spill of a
# csrc/cuda kernel fails the tier (nvcc's kernels are few and hand-written; none needs to spill).
CUDA_SPILL_REASONS: Dict[Tuple[str, int], str] = {}


# ----------------------------------------------------------------- the cases
def _t(shape, dtype, grad=False):
    import torch

    t = torch.empty(shape, dtype=dtype)
    return t.requires_grad_() if grad else t


def _backward(loss):
    if loss.requires_grad:
        loss.backward()


def _hcl(levels, batch, dtype, grad=True):
    import kdkernels

    fs = [_t((batch, c, h, h), dtype, grad) for c, h in levels]
    ft = [_t((batch, c, h, h), dtype) for c, h in levels]
    _backward(kdkernels.hcl_loss(fs, ft, backend="triton"))


def _abf(batch, mid, H, h, dtype, grad=True):
    import kdkernels

    x, y = _t((batch, mid, H, H), dtype, grad), _t((batch, mid, h, h), dtype, grad)
    w, b = _t((2, 2 * mid, 1, 1), dtype, grad), _t((2,), dtype, grad)
    out = kdkernels.abf_fuse(x, y, w, b, backend="triton")
    if grad:
        out.backward(_t(out.shape, dtype))


def _kd(n, c, dtype, grad=True, teacher=False):
    import kdkernels

    _backward(kdkernels.kd_loss(_t((n, c), dtype, grad), _t((n, c), dtype, teacher), backend="triton"))


def _hint(n, cs, ct, hw, dtype, grad=True, teacher=False, bias=True, tf32=False):
    import kdkernels

    fs, ft = _t((n, cs, hw, hw), dtype, grad), _t((n, ct, hw, hw), dtype, teacher)
    w = _t((ct, cs, 1, 1), dtype, grad)
    b = _t((ct,), dtype, grad) if bias else None
    _backward(kdkernels.hint_loss(fs, ft, w, b, allow_tf32=tf32, backend="triton"))


def _lkd(n, v, d, dtype, teacher=False, ce=False, chunk=None):
    import torch

    import kdkernels

    hs, ws = _t((n, d), dtype, True), _t((v, d), dtype, True)
    ht, wt = _t((n, d), dtype, teacher), _t((v, d), dtype, teacher)
    labels = torch.zeros(n, dtype=torch.long) if ce else None
    _backward(kdkernels.linear_kd_loss(hs, ws, ht, wt, temperature=2.0, labels=labels, ce_weight=0.5 if ce else 0.0,
                                       ignore_index=-100 if ce else None, chunk=chunk, backend="triton"))


def _gpu_chunk(v):
    """Tokens per chunk that linear_kd_loss picks on a GPU for a V-entry vocabulary (N >= it)."""
    from kdkernels.ops.linear_kd import default_chunk

    return default_chunk(1 << 20, v, "cuda")


def _dtypes():
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


# HCL levels (C, H) of the benchmark pairs, shallow to deep
HCL_PAIRS = {
    "resnet56-resnet20": ([(16, 32), (32, 16), (64, 8), (64, 1)], 64),
    "resnet32x4-resnet8x4": ([(64, 32), (128, 16), (256, 8), (256, 1)], 64),
    "wrn_40_2-wrn_16_2": ([(32, 32), (64, 16), (128, 8), (128, 1)], 64),
    "ResNet34-ResNet18": ([(64, 56), (128, 28), (256, 14), (512, 7), (512, 1)], 64),
    "ResNet50-MobileNetV1": ([(256, 56), (512, 28), (1024, 14), (2048, 7), (2048, 1)], 64),
}
# every level plan: H = 1, 2, 3, 4 (pools up to H), 5 and more (4, 2, 1); odd sizes
HCL_PLANS = [(8, 1), (8, 2), (8, 3), (8, 4), (8, 5), (8, 7), (8, 14), (8, 28), (8, 56)]
HCL_TAILS = [(3, 7), (3, 14), (5, 1)]  # (C, H) at batch 1: the flat layout's scalar tail
ABF_LEVELS = {  # (mid, H, h) at batch 64
    "resnet32x4-resnet8x4": [(256, 8, 1), (256, 16, 8), (256, 32, 16)],
    "ResNet34-ResNet18": [(512, 7, 1), (512, 14, 7), (512, 28, 14), (512, 56, 28)],
}
KD_SHAPES = [(256, 100), (256, 1000), (64, 32000), (64, 128256)]
HINT_SHAPES = [(64, 128, 128, 16), (64, 32, 32, 16), (64, 64, 64, 16), (64, 256, 256, 8)]
# linear KD (benchmarks/cases/linear_kd.py): N = 2,048 / 8,192 tokens, V = 32,000 / 128,256, D = 2,048,
# fp32 and bf16. Every chunk of _gpu_chunk(V) tokens (128 / 32; N is a multiple) launches the same
# kernels on the same grids, so one chunk stands for N. D = 256 compiles the same kernels as 2,048
# (an integer argument is specialised only on divisibility by 16) and keeps the chunk's two CPU GEMMs
# (dh, dw: torch ops that run for real on the CPU tensors here) small.
LKD_VOCABS = (32000, 128256)
HINT_CAP_SHAPES = [(64, 512, 512, 7)]


def _cases() -> Dict[str, List[Tuple[str, Callable[[], None]]]]:
    """group -> [(case label, thunk)]. The first group of each op holds its
    benchmark shapes at the default fp32 training configuration."""
    dt = _dtypes()
    g: Dict[str, List[Tuple[str, Callable[[], None]]]] = {}
    g["hcl"] = [(f"hcl {k} b{b} fp32", (lambda lv=lv, b=b: _hcl(lv, b, dt["fp32"]))) for k, (lv, b) in HCL_PAIRS.items()]
    g["hcl-variants"] = [(f"hcl plans {d}", (lambda d=d: _hcl(HCL_PLANS, 2, dt[d]))) for d in dt]
    g["hcl-variants"] += [("hcl plans fp32 no grad", lambda: _hcl(HCL_PLANS, 2, dt["fp32"], grad=False)),
                          # element counts that are not a multiple of 4 (TAIL: 3 planes of 7 x 7, 5 of 1 x 1)
                          ("hcl tails fp32", lambda: _hcl(HCL_TAILS, 1, dt["fp32"]))]
    g["abf"] = [(f"abf {k} b64 {m}x{H}^2<-{h}^2 fp32", (lambda m=m, H=H, h=h: _abf(64, m, H, h, dt["fp32"])))
                for k, lv in ABF_LEVELS.items() for m, H, h in lv]
    g["abf-variants"] = [(f"abf {d}", (lambda d=d: _abf(2, 256, 16, 8, dt[d]))) for d in dt if d != "fp32"]
    g["abf-variants"] += [("abf fp32 no grad", lambda: _abf(2, 256, 16, 8, dt["fp32"], grad=False)),
                          # grad_y's masked candidate walk (MODE 0): no integer factor between 15 and 7
                          ("abf fp32 15^2<-7^2", lambda: _abf(2, 256, 15, 7, dt["fp32"]))]
    g["kd"] = [(f"kd {n}x{c} fp32", (lambda n=n, c=c: _kd(n, c, dt["fp32"]))) for n, c in KD_SHAPES]
    g["kd-variants"] = [(f"kd {n}x{c} {d}{' teacher grad' if tg else ''}",
                         (lambda n=n, c=c, d=d, tg=tg: _kd(n, c, dt[d], teacher=tg)))
                        for n, c in KD_SHAPES for d in dt for tg in (False, True) if (d, tg) != ("fp32", False)]
    g["kd-variants"] += [("kd 256x1000 fp32 no grad", lambda: _kd(256, 1000, dt["fp32"], grad=False))]
    g["hint"] = [(f"hint {n}x{cs}x{hw}^2->{ct} fp32", (lambda a=(n, cs, ct, hw): _hint(*a, dt["fp32"])))
                 for n, cs, ct, hw in HINT_SHAPES]
    # past the weight-gradient partials' cap (_MAX_PARTIAL: 32 pixel groups of 512 x 512): ResNet34's layer 4
    g["hint"] += [(f"hint {n}x{cs}x{hw}^2->{ct} fp32 past the partial cap",
                   (lambda a=(n, cs, ct, hw): _hint(*a, dt["fp32"]))) for n, cs, ct, hw in HINT_CAP_SHAPES]
    g["hint-tf32"] = [(f"hint {n}x{cs}x{hw}^2->{ct} fp32 allow_tf32",
                       (lambda a=(n, cs, ct, hw): _hint(*a, dt["fp32"], tf32=True))) for n, cs, ct, hw in HINT_SHAPES]
    g["hint-fp64"] = [("hint 64x128x16^2->128 fp64", lambda: _hint(64, 128, 128, 16, dt["fp64"])),
                      ("hint 64x256x8^2->256 fp64", lambda: _hint(64, 256, 256, 8, dt["fp64"]))]
    g["hint-variants"] = [(f"hint 64x128x16^2->128 {d}", (lambda d=d: _hint(64, 128, 128, 16, dt[d])))
                          for d in ("fp16", "bf16")]
    g["hint-variants"] += [
        ("hint 64x128x16^2->128 fp32 teacher grad", lambda: _hint(64, 128, 128, 16, dt["fp32"], teacher=True)),
        ("hint 64x128x16^2->128 fp32 no bias", lambda: _hint(64, 128, 128, 16, dt["fp32"], bias=False)),
        ("hint 64x128x16^2->128 fp32 no grad", lambda: _hint(64, 128, 128, 16, dt["fp32"], grad=False)),
        ("hint 64x128x16^2->128 bf16 teacher grad", lambda: _hint(64, 128, 128, 16, dt["bf16"], teacher=True)),
        ("hint 64x256x8^2->256 bf16", lambda: _hint(64, 256, 256, 8, dt["bf16"])),
    ]
    g["linear_kd"] = [(f"linear_kd N2048/8192 V{v} D2048 {d}: one {_gpu_chunk(v)}-token chunk, D 256",
                       (lambda v=v, d=d: _lkd(_gpu_chunk(v), v, 256, dt[d], chunk=_gpu_chunk(v))))
                      for v in LKD_VOCABS for d in ("fp32", "bf16")]
    # the variants: the tiles do not depend on N, V, D, so small shapes
    g["linear_kd-variants"] = [
        (f"linear_kd 128x4096x256 {d}{' teacher grad' if tg else ''}{' +ce' if ce else ''}",
         (lambda d=d, tg=tg, ce=ce: _lkd(128, 4096, 256, dt[d], teacher=tg, ce=ce)))
        for d, tg, ce in (("fp32", False, False), ("bf16", False, False), ("fp16", False, True),
                          ("fp32", True, True), ("fp64", False, False))]
    return g


GROUPS = ("hcl", "hcl-variants", "abf", "abf-variants", "kd", "kd-variants", "hint", "hint-tf32", "hint-fp64",
          "hint-variants", "linear_kd", "linear_kd-variants")


# ------------------------------------------------------- compile, not launch
_PTXAS = re.compile(r"Compiling entry function '([^']+)'")
# tensor-core instructions in the PTX: mma.sync (sm_80 on, also TF32 and fp64) and wgmma (sm_90)
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\.")
# global loads and stores in the PTX: ld.global[.qualifiers][.vN].TYPE (e.g. ld.global.v4.b32,
# ld.global.L1::evict_last.b32, st.global.v2.b64); atom/red are not counted
_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def global_widths(ptx: str) -> Dict[str, Dict[int, int]]:
    """{"ld": {bits: count}, "st": {bits: count}} of the global load/store instructions in a
    kernel's PTX, bits being the width of one instruction (vector length x element bits:
    ld.global.v4.b32 -> 128, ld.global.b32 -> 32, st.global.v2.b64 -> 128). Static counts
    (instructions in the code), not executions."""
    out: Dict[str, Dict[int, int]] = {"ld": {}, "st": {}}
    for op, quals in _GLOBAL.findall(ptx):
        parts = quals.split(".")[1:]
        vec = next((int(q[1:]) for q in parts if re.fullmatch(r"v\d", q)), 1)
        bits = next((int(q[1:]) for q in reversed(parts) if re.fullmatch(r"[bfsu]\d+", q)), None)
        if bits is None:
            continue
        out[op][vec * bits] = out[op].get(vec * bits, 0) + 1
    return out


def format_widths(w: Dict[str, Dict]) -> str:
    """"ld 128b:8 32b:1; st 128b:4" (widest first), the table's "global" column."""
    def one(d):
        return " ".join(f"{b}b:{n}" for b, n in sorted(((int(b), n) for b, n in d.items()), reverse=True)) or "-"
    return f"ld {one(w.get('ld', {}))}; st {one(w.get('st', {}))}"


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, spill stores/loads and stack frame from a ``ptxas -v`` log (one kernel)."""
    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else 0
    return {"regs": num(r"Used (\d+) registers"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def blocks_per_sm(arch: int, regs: int, warps: int, smem: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in 256s), warps and shared memory."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_warps = 64 // warps
    by_smem = SMEM_PER_SM[arch] // (smem + 1024) if smem else 32  # 1 KB per block is reserved
    return max(0, min(32, by_regs, by_warps, by_smem))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost on an
    idle machine, where wall time on a shared one is not."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _install(arch: int, records: List[dict]) -> None:
    """Stub driver for ``arch`` and a launch hook that compiles instead of launching."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver
    import triton.backends.nvidia.compiler as nvc

    class StubUtils:  # what a launcher may ask the driver about "its" GPU
        def get_device_properties(self, device):
            return {"multiprocessor_count": SM_COUNT[arch], "max_shared_mem": SMEM_PER_BLOCK[arch],
                    "max_num_regs": 65536, "warpSize": 32}

    class StubDriver:
        utils = StubUtils()

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

    driver.set_active(StubDriver())

    logs: List[str] = []

    class _Subprocess:  # Triton's ptxas call with its stderr log kept for us
        def __getattr__(self, name):
            return getattr(subprocess, name)

        def run(self, cmd, *args, **kwargs):
            res = subprocess.run(cmd, *args, **kwargs)
            err = kwargs.get("stderr")
            if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(err, "name"):
                with open(err.name) as f:
                    logs.append(f.read())
            return res

    nvc.subprocess = _Subprocess()

    compiled: Dict[int, Tuple[float, str]] = {}
    orig_compile = jit.JITFunction._do_compile
    orig_run = jit.JITFunction.run

    def do_compile(self, *args, **kwargs):
        logs.clear()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        kernel = orig_compile(self, *args, **kwargs)
        compiled[id(kernel)] = (time.perf_counter() - t0, "\n".join(logs), _cpu_seconds() - c0)
        return kernel

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        if callable(grid):
            grid = ("callable",)
        grid = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        seconds, log, cpu = compiled.pop(id(kernel), (None, None, None))
        md = kernel.metadata
        constexprs = {p.name: str(kwargs.get(p.name)) for p in self.params if p.is_constexpr}
        rec = {"kernel": self.fn.__name__, "grid": list(grid), "num_warps": md.num_warps,
               "num_stages": md.num_stages, "smem": md.shared, "constexprs": constexprs,
               "first_compile": seconds is not None, "compile_s": seconds, "compile_cpu_s": cpu,
               "hash": kernel.hash, "mma": len(_MMA.findall(kernel.asm.get("ptx", ""))),
               "global": global_widths(kernel.asm.get("ptx", ""))}
        if log is not None:
            rec.update(parse_ptxas(log))
            rec["ptxas_log_seen"] = bool(_PTXAS.search(log))
        records.append(rec)
        return kernel

    jit.JITFunction._do_compile = do_compile
    jit.JITFunction.run = run


def compile_group(group: str, arch: int) -> List[dict]:
    """In this process: compile every case of ``group`` for sm_``arch``; one row per launch."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the compile tier must not run the interpreter"
    sys.path.insert(0, ROOT)
    import torch
    import triton

    records: List[dict] = []
    _install(arch, records)
    import kdkernels
    from kdkernels import backends

    backends.triton_interpret = lambda: True  # let the ops hand CPU tensors to the Triton launchers
    torch.set_num_threads(1)
    rows = []
    for label, thunk in _cases()[group]:
        start = len(records)
        error = None
        t0 = time.perf_counter()
        try:
            thunk()
        except Exception as exc:  # reported as a row: the test fails on it with the message
            error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        wall = time.perf_counter() - t0
        for rec in records[start:]:
            rec.update(case=label, group=group, arch=arch, triton=triton.__version__)
            rec["blocks_per_sm"] = blocks_per_sm(arch, rec.get("regs", 0), rec["num_warps"], rec["smem"])
            rows.append(rec)
        if error is not None:
            rows.append({"case": label, "group": group, "arch": arch, "triton": triton.__version__,
                         "kernel": "?", "error": error})
        rows.append({"case": label, "group": group, "arch": arch, "triton": triton.__version__,
                     "kernel": "(case)", "case_s": wall})
    return rows


def run_groups(jobs: List[Tuple[str, int]], python: str = sys.executable, workers: int = 2,
               timeout: float = 900, fresh_cache: bool = True) -> List[dict]:
    """Run each (group, arch) in its own clean process (no TRITON_INTERPRET; a fresh Triton
    cache unless ``fresh_cache`` is False), ``workers`` at a time; return all rows."""
    drop = ("TRITON_INTERPRET", "TRITON_CACHE_DIR") if fresh_cache else ("TRITON_INTERPRET",)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT

    def one(job):
        group, arch = job
        with tempfile.TemporaryDirectory(prefix="kdk-aot-") as cache:
            proc = subprocess.run([python, os.path.abspath(__file__), "--group", group, "--arch", str(arch)],
                                  env=dict(env, TRITON_CACHE_DIR=cache) if fresh_cache else env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return [{"case": f"process {group} sm_{arch}", "group": group, "arch": arch, "kernel": "?",
                     "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(workers) as pool:
        return [row for rows in pool.map(one, jobs) for row in rows]


# ------------------------------------------------------------- csrc/cuda, nvcc
def nvcc_flags() -> List[str]:
    """setup.py's NVCC_FLAGS, read from its source (importing setup.py would run the build)."""
    import ast

    src = open(os.path.join(ROOT, "setup.py")).read()
    m = re.search(r"^NVCC_FLAGS = (\[.*?\])$", src, re.S | re.M)
    return ast.literal_eval(m.group(1))


def parse_nvcc_log(log: str) -> List[dict]:
    """One row per kernel of an ``nvcc -Xptxas -v`` log: name (demangled), arch, registers, spills, smem."""
    rows = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", block)
        if not m:
            continue
        row = {"mangled": m.group(1), "arch": int(m.group(2)[3:]), **parse_ptxas(block)}
        sm = re.search(r"(\d+) bytes smem", block)
        row["smem"] = int(sm.group(1)) if sm else 0
        rows.append(row)
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if rows else []
    for r, name in zip(rows, names):
        name = re.sub(r"^void |\(anonymous namespace\)::", "", name)
        r["kernel"] = name.split("(")[0]
    return rows


def compile_cuda(source: str, arch: int, nvcc: str = "nvcc") -> Tuple[int, str, List[dict]]:
    """Compile one csrc/cuda file for sm_``arch`` with the build's flags and ``-Xptxas -v``:
    (return code, log, one row per kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *nvcc_flags(), f"-arch=sm_{arch}", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
               "-c", os.path.join(ROOT, source), "-o", os.path.join(tmp, "k.o")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    rows = parse_nvcc_log(log)
    for r in rows:
        r.update(source=source, file_compile_s=round(seconds, 1))
    return proc.returncode, log, rows


# Threads per block of each csrc/cuda kernel as its launcher uses it (the KD forward: at most).
CUDA_BLOCK_THREADS = {"hcl_fwd_kernel": 256, "hcl_bwd_kernel": 256, "kd_fwd_kernel": 256, "kd_bwd_kernel": 256,
                      "kd_combine_kernel": 128}
CUDA_COLUMNS = ["nvcc", "arch", "source", "kernel", "threads", "regs", "spill_st", "spill_ld", "stack", "smem",
                "blocks_per_sm"]


def cuda_sources() -> List[str]:
    return sorted(f"csrc/cuda/{f}" for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))


def write_cuda_table(out_dir: str, archs=(80, 90), nvcc: str = "nvcc") -> List[dict]:
    """Compile every csrc/cuda file for each arch; write resources-cuda-nvcc-<release>.{csv,md}."""
    release = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                              text=True).stdout).group(1)
    rows = []
    for source in cuda_sources():
        for arch in archs:
            rc, log, rs = compile_cuda(source, arch, nvcc)
            if rc:
                raise RuntimeError(f"{source} sm_{arch} does not compile:\n{log[-3000:]}")
            rows += rs
    out = []
    for r in sorted(rows, key=lambda r: (r["arch"], r["source"], r["kernel"])):
        base = r["kernel"].split("::")[-1].split("<")[0]
        threads = CUDA_BLOCK_THREADS.get(base, 256)
        out.append(dict(r, nvcc=release, threads=threads,
                        blocks_per_sm=blocks_per_sm(r["arch"], r["regs"], threads // 32, r["smem"])))
    os.makedirs(out_dir, exist_ok=True)
    tag = f"resources-cuda-nvcc-{release}"
    with open(os.path.join(out_dir, tag + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CUDA_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    with open(os.path.join(out_dir, tag + ".md"), "w") as f:
        f.write("| " + " | ".join(CUDA_COLUMNS) + " |\n|" + "---|" * len(CUDA_COLUMNS) + "\n")
        for r in out:
            f.write("| " + " | ".join(str(r[c]) for c in CUDA_COLUMNS) + " |\n")
    return out


def cuda_problems(rows: List[dict]) -> List[str]:
    """csrc/cuda rows (parse_nvcc_log): any spill without a CUDA_SPILL_REASONS entry, shared memory
    over the arch's per-block limit."""
    out = []
    for r in rows:
        where = f"{r.get('source', '?')} sm_{r['arch']} {r['kernel']}"
        spill = max(r.get("spill_st", 0), r.get("spill_ld", 0))
        if spill and (r["kernel"], r["arch"]) not in CUDA_SPILL_REASONS:
            out.append(f"{where}: {r['regs']} registers, {r['spill_st']} B spill stores / {r['spill_ld']} B loads "
                       "(no reason written in CUDA_SPILL_REASONS)")
        if r["smem"] > SMEM_PER_BLOCK[r["arch"]]:
            out.append(f"{where}: {r['smem']} B shared memory > {SMEM_PER_BLOCK[r['arch']]} B per block")
    return out


# -------------------------------------------------------------- checks, table
def problems(rows: List[dict]) -> List[str]:
    """Compile errors, shared memory over the arch's per-block limit, unexplained spills."""
    out = []
    for r in rows:
        where = f"{r['case']} sm_{r['arch']} {r['kernel']}"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif not r["kernel"].startswith("("):
            if r["smem"] > SMEM_PER_BLOCK[r["arch"]]:
                out.append(f"{where}: {r['smem']} B shared memory > {SMEM_PER_BLOCK[r['arch']]} B per block")
            spill = max(r.get("spill_st", 0), r.get("spill_ld", 0))
            if spill > MAX_SPILL and not any(k == r["kernel"] and frag in r["case"] for k, frag in SPILL_REASONS):
                out.append(f"{where}: {spill} B of register spills (> {MAX_SPILL} B, no reason written)")
    return out


def grid_problems(rows: List[dict], skip: Tuple[str, ...] = ()) -> List[str]:
    """Launches at the benchmark shapes (groups in BENCH_GROUPS) with fewer than GRID_PER_SM
    programs per SM of the target and no GRID_REASONS entry (kernel name, and a prefix of the
    case label); and, from the sm_90 rows (the higher floor), stale reasons: an entry all of
    whose launches reach the floor. Kernels whose names start with one of ``skip`` are left out."""
    out = []
    short_of: Dict[Tuple[str, str], List[bool]] = {}
    for r in rows:
        if r["group"] not in BENCH_GROUPS or "error" in r or r["kernel"].startswith(("(", "?") + tuple(skip)):
            continue
        progs, floor = math.prod(r["grid"]), GRID_PER_SM * SM_COUNT[r["arch"]]
        keys = [k for k in GRID_REASONS if k[0] == r["kernel"] and r["case"].startswith(k[1])]
        if r["arch"] == 90:
            for k in keys:
                short_of.setdefault(k, []).append(progs < floor)
        if progs < floor and not keys:
            out.append(f"{r['case']} sm_{r['arch']} {r['kernel']}: grid {'x'.join(str(g) for g in r['grid'])} = "
                       f"{progs} programs < {floor} ({GRID_PER_SM} per SM), no reason written in GRID_REASONS")
    out += [f"GRID_REASONS[{k}]: every sm_90 launch it covers has >= {GRID_PER_SM * SM_COUNT[90]} programs now "
            "(a stale reason)" for k, short in short_of.items() if not any(short)]
    return out


COLUMNS = ["triton", "arch", "group", "case", "kernel", "constexprs", "num_warps", "num_stages", "grid",
           "global", "regs", "spill_st", "spill_ld", "stack", "smem", "blocks_per_sm", "compile_s", "compile_cpu_s"]


def table_rows(rows: List[dict]) -> List[dict]:
    """One row per compiled kernel (its first launch), errors kept."""
    out = []
    for r in rows:
        if r["kernel"].startswith("(") or not (r.get("first_compile") or "error" in r):
            continue
        row = {c: r.get(c, "") for c in COLUMNS}
        row["grid"] = "x".join(str(g) for g in r.get("grid", []))
        row["global"] = format_widths(r["global"]) if "global" in r else ""
        row["constexprs"] = " ".join(f"{k}={v}" for k, v in sorted(r.get("constexprs", {}).items())
                                     if k.startswith(("BLOCK", "NPOOL", "ACC", "PREC", "SINGLE", "NEED", "TEACHER",
                                                      "FINAL", "HAS", "DOT", "ONE_PASS", "MODE", "FLAT",
                                                      "TAIL", "VEC")))
        if "error" in r:
            row["kernel"] = "ERROR " + r["error"][:200].replace("\n", " ")
        for c in ("compile_s", "compile_cpu_s"):
            if isinstance(row[c], float):
                row[c] = f"{row[c]:.2f}"
        out.append(row)
    return out


def write_table(rows: List[dict], out_dir: str, tag: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    trs = table_rows(rows)
    with open(os.path.join(out_dir, f"resources-{tag}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(trs)
    with open(os.path.join(out_dir, f"resources-{tag}.md"), "w") as f:
        f.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        for r in trs:
            f.write("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n")


def summary(rows: List[dict]) -> str:
    """Markdown: per kernel x arch x Triton version, the worst case over its compiled
    configurations; and per op the compile seconds of its first training step."""
    kern: Dict[tuple, List[dict]] = {}
    launches: Dict[tuple, List[dict]] = {}  # every launch, cached compiles too: the grids
    for r in rows:
        if not r["kernel"].startswith(("(", "?")) and "error" not in r:
            launches.setdefault((r["kernel"], r["arch"], r["triton"]), []).append(r)
            if r.get("first_compile"):
                kern.setdefault((r["kernel"], r["arch"], r["triton"]), []).append(r)
    out = ["| kernel | arch | Triton | configs | registers | spills (B) | shared mem (B) | blocks/SM | "
           "programs at the benchmark shapes | grids |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (k, a, t), rs in sorted(kern.items()):
        bench = [r for r in launches[(k, a, t)] if r["group"] in BENCH_GROUPS]
        grids = sorted({"x".join(str(g) for g in r["grid"] if g > 1) or "1" for r in bench})
        progs = sorted(math.prod(r["grid"]) for r in bench)
        progs_s = f"{progs[0]}-{progs[-1]}" if progs else "-"
        regs = sorted(r["regs"] for r in rs)
        out.append(f"| {k} | sm_{a} | {t} | {len(rs)} | {regs[0]}-{regs[-1]} | "
                   f"{max(max(r['spill_st'], r['spill_ld']) for r in rs)} | {max(r['smem'] for r in rs)} | "
                   f"{min(r['blocks_per_sm'] for r in rs)}-{max(r['blocks_per_sm'] for r in rs)} | {progs_s} | "
                   f"{', '.join(grids[:6])}{' ...' if len(grids) > 6 else ''} |")
    out += ["", "| op | arch | Triton | first training step: kernels compiled | compile wall s (sum) | "
            "compile CPU s (sum) | case |", "|---|---|---|---|---|---|---|"]
    for op in BENCH_GROUPS:
        for a in sorted({r["arch"] for r in rows}):
            for t in sorted({r["triton"] for r in rows if "triton" in r}):
                first = [r for r in rows if r["group"] == op and r["arch"] == a and r.get("triton") == t
                         and not r["kernel"].startswith(("(", "?"))]
                if not first:
                    continue
                case = first[0]["case"]
                ks = [r for r in first if r["case"] == case and r.get("first_compile")]
                cpu = [r.get("compile_cpu_s") for r in ks]
                cpu_s = f"{sum(cpu):.1f}" if cpu and None not in cpu else "n/a"
                out.append(f"| {op} | sm_{a} | {t} | {len(ks)} | {sum(r['compile_s'] for r in ks):.1f} | {cpu_s} "
                           f"| {case} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group", choices=GROUPS)
    ap.add_argument("--arch", type=int, choices=(80, 90))
    ap.add_argument("--table", metavar="OUT_DIR", help="compile every group for sm_80 and sm_90, write the table")
    ap.add_argument("--warm", type=int, choices=(80, 90), metavar="ARCH",
                    help="compile every group for ARCH into the usual Triton cache (a GPU machine's warm-up)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", help="with --table: comma-separated groups (default: all)")
    ap.add_argument("--archs", default="80,90", help="with --table: comma-separated archs")
    ap.add_argument("--cuda-table", metavar="OUT_DIR",
                    help="compile csrc/cuda with nvcc for sm_80 and sm_90, write resources-cuda-nvcc-<release>.*")
    args = ap.parse_args()
    if args.cuda_table:
        rows = write_cuda_table(args.cuda_table, tuple(int(a) for a in args.archs.split(",")))
        for p in cuda_problems(rows):
            print("PROBLEM", p)
        print(f"{len(rows)} csrc/cuda kernels compiled")
        return
    if args.warm:
        t0 = time.perf_counter()
        rows = run_groups([(g, args.warm) for g in GROUPS], workers=args.workers, fresh_cache=False)
        for p in problems(rows):
            print("PROBLEM", p)
        print(f"warmed: {len(table_rows(rows))} kernels for sm_{args.warm} in {time.perf_counter() - t0:.0f} s")
        return
    if args.table:
        import triton

        t0 = time.perf_counter()
        groups = args.groups.split(",") if args.groups else GROUPS
        os.makedirs(args.table, exist_ok=True)
        rows = run_groups([(g, int(a)) for a in args.archs.split(",") for g in groups], workers=args.workers)
        with open(os.path.join(args.table, f"rows-triton-{triton.__version__}.json"), "w") as f:
            json.dump(rows, f)
        write_table(rows, args.table, f"triton-{triton.__version__}")
        with open(os.path.join(args.table, f"summary-triton-{triton.__version__}.md"), "w") as f:
            f.write(summary(rows))
        for p in problems(rows):
            print("PROBLEM", p)
        print(f"{len(table_rows(rows))} kernels compiled in {time.perf_counter() - t0:.0f} s")
        return
    t0 = time.perf_counter()
    rows = compile_group(args.group, args.arch)
    cpu = _cpu_seconds()
    rows.append({"case": "(job)", "group": args.group, "arch": args.arch, "kernel": "(job)",
                 "cpu_s": round(cpu, 1), "wall_s": round(time.perf_counter() - t0, 1)})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
