// A minimal deterministic thread split for the CPU kernels (no OpenMP: torch
// ships its own runtime). parallel_for(n, T, fn) calls fn(begin, end) on the
// fixed chunks [n*t/T, n*(t+1)/T); chunk 0 runs on the calling thread. Which
// thread runs a chunk never changes what it computes, so results do not depend
// on the thread count as long as every output is owned by one index.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace kdk {

// Threads worth starting for `work` units when each thread should get at least
// `min_work_per_thread` of them; `requested` <= 0 means "all hardware threads".
inline int64_t choose_threads(int64_t requested, int64_t items, int64_t work, int64_t min_work_per_thread) {
  if (requested <= 0) requested = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, min_work_per_thread));
  return std::max<int64_t>(1, std::min({requested, items, by_work}));
}

template <typename F>
void parallel_for(int64_t n, int64_t num_threads, F&& fn) {
  if (n <= 0) return;
  const int64_t T = std::max<int64_t>(1, std::min(num_threads, n));
  if (T == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::exception_ptr> errors(T);
  auto run = [&](int64_t t) {
    try {
      fn(n * t / T, n * (t + 1) / T);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(T - 1);
  int64_t started = 1;
  try {
    for (; started < T; ++started) workers.emplace_back(run, started);
  } catch (...) {
    // Could not start another thread: run the remaining chunks here.
  }
  for (int64_t t = started; t < T; ++t) run(t);
  run(0);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace kdk
