// Public interface of the gated linear attention kernels (GLA, RetNet retention, causal linear
// attention): plain C++ on raw pointers, no XLA, no Python.
//
// Per batch element b and head n, with q_t, k_t, g_t in R^Hk and v_t in R^Hv (rows of query,
// key, log_gate [B,T,N,Hk] and value [B,T,N,Hv]):
//     S_0 = initial_state[b, n] (float32 [Hk, Hv]) or 0
//     S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
//     out_t = scale * q_t S_t
// Every operand with a batch dimension is read at batch index b % its batch size (as the
// attention kernels, attention.h), so a vmapped or broadcast operand needs no copy.
#pragma once

#include <cstdint>

#include "attention.h"
#include "parallel.h"

namespace jaxattn {

struct GatedLinearProblem {
  DType dtype = DType::kF32;       // query, key, value, out
  DType gate_dtype = DType::kF32;  // log_gate
  int64_t batch = 0;               // B of the outputs; every operand batch divides it
  int64_t seq_len = 0, num_heads = 0, key_dim = 0, value_dim = 0;
  int64_t q_batch = 0, k_batch = 0, v_batch = 0, g_batch = 0, state_batch = 0;
  const void* query = nullptr;          // [q_batch, T, N, Hk]
  const void* key = nullptr;            // [k_batch, T, N, Hk]
  const void* value = nullptr;          // [v_batch, T, N, Hv]
  const void* log_gate = nullptr;       // [g_batch, T, N, Hk], gate_dtype
  const float* initial_state = nullptr; // [state_batch, N, Hk, Hv]; nullptr: zero
  float scale = 1.0f;
};

struct GatedLinearForwardResult {
  void* out = nullptr;           // [B, T, N, Hv], dtype
  float* final_state = nullptr;  // [B, N, Hk, Hv]
};

struct GatedLinearBackwardArgs {
  const void* dout = nullptr;           // [B, T, N, Hv], dtype
  const float* dfinal_state = nullptr;  // [B, N, Hk, Hv]; nullptr: zero
  void* dquery = nullptr;               // [B, T, N, Hk], dtype
  void* dkey = nullptr;                 // [B, T, N, Hk], dtype
  void* dvalue = nullptr;               // [B, T, N, Hv], dtype
  void* dlog_gate = nullptr;            // [B, T, N, Hk], gate_dtype
  float* dinitial_state = nullptr;      // [B, N, Hk, Hv]
};

// Shapes and options the kernels rely on; nullptr or a message.
const char* ValidateGatedLinear(const GatedLinearProblem& problem);
// Positions per chunk of the chunked kernels (chosen by measurement), and the longest T the
// forward runs with the step-by-step recurrent kernel instead (decoding).
constexpr int64_t kGatedLinearChunk = 64;
constexpr int64_t kGatedLinearRecurrentMaxLen = 4;
// Both return nullptr, or a message when the work buffers could not be allocated.
const char* GatedLinearForward(const GatedLinearProblem& problem,
                               const GatedLinearForwardResult& result, const Parallel& parallel);
const char* GatedLinearBackward(const GatedLinearProblem& problem,
                                const GatedLinearBackwardArgs& args, const Parallel& parallel);

}  // namespace jaxattn
