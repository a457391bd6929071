"""The GPU path proven without a GPU: every kernel compiled for sm_80 and sm_90.

Triton: the real launchers run through the public ops on CPU tensors, with a
stub driver for the target arch and every launch turned into a compile
(python_tests/_aot.py). Each (group, arch) job runs in its own process with
TRITON_INTERPRET unset and a fresh Triton cache, so the real compiler runs
(the conftest switches the interpreter on for the rest of the suite; the rows
carry ptxas's log, which the interpreter never produces). Checked per kernel:
it compiles, its shared memory fits one block of the arch (sm_80 166,912 B,
sm_90 232,448 B), and it spills at most 256 B unless _aot.SPILL_REASONS says
why; at the benchmark shapes each launch has at least two programs per SM of
the target unless _aot.GRID_REASONS says why the work cannot fill them.
csrc/cuda: every .cu file through nvcc with the build's flags and
``-Xptxas -v``: the same shared-memory limit, and no spill at all unless
_aot.CUDA_SPILL_REASONS says why (it is empty).

Which configurations run where (environment variables):

- ``KDKERNELS_AOT_GROUPS``: comma-separated groups of _aot.GROUPS, or ``all``
  (default). ``hcl``, ``abf``, ``kd``, ``hint`` hold the benchmark shapes at
  the default fp32 training configuration, ``linear_kd`` one GPU chunk of the
  benchmark's vocabularies in fp32 and bf16; ``*-variants`` every dtype,
  gradients on/off (the teacher's too), the HCL level plans; ``hint-tf32``
  ``allow_tf32=True`` at the benchmark shapes.
- ``KDKERNELS_AOT_ARCHS``: ``80,90`` (default).
- ``KDKERNELS_AOT_SKIP``: ``group:arch`` pairs left out, e.g. ``hcl-variants:80``.
- ``KDKERNELS_AOT_WORKERS``: parallel compile processes (default 2).
- ``KDKERNELS_AOT=0`` skips the tier, ``KDKERNELS_AOT_CUDA=0`` its nvcc part
  (each skip prints why).
- ``KDKERNELS_AOT_TABLE=DIR`` also writes the resource table and its summary there.

CI (.ci/run) runs every group on both archs with the newest Triton (the
test extra) except the HCL variants on sm_80 (35 kernels, a quarter of the
tier's CPU time; the HCL kernels use no tensor cores and at most 10 KB of
shared memory, so sm_90 shows what sm_80 would), and on Triton 3.6 (the
oldest supported, the GPU image's) the groups where the two versions differed:
the hint kernel (every dtype, allow_tf32, fp64), KD's and ABF's benchmark shapes.
Measured CPU seconds per (group, arch) job are 8-30 (hcl-variants: ~110);
two at a time on the 2-core CI machine that is about 3.5 minutes for the
newest Triton plus ~1 minute of nvcc, and ~2 minutes for Triton 3.6 with its
venv (estimates from CPU seconds measured on a shared machine).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest

import _aot

ARCHS = [int(a) for a in os.environ.get("KDKERNELS_AOT_ARCHS", "80,90").split(",") if a]
_groups = os.environ.get("KDKERNELS_AOT_GROUPS", "all")
GROUPS = list(_aot.GROUPS) if _groups == "all" else [g for g in _groups.split(",") if g]
_SKIP = {j for j in os.environ.get("KDKERNELS_AOT_SKIP", "").split(",") if j}  # "group:arch" pairs
JOBS = [(g, a) for a in ARCHS for g in GROUPS if f"{g}:{a}" not in _SKIP]


def _triton_nvidia_missing():
    if os.environ.get("KDKERNELS_AOT", "1") == "0":
        return "KDKERNELS_AOT=0"
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia.compiler as nvc
    except Exception as exc:  # e.g. macOS: no triton wheel
        return f"triton with its NVIDIA backend is not importable ({type(exc).__name__}: {exc})"
    if not os.path.exists(nvc.get_ptxas(80).path):
        return "the triton wheel has no bundled ptxas"
    return None


def _skip_if_no_triton():
    why = _triton_nvidia_missing()
    if why:
        pytest.skip(f"compile tier skipped: {why}")


@pytest.fixture(scope="session")
def aot_rows():
    """All rows of all selected jobs, compiled in parallel clean processes (once per session)."""
    _skip_if_no_triton()
    bad = sorted(set(GROUPS) - set(_aot.GROUPS))
    assert not bad, f"KDKERNELS_AOT_GROUPS names unknown groups {bad}; known: {_aot.GROUPS}"
    workers = int(os.environ.get("KDKERNELS_AOT_WORKERS", "2"))
    rows = _aot.run_groups(JOBS, workers=workers)
    table = os.environ.get("KDKERNELS_AOT_TABLE")
    if table:
        import triton

        _aot.write_table(rows, table, f"triton-{triton.__version__}")
        with open(os.path.join(table, f"summary-triton-{triton.__version__}.md"), "w") as f:
            f.write(_aot.summary(rows))
    return rows


def _rows_of(rows, group, arch):
    return [r for r in rows if r["group"] == group and r["arch"] == arch]


# ------------------------------------------------ pure helpers (always run)
PTXAS_LOG = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    1032 bytes stack frame, 1200 bytes spill stores, 1100 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]
"""


