// Gated linear attention for one instruction set (see simd.h for how this file is included;
// the interface and the recurrence are in gated_linear.h).
#pragma once
#include "gemm.h"
#include "scratch.h"
//
// Chunk-parallel form. The sequence is cut into chunks of kGlaChunk positions; a chunk may be
// cut further into sub-chunks (below). Within a sub-chunk of L rows starting at t0, with
// g0 = g_{t0} and H_j = g_{t0+1} + ... + g_{t0+j} (H_0 = 0), the gate from the sub-chunk
// start to row j is exp(g0 + H_j) and from row l to row j >= l is exp(H_j - H_l), so
//     out_j = scale (q_j * exp(g0 + H_j)) S_prev + sum_{l <= j} A_jl v_l,
//     A_jl  = sum_i (scale q_ji exp(H_ji - m_i)) (k_li exp(m_i - H_li)),
//     S_end = diag(exp(g0 + H_{L-1})) S_prev + sum_l (k_l * exp(H_{L-1} - H_l))^T v_l,
// all products GEMMs (gemm.h). The reference m_i is the midpoint of H_.i over the sub-chunk,
// and a sub-chunk ends before the row where the range of some H_.i would exceed
// kGlaMaxSpan: every factor exp(+-(H - m)) then stays within exp(kGlaMaxSpan / 2), a normal
// float, so nothing overflows or loses precision whatever the decay (a strong decay only
// shortens the sub-chunks, down to single rows; log_gate = -inf, a full reset, works too).
// The state is carried in float32 between sub-chunks.
//
// Backward, per sub-chunk in reverse order with dS the gradient of S_end:
//     dA = mask(dO V^T),  dV = A^T dO + Kout dS,
//     dQ = scale (exp(H - m) * (dA Kintra) + exp(g0 + H) * (dO S_prev^T)),
//     dK = exp(m - H) * (dA^T Qintra) + exp(H_{L-1} - H) * (V dS^T),
//     dS_prev = diag(exp(g0 + H_{L-1})) dS + Qin^T dO,
// and the gate gradient from the identity dlog_gate_t = sum_{u >= t} (q_u * dq_u - k_u * dk_u)
// (+ rowsum(dS_T * S_T) from the final state), a reverse running sum. The states at chunk
// starts come from a first pass over the sequence (sub-chunk states inside a cut chunk are
// recomputed from its start).
//
// A scalar gate (gate_dim 1: one gate per head and step) has one H_j per row, so A is the
// masked raw product Q K^T times the [L, L] matrix scale exp(H_j - m) exp(m - H_l)
// (GlaLoadScalarGateRows, GlaScaleScores): no per-element exponentials or scaled panels. Grouped
// kv heads: each query head's task reads its kv head's rows (GlaKvRow), the state and the
// gradients of key, value and gate stay per query head (the caller sums each group).
//
// Work is split over (batch, head) pairs, each processed start to end by one task: results are
// bitwise identical for any thread count. A forward with T <= kGlaRecurrentMaxLen (decoding)
// runs the recurrence step by step instead, split over (b, n, block of value columns): the
// state is read and written once per call, in place when the two are one buffer.

constexpr int64_t kGlaChunk = kGatedLinearChunk;
constexpr float kGlaMaxSpan = 96.0f;
constexpr int64_t kGlaRecurrentMaxLen = kGatedLinearRecurrentMaxLen;
// The recurrent kernel's tasks: about this many per thread (for balance), each at least this
// many value columns wide.
constexpr int64_t kGlaTasksPerThread = 2;
constexpr int64_t kGlaMinBlockColumns = 32;

struct GlaContext {
  const GatedLinearProblem* p = nullptr;
  int64_t hk = 0, hv = 0, hkp = 0, hvp = 0;  // head dims, rounded up to a vector
  int64_t group = 1;                         // query heads per kv head
  bool scalar_gate = false;                  // log_gate [.., 1]: one gate per head and step
  int64_t gp = 0;  // the stride of the cumulative gates' rows: hkp, or one vector (scalar)
  int64_t cp = 0;  // kGlaChunk rounded up to a vector
  int64_t num_chunks = 0;
  int64_t column_blocks = 1, block_columns = 0;  // the recurrent kernel's split of Hv
  const GatedLinearForwardResult* fwd = nullptr;
  const GatedLinearBackwardArgs* bwd = nullptr;
  int failed = 0;  // set (atomically) by a task that could not allocate its buffers
};

static inline void GlaFail(const GlaContext& c) {
  __atomic_store_n(const_cast<int*>(&c.failed), 1, __ATOMIC_RELAXED);
}

// Element offset of row (b, t, n) of an operand of batch `operand_batch` and last dim `dim`.
static inline int64_t GlaRow(const GatedLinearProblem& p, int64_t operand_batch, int64_t b,
                             int64_t t, int64_t n, int64_t dim) {
  return (((b % operand_batch) * p.seq_len + t) * p.num_heads + n) * dim;
}

// The same for an operand with kv heads (key, value, log_gate): query head n reads kv head
// n / group.
static inline int64_t GlaKvRow(const GlaContext& c, int64_t operand_batch, int64_t b, int64_t t,
                               int64_t n, int64_t dim) {
  const GatedLinearProblem& p = *c.p;
  return (((b % operand_batch) * p.seq_len + t) * p.num_kv_heads + n / c.group) * dim;
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols.
static void GlaTranspose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                         int64_t ldd) {
  const int64_t rows_full = rows / kVL * kVL, cols_full = cols / kVL * kVL;
  for (int64_t i = 0; i < rows_full; i += kVL) {
    for (int64_t j = 0; j < cols_full; j += kVL) {
      TransposeBlock(src + i * lds + j, lds, dst + j * ldd + i, ldd);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i < rows_full ? cols_full : 0; j < cols; ++j)
      dst[j * ldd + i] = src[i * lds + j];
  }
}

