// The operands of an AttentionProblem (flash and block-sparse attention share them): parsing
// buffers into the problem the kernels take, with the checks the kernels rely on, and the
// operand bindings the targets share.
#pragma once

#include <cstdint>
#include <utility>

#include "ffi/common.h"

namespace jaxattn {

// Token positions, segment ids and ALiBi slopes (each 0 elements: absent).
struct TokenOperands {
  const S32Buffer& q_positions;   // [Bp, T]
  const S32Buffer& kv_positions;  // [Bp, S]
  const S32Buffer& q_segments;    // [Bs, T]
  const S32Buffer& kv_segments;   // [Bs, S]
  const F32Buffer& alibi_slopes;  // [Ba, N]
};

struct ProblemOperands {
  const ffi::AnyBuffer& query;
  const ffi::AnyBuffer& key;
  const ffi::AnyBuffer& value;
  const ffi::AnyBuffer& bias;
  const ffi::AnyBuffer& mask;
  const S32Buffer& q_lengths;
  const S32Buffer& kv_lengths;
  const TokenOperands* tokens = nullptr;
};

struct ProblemAttrs {
  float scale;
  float soft_cap;
  bool is_causal;
  int64_t window_left;
  int64_t window_right;
};

// An optional [B', N', T', S'] operand; zero elements means absent.
ffi::Error ParseBroadcast(const ffi::AnyBuffer& buffer, const char* name, Broadcast4* out);

// Points p at the present token operands after checking their shapes against it.
ffi::Error ParseTokens(const TokenOperands& in, AttentionProblem* p);

// Query, key and value of a problem with an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error ParseQueryKeyValue(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                              const ffi::AnyBuffer& value, int64_t batch, AttentionProblem* p);

// Builds and checks the problem for an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error ParseProblem(const ProblemOperands& in, const ProblemAttrs& attrs, int64_t batch,
                        AttentionProblem* p);

// Checks what every backward target takes besides the problem (the forward's out and lse,
// the cotangents dout and dlse) and the gradients it writes (nullptr: not written), and
// points args at them.
ffi::Error ParseBackwardArgs(const AttentionProblem& p, ffi::DataType dtype,
                             const ffi::AnyBuffer& out, const F32Buffer& lse,
                             const ffi::AnyBuffer& dout, const F32Buffer& dlse,
                             ffi::AnyBuffer* dq, ffi::AnyBuffer* dk, ffi::AnyBuffer* dv,
                             ffi::Buffer<ffi::F32>* dlogits, FlashBackwardArgs* args,
                             const char* target = "backward");

// The token operands of the flash and block-sparse targets, after their other operands.
template <typename Binding>
auto BindTokens(Binding binding) {
  return std::move(binding).template Arg<S32Buffer>()  // query_positions (0 elements: none)
      .template Arg<S32Buffer>()                        // key_value_positions
      .template Arg<S32Buffer>()                        // query_segment_ids
      .template Arg<S32Buffer>()                        // key_value_segment_ids
      .template Arg<ffi::Buffer<ffi::F32>>();           // alibi_slopes
}

}  // namespace jaxattn