def test_parse_ptxas():
    assert _aot.parse_ptxas(PTXAS_LOG) == {"regs": 255, "spill_st": 1200, "spill_ld": 1100, "stack": 1032}


# what Triton's PTX looks like: loads and stores inside predicated inline asm, cache qualifiers,
# and instructions that are not global loads/stores (param, shared, atomics)
PTX_SNIPPET = """
	// begin inline asm
	mov.u32 %r1, 0x0;
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	// end inline asm
	@%p2 ld.global.b32 { %r5 }, [ %rd2 + 0 ];
	@%p2 ld.global.L1::evict_last.v2.b64 { %rd7, %rd8 }, [ %rd3 + 0 ];
	ld.param.u64 %rd1, [k_param_0];
	ld.shared.f32 %f1, [%r9];
	@%p3 st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
	st.global.b16 [ %rd5 + 0 ], { %rs1 };
	atom.global.add.f32 %f2, [%rd6], %f1;
	red.global.add.f32 [%rd6], %f1;
"""


def test_global_widths():
    w = _aot.global_widths(PTX_SNIPPET)
    assert w == {"ld": {128: 2, 32: 1}, "st": {128: 1, 16: 1}}
    assert _aot.format_widths(w) == "ld 128b:2 32b:1; st 128b:1 16b:1"
    assert _aot.format_widths({"ld": {"32": 3}, "st": {}}) == "ld 32b:3; st -"  # JSON keys are strings
    assert _aot.global_widths("ld.param.u32 %r1, [k_param_1];") == {"ld": {}, "st": {}}


def test_blocks_per_sm():
    # 255 registers x 256 threads: 65,536 / (256 regs per thread-warp rounded) -> 1 block
    assert _aot.blocks_per_sm(80, 255, 8, 0) == 1
    # 32 registers, 4 warps: by warps 16, by registers 16
    assert _aot.blocks_per_sm(90, 32, 4, 0) == 16
    # shared memory: 100 KB per block leaves room for one block on an A100, two on an H100
    assert _aot.blocks_per_sm(80, 32, 4, 100_000) == 1
    assert _aot.blocks_per_sm(90, 32, 4, 100_000) == 2
    assert _aot.blocks_per_sm(80, 32, 1, 0) == 32


def test_cuda_problems_flag_any_spill():
    row = {"source": "k.cu", "arch": 90, "kernel": "kdk::k<double>", "regs": 64, "spill_st": 8, "spill_ld": 8,
           "smem": 0}
    assert any("spill" in p for p in _aot.cuda_problems([row]))  # 8 B: small, still a failure
    assert _aot.cuda_problems([dict(row, spill_st=0, spill_ld=0)]) == []
    assert any("shared memory" in p for p in _aot.cuda_problems([dict(row, spill_st=0, spill_ld=0, smem=240_000)]))