// Asks for the rows [t_begin, t_end) of (b, n) of every input (and dout in the backward) to be
// brought into the caches. Rows of one head are N * H elements apart, a new page each for
// most shapes, where the hardware prefetchers stop: without this the chunk loads wait on
// memory latency row by row.
static void GlaPrefetchRows(const GlaContext& c, int64_t b, int64_t n, int64_t t_begin,
                            int64_t t_end) {
  const GatedLinearProblem& p = *c.p;
  t_begin = MaxI(t_begin, 0);
  t_end = MinI(t_end, p.seq_len);
  const int64_t size = DTypeSize(p.dtype), gate_size = DTypeSize(p.gate_dtype);
  const auto rows = [&](const void* base, int64_t batch, int64_t dim, int64_t elem_size, bool kv) {
    if (base == nullptr) return;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t at = kv ? GlaKvRow(c, batch, b, t, n, dim) : GlaRow(p, batch, b, t, n, dim);
      const char* row = static_cast<const char*>(base) + at * elem_size;
      for (int64_t off = 0; off < dim * elem_size; off += 64) __builtin_prefetch(row + off);
    }
  };
  rows(p.query, p.q_batch, c.hk, size, false);
  rows(p.key, p.k_batch, c.hk, size, true);
  rows(p.value, p.v_batch, c.hv, size, true);
  rows(p.log_gate, p.g_batch, p.gate_dim, gate_size, true);
  if (c.bwd != nullptr) rows(c.bwd->dout, p.batch, c.hv, size, false);
}

// Per-task buffers, float32, zero-initialised, carved from the thread's scratch.
struct GlaWork {
  float* block = nullptr;
  // [kGlaChunk, hkp] rows of the sub-chunk
  float *q, *k, *h, *e_in, *e_qm, *e_km, *e_out, *q_in, *q_intra, *k_intra, *k_out;
  float *g0, *ref, *lo, *hi, *decay, *in_ref, *ref_out;  // [hkp]
  float *k_intra_t, *k_out_t;                            // [hk, cp]
  float *v, *o;                                          // [kGlaChunk, hvp]
  float* a;                                              // [kGlaChunk, cp]
  float* state;                                          // [hk, hvp]
  // Backward only.
  float *dout, *dv, *v_t, *da, *a_t, *da_t, *x, *y, *dq, *dk, *q_in_t, *s_t, *ds_t, *dstate;
  float* running;  // [hkp]
  int64_t len = 0;

  GlaWork(const GlaContext& c, bool backward) {
    const int64_t C = kGlaChunk, row_k = C * c.hkp, row_v = C * c.hvp;
    int64_t total = 11 * row_k + 7 * c.hkp + 2 * c.hk * c.cp + 2 * row_v + C * c.cp + c.hk * c.hvp;
    if (backward) {
      total += 2 * row_v + c.hv * c.cp + 3 * C * c.cp + 4 * row_k + c.hk * c.cp + 2 * c.hv * c.hkp +
               c.hk * c.hvp + c.hkp;
    }
    // The thread's grow-only scratch (scratch.h), zeroed: padding columns stay zero.
    block = tls_scratch.Get(total + kScratchSlack);
    if (block == nullptr) return;
    __builtin_memset(block, 0, total * sizeof(float));
    float* at = block;
    auto take = [&at](int64_t n) {
      float* r = at;
      at += n;
      return r;
    };
    q = take(row_k), k = take(row_k), h = take(row_k), e_in = take(row_k);
    e_qm = take(row_k), e_km = take(row_k), e_out = take(row_k), q_in = take(row_k);
    q_intra = take(row_k), k_intra = take(row_k), k_out = take(row_k);
    g0 = take(c.hkp), ref = take(c.hkp), lo = take(c.hkp), hi = take(c.hkp);
    decay = take(c.hkp), in_ref = take(c.hkp), ref_out = take(c.hkp);
    k_intra_t = take(c.hk * c.cp), k_out_t = take(c.hk * c.cp);
    v = take(row_v), o = take(row_v), a = take(C * c.cp), state = take(c.hk * c.hvp);
    if (backward) {
      dout = take(row_v), dv = take(row_v), v_t = take(c.hv * c.cp);
      da = take(C * c.cp), a_t = take(C * c.cp), da_t = take(C * c.cp);
      x = take(row_k), y = take(row_k), dq = take(row_k), dk = take(row_k);
      q_in_t = take(c.hk * c.cp), s_t = take(c.hv * c.hkp), ds_t = take(c.hv * c.hkp);
      dstate = take(c.hk * c.hvp), running = take(c.hkp);
    }
  }
  GlaWork(const GlaWork&) = delete;
  GlaWork& operator=(const GlaWork&) = delete;
};

// Loads the sub-chunk of (b, n) starting at t0, at most `limit` rows, into w (w.len rows), and
// computes the scaled operands: for the state update only, also for the forward, or also the
// exp factors the backward needs.
enum GlaLoad { kGlaStateOnly, kGlaForward, kGlaBackward };

