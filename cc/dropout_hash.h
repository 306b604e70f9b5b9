// The dropout keep mask's hash, for one instruction set (see simd.h for how this file is
// included). The hash itself (DropoutMix) serves scalar words and vectors of words; the rest
// is scalar and type-independent (no vector types): the vector forms are in dropout.h.
//
// The keep mask is a counter-based hash, so the backward regenerates exactly the mask of the
// forward, whatever the tiling or thread count: weight (b, n, t, s) is kept where
//   row0 = Mix(seed0 ^ Mix(t)),  row1 = Mix(seed1 ^ Mix(t + 0x9E3779B9)),
//   Mix(Mix(row0 ^ s) ^ row1) >= threshold,
// with (seed0, seed1) = dropout_seeds[b % dropout_batch][n] (derived from the JAX key, the
// batch and the head in Python: jaxattn/dropout.py, which computes the same mask with jnp),
// t the query index, s the key index and Mix the lowbias32 bijection of 32-bit words. Kept
// weights are scaled by 1 / (1 - threshold / 2^32).
#pragma once
#include "simd.h"

// The words DropoutMix hashes: uint32_t here, the vector of them in dropout.h. Any other type
// is refused at compile time: an int or int64_t argument would otherwise be hashed as a
// signed or wider word (other bits, and signed overflow) instead of converting to uint32_t.
template <typename Word>
struct DropoutWord {
  static constexpr bool kValid = false;
};
template <>
struct DropoutWord<uint32_t> {
  static constexpr bool kValid = true;
};

// lowbias32, on one word or on each lane of a vector of words.
template <typename Word>
static inline Word DropoutMix(Word x) {
  static_assert(DropoutWord<Word>::kValid, "DropoutMix hashes uint32_t words (cast first)");
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

static inline bool HasDropout(const AttentionProblem& p) { return p.dropout_seeds != nullptr; }

// 1 / keep probability (1 without dropout).
static inline float DropoutKeepScale(const AttentionProblem& p) {
  if (!HasDropout(p)) return 1.0f;
  return static_cast<float>(1.0 / (1.0 - static_cast<double>(p.dropout_threshold) * 0x1p-32));
}

// The two row keys of query t of head n, batch b.
struct DropoutRowKey {
  uint32_t k0, k1;
};
static inline DropoutRowKey DropoutRowKeyOf(const AttentionProblem& p, int64_t b, int64_t n,
                                            int64_t t) {
  const uint32_t* seed = p.dropout_seeds + ((b % p.dropout_batch) * p.num_heads + n) * 2;
  const uint32_t tt = static_cast<uint32_t>(t);
  return DropoutRowKey{DropoutMix(seed[0] ^ DropoutMix(tt)),
                       DropoutMix(seed[1] ^ DropoutMix(tt + 0x9E3779B9u))};
}

// Whether the weight of a query row (keys `key`) and key s is kept: the hash for one weight
// (DropoutKeep in dropout.h is the same a vector at a time).
static inline bool DropoutKept(DropoutRowKey key, int64_t s, uint32_t threshold) {
  return DropoutMix(DropoutMix(key.k0 ^ static_cast<uint32_t>(s)) ^ key.k1) >= threshold;
}