def test_grid_problems(monkeypatch):
    row = {"case": "kd 256x100 fp32", "group": "kd", "arch": 90, "kernel": "_kd_fwd_kernel", "grid": [256, 1, 1]}
    monkeypatch.setattr(_aot, "GRID_REASONS", {})
    assert any("256 programs < 264" in p for p in _aot.grid_problems([row]))
    assert _aot.grid_problems([dict(row, arch=80)]) == []  # 216 on sm_80
    assert _aot.grid_problems([dict(row, grid=[264, 1, 1])]) == []
    assert _aot.grid_problems([dict(row, group="kd-variants")]) == []  # not a benchmark shape
    assert _aot.grid_problems([dict(row, kernel="_hint_fused_kernel")], skip=("_hint_",)) == []
    monkeypatch.setattr(_aot, "GRID_REASONS", {("_kd_fwd_kernel", "kd 256x100 "): "why"})
    assert _aot.grid_problems([row]) == []
    assert _aot.grid_problems([dict(row, case="kd 256x1000 fp32")]) != []  # a prefix of the label
    stale = _aot.grid_problems([dict(row, grid=[256, 2, 1])])
    assert len(stale) == 1 and "stale" in stale[0]


def test_problems_flags_limits():
    row = {"case": "c", "arch": 80, "kernel": "k", "smem": 196_608, "spill_st": 0, "spill_ld": 0}
    assert any("shared memory" in p for p in _aot.problems([row]))
    row = dict(row, smem=0, spill_st=1200)
    assert any("spills" in p for p in _aot.problems([row]))
    assert _aot.problems([dict(row, spill_st=0)]) == []


# ------------------------------------------------------------- the compiles
@pytest.mark.parametrize("group,arch", JOBS, ids=[f"{g}-sm{a}" for g, a in JOBS])
def test_triton_kernels_compile(aot_rows, group, arch):
    """Every kernel the launchers pick for the group's cases compiles for the arch, fits its
    shared memory, and does not spill (beyond 256 B with no reason)."""
    rows = _rows_of(aot_rows, group, arch)
    kernels = [r for r in rows if not r["kernel"].startswith(("(", "?"))]
    problems = _aot.problems(rows)
    assert not problems, "\n".join(problems)
    assert kernels, f"{group} on sm_{arch} launched no Triton kernel"
    first = [r for r in kernels if r["first_compile"]]
    assert first, f"{group} on sm_{arch}: every kernel came from a cache; nothing was compiled"
    # the real compiler ran (not the interpreter): ptxas wrote its log for each compile
    assert all(r.get("ptxas_log_seen") for r in first), [r["kernel"] for r in first if not r.get("ptxas_log_seen")]
    assert all(r["regs"] > 0 for r in first)


def _need(group, arch=None):
    if group not in GROUPS:
        pytest.skip(f"group {group} is not selected (KDKERNELS_AOT_GROUPS={_groups})")
    if arch is not None and f"{group}:{arch}" in _SKIP:
        pytest.skip(f"{group} on sm_{arch} is left out (KDKERNELS_AOT_SKIP)")