// The rows of a sub-chunk with a scalar gate (c.scalar_gate), once GlaLoadChunk has summed the
// gates (lane 0 of w.h's rows) and set w.ref, w.decay, w.in_ref, w.ref_out (lane 0). The gate
// is the same on every key dim, so the decay between rows l <= j is one number per pair,
// exp(H_j - H_l) = e_qm_j e_km_l: the kernels scale the [len, len] score matrix by it
// (GlaScaleScores) instead of every element of the query and key rows. Kept per row: e_qm,
// e_km, e_in = exp(g0 + H_j), e_out = exp(H_end - H_j) (the first len entries of those
// arrays); q and k raw, q_in = scale q e_in and k_out = k e_out for the state terms, and the
// transposed raw keys in k_intra_t.
static void GlaLoadScalarGateRows(const GlaContext& c, int64_t b, int64_t n, int64_t t0,
                                  GlaLoad what, GlaWork& w) {
  const GatedLinearProblem& p = *c.p;
  const bool state_only = what == kGlaStateOnly;
  const int64_t hk = c.hk, hv = c.hv, hkp = c.hkp, hvp = c.hvp, len = w.len;
  const int64_t lp = RoundUp(len, kVL);
  const float decay = w.decay[0], ref = w.ref[0];
  for (int64_t i = 0; i < hkp; ++i) w.decay[i] = decay;  // the state rows' common decay
  // H_j - m for the rows, 0 past len (the padding lanes' factors stay finite).
  for (int64_t j = 0; j < lp; ++j) w.e_qm[j] = j < len ? w.h[j * c.gp] - ref : 0.0f;
  const VF in_ref = Splat(w.in_ref[0]), ref_out = Splat(w.ref_out[0]);
  for (int64_t j = 0; j < lp; j += kVL) {
    const VF x = Load(w.e_qm + j), e_qm = Exp(x), e_km = Exp(VF{} - x);
    Store(w.e_qm + j, e_qm);
    Store(w.e_km + j, e_km);
    Store(w.e_in + j, in_ref * e_qm);
    Store(w.e_out + j, ref_out * e_km);
  }
  const float scale = p.scale;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t t = t0 + j, r = j * hkp;
    LoadRow(p.dtype, Offset(p.key, p.dtype, GlaKvRow(c, p.k_batch, b, t, n, hk)), hk, 1.0f,
            w.k + r);
    LoadRow(p.dtype, Offset(p.value, p.dtype, GlaKvRow(c, p.v_batch, b, t, n, hv)), hv, 1.0f,
            w.v + j * hvp);
    const VF e_out = Splat(w.e_out[j]);
    for (int64_t i = 0; i < hkp; i += kVL) Store(w.k_out + r + i, Load(w.k + r + i) * e_out);
    if (state_only) continue;
    LoadRow(p.dtype, Offset(p.query, p.dtype, GlaRow(p, p.q_batch, b, t, n, hk)), hk, 1.0f,
            w.q + r);
    const VF e_in = Splat(scale * w.e_in[j]);
    for (int64_t i = 0; i < hkp; i += kVL) Store(w.q_in + r + i, Load(w.q + r + i) * e_in);
  }
  GlaTranspose(w.k_out, len, hk, hkp, w.k_out_t, c.cp);
  if (!state_only) GlaTranspose(w.k, len, hk, hkp, w.k_intra_t, c.cp);
  for (int64_t i = 0; i < hk; ++i) {
    for (int64_t j = len; j < lp; ++j) {
      w.k_out_t[i * c.cp + j] = 0.0f;
      w.k_intra_t[i * c.cp + j] = 0.0f;
    }
  }
}

