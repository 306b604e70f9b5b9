// The custom-call targets of cc/ffi/, as plain pointers for cc/module.cc to hand to Python
// (so that only the files in cc/ffi/ include the XLA FFI headers).
#pragma once

#include <cstddef>
#include <vector>

namespace jaxattn {

struct FfiTarget {
  const char* name;  // versioned: a changed operand or attribute layout gets a new name
  void* handler;     // XLA_FFI_Handler*
};

// Every target of every op family (targets.cc).
std::vector<FfiTarget> FfiTargets();

// Wraps the index-th target's handler so that it also accepts the shard views of
// jaxattn/_sharding.py (shard_views.cc); returns the handler to register.
void* WithShardViews(size_t index, void* handler);

}  // namespace jaxattn
