// The softmax of attention, for one instruction set (see simd.h for how this file is
// included): the forward's online step over a row's tiles of logits (flash and decode), and
// the lse as the backward and tangent passes take it to recompute the probabilities.
#pragma once
#include "gemm.h"

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
    if (prescale != 1.0f) x = RoundedProduct(x, prescale);
    if (soft_cap > 0.0f) {  // as TransformLogits applies it (the backward recomputes that)
      VF th;
      x = SoftCap(x, inv_cap, soft_cap, &th);
    }
    if (tail) x = lane + static_cast<int32_t>(j) < static_cast<int32_t>(nk) ? x : Splat(-kInf);
    // Only capped logits and the tail are stored: the exp pass scales the rest itself (the
    // same product again, a store and a load fewer).
    if (soft_cap > 0.0f || tail) Store(sr + j, x);
    mv = x > mv ? x : mv;
  }
  // Vectors [0, scaled_end) still hold unscaled logits.
  const int64_t scaled_end = prescale != 1.0f && soft_cap <= 0.0f ? nk / kVL * kVL : 0;
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
    VF x = Load(sr + j);
    if (j < scaled_end) x = RoundedProduct(x, prescale);
    const VF e = Exp(x - mnv);
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

// The lse as P = exp(s - lse) takes it: -inf (a row that sees nothing) becomes +inf, so that
// P = 0.
static inline float FiniteOrInf(float lse) { return lse == -kInf ? kInf : lse; }
