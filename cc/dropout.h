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

// DropoutMix (dropout_hash.h) on kVL words at once.
template <>
struct DropoutWord<VU> {
  static constexpr bool kValid = true;
};

// All-ones lanes where the weight of row keys (k0, k1) and keys s is kept: DropoutKept a
// vector at a time (the unsigned compare is a min and an equality test).
static inline VI DropoutKeep(VU k0, VU k1, VU s, VU threshold) {
  const VU h = DropoutMix(DropoutMix(k0 ^ s) ^ k1);
  return (VI)(h >= threshold);
}

// The keep mask along one query row (keys s0 + j for j = 0, 1, ...), a vector at a time.
struct DropoutLine {
  VU k0, k1, keys, threshold;
  // Lanes of keys s0 + j .. s0 + j + kVL.
  VI Keep(int64_t j) const {
    return DropoutKeep(k0, k1, keys + static_cast<uint32_t>(j), threshold);
  }
};
static inline DropoutLine DropoutLineOf(const AttentionProblem& p, DropoutRowKey key, int64_t s0) {
  return DropoutLine{VU{} + key.k0, VU{} + key.k1, (VU)LaneIndices() + static_cast<uint32_t>(s0),
                     VU{} + p.dropout_threshold};
}

// (x * scale) where kept, else 0: one vector, the mask a bit operation (so that no multiply-
// add is formed across it: the result is bitwise that of a separate pass).
static inline VF DropoutApply(VF x, float scale, VI keep) { return (VF)((VI)(x * scale) & keep); }

// The row keys (DropoutRowKeyOf) of a tile's query rows, rows_padded of them (the padding
// rows' keys are 0): once per task or tile, not once per row and key tile.
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

// Query-major line (one query row, keys s0 .. s0 + count, count a multiple of kVL): the
// dropped weights x[j] zeroed (the forward's probabilities).
static inline void DropoutRow(const AttentionProblem& p, DropoutRowKey key, int64_t s0, float* x,
                              int64_t count) {
  const DropoutLine line = DropoutLineOf(p, key, s0);
  for (int64_t j = 0; j < count; j += kVL) {
    Store(x + j, (VF)((VI)Load(x + j) & line.Keep(j)));
  }
}

// The same for one query row of probabilities rounded to bf16 pairs (word i holds keys 2i in
// its low half and 2i + 1 in its high half), count_words words (a multiple of kVL / 2).
static inline void DropoutRowPairs(const AttentionProblem& p, DropoutRowKey key, int64_t s0,
                                   uint32_t* words, int64_t count_words) {
  const VU k0 = VU{} + key.k0, k1 = VU{} + key.k1, threshold = VU{} + p.dropout_threshold;
  const VU twice_lane = (VU)LaneIndices() * 2u;
  for (int64_t w = 0; w < count_words; w += kVL) {
    const VU even = twice_lane + static_cast<uint32_t>(s0 + 2 * w);
    const VI keep_lo = DropoutKeep(k0, k1, even, threshold);
    const VI keep_hi = DropoutKeep(k0, k1, even + 1u, threshold);
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

// Key-major tile (lines: keys s0 + i, i < num_keys; along a line the query rows whose keys
// DropoutRowKeys gave, rows_padded of them, a multiple of kVL): the mask of each weight is
// computed once for both of the key pass's uses, kept[i][j] = prob[i][j] * scale and
// dp[i][j] *= scale (in place) where row j keeps key s0 + i, both 0 where it drops it.
static inline void DropoutKeyMajor(const AttentionProblem& p, const uint32_t* k0,
                                   const uint32_t* k1, int64_t s0, int64_t num_keys,
                                   int64_t rows_padded, float scale, const float* prob, float* kept,
                                   float* dp) {
  const VU threshold = VU{} + p.dropout_threshold;
  for (int64_t i = 0; i < num_keys; ++i) {
    const VU s = VU{} + static_cast<uint32_t>(s0 + i);
    const int64_t at = i * rows_padded;
    for (int64_t j = 0; j < rows_padded; j += kVL) {
      VU a, c;
      __builtin_memcpy(&a, k0 + j, sizeof(a));
      __builtin_memcpy(&c, k1 + j, sizeof(c));
      const VI keep = DropoutKeep(a, c, s, threshold);
      Store(kept + at + j, DropoutApply(Load(prob + at + j), scale, keep));
      Store(dp + at + j, DropoutApply(Load(dp + at + j), scale, keep));
    }
  }
}
