"""Index arithmetic past 2^31 elements: offsets computed in int64 wherever a tensor can be that large.

Two kinds of test:

* Triton kernels (interpreter, cheap): each kernel is launched on a grid as
  large as a real > 2^31-element input needs, over tensors that live in a
  *sparse* buffer (an anonymous MAP_NORESERVE mapping: only the pages written
  take memory, untouched ones read as zero), but only a few program ids are
  executed (``_run_programs``): the last ones, whose row / plane / sample /
  pixel offset times its stride passes 2^31, and program 0. The interpreter
  does integer arithmetic in the kernel's own widths (numpy int32 wraps), so a
  missing ``.to(tl.int64)`` makes the offset wrap to base - 2^32 elements: the
  buffers keep a zero-filled guard of that size in front of the tensors, so a
  wrapped read returns zeros and a wrapped write misses its place, and the
  comparison with the float64 reference fails (rather than the process).

* C++ kernels (``cpp`` backend, through the public ops): kd_loss and hcl_loss
  on inputs of more than 2^31 elements. The inputs are sparse buffers too:
  random data in the first and the last rows / planes (whose offsets pass
  2^31), zeros elsewhere (an all-zero row has KL 0; an all-zero plane adds 0
  to every HCL sum). The kernels really read all 2^31+ elements (the
  untouched ones from the OS's shared zero page, so the memory taken is only
  what is written), in a few seconds each. One test, the kd_loss backward on the cpp backend,
  writes a > 2^31-element gradient (4 GiB of float16): its name ends in
  ``large_memory``, and it skips, saying why, when /proc/meminfo's
  MemAvailable is short.
"""
from __future__ import annotations

import inspect
import mmap
import os
import sys
import time

import pytest
import torch
import triton.language as tl

from kdkernels import _native
from kdkernels.reference import abf as abf_ref
from kdkernels.reference import hcl as hcl_ref
from kdkernels.reference import kd as kd_ref

I32 = 2**31
# not in Python's mmap module before 3.12; the Linux value (x86-64 and arm64)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs Triton kernels through the interpreter "
                                       "(program-id subsets); TRITON_INTERPRET is not 1")


# ---------------------------------------------------------------------------- helpers


def sparse(numel: int, dtype: torch.dtype, guard: int = 0, huge: bool = False) -> torch.Tensor:
    """A zero-filled 1-D tensor of ``numel`` elements in an anonymous MAP_NORESERVE
    mapping, after a zero-filled guard of ``guard`` elements (where offsets that
    wrapped to base - 2^32 elements land). Only written pages take memory. The
    tensor keeps the mapping alive; it is unmapped when the last view goes."""
    es = torch.empty((), dtype=dtype).element_size()
    page = 1 << 21
    nbytes = ((guard + numel) * es + page - 1) // page * page
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    try:
        m = mmap.mmap(-1, nbytes, flags=flags)
    except OSError as e:  # no MAP_NORESERVE here, or a limit on address space
        pytest.skip(f"cannot map {nbytes / 2**30:.0f} GiB of address space for a sparse buffer: {e}")
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):  # reads of untouched memory: one huge zero page per 2 MiB
        m.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(m, dtype=torch.uint8)
    return raw[guard * es:(guard + numel) * es].view(dtype)


def _guard_for(numel: int) -> int:
    """Guard elements in front of a tensor of ``numel`` elements: 2^32 when offsets can
    pass 2^31, so that an offset that wrapped in int32 (to offset - 2^32, or a channel
    count times that for a per-channel stride) still lands in zero-filled memory of
    this mapping instead of another buffer. Virtual memory only."""
    return 2**32 if numel > I32 else 0