static void GlaLoadChunk(const GlaContext& c, int64_t b, int64_t n, int64_t t0, int64_t limit,
                         GlaLoad what, GlaWork& w) {
  const bool state_only = what == kGlaStateOnly, keep_factors = what == kGlaBackward;
  const GatedLinearProblem& p = *c.p;
  const int64_t hk = c.hk, hv = c.hv, hkp = c.hkp, hvp = c.hvp;
  // The cumulative gates: rows of gp floats, the first gate_dim of them used (a scalar gate
  // keeps one lane of one vector; the others stay 0 and never cut a sub-chunk).
  const int64_t gd = p.gate_dim, gp = c.gp;
  LoadRow(p.gate_dtype, Offset(p.log_gate, p.gate_dtype, GlaKvRow(c, p.g_batch, b, t0, n, gd)), gd,
          1.0f, w.g0);
  for (int64_t i = 0; i < gp; ++i) w.h[i] = w.lo[i] = w.hi[i] = 0.0f;
  int64_t len = 1;
  while (len < limit) {
    float* row = w.h + len * gp;
    const float* prev = row - gp;
    LoadRow(p.gate_dtype,
            Offset(p.log_gate, p.gate_dtype, GlaKvRow(c, p.g_batch, b, t0 + len, n, gd)), gd, 1.0f,
            row);
    // Padding lanes stay 0 (row, prev, lo and hi are zero there).
    VI fits = VI{} == 0;
    for (int64_t i = 0; i < gp; i += kVL) {
      const VF x = Load(prev + i) + Load(row + i), lo = Load(w.lo + i), hi = Load(w.hi + i);
      Store(row + i, x);
      const VF new_lo = x < lo ? x : lo, new_hi = x > hi ? x : hi;
      fits &= (new_hi - new_lo) <= kGlaMaxSpan;  // false for NaN too: it starts a sub-chunk
    }
    bool all_fit = true;
    for (int l = 0; l < kVL; ++l) all_fit = all_fit && fits[l] != 0;
    if (!all_fit) break;
    for (int64_t i = 0; i < gp; i += kVL) {
      const VF x = Load(row + i), lo = Load(w.lo + i), hi = Load(w.hi + i);
      Store(w.lo + i, x < lo ? x : lo);
      Store(w.hi + i, x > hi ? x : hi);
    }
    ++len;
  }
  w.len = len;
  const float* h_end = w.h + (len - 1) * gp;
  for (int64_t i = 0; i < gp; i += kVL) {
    const VF ref = (Load(w.lo + i) + Load(w.hi + i)) * 0.5f;
    Store(w.ref + i, ref);
    Store(w.decay + i, Exp(Load(w.g0 + i) + Load(h_end + i)));
    // exp(g0 + H) = exp(g0 + m) exp(H - m) and exp(H_end - H) = exp(H_end - m) exp(m - H):
    // two exponentials per element instead of four. |H - m|, |H_end - m| <= kGlaMaxSpan / 2,
    // so only exp(g0 + m) can leave float32 range, where exp(g0 + H) is below exp(-39).
    Store(w.in_ref + i, Exp(Load(w.g0 + i) + ref));
    Store(w.ref_out + i, Exp(Load(h_end + i) - ref));
  }
  if (c.scalar_gate) return GlaLoadScalarGateRows(c, b, n, t0, what, w);
  const float scale = p.scale;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t t = t0 + j;
    LoadRow(p.dtype, Offset(p.key, p.dtype, GlaKvRow(c, p.k_batch, b, t, n, hk)), hk, 1.0f,
            w.k + j * hkp);
    LoadRow(p.dtype, Offset(p.value, p.dtype, GlaKvRow(c, p.v_batch, b, t, n, hv)), hv, 1.0f,
            w.v + j * hvp);
    if (!state_only) {
      LoadRow(p.dtype, Offset(p.query, p.dtype, GlaRow(p, p.q_batch, b, t, n, hk)), hk, 1.0f,
              w.q + j * hkp);
    }
    const int64_t r = j * hkp;
    for (int64_t i = 0; i < hkp; i += kVL) {
      const VF hj = Load(w.h + r + i), kv = Load(w.k + r + i);
      if (state_only) {
        Store(w.k_out + r + i, kv * Exp(Load(h_end + i) - hj));
        continue;
      }
      const VF ref = Load(w.ref + i), qv = Load(w.q + r + i) * scale;
      const VF e_qm = Exp(hj - ref), e_km = Exp(ref - hj);
      const VF e_in = Load(w.in_ref + i) * e_qm, e_out = Load(w.ref_out + i) * e_km;
      Store(w.k_out + r + i, kv * e_out);
      if (keep_factors) {
        Store(w.e_out + r + i, e_out);
        Store(w.e_in + r + i, e_in);
        Store(w.e_qm + r + i, e_qm);
        Store(w.e_km + r + i, e_km);
      }
      Store(w.q_in + r + i, qv * e_in);
      Store(w.q_intra + r + i, qv * e_qm);
      Store(w.k_intra + r + i, kv * e_km);
    }
  }
  // Transposed panels, their columns past len zeroed (they feed columns that are masked).
  const int64_t lp = RoundUp(len, kVL);
  GlaTranspose(w.k_out, len, hk, hkp, w.k_out_t, c.cp);
  if (!state_only) GlaTranspose(w.k_intra, len, hk, hkp, w.k_intra_t, c.cp);
  for (int64_t i = 0; i < hk; ++i) {
    for (int64_t j = len; j < lp; ++j) {
      w.k_out_t[i * c.cp + j] = 0.0f;
      w.k_intra_t[i * c.cp + j] = 0.0f;
    }
  }
}

// S = diag(exp(g0 + H_end)) S + Kout^T V for the loaded sub-chunk.
static void GlaUpdateState(const GlaContext& c, GlaWork& w, float* state) {
  for (int64_t i = 0; i < c.hk; ++i) {
    const VF d = Splat(w.decay[i]);
    float* row = state + i * c.hvp;
    for (int64_t j = 0; j < c.hvp; j += kVL) Store(row + j, Load(row + j) * d);
  }
  Gemm(c.hk, c.hvp, w.len, w.k_out_t, c.cp, w.v, c.hvp, state, c.hvp, true);
}

// The products with a causal (lower or upper triangular) [len, len] factor skip its zero
// blocks: rows are taken kGlaRowBlock at a time, each against the columns it can see.
constexpr int64_t kGlaRowBlock = 16;  // a multiple of every kVL

// out [len, lp] = lower(a [len, k] b [k, lp]): zero above the diagonal.
static void GlaLowerProduct(int64_t len, int64_t k, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* out, int64_t ldo) {
  const int64_t lp = RoundUp(len, kVL);
  for (int64_t r0 = 0; r0 < len; r0 += kGlaRowBlock) {
    const int64_t r1 = MinI(len, r0 + kGlaRowBlock);
    Gemm(r1 - r0, RoundUp(r1, kVL), k, a + r0 * lda, lda, b, ldb, out + r0 * ldo, ldo, false);
    for (int64_t j = r0; j < r1; ++j) {
      for (int64_t l = j + 1; l < lp; ++l) out[j * ldo + l] = 0.0f;
    }
  }
}

// out [len, n] (+)= lower [len, len] b [len, n], lower zero above the diagonal.
static void GlaLowerTimes(int64_t len, int64_t n, const float* lower, int64_t ldl, const float* b,
                          int64_t ldb, float* out, int64_t ldo, bool accumulate) {
  for (int64_t r0 = 0; r0 < len; r0 += kGlaRowBlock) {
    const int64_t r1 = MinI(len, r0 + kGlaRowBlock);
    Gemm(r1 - r0, n, r1, lower + r0 * ldl, ldl, b, ldb, out + r0 * ldo, ldo, accumulate);
  }
}

