// Float64 attention: the same problems as attention.h (AttentionProblem with dtype kF64,
// DecodeAttentionProblem with dtype kF64 and an unquantized cache), computed and accumulated
// in float64, with float64 log-sum-exps. Plain C++ on raw pointers, no XLA, no Python.
//
// One kernel family for every float64 op (cc/f64_impl.h, compiled per instruction set like
// the float32 kernels): the flash forward, backward and tangent, block-sparse forward and
// backward (the same functions given the tables), and decoding (any T, contiguous or paged
// caches). The float32 kernels' semantics hold unchanged: masks, lengths, positions, segment
// ids, ALiBi, soft cap, dropout (the same keep mask, cc/dropout.h), fully masked rows (output
// 0, lse -inf, zero gradients). Deterministic for any thread count: every output element is
// written by one task, whose summation order depends on the shape only.
#pragma once

#include <cstdint>

#include "attention.h"

namespace jaxattn {

struct F64ForwardResult {
  double* out = nullptr;  // [B,T,N,Hv]
  double* lse = nullptr;  // [B,T,N]
};

struct F64BackwardArgs {
  const double* out = nullptr;   // [B,T,N,Hv]
  const double* lse = nullptr;   // [B,T,N]
  const double* dout = nullptr;  // [B,T,N,Hv]
  const double* dlse = nullptr;  // [B,T,N] or nullptr
  double* dq = nullptr;          // [B,T,N,H] or nullptr
  double* dk = nullptr;          // [B,S,K,H] or nullptr
  double* dv = nullptr;          // [B,S,K,Hv] or nullptr
  double* dlogits = nullptr;     // [B,N,T,S] or nullptr: d loss / d (logits after bias)
};

struct F64JvpResult {
  double* dout = nullptr;  // [B,T,N,Hv]
  double* dlse = nullptr;  // [B,T,N]
};

// Each returns 0, or the bytes of a scratch allocation that failed (outputs incomplete).
// sparse: nullptr for flash attention, else the block-sparse tables (checked by
// ValidateBlockSparse), whose tiles alone are visited.
int64_t FlashForwardF64(const AttentionProblem& problem, const BlockSparseTables* sparse,
                        const F64ForwardResult& result, const Parallel& parallel);
int64_t FlashBackwardF64(const AttentionProblem& problem, const BlockSparseTables* sparse,
                         const F64BackwardArgs& args, const Parallel& parallel);
// The tangents' bias (if any) may be float64 or any float dtype of the kernels.
int64_t FlashJvpF64(const AttentionProblem& problem, const FlashTangents& tangents,
                    const double* out, const double* lse, const F64JvpResult& result,
                    const Parallel& parallel);
// Any T; the cache must be unquantized (cache_quant kNone), in float64.
int64_t DecodeForwardF64(const DecodeAttentionProblem& problem, const F64ForwardResult& result,
                         const Parallel& parallel);

}  // namespace jaxattn
