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

#include "common/hcl.h"

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

namespace {

kdk::HclCoefs hcl_coefs(double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs) {
  return kdk::make_hcl_coefs(coef_mse, pools.data(), int64_t(pools.size()), coefs.data(), int64_t(coefs.size()));
}

py::dict build_info() {
  py::dict info;
#if defined(__VERSION__)
  info["compiler"] = std::string(__VERSION__);
#else
  info["compiler"] = py::none();
#endif
  info["cxx_flags"] = std::string(KDKERNELS_CXX_FLAGS);
  info["threads"] = "std::thread";
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
  m.doc() = "kdkernels native kernels (C++ threads, and CUDA where built); see csrc/ for each entry point";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("build_info", &build_info,
        "dict: compiler, cxx_flags, with_cuda, cuda_version, cuda_archs, threads (how _C was built)");
  m.def("cuda_status", &cuda_status,
        "dict: driver_version, runtime_version, device_count, error (initialises the CUDA driver)");

  // ---- HCL (SPEC section 1, csrc/common/hcl.h) ----
  m.def(
      "hcl_fwd_cpu",
      [](int dtype, uintptr_t fs, uintptr_t ft, uintptr_t partial, int64_t planes, int64_t H, int64_t W,
         double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs,
         int64_t num_threads) {
        kdk::hcl_fwd_cpu(dtype, fs, ft, partial, planes, H, W, hcl_coefs(coef_mse, pools, coefs), num_threads);
      },
      py::arg("dtype"), py::arg("fs_ptr"), py::arg("ft_ptr"), py::arg("partial_ptr"), py::arg("planes"),
      py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"), py::arg("coefs"), py::arg("num_threads"),
      release(), "partial[p] (acc dtype) of each (n, c) plane; see csrc/common/hcl.h");
  m.def(
      "hcl_bwd_cpu",
      [](int dtype, uintptr_t fs, uintptr_t ft, uintptr_t gout, uintptr_t grad, int64_t planes, int64_t H, int64_t W,
         double coef_mse, const std::vector<int64_t>& pools, const std::vector<double>& coefs,
         int64_t num_threads) {
        kdk::hcl_bwd_cpu(dtype, fs, ft, gout, grad, planes, H, W, hcl_coefs(coef_mse, pools, coefs), num_threads);
      },
      py::arg("dtype"), py::arg("fs_ptr"), py::arg("ft_ptr"), py::arg("gout_ptr"), py::arg("grad_ptr"),
      py::arg("planes"), py::arg("H"), py::arg("W"), py::arg("coef_mse"), py::arg("pools"), py::arg("coefs"),
      py::arg("num_threads"), release(), "grad (input dtype) = g * d partial / d fs, g = *gout (acc dtype)");
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
      release(), "CUDA hcl_fwd_cpu, launched on `stream`");
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
      py::arg("stream"), release(), "CUDA hcl_bwd_cpu, launched on `stream`; *gout stays on the device");
}
