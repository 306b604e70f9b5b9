// Float64 attention for one instruction set (see simd.h for how this file is included). It
// reuses the scalar semantic helpers of the float32 kernels: QueryLength / KeyLength,
// TokenInfo (positions, segment ids, slopes), KeyRange / QueryRange / ClassifyTile (which
// tiles can hold a visible pair), BroadcastOffset (visibility.h), the dropout hash
// (dropout_hash.h), the block-sparse tiling (sparse_impl.h), DecodePositions / DecodePage
// (decode_impl.h). Interface: attention_f64.h.
//
// Tiles are those of the block-sparse tiling (SparseTilingImpl): a query tile is the rows
// (position, head of one GQA group), row r = (t - t0) * G + g, against tiles of kKeysPerTile
// keys, so that block-sparse tables index these tiles directly. Per tile the logits are
// products of double rows against a transposed key tile (the inner loop runs along the keys
// and vectorises as double FMAs under the instruction set's flags); the masks, bias, ALiBi
// and soft cap are applied element by element in scalar code, in the order of
// docs/semantics.md. Forward: online softmax. Backward, as the float32 kernels (flash_impl.h):
// pass 1 per query tile (D, dQ, dlogits), pass 2 per key tile (dK, dV), so no two tasks write
// one element and results do not depend on the thread count.
#pragma once
#include "decode_impl.h"
#include "dropout_hash.h"
#include "simd.h"
#include "sparse_impl.h"
#include "visibility.h"

constexpr int64_t kF64Keys = kKeysPerTile;

static inline double F64LoadAny(DType dtype, const void* base, int64_t index) {
  if (dtype == DType::kF64) return static_cast<const double*>(base)[index];
  return static_cast<double>(LoadOne(dtype, base, index));
}

// Per-call constants.
struct F64Context {
  const AttentionProblem* p = nullptr;
  const BlockSparseTables* sparse = nullptr;
  int64_t group = 1, positions = 1, rows = 1, num_q_tiles = 0, num_k_tiles = 0;
  int64_t bias_strides[4] = {0, 0, 0, 0}, mask_strides[4] = {0, 0, 0, 0};
  int64_t dbias_strides[4] = {0, 0, 0, 0};
  double scale = 1.0, cap = 0.0, keep_scale = 1.0;
  mutable int64_t scratch_failed = 0;
};

static F64Context MakeF64Context(const AttentionProblem& p, const BlockSparseTables* sparse) {
  F64Context c;
  c.p = &p;
  c.sparse = sparse;
  c.group = p.num_heads / p.num_kv_heads;
  const BlockSparseTiling tiling = SparseTilingImpl(c.group);
  c.positions = tiling.positions;
  c.rows = tiling.rows;
  c.num_q_tiles = CeilDiv(p.q_len, c.positions);
  c.num_k_tiles = CeilDiv(p.kv_len, kF64Keys);
  StridesOf(p.bias, c.bias_strides);
  StridesOf(p.mask, c.mask_strides);
  c.scale = p.scale;
  c.cap = p.soft_cap;
  if (p.dropout_seeds != nullptr) {
    c.keep_scale = 1.0 / (1.0 - static_cast<double>(p.dropout_threshold) * 0x1p-32);
  }
  return c;
}

// A task's doubles from the thread's scratch; nullptr (the bytes recorded) when out of memory.
static double* F64Scratch(const F64Context& c, int64_t doubles) {
  float* data = tls_scratch.Get(2 * MaxI(doubles, 1));
  if (data == nullptr) {
    __atomic_store_n(&c.scratch_failed, 8 * MaxI(doubles, 1), __ATOMIC_RELAXED);
  }
  return reinterpret_cast<double*>(data);
}

// One query row of a tile: what its masks and logit terms need.
struct F64Row {
  int64_t t = 0, n = 0;
  int64_t position = 0;  // the query's position (clamped), or its index
  double slope = 0.0;    // ALiBi slope (0: none)
  bool live = false;     // t below the query length
  int64_t bias_at = 0, mask_at = 0, dbias_at = 0;
  DropoutRowKey drop{0u, 0u};
};

// Doubles of scratch that hold one F64Row.
constexpr int64_t kRowDoubles = 10;
static_assert(sizeof(F64Row) <= kRowDoubles * sizeof(double), "an F64Row fits its scratch");

// Batch element b's lengths and token operands.
struct F64Batch {
  int64_t b = 0, q_len = 0, kv_len = 0;
  TokenInfo ti;
};

static inline F64Batch F64BatchOf(const AttentionProblem& p, int64_t b) {
  return F64Batch{b, QueryLength(p, b), KeyLength(p, b), TokenInfoOf(p, b)};
}

// The rows of query tile q_tile of kv head kv_head: positions [t0, t1) times the G heads.
static int64_t F64TileRows(const F64Context& c, const F64Batch& fb, int64_t kv_head, int64_t q_tile,
                           const Broadcast4* dbias, F64Row* rows) {
  const AttentionProblem& p = *c.p;
  const int64_t t0 = q_tile * c.positions, t1 = MinI(p.q_len, t0 + c.positions);
  int64_t r = 0;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g, ++r) {
      F64Row& row = rows[r];
      row.t = t;
      row.n = kv_head * c.group + g;
      row.position = fb.ti.QueryPosition(t);
      row.slope = fb.ti.slopes != nullptr ? static_cast<double>(fb.ti.slopes[row.n]) : 0.0;
      row.live = t < fb.q_len;
      if (p.bias.data) row.bias_at = BroadcastOffset(p.bias, c.bias_strides, fb.b, row.n, t);
      if (p.mask.data) row.mask_at = BroadcastOffset(p.mask, c.mask_strides, fb.b, row.n, t);
      if (dbias != nullptr && dbias->data != nullptr) {
        row.dbias_at = BroadcastOffset(*dbias, c.dbias_strides, fb.b, row.n, t);
      }
      if (p.dropout_seeds != nullptr) row.drop = DropoutRowKeyOf(p, fb.b, row.n, t);
    }
  }
  return r;
}

// Whether query row `row` sees key s by the analytic masks, positions and segment ids (the
// dense mask and a tile's element mask are F64TransformTile's).
static inline bool F64Visible(const AttentionProblem& p, const F64Batch& fb, const F64Row& row,
                              int64_t s) {
  if (!row.live || s >= fb.kv_len) return false;
  const int64_t kp = fb.ti.KeyPosition(s), qp = row.position;
  if (p.causal && kp > qp) return false;
  if (p.window_left >= 0 && kp < qp - p.window_left) return false;
  if (p.window_right >= 0 && kp > qp + p.window_right) return false;
  if (fb.ti.q_seg != nullptr && fb.ti.q_seg[row.t] != fb.ti.kv_seg[s]) return false;
  return true;
}

