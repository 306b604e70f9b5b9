// Public interface of the gated linear attention kernels (GLA, RetNet retention, causal linear
// attention): plain C++ on raw pointers, no XLA, no Python.
//
// Per batch element b and query head n, with q_t, k_t, g_t in R^Hk and v_t in R^Hv (rows of
// query [B,T,N,Hk], and of key [B,T,K,Hk], log_gate [B,T,K,Hk] and value [B,T,K,Hv] at the
// query head's kv head n / (N / K): grouped-query heads, K dividing N):
//     S_0 = initial_state[b, n] (float32 [Hk, Hv]) or 0
//     S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
//     out_t = scale * q_t S_t
// A log_gate of last dim 1 ([B,T,K,1]) is one gate per head and step, the same on every key
// dim (Mamba-2, RetNet, "simple GLA"): its kernels scale the [L, L] score matrix of a chunk
// by exp(H_j - H_l) instead of every element of its query and key rows.
// The state is per query head; the backward writes dkey, dvalue and dlog_gate per query head
// ([B,T,N,...]), for the caller to sum over each kv head's group.
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
  int64_t num_kv_heads = 0;  // K heads of key, value, log_gate; divides num_heads
  int64_t gate_dim = 0;      // log_gate's last dim: key_dim, or 1 (a scalar gate)
  int64_t q_batch = 0, k_batch = 0, v_batch = 0, g_batch = 0, state_batch = 0;
  const void* query = nullptr;           // [q_batch, T, N, Hk]
  const void* key = nullptr;             // [k_batch, T, K, Hk]
  const void* value = nullptr;           // [v_batch, T, K, Hv]
  const void* log_gate = nullptr;        // [g_batch, T, K, gate_dim], gate_dtype
  const float* initial_state = nullptr;  // [state_batch, N, Hk, Hv]; nullptr: zero
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
  void* dkey = nullptr;                 // [B, T, N, Hk], dtype (per query head)
  void* dvalue = nullptr;               // [B, T, N, Hv], dtype (per query head)
  void* dlog_gate = nullptr;            // [B, T, N, gate_dim], gate_dtype (per query head)
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
