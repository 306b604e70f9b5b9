// Vector helpers for one instruction set. Included by the isa_*.cc files inside
// namespace jaxattn::JAXATTN_ISA_NAMESPACE, with JAXATTN_VL (floats per vector) defined and
// the file compiled for that instruction set. GCC vector extensions produce AVX-512, AVX2
// or SSE code from the same source; no std:: templates here (see parallel.h).
#pragma once

constexpr int kVL = JAXATTN_VL;
typedef float VF __attribute__((vector_size(kVL * 4)));
typedef float VFu __attribute__((vector_size(kVL * 4), aligned(4), may_alias));
typedef int32_t VI __attribute__((vector_size(kVL * 4)));

static inline VF Load(const float* p) { return *reinterpret_cast<const VFu*>(p); }
static inline void Store(float* p, VF v) { *reinterpret_cast<VFu*>(p) = v; }
// x - 0 is x for every x (unlike 0 + x for x = -0), so this folds to a single broadcast.
static inline VF Splat(float x) { return x - VF{}; }

constexpr float kInf = __builtin_inff();

static inline float MaxF(float a, float b) { return a > b ? a : b; }
static inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t MaxI(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline int64_t CeilDiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 0, 1, ..., kVL - 1.
static inline VI LaneIndices() {
  VI lane;
#pragma GCC unroll 16
  for (int l = 0; l < kVL; ++l) lane[l] = l;
  return lane;
}

// Horizontal reductions by halving: log2(kVL) shuffles, not kVL - 1 dependent scalar steps.
template <int kWidth>
static inline VF UpperHalfDown(VF v) {
  VI idx;
#pragma GCC unroll 16
  for (int l = 0; l < kVL; ++l) idx[l] = (l + kWidth) % kVL;
  return __builtin_shuffle(v, idx);
}
static inline float HorizontalMax(VF v) {
  if constexpr (kVL >= 16) v = v > UpperHalfDown<8>(v) ? v : UpperHalfDown<8>(v);
  if constexpr (kVL >= 8) v = v > UpperHalfDown<4>(v) ? v : UpperHalfDown<4>(v);
  v = v > UpperHalfDown<2>(v) ? v : UpperHalfDown<2>(v);
  v = v > UpperHalfDown<1>(v) ? v : UpperHalfDown<1>(v);
  return v[0];
}
static inline float HorizontalSum(VF v) {
  if constexpr (kVL >= 16) v += UpperHalfDown<8>(v);
  if constexpr (kVL >= 8) v += UpperHalfDown<4>(v);
  v += UpperHalfDown<2>(v);
  v += UpperHalfDown<1>(v);
  return v[0];
}

// x * y rounded to float32, as if stored: the empty asm keeps the compiler from fusing the
// product into a following add (an fma rounds once), where a later pass must recompute the
// stored value bitwise.
static inline VF RoundedProduct(VF x, float y) {
  VF product = x * y;
  __asm__("" : "+v"(product));
  return product;
}

// Whether some lane of a comparison result (lanes 0 or -1) is set: a mask test (vptestmd
// and kortest, or vmovmskps), not a reduction through shuffles.
static inline bool AnyLane(VI m) {
#if JAXATTN_VL == 16
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif JAXATTN_VL == 8
  return _mm256_movemask_ps((__m256)m) != 0;
#else
  return _mm_movemask_ps((__m128)m) != 0;
#endif
}

// exp(x) with ~2 ulp error; exactly 0 for x below -87.3 (and for -inf), as masked logits need.
static inline VF Exp(VF x) {
#if JAXATTN_VL == 16
  // AVX-512: vscalefps multiplies by 2^n and its zero-mask drops the tiny lanes, in place of
  // building 2^n from bits and two blends (a third fewer instructions in the softmax's inner
  // loop). The same rounding steps, so the same bits as the form below for every x < 88.37;
  // above it exp overflows to inf here only where it truly does (x > 88.72).
  const __mmask16 keep =  // x >= -87.3, or NaN (which then passes through)
      _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-87.3365447504f), _CMP_NLT_UQ);
  const VF hi = Splat(89.0f);
  x = hi < x ? hi : x;  // vminps(hi, x): NaN stays
#else
  // Clamps written so that NaN passes through unchanged.
  const VF hi = Splat(88.3762626647949f);
  x = x > hi ? hi : x;
  const VF underflow = Splat(-87.3365447504f);
  const VI is_tiny = x < underflow;
  x = is_tiny ? underflow : x;
#endif
  // n = round(x / ln2) through the float magic-number trick (exact for |n| < 2^22).
  const VF magic = Splat(12582912.0f);
  const VF n = (x * 1.44269504088896341f + magic) - magic;
  VF r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  VF p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = p * r * r + r + 1.0f;
#if JAXATTN_VL == 16
  return (VF)_mm512_maskz_scalef_ps(keep, (__m512)y, (__m512)n);
