// Keeps _C loadable on glibc 2.28 (RHEL/Rocky 8, Ubuntu 20.04, ...) when it is
// built on a newer glibc. Linux x86-64 and aarch64 only; setup.py links it in.
//
// glibc 2.29-2.34 gave some symbols a new default version (libm's exp/log/pow
// in 2.29; the pthread, dl*, sem_* and shm_* functions that moved into libc
// in 2.34). A reference compiled on such a system records the new version,
// and the old dynamic loader then refuses the whole library. The references
// come from our objects, from libstdc++.a (linked statically so that nodes
// need no GCC 12 libstdc++) and from libcudart_static.a, so pinning them with
// `.symver` in our own sources would not reach them all. Instead setup.py
// links with `-Wl,--wrap=NAME` for every NAME listed below (it reads the
// KDK_GLIBC_PIN lines of this file): ld renames each undefined reference NAME
// to __wrap_NAME, defined here as a jump to NAME at the version glibc has
// exported since before 2.28 (same function, same arguments; a tail jump keeps
// the caller's return address, which dlsym/dlopen look at). glibc >= 2.34
// still exports those old versions, so the library loads on old and new nodes.
//
// Two symbols have no old version, only a libstdc++.a built on a new glibc
// refers to them, and we provide them ourselves (also through --wrap):
//   __libc_single_threaded (2.32): libstdc++ skips atomic reference counts when
//     it is nonzero; 0 means "maybe threaded", always correct.
//   arc4random (2.36): used by std::random_device, which _C never constructs;
//     served from getentropy (2.25) so that it stays correct if it ever is.
#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__)
#define KDK_GLIBC_BASE "GLIBC_2.2.5"  // the first glibc version of the x86-64 ABI
#define KDK_JUMP(target) "jmp " target "@PLT"
#else
#define KDK_GLIBC_BASE "GLIBC_2.17"  // the first glibc version of the aarch64 ABI
#define KDK_JUMP(target) "b " target  // the linker routes a branch to a shared-library symbol through the PLT
#endif

// __wrap_NAME: a hidden function that jumps to NAME@VERSION (through the PLT).
#define KDK_GLIBC_PIN_AT(name, version)                                         \
  asm(".symver kdk_glibc_" #name ", " #name "@" version "\n"                    \
      ".text\n"                                                                 \
      ".globl __wrap_" #name "\n"                                               \
      ".hidden __wrap_" #name "\n"                                              \
      ".type __wrap_" #name ", %function\n"                                     \
      "__wrap_" #name ":\n"                                                     \
      "  " KDK_JUMP("kdk_glibc_" #name) "\n"                                     \
      ".size __wrap_" #name ", .-__wrap_" #name "\n");
#define KDK_GLIBC_PIN(name) KDK_GLIBC_PIN_AT(name, KDK_GLIBC_BASE)

// libm: new versions in glibc 2.29
KDK_GLIBC_PIN(exp)
KDK_GLIBC_PIN(exp2)
KDK_GLIBC_PIN(log)
KDK_GLIBC_PIN(log2)
KDK_GLIBC_PIN(pow)
// libdl -> libc in glibc 2.34
KDK_GLIBC_PIN(dlopen)
KDK_GLIBC_PIN(dlclose)
KDK_GLIBC_PIN(dlsym)
KDK_GLIBC_PIN(dlvsym)
KDK_GLIBC_PIN(dlerror)
#if defined(__x86_64__)
KDK_GLIBC_PIN_AT(dlmopen, "GLIBC_2.3.4")  // dlmopen came after the x86-64 ABI's first version
#else
KDK_GLIBC_PIN(dlmopen)
#endif
// libpthread -> libc in glibc 2.34
KDK_GLIBC_PIN(pthread_create)
KDK_GLIBC_PIN(pthread_detach)
KDK_GLIBC_PIN(pthread_join)
KDK_GLIBC_PIN(pthread_kill)
KDK_GLIBC_PIN(pthread_once)
KDK_GLIBC_PIN(pthread_key_create)
KDK_GLIBC_PIN(__pthread_key_create)
KDK_GLIBC_PIN(pthread_key_delete)
KDK_GLIBC_PIN(pthread_getspecific)
KDK_GLIBC_PIN(pthread_setspecific)
KDK_GLIBC_PIN(pthread_mutex_trylock)
KDK_GLIBC_PIN(pthread_mutexattr_init)
KDK_GLIBC_PIN(pthread_mutexattr_destroy)
KDK_GLIBC_PIN(pthread_mutexattr_settype)
KDK_GLIBC_PIN(pthread_mutexattr_setpshared)
KDK_GLIBC_PIN(pthread_condattr_setpshared)
KDK_GLIBC_PIN(pthread_spin_init)
KDK_GLIBC_PIN(pthread_spin_destroy)
KDK_GLIBC_PIN(pthread_spin_lock)
KDK_GLIBC_PIN(pthread_spin_trylock)
KDK_GLIBC_PIN(pthread_spin_unlock)
KDK_GLIBC_PIN(pthread_rwlock_init)
KDK_GLIBC_PIN(pthread_rwlock_destroy)
KDK_GLIBC_PIN(pthread_rwlock_rdlock)
KDK_GLIBC_PIN(pthread_rwlock_wrlock)
KDK_GLIBC_PIN(pthread_rwlock_tryrdlock)
KDK_GLIBC_PIN(pthread_rwlock_trywrlock)
KDK_GLIBC_PIN(pthread_rwlock_timedrdlock)
KDK_GLIBC_PIN(pthread_rwlock_timedwrlock)
KDK_GLIBC_PIN(pthread_rwlock_unlock)
KDK_GLIBC_PIN(pthread_rwlockattr_init)
KDK_GLIBC_PIN(pthread_rwlockattr_destroy)
KDK_GLIBC_PIN(pthread_rwlockattr_setpshared)
KDK_GLIBC_PIN(sem_init)
KDK_GLIBC_PIN(sem_destroy)
KDK_GLIBC_PIN(sem_post)
KDK_GLIBC_PIN(sem_wait)
KDK_GLIBC_PIN(sem_trywait)
KDK_GLIBC_PIN(sem_timedwait)
// librt -> libc in glibc 2.34
KDK_GLIBC_PIN(shm_open)
KDK_GLIBC_PIN(shm_unlink)

// No old version exists for these two (see the top of the file).
extern "C" {
__attribute__((visibility("hidden"))) char __wrap___libc_single_threaded = 0;  // KDK_GLIBC_PIN(__libc_single_threaded)

__attribute__((visibility("hidden"))) uint32_t __wrap_arc4random(void) {  // KDK_GLIBC_PIN(arc4random)
  uint32_t value = 0;
  if (getentropy(&value, sizeof value) == 0) return value;
  const int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);  // kernels before 3.17 lack getrandom
  if (fd >= 0) {
    const ssize_t got = read(fd, &value, sizeof value);
    close(fd);
    if (got == ssize_t(sizeof value)) return value;
  }
  abort();  // arc4random cannot report failure
}
}  // extern "C"

#endif
