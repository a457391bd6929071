// kdkernels._C: one Python function per kernel entry point.
//
// Conventions (every op): inputs are contiguous and passed as addresses
// (tensor.data_ptr()), sizes as int, dtype as a code (0=float32, 1=float64,
// 2=float16, 3=bfloat16); CPU entry points take num_threads last, CUDA entry
// points take the cudaStream_t as an int last. The GIL is released while a
// kernel runs. No torch headers: the module serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "common/hcl.h"
#include "common/kd.h"

#if defined(KDKERNELS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef KDKERNELS_CXX_FLAGS
#define KDKERNELS_CXX_FLAGS ""
#endif
#ifndef KDKERNELS_CUDA_ARCHS
#define KDKERNELS_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace kdk {  // FitNets hint (docs/spec.md §3, csrc/cpu/hint.cpp)
void hint_fwd_cpu(int dtype, uintptr_t fs, uintptr_t ft, uintptr_t w, uintptr_t b, uintptr_t loss, uintptr_t gfs,
                  uintptr_t gw, uintptr_t gb, uintptr_t gft, int64_t N, int64_t Cs, int64_t Ct, int64_t P,
                  int64_t num_threads);
const char* hint_cpu_isa();
}  // namespace kdk

namespace kdk {  // HCL, every level in one call (docs/spec.md §1, csrc/cpu/hcl.cpp)
void hcl_loss_cpu(int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft, uintptr_t out,
                  uintptr_t sums, const std::vector<int64_t>& planes, const std::vector<int64_t>& H, const std::vector<int64_t>& W,
                  const std::vector<HclCoefs>& coefs, const std::vector<double>& scale, int64_t num_threads);
void hcl_loss_backward_cpu(int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft,
                           uintptr_t gout, uintptr_t sums, const std::vector<uintptr_t>& grad,
                           const std::vector<int64_t>& planes,
                           const std::vector<int64_t>& H, const std::vector<int64_t>& W,
                           const std::vector<HclCoefs>& coefs, const std::vector<double>& scale, int64_t num_threads);
}  // namespace kdk

namespace kdk {  // ABF fusion (docs/spec.md §2, csrc/cpu/abf.cpp)
void abf_fwd_cpu(int dtype, uintptr_t x, uintptr_t y, uintptr_t wt, uintptr_t bias, uintptr_t out, uintptr_t z,
                 int64_t N, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, double scale_h, double scale_w,
                 int64_t num_threads);
void abf_bwd_cpu(int dtype, uintptr_t g, uintptr_t x, uintptr_t y, uintptr_t wt, uintptr_t z, uintptr_t gx,
                 uintptr_t gy, uintptr_t gw, uintptr_t gb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t h,
                 int64_t w, double scale_h, double scale_w, int64_t num_threads);
}  // namespace kdk

