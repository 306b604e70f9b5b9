// Flash attention forward and backward for one instruction set (see simd.h for how this file
// is included). Tiles: a block of query rows (the T positions of a block times the G query
// heads of one GQA group, so each K/V tile is loaded once per group) against blocks of keys.
//
// Forward: S = (scale Q) K^T, bias, soft cap, masks, online softmax, O += P V; LSE saved.
// Backward, two passes so that no two threads ever write the same output row (deterministic
// for any thread count, no atomics):
//   pass 1, per query block:  D = rowsum(dO * O) - dlse;  dQ = scale * sum_j dS K
//   pass 2, per key block:    dV = sum_i P^T dO;  dK = scale * sum_i dS^T Q
// with P = exp(S - lse) recomputed and dS = P * (dP - D), dP = dO V^T.
//
// Every task visits its tiles through a TileCursor: a dense range (flash attention, tiles cut
// by the analytic masks) or one row of a block-sparse table (sparse_impl.h), so that one
// routine does the work of both.

// Query rows (positions x group heads) per tile: block-sparse tables are cut at
// kRowsPerTile; flash attention takes kLargeRowsPerTile when that still leaves
// kLargeTileMinTasks tasks (each K/V tile is then packed and streamed once per 128 rows:
// ~10% faster at long T). The choice depends on the shape only, never on the thread count,
// so that results are bitwise the same for any number of threads (a larger tile visits
// fully masked tiles, whose zeros can carry the other sign).
constexpr int64_t kRowsPerTile = 64;
constexpr int64_t kLargeRowsPerTile = 128;
constexpr int64_t kLargeTileMinTasks = 64;  // 4 per thread on 16 cores
constexpr int64_t kKeysPerTile = 64;
constexpr float kInf = __builtin_inff();

// How the products multiply bf16 inputs (see ProductGemm): widened to float32, as bf16 pairs
// by vdpbf16ps, or as the same pairs on AMX tiles. Other dtypes always multiply in float32.
enum class ProductMode { kFloat32, kBF16Pairs, kAmxTiles };

// Per-call constants shared by every task.
struct FlashContext {
  const AttentionProblem* p = nullptr;
  int64_t group = 1;               // G = N / K
  int64_t hp = 0, hvp = 0;         // head dims rounded up to a vector
  int64_t positions_per_tile = 1;  // query positions per row tile
  int64_t num_q_tiles = 0;
  int64_t bias_strides[4] = {0, 0, 0, 0};
  int64_t mask_strides[4] = {0, 0, 0, 0};
  const BlockSparseTables* sparse = nullptr;  // block-sparse attention: the tiles to visit
  int64_t rows_padded = 0;  // row length of a transposed tile mask: rows rounded to vectors
  ProductMode mode = ProductMode::kFloat32;  // of this call's products
  // Keys per tile (AMX without a dense mask: kAmxKeysPerTile; block-sparse: the tables' grid).
  int64_t keys_per_tile = kKeysPerTile;
  // AMX forward: K and V packed once per call, block by block of keys_per_tile keys on the
  // grid from key 0 (PackKeyValueBlocks); nullptr where every task packs its own tiles.
  const float* packed_keys = nullptr;    // [kv_batch, K, blocks] x key_block_floats
  const float* packed_values = nullptr;  // [value_batch, K, blocks] x value_block_floats
  int64_t key_block_floats = 0, value_block_floats = 0;
  // Bytes of scratch memory a task could not allocate (0: none; CarveTaskScratch), set
  // atomically: the call returns it, an error, instead of results.
  mutable int64_t scratch_failed = 0;
};

// Whether products multiply bf16 pairs (vdpbf16ps or AMX): packed rows then hold words.
static inline bool Pairs(const FlashContext& c) { return c.mode != ProductMode::kFloat32; }

// Rows of a left operand or result as stored: AMX multiplies whole 16-row tiles (the rows
// past m zero in packed operands, ignored in results).
static inline int64_t PaddedRows(const FlashContext& c, int64_t m) {
  return c.mode == ProductMode::kAmxTiles ? RoundUp(m, 16) : m;
}

// Stored length of a computed operand's rows (P or dS, whose inner dimension runs along
// them): whole vectors, or for AMX whole 16-word tiles (32 bf16). Past n: -inf logits, zero
// probabilities and gradients.
static inline int64_t PaddedInner(const FlashContext& c, int64_t n) {
  return RoundUp(n, c.mode == ProductMode::kAmxTiles ? 32 : kVL);
}

// Zeros rows m..PaddedRows(c, m) of a packed left operand (rows of ld floats).
static inline void ZeroPaddingRows(const FlashContext& c, float* x, int64_t m, int64_t ld) {
  __builtin_memset(x + m * ld, 0, (PaddedRows(c, m) - m) * ld * sizeof(float));
}

static inline int64_t BroadcastOffset(const Broadcast4& x, const int64_t* strides, int64_t b,
                                      int64_t n, int64_t t) {
  return (b % x.dims[0]) * strides[0] + (n % x.dims[1]) * strides[1] +
         (t % x.dims[2]) * strides[2];
}

static void StridesOf(const Broadcast4& x, int64_t* strides) {
  const int64_t s3 = 1, s2 = x.dims[3], s1 = s2 * x.dims[2], s0 = s1 * x.dims[1];
  strides[0] = s0;
  strides[1] = x.dims[1] == 1 ? 0 : s1;
  strides[2] = x.dims[2] == 1 ? 0 : s2;
  strides[3] = x.dims[3] == 1 ? 0 : s3;
}

