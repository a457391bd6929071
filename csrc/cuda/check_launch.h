// Turns a failed kernel launch into a C++ exception (pybind11 raises it in Python).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kdk {

inline void check_launch(const char* where) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(where) + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

}  // namespace kdk