def _run_programs(kernel, grid, pids, *args, **kwargs):
    """Run ``kernel[grid](*args, **kwargs)`` under the Triton interpreter, executing
    only the program ids in ``pids`` (tuples). Everything else is what the
    interpreter's own launcher does: arguments are converted the same way (ints
    that fit int32 become int32), and program_id / num_programs are the real ones."""
    from triton.runtime import interpreter as interp

    assert isinstance(kernel, interp.InterpretedFunction), "not running under the Triton interpreter"
    ex = interp.GridExecutor(kernel.rewrite(), kernel.arg_names, grid, kernel.pre_run_hooks)
    spec = inspect.getfullargspec(ex.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
    args_hst, kwargs_hst = ex._init_args_hst(args, kwargs)
    scope = interp._patch_lang(ex.fn)
    try:
        call = inspect.getcallargs(ex.fn, *args_hst, **kwargs_hst)
        call = {k: v if k in ex.constexprs else interp._implicit_cvt(v) for k, v in call.items()}
        full = tuple(grid) + (1,) * (3 - len(grid))
        interp.interpreter_builder.set_grid_dim(*full)
        for pid in pids:
            pid = tuple(pid) + (0,) * (3 - len(pid))
            assert all(0 <= p < g for p, g in zip(pid, full)), (pid, full)
            interp.interpreter_builder.set_grid_idx(*pid)
            ex.fn(**call)
    finally:
        scope.restore()
    ex._restore_args_dev(args, args_hst, kwargs, kwargs_hst)


def _close(actual, expected, rtol, what):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rtol, (f"{what}: relative error {err:.3g} > {rtol:g}\n"
                         f" got      {actual.flatten()[:6]}\n expected {expected.flatten()[:6]}")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- Triton: KD


@needs_interpreter
def test_triton_kd_rows_past_int32():
    """_kd_fwd_kernel (FINAL) and _kd_bwd_kernel at rows whose row * C passes 2^31."""
    from kdkernels.triton import kd as tk

    C = 1000
    rows = I32 // C + 3  # row rows-1 starts at 2^31 + 1000
    numel = rows * C
    assert (rows - 1) * C > I32
    inv_t = 1.0 / 4.0
    picked = [0, rows - 2, rows - 1]
    bufs = [sparse(numel, torch.float32, _guard_for(numel)) for _ in range(4)]
    s, t, gs, gt = (b.view(rows, C) for b in bufs)
    g = _gen(0)
    for r in picked:
        s[r] = torch.randn(C, generator=g) * 3
        t[r] = torch.randn(C, generator=g) * 3
    block, seg, split, num_warps = tk._plan(rows, C)
    assert split == 1
    stats = torch.full((rows, tk.STATS), float("nan"))
    kl = torch.full((rows,), float("nan"))
    _run_programs(tk._kd_fwd_kernel, (rows, 1), [(r, 0) for r in picked],
                  s, t, stats, stats, kl, C, seg, *tk._inv_parts(inv_t),
                  ACC=tk._acc(s.dtype), BLOCK=block, FINAL=True, num_warps=num_warps)
    sub_s, sub_t = s[picked].double(), t[picked].double()
    ref = kd_ref.kd_loss(sub_s, sub_t, 4.0, "none") / 16.0  # KL without T^2
    _close(kl[picked], ref, 1e-5, "kd fwd: KL of rows past 2^31")
    gscale = torch.zeros(rows)
    gscale[picked] = torch.tensor([0.5, 1.5, -2.0])
    _run_programs(tk._kd_bwd_kernel, (rows, 1), [(r, 0) for r in picked],
                  s, t, stats, gscale, gs, gt, C, seg, *tk._inv_parts(inv_t),
                  ACC=tk._acc(s.dtype), BLOCK=block, TEACHER=True, num_warps=num_warps)
    log_ps = torch.log_softmax(sub_s * inv_t, 1)
    log_pt = torch.log_softmax(sub_t * inv_t, 1)
    gsc = gscale[picked].double()[:, None]
    _close(gs[picked], gsc * (log_ps.exp() - log_pt.exp()), 1e-5, "kd bwd: grad_s of rows past 2^31")
    kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(1, keepdim=True)
    _close(gt[picked], gsc * log_pt.exp() * (log_pt - log_ps - kl_rows), 1e-5,
           "kd bwd: grad_t of rows past 2^31")


def _segment_state(s, t, inv_t):
    """A piece of a row's state (m_s, m_t, S_s, S_t, W, r, rho), in float64 (kdkernels/triton/kd.py):
    r is the student's z at the teacher's first argmax, rho = r (finite here), and the gaps
    W = sum exp(a_t) (a_t - (z_s - rho)) are taken from it."""
    zs, zt = s.double() * inv_t, t.double() * inv_t
    ms, mt = zs.max(), zt.max()
    a_s, a_t = zs - ms, zt - mt
    r = zs[int(zt.argmax())]
    w = (a_t.exp() * (a_t - (zs - r))).sum()
    return torch.stack([ms, mt, a_s.exp().sum(), a_t.exp().sum(), w, r, r])


@needs_interpreter
def test_triton_kd_segments_past_int32():
    """Split rows: segment seg of row 1 starts at C + seg * SEG > 2^31 (a 1.5 * 2^30-class row)."""
    from kdkernels.triton import kd as tk

    rows, C = 2, 3 * 2**29 + 777  # not a multiple of the block: the last segment is partial
    numel = rows * C
    inv_t = 0.5
    block = tk._MAX_BLOCK
    seg = block  # one chunk per program: a valid SEG (a multiple of BLOCK), cheap to interpret
    nseg = -(-C // seg)
    picked = [(0, 0), (1, 0), (1, nseg - 2), (1, nseg - 1)]
    bufs = [sparse(numel, torch.float16, _guard_for(numel)) for _ in range(2)]
    s, t = (b.view(rows, C) for b in bufs)
    g = _gen(1)
    for r, k in picked:
        n = min(seg, C - k * seg)
        s[r, k * seg:k * seg + n] = (torch.randn(n, generator=g) * 2).half()
        t[r, k * seg:k * seg + n] = (torch.randn(n, generator=g) * 2).half()
    assert C + (nseg - 1) * seg > I32
    p = sparse(rows * nseg * tk.PART, torch.float32)  # the segment states
    _run_programs(tk._kd_fwd_kernel, (rows, nseg), picked,
                  s, t, p, p, p, C, seg, *tk._inv_parts(inv_t),
                  ACC=tk._acc(s.dtype), BLOCK=block, FINAL=False, num_warps=8)
    for r, k in picked:
        got = p[(r * nseg + k) * tk.PART:(r * nseg + k + 1) * tk.PART]
        ref = _segment_state(s[r, k * seg:(k + 1) * seg], t[r, k * seg:(k + 1) * seg], inv_t)
        _close(got, ref, 1e-5, f"kd fwd: segment state ({r}, {k})")


@needs_interpreter
def test_triton_kd_combine_past_int32():
    """_kd_combine_kernel reads the states of row r at (r * SPLIT + k) * PART: past 2^31 for the last rows."""
    from kdkernels.triton import kd as tk

    split = 3
    rows = I32 // (split * tk.PART) + 2
    assert (rows - 1) * split * tk.PART > I32
    g = _gen(2)
    # the states of a real 3-segment row, from the kernel itself (small, ordinary tensors)
    C = 3 * 64
    s_small = torch.randn(1, C, generator=g) * 3
    t_small = torch.randn(1, C, generator=g) * 3
    small_part = torch.empty(split * tk.PART)
    stats_small = torch.empty(1, tk.STATS)
    kl_small = torch.empty(1)
    tk._kd_fwd_kernel[(1, split)](s_small, t_small, small_part, stats_small, kl_small, C, 64,
                                  *tk._inv_parts(1.0), ACC=tl.float32, BLOCK=64, FINAL=False)
    numel = rows * split * tk.PART
    part = sparse(numel, torch.float32, _guard_for(numel))
    stats = sparse(rows * tk.STATS, torch.float32)
    kl = sparse(rows, torch.float32)
    picked = [0, rows - 1]
    for r in picked:
        part[r * split * tk.PART:(r + 1) * split * tk.PART] = small_part
    _run_programs(tk._kd_combine_kernel, (rows,), [(r,) for r in picked],
                  part, stats, kl, split, ACC=tl.float32, BLOCK_S=4, num_warps=1)
    ref = kd_ref.kd_loss(s_small.double(), t_small.double(), 1.0, "none")
    for r in picked:
        _close(kl[r:r + 1], ref, 1e-5, f"kd combine: KL of row {r}")


# ---------------------------------------------------------------------------- Triton: HCL


@needs_interpreter
@pytest.mark.parametrize("H,W", [(7, 7), (40, 60)])  # whole planes per tile, and row chunks
def test_triton_hcl_planes_past_int32(H, W):
    """_hcl_fwd_kernel / _hcl_bwd_kernel at planes whose plane * H * W passes 2^31."""
    from kdkernels.ops.hcl import level_plan
    from kdkernels.triton import hcl as th

    planes = I32 // (H * W) + 2
    assert (planes - 1) * H * W > I32
    numel = planes * H * W
    bufs = [sparse(numel, torch.float32, _guard_for(numel)) for _ in range(3)]
    fs, ft, grad = (b.view(planes, H, W) for b in bufs)
    picked = [0, planes - 2, planes - 1]
    g = _gen(3)
    for p in picked:
        fs[p] = torch.randn(H, W, generator=g)
        ft[p] = torch.randn(H, W, generator=g)
    # one level of `planes` (1, H, W) planes; every other plane is zero (d = 0 adds nothing)
    level = (fs.view(planes, 1, H, W),), (ft.view(planes, 1, H, W),)  # the kernel's level table: tuples
    plan = level_plan((planes, 1, H, W))
    grid, args, consts = th.launch_table(*level, [plan])
    pb, block_h = consts["PB"][0], consts["BH"][0]
    assert (block_h >= H) == (H == 7)
    assert consts["FLAT"] == (H == 7,)  # 7 x 7: the flat layout (groups of 4 planes, int64 block start)
    programs = sorted({p // pb for p in picked})
    partial = torch.full((grid,), float("nan"))
    _run_programs(th._hcl_fwd_kernel, (grid,), [(j,) for j in programs], *level, partial, *args, **consts,
                  num_warps=4)
    # partial[j] = c0 * sum of its planes' losses / c0_plane, c0 / c0_plane = 1 / planes
    for j in programs:
        ref = sum(hcl_ref.hcl_level(fs[p].double()[None, None], ft[p].double()[None, None])
                  for p in picked if p // pb == j)
        _close(partial[j:j + 1] * planes, ref.reshape(1), 1e-5, f"hcl fwd: program {j}")
    gout = torch.tensor(float(planes))  # grad_output * c0 = 1 / (tot * H * W): one plane's own scale
    _run_programs(th._hcl_bwd_kernel, (grid,), [(j,) for j in programs], *level, (grad.view(planes, 1, H, W),),
                  gout, *args, **consts, num_warps=4)
    for p in picked:
        a = fs[p].double()[None, None].requires_grad_(True)
        (ref_grad,) = torch.autograd.grad(hcl_ref.hcl_level(a, ft[p].double()[None, None]), a)
        _close(grad[p], ref_grad[0, 0], 1e-5, f"hcl bwd: plane {p}")


# ---------------------------------------------------------------------------- Triton: ABF


@needs_interpreter
def test_triton_abf_samples_past_int32():
    """ABF forward and both backward kernels at samples whose n * C * H * W passes 2^31."""
    from kdkernels.triton import abf as ta

    C, H, W, h, w = 3, 8, 8, 4, 4
    N = I32 // (C * H * W) + 2
    assert (N - 1) * C * H * W > I32
    numel = N * C * H * W
    big = [sparse(numel, torch.float32, _guard_for(numel)) for _ in range(4)]  # x, out, g, gx
    small = [sparse(N * C * h * w, torch.float32) for _ in range(2)]          # y, gy
    zs = [sparse(N * 2 * H * W, torch.float32) for _ in range(2)]             # z, da
    x, out, go, gx = (b.view(N, C, H, W) for b in big)
    y, gy = (b.view(N, C, h, w) for b in small)
    z, da = (b.view(N, 2, H, W) for b in zs)
    g = _gen(4)
    weight = torch.randn(2, 2 * C, 1, 1, generator=g) * 0.5
    bias = torch.randn(2, generator=g)
    picked = [0, N - 1]
    for n in picked:
        x[n] = torch.randn(C, H, W, generator=g)
        y[n] = torch.randn(C, h, w, generator=g)
        go[n] = torch.randn(C, H, W, generator=g)
    sh, sw = ta.float32_ratio(h, H), ta.float32_ratio(w, W)
    acc, block_p, block_c, one_pass = ta._config(N, C, H * W, x.dtype)
    blocks_p = -(-H * W // block_p)
    assert blocks_p == 1 and ta._tiles_per_program(N, blocks_p, one_pass) == 1
    big_ = ta._big(C, H * W)  # False: one sample is small, only n * C * H * W passes 2^31
    wflat = weight.reshape(-1).contiguous()
    _run_programs(ta._abf_fwd_kernel, (blocks_p, N), [(0, n) for n in picked],
                  x, y, wflat, bias, out, z, C, H, W, h, w, sh, sw, ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c,
                  ONE_PASS=one_pass, BIG=big_)
    pw = sparse(N * blocks_p * 4 * C, torch.float32)
    pb = sparse(N * blocks_p * 2, torch.float32)
    _run_programs(ta._abf_bwd_pixel_kernel, (blocks_p, N), [(0, n) for n in picked],
                  go, x, y, wflat, z, gx, da, pw, pb, C, H, W, h, w, sh, sw, 1,
                  ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, ONE_PASS=one_pass, BIG=big_)
    inv_h, inv_w = float(H / h), float(W / w)
    # both grad_y paths: the direct one (factor 2 here) and the masked candidate walk
    for mode, span_h, span_w, block_q in (ta._y_plan(H, W, h, w), (0, -(-H // h) + 2, -(-W // w) + 2, h * w)):
        for n in picked:
            gy[n].zero_()
        grid = (-(-h * w // block_q), N, -(-C // block_c))
        _run_programs(ta._abf_bwd_y_kernel, grid, [(0, n, 0) for n in picked],
                      go, wflat, z, da, gy, C, H, W, h, w, sh, sw, inv_h, inv_w, span_h, span_w,
                      ACC=acc, BLOCK_Q=block_q, BLOCK_C=block_c, MODE=mode, BIG=big_)
        for n in picked:
            xa, ya = x[n:n + 1].double().requires_grad_(True), y[n:n + 1].double().requires_grad_(True)
            ref = abf_ref.abf_fuse(xa, ya, weight.double(), bias.double())
            (rgy,) = torch.autograd.grad(ref, (ya,), go[n:n + 1].double())
            _close(gy[n], rgy[0], 1e-5, f"abf bwd: grad_y (mode {mode}) of sample {n}")
    for n in picked:
        xa = x[n:n + 1].double().requires_grad_(True)
        ya = y[n:n + 1].double().requires_grad_(True)
        wa = weight.double().requires_grad_(True)
        ba = bias.double().requires_grad_(True)
        ref = abf_ref.abf_fuse(xa, ya, wa, ba)
        _close(out[n], ref[0], 1e-5, f"abf fwd: sample {n}")
        rgx, rgy, rgw, rgb = torch.autograd.grad(ref, (xa, ya, wa, ba), go[n:n + 1].double())
        _close(gx[n], rgx[0], 1e-5, f"abf bwd: grad_x of sample {n}")
        _close(gy[n], rgy[0], 1e-5, f"abf bwd: grad_y of sample {n}")
        prog = n * blocks_p
        _close(pw[prog * 4 * C:(prog + 1) * 4 * C], rgw.reshape(-1), 1e-5,
               f"abf bwd: grad_w partial of sample {n}")
        _close(pb[prog * 2:prog * 2 + 2], rgb, 1e-5, f"abf bwd: grad_b partial of sample {n}")


# ---------------------------------------------------------------------------- Triton: hint


@needs_interpreter
def test_triton_hint_pixels_past_int32():
    """_hint_fused_kernel at pixel tiles whose first pixel tile * BLOCK_Q passes 2^31 (N*H*W > 2^31)."""
    from kdkernels.triton import hint as th

    Cs, Ct, H, W = 1, 2, 4, 4
    P = H * W
    N = I32 // P + 8
    Q = N * P
    block_q, block_cs, block_ct = th._blocks(Q, Cs, Ct)
    num_tiles = -(-Q // block_q)
    assert (num_tiles - 1) * block_q > I32
    bufs = [sparse(N * c * P, torch.float32, _guard_for(N * c * P)) for c in (Cs, Ct, Cs, Ct)]
    gw = sparse(num_tiles * Ct * Cs, torch.float32)
    gb = sparse(num_tiles * Ct, torch.float32)
    loss = sparse(num_tiles, torch.float32)
    fs, ft, gfs, gft = (b.view(N, c, P) for b, c in zip(bufs, (Cs, Ct, Cs, Ct)))
    g = _gen(5)
    weight = torch.randn(Ct, Cs, generator=g)
    bias = torch.randn(Ct, generator=g)
    picked = [0, num_tiles - 2, num_tiles - 1]
    per_tile = block_q // P  # samples per tile
    assert per_tile * P == block_q
    for tile in picked:
        n0 = tile * per_tile
        fs[n0:n0 + per_tile] = torch.randn(per_tile, Cs, P, generator=g)
        ft[n0:n0 + per_tile] = torch.randn(per_tile, Ct, P, generator=g)
    # one program per tile (num_tiles pixel groups, one channel group), so program `tile` owns that tile
    _run_programs(th._hint_fused_kernel, (num_tiles,), [(tile,) for tile in picked],
                  fs, ft, weight, bias, loss, gfs, gw, gb, gft,
                  Q, P, Cs, Ct, num_tiles, num_tiles, 1,
                  HAS_BIAS=True, NEED_FS=True, NEED_W=True, NEED_B=True, NEED_FT=True, ACC=tl.float32,
                  PREC="ieee", SINGLE_CT=Ct <= block_ct, DOT_F32=False, MULTI=False, SPLIT=False,
                  BLOCK_Q=block_q, BLOCK_CS=block_cs, BLOCK_CT=block_ct, num_warps=4)
    wd, bd = weight.double(), bias.double()
    for tile in picked:
        n0 = tile * per_tile
        xs = fs[n0:n0 + per_tile].double()                     # (n, Cs, P)
        r = torch.einsum("oc,ncp->nop", wd, xs) + bd[None, :, None] - ft[n0:n0 + per_tile].double()
        _close(loss[tile:tile + 1], (r * r).sum()[None], 1e-5, f"hint: loss of tile {tile}")
        _close(gft[n0:n0 + per_tile], r, 1e-5, f"hint: grad_ft of tile {tile}")
        _close(gfs[n0:n0 + per_tile], torch.einsum("oc,nop->ncp", wd, r), 1e-5,
               f"hint: grad_fs of tile {tile}")
        _close(gw[tile * Ct * Cs:(tile + 1) * Ct * Cs],
               torch.einsum("nop,ncp->oc", r, xs).reshape(-1), 1e-5, f"hint: grad_w partial of tile {tile}")
        _close(gb[tile * Ct:(tile + 1) * Ct], r.sum((0, 2)), 1e-5, f"hint: grad_b partial of tile {tile}")


@needs_interpreter
def test_triton_hint_split_partials_past_int32():
    """The teacher-channel split: the fused pass writes channel group k's share of W^T r at
    k * N*Cs*H*W, the reduction reads row k of those fs partials at k * n_fs + column; both
    pass 2^31 here (group 2 of 3 at N*Cs*H*W > 2^30; columns past 2^31)."""
    from kdkernels.triton import hint as th

    # ---- the fused pass, program (last pixel tile, channel group 2)
    Cs, Ct, H, W = 1, 48, 4, 4
    P = H * W
    N = (I32 // 2) // P + 8
    Q = N * P
    block_q, block_cs, block_ct = 32, 16, 16  # 3 chunks of 16 teacher channels, one a group
    num_tiles = -(-Q // block_q)
    groups = 3
    assert (groups - 1) * Q * Cs > I32
    fs = sparse(Q * Cs, torch.float32).view(N, Cs, P)
    ft = sparse(Q * Ct, torch.float32, _guard_for(Q * Ct)).view(N, Ct, P)
    fs_part = sparse(groups * Q * Cs, torch.float32, _guard_for(groups * Q * Cs))
    gw = sparse(num_tiles * Ct * Cs, torch.float32)
    gb = sparse(num_tiles * Ct, torch.float32)
    loss = sparse(num_tiles * groups, torch.float32)
    g = _gen(6)
    weight = torch.randn(Ct, Cs, generator=g)
    bias = torch.randn(Ct, generator=g)
    tile = num_tiles - 1
    n0 = tile * (block_q // P)
    fs[n0:] = torch.randn(N - n0, Cs, P, generator=g)
    ft[n0:] = torch.randn(N - n0, Ct, P, generator=g)
    _run_programs(th._hint_fused_kernel, (num_tiles * groups,), [(tile * groups + 2,)],
                  fs, ft, weight, bias, loss, fs_part, gw, gb, ft,
                  Q, P, Cs, Ct, num_tiles, num_tiles, groups,
                  HAS_BIAS=True, NEED_FS=True, NEED_W=True, NEED_B=True, NEED_FT=False, ACC=tl.float32,
                  PREC="ieee", SINGLE_CT=True, DOT_F32=False, MULTI=False, SPLIT=True,
                  BLOCK_Q=block_q, BLOCK_CS=block_cs, BLOCK_CT=block_ct, num_warps=4)
    rows = slice(2 * block_ct, 3 * block_ct)  # group 2's teacher channels
    wd = weight.double()[rows]
    r = torch.einsum("oc,ncp->nop", wd, fs[n0:].double()) + bias.double()[rows, None] - ft[n0:, rows].double()
    part = fs_part[2 * Q * Cs:].view(N, Cs, P)[n0:]
    _close(part, torch.einsum("oc,nop->ncp", wd, r), 1e-5, "hint split: group 2's W^T r partial")
    _close(loss[tile * groups + 2:tile * groups + 3], (r * r).sum()[None], 1e-5, "hint split: loss partial")
    del fs, ft, fs_part

    # ---- the reduction: the fs sums over 2 channel groups, n_fs columns past 2^31
    n_fs = I32 + 4096
    block_s, block_fs = 2, 512
    fs_progs = -(-n_fs // block_fs)
    part = sparse(2 * n_fs, torch.float32, _guard_for(2 * n_fs))
    out = sparse(n_fs, torch.float32, _guard_for(n_fs))
    tail = slice(n_fs - 700, n_fs)
    a, b = torch.randn(700, generator=g), torch.randn(700, generator=g)
    part[n_fs - 700:n_fs] = a
    part[2 * n_fs - 700:] = b
    dummy = torch.zeros(4)
    _run_programs(th._hint_reduce_kernel, (fs_progs + 1,), [(fs_progs - 2,), (fs_progs - 1,)],
                  dummy, dummy, dummy, part, dummy, dummy, dummy, out,
                  1, 1, 2, 0, 0, n_fs, 1, fs_progs, 0, 0,
                  ACC=tl.float32, BLOCK_G=4, BLOCK=256, BLOCK_S=block_s, BLOCK_FS=block_fs, num_warps=4)
    _close(out[tail], a.double() + b.double(), 1e-6, "hint split: the fs sum over groups past 2^31")


# ---------------------------------------------------------------------------- C++: > 2^31 elements


def _cpp_or_skip():
    """Skip, saying why, when the compiled library did not load (``native()`` is None then;
    the ``cpp`` backend these tests name would raise instead of running)."""
    if _native.native() is None:
        reason = f"kdkernels._C is not available: {_native.load_error()}"
        print("skip:", reason)
        pytest.skip(reason)


def test_cpp_kd_loss_more_than_2pow31_elements():
    """kd_loss on the cpp backend, (16384 x 131101) float16 logits = 2^31 + 475,136 elements."""
    import kdkernels

    _cpp_or_skip()
    rows, C = 16384, 131101
    numel = rows * C
    assert numel > I32
    bufs = [sparse(numel, torch.float16, _guard_for(numel), huge=True) for _ in range(2)]
    s, t = (b.view(rows, C) for b in bufs)
    picked = [0, rows - 2, rows - 1]
    assert (rows - 1) * C > I32
    g = _gen(6)
    for r in picked:
        s[r] = (torch.randn(C, generator=g) * 2).half()
        t[r] = (torch.randn(C, generator=g) * 2).half()
    t0 = time.perf_counter()
    loss = kdkernels.kd_loss(s, t, 2.0, reduction="none", backend="cpp")
    elapsed = time.perf_counter() - t0
    ref = kd_ref.kd_loss(s[picked].double(), t[picked].double(), 2.0, "none")
    _close(loss[picked], ref, 2e-3, "cpp kd_loss: rows past 2^31")
    others = torch.ones(rows, dtype=torch.bool)
    others[picked] = False
    assert loss[others].abs().max().item() == 0.0, "rows of zeros must have KL 0"
    print(f"cpp kd_loss forward over {numel} elements: {elapsed:.1f} s")


def test_cpp_hcl_loss_more_than_2pow31_elements():
    """hcl_loss on the cpp backend, one (64, 10700, 56, 56) float16 level = 2^31 + 49152 elements."""
    import kdkernels

    _cpp_or_skip()
    N, C, H, W = 64, 10700, 56, 56
    numel = N * C * H * W
    planes = N * C
    assert numel > I32
    bufs = [sparse(numel, torch.float16, _guard_for(numel), huge=True) for _ in range(2)]
    fs, ft = (b.view(N, C, H, W) for b in bufs)
    pf, pt = fs.view(planes, H, W), ft.view(planes, H, W)
    picked = [0, planes - 2, planes - 1]
    assert (planes - 1) * H * W > I32
    g = _gen(7)
    for p in picked:
        # scaled so that the loss (3/684800 of one plane's) is a normal float16
        pf[p] = (torch.randn(H, W, generator=g) * 32).half()
        pt[p] = (torch.randn(H, W, generator=g) * 32).half()
    t0 = time.perf_counter()
    loss = kdkernels.hcl_loss([fs], [ft], backend="cpp")
    elapsed = time.perf_counter() - t0
    # the zero planes add 0 to every sum: the level's loss is the picked planes' loss
    # (as a (1, k, H, W) level) times k / planes, the ratio of the two means' divisors
    sub = hcl_ref.hcl_level(pf[picked].double()[None], pt[picked].double()[None])
    _close(loss.reshape(1), (sub * len(picked) / planes).reshape(1), 2e-3, "cpp hcl_loss: planes past 2^31")
    # and without the last planes' contribution the loss would be clearly smaller
    first = hcl_ref.hcl_level(pf[:1].double()[None], pt[:1].double()[None]) / planes
    assert (loss.double() - first).abs() > 0.3 * first.abs()
    print(f"cpp hcl_loss forward over {numel} elements: {elapsed:.1f} s")


def test_cpp_kd_backward_more_than_2pow31_elements_large_memory():
    """The one test that writes > 2^31 elements: grad of kd_loss (cpp) on (16384 x 131101) float16
    logits. The gradient is 4 GiB of real memory; skipped when MemAvailable is short."""
    import kdkernels

    _cpp_or_skip()
    rows, C = 16384, 131101
    numel = rows * C
    need = numel * 2 + (1 << 30)  # grad_s (float16) + headroom
    avail = _mem_available()
    if avail < need:
        msg = f"needs {need / 2**30:.1f} GiB free (MemAvailable {avail / 2**30:.1f} GiB)"
        print("skip:", msg)
        pytest.skip(msg)
    bufs = [sparse(numel, torch.float16, _guard_for(numel), huge=True) for _ in range(2)]
    s, t = (b.view(rows, C) for b in bufs)
    picked = [0, rows - 1]
    g = _gen(8)
    for r in picked:
        s[r] = (torch.randn(C, generator=g) * 2).half()
        t[r] = (torch.randn(C, generator=g) * 2).half()
    leaf = s.detach().requires_grad_(True)
    t0 = time.perf_counter()
    loss = kdkernels.kd_loss(leaf, t, 2.0, reduction="sum", backend="cpp")
    (grad,) = torch.autograd.grad(loss, leaf)
    elapsed = time.perf_counter() - t0
    sub = s[picked].double().requires_grad_(True)
    (ref,) = torch.autograd.grad(kd_ref.kd_loss(sub, t[picked].double(), 2.0, "sum"), sub)
    _close(grad[picked], ref, 5e-3, "cpp kd_loss backward: rows past 2^31")
    middle = grad[1:rows - 1]  # (reductions only: .abs() would copy 4 GiB)
    assert middle.amax().item() == 0.0 and middle.amin().item() == 0.0, "rows of zeros have zero gradient"
    print(f"cpp kd_loss forward + backward over {numel} elements: {elapsed:.1f} s")
    del grad