namespace {

kdk::HclCoefs hcl_coefs(double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs) {
  return kdk::make_hcl_coefs(coef_mse, pools.data(), int64_t(pools.size()), coefs.data(), int64_t(coefs.size()));
}

// One HclCoefs per level from the per-level lists (all of one length, checked).
std::vector<kdk::HclCoefs> hcl_level_coefs(const char* where, size_t levels, const std::vector<double>& coef_mse,
                                           const std::vector<std::vector<int64_t>>& pools,
                                           const std::vector<std::vector<double>>& coefs) {
  if (coef_mse.size() != levels || pools.size() != levels || coefs.size() != levels)
    throw std::invalid_argument(std::string(where) + ": the per-level lists differ in length");
  std::vector<kdk::HclCoefs> out;
  out.reserve(levels);
  for (size_t l = 0; l < levels; ++l) out.push_back(hcl_coefs(coef_mse[l], pools[l], coefs[l]));
  return out;
}

py::dict build_info() {
  py::dict info;
#if defined(__VERSION__)
  info["compiler"] = std::string(__VERSION__);
#else
  info["compiler"] = py::none();
#endif
  info["cxx_flags"] = std::string(KDKERNELS_CXX_FLAGS);
  info["threads"] = std::string(kdk::team_kind());
#if defined(KDKERNELS_WITH_CUDA)
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  py::list archs;
  std::string all = KDKERNELS_CUDA_ARCHS, cur;
  for (char ch : all + ";") {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) archs.append(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  info["cuda_archs"] = archs;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  return info;
}

// What the CUDA runtime linked into _C sees here. Initialises the CUDA driver:
// call it only when CUDA is going to be used anyway.
py::dict cuda_status() {
  py::dict out;
#if defined(KDKERNELS_WITH_CUDA)
  int driver = 0, runtime = 0, count = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  const cudaError_t err = cudaGetDeviceCount(&count);
  out["driver_version"] = driver;
  out["runtime_version"] = runtime;
  out["device_count"] = err == cudaSuccess ? count : 0;
  if (err == cudaSuccess) {
    out["error"] = py::none();
  } else {
    out["error"] = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // not sticky: leave no error behind for the next launch check
  }
#else
  out["driver_version"] = 0;
  out["runtime_version"] = 0;
  out["device_count"] = 0;
  out["error"] = "kdkernels._C was built without CUDA";
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  kdk::install_fork_handler();
  m.doc() = "kdkernels native kernels (C++ threads, and CUDA where built); see csrc/ for each entry point";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("build_info", &build_info,
        "dict: compiler, cxx_flags, with_cuda, cuda_version, cuda_archs, threads (how _C was built)");
  m.def("cuda_status", &cuda_status,
        "dict: driver_version, runtime_version, device_count, error (initialises the CUDA driver)");

  // ---- HCL (docs/spec.md §1, csrc/common/hcl.h) ----
  m.def(
      "hcl_loss_cpu",
      [](int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft, uintptr_t out, uintptr_t sums,
         const std::vector<int64_t>& planes, const std::vector<int64_t>& H, const std::vector<int64_t>& W,
         const std::vector<double>& coef_mse, const std::vector<std::vector<int64_t>>& pools,
         const std::vector<std::vector<double>>& coefs, const std::vector<double>& scale, int64_t num_threads) {
        kdk::hcl_loss_cpu(dtype, fs, ft, out, sums, planes, H, W,
                          hcl_level_coefs("hcl_loss_cpu", fs.size(), coef_mse, pools, coefs), scale, num_threads);
      },
      py::arg("dtype"), py::arg("fs_ptrs"), py::arg("ft_ptrs"), py::arg("out_ptr"), py::arg("sums_ptr"),
      py::arg("planes"), py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"), py::arg("coefs"),
      py::arg("scale"), py::arg("num_threads"), release(),
      "*out (acc dtype) = sum over levels l of scale[l] * sum of level l's plane partials (one call); "
      "sums (acc dtype) = every plane's bin sums, level by level, for the backward");
  m.def(
      "hcl_loss_backward_cpu",
      [](int dtype, const std::vector<uintptr_t>& fs, const std::vector<uintptr_t>& ft, uintptr_t gout, uintptr_t sums,
         const std::vector<uintptr_t>& grad, const std::vector<int64_t>& planes, const std::vector<int64_t>& H,
         const std::vector<int64_t>& W, const std::vector<double>& coef_mse,
         const std::vector<std::vector<int64_t>>& pools, const std::vector<std::vector<double>>& coefs,
         const std::vector<double>& scale, int64_t num_threads) {
        kdk::hcl_loss_backward_cpu(dtype, fs, ft, gout, sums, grad, planes, H, W,
                                   hcl_level_coefs("hcl_loss_backward_cpu", fs.size(), coef_mse, pools, coefs), scale,
                                   num_threads);
      },
      py::arg("dtype"), py::arg("fs_ptrs"), py::arg("ft_ptrs"), py::arg("gout_ptr"), py::arg("sums_ptr"),
      py::arg("grad_ptrs"), py::arg("planes"), py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"),
      py::arg("coefs"), py::arg("scale"), py::arg("num_threads"), release(),
      "grad[l] (input dtype) = (*gout * scale[l]) * d partial / d fs of every level (one call), "
      "from the bin sums hcl_loss_cpu saved");
  m.def(
      "hcl_fwd_cuda",
      [](int dtype, uintptr_t fs, uintptr_t ft, uintptr_t partial, int64_t planes, int64_t H, int64_t W,
         double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs, uintptr_t stream) {
        const kdk::HclCoefs c = hcl_coefs(coef_mse, pools, coefs);
#if defined(KDKERNELS_WITH_CUDA)
        kdk::hcl_fwd_cuda(dtype, fs, ft, partial, planes, H, W, c, stream);
#else
        (void)dtype, (void)fs, (void)ft, (void)partial, (void)planes, (void)H, (void)W, (void)c, (void)stream;
        throw std::runtime_error("hcl_fwd_cuda: kdkernels._C was built without CUDA");
#endif
      },
      py::arg("dtype"), py::arg("fs_ptr"), py::arg("ft_ptr"), py::arg("partial_ptr"), py::arg("planes"),
      py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"), py::arg("coefs"), py::arg("stream"),
      release(), "partial[p] (acc dtype) of each (n, c) plane, launched on `stream`; see csrc/common/hcl.h");
  m.def(
      "hcl_bwd_cuda",
      [](int dtype, uintptr_t fs, uintptr_t ft, uintptr_t gout, uintptr_t grad, int64_t planes, int64_t H, int64_t W,
         double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs, uintptr_t stream) {
        const kdk::HclCoefs c = hcl_coefs(coef_mse, pools, coefs);
#if defined(KDKERNELS_WITH_CUDA)
        kdk::hcl_bwd_cuda(dtype, fs, ft, gout, grad, planes, H, W, c, stream);
#else
        (void)dtype, (void)fs, (void)ft, (void)gout, (void)grad, (void)planes, (void)H, (void)W, (void)c,
            (void)stream;
        throw std::runtime_error("hcl_bwd_cuda: kdkernels._C was built without CUDA");
#endif
      },
      py::arg("dtype"), py::arg("fs_ptr"), py::arg("ft_ptr"), py::arg("gout_ptr"), py::arg("grad_ptr"),
      py::arg("planes"), py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"), py::arg("coefs"),
      py::arg("stream"), release(), "grad (input dtype) = g * d partial / d fs, g = *gout (acc dtype), launched on `stream`; *gout stays on the device");

  // ---- Hinton KD (docs/spec.md §4, csrc/common/kd.h) ----
  m.def("kd_fwd_cpu", &kdk::kd_fwd_cpu, py::arg("dtype"), py::arg("s_ptr"), py::arg("t_ptr"), py::arg("stats_ptr"),
        py::arg("out_ptr"), py::arg("rows"), py::arg("cols"), py::arg("inv_t"), py::arg("out_scale"),
        py::arg("reduce"), py::arg("num_threads"), release(),
        "stats (rows, 6) in the acc dtype; the loss (out_scale * sum of the rows' KL, or per row) in the "
        "acc dtype; see csrc/common/kd.h");
  m.def("kd_bwd_cpu", &kdk::kd_bwd_cpu, py::arg("dtype"), py::arg("s_ptr"), py::arg("t_ptr"), py::arg("stats_ptr"),
        py::arg("gout_ptr"), py::arg("gout_stride"), py::arg("gout_scale"), py::arg("grad_s_ptr"),
        py::arg("grad_t_ptr"), py::arg("rows"), py::arg("cols"), py::arg("inv_t"), py::arg("num_threads"), release(),
        "grad_s (and grad_t unless grad_t_ptr is 0) from the forward's stats; "
        "g[n] = gout_scale * gout[n * gout_stride], gout in the acc dtype");
  m.def(
      "kd_fwd_cuda",
      [](int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t kl, uintptr_t part, int64_t rows,
         int64_t cols, int64_t split, double inv_t, uintptr_t stream) {
#if defined(KDKERNELS_WITH_CUDA)
        kdk::kd_fwd_cuda(dtype, s, t, stats, kl, part, rows, cols, split, inv_t, stream);
#else
        (void)dtype, (void)s, (void)t, (void)stats, (void)kl, (void)part, (void)rows, (void)cols, (void)split,
            (void)inv_t, (void)stream;
        throw std::runtime_error("kd_fwd_cuda: kdkernels._C was built without CUDA");
#endif
      },
      py::arg("dtype"), py::arg("s_ptr"), py::arg("t_ptr"), py::arg("stats_ptr"), py::arg("kl_ptr"), py::arg("part_ptr"),
      py::arg("rows"), py::arg("cols"), py::arg("split"), py::arg("inv_t"), py::arg("stream"), release(),
      "CUDA kd_fwd_cpu, launched on `stream`: each row in at most `split` segments, whose states go to "
      "part_ptr (rows * split * 5 values of the acc dtype; 0 when split is 1) and are merged in order");
  m.def(
      "kd_bwd_cuda",
      [](int dtype, uintptr_t s, uintptr_t t, uintptr_t stats, uintptr_t gscale, uintptr_t grad_s, uintptr_t grad_t,
         int64_t rows, int64_t cols, double inv_t, uintptr_t stream) {
#if defined(KDKERNELS_WITH_CUDA)
        kdk::kd_bwd_cuda(dtype, s, t, stats, gscale, grad_s, grad_t, rows, cols, inv_t, stream);
#else
        (void)dtype, (void)s, (void)t, (void)stats, (void)gscale, (void)grad_s, (void)grad_t, (void)rows,
            (void)cols, (void)inv_t, (void)stream;
        throw std::runtime_error("kd_bwd_cuda: kdkernels._C was built without CUDA");
#endif
      },
      py::arg("dtype"), py::arg("s_ptr"), py::arg("t_ptr"), py::arg("stats_ptr"), py::arg("gscale_ptr"),
      py::arg("grad_s_ptr"), py::arg("grad_t_ptr"), py::arg("rows"), py::arg("cols"), py::arg("inv_t"),
      py::arg("stream"), release(), "CUDA kd_bwd_cpu, launched on `stream`");

  // ---- FitNets hint (docs/spec.md §3, csrc/cpu/hint.cpp) ----
  m.def("hint_fwd_cpu", &kdk::hint_fwd_cpu, py::arg("dtype"), py::arg("fs_ptr"), py::arg("ft_ptr"),
        py::arg("w_ptr"), py::arg("b_ptr"), py::arg("loss_ptr"), py::arg("gfs_ptr"), py::arg("gw_ptr"),
        py::arg("gb_ptr"), py::arg("gft_ptr"), py::arg("N"), py::arg("Cs"), py::arg("Ct"), py::arg("P"),
        py::arg("num_threads"), release(),
        "loss = sum r^2 (acc dtype) with r = W fs + b - ft, and, where the pointer is not 0, "
        "W^T r (gfs), sum r fs^T (gw, acc dtype), sum r (gb, acc dtype), r (gft); b_ptr 0 = no bias");
  m.def("hint_cpu_isa", &kdk::hint_cpu_isa,
        "variant hint_fwd_cpu runs here: avx512, avx2 or baseline (the widest the CPU has, or $KDKERNELS_CPU_ISA)");

  // ---- ABF fusion (docs/spec.md §2, csrc/cpu/abf.cpp) ----
  m.def("abf_fwd_cpu", &kdk::abf_fwd_cpu, py::arg("dtype"), py::arg("x_ptr"), py::arg("y_ptr"), py::arg("w_ptr"),
        py::arg("b_ptr"), py::arg("out_ptr"), py::arg("z_ptr"), py::arg("N"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("h"), py::arg("w"), py::arg("scale_h"), py::arg("scale_w"), py::arg("num_threads"),
        release(), "out (N,C,H,W) and attention maps z (N,2,H,W, acc dtype); see kdkernels/triton/abf.py");
  m.def("abf_bwd_cpu", &kdk::abf_bwd_cpu, py::arg("dtype"), py::arg("g_ptr"), py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("w_ptr"), py::arg("z_ptr"), py::arg("gx_ptr"), py::arg("gy_ptr"), py::arg("gw_ptr"),
        py::arg("gb_ptr"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("h"), py::arg("w"),
        py::arg("scale_h"), py::arg("scale_w"), py::arg("num_threads"), release(),
        "grad_x, grad_y, and grad_w (4C) and grad_b (2) in the acc dtype, reduced from per-unit partials in a "
        "fixed order");
}
