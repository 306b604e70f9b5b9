// The per-call constants of a flash or block-sparse call and the scratch of its tasks, for
// one instruction set (see simd.h for how this file is included): tile sizes, how products
// multiply bf16 inputs, head dims padded to vectors, where K and V were packed once per call.
#pragma once
#include "gemm.h"
#include "scratch.h"
#include "visibility.h"

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
  // Flash attention by position: whether every batch element's key (query) positions never
  // decrease within its key (query) length, checked once per call. KeyTilesOf (QueryTilesOf)
  // then skips the hidden tiles by binary search instead of classifying every tile.
  bool keys_monotone = false, queries_monotone = false;
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
  if (p.dtype == DType::kBF16 && ((bf16_mode == ProductMode::kBF16Pairs && kHasBF16Pairs) ||
                                  (bf16_mode == ProductMode::kAmxTiles && kHasAmxTiles))) {
    c.mode = bf16_mode;
  }
  // A dense mask keeps the block-sparse tables' grid: block-sparse attention then stays
  // bitwise equal to flash attention with its mask materialised (sparse_impl.h). So do
  // positions and segment ids: their tile skipping (ClassifyTile) is finer there, and equals
  // the dense mask they stand for bitwise.
  const bool token_masks =
      p.q_positions != nullptr || p.kv_positions != nullptr || p.q_segments != nullptr;
  if (c.mode == ProductMode::kAmxTiles && sparse == nullptr && p.mask.data == nullptr &&
      !token_masks) {
    c.keys_per_tile = kAmxKeysPerTile;
  }
  if (sparse == nullptr && (p.q_positions != nullptr || p.kv_positions != nullptr)) {
    c.keys_monotone = c.queries_monotone = true;
    for (int64_t b = 0; b < p.batch; ++b) {
      const TokenInfo ti = TokenInfoOf(p, b);
      c.keys_monotone = c.keys_monotone && NonDecreasing(ti.kv_pos, KeyLength(p, b));
      c.queries_monotone = c.queries_monotone && NonDecreasing(ti.q_pos, QueryLength(p, b));
    }
  }
  return c;
}

// TransformLogits' line buffers, apart from the tasks' scratch (which they carve up).
static thread_local Scratch tls_line_scratch;
// Floats of TransformLogits' line buffers for lines of up to `length` elements.
static inline int64_t LineScratchFloats(int64_t length) { return 6 * RoundUp(length, kVL) + 96; }

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
  } else if (line_length > 0 && tls_line_scratch.Get(LineScratchFloats(line_length)) == nullptr) {
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
