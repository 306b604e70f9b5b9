// Public interface of the attention kernels: plain C++ on raw pointers, no XLA, no Python.
//
// Layouts follow jax.nn.dot_product_attention: query [B,T,N,H], key [B,S,K,H], value
// [B,S,K,Hv], output [B,T,N,Hv], lse [B,T,N] (float32). Query head n uses kv head
// n / (N / K). Every operand with a batch dimension is read at batch index b % its batch size,
// so an operand of batch 1 (or of the inner batch of a vmapped call) broadcasts without a copy.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel.h"

namespace jaxattn {

// kF64: the float64 kernels of attention_f64.h only (the entry points below take the others).
enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

// Element type of a quantized KV cache (decoding only); kNone: the cache has the query's dtype.
// int8 holds round(x / scale) with a float32 scale per (token, kv head); the float8 formats
// hold x / scale (scale 1 when absent).
enum class CacheQuant : int32_t { kNone = 0, kInt8 = 1, kF8E4M3 = 2, kF8E5M2 = 3 };

// An optional operand broadcastable to [B, N, T, S]: each dim is 1 or full.
struct Broadcast4 {
  const void* data = nullptr;  // nullptr: absent
  int64_t dims[4] = {1, 1, 1, 1};
  DType dtype = DType::kF32;  // the bias's own element type (a mask is bytes)
};

// Where the keys and values of a flash problem live when they are a decode cache (attention
// of many query tokens against a paged or quantized cache, CacheAttentionForward): key s of
// sequence b is global row page * page_size + s % page_size with page block_tables[b % bt
// batch][s / page_size], or without a block table row (b % num_pages) * page_size + s (values:
// b % value_num_pages when nonzero). The rows of key/value are [rows, K, H|Hv] elements of
// `quant` (kNone: the problem's dtype); a quantized row stands for its elements times
// scale[row * K + kv head] (nullptr: 1), dequantised a tile at a time (cache_rows_impl.h).
struct KvCacheLayout {
  const int32_t* block_tables = nullptr;  // nullptr: contiguous
  int64_t block_tables_batch = 1, max_pages = 1;
  int64_t num_pages = 1, page_size = 1, value_num_pages = 0;
  CacheQuant quant = CacheQuant::kNone;
  const float* key_scale = nullptr;
  const float* value_scale = nullptr;
};

struct AttentionProblem {
  DType dtype = DType::kF32;
  int64_t batch = 0;  // B of the outputs; every operand batch divides it
  int64_t q_len = 0, kv_len = 0, num_heads = 0, num_kv_heads = 0;
  int64_t head_dim = 0, value_dim = 0;
  int64_t q_batch = 0, kv_batch = 0, value_batch = 0;  // kv_batch: the key's
  const void* query = nullptr;
  const void* key = nullptr;
  const void* value = nullptr;
  Broadcast4 bias;  // any float dtype, added to the float32 logits at float32 precision
  Broadcast4 mask;  // bool bytes, nonzero = attend
  const int32_t* q_lengths = nullptr;  // [q_lengths_batch]; nullptr: all rows
  int64_t q_lengths_batch = 1;
  const int32_t* kv_lengths = nullptr;  // [kv_lengths_batch]; nullptr: all keys
  int64_t kv_lengths_batch = 1;
  float scale = 1.0f;
  float soft_cap = 0.0f;  // 0: off
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1 (any negative): unbounded; <= 2^62
  // Token positions (int32, clamped to [-2^30, 2^30]): when either is given the causal mask
  // and the window compare kv_positions[s] with q_positions[t] (an absent side is its index);
  // the lengths still count indices. [positions_batch, T] and [positions_batch, S], read at
  // row b % batch; nullptr: absent.
  const int32_t* q_positions = nullptr;
  int64_t q_positions_batch = 1;
  const int32_t* kv_positions = nullptr;
  int64_t kv_positions_batch = 1;
  // Packed sequences: query t sees key s only where q_segments[t] == kv_segments[s]. Both or
  // neither; [segments_batch, T] and [segments_batch, S].
  const int32_t* q_segments = nullptr;
  int64_t q_segments_batch = 1;
  const int32_t* kv_segments = nullptr;
  int64_t kv_segments_batch = 1;
  // ALiBi: logits of head n get -alibi_slopes[b % alibi_batch][n] * |position_t - position_s|
  // (the positions above, or indices), after the bias and before the soft cap. [alibi_batch,
  // N] float32; nullptr: off.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch = 1;
  // Dropout on the attention weights (cc/dropout.h): seeds [dropout_batch, N, 2] read at
  // b % dropout_batch; a weight is kept where its hash >= dropout_threshold and scaled by
  // 1 / (1 - threshold / 2^32). nullptr: off. FlashJvp does not take it.
  const uint32_t* dropout_seeds = nullptr;
  int64_t dropout_batch = 1;
  uint32_t dropout_threshold = 0;
  // Forward only: keys and values read from a decode cache (nullptr: key [kv_batch, S, K, H]
  // and value [value_batch, S, K, Hv] in the problem's dtype). The kernels then read batch
  // element b's keys at index b % kv_batch of the layout.
  const KvCacheLayout* kv_cache = nullptr;
};

struct FlashForwardResult {
  void* out = nullptr;   // [B,T,N,Hv], dtype
  float* lse = nullptr;  // [B,T,N]
};

struct FlashBackwardArgs {
  const void* out = nullptr;    // [B,T,N,Hv], dtype
  const float* lse = nullptr;   // [B,T,N]
  const void* dout = nullptr;   // [B,T,N,Hv], dtype
  const float* dlse = nullptr;  // [B,T,N] or nullptr (cotangent of the lse)
  void* dq = nullptr;           // [B,T,N,H] or nullptr
  void* dk = nullptr;           // [B,S,K,H] or nullptr
  void* dv = nullptr;           // [B,S,K,Hv] or nullptr
  float* dlogits = nullptr;     // [B,N,T,S] or nullptr: d loss / d (logits after bias)
};

// Tangents for the forward-mode derivative (FlashJvp): dq like the query, dk like the key,
// dv like the value, each read at batch index b % its own batch (a vmapped tangent may have a
// batch of its own), and an optional bias tangent broadcastable like the bias.
struct FlashTangents {
  const void* dq = nullptr;  // [dq_batch, T, N, H], dtype
  const void* dk = nullptr;  // [dk_batch, S, K, H]
  const void* dv = nullptr;  // [dv_batch, S, K, Hv]
  int64_t dq_batch = 1, dk_batch = 1, dv_batch = 1;
  Broadcast4 dbias;  // data nullptr: no bias tangent
};

struct FlashJvpResult {
  void* dout = nullptr;   // [B,T,N,Hv], dtype: the output's tangent
  float* dlse = nullptr;  // [B,T,N]: the lse's tangent
};

// Block-sparse attention: which tiles of the kernels' tiling (BlockSparseTilingFor) to visit,
// compiled on the host once per mask. A table group is shared by all heads (groups == 1) or
// by the query heads of one kv head (groups == K). Query tile i covers positions
// [i * positions, (i + 1) * positions), its rows are (position, head of the group) pairs
// (row r = (t - t0) * G + g); key tile j covers keys [j * keys, (j + 1) * keys).
struct BlockSparseTables {
  int64_t groups = 1;
  int64_t num_q_tiles = 0, num_k_tiles = 0;
  // Forward order, per (group, query tile): entries q_indptr[g * num_q_tiles + i] ..
  // q_indptr[... + 1] - 1 of q_entries, each (key tile, mask id), key tiles increasing.
  const int32_t* q_indptr = nullptr;
  const int32_t* q_entries = nullptr;
  int64_t q_nnz = 0;
  // Transposed order, per (group, key tile): (query tile, mask id), for the dK/dV pass.
  // nullptr in the forward.
  const int32_t* k_indptr = nullptr;
  const int32_t* k_entries = nullptr;
  int64_t k_nnz = 0;
  // Deduplicated element masks of partial tiles, [num_masks, rows, keys] bytes, nonzero =
  // attend (row-major in the tile's rows as above). Mask id -1: a full tile, no mask work.
  const uint8_t* masks = nullptr;
  int64_t num_masks = 0;
  // The same masks transposed, [num_masks, keys, rows_padded] (zero padding), for the
  // key-major dK/dV pass. nullptr in the forward.
  const uint8_t* masks_t = nullptr;
};

// The kernels' tile shape for a GQA group of size G: query positions per tile, rows per tile
// (positions * G), keys per tile, and rows rounded up to whole vectors (the row length of
// the transposed masks).
struct BlockSparseTiling {
  int64_t positions = 0, rows = 0, keys = 0, rows_padded = 0;
};

// Checks the problem for what the kernels rely on; returns nullptr or a message.
const char* ValidateProblem(const AttentionProblem& problem);

// Decoding: the newest T query tokens against a KV cache, causal among themselves: query t of
// sequence b sits at absolute position kv_lengths[b] - T_b + t and sees keys j <= that
// position (and j >= position - window_left when window_left >= 0), where T_b is T or the
// sequence's query length (q_lengths; rows t >= T_b output 0 and lse -inf). Up to
// kDecodeMaxTokens tokens run the split-KV decode kernel; more run the flash forward over the
// cache (CacheAttentionForward: chunked prefill, prefix caching), with the same semantics.
//
// The cache is a pool of pages [num_pages, page_size, K, H] (values [.., Hv]); sequence b's
// key j lives in page block_tables[b % block_tables_batch][j / page_size] at row
// j % page_size. A contiguous cache [Bk, Smax, K, H] is the same pool with page_size = Smax,
// num_pages = Bk and no block table (sequence b reads page b % Bk).
//
// Out-of-range inputs never read out of bounds: kv_lengths are clamped to
// [0, max_pages * page_size]; page ids are checked by ValidateDecodePages (the FFI handler
// returns its message as an error), and the kernel clamps them again as a last defence.
struct DecodeAttentionProblem {
  DType dtype = DType::kF32;
  int64_t batch = 0;  // B of the outputs
  int64_t q_len = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, value_dim = 0;
  int64_t q_batch = 0;          // divides batch
  const void* query = nullptr;  // [q_batch, T, N, H]
  const void* key = nullptr;    // [num_pages, page_size, K, H]
  const void* value = nullptr;  // [num_pages, page_size, K, Hv]
  int64_t num_pages = 0, page_size = 0;
  // Contiguous caches only: the value cache's batch when it differs from the key cache's
  // (sequence b reads value page b % value_num_pages); 0: the same as num_pages.
  int64_t value_num_pages = 0;
  const int32_t* block_tables = nullptr;  // [block_tables_batch, max_pages]; nullptr: contiguous
  int64_t block_tables_batch = 1, max_pages = 1;
  const int32_t* kv_lengths = nullptr;  // [kv_lengths_batch]
  int64_t kv_lengths_batch = 1;
  float scale = 1.0f;
  float soft_cap = 0.0f;     // 0: off
  int64_t window_left = -1;  // -1: unbounded
  // A quantized cache: key/value hold cache_quant elements, dequantised in registers as
  // element * scale[row * K + kv head] with row the global row (page * page_size + offset),
  // i.e. scales [num_pages, page_size, K]; nullptr: scale 1.
  CacheQuant cache_quant = CacheQuant::kNone;
  const float* key_scale = nullptr;
  const float* value_scale = nullptr;
  // Token positions (int32, clamped to [-2^30, 2^30]): query t of sequence b at
  // q_positions[b % batch][t] (default kv_lengths[b] - T + t), cache entry j at
  // kv_positions[b % batch][j] (default j; [batch, max_pages * page_size], by logical index).
  // Entry j is visible to query t when j < kv_lengths[b], its position <= the query's and
  // (window) >= the query's - window_left. nullptr: the default.
  const int32_t* q_positions = nullptr;
  int64_t q_positions_batch = 1;
  const int32_t* kv_positions = nullptr;
  int64_t kv_positions_batch = 1;
  // ALiBi: -alibi_slopes[b % alibi_batch][n] * |query position - key position| is added to
  // the logits of head n before the soft cap. [alibi_batch, N] float32; nullptr: off.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch = 1;
  // Ragged queries: sequence b has q_lengths[b % q_lengths_batch] (clamped to [0, T]) new
  // tokens in query rows 0..; nullptr: T each.
  const int32_t* q_lengths = nullptr;
  int64_t q_lengths_batch = 1;
};

// Query tokens up to which decoding runs the split-KV kernel (beyond: the flash tiles).
constexpr int64_t kDecodeMaxTokens = 16;

struct DecodeResult {
  void* out = nullptr;   // [B,T,N,Hv], dtype
  float* lse = nullptr;  // [B,T,N]
};

// Shapes and options of a decode problem; nullptr or a message. Covers both kernels that
// run it (for T > kDecodeMaxTokens also what the flash forward requires of the problem
// CacheAttentionForward builds, ValidateCacheAttention).
const char* ValidateDecodeProblem(const DecodeAttentionProblem& problem);
// Every page holding a key below the (clamped) length must be a valid page id.
const char* ValidateDecodePages(const DecodeAttentionProblem& problem);
// The number of keys per KV partition the kernel uses for this problem: a function of the
// shape and the longest (clamped) length, never of the thread count (results are bitwise
// identical for any thread count) nor of the table's or cache's padding past the lengths.
// Exposed for tests and benchmarks.
int64_t DecodePartitionSize(const DecodeAttentionProblem& problem);
// Scratch is sized by what the lengths reach. Returns 0, or the size in bytes of an
// allocation that failed (the outputs are then incomplete), or kInvalidProblem for a
// problem ValidateDecodeProblem rejects (nothing is written; callers validate first and
// report its message).
int64_t DecodeForward(const DecodeAttentionProblem& problem, const DecodeResult& result,
                      const Parallel& parallel);
// The same problem through the flash forward kernels (tiles of query rows against tiles of
// cache keys gathered through the block table, dequantised a tile at a time): what
// DecodeForward runs for T > kDecodeMaxTokens; any T works. Returns as DecodeForward.
int64_t CacheAttentionForward(const DecodeAttentionProblem& problem, const DecodeResult& result,
                              const Parallel& parallel);
// What the flash forward requires of the problem CacheAttentionForward builds from a decode
// problem (finite scale and soft cap, ...): nullptr or a message. Part of
// ValidateDecodeProblem for T > kDecodeMaxTokens.
const char* ValidateCacheAttention(const DecodeAttentionProblem& problem);
// The return of the kernel entry points for a problem their validation rejects: never a
// byte count (those are positive).
constexpr int64_t kInvalidProblem = -1;

// The flash and block-sparse entry points return 0, or the size in bytes of a scratch
// allocation that failed (the outputs are then incomplete), as DecodeForward.
int64_t FlashForward(const AttentionProblem& problem, const FlashForwardResult& result,
                     const Parallel& parallel);
int64_t FlashBackward(const AttentionProblem& problem, const FlashBackwardArgs& args,
                      const Parallel& parallel);
// The forward-mode derivative of FlashForward at the problem's inputs, in the direction of
// the tangents, from the forward's out [B,T,N,Hv] and lse [B,T,N] (linear in the tangents;
// its transpose is FlashBackward).
int64_t FlashJvp(const AttentionProblem& problem, const FlashTangents& tangents, const void* out,
                 const float* lse, const FlashJvpResult& result, const Parallel& parallel);

BlockSparseTiling BlockSparseTilingFor(int64_t group);
// Checks the tables against the problem (sizes, ranges, order); nullptr or a message.
const char* ValidateBlockSparse(const AttentionProblem& problem, const BlockSparseTables& tables);
// Attention restricted to the tiles of the tables (the problem carries no other mask, bias or
// lengths): the dense flash kernels visiting only the listed tiles.
int64_t BlockSparseForward(const AttentionProblem& problem, const BlockSparseTables& tables,
                           const FlashForwardResult& result, const Parallel& parallel);
int64_t BlockSparseBackward(const AttentionProblem& problem, const BlockSparseTables& tables,
                            const FlashBackwardArgs& args, const Parallel& parallel);

// The kernel set the kernels dispatch to (one of the names KernelIsas() lists).
const char* KernelIsa();

// Every kernel set compiled in, in the order of kKernelSets in dispatch.cc, and whether this
// CPU can run it (JAXATTN_ISA can force only those).
struct KernelIsaInfo {
  const char* name;
  bool runs_on_this_cpu;
};
std::vector<KernelIsaInfo> KernelIsas();

}  // namespace jaxattn