// out [len, n] (+)= upper [len, len] b [len, n], upper zero below the diagonal.
static void GlaUpperTimes(int64_t len, int64_t n, const float* upper, int64_t ldu, const float* b,
                          int64_t ldb, float* out, int64_t ldo, bool accumulate) {
  for (int64_t r0 = 0; r0 < len; r0 += kGlaRowBlock) {
    const int64_t r1 = MinI(len, r0 + kGlaRowBlock);
    Gemm(r1 - r0, n, len - r0, upper + r0 * ldu + r0, ldu, b + r0 * ldb, ldb, out + r0 * ldo, ldo,
         accumulate);
  }
}

// m [len, lp] *= scale e_qm_j e_km_l (a scalar gate's decay between rows, with the query
// scale), on and below the diagonal (m is zero above it).
static void GlaScaleScores(const GlaContext& c, GlaWork& w, float* m) {
  for (int64_t j = 0; j < w.len; ++j) {
    const VF row_factor = Splat(c.p->scale * w.e_qm[j]);
    float* row = m + j * c.cp;
    for (int64_t l = 0; l <= j; l += kVL) {
      Store(row + l, Load(row + l) * row_factor * Load(w.e_km + l));
    }
  }
}

// A = lower(Qintra Kintra^T) [len, lp] (zero above the diagonal); with a scalar gate
// lower(Q K^T) scaled by the decay between rows.
static void GlaIntraScores(const GlaContext& c, GlaWork& w) {
  if (!c.scalar_gate) {
    GlaLowerProduct(w.len, c.hk, w.q_intra, c.hkp, w.k_intra_t, c.cp, w.a, c.cp);
    return;
  }
  GlaLowerProduct(w.len, c.hk, w.q, c.hkp, w.k_intra_t, c.cp, w.a, c.cp);
  GlaScaleScores(c, w, w.a);
}

static void GlaLoadState(const GlaContext& c, int64_t b, int64_t n, float* state) {
  const GatedLinearProblem& p = *c.p;
  if (p.initial_state == nullptr) {
    for (int64_t i = 0; i < c.hk * c.hvp; ++i) state[i] = 0.0f;
    return;
  }
  const float* src = p.initial_state + ((b % p.state_batch) * p.num_heads + n) * c.hk * c.hv;
  for (int64_t i = 0; i < c.hk; ++i) {
    __builtin_memcpy(state + i * c.hvp, src + i * c.hv, c.hv * sizeof(float));
  }
}

static void GlaStoreState(const GlaContext& c, int64_t b, int64_t n, const float* state,
                          float* dst_base) {
  float* dst = dst_base + (b * c.p->num_heads + n) * c.hk * c.hv;
  for (int64_t i = 0; i < c.hk; ++i) {
    __builtin_memcpy(dst + i * c.hv, state + i * c.hvp, c.hv * sizeof(float));
  }
}

// The step-by-step recurrence (decoding, T <= kGlaRecurrentMaxLen): one pass over the state.
// A task takes the columns [j0, j1) of S for one (b, n) (output column j depends on column j of
// S only, so the split changes no result): each element of S is loaded once from
// initial_state into a register, updated through the T steps (decay, + k_ti v_tj,
// out_tj += scale q_ti S_ij) and stored once to final_state. The loads and stores go straight
// to the state (no staging copy), and an element is read before it is written, so
// final_state may alias initial_state (the decode primitive's in-place update).
static void GlaRecurrentTask(void* context, int64_t task) {
  const GlaContext& c = *static_cast<const GlaContext*>(context);
  const GatedLinearProblem& p = *c.p;
  const int64_t bn = task / c.column_blocks, block = task % c.column_blocks;
  const int64_t b = bn / p.num_heads, n = bn % p.num_heads;
  const int64_t T = p.seq_len, hk = c.hk, hv = c.hv, hkp = c.hkp, hvp = c.hvp;
  const int64_t j0 = block * c.block_columns, j1 = MinI(hv, j0 + c.block_columns);
  const int64_t j1_full = j0 + (j1 - j0) / kVL * kVL;
  // q (scaled), k, decay [T, hkp]; v, out [T, hvp] (whole rows: they are small).
  const int64_t total = 3 * T * hkp + 2 * T * hvp;
  float* block_scratch = tls_scratch.Get(total + kScratchSlack);
  if (block_scratch == nullptr) return GlaFail(c);
  __builtin_memset(block_scratch, 0, total * sizeof(float));
  float *q = block_scratch, *k = q + T * hkp, *decay = k + T * hkp, *v = decay + T * hkp;
  float* out = v + T * hvp;
  for (int64_t t = 0; t < T; ++t) {
    LoadRow(p.dtype, Offset(p.query, p.dtype, GlaRow(p, p.q_batch, b, t, n, hk)), hk, p.scale,
            q + t * hkp);
    LoadRow(p.dtype, Offset(p.key, p.dtype, GlaKvRow(c, p.k_batch, b, t, n, hk)), hk, 1.0f,
            k + t * hkp);
    LoadRow(p.dtype, Offset(p.value, p.dtype, GlaKvRow(c, p.v_batch, b, t, n, hv)), hv, 1.0f,
            v + t * hvp);
    float* decay_row = decay + t * hkp;
    LoadRow(p.gate_dtype,
            Offset(p.log_gate, p.gate_dtype, GlaKvRow(c, p.g_batch, b, t, n, p.gate_dim)),
            p.gate_dim, 1.0f, decay_row);
    if (c.scalar_gate) {
      for (int64_t i = 1; i < hkp; ++i) decay_row[i] = decay_row[0];
    }
    for (int64_t i = 0; i < hkp; i += kVL) Store(decay_row + i, Exp(Load(decay_row + i)));
  }
  const float* init = p.initial_state == nullptr
                          ? nullptr
                          : p.initial_state + ((b % p.state_batch) * p.num_heads + n) * hk * hv;
  float* final_state = c.fwd->final_state + (b * p.num_heads + n) * hk * hv;
  for (int64_t i = 0; i < hk; ++i) {
    const float* src = init == nullptr ? nullptr : init + i * hv;
    float* dst = final_state + i * hv;
    for (int64_t j = j0; j < j1_full; j += kVL) {
      VF s = src != nullptr ? Load(src + j) : VF{};
      for (int64_t t = 0; t < T; ++t) {
        s = Splat(decay[t * hkp + i]) * s + Splat(k[t * hkp + i]) * Load(v + t * hvp + j);
        Store(out + t * hvp + j, Load(out + t * hvp + j) + Splat(q[t * hkp + i]) * s);
      }
      Store(dst + j, s);
    }
    for (int64_t j = j1_full; j < j1; ++j) {  // the last columns, fewer than a vector
      float s = src != nullptr ? src[j] : 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        s = decay[t * hkp + i] * s + k[t * hkp + i] * v[t * hvp + j];
        out[t * hvp + j] += q[t * hkp + i] * s;
      }
      dst[j] = s;
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    StoreRow(p.dtype, out + t * hvp + j0, j1 - j0, 1.0f,
             Offset(c.fwd->out, p.dtype, GlaRow(p, p.batch, b, t, n, hv) + j0));
  }
}

