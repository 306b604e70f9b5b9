// Which query sees which key, for one instruction set (see simd.h for how this file is
// included): the sequence lengths, the analytic masks (causal, local window, key length),
// token positions and segment ids, how a [B, N, T, S]-broadcast bias or mask operand is
// indexed, and the classification of a tile from these. Scalar and type-independent (no
// vector types): every kernel family applies the same rules (docs/semantics.md).
#pragma once
#include "simd.h"

static inline int64_t BroadcastOffset(const Broadcast4& x, const int64_t* strides, int64_t b,
                                      int64_t n, int64_t t) {
  return (b % x.dims[0]) * strides[0] + (n % x.dims[1]) * strides[1] + (t % x.dims[2]) * strides[2];
}

static void StridesOf(const Broadcast4& x, int64_t* strides) {
  const int64_t s3 = 1, s2 = x.dims[3], s1 = s2 * x.dims[2], s0 = s1 * x.dims[1];
  strides[0] = s0;
  strides[1] = x.dims[1] == 1 ? 0 : s1;
  strides[2] = x.dims[2] == 1 ? 0 : s2;
  strides[3] = x.dims[3] == 1 ? 0 : s3;
}

static inline int64_t QueryLength(const AttentionProblem& p, int64_t b) {
  if (p.q_lengths == nullptr) return p.q_len;
  return MinI(p.q_len, MaxI(0, p.q_lengths[b % p.q_lengths_batch]));
}
static inline int64_t KeyLength(const AttentionProblem& p, int64_t b) {
  if (p.kv_lengths == nullptr) return p.kv_len;
  return MinI(p.kv_len, MaxI(0, p.kv_lengths[b % p.kv_lengths_batch]));
}

// The analytic masks: causal, local window and key length.
static inline bool Visible(const AttentionProblem& p, int64_t t, int64_t s, int64_t kv_len) {
  return s < kv_len && (!p.causal || s <= t) && (p.window_left < 0 || s >= t - p.window_left) &&
         (p.window_right < 0 || s <= t + p.window_right);
}

// Keys [*lo, *hi) that some query in [t0, t1) may see.
static inline void KeyRange(const AttentionProblem& p, int64_t t0, int64_t t1, int64_t kv_len,
                            int64_t* lo, int64_t* hi) {
  // By position: KeyRangeByPosition where the key positions never decrease, else every
  // tile, which ClassifyTile cuts.
  if (p.q_positions != nullptr || p.kv_positions != nullptr) {
    *lo = 0;
    *hi = kv_len;
    return;
  }
  *lo = p.window_left < 0 ? 0 : MaxI(0, t0 - p.window_left);
  *hi = kv_len;
  if (p.causal) *hi = MinI(*hi, t1);
  if (p.window_right >= 0) *hi = MinI(*hi, t1 + p.window_right);
}

// Queries [*lo, *hi) (below q_len) that may see some key in [s0, s1).
static inline void QueryRange(const AttentionProblem& p, int64_t s0, int64_t s1, int64_t q_len,
                              int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = q_len;
  if (p.q_positions != nullptr || p.kv_positions != nullptr) return;  // see KeyRange
  if (p.causal) *lo = s0;
  if (p.window_right >= 0) *lo = MaxI(*lo, s0 - p.window_right);
  if (p.window_left >= 0) *hi = MinI(*hi, s1 + p.window_left);
}

// True when every (t, s) of the tile passes the analytic masks.
static inline bool TileFullyVisible(const AttentionProblem& p, int64_t t0, int64_t t1, int64_t s0,
                                    int64_t s1, int64_t kv_len) {
  return s1 <= kv_len && (!p.causal || s1 - 1 <= t0) &&
         (p.window_left < 0 || s0 >= t1 - 1 - p.window_left) &&
         (p.window_right < 0 || s1 - 1 <= t0 + p.window_right);
}

// ------------------------------------------------------ token positions and segment ids
// Positions are clamped to +-2^30: differences and window bounds then fit the int32 compares.
constexpr int32_t kMaxPosition = int32_t{1} << 30;
static inline int32_t ClampPosition(int32_t x) {
  return x < -kMaxPosition ? -kMaxPosition : x > kMaxPosition ? kMaxPosition : x;
}

