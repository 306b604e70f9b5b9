// Where the flash kernels read key and value rows from (see simd.h for how this file is
// included): a [batch, S, K, dim] tensor in the problem's dtype, or a decode cache
// (AttentionProblem::kv_cache: pages through a block table, contiguous, quantized). One
// function gathers a tile's rows for either, so that attention of many query tokens against
// a paged or quantized cache is the flash forward itself, not a second tiled kernel.
#pragma once
#include "simd.h"

// Global row of key (or value) s of batch element b in a decode cache.
static inline int64_t CacheRow(const KvCacheLayout& c, bool values, int64_t b, int64_t s) {
  if (c.block_tables == nullptr) {
    const int64_t pages = values && c.value_num_pages > 0 ? c.value_num_pages : c.num_pages;
    return (b % pages) * c.page_size + s;
  }
  const int64_t id = c.block_tables[(b % c.block_tables_batch) * c.max_pages + s / c.page_size];
  // Pages below the lengths were validated (ValidateDecodePages); a tile packed past a
  // shorter sequence's end may meet padding ids, clamped here and never used.
  const int64_t page = id < 0 ? 0 : id >= c.num_pages ? c.num_pages - 1 : id;
  return page * c.page_size + s % c.page_size;
}

// Float values of the 256 bytes of a float8 format (exact; NaN where the format has one).
struct Float8Table {
  float value[256];
};
static constexpr float Pow2(int e) {
  float x = 1.0f;
  for (; e > 0; --e) x *= 2.0f;
  for (; e < 0; ++e) x *= 0.5f;
  return x;
}
static constexpr Float8Table MakeFloat8Table(int mantissa_bits, int bias, bool ieee_specials) {
  Float8Table t{};
  const int exponents = 1 << (7 - mantissa_bits), mantissas = 1 << mantissa_bits;
  for (int byte = 0; byte < 256; ++byte) {
    const int e = (byte & 0x7f) >> mantissa_bits, m = byte & (mantissas - 1);
    float x = 0.0f;
    if (e == 0) {
      x = static_cast<float>(m) * Pow2(1 - bias - mantissa_bits);
    } else {
      x = (1.0f + static_cast<float>(m) / static_cast<float>(mantissas)) * Pow2(e - bias);
    }
    if (ieee_specials && e == exponents - 1) {  // e5m2: infinities and NaN
      x = m == 0 ? __builtin_inff() : __builtin_nanf("");
    } else if (!ieee_specials && e == exponents - 1 && m == mantissas - 1) {  // e4m3fn NaN
      x = __builtin_nanf("");
    }
    t.value[byte] = byte & 0x80 ? -x : x;
  }
  return t;
}
static constexpr Float8Table kF8E4M3Values = MakeFloat8Table(3, 7, false);
static constexpr Float8Table kF8E5M2Values = MakeFloat8Table(2, 15, true);

// dst[i] = scale * element i of a quantized row of n elements, in float32.
static inline void DequantizeRow(CacheQuant quant, const void* src, int64_t n, float scale,
                                 float* dst) {
  const uint8_t* bytes = static_cast<const uint8_t*>(src);
  switch (quant) {
    case CacheQuant::kInt8: {
      const int8_t* x = static_cast<const int8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(x[i]) * scale;
      break;
    }
    case CacheQuant::kF8E4M3:
      for (int64_t i = 0; i < n; ++i) dst[i] = kF8E4M3Values.value[bytes[i]] * scale;
      break;
    case CacheQuant::kF8E5M2:
      for (int64_t i = 0; i < n; ++i) dst[i] = kF8E5M2Values.value[bytes[i]] * scale;
      break;
    case CacheQuant::kNone: break;
  }
}

// Floats of scratch KvTileRows needs for a tile of n rows of dim elements.
static inline int64_t KvTileScratch(const AttentionProblem& p, int64_t n, int64_t dim) {
  return p.kv_cache != nullptr && p.kv_cache->quant != CacheQuant::kNone ? (n + 1) * dim : 0;
}

// Element offsets of keys (or values) s0..s0 + n of kv head kv_head of batch element
// batch_index into offsets[0..n), and the base they are offsets from: the problem's key (value)
// tensor, or for a quantized cache `buffer` (KvTileScratch floats), which then holds the rows
// dequantised to the problem's dtype.
static const void* KvTileRows(const AttentionProblem& p, bool values, int64_t batch_index,
                              int64_t s0, int64_t n, int64_t kv_head, int64_t* offsets,
                              float* buffer) {
  const int64_t dim = values ? p.value_dim : p.head_dim, heads = p.num_kv_heads;
  const void* base = values ? p.value : p.key;
  if (p.kv_cache == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      offsets[j] = ((batch_index * p.kv_len + s0 + j) * heads + kv_head) * dim;
    }
    return base;
  }
  const KvCacheLayout& c = *p.kv_cache;
  if (c.quant == CacheQuant::kNone) {
    for (int64_t j = 0; j < n; ++j) {
      offsets[j] = (CacheRow(c, values, batch_index, s0 + j) * heads + kv_head) * dim;
    }
    return base;
  }
  const float* scales = values ? c.value_scale : c.key_scale;
  float* row = buffer + n * dim;  // one dequantised row in float32
  for (int64_t j = 0; j < n; ++j) {
    const int64_t index = CacheRow(c, values, batch_index, s0 + j) * heads + kv_head;
    float* dst = p.dtype == DType::kF32 ? buffer + j * dim : row;
    DequantizeRow(c.quant, static_cast<const int8_t*>(base) + index * dim, dim,
                  scales != nullptr ? scales[index] : 1.0f, dst);
    if (p.dtype != DType::kF32) StoreRow(p.dtype, row, dim, 1.0f, Offset(buffer, p.dtype, j * dim));
    offsets[j] = j * dim;
  }
  return buffer;
}
