"""The CUDA KD forward's math, run on the host: KdState (csrc/common/kd.h) in the order csrc/cuda/kd.cu uses it.

No GPU is needed to check what the CUDA forward computes: every step of it on a
row is a KdState method (``add_group`` per thread on kUnroll strided classes,
``merge`` across threads, warps and then, in segment order, across the segments
of a row, ``finish`` for the stats and KL), and those are host/device functions.
This test compiles a small host program around csrc/common/kd.h with the C++
compiler, replays the kernels' schedule (segments, threads, groups, merge
order) on random and awkward rows in float64 and float32 accumulation, and
compares the KL and the stats with the float64 reference. What it cannot check
is the CUDA-specific code around those calls (indexing, shuffles, shared memory,
the launch), which stays as simple as the kernel comments describe.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch

from kdkernels.ops import kd as kd_op
from kdkernels.reference import kd as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The kernels' schedule on the host: row `cols` classes, segments of seg_len
# (a multiple of 32, as kd_fwd_cuda rounds them), B threads per block reading
# classes start + k + (j * 4 + u) * B in groups of 4 (kUnroll), the threads'
# states merged by an xor-butterfly inside each warp of 32 (the same pairs as
# __shfl_xor_sync), warps in order, then the segments in order.
HARNESS = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "common/kd.h"

using namespace kdk;

struct Exp {
  float operator()(float x) const { return std::exp(x); }
  double operator()(double x) const { return std::exp(x); }
};
struct Log {
  float operator()(float x) const { return std::log(x); }
  double operator()(double x) const { return std::log(x); }
};

template <typename A>
KdState<A> warp_merge_lane0(std::vector<KdState<A>> lanes) {  // 32 lanes, xor-butterfly; lane 0's result
  for (int offset = 1; offset < 32; offset <<= 1) {
    std::vector<KdState<A>> next = lanes;
    for (int l = 0; l < 32; ++l) next[l].merge(lanes[l ^ offset], Exp{});
    lanes = next;
  }
  return lanes[0];
}

template <typename A>
KdState<A> block_state(const std::vector<double>& s, const std::vector<double>& t, long start, long end, int B,
                       A inv_t) {
  std::vector<KdState<A>> threads(B, KdState<A>::empty());
  for (int k = 0; k < B; ++k)
    for (long c0 = start + k; c0 < end; c0 += long(B) * 4) {
      A zs[4], zt[4];
      for (int u = 0; u < 4; ++u) {
        const long c = c0 + long(u) * B;
        zs[u] = c < end ? A(s[c]) * inv_t : kd_neg_inf<A>();
        zt[u] = c < end ? A(t[c]) * inv_t : kd_neg_inf<A>();
      }
      threads[k].add_group(zs, zt, Exp{});
    }
  std::vector<KdState<A>> warps;
  for (int w = 0; w < B / 32; ++w)
    warps.push_back(warp_merge_lane0(std::vector<KdState<A>>(threads.begin() + 32 * w, threads.begin() + 32 * w + 32)));
  warps.resize(32, KdState<A>::empty());
  return warp_merge_lane0(warps);
}

template <typename A>
void run(const std::vector<double>& s, const std::vector<double>& t, long seg_len, int B, double inv_t) {
  const long cols = long(s.size());
  KdState<A> row = KdState<A>::empty();
  A part[kKdCudaPart];
  for (long start = 0, k = 0; start < cols; start += seg_len, ++k) {
    const long end = cols - start < seg_len ? cols : start + seg_len;
    const KdState<A> seg = block_state<A>(s, t, start, end, B, A(inv_t));
    seg.store(part);  // through the scratch layout, as the combine kernel reads it
    if (k == 0) row = KdState<A>::load(part);
    else row.merge(KdState<A>::load(part), Exp{});
  }
  A stats[kKdStats];
  const A kl = row.finish(stats, Log{});
  std::printf("%.17g", double(kl));
  for (int i = 0; i < kKdStats; ++i) std::printf(" %.17g", double(stats[i]));
  std::printf("\n");
}

int main() {
  long cols, seg_len;
  int B, dbl;
  double inv_t;
  if (std::scanf("%ld %ld %d %d %lf", &cols, &seg_len, &B, &dbl, &inv_t) != 5) return 2;
  std::vector<double> s(cols), t(cols);
  for (auto& x : s) std::scanf("%lf", &x);
  for (auto& x : t) std::scanf("%lf", &x);
  if (dbl) run<double>(s, t, seg_len, B, inv_t);
  else run<float>(s, t, seg_len, B, inv_t);
  return 0;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (CXX, c++, g++): the host replay of the CUDA KD math is not built")
    d = tmp_path_factory.mktemp("kdstate")
    src, exe = d / "h.cpp", d / "h"
    src.write_text(HARNESS)
    proc = subprocess.run([cxx, "-O1", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(exe)


def _replay(exe, s, t, seg_len, threads, double, temperature):
    text = f"{len(s)} {seg_len} {threads} {int(double)} {1.0 / temperature!r}\n"
    text += " ".join(repr(float(x)) for x in s) + "\n" + " ".join(repr(float(x)) for x in t) + "\n"
    out = subprocess.run([exe], input=text, capture_output=True, text=True, check=True).stdout.split()
    vals = [float(x) for x in out]
    return vals[0], vals[1:]


def _seg_len(cols, split):
    """kd_fwd_cuda's segment length for `split` segments (a multiple of 32)."""
    return -(-(-(-cols // split)) // 32) * 32


def _check(exe, s, t, split, threads, double, temperature):
    seg = _seg_len(len(s), split)
    kl, stats = _replay(exe, s, t, seg, threads, double, temperature)
    s64, t64 = s.double()[None], t.double()[None]
    want = ref.kd_loss(s64, t64, temperature, "sum").item() / temperature ** 2
    tol = 1e-11 if double else 2e-5
    assert math.isclose(kl, want, rel_tol=tol, abs_tol=tol), (split, threads, kl, want)
    # stats: e(m) and log S of both softmaxes, so that log p = z - e(m) - log S exactly as the reference's
    for j, x in ((0, s64), (2, t64)):
        lse = torch.logsumexp(x / temperature, 1).item()
        assert math.isclose(stats[j] + stats[j + 1], lse, rel_tol=tol, abs_tol=tol)
    assert stats[5] == stats[0]  # rho = e(m_s) on CUDA


@pytest.mark.parametrize("double", [True, False], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cols,split,threads", [(1, 1, 32), (37, 1, 32), (1000, 1, 128), (5000, 2, 256),
                                                (9001, 4, 256), (4099, 3, 64), (70_000, 34, 256)])
def test_segments_merge_to_the_row(harness, double, cols, split, threads):
    g = torch.Generator().manual_seed(cols + split)
    s = torch.randn(cols, generator=g, dtype=torch.float64) * 4
    t = torch.randn(cols, generator=g, dtype=torch.float64) * 4 + 1
    # the row's maxima late in the row, so that later segments rescale the earlier ones
    if cols > 2:
        s[-1], t[-2] = 30.0, 25.0
    _check(harness, s, t, split, threads, double, temperature=2.0)


def test_awkward_rows(harness):
    """-inf teacher logits, a peaked teacher, huge logits, one class per segment's tail."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4100, generator=g, dtype=torch.float64)
    t = torch.randn(4100, generator=g, dtype=torch.float64)
    t[:2100] = -math.inf  # a whole first segment without the teacher
    _check(harness, s, t, 2, 256, True, temperature=1.0)
    _check(harness, s * 1e4, t, 3, 256, True, temperature=4.0)
    t2 = t.clone()
    t2[4099] = 60.0  # the teacher's mass on the last class, alone in its group
    _check(harness, s, t2, 2, 256, True, temperature=0.5)


def test_plan_fills_the_gpu_for_llm_vocabularies():
    """The CUDA forward's split (kdkernels/ops/kd.py): at 16 and 64 rows of a 128,256 vocabulary the
    grid has at least twice an H100's 132 SMs in blocks, each segment at least 2,048 classes, and
    rows that already fill the GPU (or are short) are not split. One row gets as many segments as
    the minimum segment allows (62)."""
    assert kd_op._cuda_split(1, 128_256) == 128_256 // kd_op._CUDA_MIN_SEGMENT
    for rows in (16, 64, 256):
        split = kd_op._cuda_split(rows, 128_256)
        seg = _seg_len(128_256, split)
        nseg = -(-128_256 // seg)
        assert rows * nseg >= 2 * 132, (rows, split, nseg)
        assert seg >= kd_op._CUDA_MIN_SEGMENT and nseg <= split
    assert kd_op._cuda_split(4096, 128_256) == 1
    assert kd_op._cuda_split(16, 1000) == 1
    assert kd_op._cuda_split(0, 128_256) == 1
    assert 1 <= kd_op._cuda_split(1, 10**9) <= 65535