// dst[h * kF64Keys + j] = element h of row j (j < nk; zero up to kF64Keys), rows at
// base + row_offset(j).
static void F64Transpose(const double* base, const int64_t* offsets, int64_t nk, int64_t dim,
                         double* dst) {
  for (int64_t h = 0; h < dim; ++h) {
    double* d = dst + h * kF64Keys;
    for (int64_t j = 0; j < nk; ++j) d[j] = base[offsets[j] + h];
    for (int64_t j = nk; j < kF64Keys; ++j) d[j] = 0.0;
  }
}

// dst[j * dim + h] = element h of row j (j < nk; zero rows up to kF64Keys).
static void F64GatherRows(const double* base, const int64_t* offsets, int64_t nk, int64_t dim,
                          double* dst) {
  for (int64_t j = 0; j < kF64Keys; ++j) {
    double* d = dst + j * dim;
    if (j < nk) {
      __builtin_memcpy(d, base + offsets[j], dim * sizeof(double));
    } else {
      for (int64_t h = 0; h < dim; ++h) d[h] = 0.0;
    }
  }
}

// dst[j * rows + r] = src[r * kF64Keys + j]: a [rows, kF64Keys] tile transposed.
static void F64TransposeTile(const double* src, int64_t rows, double* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < kF64Keys; ++j) dst[j * rows + r] = src[r * kF64Keys + j];
  }
}

// Vectors of doubles as wide as the instruction set's float vectors.
constexpr int64_t kVD = kVL / 2;
typedef double VD __attribute__((vector_size(kVL * 4)));
typedef double VDu __attribute__((vector_size(kVL * 4), aligned(8), may_alias));
static inline VD LoadVD(const double* p) { return *reinterpret_cast<const VDu*>(p); }
static inline void StoreVD(double* p, VD v) { *reinterpret_cast<VDu*>(p) = v; }

// out[i * ldo + j] (+)= sum_p a[i * lda + p] * b[p * ldb + j] for i < m, j < n: blocks of 4
// rows x 2 vectors of columns in registers (double FMAs), the edges narrower. Each output is
// one sum in p order, whatever the blocking, so results depend on the shape only.
static void F64Gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                    int64_t ldb, double* out, int64_t ldo, bool accumulate) {
  int64_t j = 0;
  for (; j + 2 * kVD <= n; j += 2 * kVD) {
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      VD c[4][2];
      for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < 2; ++v) {
          c[r][v] = accumulate ? LoadVD(out + (i + r) * ldo + j + v * kVD) : VD{};
        }
      }
      for (int64_t p = 0; p < k; ++p) {
        const VD b0 = LoadVD(b + p * ldb + j), b1 = LoadVD(b + p * ldb + j + kVD);
        for (int r = 0; r < 4; ++r) {
          const VD ar = VD{} + a[(i + r) * lda + p];
          c[r][0] += ar * b0;
          c[r][1] += ar * b1;
        }
      }
      for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < 2; ++v) StoreVD(out + (i + r) * ldo + j + v * kVD, c[r][v]);
      }
    }
    for (; i < m; ++i) {
      VD c0 = accumulate ? LoadVD(out + i * ldo + j) : VD{};
      VD c1 = accumulate ? LoadVD(out + i * ldo + j + kVD) : VD{};
      for (int64_t p = 0; p < k; ++p) {
        const VD ar = VD{} + a[i * lda + p];
        c0 += ar * LoadVD(b + p * ldb + j);
        c1 += ar * LoadVD(b + p * ldb + j + kVD);
      }
      StoreVD(out + i * ldo + j, c0);
      StoreVD(out + i * ldo + j + kVD, c1);
    }
  }
  for (; j + kVD <= n; j += kVD) {
    for (int64_t i = 0; i < m; ++i) {
      VD c0 = accumulate ? LoadVD(out + i * ldo + j) : VD{};
      for (int64_t p = 0; p < k; ++p) c0 += (VD{} + a[i * lda + p]) * LoadVD(b + p * ldb + j);
      StoreVD(out + i * ldo + j, c0);
    }
  }
  for (; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      double c0 = accumulate ? out[i * ldo + j] : 0.0;
      for (int64_t p = 0; p < k; ++p) c0 += a[i * lda + p] * b[p * ldb + j];
      out[i * ldo + j] = c0;
    }
  }
}

// exp of kVD doubles to ~1 ulp: 2^k exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2 and a
// degree-13 Taylor polynomial (truncation ~4e-18). 0 below -708 (results that would be
// subnormal are flushed: such a weight, next to the row's largest weight 1, changes no sum),
// +inf above 709, NaN stays NaN.
static inline VD ExpVD(VD x) {
  typedef int64_t VL __attribute__((vector_size(kVL * 4)));
  const VD shifter = VD{} + 0x1.8p52;  // adding it rounds to an integer kept in the low bits
  VD kd = x * 1.4426950408889634 + shifter;
  const VL k = (VL)kd;
  kd -= shifter;
  VD r = x - kd * 6.93147180369123816490e-01;  // ln 2 in two parts (the first exact in k)
  r -= kd * 1.90821492927058770002e-10;
  constexpr double kInverseFactorials[14] = {1.0,
                                             1.0,
                                             1.0 / 2,
                                             1.0 / 6,
                                             1.0 / 24,
                                             1.0 / 120,
                                             1.0 / 720,
                                             1.0 / 5040,
                                             1.0 / 40320,
                                             1.0 / 362880,
                                             1.0 / 3628800,
                                             1.0 / 39916800,
                                             1.0 / 479001600,
                                             1.0 / 6227020800.0};
  VD poly = VD{} + kInverseFactorials[13];
  for (int i = 12; i >= 0; --i) poly = poly * r + kInverseFactorials[i];
  typedef uint64_t VLU __attribute__((vector_size(kVL * 4)));
  VD y = poly * (VD)((VLU)(k + 1023) << 52);  // 2^k (unsigned: garbage k of -inf is defined)
  y = x < -708.0 ? VD{} : y;
  y = x > 709.0 ? VD{} + __builtin_inf() : y;
  return y;
}

// x[j] = exp(x[j] - shift) for j < n (x[j] = -inf gives 0), 0 for n <= j < kF64Keys.
static inline void F64ExpRow(double* x, double shift, int64_t n) {
  for (int64_t j = 0; j < kF64Keys; j += kVD) StoreVD(x + j, ExpVD(LoadVD(x + j) - shift));
  for (int64_t j = n; j < kF64Keys; ++j) x[j] = 0.0;
}