// Batch element b's rows of the position, segment and slope operands (nullptr: absent).
struct TokenInfo {
  const int32_t* q_pos = nullptr;
  const int32_t* kv_pos = nullptr;
  const int32_t* q_seg = nullptr;
  const int32_t* kv_seg = nullptr;
  const float* slopes = nullptr;
  bool by_position = false;  // the causal mask and window compare positions, not indices
  int32_t QueryPosition(int64_t t) const {
    return q_pos != nullptr ? ClampPosition(q_pos[t]) : static_cast<int32_t>(t);
  }
  int32_t KeyPosition(int64_t s) const {
    return kv_pos != nullptr ? ClampPosition(kv_pos[s]) : static_cast<int32_t>(s);
  }
};

static inline TokenInfo TokenInfoOf(const AttentionProblem& p, int64_t b) {
  TokenInfo ti;
  if (p.q_positions) ti.q_pos = p.q_positions + (b % p.q_positions_batch) * p.q_len;
  if (p.kv_positions) ti.kv_pos = p.kv_positions + (b % p.kv_positions_batch) * p.kv_len;
  if (p.q_segments) ti.q_seg = p.q_segments + (b % p.q_segments_batch) * p.q_len;
  if (p.kv_segments) ti.kv_seg = p.kv_segments + (b % p.kv_segments_batch) * p.kv_len;
  if (p.alibi_slopes) ti.slopes = p.alibi_slopes + (b % p.alibi_batch) * p.num_heads;
  ti.by_position = ti.q_pos != nullptr || ti.kv_pos != nullptr;
  return ti;
}