static FlashContext MakeContext(const AttentionProblem& p, int64_t rows_per_tile) {
  FlashContext c;
  c.p = &p;
  c.group = p.num_heads / p.num_kv_heads;
  c.hp = RoundUp(p.head_dim, kVL);
  c.hvp = RoundUp(p.value_dim, kVL);
  c.positions_per_tile = MaxI(1, rows_per_tile / c.group);
  c.num_q_tiles = CeilDiv(p.q_len, c.positions_per_tile);
  c.rows_padded = RoundUp(c.positions_per_tile * c.group, kVL);
  StridesOf(p.bias, c.bias_strides);
  StridesOf(p.mask, c.mask_strides);
  return c;
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
  if (p.q_positions != nullptr || p.kv_positions != nullptr) {  // ClassifyTile cuts tiles
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
static inline bool TileFullyVisible(const AttentionProblem& p, int64_t t0, int64_t t1,
                                    int64_t s0, int64_t s1, int64_t kv_len) {
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

// What the analytic masks, positions and segment ids leave of the tile of queries [t0, t1)
// and keys [s0, s1): nothing (never computed), all of it (no mask work) or a part. From the
// ranges of the tile's positions and ids, so it is exact for monotone positions and
// conservative (partial) otherwise. Without positions or ids the index ranges (KeyRange,
// QueryRange) have already dropped the hidden tiles.
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
    const IntRange q = RangeOf(ti.q_pos, t0, t1), k = RangeOf(ti.kv_pos, s0, se);
    const int64_t qlo = q.lo, qhi = q.hi;  // clamp the extremes as the positions are clamped
    const int64_t q_min = ti.q_pos ? ClampPosition(static_cast<int32_t>(qlo)) : qlo;
    const int64_t q_max = ti.q_pos ? ClampPosition(static_cast<int32_t>(qhi)) : qhi;
    const int64_t k_min = ti.kv_pos ? ClampPosition(static_cast<int32_t>(k.lo)) : k.lo;
    const int64_t k_max = ti.kv_pos ? ClampPosition(static_cast<int32_t>(k.hi)) : k.hi;
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

// One tile a task visits: positions [start, start + count) along the other axis, and for a
// partial block-sparse tile its element mask (nonzero = attend): [rows, kKeysPerTile] for a
// query-major task, [kKeysPerTile, rows_padded] for a key-major one.
struct Tile {
  int64_t start = 0, count = 0;
  const uint8_t* mask = nullptr;
};

// The tiles one task visits, in increasing order: [next, end) in steps of `step` (dense), or
// entries [next, end) of a block-sparse table (entries != nullptr) whose tile ids count
// `step` positions each, clipped to `length`.
struct TileCursor {
  int64_t next = 0, end = 0, step = 1, length = 0;
  const int32_t* entries = nullptr;  // [*, 2]: tile id, mask id (-1: full)
  const uint8_t* masks = nullptr;
  int64_t mask_size = 0;
};

static inline TileCursor DenseTiles(int64_t lo, int64_t hi, int64_t step) {
  TileCursor cursor;
  cursor.next = lo;
  cursor.end = hi;
  cursor.step = step;
  cursor.length = hi;
  return cursor;
}

// Row `row` of a block-sparse table (indptr, entries) over tiles of `step` positions.
static inline TileCursor TableTiles(const int32_t* indptr, const int32_t* entries,
                                    int64_t row, int64_t step, int64_t length,
                                    const uint8_t* masks, int64_t mask_size) {
  TileCursor cursor;
  cursor.next = indptr[row];
  cursor.end = indptr[row + 1];
  cursor.step = step;
  cursor.length = length;
  cursor.entries = entries;
  cursor.masks = masks;
  cursor.mask_size = mask_size;
  return cursor;
}

static inline bool NextTile(TileCursor* cursor, Tile* tile) {
  if (cursor->next >= cursor->end) return false;
  if (cursor->entries == nullptr) {
    tile->start = cursor->next;
    cursor->next += cursor->step;
    tile->mask = nullptr;
  } else {
    const int32_t* e = cursor->entries + 2 * cursor->next++;
    tile->start = e[0] * cursor->step;
    tile->mask = e[1] < 0 ? nullptr : cursor->masks + e[1] * cursor->mask_size;
  }
  tile->count = MinI(cursor->step, cursor->length - tile->start);
  return true;
}

struct RowInfo {
  int64_t t;  // query position
  int64_t n;  // query head
};

// Sets the logits of a tile to -inf where its element mask is zero, a vector at a time. The
// mask and the logits share their layout (rows x keys, or keys x rows with kKeysMajor);
// mask lines are kKeysPerTile or rows_padded long, whole vectors, so reading up to the
// rounded-up length stays inside the mask and inside the logits' padding.
typedef uint8_t VB __attribute__((vector_size(kVL)));
template <bool kKeysMajor>
static void ApplyTileMask(const FlashContext& c, const uint8_t* tile_mask, int64_t num_rows,
                          int64_t num_keys, float* x, int64_t ld) {
  static_assert(kKeysPerTile % kVL == 0, "mask rows must hold whole vectors");
  const VF minus_inf = Splat(-kInf);
  const int64_t lines = kKeysMajor ? num_keys : num_rows;
  const int64_t length = kKeysMajor ? num_rows : num_keys;
  const int64_t mask_ld = kKeysMajor ? c.rows_padded : kKeysPerTile;
  for (int64_t i = 0; i < lines; ++i) {
    const uint8_t* mi = tile_mask + i * mask_ld;
    float* xi = x + i * ld;
    for (int64_t j = 0; j < length; j += kVL) {
      VB mb;
      __builtin_memcpy(&mb, mi + j, sizeof(mb));
      const VI visible = __builtin_convertvector(mb, VI) != 0;
      Store(xi + j, visible ? Load(xi + j) : minus_inf);
    }
  }
}

// Clamps an int64 bound into the int32 range of the vector comparisons (positions are
// below 2^31, ValidateProblem checks it).
static inline int32_t ClampToI32(int64_t x) {
  return static_cast<int32_t>(x < -(int64_t{1} << 31) ? -(int64_t{1} << 31)
                              : x > (int64_t{1} << 31) - 1 ? (int64_t{1} << 31) - 1 : x);
}

// Elements [s0, s0 + length) of row (b, n, t) of a [B, N, T, S]-broadcastable float operand,
// as float32.
static void LoadBroadcastRow(const Broadcast4& x, const int64_t* strides, int64_t b, int64_t n,
                             int64_t t, int64_t s0, int64_t length, float* dst) {
  const int64_t at = BroadcastOffset(x, strides, b, n, t);
  if (strides[3] != 0) {
    LoadRow(x.dtype, Offset(x.data, x.dtype, at + s0), length, 1.0f, dst);
  } else {
    const float v = LoadOne(x.dtype, x.data, at);
    for (int64_t j = 0; j < length; ++j) dst[j] = v;
  }
}

// The soft cap of one vector of logits, cap * tanh(v / cap); *th receives the tanh. One
// function for every layout, so that the backward recomputes the forward's logits bitwise.
static inline VF SoftCap(VF v, float inv_cap, float cap, VF* th) {
  *th = Tanh(v * inv_cap);
  return *th * cap;
}

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
};
static thread_local Scratch tls_scratch;
// TransformLogits' line buffers, apart from the tasks' scratch (which they carve up).
static thread_local Scratch tls_line_scratch;
// Floats of TransformLogits' line buffers for lines of up to `length` elements.
static inline int64_t LineScratchFloats(int64_t length) { return 6 * RoundUp(length, kVL) + 96; }

// Applies bias, ALiBi, soft cap and the masks to a tile of scaled logits. Stored element
// (i, j) is x[i * ld + j]; it is query row rows[i] and key s0 + j, or with kKeysMajor key
// s0 + i and query row rows[j]. Masked logits become -inf. With a soft cap, tanh(logit / cap)
// is kept in tanh_out (same layout) for the backward pass. tile_mask (or nullptr) is the
// element mask of a partial block-sparse tile, in the layout of the logits (see Tile).
// analytic_full: ClassifyTile found the tile fully visible (no causal, window, length,
// position or segment mask work).
//
// Line by line (a row of x): the bias and mask entries of the line are gathered into line
// buffers at their own dtype, and the positions and segment ids along the line (the same for
// every line of the tile) once per tile; the causal mask and window of the line become a range
// [lo, hi) of positions along it; then bias, ALiBi, soft cap and every mask are applied a
// vector at a time, up to the line's padded length (ld, whole vectors; padding elements are
// transformed too and stay harmless). The two layouts compute every logit with the same
// operations, so the backward passes reproduce the forward's logits bitwise.
template <bool kKeysMajor>
static void TransformLogits(const FlashContext& c, int64_t b, const RowInfo* rows,
                            int64_t num_rows, int64_t s0, int64_t num_keys, int64_t kv_len,
                            bool analytic_full, const uint8_t* tile_mask, float* x,
                            int64_t ld, float* tanh_out) {
  const AttentionProblem& p = *c.p;
  const bool has_bias = p.bias.data != nullptr, has_mask = p.mask.data != nullptr;
  const bool has_cap = p.soft_cap > 0.0f, has_alibi = p.alibi_slopes != nullptr;
  if (!has_bias && !has_mask && !has_cap && !has_alibi && analytic_full) {
    if (tile_mask != nullptr) ApplyTileMask<kKeysMajor>(c, tile_mask, num_rows, num_keys, x, ld);
    return;
  }
  const TokenInfo ti = TokenInfoOf(p, b);
  const bool has_segments = ti.q_seg != nullptr;
  const int64_t lines = kKeysMajor ? num_keys : num_rows;
  const int64_t length = kKeysMajor ? num_rows : num_keys;
  const int64_t padded = RoundUp(length, kVL);  // <= ld
  const int64_t tile_mask_ld = kKeysMajor ? c.rows_padded : kKeysPerTile;
  const float cap = p.soft_cap, inv_cap = has_cap ? 1.0f / p.soft_cap : 0.0f;
  const uint8_t* mask = static_cast<const uint8_t*>(p.mask.data);

  // Line buffers: bias values (floats), mask bytes, ALiBi terms (floats), and along the
  // line's axis: positions (key-major the rows' query positions, query-major the keys'),
  // segment ids and (key-major) the rows' slopes.
  // Reserved by the task (CarveTaskScratch): the grow-only block is there already.
  float* scratch = tls_line_scratch.Get(LineScratchFloats(length));
  float* bias_line = scratch;
  uint8_t* mask_line = reinterpret_cast<uint8_t*>(scratch + padded + 16);
  int32_t* pos_line = reinterpret_cast<int32_t*>(scratch + 2 * padded + 32);
  int32_t* seg_line = reinterpret_cast<int32_t*>(scratch + 3 * padded + 48);
  float* alibi_line = scratch + 4 * padded + 64;
  float* slope_line = scratch + 5 * padded + 80;
  // Positions along the line: explicit ones when the masks or ALiBi compare positions (the
  // query-major masks otherwise use lane indices).
  const bool positions_along = kKeysMajor || ti.by_position || has_alibi;
  if (kKeysMajor) {
    for (int64_t r = 0; r < padded; ++r) {
      const bool real = r < num_rows;
      pos_line[r] = real ? ti.QueryPosition(rows[r].t) : -1;
      if (has_segments) seg_line[r] = real ? ti.q_seg[rows[r].t] : 0;
      if (has_alibi) slope_line[r] = real ? ti.slopes[rows[r].n] : 0.0f;
    }
  } else {
    for (int64_t j = 0; j < padded; ++j) {
      const bool real = j < num_keys;
      if (positions_along) pos_line[j] = real ? ti.KeyPosition(s0 + j) : 0;
      if (has_segments) seg_line[j] = real ? ti.kv_seg[s0 + j] : 0;
    }
  }
  const VI lane = LaneIndices();
  const VF minus_inf = Splat(-kInf);
  const int64_t unbounded = int64_t{1} << 62;

  for (int64_t i = 0; i < lines; ++i) {
    float* xl = x + i * ld;
    float* thl = tanh_out != nullptr ? tanh_out + i * ld : nullptr;
    // Visible positions [lo, hi) along the line: key offsets j from s0 (query-major, by
    // index), key positions (query-major, by position) or query positions (key-major).
    // index_hi: query-major by position, keys j >= index_hi are past the key length.
    int64_t lo = 0, hi = unbounded, index_hi = unbounded;
    // This line's own position (query-major the query's, key-major the key's).
    int32_t line_pos = 0;
    if (!kKeysMajor) {
      const int64_t t = rows[i].t;
      line_pos = ti.QueryPosition(t);
      const int64_t shift = ti.by_position ? 0 : s0;  // lane offsets by index
      const int64_t qp = line_pos;
      lo = p.window_left >= 0 ? qp - p.window_left - shift : -unbounded;
      if (p.causal) hi = MinI(hi, qp + 1 - shift);
      if (p.window_right >= 0) hi = MinI(hi, qp + p.window_right + 1 - shift);
      if (ti.by_position) {
        index_hi = kv_len - s0;
      } else {
        hi = MinI(hi, kv_len - s0);
      }
    } else {
      const int64_t s = s0 + i;
      line_pos = ti.KeyPosition(s);
      const int64_t kp = line_pos;
      lo = p.causal ? kp : -unbounded;
      if (p.window_right >= 0) lo = MaxI(lo, kp - p.window_right);
      if (p.window_left >= 0) hi = kp + p.window_left + 1;
      if (s >= kv_len) hi = lo;
    }
    const VI lo_v = VI{} + ClampToI32(lo), hi_v = VI{} + ClampToI32(hi);
    const VI index_hi_v = VI{} + ClampToI32(index_hi);
    const VI line_seg_v =
        VI{} + (has_segments ? (kKeysMajor ? ti.kv_seg[s0 + i] : ti.q_seg[rows[i].t]) : 0);

    if (has_bias || has_mask) {
      const int64_t n = kKeysMajor ? 0 : rows[i].n, t = kKeysMajor ? 0 : rows[i].t;
      if (has_bias && !kKeysMajor) {
        LoadBroadcastRow(p.bias, c.bias_strides, b, n, t, s0, length, bias_line);
      }
      if (has_mask && !kKeysMajor) {
        const int64_t at = BroadcastOffset(p.mask, c.mask_strides, b, n, t);
        if (c.mask_strides[3] != 0) {
          __builtin_memcpy(mask_line, mask + at + s0, length);
        } else {
          __builtin_memset(mask_line, mask[at], length);
        }
      }
      if (kKeysMajor) {
        const int64_t s = s0 + i;
        for (int64_t r = 0; r < length; ++r) {
          if (has_bias) {
            bias_line[r] = LoadOne(p.bias.dtype, p.bias.data,
                                   BroadcastOffset(p.bias, c.bias_strides, b, rows[r].n,
                                                   rows[r].t) + s * c.bias_strides[3]);
          }
          if (has_mask) {
            mask_line[r] = mask[BroadcastOffset(p.mask, c.mask_strides, b, rows[r].n,
                                                rows[r].t) + s * c.mask_strides[3]];
          }
        }
      }
      for (int64_t j = length; j < padded; ++j) {
        bias_line[j] = 0.0f;
        mask_line[j] = 0;
      }
    }
    if (has_alibi) {
      // slope * |position_t - position_s|, stored apart from its use so that no layout
      // contracts it into a fused multiply-add with the logit (the backward must match).
      // The distance in unsigned arithmetic: positions within +-2^30 differ by up to 2^31.
      typedef uint32_t VU __attribute__((vector_size(kVL * 4)));
      const VU line_pos_v = VU{} + static_cast<uint32_t>(line_pos);
      const VF line_slope = Splat(kKeysMajor ? 0.0f : ti.slopes[rows[i].n]);
      for (int64_t j = 0; j < padded; j += kVL) {
        VU d;
        __builtin_memcpy(&d, pos_line + j, sizeof(d));
        d = d - line_pos_v;
        d = (VI)d < 0 ? -d : d;
        const VF slope = kKeysMajor ? Load(slope_line + j) : line_slope;
        Store(alibi_line + j, slope * __builtin_convertvector(d, VF));
      }
    }

    const uint8_t* tile_line = tile_mask != nullptr ? tile_mask + i * tile_mask_ld : nullptr;
    for (int64_t j = 0; j < padded; j += kVL) {
      VF v = Load(xl + j);
      if (has_bias) v += Load(bias_line + j);
      if (has_alibi) v -= Load(alibi_line + j);
      VI visible = VI{} - 1;
      if (!analytic_full) {
        VI position;
        if (kKeysMajor || ti.by_position) {
          __builtin_memcpy(&position, pos_line + j, sizeof(position));
        } else {
          position = lane + static_cast<int32_t>(j);
        }
        visible = (position >= lo_v) & (position < hi_v);
        if (!kKeysMajor && ti.by_position) {
          visible &= (lane + static_cast<int32_t>(j)) < index_hi_v;
        }
        if (has_segments) {
          VI seg;
          __builtin_memcpy(&seg, seg_line + j, sizeof(seg));
          visible &= seg == line_seg_v;
        }
      }
      if (has_mask) {
        VB mb;
        __builtin_memcpy(&mb, mask_line + j, sizeof(mb));
        visible &= __builtin_convertvector(mb, VI) != 0;
      }
      if (tile_line != nullptr) {
        VB mb;
        __builtin_memcpy(&mb, tile_line + j, sizeof(mb));
        visible &= __builtin_convertvector(mb, VI) != 0;
      }
      if (has_cap) {
        VF th;
        v = SoftCap(v, inv_cap, cap, &th);
        // 0 where masked: the backward multiplies by 1 - tanh^2, and a NaN or inf from a
        // masked bias entry must not turn the (zero) gradient there into NaN.
        if (thl != nullptr) Store(thl + j, visible != 0 ? th : VF{});
      }
      Store(xl + j, visible != 0 ? v : minus_inf);
    }
  }
}

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

// A flash task's scratch: `carve` takes each of the task's buffers from a Carver, in order;
// it runs over no memory to size the request, then over the thread's scratch. line_length:
// the longest line the task hands TransformLogits (0: none), whose line buffers are reserved
// here too. False when the memory cannot be allocated: the bytes are recorded in
// c.scratch_failed, and the task must return without using its buffers.
template <typename CarveFn>
static bool CarveTaskScratch(const FlashContext& c, int64_t line_length, CarveFn&& carve) {
  Carver sizing;
  carve(sizing);
  int64_t failed = 0;
  float* data = tls_scratch.Get(sizing.used);
  if (data == nullptr) {
    failed = sizing.used;
  } else if (line_length > 0 &&
             tls_line_scratch.Get(LineScratchFloats(line_length)) == nullptr) {
    failed = LineScratchFloats(line_length);
  }
  if (failed != 0) {
    __atomic_store_n(&c.scratch_failed, failed * static_cast<int64_t>(sizeof(float)),
                     __ATOMIC_RELAXED);
    return false;
  }
  Carver carver{data};
  carve(carver);
  return true;
}

// dst[r * ld + h] = mult * row r (h < n), zero up to ld.
static void PackRows(DType dtype, const void* base, const int64_t* offsets, int64_t num_rows,
                     int64_t n, float mult, float* dst, int64_t ld) {
  for (int64_t r = 0; r < num_rows; ++r) {
    LoadRow(dtype, Offset(base, dtype, offsets[r]), n, mult, dst + r * ld);
    for (int64_t h = n; h < ld; ++h) dst[r * ld + h] = 0.0f;
  }
}

// dst[j * ld + r] = element j of row r, for rows r < ld (ld a multiple of kVL) and j < width
// (a multiple of kVL): fill_row(r, row) writes row r's width elements (zeros past its end),
// kVL rows at a time into block (kVL * width floats), which are then transposed a kVL x kVL
// block at a time. Rows num_rows..ld are zero.
template <class FillRow>
static void TransposeRows(int64_t num_rows, int64_t width, float* dst, int64_t ld,
                          float* block, FillRow fill_row) {
  for (int64_t r0 = 0; r0 < ld; r0 += kVL) {
    for (int64_t i = 0; i < kVL; ++i) {
      float* row = block + i * width;
      if (r0 + i < num_rows) {
        fill_row(r0 + i, row);
      } else {
        __builtin_memset(row, 0, width * sizeof(float));
      }
    }
    for (int64_t j = 0; j < width; j += kVL) {
      TransposeBlock(block + j, width, dst + j * ld + r0, ld);
    }
  }
}

// dst[h * ld + r] = mult * row r, h < RoundUp(n, kVL) (zero from n), columns num_rows..ld
// zero; ld a multiple of kVL. block holds kVL * RoundUp(n, kVL) floats.
static void PackColumns(DType dtype, const void* base, const int64_t* offsets,
                        int64_t num_rows, int64_t n, float mult, float* dst, int64_t ld,
                        float* block) {
  const int64_t width = RoundUp(n, kVL);
  TransposeRows(num_rows, width, dst, ld, block, [&](int64_t r, float* row) {
    LoadRow(dtype, Offset(base, dtype, offsets[r]), n, mult, row);
    for (int64_t h = n; h < width; ++h) row[h] = 0.0f;
  });
}

// ------------------------------------------------------------ logits and P V products
// With bfloat16 inputs and the avx512bf16 kernel set (CPUs where vdpbf16ps outruns FMAs, see
// dispatch.cc) every product multiplies the inputs' own bf16 pairs (exact products, float32
// sums, twice the FMA's work per instruction, half the packing); otherwise products are
// float32 GEMMs with the queries pre-scaled. Forward and backward pack and multiply the
// logits through the same functions, so the backward recomputes bitwise the logits whose lse
// the forward saved.

#if JAXATTN_VL == 16
// Row r's bf16 pairs: dst[r * ld + w] = elements (2w, 2w + 1), zero past n and up to ld.
static void PackPairRows(const void* base, const int64_t* offsets, int64_t num_rows, int64_t n,
                         uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < num_rows; ++r) {
    uint32_t* d = dst + r * ld;
    __builtin_memset(d, 0, ld * 4);
    __builtin_memcpy(d, Offset(base, DType::kBF16, offsets[r]), n * 2);
  }
}

// The pairs of row r as column r: dst[w * ld + r] for w < RoundUp(CeilDiv(n, 2), kVL), zero
// past the row's pairs and in columns num_rows..ld; ld a multiple of kVL. block holds
// kVL * RoundUp(CeilDiv(n, 2), kVL) words.
static void PackPairColumns(const void* base, const int64_t* offsets, int64_t num_rows,
                            int64_t n, float* dst, int64_t ld, float* block) {
  const int64_t width = RoundUp(CeilDiv(n, 2), kVL);
  TransposeRows(num_rows, width, dst, ld, block, [&](int64_t r, float* row) {
    __builtin_memset(row, 0, width * sizeof(float));
    __builtin_memcpy(row, Offset(base, DType::kBF16, offsets[r]), n * 2);
  });
}

// Rows 2i and 2i + 1 interleaved: dst[i * ld + h] = (row 2i [h], row 2i+1 [h]), a missing
// odd row and h >= n zero.
static void PackRowPairs(const void* base, const int64_t* offsets, int64_t num_rows, int64_t n,
                         uint32_t* dst, int64_t ld) {
  for (int64_t i = 0; 2 * i < num_rows; ++i) {
    const uint16_t* lo =
        static_cast<const uint16_t*>(Offset(base, DType::kBF16, offsets[2 * i]));
    const uint16_t* hi = 2 * i + 1 < num_rows
        ? static_cast<const uint16_t*>(Offset(base, DType::kBF16, offsets[2 * i + 1]))
        : nullptr;
    uint32_t* d = dst + i * ld;
    int64_t h = 0;
    typedef uint16_t VH __attribute__((vector_size(kVL * 2)));
    for (; h + kVL <= n; h += kVL) {
      VH l, u = VH{};
      __builtin_memcpy(&l, lo + h, sizeof(l));
      if (hi != nullptr) __builtin_memcpy(&u, hi + h, sizeof(u));
      const VI w = __builtin_convertvector(l, VI) | __builtin_convertvector(u, VI) << 16;
      __builtin_memcpy(d + h, &w, sizeof(w));
    }
    for (; h < n; ++h) d[h] = lo[h] | (hi == nullptr ? 0u : static_cast<uint32_t>(hi[h]) << 16);
    for (; h < ld; ++h) d[h] = 0;
  }
}

// n floats (a multiple of kVL) rounded to bf16 (nearest even, NaN kept) as n / 2 pairs.
static inline void RoundToPairs(const float* x, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; j += kVL) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + j));
    __builtin_memcpy(dst + j / 2, &h, sizeof(h));
  }
}
#endif