// out[r * kF64Keys + j] = sum_h a[r * dim + h] * bt[h * kF64Keys + j] for r < num_rows.
static inline void F64RowsTimesTile(const double* a, int64_t num_rows, int64_t dim,
                                    const double* bt, double* out) {
  F64Gemm(num_rows, kF64Keys, dim, a, dim, bt, kF64Keys, out, kF64Keys, false);
}

// Turns raw products x (rows x kF64Keys) into logits: scale, bias, ALiBi, soft cap, then -inf
// where hidden (masks, lengths, positions, segments, the tile's element mask). th (or
// nullptr) receives tanh(logit / cap) with a soft cap, 0 where hidden.
static void F64TransformTile(const F64Context& c, const F64Batch& fb, const F64Row* rows,
                             int64_t num_rows, int64_t s0, int64_t nk, const uint8_t* tile_mask,
                             double* x, double* th) {
  const AttentionProblem& p = *c.p;
  const uint8_t* mask = static_cast<const uint8_t*>(p.mask.data);
  constexpr double kInf64 = __builtin_inf();
  // Whether the analytic masks, positions and segment ids leave every pair of the live rows
  // visible (ClassifyTile, as the float32 kernels decide it): then no per-element checks.
  const int64_t t0 = num_rows > 0 ? rows[0].t : 0;
  const int64_t t1 = num_rows > 0 ? MinI(fb.q_len, rows[num_rows - 1].t + 1) : 0;
  const bool full = mask == nullptr && tile_mask == nullptr && t1 > t0 && nk > 0 &&
                    ClassifyTile(p, fb.ti, t0, t1, s0, s0 + nk, fb.kv_len) == TileKind::kFull;
  const bool plain =
      full && p.bias.data == nullptr && fb.ti.slopes == nullptr && c.cap <= 0.0 && c.scale == 1.0;
  for (int64_t r = 0; r < num_rows; ++r) {
    const F64Row& row = rows[r];
    double* xr = x + r * kF64Keys;
    double* thr = th != nullptr ? th + r * kF64Keys : nullptr;
    const uint8_t* tm = tile_mask != nullptr ? tile_mask + r * kF64Keys : nullptr;
    if (plain && row.live) {  // the logits are the products
      for (int64_t j = nk; j < kF64Keys; ++j) xr[j] = -kInf64;
      continue;
    }
    for (int64_t j = 0; j < kF64Keys; ++j) {
      const int64_t s = s0 + j;
      bool visible = j < nk && row.live && (full || F64Visible(p, fb, row, s));
      if (visible && mask != nullptr) visible = mask[row.mask_at + s * c.mask_strides[3]] != 0;
      if (visible && tm != nullptr) visible = tm[j] != 0;
      if (!visible) {
        xr[j] = -kInf64;
        if (thr != nullptr) thr[j] = 0.0;
        continue;
      }
      double v = xr[j] * c.scale;
      if (p.bias.data != nullptr) {
        v += F64LoadAny(p.bias.dtype, p.bias.data, row.bias_at + s * c.bias_strides[3]);
      }
      if (fb.ti.slopes != nullptr) {
        const int64_t d = row.position - fb.ti.KeyPosition(s);
        v -= row.slope * static_cast<double>(d < 0 ? -d : d);
      }
      if (c.cap > 0.0) {
        const double t = __builtin_tanh(v / c.cap);
        v = c.cap * t;
        if (thr != nullptr) thr[j] = t;
      }
      xr[j] = v;
    }
  }
}

// The key tiles a query tile visits: tile starts in *starts and element masks (nullptr:
// none) in *masks; returns how many. Dense: the tiles the analytic masks leave.
static int64_t F64KeyTiles(const F64Context& c, const F64Batch& fb, int64_t kv_head, int64_t q_tile,
                           int64_t* starts, const uint8_t** masks) {
  const AttentionProblem& p = *c.p;
  int64_t count = 0;
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (kv_head % st.groups) * st.num_q_tiles + q_tile;
    for (int64_t e = st.q_indptr[row]; e < st.q_indptr[row + 1]; ++e) {
      starts[count] = st.q_entries[2 * e] * kF64Keys;
      const int32_t id = st.q_entries[2 * e + 1];
      masks[count++] = id < 0 ? nullptr : st.masks + id * c.rows * kF64Keys;
    }
    return count;
  }
  const int64_t t0 = q_tile * c.positions, t1 = MinI(fb.q_len, t0 + c.positions);
  if (t1 <= t0 || fb.kv_len == 0) return 0;
  int64_t lo, hi;
  KeyRange(p, t0, t1, fb.kv_len, &lo, &hi);
  for (int64_t s0 = lo - lo % kF64Keys; s0 < hi; s0 += kF64Keys) {
    if (ClassifyTile(p, fb.ti, t0, t1, s0, MinI(p.kv_len, s0 + kF64Keys), fb.kv_len) ==
        TileKind::kHidden) {
      continue;
    }
    starts[count] = s0;
    masks[count++] = nullptr;
  }
  return count;
}

// Offsets of keys [s0, s0 + nk) of kv head kv_head in a [batch, S, K, dim] operand.
static void F64KeyOffsets(const AttentionProblem& p, int64_t batch_index, int64_t kv_head,
                          int64_t s0, int64_t nk, int64_t dim, int64_t* offsets) {
  for (int64_t j = 0; j < nk; ++j) {
    offsets[j] = ((batch_index * p.kv_len + s0 + j) * p.num_kv_heads + kv_head) * dim;
  }
}

// Row (b, t, n) of a [batch, T, N, dim] operand.
static inline int64_t F64RowOffset(const AttentionProblem& p, int64_t batch_index,
                                   const F64Row& row, int64_t dim) {
  return ((batch_index * p.q_len + row.t) * p.num_heads + row.n) * dim;
}

// Keys [s0, s0 + nk) of batch element b and kv head kv_head, nk <= kF64Keys: the first `live`
// are below the element's key length, the rest are never read (they may hold NaN) and come
// out as zeros. `offsets` is kF64Keys of the task's scratch.
struct F64KeyTile {
  const AttentionProblem* p;
  int64_t b, kv_head, s0, nk, live;
  int64_t* offsets;