static void GlaForwardTask(void* context, int64_t task) {
  const GlaContext& c = *static_cast<const GlaContext*>(context);
  const GatedLinearProblem& p = *c.p;
  const int64_t b = task / p.num_heads, n = task % p.num_heads;
  const int64_t hv = c.hv, hvp = c.hvp;
  GlaWork w(c, false);
  if (w.block == nullptr) return GlaFail(c);
  float* state = w.state;
  GlaLoadState(c, b, n, state);
  GlaPrefetchRows(c, b, n, 0, kGlaChunk);
  for (int64_t chunk = 0; chunk < c.num_chunks; ++chunk) {
    const int64_t end = MinI(p.seq_len, (chunk + 1) * kGlaChunk);
    GlaPrefetchRows(c, b, n, end, end + kGlaChunk);  // the next chunk, during this one
    for (int64_t t0 = chunk * kGlaChunk; t0 < end; t0 += w.len) {
      GlaLoadChunk(c, b, n, t0, end - t0, kGlaForward, w);
      const int64_t len = w.len;
      GlaIntraScores(c, w);
      Gemm(len, hvp, c.hk, w.q_in, c.hkp, state, hvp, w.o, hvp, false);
      GlaLowerTimes(len, hvp, w.a, c.cp, w.v, hvp, w.o, hvp, true);
      for (int64_t j = 0; j < len; ++j) {
        StoreRow(p.dtype, w.o + j * hvp, hv, 1.0f,
                 Offset(c.fwd->out, p.dtype, GlaRow(p, p.batch, b, t0 + j, n, hv)));
      }
      GlaUpdateState(c, w, state);
    }
  }
  GlaStoreState(c, b, n, state, c.fwd->final_state);
}