// Every product below is ProductGemm(a, b) with its operands packed by role: the inner
// dimension runs along input rows (Q K^T, dO V^T and their transposes: PackDotRows for the
// left operand, PackDotColumns for the right) or across rows (P V, dS K, P^T dO, dS^T Q:
// a computed left operand, ComputedOperand, and PackAcrossRows for the right). In pairs mode
// packed rows hold words (two bf16), in float32 mode floats.

// Storage per packed row of n elements (floats or words), rounded to whole vectors.
static inline int64_t DotLd(const FlashContext& c, int64_t n) {
  return RoundUp(Pairs(c) ? CeilDiv(n, 2) : n, kVL);
}

// Rows (n elements each) as a left operand: row r at dst + r * DotLd(c, n). Float32 rows are
// multiplied by mult (the scale, for queries), bf16 pairs are not (LogitsGemm scales).
static void PackDotRows(const FlashContext& c, const void* base, const int64_t* offsets,
                        int64_t num_rows, int64_t n, float mult, float* dst) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    PackPairRows(base, offsets, num_rows, n, reinterpret_cast<uint32_t*>(dst), DotLd(c, n));
    return;
  }
#endif
  PackRows(c.p->dtype, base, offsets, num_rows, n, mult, dst, DotLd(c, n));
}