  // The tile's rows of `operand` ([batch, S, K, dim], batch element b % batch) transposed:
  // dst[h * kF64Keys + j] = element h of key s0 + j.
  void Transposed(const void* operand, int64_t batch, int64_t dim, double* dst) const {
    F64KeyOffsets(*p, b % batch, kv_head, s0, nk, dim, offsets);
    F64Transpose(static_cast<const double*>(operand), offsets, live, dim, dst);
  }
  // The same rows as they are: dst[j * dim + h].
  void Rows(const void* operand, int64_t batch, int64_t dim, double* dst) const {
    F64KeyOffsets(*p, b % batch, kv_head, s0, nk, dim, offsets);
    F64GatherRows(static_cast<const double*>(operand), offsets, live, dim, dst);
  }
};

static inline F64KeyTile F64KeyTileOf(const AttentionProblem& p, const F64Batch& fb,
                                      int64_t kv_head, int64_t s0, int64_t* offsets) {
  const int64_t nk = MinI(kF64Keys, p.kv_len - s0);
  return F64KeyTile{&p, fb.b, kv_head, s0, nk, MinI(nk, MaxI(int64_t{0}, fb.kv_len - s0)), offsets};
}

// The logits of a tile's query rows q ([num_rows, H]) against key tile `tile` (kt: its keys
// transposed): products, then F64TransformTile (th: tanh(logit / cap) with a soft cap).
static inline void F64TileLogits(const F64Context& c, const F64Batch& fb, const F64Row* rows,
                                 int64_t num_rows, const double* q, const double* kt,
                                 const F64KeyTile& tile, const uint8_t* tile_mask, double* x,
                                 double* th) {
  F64RowsTimesTile(q, num_rows, c.p->head_dim, kt, x);
  F64TransformTile(c, fb, rows, num_rows, tile.s0, tile.nk, tile_mask, x, th);
}

// Logits x ([num_rows, kF64Keys]) to the softmax weights of rows whose log-sum-exp the
// forward gave: exp(x - lse), 0 where x is -inf, past nk, or in a row that sees nothing.
static inline void F64WeightsFromLse(const double* lse, int64_t num_rows, int64_t nk, double* x) {
  for (int64_t r = 0; r < num_rows; ++r) {
    double* xr = x + r * kF64Keys;
    if (lse[r] == -__builtin_inf()) {  // the row sees nothing
      for (int64_t j = 0; j < kF64Keys; ++j) xr[j] = 0.0;
    } else {
      F64ExpRow(xr, lse[r], nk);
    }
  }
}

// ---------------------------------------------------------------------------- forward

// The online softmax's new maximum after logits x[0..n): NaN once any logit is NaN (so that
// the row's output and lse become NaN, as attention over a NaN logit is), else the larger of
// m and the logits.
static inline double F64RunningMax(double m, const double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] != x[j]) return x[j];
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

struct F64ForwardJob {
  F64Context c;
  F64ForwardResult res;
};

static void F64ForwardTask(void* job_ptr, int64_t task) {
  const F64ForwardJob& job = *static_cast<const F64ForwardJob*>(job_ptr);
  const F64Context& c = job.c;
  const AttentionProblem& p = *c.p;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  const F64Batch fb = F64BatchOf(p, tt.b);
  const int64_t H = p.head_dim, Hv = p.value_dim, R = c.rows;
  const int64_t num_k = c.num_k_tiles;
  double* scratch = F64Scratch(
      c, R * (H + Hv + 2 + kF64Keys) + kF64Keys * (H + Hv + 2) + num_k * 2 + R * kRowDoubles);
  if (scratch == nullptr) return;
  double* q = scratch;
  double* o = q + R * H;
  double* m = o + R * Hv;
  double* l = m + R;
  double* x = l + R;
  double* kt = x + R * kF64Keys;
  double* vrows = kt + H * kF64Keys;
  int64_t* offsets = reinterpret_cast<int64_t*>(vrows + kF64Keys * Hv);
  int64_t* starts = offsets + kF64Keys;
  const uint8_t** tile_masks = reinterpret_cast<const uint8_t**>(starts + num_k);
  F64Row* rows = reinterpret_cast<F64Row*>(tile_masks + num_k);

  const int64_t nr = F64TileRows(c, fb, tt.kv_head, tt.tile, nullptr, rows);
  const double* query = static_cast<const double*>(p.query);
  for (int64_t r = 0; r < nr; ++r) {
    const double* src = query + F64RowOffset(p, tt.b % p.q_batch, rows[r], H);
    for (int64_t h = 0; h < H; ++h) q[r * H + h] = src[h];
    for (int64_t d = 0; d < Hv; ++d) o[r * Hv + d] = 0.0;
    m[r] = -__builtin_inf();
    l[r] = 0.0;
  }
  const int64_t tiles = F64KeyTiles(c, fb, tt.kv_head, tt.tile, starts, tile_masks);
  for (int64_t i = 0; i < tiles; ++i) {
    const F64KeyTile tile = F64KeyTileOf(p, fb, tt.kv_head, starts[i], offsets);
    const int64_t s0 = tile.s0, nk = tile.nk;
    tile.Transposed(p.key, p.kv_batch, H, kt);
    F64TileLogits(c, fb, rows, nr, q, kt, tile, tile_masks[i], x, nullptr);
    // x becomes the tile's weights: exp(x - m) (0 where hidden, past nk or dropped).
    for (int64_t r = 0; r < nr; ++r) {
      double* xr = x + r * kF64Keys;
      const double m_new = F64RunningMax(m[r], xr, nk);
      if (m_new == -__builtin_inf()) {  // nothing visible yet
        for (int64_t j = 0; j < kF64Keys; ++j) xr[j] = 0.0;
        continue;
      }
      const double alpha = __builtin_exp(m[r] - m_new);
      double* orow = o + r * Hv;
      if (alpha != 1.0) {
        l[r] *= alpha;
        for (int64_t d = 0; d < Hv; ++d) orow[d] *= alpha;
      }
      m[r] = m_new;
      double sum = 0.0;
      F64ExpRow(xr, m_new, nk);
      for (int64_t j = 0; j < nk; ++j) sum += xr[j];
      l[r] += sum;
      if (p.dropout_seeds != nullptr) {
        for (int64_t j = 0; j < nk; ++j) {
          if (!DropoutKept(rows[r].drop, s0 + j, p.dropout_threshold)) xr[j] = 0.0;
        }
      }
    }
    tile.Rows(p.value, p.value_batch, Hv, vrows);
    F64Gemm(nr, Hv, kF64Keys, x, kF64Keys, vrows, Hv, o, Hv, true);
  }
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t at = (tt.b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    double* out = job.res.out + at * Hv;
    if (l[r] > 0.0 || l[r] != l[r]) {
      const double mult = c.keep_scale / l[r];
      for (int64_t d = 0; d < Hv; ++d) out[d] = o[r * Hv + d] * mult;
      job.res.lse[at] = m[r] + __builtin_log(l[r]);
    } else {
      for (int64_t d = 0; d < Hv; ++d) out[d] = 0.0;
      job.res.lse[at] = -__builtin_inf();
    }
  }
}