@pytest.mark.parametrize("arch", ARCHS)
def test_hint_float64_compiles(aot_rows, arch):
    """fp64 hint: tl.dot with a float64 accumulator must name out_dtype (Triton 3.6 asserts)."""
    _need("hint-fp64")
    rows = _rows_of(aot_rows, "hint-fp64", arch)
    assert rows and not [r.get("error") for r in rows if "error" in r], [r.get("error") for r in rows]
    assert any(r["kernel"] == "_hint_fused_kernel" for r in rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_hint_tf32_fits_shared_memory(aot_rows, arch):
    """allow_tf32 at every benchmark hint shape fits one block's shared memory on the arch."""
    _need("hint-tf32")
    rows = [r for r in _rows_of(aot_rows, "hint-tf32", arch) if r["kernel"] == "_hint_fused_kernel"]
    assert rows
    over = [(r["case"], r["smem"]) for r in rows if r["smem"] > _aot.SMEM_PER_BLOCK[arch]]
    assert not over, f"over {_aot.SMEM_PER_BLOCK[arch]} B: {over}"


HINT_GROUPS = ("hint", "hint-tf32", "hint-fp64", "hint-variants")


def _hint_rows(rows, arch):
    return [r for r in rows if r["group"] in HINT_GROUPS and r["arch"] == arch and r["kernel"].startswith("_hint")
            and r.get("first_compile")]


@pytest.mark.parametrize("arch", ARCHS)
def test_hint_kernels_do_not_spill(aot_rows, arch):
    """Every hint kernel (the fused pass, the reduction, the backward's scaling) at the
    configuration its launcher picks for every case: no register spills at all, with
    either Triton version (64-pixel tiles on 8 warps spilled 20-44 B with Triton 3.6)."""
    if not any(g in GROUPS for g in HINT_GROUPS):
        pytest.skip(f"no hint group selected (KDKERNELS_AOT_GROUPS={_groups})")
    rows = _hint_rows(aot_rows, arch)
    assert rows
    spilled = [(r["case"], r["kernel"], r["regs"], r["spill_st"], r["spill_ld"]) for r in rows
               if max(r["spill_st"], r["spill_ld"]) > 0]
    assert not spilled, spilled


def _hint_shape(case):
    """(N*H*W, Cs, Ct) of a hint case label "hint NxCSxHW^2->CT ..."."""
    lhs, ct = case.split()[1].split("->")
    n, cs, hw = lhs.split("^")[0].split("x")
    return int(n) * int(hw) ** 2, int(cs), int(ct)


def _hint_work_units(case):
    """What "the work allows" means for the fused kernel: a program takes at least one
    32-pixel tile and one chunk of 64 teacher channels (all of them when Ct <= 64), so
    there are at most ceil(N*H*W / 32) * ceil(Ct / 64) programs."""
    q, _, ct = _hint_shape(case)
    return -(-q // 32) * -(-ct // 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_hint_grid_fills_the_gpu(aot_rows, arch):
    """At every benchmark shape (and past the weight-gradient partials' cap) each hint kernel
    launches at least two programs per SM of the target wherever the work allows: the fused
    pass min(2 x SMs, its work units: 32-pixel tiles x 64-channel chunks of Ct); the reduction
    min(2 x SMs, ceil(Ct*Cs / 32): its weight-gradient columns in blocks of 32); the backward's
    scaling min(2 x SMs, ceil(numel / 1024)) over the gradients it scales. One program per
    pixel tile gave 128 programs at 64 x 256 x 8^2 -> 256 (of 264 on sm_90, 216 on sm_80) and
    25 at 64 x 512 x 7^2 -> 512 (past the cap: 4 tiles per program)."""
    _need("hint")
    want = 2 * _aot.SM_COUNT[arch]
    rows = [r for r in _rows_of(aot_rows, "hint", arch)
            if r["kernel"].startswith("_hint") or r["kernel"] == "_scale_grads_kernel"]
    assert {r["kernel"] for r in rows} >= {"_hint_fused_kernel", "_hint_reduce_kernel", "_scale_grads_kernel"}
    assert any("past the partial cap" in r["case"] for r in rows)
    short = []
    for r in rows:
        q, cs, ct = _hint_shape(r["case"])
        allows = {"_hint_fused_kernel": _hint_work_units(r["case"]), "_hint_reduce_kernel": -(-ct * cs // 32),
                  "_scale_grads_kernel": -(-(q * cs + ct * cs + ct) // 1024)}[r["kernel"]]
        if math.prod(r["grid"]) < min(want, allows):
            short.append((r["case"], r["kernel"], r["grid"], min(want, allows)))
    assert not short, short


@pytest.mark.parametrize("arch", ARCHS)
def test_hint_tensor_cores(aot_rows, arch):
    """fp16/bf16 and TF32 products compile to tensor-core instructions (mma.sync, sm_90 also
    wgmma); full-precision fp32 to none (FMA units)."""
    rows = [r for r in _hint_rows(aot_rows, arch) if r["kernel"] == "_hint_fused_kernel"]
    tc = [r for r in rows if "fp16" in r["case"] or "bf16" in r["case"] or "allow_tf32" in r["case"]]
    ieee = [r for r in rows if "fp32" in r["case"] and "allow_tf32" not in r["case"]]
    if not tc and not ieee:
        pytest.skip(f"no hint group selected (KDKERNELS_AOT_GROUPS={_groups})")
    assert not [r["case"] for r in tc if not r.get("mma")], [(r["case"], r.get("mma")) for r in tc]
    assert not [r["case"] for r in ieee if r.get("mma")], [(r["case"], r.get("mma")) for r in ieee]


def _widths(r, op):
    """{bits: count} of a row's global loads (op "ld") or stores ("st"); JSON made the keys strings."""
    return {int(b): n for b, n in r["global"][op].items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_hcl_loads_are_vectors(aot_rows, arch):
    """At every benchmark HCL case (W = 32, 16, 8, 1 and 56, 28, 14, 7) the fp32 kernels read the
    features only through 128-bit loads (ld.global.v4.b32): the forward has no narrower global
    load at all, the backward one 32-bit load (grad_output) and only 128-bit stores (the
    gradient). The row-tile layout loaded W = 7 and 14 (unaligned rows) and 8, 28, 56 (a column
    mask the compiler could not prove constant over 4 columns) as 32-bit scalars."""
    _need("hcl")
    rows = [r for r in _rows_of(aot_rows, "hcl", arch) if r["kernel"] in ("_hcl_fwd_kernel", "_hcl_bwd_kernel")]
    assert {r["case"].split()[1] for r in rows} == set(_aot.HCL_PAIRS), sorted({r["case"] for r in rows})
    bad = []
    for r in rows:
        ld, st = _widths(r, "ld"), _widths(r, "st")
        if r["kernel"] == "_hcl_fwd_kernel":
            ok = set(ld) == {128}
        else:
            ok = set(ld) == {128, 32} and ld[32] == 1 and set(st) == {128}
        if not ok:
            bad.append(f"{r['case']} {r['kernel']}: {_aot.format_widths(r['global'])}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_hcl_kernels_do_not_spill(aot_rows, arch):
    """_hcl_fwd_kernel and _hcl_bwd_kernel at every configuration the launchers pick (the
    benchmark shapes; every level plan in every dtype, with and without gradients): no register
    spills at all (Triton 3.6's fp64 backward of the level plans spilled 8 B on sm_90)."""
    groups = [g for g in ("hcl", "hcl-variants") if g in GROUPS and f"{g}:{arch}" not in _SKIP]
    if not groups:
        pytest.skip(f"no hcl group selected on sm_{arch} (KDKERNELS_AOT_GROUPS={_groups}, KDKERNELS_AOT_SKIP)")
    rows = [r for g in groups for r in _rows_of(aot_rows, g, arch)
            if r["kernel"].startswith("_hcl_") and r.get("first_compile")]
    assert rows
    spilled = [(r["case"], r["kernel"], r["regs"], r["spill_st"], r["spill_ld"]) for r in rows
               if r["spill_st"] or r["spill_ld"]]
    assert not spilled, spilled


@pytest.mark.parametrize("arch", ARCHS)
def test_hcl_grids_fill_the_gpu(aot_rows, arch):
    """Every HCL launch at the benchmark shapes has at least two programs per SM of the target
    (216 on sm_80, 264 on sm_90): one launch holds every level, and the level planner packs
    whole planes only while each level keeps 264 programs (the final one-program sum has its
    written reason in _aot.GRID_REASONS)."""
    _need("hcl")
    want = _aot.GRID_PER_SM * _aot.SM_COUNT[arch]
    rows = [r for r in _rows_of(aot_rows, "hcl", arch) if r["kernel"].startswith("_hcl_")]
    assert len({r["case"] for r in rows}) == len(_aot.HCL_PAIRS)
    short = [(r["case"], r["kernel"], r["grid"]) for r in rows if math.prod(r["grid"]) < want]
    assert not short, short


# Left to their own rules: the _hint_* kernels (test_hint_kernels_do_not_spill,
# test_hint_grid_fills_the_gpu). Every other kernel, HCL's included, is held to both rules here.
ELSEWHERE = ("_hint_",)


@pytest.mark.parametrize("group", [g for g in _aot.GROUPS if not g.startswith("hint")])
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_do_not_spill(aot_rows, arch, group):
    """Every kernel of ABF, KD, linear KD and HCL at the configuration
    its launcher picks for every case (every dtype, with and without gradients, the teacher's
    too): no register spills at all (ABF's one-pass backward on a 4096-element tile spilled
    40-68 B on sm_80 and sm_90)."""
    _need(group, arch)
    rows = [r for r in _rows_of(aot_rows, group, arch) if r.get("first_compile")
            and not r["kernel"].startswith(("(", "?") + ELSEWHERE)]
    assert rows, f"{group} on sm_{arch} compiled no kernel"
    spilled = [(r["case"], r["kernel"], r["regs"], r["spill_st"], r["spill_ld"]) for r in rows
               if r["spill_st"] or r["spill_ld"]]
    assert not spilled, spilled


@pytest.mark.parametrize("arch", ARCHS)
def test_grids_fill_the_gpu(aot_rows, arch):
    """At the benchmark shapes every launch of every kernel (but the _hint_* ones)
    has at least two programs per SM of the target (sm_80: 2 x 108 = 216, sm_90: 2 x 132 = 264), or a reason written in
    _aot.GRID_REASONS why the work cannot fill that many; a reason whose grids are full again
    fails too."""
    bench = [g for g in _aot.BENCH_GROUPS if g in GROUPS]
    if not bench:
        pytest.skip(f"no benchmark-shape group selected (KDKERNELS_AOT_GROUPS={_groups})")
    rows = [r for r in aot_rows if r["arch"] == arch and r["group"] in bench]
    for r in rows:  # shown with -s: the grids the rule saw
        if not r["kernel"].startswith(("(", "?")):
            print(f"sm_{arch} {r['case']} {r['kernel']}: grid {r['grid']} = {math.prod(r['grid'])}")
    problems = _aot.grid_problems(rows, skip=ELSEWHERE)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- csrc/cuda
CUDA_SOURCES = _aot.cuda_sources()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_kernels_compile(source, arch):
    """csrc/cuda through nvcc -Xptxas -v with the build's flags: compiles, no spill at all without a
    reason (_aot.CUDA_SPILL_REASONS, empty), shared memory fits."""
    if os.environ.get("KDKERNELS_AOT", "1") == "0" or os.environ.get("KDKERNELS_AOT_CUDA", "1") == "0":
        pytest.skip("nvcc part of the compile tier skipped: KDKERNELS_AOT=0 or KDKERNELS_AOT_CUDA=0")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin): the CUDA kernels are not compiled here")
    rc, log, rows = _aot.compile_cuda(source, arch, nvcc)
    assert rc == 0, log[-4000:]
    assert rows, f"no kernel found in the ptxas log of {source}:\n{log[-2000:]}"
    for r in rows:  # shown with -s: the resources of every instantiation
        print(f"{source} sm_{arch} {r['kernel']}: {r['regs']} registers, spills {r['spill_st']}/{r['spill_ld']} B, "
              f"{r['smem']} B shared")
    problems = _aot.cuda_problems(rows)
    assert not problems, "\n".join(problems)