// The same rows as the columns of a right operand (ld columns, a multiple of kVL; storage
// rows written up to RoundUp(n, kVL)). block holds kVL * RoundUp(n, kVL) floats.
static void PackDotColumns(const FlashContext& c, const void* base, const int64_t* offsets,
                           int64_t num_rows, int64_t n, float mult, float* dst, int64_t ld,
                           float* block) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    PackPairColumns(base, offsets, num_rows, n, dst, ld, block);
    return;
  }
#endif
  PackColumns(c.p->dtype, base, offsets, num_rows, n, mult, dst, ld, block);
}

// Rows (n elements each) as a right operand whose inner dimension runs across them: float32
// rows, or rows 2i and 2i + 1 interleaved in pairs; row length RoundUp(n, kVL) either way.
// For AMX, zero word rows follow up to PaddedInner(c, num_rows) / 2 (whole tiles).
static void PackAcrossRows(const FlashContext& c, const void* base, const int64_t* offsets,
                           int64_t num_rows, int64_t n, float* dst) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    const int64_t ld = RoundUp(n, kVL), words = CeilDiv(num_rows, 2);
    PackRowPairs(base, offsets, num_rows, n, reinterpret_cast<uint32_t*>(dst), ld);
    if (c.mode == ProductMode::kAmxTiles) {
      __builtin_memset(dst + words * ld, 0,
                       (PaddedInner(c, num_rows) / 2 - words) * ld * sizeof(float));
    }
    return;
  }
#endif
  PackRows(c.p->dtype, base, offsets, num_rows, n, 1.0f, dst, RoundUp(n, kVL));
}

// A computed left operand (P or dS: m rows of ld floats, ld = PaddedInner of the valid n):
// itself, or rounded to bf16 pairs into `pairs` (ld / 2 words a row, the element past an
// odd n zero: products over n read it), as a bf16 computation would. AMX products read
// whole tiles, so there everything past n is zero, and the rows up to PaddedRows(c, m)
// (whatever x holds there: the soft cap's tanh is not written past n). *lda receives its
// row length in storage units.
static const float* ComputedOperand(const FlashContext& c, const float* x, int64_t m,
                                    int64_t n, int64_t ld, float* pairs, int64_t* lda) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    uint32_t* words = reinterpret_cast<uint32_t*>(pairs);
    for (int64_t i = 0; i < m; ++i) {
      uint32_t* row = words + i * (ld / 2);
      RoundToPairs(x + i * ld, ld, row);
      if (n % 2 != 0) row[n / 2] &= 0xffffu;
      if (c.mode == ProductMode::kAmxTiles) {
        __builtin_memset(row + CeilDiv(n, 2), 0, (ld / 2 - CeilDiv(n, 2)) * 4);
      }
    }
    ZeroPaddingRows(c, pairs, m, ld / 2);
    *lda = ld / 2;
    return pairs;
  }
#endif
  (void)c, (void)m, (void)n, (void)pairs;
  *lda = ld;
  return x;
}

// out[m, n] (+)= a b over `inner` elements, with the operands packed as above. For AMX the
// operands are padded to whole tiles (PaddedRows, PaddedInner, DotLd) and rows
// m..PaddedRows(c, m) of out are written too.
static void ProductGemm(const FlashContext& c, int64_t m, int64_t n, int64_t inner,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float* out,
                        int64_t ldo, bool accumulate) {
#ifdef JAXATTN_AMX
  if (c.mode == ProductMode::kAmxTiles) {
    AmxGemm(m, n, RoundUp(CeilDiv(inner, 2), 16), reinterpret_cast<const uint32_t*>(a), lda,
            reinterpret_cast<const uint32_t*>(b), ldb, out, ldo, accumulate);
    return;
  }
#endif
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    Gemm<BF16Pairs>(m, n, CeilDiv(inner, 2), reinterpret_cast<const uint32_t*>(a), lda,
                    reinterpret_cast<const uint32_t*>(b), ldb, out, ldo, accumulate);
    return;
  }
#endif
  (void)c;
  Gemm(m, n, inner, a, lda, b, ldb, out, ldo, accumulate);
}

// out[m, n] = scaled logits of packed query (or key) rows a against packed key (or query)
// columns b (n columns of ldb). With scaled = false bf16 pairs are left unscaled: the caller
// multiplies by PairsScale(c) itself.
static void LogitsGemm(const FlashContext& c, int64_t m, int64_t n, const float* a,
                       const float* b, int64_t ldb, float* out, int64_t ldo,
                       bool scaled = true) {
  ProductGemm(c, m, n, c.p->head_dim, a, DotLd(c, c.p->head_dim), b, ldb, out, ldo, false);
  if (!Pairs(c) || !scaled) return;  // the float32 queries were scaled when packed
  const VF scale = Splat(c.p->scale);
  for (int64_t i = 0; i < m; ++i) {
    float* row = out + i * ldo;
    for (int64_t j = 0; j < n; j += kVL) Store(row + j, Load(row + j) * scale);
  }
}

// What LogitsGemm(..., scaled = false) leaves for its caller to multiply the logits by.
static inline float PairsScale(const FlashContext& c) { return Pairs(c) ? c.p->scale : 1.0f; }

// One element of a PackDotRows x PackDotColumns product of n-element rows a and b, rounded
// bitwise as ProductGemm rounds it (the backward's D must cancel against dP exactly).
static inline float RowDot(const FlashContext& c, const float* a, const float* b, int64_t n) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    const uint32_t* wa = reinterpret_cast<const uint32_t*>(a);
    const uint32_t* wb = reinterpret_cast<const uint32_t*>(b);
    VF acc = VF{};
    for (int64_t w = 0; w < CeilDiv(n, 2); ++w) {
      acc = BF16Pairs::MulAdd(acc, BF16Pairs::Broadcast(wa + w), BF16Pairs::Broadcast(wb + w));
    }
    return acc[0];
  }
#endif
  (void)c;
  return GemmDot(a, b, n);
}

// dots[r] = row r of the packed left operand a (rows of lda, PackDotRows) times row r of
// `base` (n elements at offsets[r]), for r < num_rows, each rounded bitwise as an element of
// ProductGemm's product of a with those rows packed as columns. AMX rounds inside the tile
// instruction, so there that product is taken (16 x 16 blocks on the diagonal) and its
// diagonal read. block: kVL * RoundUp(n, kVL) floats; scratch (AMX only): 256 +
// DotLd(c, n) * PaddedRows(c, num_rows) floats.
static void RowDots(const FlashContext& c, const void* base, const int64_t* offsets,
                    int64_t num_rows, int64_t n, const float* a, int64_t lda, float* block,
                    float* scratch, float* dots) {
  if (c.mode == ProductMode::kAmxTiles) {
    float* diagonal_block = scratch;
    float* columns = scratch + 256;
    const int64_t ld = PaddedRows(c, num_rows);
    PackDotColumns(c, base, offsets, num_rows, n, 1.0f, columns, ld, block);
    for (int64_t i = 0; i < num_rows; i += 16) {
      ProductGemm(c, 16, 16, n, a + i * lda, lda, columns + i, ld, diagonal_block, 16, false);
      for (int64_t r = i; r < MinI(num_rows, i + 16); ++r) {
        dots[r] = diagonal_block[(r - i) * 17];
      }
    }
    return;
  }
  (void)scratch;
  for (int64_t r = 0; r < num_rows; ++r) {
    PackDotRows(c, base, offsets + r, 1, n, 1.0f, block);
    dots[r] = RowDot(c, a + r * lda, block, n);
  }
}

// Element offsets of the rows of a query tile: positions [t0, t1) x the group's heads.
static int64_t QueryTileRows(const FlashContext& c, int64_t kv_head, int64_t t0, int64_t t1,
                             RowInfo* rows) {
  int64_t r = 0;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g) rows[r++] = RowInfo{t, kv_head * c.group + g};
  }
  return r;
}

// Offsets (in elements) of rows of a [batch, len, heads, dim] tensor.
static void RowOffsets(const RowInfo* rows, int64_t num_rows, int64_t batch_index, int64_t len,
                       int64_t heads, int64_t dim, int64_t* offsets) {
  for (int64_t r = 0; r < num_rows; ++r) {
    offsets[r] = ((batch_index * len + rows[r].t) * heads + rows[r].n) * dim;
  }
}
static void KeyOffsets(int64_t s0, int64_t num_keys, int64_t batch_index, int64_t len,
                       int64_t kv_head, int64_t kv_heads, int64_t dim, int64_t* offsets) {
  for (int64_t j = 0; j < num_keys; ++j) {
    offsets[j] = ((batch_index * len + s0 + j) * kv_heads + kv_head) * dim;
  }
}

