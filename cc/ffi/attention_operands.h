// The operands of an AttentionProblem (flash and block-sparse attention share them): parsing
// buffers and attributes into the problem the kernels take, with the checks the kernels rely
// on.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ffi/common.h"

namespace jaxattn {

// Token positions, segment ids, ALiBi slopes and dropout seeds (each 0 elements: absent), the
// operands that end the argument list of the _v2 and _v3 flash and block-sparse targets (the
// _v1 layouts predate them: all absent; the _v2 layouts predate the seeds).
struct TokenOperands {
  S32Buffer q_positions = AbsentBuffer<ffi::S32>();   // [Bp, T]
  S32Buffer kv_positions = AbsentBuffer<ffi::S32>();  // [Bp, S]
  S32Buffer q_segments = AbsentBuffer<ffi::S32>();    // [Bs, T]
  S32Buffer kv_segments = AbsentBuffer<ffi::S32>();   // [Bs, S]
  F32Buffer alibi_slopes = AbsentBuffer<ffi::F32>();  // [Ba, N]
  // _v3 layouts: the dropout seeds [Bd, N, 2] after the operands above, and the keep
  // threshold from the attributes (cc/dropout.h); 0 (the older layouts) means no dropout.
  U32Buffer dropout_seeds = AbsentBuffer<ffi::U32>();
  int64_t dropout_threshold = 0;
};
constexpr size_t kNumTokenOperands = 5;      // the _v2 layouts
constexpr size_t kNoTokenOperands = 0;       // the _v1 layouts
constexpr size_t kDropoutTokenOperands = 6;  // the _v3 layouts: the _v2 ones, then the seeds

// The token operands among the trailing operands `rest`: the first `count` of them
// (kNoTokenOperands, kNumTokenOperands or kDropoutTokenOperands); the rest stay absent.
ffi::Error ParseTokenOperands(const ffi::RemainingArgs& rest, size_t count, TokenOperands* tokens);

// The operands every flash target starts with.
struct ProblemOperands {
  const ffi::AnyBuffer& query;
  const ffi::AnyBuffer& key;
  const ffi::AnyBuffer& value;
  const ffi::AnyBuffer& bias;
  const ffi::AnyBuffer& mask;
  const S32Buffer& q_lengths;
  const S32Buffer& kv_lengths;
};

// The attributes of every flash target (decoded by name from the call's attributes).
struct FlashAttrs {
  float scale;
  float soft_cap;
  bool is_causal;
  int64_t window_left;
  int64_t window_right;
};

// The attributes of the _v3 flash targets: those above and the dropout keep threshold
// (cc/dropout.h; 0: no dropout).
struct FlashDropoutAttrs : FlashAttrs {
  int64_t dropout_threshold;
};

// The dropout threshold an attribute struct carries (0 for the layouts without dropout).
inline int64_t DropoutThreshold(const FlashAttrs&) { return 0; }
inline int64_t DropoutThreshold(const FlashDropoutAttrs& attrs) { return attrs.dropout_threshold; }

// An optional [B', N', T', S'] operand; zero elements means absent.
ffi::Error ParseBroadcast(const ffi::AnyBuffer& buffer, const char* name, Broadcast4* out);

// Points p at the present token operands after checking their shapes against it.
ffi::Error ParseTokens(const TokenOperands& tokens, AttentionProblem* p);

// Query, key and value of a problem with an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error ParseQueryKeyValue(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                              const ffi::AnyBuffer& value, int64_t batch, AttentionProblem* p);

// Builds and checks the problem for an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error ParseProblem(const ProblemOperands& in, const TokenOperands& tokens,
                        const FlashAttrs& attrs, int64_t batch, AttentionProblem* p);

// Checks what every backward target takes besides the problem (the forward's out and lse,
// the cotangents dout and dlse) and the gradients it writes (nullptr: not written), and
// points the arguments of the problem's kernels at them: args (float32, bfloat16, float16
// problems; lse, dlse and dlogits float32) or args64 (float64 problems, all float64).
ffi::Error ParseBackwardArgs(const AttentionProblem& p, ffi::DataType dtype,
                             const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse,
                             const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dlse,
                             ffi::AnyBuffer* dq, ffi::AnyBuffer* dk, ffi::AnyBuffer* dv,
                             ffi::AnyBuffer* dlogits, FlashBackwardArgs* args,
                             F64BackwardArgs* args64, const char* target = "backward");

// The forward's results: out in the problem's dtype, lse [B, T, N] in LseType.
ffi::Error CheckForwardResults(const AttentionProblem& p, ffi::DataType dtype,
                               const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse);

// Runs the forward of a checked problem into out and lse (CheckForwardResults): the float64
// kernels for a float64 problem, else the block-sparse kernels over `tables` or, without
// tables (nullptr), the dense flash kernels. Out of scratch memory: the error of `op`.
ffi::Error RunAttentionForward(const char* op, const AttentionProblem& p,
                               const BlockSparseTables* tables, const ffi::AnyBuffer& out,
                               const ffi::AnyBuffer& lse, ffi::ThreadPool pool);

// The backward likewise, with the arguments ParseBackwardArgs filled in (args64 for a
// float64 problem, args otherwise).
ffi::Error RunAttentionBackward(const char* op, const AttentionProblem& p,
                                const BlockSparseTables* tables, const FlashBackwardArgs& args,
                                const F64BackwardArgs& args64, ffi::ThreadPool pool);

}  // namespace jaxattn

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::FlashAttrs, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"),
                                      StructMember<bool>("is_causal"),
                                      StructMember<int64_t>("window_left"),
                                      StructMember<int64_t>("window_right"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::FlashDropoutAttrs, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"),
                                      StructMember<bool>("is_causal"),
                                      StructMember<int64_t>("window_left"),
                                      StructMember<int64_t>("window_right"),
                                      StructMember<int64_t>("dropout_threshold"));