static int64_t F64ForwardImpl(const AttentionProblem& p, const BlockSparseTables* sparse,
                              const F64ForwardResult& res, const Parallel& parallel) {
  F64ForwardJob job{MakeF64Context(p, sparse), res};
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, F64ForwardTask, &job);
  return job.c.scratch_failed;
}

// ---------------------------------------------------------------------------- backward

struct F64BackwardJob {
  F64Context c;
  F64BackwardArgs args;
  double* delta = nullptr;  // [B, T, N]: rowsum(dO * O) - dlse
};

// p = exp(x - lse) (0 where x is -inf or the row sees nothing), dp = dO V^T (times the
// dropout scale where kept, 0 where dropped), ds = p (dp - D), times 1 - tanh^2 with a soft
// cap. On return x holds p with the dropout applied (the weights of O) and dp holds ds.
static void F64ProbsAndGrads(const F64Context& c, const F64Row* rows, int64_t num_rows, int64_t s0,
                             int64_t nk, const double* lse, const double* delta, const double* th,
                             double* x, double* dp) {
  const AttentionProblem& p = *c.p;
  F64WeightsFromLse(lse, num_rows, nk, x);
  for (int64_t r = 0; r < num_rows; ++r) {
    double* xr = x + r * kF64Keys;
    double* dr = dp + r * kF64Keys;
    for (int64_t j = 0; j < kF64Keys; ++j) {
      const double prob = xr[j];
      double dprob = dr[j], weight = prob;
      if (p.dropout_seeds != nullptr) {
        const bool kept = j < nk && DropoutKept(rows[r].drop, s0 + j, p.dropout_threshold);
        dprob = kept ? dprob * c.keep_scale : 0.0;
        weight = kept ? prob * c.keep_scale : 0.0;
      }
      double ds = prob == 0.0 ? 0.0 : prob * (dprob - delta[r]);
      if (th != nullptr) ds *= 1.0 - th[r * kF64Keys + j] * th[r * kF64Keys + j];
      xr[j] = weight;
      dr[j] = ds;
    }
  }
}

// Pass 1, per query tile: D, dQ and dlogits.
static void F64BackwardQueryTask(void* job_ptr, int64_t task) {
  const F64BackwardJob& job = *static_cast<const F64BackwardJob*>(job_ptr);
  const F64Context& c = job.c;
  const AttentionProblem& p = *c.p;
  const F64BackwardArgs& a = job.args;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  const F64Batch fb = F64BatchOf(p, tt.b);
  const int64_t H = p.head_dim, Hv = p.value_dim, R = c.rows, num_k = c.num_k_tiles;
  const bool has_cap = c.cap > 0.0;
  double* scratch = F64Scratch(c, R * (2 * H + Hv + 2 + 3 * kF64Keys) +
                                      kF64Keys * (2 * H + Hv + 2) + num_k * 2 + R * kRowDoubles);
  if (scratch == nullptr) return;
  double* q = scratch;
  double* dout = q + R * H;
  double* dq = dout + R * Hv;
  double* lse = dq + R * H;
  double* delta = lse + R;
  double* x = delta + R;
  double* dp = x + R * kF64Keys;
  double* th = dp + R * kF64Keys;
  double* kt = th + R * kF64Keys;
  double* vt = kt + H * kF64Keys;
  double* krows = vt + Hv * kF64Keys;
  int64_t* offsets = reinterpret_cast<int64_t*>(krows + kF64Keys * H);
  int64_t* starts = offsets + kF64Keys;
  const uint8_t** tile_masks = reinterpret_cast<const uint8_t**>(starts + num_k);
  F64Row* rows = reinterpret_cast<F64Row*>(tile_masks + num_k);

  const int64_t nr = F64TileRows(c, fb, tt.kv_head, tt.tile, nullptr, rows);
  const double* query = static_cast<const double*>(p.query);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t at = (tt.b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    const double* src = query + F64RowOffset(p, tt.b % p.q_batch, rows[r], H);
    for (int64_t h = 0; h < H; ++h) q[r * H + h] = src[h];
    for (int64_t h = 0; h < H; ++h) dq[r * H + h] = 0.0;
    double d = 0.0;
    for (int64_t e = 0; e < Hv; ++e) {
      dout[r * Hv + e] = a.dout[at * Hv + e];
      d += a.dout[at * Hv + e] * a.out[at * Hv + e];
    }
    if (a.dlse != nullptr) d -= a.dlse[at];
    delta[r] = d;
    job.delta[at] = d;
    lse[r] = a.lse[at];
    if (a.dlogits != nullptr) {
      double* g = a.dlogits + ((tt.b * p.num_heads + rows[r].n) * p.q_len + rows[r].t) * p.kv_len;
      for (int64_t s = 0; s < p.kv_len; ++s) g[s] = 0.0;
    }
  }
  if (a.dq != nullptr || a.dlogits != nullptr) {
    const int64_t tiles = F64KeyTiles(c, fb, tt.kv_head, tt.tile, starts, tile_masks);
    for (int64_t i = 0; i < tiles; ++i) {
      const F64KeyTile tile = F64KeyTileOf(p, fb, tt.kv_head, starts[i], offsets);
      const int64_t s0 = tile.s0, nk = tile.nk;
      tile.Transposed(p.key, p.kv_batch, H, kt);
      F64TileLogits(c, fb, rows, nr, q, kt, tile, tile_masks[i], x, has_cap ? th : nullptr);
      tile.Transposed(p.value, p.value_batch, Hv, vt);
      F64RowsTimesTile(dout, nr, Hv, vt, dp);
      F64ProbsAndGrads(c, rows, nr, s0, nk, lse, delta, has_cap ? th : nullptr, x, dp);
      if (a.dlogits != nullptr) {
        for (int64_t r = 0; r < nr; ++r) {
          double* g =
              a.dlogits + ((tt.b * p.num_heads + rows[r].n) * p.q_len + rows[r].t) * p.kv_len + s0;
          for (int64_t j = 0; j < nk; ++j) g[j] = dp[r * kF64Keys + j];
        }
      }
      if (a.dq != nullptr) {
        tile.Rows(p.key, p.kv_batch, H, krows);
        F64Gemm(nr, H, kF64Keys, dp, kF64Keys, krows, H, dq, H, true);
      }
    }
  }
  if (a.dq != nullptr) {
    for (int64_t r = 0; r < nr; ++r) {
      double* dst = a.dq + F64RowOffset(p, tt.b, rows[r], H);
      for (int64_t h = 0; h < H; ++h) dst[h] = dq[r * H + h] * c.scale;
    }
  }
}