static void ZeroOutputRows(const AttentionProblem& p, const FlashForwardResult& res,
                           const RowInfo* rows, int64_t num_rows, int64_t b) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    __builtin_memset(Offset(res.out, p.dtype, row * p.value_dim), 0,
                     p.value_dim * DTypeSize(p.dtype));
    res.lse[row] = -kInf;
  }
}

// The key tiles query tile q_tile (positions [t0, t1)) visits: those the analytic masks leave,
// or those of its row in the block-sparse table.
static inline TileCursor KeyTilesOf(const FlashContext& c, int64_t kv_head, int64_t q_tile,
                                    int64_t t0, int64_t t1, int64_t kv_len) {
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (kv_head % st.groups) * st.num_q_tiles + q_tile;
    return TableTiles(st.q_indptr, st.q_entries, row, kKeysPerTile, c.p->kv_len, st.masks,
                      c.positions_per_tile * c.group * kKeysPerTile);
  }
  int64_t lo, hi;
  KeyRange(*c.p, t0, t1, kv_len, &lo, &hi);
  // AMX: on the grid of the packed blocks (a window's first tile then starts masked).
  if (c.mode == ProductMode::kAmxTiles) lo -= lo % c.keys_per_tile;
  return DenseTiles(lo, hi, c.keys_per_tile);
}

// The query tiles key tile k_tile (keys [s0, s1)) is seen by, likewise.
static inline TileCursor QueryTilesOf(const FlashContext& c, int64_t kv_head, int64_t k_tile,
                                      int64_t s0, int64_t s1, int64_t q_len) {
  if (c.sparse != nullptr) {
    const BlockSparseTables& st = *c.sparse;
    const int64_t row = (kv_head % st.groups) * st.num_k_tiles + k_tile;
    return TableTiles(st.k_indptr, st.k_entries, row, c.positions_per_tile, c.p->q_len,
                      st.masks_t, kKeysPerTile * c.rows_padded);
  }
  int64_t lo, hi;
  QueryRange(*c.p, s0, s1, q_len, &lo, &hi);
  return DenseTiles(lo, hi, c.positions_per_tile);
}

// One online-softmax step for a row of logits sr[0, nk) (stored to nkp, a multiple of kVL;
// the columns from nk on become -inf): multiplies them by prescale (the scale, where the
// products left it out: one pass fewer over the row), exponentiates them against the new
// running max, updates the running max *m and sum *l, and rescales the output row
// accumulated so far when the max grows. The probabilities replace the logits in sr, or
// with pairs_out (avx512 only) go there rounded to bf16 pairs (nkp / 2 words, zero past nk)
// as the P V product takes them. A row whose logits are all -inf becomes zeros; a NaN among
// them (the max skips NaN) poisons the sum, so that it reaches the output instead of the row
// being taken as fully masked.
static inline void OnlineSoftmaxStep(float* sr, int64_t nk, int64_t nkp, float* m, float* l,
                                     float* orow, int64_t hvp, float prescale = 1.0f,
                                     uint32_t* pairs_out = nullptr, float soft_cap = 0.0f) {
  const VI lane = LaneIndices();
  const float inv_cap = soft_cap > 0.0f ? 1.0f / soft_cap : 0.0f;
  VF mv = Splat(-kInf);
  for (int64_t j = 0; j < nkp; j += kVL) {
    VF x = Load(sr + j);
    const bool tail = j + kVL > nk;
    if (prescale != 1.0f) x = x * prescale;
    if (soft_cap > 0.0f) {  // as TransformLogits applies it (the backward recomputes that)
      VF th;
      x = SoftCap(x, inv_cap, soft_cap, &th);
    }
    if (tail) x = lane + static_cast<int32_t>(j) < static_cast<int32_t>(nk) ? x : Splat(-kInf);
    if (prescale != 1.0f || soft_cap > 0.0f || tail) Store(sr + j, x);
    mv = x > mv ? x : mv;
  }
  const float m_new = MaxF(*m, HorizontalMax(mv));
  if (m_new == -kInf) {
    for (int64_t j = 0; j < nk; ++j) {
      if (sr[j] != sr[j]) *l = sr[j];
    }
    __builtin_memset(sr, 0, nkp * sizeof(float));
    if (pairs_out != nullptr) __builtin_memset(pairs_out, 0, nkp / 2 * sizeof(uint32_t));
    return;
  }
  const VF mnv = Splat(m_new);
  VF sum = VF{};
  for (int64_t j = 0; j < nkp; j += kVL) {
    const VF e = Exp(Load(sr + j) - mnv);
#if JAXATTN_VL == 16
    if (pairs_out != nullptr) {
      RoundToPairs(reinterpret_cast<const float*>(&e), kVL, pairs_out + j / 2);
    } else {
      Store(sr + j, e);
    }
#else
    Store(sr + j, e);
#endif
    sum += e;
  }
  // exp(0) is exactly 1: skip the libm call when the max stays (most tiles after the first).
  const float correction = m_new == *m ? 1.0f : __builtin_expf(*m - m_new);
  *l = *l * correction + HorizontalSum(sum);
  *m = m_new;
  if (correction != 1.0f) {
    for (int64_t h = 0; h < hvp; h += kVL) Store(orow + h, Load(orow + h) * correction);
  }
}

#include "dropout.h"

// Tasks go head by head (consecutive tasks share K/V tiles in cache), and within a head the
// costliest tiles first: under a causal mask the last query tiles see the most keys (and the
// first key tiles the most queries). Claimed from a shared counter in that order, the threads
// end on the short tiles of the last head and finish together.
struct TaskTile {
  int64_t tile, kv_head, b;
};
static inline TaskTile TileOfTask(const AttentionProblem& p, int64_t task, int64_t num_tiles,
                                  bool costliest_last) {
  const int64_t rank = task % num_tiles, head = task / num_tiles;
  return TaskTile{costliest_last ? num_tiles - 1 - rank : rank, head % p.num_kv_heads,
                  head / p.num_kv_heads};
}

// ---------------------------------------------------------------------------- forward

struct ForwardJob {
  FlashContext c;
  FlashForwardResult res;
};

