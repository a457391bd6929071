// Bins of adaptive_avg_pool along one axis: bin i of l over an axis of length A
// covers [floor(i*A/l), ceil((i+1)*A/l)); neighbouring bins overlap when l does
// not divide A, and several bins may cover the same index when A < l.
#pragma once

#include "macros.h"

namespace kdk {

template <typename I> KDK_HD I pool_bin_start(I i, I length, I l) { return (i * length) / l; }

template <typename I> KDK_HD I pool_bin_end(I i, I length, I l) { return ((i + 1) * length + l - 1) / l; }

// x in bin i  <=>  i*A < l*(x+1)  and  l*x < (i+1)*A   (no division).
template <typename I> KDK_HD bool pool_bin_covers(I i, I x, I length, I l) {
  return i * length < l * (x + 1) && l * x < (i + 1) * length;
}

}  // namespace kdk