// The backward of one loaded sub-chunk (rows t0 .. t0 + w.len - 1) given the state at its
// start; w.dstate holds the gradient of the state at its end and becomes that at its start;
// w.running is the reverse running sum of the gate gradient.
static void GlaBackwardChunk(const GlaContext& c, int64_t b, int64_t n, int64_t t0,
                             const float* state_prev, GlaWork& w) {
  const GatedLinearProblem& p = *c.p;
  const GatedLinearBackwardArgs& g = *c.bwd;
  const int64_t hk = c.hk, hv = c.hv, hkp = c.hkp, hvp = c.hvp, cp = c.cp;
  const int64_t len = w.len, lp = RoundUp(len, kVL);
  float* ds = w.dstate;
  GlaIntraScores(c, w);
  for (int64_t j = 0; j < len; ++j) {
    LoadRow(p.dtype, Offset(g.dout, p.dtype, GlaRow(p, p.batch, b, t0 + j, n, hv)), hv, 1.0f,
            w.dout + j * hvp);
  }
  GlaTranspose(w.v, len, hv, hvp, w.v_t, cp);
  for (int64_t i = 0; i < hv; ++i) {
    for (int64_t l = len; l < lp; ++l) w.v_t[i * cp + l] = 0.0f;
  }
  // dA = mask(dO V^T)
  GlaLowerProduct(len, hv, w.dout, hvp, w.v_t, cp, w.da, cp);
  // A scalar gate's A is lower(Q K^T) times the decay: dA times the decay is the gradient of
  // the raw product.
  if (c.scalar_gate) GlaScaleScores(c, w, w.da);
  GlaTranspose(w.a, len, len, cp, w.a_t, cp);
  GlaTranspose(w.da, len, len, cp, w.da_t, cp);
  // dV = A^T dO + Kout dS
  GlaUpperTimes(len, hvp, w.a_t, cp, w.dout, hvp, w.dv, hvp, false);
  Gemm(len, hvp, hk, w.k_out, hkp, ds, hvp, w.dv, hvp, true);
  // dQ = scale (exp(H - m) (dA Kintra) + exp(g0 + H) (dO S_prev^T))
  GlaTranspose(state_prev, hk, hv, hvp, w.s_t, hkp);
  GlaLowerTimes(len, hkp, w.da, cp, c.scalar_gate ? w.k : w.k_intra, hkp, w.x, hkp, false);
  Gemm(len, hkp, hv, w.dout, hvp, w.s_t, hkp, w.y, hkp, false);
  const float scale = p.scale;
  if (c.scalar_gate) {  // dQ = (dA * decay) K + scale e_in (dO S_prev^T)
    for (int64_t j = 0; j < len; ++j) {
      const VF e_in = Splat(scale * w.e_in[j]);
      for (int64_t r = j * hkp; r < (j + 1) * hkp; r += kVL) {
        Store(w.dq + r, Load(w.x + r) + e_in * Load(w.y + r));
      }
    }
  } else {
    for (int64_t r = 0; r < len * hkp; r += kVL) {
      Store(w.dq + r,
            (Load(w.e_qm + r) * Load(w.x + r) + Load(w.e_in + r) * Load(w.y + r)) * scale);
    }
  }
  // dK = exp(m - H) (dA^T Qintra) + exp(H_end - H) (V dS^T)
  GlaTranspose(ds, hk, hv, hvp, w.ds_t, hkp);
  GlaUpperTimes(len, hkp, w.da_t, cp, c.scalar_gate ? w.q : w.q_intra, hkp, w.x, hkp, false);
  Gemm(len, hkp, hv, w.v, hvp, w.ds_t, hkp, w.y, hkp, false);
  if (c.scalar_gate) {  // dK = (dA * decay)^T Q + e_out (V dS^T)
    for (int64_t j = 0; j < len; ++j) {
      const VF e_out = Splat(w.e_out[j]);
      for (int64_t r = j * hkp; r < (j + 1) * hkp; r += kVL) {
        Store(w.dk + r, Load(w.x + r) + e_out * Load(w.y + r));
      }
    }
  } else {
    for (int64_t r = 0; r < len * hkp; r += kVL) {
      Store(w.dk + r, Load(w.e_km + r) * Load(w.x + r) + Load(w.e_out + r) * Load(w.y + r));
    }
  }
  // dS_prev = diag(exp(g0 + H_end)) dS + Qin^T dO
  GlaTranspose(w.q_in, len, hk, hkp, w.q_in_t, cp);
  for (int64_t i = 0; i < hk; ++i) {
    const VF d = Splat(w.decay[i]);
    float* row = ds + i * hvp;
    for (int64_t j = 0; j < hvp; j += kVL) Store(row + j, Load(row + j) * d);
  }
  Gemm(hk, hvp, len, w.q_in_t, cp, w.dout, hvp, ds, hvp, true);
  // Rows, last first: the gate gradient is a reverse running sum (a scalar gate's: summed
  // over the key dims too, in lane 0).
  const int64_t gd = p.gate_dim;
  for (int64_t j = len - 1; j >= 0; --j) {
    const int64_t r = j * hkp, t = t0 + j;
    if (c.scalar_gate) {
      VF sum{};
      for (int64_t i = 0; i < hkp; i += kVL) {
        sum += Load(w.q + r + i) * Load(w.dq + r + i) - Load(w.k + r + i) * Load(w.dk + r + i);
      }
      w.running[0] += HorizontalSum(sum);
    } else {
      for (int64_t i = 0; i < hkp; i += kVL) {
        Store(w.running + i, Load(w.running + i) + Load(w.q + r + i) * Load(w.dq + r + i) -
                                 Load(w.k + r + i) * Load(w.dk + r + i));
      }
    }
    StoreRow(p.gate_dtype, w.running, gd, 1.0f,
             Offset(g.dlog_gate, p.gate_dtype, GlaRow(p, p.batch, b, t, n, gd)));
    StoreRow(p.dtype, w.dq + r, hk, 1.0f,
             Offset(g.dquery, p.dtype, GlaRow(p, p.batch, b, t, n, hk)));
    StoreRow(p.dtype, w.dk + r, hk, 1.0f, Offset(g.dkey, p.dtype, GlaRow(p, p.batch, b, t, n, hk)));
    StoreRow(p.dtype, w.dv + j * hvp, hv, 1.0f,
             Offset(g.dvalue, p.dtype, GlaRow(p, p.batch, b, t, n, hv)));
  }
}