static void ForwardTask(void* job_ptr, int64_t task) {
  const ForwardJob& job = *static_cast<const ForwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  const int64_t q_tile = tt.tile, kv_head = tt.kv_head, b = tt.b;
  const int64_t t0 = q_tile * c.positions_per_tile;
  const int64_t t1 = MinI(p.q_len, t0 + c.positions_per_tile);
  const int64_t q_len = QueryLength(p, b), kv_len = KeyLength(p, b);
  const int64_t tv1 = MaxI(t0, MinI(t1, q_len));  // rows at or past q_len output zero
  const int64_t max_rows = (t1 - t0) * c.group, mrp = PaddedRows(c, max_rows);
  const int64_t bk = c.keys_per_tile, bkp = PaddedInner(c, bk);
  AmxTaskTiles amx_tiles(c.mode == ProductMode::kAmxTiles);

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *q = nullptr, *o = nullptr, *s = nullptr, *m = nullptr, *l = nullptr, *kt = nullptr;
  float *v = nullptr, *block = nullptr, *prob_pairs = nullptr, *cache_rows = nullptr;
  const int64_t cache_tile = KvTileScratch(p, bk, MaxI(p.head_dim, p.value_dim));
  if (!CarveTaskScratch(c, bk, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        q = carve.Take(mrp * c.hp);
        o = carve.Take(mrp * c.hvp);
        s = carve.Take(mrp * bkp);
        m = carve.Take(max_rows);
        l = carve.Take(max_rows);
        kt = carve.Take(c.hp * bkp);
        v = carve.Take(bk * c.hvp);
        block = carve.Take(kVL * c.hp);
        prob_pairs = carve.Take(mrp * bkp / 2);
        cache_rows = carve.Take(cache_tile);  // a quantized cache's dequantised tile
      })) {
    return;
  }

  const int64_t num_rows = QueryTileRows(c, kv_head, t0, tv1, rows);
  {
    RowInfo dead[1];
    for (int64_t t = tv1; t < t1; ++t) {
      for (int64_t g = 0; g < c.group; ++g) {
        dead[0] = RowInfo{t, kv_head * c.group + g};
        ZeroOutputRows(p, job.res, dead, 1, b);
      }
    }
  }
  if (num_rows == 0) return;

  RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackDotRows(c, p.query, offsets, num_rows, p.head_dim, p.scale, q);
  ZeroPaddingRows(c, q, num_rows, DotLd(c, p.head_dim));
  for (int64_t r = 0; r < num_rows; ++r) {
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  __builtin_memset(o, 0, PaddedRows(c, num_rows) * c.hvp * sizeof(float));

  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  const TokenInfo ti = TokenInfoOf(p, b);
  TileCursor tiles = KeyTilesOf(c, kv_head, q_tile, t0, tv1, kv_len);
  for (Tile tile; NextTile(&tiles, &tile);) {
    const int64_t s0 = tile.start, nk = tile.count, nkp = PaddedInner(c, nk);
    const TileKind kind = ClassifyTile(p, ti, t0, tv1, s0, s0 + nk, kv_len);
    if (kind == TileKind::kHidden) continue;
    // A packed block holds the keys up to the sequence's end, zeros past it: usable unless
    // key lengths cut the tile shorter (the values past them may be anything, even NaN).
    const float* key_columns = kt;
    const float* value_pairs = v;
    int64_t ld_keys = nkp;
    if (c.packed_keys != nullptr && s0 % bk == 0 && nk == MinI(bk, p.kv_len - s0)) {
      const int64_t blocks = CeilDiv(p.kv_len, bk), block = s0 / bk;
      key_columns = c.packed_keys +
          ((kb * p.num_kv_heads + kv_head) * blocks + block) * c.key_block_floats;
      value_pairs = c.packed_values +
          ((vb * p.num_kv_heads + kv_head) * blocks + block) * c.value_block_floats;
      ld_keys = bk;
    } else {
      const void* keys = KvTileRows(p, false, kb, s0, nk, kv_head, offsets, cache_rows);
      PackDotColumns(c, keys, offsets, nk, p.head_dim, 1.0f, kt, nkp, block);
      const void* values = KvTileRows(p, true, vb, s0, nk, kv_head, offsets, cache_rows);
      PackAcrossRows(c, values, offsets, nk, p.value_dim, v);
    }

    const bool full = kind == TileKind::kFull;
    // Without bias, masks, positions, segment ids or ALiBi the softmax scales the logits and
    // applies the soft cap itself (one pass over the tile less).
    const bool transform = p.bias.data != nullptr || p.mask.data != nullptr || !full ||
                           tile.mask != nullptr || ti.by_position || ti.q_seg != nullptr ||
                           ti.slopes != nullptr;
    // Bf16 pairs: P is rounded to pairs as it is computed (the rows past num_rows, which
    // AMX multiplies, are zero). Float32: P in place of the logits.
    uint32_t* prob_words = Pairs(c) ? reinterpret_cast<uint32_t*>(prob_pairs) : nullptr;
    if (prob_words != nullptr) {
      __builtin_memset(prob_words + num_rows * (nkp / 2), 0,
                       (PaddedRows(c, num_rows) - num_rows) * (nkp / 2) * sizeof(uint32_t));
    }
    // AMX: 32 rows at a time (two row tiles), so that a slab's logits stay in the L1 cache
    // from the product through the softmax to the P V product. Results do not depend on it.
    int64_t slab = c.mode == ProductMode::kAmxTiles ? 32 : num_rows;
    for (int64_t r0 = 0; r0 < num_rows; r0 += slab) {
      const int64_t nr = MinI(slab, num_rows - r0);
      float* ss = s + r0 * nkp;
      LogitsGemm(c, nr, nkp, q + r0 * DotLd(c, p.head_dim), key_columns, ld_keys, ss, nkp,
                 /*scaled=*/transform);
      if (transform) {
        TransformLogits<false>(c, b, rows + r0, nr, s0, nk, kv_len, full,
                               tile.mask != nullptr ? tile.mask + r0 * kKeysPerTile : nullptr,
                               ss, nkp, nullptr);
      }
      for (int64_t r = r0; r < r0 + nr; ++r) {
        OnlineSoftmaxStep(s + r * nkp, nk, nkp, &m[r], &l[r], o + r * c.hvp, c.hvp,
                          transform ? 1.0f : PairsScale(c),
                          prob_words != nullptr ? prob_words + r * (nkp / 2) : nullptr,
                          transform ? 0.0f : p.soft_cap);
        if (HasDropout(p)) {  // after the normaliser took the undropped weights
          if (prob_words != nullptr) {
            DropoutRowPairs(p, b, rows[r].n, rows[r].t, s0, prob_words + r * (nkp / 2), nkp / 2);
          } else {
            DropoutRow(p, b, rows[r].n, rows[r].t, s0, s + r * nkp, nkp, 1.0f);
          }
        }
      }
      const float* prob = prob_words != nullptr ? prob_pairs + r0 * (nkp / 2) : ss;
      ProductGemm(c, nr, c.hvp, nk, prob, prob_words != nullptr ? nkp / 2 : nkp, value_pairs,
                  c.hvp, o + r0 * c.hvp, c.hvp, true);
    }
  }

  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    void* out_row = Offset(job.res.out, p.dtype, row * p.value_dim);
    if (l[r] > 0.0f || l[r] != l[r]) {
      StoreRow(p.dtype, o + r * c.hvp, p.value_dim, DropoutKeepScale(p) / l[r], out_row);
      job.res.lse[row] = m[r] + __builtin_logf(l[r]);
    } else {
      __builtin_memset(out_row, 0, p.value_dim * DTypeSize(p.dtype));
      job.res.lse[row] = -kInf;
    }
  }
}

// AMX tiles: keys per tile, chosen by measurement (bench_flash.py): each P V product then
// accumulates this many keys into its output tiles per load and store, and the backward's
// key pass packs each query tile once per this many keys.
constexpr int64_t kAmxKeysPerTile = 256;

// The context of a flash (sparse == nullptr) or block-sparse call. bf16_mode: how bf16
// inputs are multiplied (the kernel table picks what the CPU does fastest).
static FlashContext ContextFor(const AttentionProblem& p, const BlockSparseTables* sparse,
                               ProductMode bf16_mode) {
  int64_t rows = kRowsPerTile;
  if (sparse == nullptr) {
    const int64_t group = p.num_heads / p.num_kv_heads;
    const int64_t positions = MaxI(1, kLargeRowsPerTile / group);
    const int64_t tasks = p.batch * p.num_kv_heads * CeilDiv(p.q_len, positions);
    if (tasks >= kLargeTileMinTasks) rows = kLargeRowsPerTile;
  }
  FlashContext c = MakeContext(p, rows);
  c.sparse = sparse;
  if (p.dtype == DType::kBF16 &&
      ((bf16_mode == ProductMode::kBF16Pairs && kHasBF16Pairs) ||
       (bf16_mode == ProductMode::kAmxTiles && kHasAmxTiles))) {
    c.mode = bf16_mode;
  }
  // A dense mask keeps the block-sparse tables' grid: block-sparse attention then stays
  // bitwise equal to flash attention with its mask materialised (sparse_impl.h). So do
  // positions and segment ids: their tile skipping (ClassifyTile) is finer there, and equals
  // the dense mask they stand for bitwise.
  const bool token_masks = p.q_positions != nullptr || p.kv_positions != nullptr ||
                           p.q_segments != nullptr;
  if (c.mode == ProductMode::kAmxTiles && sparse == nullptr && p.mask.data == nullptr &&
      !token_masks) {
    c.keys_per_tile = kAmxKeysPerTile;
  }
  return c;
}

// Packs K and V block by block (c.keys_per_tile keys from key 0; a block past the sequence's
// end zero there) into the buffers c.packed_keys / c.packed_values point to: the forward's
// operand layouts (PackDotColumns, PackAcrossRows), once per call instead of once per query
// tile. Tasks: the key blocks of every (kv batch, kv head), then the value blocks.
static void PackKeyValueTask(void* job_ptr, int64_t task) {
  const FlashContext& c = *static_cast<const FlashContext*>(job_ptr);
  const AttentionProblem& p = *c.p;
  const int64_t bk = c.keys_per_tile, blocks = CeilDiv(p.kv_len, bk);
  const int64_t key_tasks = p.kv_batch * p.num_kv_heads * blocks;
  const bool keys = task < key_tasks;
  const int64_t index = keys ? task : task - key_tasks;
  const int64_t block = index % blocks, head = index / blocks;
  const int64_t kv_head = head % p.num_kv_heads, batch = head / p.num_kv_heads;
  const int64_t s0 = block * bk, nk = MinI(bk, p.kv_len - s0);
  const int64_t dim = keys ? p.head_dim : p.value_dim;
  int64_t* offsets = nullptr;
  float *transpose_block = nullptr, *cache_rows = nullptr;
  const int64_t cache_tile = KvTileScratch(p, bk, dim);
  if (!CarveTaskScratch(c, 0, [&](Carver& carve) {
        offsets = reinterpret_cast<int64_t*>(carve.Take(bk * 2));
        transpose_block = carve.Take(kVL * RoundUp(dim, kVL));
        cache_rows = carve.Take(cache_tile);
      })) {
    return;
  }
  const void* base = KvTileRows(p, !keys, batch, s0, nk, kv_head, offsets, cache_rows);
  if (keys) {
    float* dst = const_cast<float*>(c.packed_keys) + index * c.key_block_floats;
    PackDotColumns(c, base, offsets, nk, dim, 1.0f, dst, bk, transpose_block);
  } else {
    float* dst = const_cast<float*>(c.packed_values) + index * c.value_block_floats;
    PackAcrossRows(c, base, offsets, nk, dim, dst);
  }
}

// sparse: nullptr for flash attention, else the block-sparse tiles to visit.
// Returns the bytes of scratch memory that could not be allocated (0: none, the results are
// written).
static int64_t RunForward(const AttentionProblem& p, const BlockSparseTables* sparse,
                          ProductMode bf16_mode, const FlashForwardResult& res,
                          const Parallel& parallel) {
  ForwardJob job{ContextFor(p, sparse, bf16_mode), res};
  FlashContext& c = job.c;
  float* packed = nullptr;
  if (c.mode == ProductMode::kAmxTiles) {
    const int64_t bk = c.keys_per_tile, blocks = CeilDiv(p.kv_len, bk);
    c.key_block_floats = DotLd(c, p.head_dim) * bk;
    c.value_block_floats = bk / 2 * RoundUp(p.value_dim, kVL);
    const int64_t key_floats = p.kv_batch * p.num_kv_heads * blocks * c.key_block_floats;
    const int64_t value_floats = p.value_batch * p.num_kv_heads * blocks * c.value_block_floats;
    packed = static_cast<float*>(__builtin_malloc((key_floats + value_floats) * sizeof(float)));
    if (packed != nullptr) {  // else every task packs its own tiles
      c.packed_keys = packed;
      c.packed_values = packed + key_floats;
      parallel.For((p.kv_batch + p.value_batch) * p.num_kv_heads * blocks, PackKeyValueTask,
                   &c);
    }
  }
  if (c.scratch_failed == 0) {
    const int64_t tasks = p.batch * p.num_kv_heads * c.num_q_tiles;
    parallel.For(tasks, ForwardTask, &job);
  }
  __builtin_free(packed);
  return c.scratch_failed;
}

template <ProductMode kBF16Mode>
static int64_t ForwardImpl(const AttentionProblem& p, const FlashForwardResult& res,
                           const Parallel& parallel) {
  return RunForward(p, nullptr, kBF16Mode, res, parallel);
}