#else
  const VI exponent = (__builtin_convertvector(n, VI) + 127) << 23;
  return is_tiny ? VF{} : y * (VF)exponent;  // same-size vector cast: a bit cast
#endif
}

// tanh to 1.15 ulp (max over a scan of every 61st float32): below |x| = 0.85 the odd
// polynomial x + x^3 Q(x^2) (Q a near-minimax fit), above it 1 - 2 / (exp(2|x|) + 1).
// +-inf give +-1, NaN stays NaN.
static inline VF Tanh(VF x) {
  // |x| and the sign put back by bit operations (one instruction each, not compare and
  // blend); -0 and NaN keep their sign bit either way.
  const VI sign = (VI)x & (VI{} + INT32_MIN);
  const VF ax = (VF)((VI)x ^ sign);
  const VF z = ax * ax;
  VF q = Splat(1.622019036e-03f);
  q = q * z + -7.517373409e-03f;
  q = q * z + 2.140535979e-02f;
  q = q * z + -5.389299808e-02f;
  q = q * z + 1.333287707e-01f;
  q = q * z + -3.333332878e-01f;
  VF y = ax + ax * z * q;
  // Capped logits are mostly small: skip the exp and the division when every lane is (a NaN
  // lane counts as large).
  const VI small = ax < 0.85f;
  if (AnyLane(small == 0)) {
    const VF large = 1.0f - 2.0f / (Exp(ax + ax) + 1.0f);
    y = small != 0 ? y : large;
  }
  return (VF)((VI)y ^ sign);
}

// The soft cap of one vector of logits, cap * tanh(v / cap); *th receives the tanh. One
// function for every layout, so that the backward recomputes the forward's logits bitwise.
static inline VF SoftCap(VF v, float inv_cap, float cap, VF* th) {
  *th = Tanh(v * inv_cap);
  return *th * cap;
}

// Transposes a kVL x kVL block of 32-bit elements held as floats (rows r[0..kVL)) in
// log2(kVL) rounds; round kHalf swaps the off-diagonal kHalf x kHalf blocks of every
// 2kHalf x 2kHalf block with two-source lane shuffles (constant masks: vpermt2ps/vshufps).
template <int kHalf>
static inline void ExchangeHalves(VF* r) {
  VI lo, hi;
#pragma GCC unroll 16
  for (int l = 0; l < kVL; ++l) {
    lo[l] = (l & kHalf) ? l - kHalf + kVL : l;
    hi[l] = (l & kHalf) ? l + kVL : l + kHalf;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kVL; ++i) {
    if (i & kHalf) continue;
    const VF a = r[i], b = r[i + kHalf];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + kHalf] = __builtin_shuffle(a, b, hi);
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i, j < kVL.
static inline void TransposeBlock(const float* src, int64_t lds, float* dst, int64_t ldd) {
  VF r[kVL];
#pragma GCC unroll 16
  for (int i = 0; i < kVL; ++i) r[i] = Load(src + i * lds);
  if constexpr (kVL >= 16) ExchangeHalves<8>(r);
  if constexpr (kVL >= 8) ExchangeHalves<4>(r);
  ExchangeHalves<2>(r);
  ExchangeHalves<1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < kVL; ++i) Store(dst + i * ldd, r[i]);
}

static inline float BF16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
static inline uint16_t FloatToBF16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

// dst[i] = mult * src[i] for n elements of the given dtype, in float32.
static inline void LoadRow(DType dtype, const void* src, int64_t n, float mult, float* dst) {
  switch (dtype) {
    case DType::kF32: {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mult;
      break;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(s[i]) * mult;
      break;
    }
    case DType::kF16: {
      const _Float16* s = static_cast<const _Float16*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]) * mult;
      break;
    }
    case DType::kF64: break;  // float64 runs the kernels of attention_f64.h, never these
  }
}

// dst[i] = mult * src[i] in the given dtype, for n elements.
static inline void StoreRow(DType dtype, const float* src, int64_t n, float mult, void* dst) {
  switch (dtype) {
    case DType::kF32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mult;
      break;
    }
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = FloatToBF16(src[i] * mult);
      break;
    }
    case DType::kF16: {
      _Float16* d = static_cast<_Float16*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i] * mult);
      break;
    }
    case DType::kF64: break;  // float64 runs the kernels of attention_f64.h, never these
  }
}

static inline float LoadOne(DType dtype, const void* base, int64_t index) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(base)[index];
    case DType::kBF16: return BF16ToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kF16: return static_cast<float>(static_cast<const _Float16*>(base)[index]);
    case DType::kF64: return static_cast<float>(static_cast<const double*>(base)[index]);
  }
  return 0.0f;
}

static inline int64_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

static inline const void* Offset(const void* base, DType dtype, int64_t elements) {
  return static_cast<const char*>(base) + elements * DTypeSize(dtype);
}
static inline void* Offset(void* base, DType dtype, int64_t elements) {
  return static_cast<char*>(base) + elements * DTypeSize(dtype);
}