static void GlaBackwardTask(void* context, int64_t task) {
  const GlaContext& c = *static_cast<const GlaContext*>(context);
  const GatedLinearProblem& p = *c.p;
  const GatedLinearBackwardArgs& g = *c.bwd;
  const int64_t b = task / p.num_heads, n = task % p.num_heads;
  const int64_t hk = c.hk, hv = c.hv, hvp = c.hvp, state_size = c.hk * c.hvp;
  GlaWork w(c, true);
  // The state at every chunk start, then (grown on demand) at the sub-chunk starts of a chunk
  // cut by a strong decay.
  float* starts =
      static_cast<float*>(__builtin_malloc(MaxI(1, c.num_chunks) * state_size * sizeof(float)));
  float* sub_states = nullptr;
  int64_t sub_capacity = 0;
  int64_t sub_t0[kGlaChunk];
  if (w.block == nullptr || starts == nullptr) {
    __builtin_free(starts);
    return GlaFail(c);
  }
  float* state = w.state;
  GlaLoadState(c, b, n, state);
  for (int64_t chunk = 0; chunk < c.num_chunks; ++chunk) {
    __builtin_memcpy(starts + chunk * state_size, state, state_size * sizeof(float));
    const int64_t end = MinI(p.seq_len, (chunk + 1) * kGlaChunk);
    GlaPrefetchRows(c, b, n, end, end + kGlaChunk);
    for (int64_t t0 = chunk * kGlaChunk; t0 < end; t0 += w.len) {
      GlaLoadChunk(c, b, n, t0, end - t0, kGlaStateOnly, w);
      GlaUpdateState(c, w, state);
    }
  }
  // Seeds: the final state's cotangent, and its gate term rowsum(dS_T * S_T).
  float* ds = w.dstate;
  for (int64_t i = 0; i < c.hkp; ++i) w.running[i] = 0.0f;
  if (g.dfinal_state != nullptr) {
    const float* src = g.dfinal_state + (b * p.num_heads + n) * hk * hv;
    for (int64_t i = 0; i < hk; ++i) {
      __builtin_memcpy(ds + i * hvp, src + i * hv, hv * sizeof(float));
      float sum = 0.0f;
      for (int64_t j = 0; j < hv; ++j) sum += ds[i * hvp + j] * state[i * hvp + j];
      w.running[c.scalar_gate ? 0 : i] += sum;
    }
  } else {
    for (int64_t i = 0; i < state_size; ++i) ds[i] = 0.0f;
  }
  for (int64_t chunk = c.num_chunks - 1; chunk >= 0; --chunk) {
    const int64_t begin = chunk * kGlaChunk, end = MinI(p.seq_len, begin + kGlaChunk);
    const float* chunk_state = starts + chunk * state_size;
    GlaPrefetchRows(c, b, n, begin - kGlaChunk, begin);  // the previous chunk, during this one
    GlaLoadChunk(c, b, n, begin, end - begin, kGlaBackward, w);
    if (w.len == end - begin) {
      GlaBackwardChunk(c, b, n, begin, chunk_state, w);
      continue;
    }
    // Cut chunk: states at its sub-chunk starts, then the sub-chunks in reverse.
    int64_t num_sub = 0;
    __builtin_memcpy(state, chunk_state, state_size * sizeof(float));
    for (int64_t t0 = begin; t0 < end; t0 += w.len) {
      if (t0 != begin) GlaLoadChunk(c, b, n, t0, end - t0, kGlaStateOnly, w);
      if (num_sub == sub_capacity) {
        sub_capacity = MinI(kGlaChunk, MaxI(4, 2 * sub_capacity));
        float* grown = static_cast<float*>(
            __builtin_realloc(sub_states, sub_capacity * state_size * sizeof(float)));
        if (grown == nullptr) {
          __builtin_free(sub_states);
          __builtin_free(starts);
          return GlaFail(c);
        }
        sub_states = grown;
      }
      __builtin_memcpy(sub_states + num_sub * state_size, state, state_size * sizeof(float));
      sub_t0[num_sub++] = t0;
      GlaUpdateState(c, w, state);
    }
    for (int64_t s = num_sub - 1; s >= 0; --s) {
      GlaLoadChunk(c, b, n, sub_t0[s], end - sub_t0[s], kGlaBackward, w);
      GlaBackwardChunk(c, b, n, sub_t0[s], sub_states + s * state_size, w);
    }
  }
  GlaStoreState(c, b, n, ds, g.dinitial_state);
  __builtin_free(sub_states);
  __builtin_free(starts);
}

static GlaContext MakeGlaContext(const GatedLinearProblem& p) {
  GlaContext c;
  c.p = &p;
  c.hk = p.key_dim;
  c.hv = p.value_dim;
  c.hkp = RoundUp(p.key_dim, kVL);
  c.hvp = RoundUp(p.value_dim, kVL);
  c.group = p.num_heads / p.num_kv_heads;
  c.scalar_gate = p.gate_dim == 1;
  c.gp = c.scalar_gate ? kVL : c.hkp;
  c.cp = RoundUp(kGlaChunk, kVL);
  c.num_chunks = CeilDiv(p.seq_len, kGlaChunk);
  return c;
}

static const char* kGlaOutOfMemory = "gated linear attention: out of memory for the work buffers";

static const char* GlaForwardImpl(const GatedLinearProblem& p, const GatedLinearForwardResult& res,
                                  const Parallel& parallel) {
  GlaContext c = MakeGlaContext(p);
  c.fwd = &res;
  if (p.seq_len > kGlaRecurrentMaxLen) {
    parallel.For(p.batch * p.num_heads, GlaForwardTask, &c);
  } else {
    // Decoding streams the state once: every thread should have a share of it, so the value
    // columns are split when B * N pairs are too few, down to kGlaMinBlockColumns (whole
    // cache lines, and enough state per task that the pool's scheduling cost stays small).
    const int64_t pairs = p.batch * p.num_heads;
    const int64_t wanted = CeilDiv(kGlaTasksPerThread * parallel.num_threads(), pairs);
    const int64_t most = MaxI(1, c.hv / kGlaMinBlockColumns);
    c.column_blocks = MinI(wanted, most);
    c.block_columns = RoundUp(CeilDiv(c.hv, c.column_blocks), kVL);
    c.column_blocks = CeilDiv(c.hv, c.block_columns);
    parallel.For(pairs * c.column_blocks, GlaRecurrentTask, &c);
  }
  return __atomic_load_n(&c.failed, __ATOMIC_RELAXED) ? kGlaOutOfMemory : nullptr;
}

static const char* GlaBackwardImpl(const GatedLinearProblem& p, const GatedLinearBackwardArgs& args,
                                   const Parallel& parallel) {
  GlaContext c = MakeGlaContext(p);
  c.bwd = &args;
  parallel.For(p.batch * p.num_heads, GlaBackwardTask, &c);
  return __atomic_load_n(&c.failed, __ATOMIC_RELAXED) ? kGlaOutOfMemory : nullptr;
}