// Smallest and largest of x[begin, end) (end > begin); of the indices when x is nullptr.
struct IntRange {
  int64_t lo, hi;
};
static inline IntRange RangeOf(const int32_t* x, int64_t begin, int64_t end) {
  if (x == nullptr) return IntRange{begin, end - 1};
  int32_t lo = x[begin], hi = x[begin];
  for (int64_t i = begin + 1; i < end; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  return IntRange{lo, hi};
}

// Smallest and largest position of queries (keys) [begin, end) (end > begin), clamped as
// TokenInfo clamps each one; of the indices when positions is nullptr.
static inline IntRange PositionRangeOf(const int32_t* positions, int64_t begin, int64_t end) {
  const IntRange r = RangeOf(positions, begin, end);
  if (positions == nullptr) return r;
  return IntRange{ClampPosition(static_cast<int32_t>(r.lo)),
                  ClampPosition(static_cast<int32_t>(r.hi))};
}

// What the analytic masks, positions and segment ids leave of the tile of queries [t0, t1)
// and keys [s0, s1): nothing (never computed), all of it (no mask work) or a part. From the
// ranges of the tile's positions and ids, so it is exact for monotone positions and
// conservative (partial) otherwise. Without positions or ids the index ranges (KeyRange,
// QueryRange) have already dropped the hidden tiles; with monotone positions the ranges by
// position (KeyRangeByPosition, QueryRangeByPosition) have dropped most of them.
enum class TileKind { kHidden, kPartial, kFull };
static inline TileKind ClassifyTile(const AttentionProblem& p, const TokenInfo& ti, int64_t t0,
                                    int64_t t1, int64_t s0, int64_t s1, int64_t kv_len) {
  if (!ti.by_position && ti.q_seg == nullptr) {
    return TileFullyVisible(p, t0, t1, s0, s1, kv_len) ? TileKind::kFull : TileKind::kPartial;
  }
  const int64_t se = MinI(s1, kv_len);
  if (se <= s0 || t1 <= t0) return TileKind::kHidden;
  bool full = s1 <= kv_len;
  if (ti.by_position) {
    const IntRange q = PositionRangeOf(ti.q_pos, t0, t1), k = PositionRangeOf(ti.kv_pos, s0, se);
    const int64_t q_min = q.lo, q_max = q.hi, k_min = k.lo, k_max = k.hi;
    if (p.causal && k_min > q_max) return TileKind::kHidden;
    if (p.window_left >= 0 && k_max < q_min - p.window_left) return TileKind::kHidden;
    if (p.window_right >= 0 && k_min > q_max + p.window_right) return TileKind::kHidden;
    full = full && (!p.causal || k_max <= q_min) &&
           (p.window_left < 0 || k_min >= q_max - p.window_left) &&
           (p.window_right < 0 || k_max <= q_min + p.window_right);
  } else {
    full = full && TileFullyVisible(p, t0, t1, s0, s1, kv_len);
  }
  if (ti.q_seg != nullptr) {
    const IntRange q = RangeOf(ti.q_seg, t0, t1), k = RangeOf(ti.kv_seg, s0, se);
    if (q.hi < k.lo || k.hi < q.lo) return TileKind::kHidden;
    full = full && q.lo == q.hi && k.lo == k.hi && q.lo == k.lo;
  }
  return full ? TileKind::kFull : TileKind::kPartial;
}

// ------------------------------------------------ tile ranges from monotone positions
// Whether positions[0, n) never decrease (nullptr: the indices, which do not).
static inline bool NonDecreasing(const int32_t* positions, int64_t n) {
  if (positions == nullptr) return true;
  for (int64_t i = 1; i < n; ++i) {
    if (positions[i] < positions[i - 1]) return false;
  }
  return true;
}

// The first i in [0, n) whose clamped position is at least `bound` (n: none), positions[0, n)
// non-decreasing (nullptr: the indices).
static inline int64_t FirstAtLeast(const int32_t* positions, int64_t n, int64_t bound) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t at = positions != nullptr ? ClampPosition(positions[mid]) : mid;
    if (at < bound) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Keys [*lo, *hi) (below kv_len) outside which ClassifyTile finds every tile of queries
// [t0, t1) hidden, by position: the causal mask and window bound the key positions by the
// tile's smallest and largest query position, and non-decreasing key positions (the caller
// checked them over [0, kv_len)) turn those bounds into indices by binary search.
static inline void KeyRangeByPosition(const AttentionProblem& p, const TokenInfo& ti, int64_t t0,
                                      int64_t t1, int64_t kv_len, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = kv_len;
  if (t1 <= t0) return;
  const IntRange q = PositionRangeOf(ti.q_pos, t0, t1);
  if (p.window_left >= 0) *lo = FirstAtLeast(ti.kv_pos, kv_len, q.lo - p.window_left);
  const int64_t unbounded = int64_t{1} << 62;
  int64_t upper = unbounded;  // the largest key position some query may see
  if (p.causal) upper = q.hi;
  if (p.window_right >= 0) upper = MinI(upper, q.hi + p.window_right);
  if (upper < unbounded) *hi = FirstAtLeast(ti.kv_pos, kv_len, upper + 1);
}

// Queries [*lo, *hi) (below q_len) outside which ClassifyTile finds every tile hidden from
// keys [s0, s1) (s1 <= the key length), likewise from non-decreasing query positions.
static inline void QueryRangeByPosition(const AttentionProblem& p, const TokenInfo& ti, int64_t s0,
                                        int64_t s1, int64_t q_len, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = q_len;
  if (s1 <= s0) return;
  const IntRange k = PositionRangeOf(ti.kv_pos, s0, s1);
  const int64_t unbounded = int64_t{1} << 62;
  int64_t lower = -unbounded;  // the smallest query position that may see some key
  if (p.causal) lower = k.lo;
  if (p.window_right >= 0) lower = MaxI(lower, k.lo - p.window_right);
  if (lower > -unbounded) *lo = FirstAtLeast(ti.q_pos, q_len, lower);
  if (p.window_left >= 0) *hi = FirstAtLeast(ti.q_pos, q_len, k.hi + p.window_left + 1);
}

// Clamps an int64 bound into the int32 range of the vector comparisons (positions are
// below 2^31, ValidateProblem checks it).
static inline int32_t ClampToI32(int64_t x) {
  return static_cast<int32_t>(x<-(int64_t{1} << 31) ? -(int64_t{1} << 31) : x>(int64_t{1} << 31) - 1
                                  ? (int64_t{1} << 31) - 1
                                  : x);
}