// ---------------------------------------------------------------------------- backward

struct BackwardJob {
  FlashContext c;
  FlashBackwardArgs args;
  float* delta;  // [B, T, N]: rowsum(dO * O) - dlse
  // [B, T, N]: log(sum_j exp(s_j - lse)), the amount by which the float32 lse misses the
  // recomputed logits' normaliser (P = exp(s - lse - norm)). About 0, except where |lse| is
  // so large that log(l) was rounded away from m + log(l): with a finite bias of -1e9 or
  // finfo.min masking a whole row, lse == m and every P would be 1 instead of 1/S.
  float* norm;
};

// P = exp(x - lse) in place for `count` logits sharing one lse, or per element with lse_vec.
// An lse of -inf (a row that sees nothing) gives P = 0.
static inline float FiniteOrInf(float lse) { return lse == -kInf ? kInf : lse; }

// dS = P * (dP - D) [* (1 - tanh^2) with a soft cap], in place in dp.
static inline void LogitsGradRow(const float* prob, float* dp, const float* tanh_row,
                                 int64_t n, float delta_scalar, const float* delta_vec) {
  for (int64_t j = 0; j < n; j += kVL) {
    const VF d = delta_vec ? Load(delta_vec + j) : Splat(delta_scalar);
    VF ds = Load(prob + j) * (Load(dp + j) - d);
    if (tanh_row != nullptr) {
      const VF th = Load(tanh_row + j);
      ds = ds * (1.0f - th * th);
    }
    Store(dp + j, ds);
  }
}

// Pass 1, per query tile: D, and dQ and/or dlogits.
static void QueryGradTask(void* job_ptr, int64_t task) {
  const BackwardJob& job = *static_cast<const BackwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashBackwardArgs& a = job.args;
  const TaskTile tt = TileOfTask(p, task, c.num_q_tiles, /*costliest_last=*/true);
  const int64_t q_tile = tt.tile, kv_head = tt.kv_head, b = tt.b;
  const int64_t t0 = q_tile * c.positions_per_tile;
  const int64_t t1 = MinI(p.q_len, t0 + c.positions_per_tile);
  const int64_t q_len = QueryLength(p, b), kv_len = KeyLength(p, b);
  const int64_t tv1 = MaxI(t0, MinI(t1, q_len));
  const int64_t max_rows = (t1 - t0) * c.group, mrp = PaddedRows(c, max_rows);
  const int64_t bk = c.keys_per_tile, bkp = PaddedInner(c, bk);
  const bool has_cap = p.soft_cap > 0.0f;
  const bool amx = c.mode == ProductMode::kAmxTiles;
  AmxTaskTiles amx_tiles(amx);
  const int64_t row_dots_scratch = amx ? 256 + c.hvp * mrp : 0;

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *q = nullptr, *dout = nullptr, *dq = nullptr, *s = nullptr, *dp = nullptr;
  float *th = nullptr, *lse = nullptr, *delta = nullptr, *psum = nullptr, *kt = nullptr;
  float *k = nullptr, *vt = nullptr, *block = nullptr, *ds_pairs = nullptr;
  float* row_dots = nullptr;
  if (!CarveTaskScratch(c, bk, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        q = carve.Take(mrp * c.hp);
        dout = carve.Take(mrp * c.hvp);
        dq = carve.Take(mrp * c.hp);
        s = carve.Take(mrp * bkp);
        dp = carve.Take(mrp * bkp);
        th = carve.Take(max_rows * bkp);
        lse = carve.Take(max_rows);
        delta = carve.Take(max_rows);
        psum = carve.Take(max_rows);
        kt = carve.Take(c.hp * bkp);
        k = carve.Take(bk * c.hp);
        vt = carve.Take(c.hvp * bkp);
        block = carve.Take(kVL * MaxI(c.hp, c.hvp));
        ds_pairs = carve.Take(mrp * bkp / 2);
        row_dots = carve.Take(row_dots_scratch);
      })) {
    return;
  }

  // Rows past q_len: zero gradients, D = 0; dlogits rows are zeroed for the whole tile.
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t n = kv_head * c.group + g;
      const int64_t row = (b * p.q_len + t) * p.num_heads + n;
      if (a.dlogits != nullptr) {
        __builtin_memset(a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len, 0,
                         p.kv_len * sizeof(float));
      }
      if (t >= tv1) {
        job.delta[row] = 0.0f;
        job.norm[row] = 0.0f;
        if (a.dq != nullptr) {
          __builtin_memset(Offset(a.dq, p.dtype, row * p.head_dim), 0,
                           p.head_dim * DTypeSize(p.dtype));
        }
      }
    }
  }
  const int64_t num_rows = QueryTileRows(c, kv_head, t0, tv1, rows);
  if (num_rows == 0) return;

  // D = rowsum(dO * O) - dlse, from the rounded output as autodiff of the forward would.
  RowOffsets(rows, num_rows, b, p.q_len, p.num_heads, p.value_dim, offsets);
  const int64_t ld_dout = DotLd(c, p.value_dim);
  PackDotRows(c, a.dout, offsets, num_rows, p.value_dim, 1.0f, dout);
  ZeroPaddingRows(c, dout, num_rows, ld_dout);
  // Rounded like dP = dO V^T: for a one-hot row dP - D is then exactly 0, as it is in the
  // exact gradient (otherwise an ulp here, times the scale, is the gradient).
  RowDots(c, a.out, offsets, num_rows, p.value_dim, dout, ld_dout, block, row_dots, delta);
  for (int64_t r = 0; r < num_rows; ++r) {
    float d = delta[r];
    const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
    if (a.dlse != nullptr) d -= a.dlse[row];
    delta[r] = d;
    job.delta[row] = d;
    lse[r] = FiniteOrInf(a.lse[row]);
  }
  const bool key_pass = a.dk != nullptr && a.dv != nullptr;  // it needs job.norm
  if (a.dq == nullptr && a.dlogits == nullptr && !key_pass) return;

  RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
  PackDotRows(c, p.query, offsets, num_rows, p.head_dim, p.scale, q);
  ZeroPaddingRows(c, q, num_rows, DotLd(c, p.head_dim));
  __builtin_memset(dq, 0, PaddedRows(c, num_rows) * c.hp * sizeof(float));
  for (int64_t r = 0; r < num_rows; ++r) psum[r] = 0.0f;

  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  const TokenInfo ti = TokenInfoOf(p, b);
  TileCursor tiles = KeyTilesOf(c, kv_head, q_tile, t0, tv1, kv_len);
  for (Tile tile; NextTile(&tiles, &tile);) {
    const int64_t s0 = tile.start, nk = tile.count, nkp = PaddedInner(c, nk);
    const TileKind kind = ClassifyTile(p, ti, t0, tv1, s0, s0 + nk, kv_len);
    if (kind == TileKind::kHidden) continue;
    KeyOffsets(s0, nk, kb, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    PackDotColumns(c, p.key, offsets, nk, p.head_dim, 1.0f, kt, nkp, block);
    if (a.dq != nullptr) PackAcrossRows(c, p.key, offsets, nk, p.head_dim, k);
    KeyOffsets(s0, nk, vb, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    PackDotColumns(c, p.value, offsets, nk, p.value_dim, 1.0f, vt, nkp, block);

    LogitsGemm(c, num_rows, nkp, q, kt, nkp, s, nkp);
    TransformLogits<false>(c, b, rows, num_rows, s0, nk, kv_len, kind == TileKind::kFull,
                           tile.mask, s, nkp, has_cap ? th : nullptr);
    ProductGemm(c, num_rows, nkp, p.value_dim, dout, ld_dout, vt, nkp, dp, nkp, false);
    for (int64_t r = 0; r < num_rows; ++r) {
      float* sr = s + r * nkp;
      for (int64_t j = nk; j < nkp; ++j) sr[j] = -kInf;
      const VF lv = Splat(lse[r]);
      VF sum = VF{};
      for (int64_t j = 0; j < nkp; j += kVL) {
        const VF e = Exp(Load(sr + j) - lv);
        Store(sr + j, e);
        sum += e;
      }
      psum[r] += HorizontalSum(sum);
      if (HasDropout(p)) {
        DropoutRow(p, b, rows[r].n, rows[r].t, s0, dp + r * nkp, nkp, DropoutKeepScale(p));
      }
      LogitsGradRow(sr, dp + r * nkp, has_cap ? th + r * nkp : nullptr, nkp, delta[r],
                    nullptr);
      if (a.dlogits != nullptr) {
        const int64_t t = rows[r].t, n = rows[r].n;
        float* dst = a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len + s0;
        for (int64_t j = 0; j < nk; ++j) dst[j] = dp[r * nkp + j];
      }
    }
    if (a.dq != nullptr) {
      int64_t ldds;
      const float* ds = ComputedOperand(c, dp, num_rows, nk, nkp, ds_pairs, &ldds);
      ProductGemm(c, num_rows, c.hp, nk, ds, ldds, k, c.hp, dq, c.hp, true);
    }
  }
  // The probabilities above were exp(s - lse) = l' P; divide the results by l'.
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t t = rows[r].t, n = rows[r].n;
    const int64_t row = (b * p.q_len + t) * p.num_heads + n;
    const float l = psum[r];
    // l' = 0: a row that sees nothing (its gradients are 0 already). NaN stays NaN.
    const float inv = l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l);
    job.norm[row] = l > 0.0f ? __builtin_logf(l) : (l == 0.0f ? 0.0f : l);
    if (a.dq != nullptr) {
      StoreRow(p.dtype, dq + r * c.hp, p.head_dim, p.scale * inv,
               Offset(a.dq, p.dtype, row * p.head_dim));
    }
    if (a.dlogits != nullptr && inv != 1.0f) {
      float* dst = a.dlogits + ((b * p.num_heads + n) * p.q_len + t) * p.kv_len;
      for (int64_t j = 0; j < p.kv_len; ++j) dst[j] *= inv;
    }
  }
}

