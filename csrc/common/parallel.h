// CPU threading for the kernels (no OpenMP runtime of our own: torch ships one).
//
// run_team(helpers, body) runs body on the calling thread and on up to
// `helpers` other threads at once; parallel_for(n, T, fn) calls fn(begin, end)
// on the fixed chunks [n*t/T, n*(t+1)/T), claimed by the threads of one team;
// parallel_for_each(n, T, fn) calls fn(i) for each i, claimed one at a time.
// Which thread runs a chunk never changes what it computes, so results do not
// depend on the thread count as long as every output is owned by one index.
//
// The team is torch's own OpenMP team when torch's OpenMP runtime is in the
// process (GOMP_parallel, found at run time: kdkernels is built without torch).
// A separate pool would share the cores with torch's OpenMP workers, which
// spin-wait for a while after every parallel torch op: three busy threads on two
// cores made the C++ kernels up to a third slower right after a torch op.
// Otherwise (no OpenMP runtime found, or in a forked child, where the parent's
// OpenMP threads do not exist and libgomp cannot recover) it is WorkerPool: a
// few persistent helper threads, so a call does not pay for starting threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#define KDK_HAVE_PTHREAD_ATFORK 1
#else
#define KDK_HAVE_PTHREAD_ATFORK 0
#endif

namespace kdk {

// Threads worth starting for `work` units when each thread should get at least
// `min_work_per_thread` of them; `requested` <= 0 means "all hardware threads".
inline int64_t choose_threads(int64_t requested, int64_t items, int64_t work, int64_t min_work_per_thread) {
  if (requested <= 0) requested = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(1, min_work_per_thread));
  return std::max<int64_t>(1, std::min({requested, items, by_work}));
}

// A few persistent helper threads. WorkerPool::run(helpers, body) calls body()
// on the calling thread and wakes up to `helpers` pool threads to call it too,
// then returns once the caller's call has returned and no pool thread is still
// inside body. body must claim its work dynamically: a helper that wakes up late
// (its core busy with another process, or torch's OpenMP threads spinning) finds
// nothing left and is not waited for, so the caller never idles behind a thread
// that has not started. One run at a time; a concurrent caller runs body alone.
class WorkerPool {
 public:
  static void run(int64_t helpers, const std::function<void()>& body) {
    WorkerPool& pool = instance();
    std::unique_lock<std::mutex> busy(pool.run_mutex_, std::try_to_lock);
    if (helpers <= 0 || !busy.owns_lock()) {
      body();
      return;
    }
    pool.start(helpers);
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.task_ = &body;
      pool.wanted_ = helpers;
      ++pool.epoch_;
    }
    pool.wake_.notify_all();
    body();
    std::unique_lock<std::mutex> lock(pool.mutex_);
    pool.task_ = nullptr;  // helpers that have not joined yet skip this task
    pool.wanted_ = 0;
    pool.idle_.wait(lock, [&] { return pool.active_ == 0; });
  }

  // True in a forked child (a DataLoader worker), where the parent's threads,
  // its pool's and its OpenMP team's, do not exist.
  static std::atomic<bool>& forked() {
    static std::atomic<bool> flag{false};
    return flag;
  }

  // The fork handler of the child: a fresh pool (the old one's mutexes may have
  // been held at the fork; it is abandoned, not destroyed).
  static void after_fork_in_child() {
    forked().store(true);
    current() = new WorkerPool();
  }

 private:
  // Never destroyed: its threads live until the process ends.
  static WorkerPool*& current() {
    static WorkerPool* pool = new WorkerPool();
    return pool;
  }
  static WorkerPool& instance() { return *current(); }

  void start(int64_t helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (; threads_ < helpers; ++threads_) {
      try {
        std::thread([this] { loop(); }).detach();
      } catch (...) {
        break;  // no more threads: the caller does the work
      }
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return task_ != nullptr && epoch_ != seen && wanted_ > 0; });
      seen = epoch_;
      --wanted_;
      ++active_;
      const std::function<void()>* task = task_;
      lock.unlock();
      (*task)();  // body catches its own exceptions
      lock.lock();
      if (--active_ == 0) idle_.notify_all();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, idle_;
  const std::function<void()>* task_ = nullptr;
  uint64_t epoch_ = 0;
  int64_t wanted_ = 0, active_ = 0, threads_ = 0;
};

// Called once when kdkernels._C is imported (before any DataLoader worker is
// forked): a forked child then never enters the parent's OpenMP team or pool.
inline void install_fork_handler() {
#if KDK_HAVE_PTHREAD_ATFORK
  pthread_atfork(nullptr, nullptr, &WorkerPool::after_fork_in_child);
#endif
}

// libgomp's entry point for `#pragma omp parallel` (also provided by LLVM's and
// Intel's OpenMP runtimes): fn(data) on a team of num_threads (0 = default).
using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

inline GompParallelFn gomp_parallel() {
#if KDK_HAVE_PTHREAD_ATFORK
  static const GompParallelFn fn = [] {
    const char* env = std::getenv("KDKERNELS_CPU_THREADS");
    if (env != nullptr && std::string(env) == "pool") return GompParallelFn(nullptr);
    return reinterpret_cast<GompParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  }();
  return WorkerPool::forked().load() ? nullptr : fn;
#else
  return nullptr;
#endif
}

inline void call_team_body(void* body) { (*static_cast<const std::function<void()>*>(body))(); }

// body() on the calling thread and up to `helpers` more threads at once. body
// must claim its work dynamically (a thread may join late, or not at all) and
// must not throw.
inline void run_team(int64_t helpers, const std::function<void()>& body) {
  if (helpers <= 0) {
    body();
    return;
  }
  if (const GompParallelFn omp = gomp_parallel()) {
    omp(&call_team_body, const_cast<void*>(static_cast<const void*>(&body)), unsigned(helpers + 1), 0);
    return;
  }
  WorkerPool::run(helpers, body);
}

// What run_team uses here, for `python -m kdkernels info`.
inline const char* team_kind() {
  return gomp_parallel() != nullptr ? "torch's OpenMP team (GOMP_parallel)" : "persistent std::thread pool";
}

namespace detail {
// fn(k) for every k in [0, items), each k claimed by one thread of a team of up
// to T; the first exception stops the claims and is rethrown on the caller.
template <typename F>
void claim_each(int64_t items, int64_t T, F&& fn) {
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  run_team(T - 1, [&] {
    try {
      for (int64_t k = next.fetch_add(1); k < items; k = next.fetch_add(1)) fn(k);
    } catch (...) {
      next.store(items);  // the others stop at their next claim
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}
}  // namespace detail

// fn(begin, end) on the fixed chunks [n*t/T, n*(t+1)/T), T = min(num_threads, n).
template <typename F>
void parallel_for(int64_t n, int64_t num_threads, F&& fn) {
  if (n <= 0) return;
  const int64_t T = std::max<int64_t>(1, std::min(num_threads, n));
  if (T == 1) {
    fn(int64_t(0), n);
    return;
  }
  detail::claim_each(T, T, [&](int64_t t) { fn(n * t / T, n * (t + 1) / T); });
}

// fn(i) for every i in [0, n), each index claimed on its own by a team of up to
// num_threads: for a few items of real work each, where a thread that joins late
// (its core busy elsewhere) should still take what is left.
template <typename F>
void parallel_for_each(int64_t n, int64_t num_threads, F&& fn) {
  if (n <= 0) return;
  const int64_t T = std::max<int64_t>(1, std::min(num_threads, n));
  if (T == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  detail::claim_each(n, T, fn);
}

}  // namespace kdk