// The query tiles key tile k_tile is seen by: tile ids in *tiles and element masks (nullptr:
// none; the forward layout [rows, kF64Keys]) in *masks; returns how many.
static int64_t F64QueryTiles(const F64Context& c, const F64Batch& fb, int64_t kv_head,
                             int64_t k_tile, int64_t* tiles, const uint8_t** masks) {
  const AttentionProblem& p = *c.p;
  int64_t count = 0;
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (kv_head % st.groups) * st.num_k_tiles + k_tile;
    for (int64_t e = st.k_indptr[row]; e < st.k_indptr[row + 1]; ++e) {
      tiles[count] = st.k_entries[2 * e];
      const int32_t id = st.k_entries[2 * e + 1];
      masks[count++] = id < 0 ? nullptr : st.masks + id * c.rows * kF64Keys;
    }
    return count;
  }
  const int64_t s0 = k_tile * kF64Keys, s1 = MinI(fb.kv_len, s0 + kF64Keys);
  if (s1 <= s0 || fb.q_len == 0) return 0;
  int64_t lo, hi;
  QueryRange(p, s0, s1, fb.q_len, &lo, &hi);
  for (int64_t i = lo / c.positions; i * c.positions < hi; ++i) {
    const int64_t t0 = i * c.positions, t1 = MinI(fb.q_len, t0 + c.positions);
    if (ClassifyTile(p, fb.ti, t0, t1, s0, MinI(p.kv_len, s0 + kF64Keys), fb.kv_len) ==
        TileKind::kHidden) {
      continue;
    }
    tiles[count] = i;
    masks[count++] = nullptr;
  }
  return count;
}

// Pass 2, per key tile: dK and dV.
static void F64BackwardKeyTask(void* job_ptr, int64_t task) {
  const F64BackwardJob& job = *static_cast<const F64BackwardJob*>(job_ptr);
  const F64Context& c = job.c;
  const AttentionProblem& p = *c.p;
  const F64BackwardArgs& a = job.args;
  const TaskTile tt = TileOfTask(p, task, c.num_k_tiles, /*costliest_last=*/false);
  const F64Batch fb = F64BatchOf(p, tt.b);
  const int64_t H = p.head_dim, Hv = p.value_dim, R = c.rows, num_q = c.num_q_tiles;
  const bool has_cap = c.cap > 0.0;
  double* scratch =
      F64Scratch(c, R * (H + Hv + 2 + 4 * kF64Keys) + kF64Keys * (2 * H + 2 * Hv + 1) + num_q * 2 +
                        R * kRowDoubles);
  if (scratch == nullptr) return;
  double* q = scratch;
  double* dout = q + R * H;
  double* lse = dout + R * Hv;
  double* delta = lse + R;
  double* x = delta + R;
  double* dp = x + R * kF64Keys;
  double* th = dp + R * kF64Keys;
  double* kt = th + R * kF64Keys;
  double* vt = kt + H * kF64Keys;
  double* dk = vt + Hv * kF64Keys;
  double* dv = dk + kF64Keys * H;
  double* tiles_t = dv + kF64Keys * Hv;  // [kF64Keys, R]: the weights, then dS, transposed
  int64_t* offsets = reinterpret_cast<int64_t*>(tiles_t + kF64Keys * R);
  int64_t* tiles = offsets + kF64Keys;
  const uint8_t** tile_masks = reinterpret_cast<const uint8_t**>(tiles + num_q);
  F64Row* rows = reinterpret_cast<F64Row*>(tile_masks + num_q);

  const double* query = static_cast<const double*>(p.query);
  const F64KeyTile tile = F64KeyTileOf(p, fb, tt.kv_head, tt.tile * kF64Keys, offsets);
  const int64_t s0 = tile.s0, nk = tile.nk;
  tile.Transposed(p.key, p.kv_batch, H, kt);
  tile.Transposed(p.value, p.value_batch, Hv, vt);
  for (int64_t i = 0; i < kF64Keys * H; ++i) dk[i] = 0.0;
  for (int64_t i = 0; i < kF64Keys * Hv; ++i) dv[i] = 0.0;

  const int64_t count = F64QueryTiles(c, fb, tt.kv_head, tt.tile, tiles, tile_masks);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t nr = F64TileRows(c, fb, tt.kv_head, tiles[i], nullptr, rows);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t at = (tt.b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
      const double* src = query + F64RowOffset(p, tt.b % p.q_batch, rows[r], H);
      // A row past its query length sees nothing and is never read (it may hold NaN).
      const bool live = rows[r].live;
      for (int64_t h = 0; h < H; ++h) q[r * H + h] = live ? src[h] : 0.0;
      for (int64_t e = 0; e < Hv; ++e) dout[r * Hv + e] = live ? a.dout[at * Hv + e] : 0.0;
      lse[r] = a.lse[at];
      delta[r] = live ? job.delta[at] : 0.0;
    }
    F64TileLogits(c, fb, rows, nr, q, kt, tile, tile_masks[i], x, has_cap ? th : nullptr);
    F64RowsTimesTile(dout, nr, Hv, vt, dp);
    F64ProbsAndGrads(c, rows, nr, s0, nk, lse, delta, has_cap ? th : nullptr, x, dp);
    // dV += weights^T dO;  dK += dS^T Q
    F64TransposeTile(x, nr, tiles_t);
    F64Gemm(kF64Keys, Hv, nr, tiles_t, nr, dout, Hv, dv, Hv, true);
    F64TransposeTile(dp, nr, tiles_t);
    F64Gemm(kF64Keys, H, nr, tiles_t, nr, q, H, dk, H, true);
  }
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t row = (tt.b * p.kv_len + s0 + j) * p.num_kv_heads + tt.kv_head;
    if (a.dk != nullptr) {
      for (int64_t h = 0; h < H; ++h) a.dk[row * H + h] = dk[j * H + h] * c.scale;
    }
    if (a.dv != nullptr) {
      for (int64_t e = 0; e < Hv; ++e) a.dv[row * Hv + e] = dv[j * Hv + e];
    }
  }
}

