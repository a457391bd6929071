// HCL (docs/spec.md §1): parameters and the four entry points of kdkernels._C.
//
// Per (n, c) plane of H x W with d = fs - ft, and bins (i, k) of each pool l_j
// (sum S over the bin, area = rows * cols of the bin):
//   forward   partial[p] = coef_mse * sum d^2 + sum_j coefs[j] * sum_{bins of l_j} (S / area)^2
//   backward  grad[r, c] = g * ( 2 coef_mse d[r, c]
//                                + sum_j 2 coefs[j] * sum_{bins of l_j covering (r, c)} S / area^2 )
// with g = *gout (one scalar of the accumulation type; a device pointer on CUDA).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kdk {

// The pools are a suffix of (4, 2, 1): npools = 3 -> (4, 2, 1), 2 -> (2, 1), 1 -> (1,), 0 -> ().
struct HclCoefs {
  double mse = 0.0;
  int npools = 0;
  double pool[3] = {0.0, 0.0, 0.0};  // coefs[j] of pool size 1 << (npools - 1 - j)
};

inline int hcl_pool_size(int npools, int j) { return 1 << (npools - 1 - j); }

// Bins of all pools of a plane (pool by pool, each row-major): 21 for (4, 2, 1), 5 for (2, 1),
// 1 for (1), 0 for none. The CPU forward saves each plane's bin sums in this order for its backward.
inline int64_t hcl_bins(int npools) {
  int64_t n = 0;
  for (int j = 0; j < npools; ++j) n += int64_t(hcl_pool_size(npools, j)) * hcl_pool_size(npools, j);
  return n;
}

// Validates the Python-side lists; throws std::invalid_argument (ValueError in Python).
inline HclCoefs make_hcl_coefs(double coef_mse, const int64_t* pools, int64_t npools, const double* coefs,
                               int64_t ncoefs) {
  if (npools != ncoefs)
    throw std::invalid_argument("hcl: pools and coefs differ in length (" + std::to_string(npools) + " vs " +
                                std::to_string(ncoefs) + ")");
  if (npools > 3) throw std::invalid_argument("hcl: at most 3 pool sizes, a suffix of (4, 2, 1)");
  HclCoefs c;
  c.mse = coef_mse;
  c.npools = int(npools);
  for (int j = 0; j < c.npools; ++j) {
    if (pools[j] != hcl_pool_size(c.npools, j))
      throw std::invalid_argument("hcl: pools must be a suffix of (4, 2, 1), e.g. [4, 2, 1], [2, 1], [1] or []");
    c.pool[j] = coefs[j];
  }
  return c;
}

inline void hcl_check_sizes(const char* where, int64_t planes, int64_t H, int64_t W) {
  if (planes < 0 || H < 0 || W < 0)
    throw std::invalid_argument(std::string(where) + ": negative size");
  if (H >= (int64_t(1) << 28) || W >= (int64_t(1) << 28) || H * W >= (int64_t(1) << 31))
    throw std::invalid_argument(std::string(where) + ": one plane must have fewer than 2^31 elements");
}

// Pointers are addresses (tensor.data_ptr()); all inputs contiguous (planes, H, W).
#if defined(KDKERNELS_WITH_CUDA)
void hcl_fwd_cuda(int dtype, uintptr_t fs, uintptr_t ft, uintptr_t partial, int64_t planes, int64_t H, int64_t W,
                  const HclCoefs& coefs, uintptr_t stream);
void hcl_bwd_cuda(int dtype, uintptr_t fs, uintptr_t ft, uintptr_t gout, uintptr_t grad, int64_t planes, int64_t H,
                  int64_t W, const HclCoefs& coefs, uintptr_t stream);
#endif

}  // namespace kdk
