// Dropout on the attention weights, for one instruction set (see simd.h for how this file
// is included): the keep mask of dropout_hash.h applied to rows and tiles of probabilities.
//
// The forward zeroes the dropped probabilities after the online-softmax step (the normaliser
// sums the undropped ones) and folds the scale into the final division. With O = (P o Z') V
// and Z' = keep / (1 - rate), the backward needs dP o Z' (dP = dO V^T) in dS = P o (dP o Z' - D),
// D = rowsum(dO o O) unchanged, and (P o Z')^T dO for dV.
#pragma once
#include "dropout_hash.h"
#include "flash_tiles.h"

typedef uint32_t VU __attribute__((vector_size(kVL * 4)));

static inline VU DropoutMix(VU x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// All-ones lanes where the weight is kept.
static inline VI DropoutKeep(VU k0, VU k1, VU s, uint32_t threshold) {
  const VU h = DropoutMix(DropoutMix(k0 ^ s) ^ k1);
  return (VI)(h >= (VU{} + threshold));
}

// Query-major line (one query row, keys s0 .. s0 + n, n a multiple of kVL): x[j] *= the kept
// weight's scale, or 0 where dropped. With scale 1 (the forward) only the dropped are zeroed.
static inline void DropoutRow(const AttentionProblem& p, int64_t b, int64_t n, int64_t t,
                              int64_t s0, float* x, int64_t count, float scale) {
  const DropoutRowKey key = DropoutRowKeyOf(p, b, n, t);
  const VU k0 = VU{} + key.k0, k1 = VU{} + key.k1;
  const VU lane = (VU)LaneIndices();
  for (int64_t j = 0; j < count; j += kVL) {
    const VI keep = DropoutKeep(k0, k1, lane + static_cast<uint32_t>(s0 + j), p.dropout_threshold);
    const VF v = Load(x + j) * scale;
    Store(x + j, (VF)((VI)v & keep));
  }
}

// The same for one query row of probabilities rounded to bf16 pairs (word i holds keys 2i in
// its low half and 2i + 1 in its high half), count_words words (a multiple of kVL / 2).
static inline void DropoutRowPairs(const AttentionProblem& p, int64_t b, int64_t n, int64_t t,
                                   int64_t s0, uint32_t* words, int64_t count_words) {
  const DropoutRowKey key = DropoutRowKeyOf(p, b, n, t);
  const VU k0 = VU{} + key.k0, k1 = VU{} + key.k1;
  const VU twice_lane = (VU)LaneIndices() * 2u;
  for (int64_t w = 0; w < count_words; w += kVL) {
    const VU even = twice_lane + static_cast<uint32_t>(s0 + 2 * w);
    const VI keep_lo = DropoutKeep(k0, k1, even, p.dropout_threshold);
    const VI keep_hi = DropoutKeep(k0, k1, even + 1u, p.dropout_threshold);
    const VU bits = ((VU)keep_lo & 0xFFFFu) | ((VU)keep_hi & 0xFFFF0000u);
    const int64_t valid = MinI(kVL, count_words - w);
    if (valid == kVL) {
      VU x;
      __builtin_memcpy(&x, words + w, sizeof(x));
      x &= bits;
      __builtin_memcpy(words + w, &x, sizeof(x));
    } else {
      for (int64_t l = 0; l < valid; ++l) words[w + l] &= bits[l];
    }
  }
}

// Key-major tile (row keys of the tile's query rows precomputed by DropoutRowKeys, rows a
// multiple of kVL): dst[i][j] = src[i][j] * scale where query row j keeps key s0 + i, else 0.
static inline void DropoutRowKeys(const AttentionProblem& p, int64_t b, const RowInfo* rows,
                                  int64_t num_rows, int64_t rows_padded, uint32_t* k0,
                                  uint32_t* k1) {
  for (int64_t j = 0; j < rows_padded; ++j) {
    const DropoutRowKey key =
        j < num_rows ? DropoutRowKeyOf(p, b, rows[j].n, rows[j].t) : DropoutRowKey{0u, 0u};
    k0[j] = key.k0;
    k1[j] = key.k1;
  }
}
static inline void DropoutKeyMajor(const AttentionProblem& p, const uint32_t* k0,
                                   const uint32_t* k1, int64_t s0, int64_t num_keys,
                                   int64_t rows_padded, const float* src, float* dst, float scale) {
  for (int64_t i = 0; i < num_keys; ++i) {
    const VU s = VU{} + static_cast<uint32_t>(s0 + i);
    for (int64_t j = 0; j < rows_padded; j += kVL) {
      VU a, c;
      __builtin_memcpy(&a, k0 + j, sizeof(a));
      __builtin_memcpy(&c, k1 + j, sizeof(c));
      const VI keep = DropoutKeep(a, c, s, p.dropout_threshold);
      const VF v = Load(src + i * rows_padded + j) * scale;
      Store(dst + i * rows_padded + j, (VF)((VI)v & keep));
    }
  }
}