static int64_t F64BackwardImpl(const AttentionProblem& p, const BlockSparseTables* sparse,
                               const F64BackwardArgs& args, const Parallel& parallel) {
  F64BackwardJob job{MakeF64Context(p, sparse), args, nullptr};
  const int64_t rows = p.batch * p.q_len * p.num_heads;
  job.delta = static_cast<double*>(__builtin_malloc(MaxI(rows, 1) * sizeof(double)));
  if (job.delta == nullptr) return MaxI(rows, 1) * static_cast<int64_t>(sizeof(double));
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, F64BackwardQueryTask, &job);
  if (job.c.scratch_failed == 0 && (args.dk != nullptr || args.dv != nullptr)) {
    parallel.For(p.batch * p.num_kv_heads * job.c.num_k_tiles, F64BackwardKeyTask, &job);
  }
  __builtin_free(job.delta);
  return job.c.scratch_failed;
}

// ---------------------------------------------------------------------------- tangent

struct F64JvpJob {
  F64Context c;
  FlashTangents tangents;
  const double* out;
  const double* lse;
  F64JvpResult res;
};

// d out = sum_j p_j (dS_j - dlse) V_j + p_j dV_j and d lse = sum_j p_j dS_j, with dS the
// logits' tangent (scale (dQ.K + Q.dK) + dbias, times 1 - tanh^2 with a soft cap).
static void F64JvpTask(void* job_ptr, int64_t task) {
  const F64JvpJob& job = *static_cast<const F64JvpJob*>(job_ptr);
  const F64Context& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashTangents& tg = job.tangents;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  const F64Batch fb = F64BatchOf(p, tt.b);
  const int64_t H = p.head_dim, Hv = p.value_dim, R = c.rows, num_k = c.num_k_tiles;
  const bool has_cap = c.cap > 0.0;
  double* scratch = F64Scratch(c, R * (2 * H + Hv + 2 + 4 * kF64Keys) +
                                      kF64Keys * (2 * H + Hv + 1) + num_k * 2 + R * kRowDoubles);
  if (scratch == nullptr) return;
  double* q = scratch;
  double* dq = q + R * H;
  double* acc = dq + R * H;
  double* lse = acc + R * Hv;
  double* dlse = lse + R;
  double* x = dlse + R;
  double* dx = x + R * kF64Keys;
  double* dx2 = dx + R * kF64Keys;
  double* th = dx2 + R * kF64Keys;
  double* kt = th + R * kF64Keys;
  double* dkt = kt + H * kF64Keys;
  double* vrows = dkt + H * kF64Keys;
  int64_t* offsets = reinterpret_cast<int64_t*>(vrows + kF64Keys * Hv);
  int64_t* starts = offsets + kF64Keys;
  const uint8_t** tile_masks = reinterpret_cast<const uint8_t**>(starts + num_k);
  F64Row* rows = reinterpret_cast<F64Row*>(tile_masks + num_k);

  const int64_t nr = F64TileRows(c, fb, tt.kv_head, tt.tile, &tg.dbias, rows);
  const double* query = static_cast<const double*>(p.query);
  const double* tq = static_cast<const double*>(tg.dq);
  for (int64_t r = 0; r < nr; ++r) {
    const double* src = query + F64RowOffset(p, tt.b % p.q_batch, rows[r], H);
    const double* dsrc = tq + F64RowOffset(p, tt.b % tg.dq_batch, rows[r], H);
    for (int64_t h = 0; h < H; ++h) {
      q[r * H + h] = src[h];
      dq[r * H + h] = dsrc[h];
    }
    for (int64_t e = 0; e < Hv; ++e) acc[r * Hv + e] = 0.0;
    lse[r] = job.lse[(tt.b * p.q_len + rows[r].t) * p.num_heads + rows[r].n];
    dlse[r] = 0.0;
  }
  const int64_t tiles = F64KeyTiles(c, fb, tt.kv_head, tt.tile, starts, tile_masks);
  for (int64_t i = 0; i < tiles; ++i) {
    const F64KeyTile tile = F64KeyTileOf(p, fb, tt.kv_head, starts[i], offsets);
    const int64_t s0 = tile.s0;
    tile.Transposed(p.key, p.kv_batch, H, kt);
    tile.Transposed(tg.dk, tg.dk_batch, H, dkt);
    F64TileLogits(c, fb, rows, nr, q, kt, tile, tile_masks[i], x, has_cap ? th : nullptr);
    F64RowsTimesTile(dq, nr, H, kt, dx);
    F64RowsTimesTile(q, nr, H, dkt, dx2);
    F64WeightsFromLse(lse, nr, tile.nk, x);
    for (int64_t r = 0; r < nr; ++r) {
      double* xr = x + r * kF64Keys;
      double* dxr = dx + r * kF64Keys;
      for (int64_t j = 0; j < kF64Keys; ++j) {
        const double prob = xr[j];
        double d = 0.0;
        if (prob != 0.0) {
          d = (dxr[j] + dx2[r * kF64Keys + j]) * c.scale;
          if (tg.dbias.data != nullptr) {
            d += F64LoadAny(tg.dbias.dtype, tg.dbias.data,
                            rows[r].dbias_at + (s0 + j) * c.dbias_strides[3]);
          }
          if (has_cap) d *= 1.0 - th[r * kF64Keys + j] * th[r * kF64Keys + j];
        }
        xr[j] = prob;
        dxr[j] = d;
        dlse[r] += prob * d;
      }
    }
    // acc += sum_j p_j dS_j V_j + p_j dV_j (dx becomes p dS)
    for (int64_t e = 0; e < nr * kF64Keys; ++e) dx[e] *= x[e];
    tile.Rows(p.value, p.value_batch, Hv, vrows);
    F64Gemm(nr, Hv, kF64Keys, dx, kF64Keys, vrows, Hv, acc, Hv, true);
    tile.Rows(tg.dv, tg.dv_batch, Hv, vrows);
    F64Gemm(nr, Hv, kF64Keys, x, kF64Keys, vrows, Hv, acc, Hv, true);
  }
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t at = (tt.b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    double* dst = job.res.dout + at * Hv;
    const double* o = job.out + at * Hv;
    for (int64_t e = 0; e < Hv; ++e) dst[e] = acc[r * Hv + e] - dlse[r] * o[e];
    job.res.dlse[at] = dlse[r];
  }
}

static int64_t F64JvpImpl(const AttentionProblem& p, const FlashTangents& tangents,
                          const double* out, const double* lse, const F64JvpResult& res,
                          const Parallel& parallel) {
  F64JvpJob job{MakeF64Context(p, nullptr), tangents, out, lse, res};
  StridesOf(tangents.dbias, job.c.dbias_strides);
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, F64JvpTask, &job);
  return job.c.scratch_failed;
}

