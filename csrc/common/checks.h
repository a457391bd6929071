// Argument checks every native entry point shares (host code only).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace kdk {

// Python hands data_ptr() of every tensor; 0 means an empty or missing tensor slipped through.
inline void check_pointers(const char* where, std::initializer_list<uintptr_t> ptrs) {
  for (uintptr_t p : ptrs)
    if (p == 0) throw std::invalid_argument(std::string(where) + ": null data pointer");
}

}  // namespace kdk
