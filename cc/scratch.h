// Per-thread scratch memory of the kernel tasks, for one instruction set (see simd.h for how
// this file is included): flash, decode and gated linear attention tasks carve their
// buffers from one grow-only block per thread.
#pragma once
#include "simd.h"

// Grow-only per-thread scratch; tasks carve their buffers from it.
struct Scratch {
  float* data = nullptr;
  int64_t capacity = 0;
  ~Scratch() { __builtin_free(data); }
  float* Get(int64_t floats) {
#ifdef JAXATTN_EXACT_SCRATCH
    // Sanitizer builds: a fresh block of exactly the requested size, so that AddressSanitizer
    // reports a task that carves more than it asked for (the grow-only block would hide it).
    __builtin_free(data);
    capacity = floats;
    data = static_cast<float*>(__builtin_malloc(MaxI(floats, 1) * sizeof(float)));
    return data;
#endif
    if (floats > capacity) {
      __builtin_free(data);
      capacity = RoundUp(floats, 4096);
      data = static_cast<float*>(__builtin_aligned_alloc(64, capacity * sizeof(float)));
      if (data == nullptr) capacity = 0;  // the caller sees nullptr; a later call retries
    }
    return data;
  }
  // The block a task reserved with Get, for a use of `floats` of it: no allocation, so nothing
  // to fail or check at the use (a sanitizer build's Get would otherwise hand each use a fresh
  // block). A use past the reservation is a bug of the task's request: sanitizer builds trap.
  float* Reserved(int64_t floats) const {
#ifdef JAXATTN_EXACT_SCRATCH
    if (data == nullptr || floats > capacity) __builtin_trap();
#else
    (void)floats;
#endif
    return data;
  }
};
static thread_local Scratch tls_scratch;

// Added to every task's scratch request as a safety margin, except in sanitizer builds, where
// requests are exact so that AddressSanitizer catches a task carving more than it asked for.
#ifdef JAXATTN_EXACT_SCRATCH
constexpr int64_t kScratchSlack = 0;
#else
constexpr int64_t kScratchSlack = 1024;
#endif

// Carves buffers, in order, from one block (each rounded up to 16 floats: 64 bytes). A Carver
// over no memory only counts (used): CarveTaskScratch runs a task's carving on one first, so
// that the request is exactly what the task takes, stated once.
struct Carver {
  float* base = nullptr;
  int64_t used = 0;  // floats
  float* Take(int64_t floats) {
    float* out = base != nullptr ? base + used : nullptr;
    used += RoundUp(floats, 16);
    return out;
  }
};