// ---------------------------------------------------------------------------- decode

struct F64DecodeJob {
  const DecodeAttentionProblem* p;
  F64ForwardResult res;
  mutable int64_t scratch_failed = 0;
};

// sum_h a[h] * b[h] for h < n: vectors of kVD products in two partial sums, their lanes and
// the scalar tail added in a fixed order (the result depends on n and the instruction set
// only).
static inline double F64Dot(const double* a, const double* b, int64_t n) {
  VD acc0 = VD{}, acc1 = VD{};
  int64_t h = 0;
  for (; h + 2 * kVD <= n; h += 2 * kVD) {
    acc0 += LoadVD(a + h) * LoadVD(b + h);
    acc1 += LoadVD(a + h + kVD) * LoadVD(b + h + kVD);
  }
  if (h + kVD <= n) {
    acc0 += LoadVD(a + h) * LoadVD(b + h);
    h += kVD;
  }
  acc0 += acc1;
  double sum = 0.0;
  for (int64_t lane = 0; lane < kVD; ++lane) sum += acc0[lane];
  for (; h < n; ++h) sum += a[h] * b[h];
  return sum;
}

// One (batch, query head): its T query tokens against the sequence's visible cache entries,
// online softmax over tiles of kF64Keys keys in order, as the flash forward: per tile the
// visible logits (vector dot products, F64Dot), the weights from ExpVD, then the value rows of
// the kept weights accumulated (a vector loop along the value dim).
static void F64DecodeTask(void* job_ptr, int64_t task) {
  const F64DecodeJob& job = *static_cast<const F64DecodeJob*>(job_ptr);
  const DecodeAttentionProblem& p = *job.p;
  const int64_t b = task / p.num_heads, n = task % p.num_heads;
  const int64_t G = p.num_heads / p.num_kv_heads, kv_head = n / G;
  const int64_t H = p.head_dim, Hv = p.value_dim, T = p.q_len;
  const int64_t capacity = p.max_pages * p.page_size;
  const int64_t len = DecodeLength(p, capacity, b);
  // Tokens past the sequence's query count see no key (they output 0).
  const int64_t live = DecodeQueryCount(p, b);
  const DecodePositions dp = DecodePositionsOf(p, b, len);
  const double scale = p.scale, cap = p.soft_cap;
  const double slope = dp.slopes != nullptr ? static_cast<double>(dp.slopes[n]) : 0.0;
  const int64_t doubles = T * (Hv + 2 + kF64Keys) + kF64Keys;
  float* raw = tls_scratch.Get(2 * doubles);
  if (raw == nullptr) {
    __atomic_store_n(&const_cast<F64DecodeJob&>(job).scratch_failed, int64_t{8} * doubles,
                     __ATOMIC_RELAXED);
    return;
  }
  double* o = reinterpret_cast<double*>(raw);
  double* m = o + T * Hv;
  double* l = m + T;
  double* x = l + T;
  int64_t* key_rows = reinterpret_cast<int64_t*>(x + T * kF64Keys);
  for (int64_t i = 0; i < T * Hv; ++i) o[i] = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    m[t] = -__builtin_inf();
    l[t] = 0.0;
  }
  const double* query =
      static_cast<const double*>(p.query) + ((b % p.q_batch) * T * p.num_heads + n) * H;
  const double* key = static_cast<const double*>(p.key);
  const double* value = static_cast<const double*>(p.value);
  const int64_t value_shift = DecodeValueShift(p, b);
  for (int64_t s0 = 0; live > 0 && s0 < len; s0 += kF64Keys) {
    const int64_t nk = MinI(kF64Keys, len - s0);
    KeyRows(p, b, s0, nk, key_rows);
    for (int64_t t = 0; t < live; ++t) {
      const double* q = query + t * p.num_heads * H;
      double* xr = x + t * kF64Keys;
      const int64_t qp = dp.QueryPosition(t);
      for (int64_t j = 0; j < kF64Keys; ++j) {
        const int64_t kp = j < nk ? dp.KeyPosition(s0 + j) : 0;
        if (j >= nk || kp > qp || (p.window_left >= 0 && kp < qp - p.window_left)) {
          xr[j] = -__builtin_inf();
          continue;
        }
        double v = F64Dot(q, key + (key_rows[j] * p.num_kv_heads + kv_head) * H, H) * scale;
        if (dp.slopes != nullptr) {
          const int64_t d = qp - kp;
          v -= slope * static_cast<double>(d < 0 ? -d : d);
        }
        if (cap > 0.0) v = cap * __builtin_tanh(v / cap);
        xr[j] = v;
      }
      // xr becomes the tile's weights exp(x - m) (0 where hidden or past nk).
      const double m_new = F64RunningMax(m[t], xr, nk);
      if (m_new == -__builtin_inf()) continue;  // nothing visible yet
      double* ot = o + t * Hv;
      const double alpha = __builtin_exp(m[t] - m_new);
      if (alpha != 1.0) {
        l[t] *= alpha;
        for (int64_t e = 0; e < Hv; ++e) ot[e] *= alpha;
      }
      m[t] = m_new;
      F64ExpRow(xr, m_new, nk);
      double sum = 0.0;
      for (int64_t j = 0; j < nk; ++j) sum += xr[j];
      l[t] += sum;
      for (int64_t j = 0; j < nk; ++j) {
        const double prob = xr[j];
        if (prob == 0.0) continue;
        const double* vr = value + ((key_rows[j] + value_shift) * p.num_kv_heads + kv_head) * Hv;
        for (int64_t e = 0; e < Hv; ++e) ot[e] += prob * vr[e];
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t at = (b * T + t) * p.num_heads + n;
    double* out = job.res.out + at * Hv;
    if (l[t] > 0.0 || l[t] != l[t]) {
      for (int64_t e = 0; e < Hv; ++e) out[e] = o[t * Hv + e] / l[t];
      job.res.lse[at] = m[t] + __builtin_log(l[t]);
    } else {
      for (int64_t e = 0; e < Hv; ++e) out[e] = 0.0;
      job.res.lse[at] = -__builtin_inf();
    }
  }
}

static int64_t F64DecodeImpl(const DecodeAttentionProblem& p, const F64ForwardResult& res,
                             const Parallel& parallel) {
  F64DecodeJob job{&p, res};
  parallel.For(p.batch * p.num_heads, F64DecodeTask, &job);
  return job.scratch_failed;
}
