// Attention of many query tokens against a KV cache (chunked prefill, prefix caching): the
// decode semantics (attention.h, DecodeAttentionProblem) run by the flash forward kernels,
// which read the cache's rows through its layout (KvCacheLayout, cache_rows_impl.h). Query t
// of sequence b sits at position kv_lengths[b] - T_b + t: flash attention with those query
// positions, causal by position, the key lengths and the window.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "attention.h"

namespace jaxattn {
namespace {

int64_t Clamp(int64_t x, int64_t lo, int64_t hi) { return std::min(hi, std::max(lo, x)); }

// malloc'ed int32 buffers freed on return.
struct Int32Buffers {
  int32_t* data[2] = {nullptr, nullptr};
  ~Int32Buffers() {
    for (int32_t* d : data) std::free(d);
  }
};

// The flash problem of decode problem d over a cache layout (filled in here too) whose
// longest visible length is `longest`; the query positions (and a copy of the key positions
// in rows of `longest`) are the caller's to set.
void FlashProblemOf(const DecodeAttentionProblem& d, int64_t longest, KvCacheLayout* layout,
                    AttentionProblem* p) {
  layout->block_tables = d.block_tables;
  layout->block_tables_batch = d.block_tables_batch;
  layout->max_pages = d.max_pages;
  layout->num_pages = d.num_pages;
  layout->page_size = d.page_size;
  layout->value_num_pages = d.value_num_pages;
  layout->quant = d.cache_quant;
  layout->key_scale = d.key_scale;
  layout->value_scale = d.value_scale;

  p->dtype = d.dtype;
  p->batch = d.batch;
  p->q_len = d.q_len;
  // Keys past the longest length are never visible: the flash grid stops there.
  p->kv_len = longest;
  p->num_heads = d.num_heads;
  p->num_kv_heads = d.num_kv_heads;
  p->head_dim = d.head_dim;
  p->value_dim = d.value_dim;
  p->q_batch = d.q_batch;
  p->kv_batch = p->value_batch = d.batch;  // batch element b reads the layout at index b
  p->query = d.query;
  p->key = d.key;
  p->value = d.value;
  p->kv_cache = layout;
  p->kv_lengths = d.kv_lengths;
  p->kv_lengths_batch = d.kv_lengths_batch;
  p->q_lengths = d.q_lengths;
  p->q_lengths_batch = d.q_lengths_batch;
  p->scale = d.scale;
  p->soft_cap = d.soft_cap;
  p->causal = true;
  p->window_left = d.window_left;
  p->alibi_slopes = d.alibi_slopes;
  p->alibi_batch = d.alibi_batch;
  // Query positions: the caller's, or one row per batch element made by the caller.
  p->q_positions = d.q_positions;
  p->q_positions_batch = d.q_positions != nullptr ? d.q_positions_batch : d.batch;
  p->kv_positions = d.kv_positions;
  p->kv_positions_batch = d.kv_positions_batch;
}

}  // namespace

const char* ValidateCacheAttention(const DecodeAttentionProblem& d) {
  KvCacheLayout layout;
  AttentionProblem p;
  // Any positive length: the checks concern the shapes and options, not the lengths.
  FlashProblemOf(d, 1, &layout, &p);
  static const int32_t kSomePositions[1] = {0};  // checked for presence and batch only
  if (p.q_positions == nullptr) p.q_positions = kSomePositions;
  return ValidateProblem(p);
}

int64_t CacheAttentionForward(const DecodeAttentionProblem& d, const DecodeResult& res,
                              const Parallel& parallel) {
  if (ValidateCacheAttention(d) != nullptr) return kInvalidProblem;
  const int64_t capacity = d.max_pages * d.page_size;
  auto length = [&](int64_t b) { return Clamp(d.kv_lengths[b % d.kv_lengths_batch], 0, capacity); };
  auto query_count = [&](int64_t b) {
    return d.q_lengths == nullptr ? d.q_len : Clamp(d.q_lengths[b % d.q_lengths_batch], 0, d.q_len);
  };
  int64_t longest = 0;
  for (int64_t b = 0; b < d.batch; ++b) longest = std::max(longest, length(b));
  if (longest == 0) {  // nothing visible anywhere
    const int64_t rows = d.batch * d.q_len * d.num_heads;
    std::memset(res.out, 0, rows * d.value_dim * (d.dtype == DType::kF32 ? 4 : 2));
    for (int64_t i = 0; i < rows; ++i) res.lse[i] = -__builtin_inff();
    return 0;
  }

  KvCacheLayout layout;
  AttentionProblem p;
  FlashProblemOf(d, longest, &layout, &p);
  Int32Buffers buffers;
  if (d.q_positions == nullptr) {
    const int64_t bytes = d.batch * d.q_len * static_cast<int64_t>(sizeof(int32_t));
    int32_t* pos = buffers.data[0] = static_cast<int32_t*>(std::malloc(bytes));
    if (pos == nullptr) return bytes;
    for (int64_t b = 0; b < d.batch; ++b) {
      const int64_t first = length(b) - query_count(b);
      for (int64_t t = 0; t < d.q_len; ++t) {
        pos[b * d.q_len + t] = static_cast<int32_t>(Clamp(first + t, -(1 << 30), 1 << 30));
      }
    }
    p.q_positions = pos;
  }
  // Key positions (default: the indices): the flash kernels read them with the row length
  // kv_len (the longest length), the cache's are rows of its capacity.
  if (d.kv_positions != nullptr) {
    const int64_t rows = d.kv_positions_batch;
    const int64_t bytes = rows * longest * static_cast<int64_t>(sizeof(int32_t));
    int32_t* kv_pos = buffers.data[1] = static_cast<int32_t*>(std::malloc(bytes));
    if (kv_pos == nullptr) return bytes;
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(kv_pos + r * longest, d.kv_positions + r * capacity, longest * sizeof(int32_t));
    }
    p.kv_positions = kv_pos;
  }
  return FlashForward(p, FlashForwardResult{res.out, res.lse}, parallel);
}

}  // namespace jaxattn