// Pass 2, per key tile: dK and dV over every query that sees the tile.
static void KeyValueGradTask(void* job_ptr, int64_t task) {
  const BackwardJob& job = *static_cast<const BackwardJob*>(job_ptr);
  const FlashContext& c = job.c;
  const AttentionProblem& p = *c.p;
  const FlashBackwardArgs& a = job.args;
  const int64_t bk = c.keys_per_tile, num_k_tiles = CeilDiv(p.kv_len, bk);
  const TaskTile tt = TileOfTask(p, task, num_k_tiles, /*costliest_last=*/false);
  const int64_t k_tile = tt.tile, kv_head = tt.kv_head, b = tt.b;
  const int64_t s0 = k_tile * bk;
  const int64_t s1 = MinI(p.kv_len, s0 + bk);
  const int64_t q_len = QueryLength(p, b), kv_len = KeyLength(p, b);
  const int64_t sv1 = MaxI(s0, MinI(s1, kv_len));
  const int64_t nk = sv1 - s0;
  const int64_t max_rows = c.positions_per_tile * c.group, rp = PaddedInner(c, max_rows);
  const bool has_cap = p.soft_cap > 0.0f;
  AmxTaskTiles amx_tiles(c.mode == ProductMode::kAmxTiles);

  RowInfo* rows = nullptr;
  int64_t* offsets = nullptr;
  float *k = nullptr, *v = nullptr, *dk = nullptr, *dv = nullptr, *st = nullptr;
  float *dpt = nullptr, *tht = nullptr, *qt = nullptr, *dot = nullptr, *qr = nullptr;
  float *dor = nullptr, *lse = nullptr, *delta = nullptr, *norm = nullptr, *block = nullptr;
  float *pairs = nullptr, *kept = nullptr;
  uint32_t* row_keys = nullptr;
  if (!CarveTaskScratch(c, max_rows, [&](Carver& carve) {
        rows = reinterpret_cast<RowInfo*>(carve.Take(max_rows * 4));
        offsets = reinterpret_cast<int64_t*>(carve.Take(MaxI(max_rows, bk) * 2));
        k = carve.Take(bk * c.hp);
        v = carve.Take(bk * c.hvp);
        dk = carve.Take(bk * c.hp);
        dv = carve.Take(bk * c.hvp);
        st = carve.Take(bk * rp);
        dpt = carve.Take(bk * rp);
        tht = carve.Take(bk * rp);
        qt = carve.Take(c.hp * rp);
        dot = carve.Take(c.hvp * rp);
        qr = carve.Take(rp * c.hp);
        dor = carve.Take(rp * c.hvp);
        lse = carve.Take(rp);
        delta = carve.Take(rp);
        norm = carve.Take(rp);
        block = carve.Take(kVL * MaxI(c.hp, c.hvp));
        pairs = carve.Take(bk * rp / 2);
        // Dropout: the kept, scaled probabilities (for dV) and the row keys of the query tile.
        if (HasDropout(p)) {
          kept = carve.Take(bk * rp);
          row_keys = reinterpret_cast<uint32_t*>(carve.Take(2 * rp));
        }
      })) {
    return;
  }

  __builtin_memset(dk, 0, bk * c.hp * sizeof(float));
  __builtin_memset(dv, 0, bk * c.hvp * sizeof(float));
  const int64_t kb = b % p.kv_batch, vb = b % p.value_batch;
  if (nk > 0) {
    KeyOffsets(s0, nk, kb, p.kv_len, kv_head, p.num_kv_heads, p.head_dim, offsets);
    // Unscaled keys and scaled queries, as in the forward pass: the logits recomputed here
    // are then bitwise those whose lse the forward saved (scaling the keys instead rounds
    // differently, and with logits ~1e4 P = exp(s - lse) was off by ~1e-3 relative).
    PackDotRows(c, p.key, offsets, nk, p.head_dim, 1.0f, k);
    ZeroPaddingRows(c, k, nk, DotLd(c, p.head_dim));
    KeyOffsets(s0, nk, vb, p.kv_len, kv_head, p.num_kv_heads, p.value_dim, offsets);
    PackDotRows(c, p.value, offsets, nk, p.value_dim, 1.0f, v);
    ZeroPaddingRows(c, v, nk, DotLd(c, p.value_dim));
    const TokenInfo ti = TokenInfoOf(p, b);
    TileCursor tiles = QueryTilesOf(c, kv_head, k_tile, s0, sv1, q_len);
    for (Tile tile; NextTile(&tiles, &tile);) {
      const int64_t t0 = tile.start, t1 = t0 + tile.count;
      const TileKind kind = ClassifyTile(p, ti, t0, t1, s0, sv1, kv_len);
      if (kind == TileKind::kHidden) continue;
      const int64_t num_rows = QueryTileRows(c, kv_head, t0, t1, rows);
      const int64_t nrp = PaddedInner(c, num_rows);
      RowOffsets(rows, num_rows, b % p.q_batch, p.q_len, p.num_heads, p.head_dim, offsets);
      PackAcrossRows(c, p.query, offsets, num_rows, p.head_dim, qr);
      PackDotColumns(c, p.query, offsets, num_rows, p.head_dim, p.scale, qt, nrp, block);
      RowOffsets(rows, num_rows, b, p.q_len, p.num_heads, p.value_dim, offsets);
      PackAcrossRows(c, a.dout, offsets, num_rows, p.value_dim, dor);
      PackDotColumns(c, a.dout, offsets, num_rows, p.value_dim, 1.0f, dot, nrp, block);
      for (int64_t r = 0; r < nrp; ++r) {
        if (r < num_rows) {
          const int64_t row = (b * p.q_len + rows[r].t) * p.num_heads + rows[r].n;
          lse[r] = FiniteOrInf(a.lse[row]);
          delta[r] = job.delta[row];
          norm[r] = job.norm[row];
        } else {
          lse[r] = kInf;
          delta[r] = 0.0f;
          norm[r] = 0.0f;
        }
      }

      LogitsGemm(c, nk, nrp, k, qt, nrp, st, nrp);
      TransformLogits<true>(c, b, rows, num_rows, s0, nk, kv_len, kind == TileKind::kFull,
                            tile.mask, st, nrp, has_cap ? tht : nullptr);
      for (int64_t i = 0; i < nk; ++i) {
        float* si = st + i * nrp;
        for (int64_t j = 0; j < nrp; j += kVL) {
          Store(si + j, Exp(Load(si + j) - Load(lse + j) - Load(norm + j)));
        }
      }
      const float* prob_for_v = st;
      if (HasDropout(p)) {
        DropoutRowKeys(p, b, rows, num_rows, nrp, row_keys, row_keys + rp);
        DropoutKeyMajor(p, row_keys, row_keys + rp, s0, nk, nrp, st, kept,
                        DropoutKeepScale(p));
        prob_for_v = kept;
      }
      int64_t lda;
      const float* prob_t = ComputedOperand(c, prob_for_v, nk, num_rows, nrp, pairs, &lda);
      ProductGemm(c, nk, c.hvp, num_rows, prob_t, lda, dor, c.hvp, dv, c.hvp, true);
      ProductGemm(c, nk, nrp, p.value_dim, v, DotLd(c, p.value_dim), dot, nrp, dpt, nrp,
                  false);
      if (HasDropout(p)) {
        DropoutKeyMajor(p, row_keys, row_keys + rp, s0, nk, nrp, dpt, dpt,
                        DropoutKeepScale(p));
      }
      for (int64_t i = 0; i < nk; ++i) {
        LogitsGradRow(st + i * nrp, dpt + i * nrp, has_cap ? tht + i * nrp : nullptr, nrp,
                      0.0f, delta);
      }
      const float* ds_t = ComputedOperand(c, dpt, nk, num_rows, nrp, pairs, &lda);
      ProductGemm(c, nk, c.hp, num_rows, ds_t, lda, qr, c.hp, dk, c.hp, true);
    }
  }
  for (int64_t j = 0; j < s1 - s0; ++j) {
    const int64_t row = (b * p.kv_len + s0 + j) * p.num_kv_heads + kv_head;
    StoreRow(p.dtype, dk + j * c.hp, p.head_dim, p.scale,
             Offset(a.dk, p.dtype, row * p.head_dim));
    StoreRow(p.dtype, dv + j * c.hvp, p.value_dim, 1.0f,
             Offset(a.dv, p.dtype, row * p.value_dim));
  }
}

// Returns the bytes of memory that could not be allocated (0: none, the gradients are
// written).
static int64_t RunBackward(const AttentionProblem& p, const BlockSparseTables* sparse,
                           ProductMode bf16_mode, const FlashBackwardArgs& args,
                           const Parallel& parallel) {
  BackwardJob job{ContextFor(p, sparse, bf16_mode), args, nullptr, nullptr};
  const int64_t row_bytes = MaxI(p.batch * p.q_len * p.num_heads, 1) * sizeof(float);
  job.delta = static_cast<float*>(__builtin_malloc(row_bytes));
  job.norm = static_cast<float*>(__builtin_malloc(row_bytes));
  if (job.delta == nullptr || job.norm == nullptr) {
    __builtin_free(job.delta);
    __builtin_free(job.norm);
    return row_bytes;
  }
  parallel.For(p.batch * p.num_kv_heads * job.c.num_q_tiles, QueryGradTask, &job);
  if (args.dk != nullptr && args.dv != nullptr && job.c.scratch_failed == 0) {
    const int64_t k_tiles = CeilDiv(p.kv_len, job.c.keys_per_tile);
    parallel.For(p.batch * p.num_kv_heads * k_tiles, KeyValueGradTask, &job);
  }
  __builtin_free(job.delta);
  __builtin_free(job.norm);
  return job.c.scratch_failed;
}

template <ProductMode kBF16Mode>
static int64_t BackwardImpl(const AttentionProblem& p, const FlashBackwardArgs& args,
                            const Parallel& parallel) {
  return RunBackward(p, nullptr, kBF16Mode, args, parallel);
}
