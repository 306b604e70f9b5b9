// Split-KV decoding for one instruction set (see simd.h for how this file is included).
//
// The T query tokens times the G query heads of one kv head form the rows of a tile, so every
// K/V element is loaded once per group. The KV sequence is cut into fixed-size partitions whose
// size depends on the shape and the longest length only (PartitionSize), and each sequence
// has the partitions its length reaches (scratch follows the lengths, never the capacity of a
// padded block table). Phase 1 computes, in parallel over the partitions x kv-head groups, an
// unnormalised (o, max, sum) per (batch, kv head, partition) with an online softmax over
// blocks of kDecodeBlock keys; phase 2 merges the partitions of each (batch, kv head) in
// partition order. No result depends on which thread computed it, so the output is bitwise
// identical for any thread count.
//
// The step is bound by memory bandwidth, and on the machines measured the bandwidth a core
// gets depends on reading memory in order: a task therefore covers every kv head of its keys
// when there are enough tasks (the heads of one cache row are adjacent), reads K key by key
// and head by head (one sequential stream), and prefetches the V rows in that same order for
// the value pass. K and V rows are read in place, each once; bf16/f16 are widened in
// registers (bf16 scores use AVX512-BF16 dot products where the kernels are built for it).
// float8 caches are converted in registers too; int8 caches are never converted to float:
// their scores and value sums are int16 x int16 dot products (vpmaddwd) against the query
// and the probabilities rounded to int16 ("int8 caches" below), since the float conversion
// and FMAs bounded them well below the read bandwidth. Per-row scales multiply the row's
// score (K) and probability (V), never a dequantised copy of the cache.
// Scores use a dot-product form (one key row against the rows of a tile, lane partial sums
// reduced by a transposing shuffle tree) because with few rows a broadcast form would waste
// most of each vector.
#pragma once
#include "online_softmax.h"
#include "scratch.h"

constexpr int64_t kDecodeBlock = 32;  // keys per online-softmax step
// int8 caches: keys per step (a multiple of kDecodeBlock: partitions are cut in those). The
// per-block work of each row (its max and sum, the output's rescaling, the int16 rounding
// of its probabilities and the int32 value sums' conversion) is a larger share of their
// cheaper keys: measured 64 keys faster than 32.
constexpr int64_t kI8Block = 64;
static_assert(kI8Block % kDecodeBlock == 0, "partitions hold whole blocks");
constexpr int64_t kDecodeMinPartition = 256;  // never split finer than this many keys
constexpr int64_t kDecodeTargetTasks = 512;   // enough (batch, head, partition) work items
constexpr int64_t kDecodeMinTasks = 32;       // tasks wanted before heads are split up
constexpr int64_t kDecodeQueryBytes = 16384;  // query rows of a task's heads kept in L1
constexpr int64_t kKeyPrefetch = 2;           // keys ahead that K rows are prefetched
constexpr int kQkKeys = 4;                    // keys per score micro-tile
// int8 caches: keys ahead that K rows are prefetched, into L2 (prefetcht1, as their V rows):
// one core streaming B=1 S=32768 N=32 K=8 H=128 from DRAM (AMD EPYC, AVX-512) took 48 ns
// per key and kv head with K 4 keys ahead and K and V into L1, 33-36 ns like this (the
// 8.5 GB/s of a one-core read): a block's 64 keys of V rows are more than L1 holds, and L1
// prefetches tie up its few miss buffers.
constexpr int64_t kI8KeyPrefetch = 16;
constexpr int kI8PrefetchLocality = 2;  // __builtin_prefetch's: prefetcht1
// K rows located ahead of a block, for the prefetches.
constexpr int64_t kKeysAhead = kKeyPrefetch > kI8KeyPrefetch ? kKeyPrefetch : kI8KeyPrefetch;
constexpr int kPair = 2 * kVL;  // elements per paired load (two vectors)
constexpr int kLog2VL = kVL == 16 ? 4 : kVL == 8 ? 3 : 2;
#if JAXATTN_VL >= 16
constexpr int kQkRows = 4, kPvRows = 4, kPvPairs = 2;
#elif JAXATTN_VL == 8
constexpr int kQkRows = 2, kPvRows = 2, kPvPairs = 2;
#else
constexpr int kQkRows = 1, kPvRows = 2, kPvPairs = 1;
#endif
static_assert(kQkRows * kQkKeys == kVL, "a score micro-tile reduces to one vector");
static_assert((1 << kLog2VL) == kVL, "vector width");

// ---------------------------------------------------------------------- element loaders

typedef _Float16 VHFu __attribute__((vector_size(kVL * 2), aligned(2), may_alias));
typedef int32_t VIu __attribute__((vector_size(kVL * 4), aligned(4), may_alias));

// Load2(row, h, &a, &b): the kPair elements of a row from element h as two f32 vectors. For
// bf16 a holds the even and b the odd elements (a shift and a mask of one wide load); such a
// dtype sets kInterleaved and the query / output rows use the same lane order, so a dot
// product or an accumulation is unaffected (see PairLane).
struct F32Elems {
  static constexpr bool kQuantized = false;
  static constexpr bool kIntegerDot = false;
  static constexpr float kFactor = 1.0f;
  typedef float T;
  static constexpr bool kInterleaved = false;
  static constexpr bool kNativeDot = false;
  static inline void Load2(const char* row, int64_t h, VF* a, VF* b) {
    const float* f = reinterpret_cast<const float*>(row) + h;
    *a = Load(f);
    *b = Load(f + kVL);
  }
};
struct BF16Elems {
  static constexpr bool kQuantized = false;
  static constexpr bool kIntegerDot = false;
  static constexpr float kFactor = 1.0f;
  typedef uint16_t T;
  static constexpr bool kInterleaved = true;
  // Scores by AVX512-BF16 dot products (vdpbf16ps: exact products, f32 accumulation) against
  // the unscaled bf16 query; the avx512 kernels are only chosen on CPUs that have it.
  static constexpr bool kNativeDot = JAXATTN_VL == 16;
  static inline void Load2(const char* row, int64_t h, VF* a, VF* b) {
    const VI x = *reinterpret_cast<const VIu*>(row + 2 * h);
    *a = (VF)(x << 16);
    *b = (VF)(x & static_cast<int32_t>(0xffff0000u));
  }
};
struct F16Elems {
  static constexpr bool kQuantized = false;
  static constexpr bool kIntegerDot = false;
  static constexpr float kFactor = 1.0f;
  typedef _Float16 T;
  static constexpr bool kInterleaved = false;
  static constexpr bool kNativeDot = false;
  static inline void Load2(const char* row, int64_t h, VF* a, VF* b) {
    const char* x = row + 2 * h;
#if JAXATTN_VL == 16
    // GCC 12 scalarises __builtin_convertvector from _Float16 without AVX512-FP16. (The
    // maskz form: the plain one trips -Wuninitialized inside GCC 12's own header.)
    const __m256i* h16 = reinterpret_cast<const __m256i*>(x);
    *a = (VF)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(h16));
    *b = (VF)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(h16 + 1));
#elif JAXATTN_VL == 8
    *a = (VF)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    *b = (VF)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
#else
    const VHFu* v = reinterpret_cast<const VHFu*>(x);
    *a = __builtin_convertvector(v[0], VF);
    *b = __builtin_convertvector(v[1], VF);
#endif
  }
};

// Quantized caches (kQuantized): Load2 yields the element divided by a constant kFactor, and
// the caller multiplies scores and probabilities by the row's scale * kFactor, so the
// conversion itself needs no multiply. float8: vpmovsxbw, a few 16-bit shifts and masks,
// vcvtph2ps (their AVX2 and generic forms on the other kernel sets); int8 instead stays in
// integers (Int8Integer).
typedef int8_t VSBu __attribute__((vector_size(kVL), aligned(1), may_alias));
typedef int8_t VSB __attribute__((vector_size(kVL)));  // signed bytes
typedef int16_t VS __attribute__((vector_size(kVL * 2)));
typedef uint16_t VUS __attribute__((vector_size(kVL * 2)));
typedef _Float16 VHF __attribute__((vector_size(kVL * 2)));

// float16 bit patterns to float32 (exact, denormals included).
static inline VF HalfBitsToFloat(VUS h) {
#if JAXATTN_VL == 16
  return (VF)_mm512_maskz_cvtph_ps(0xffff, (__m256i)h);  // maskz: see F16Elems
#elif JAXATTN_VL == 8
  return (VF)_mm256_cvtph_ps((__m128i)h);
#else
  return __builtin_convertvector((VHF)h, VF);
#endif
}

// int8 takes no float conversion: its scores and value sums are integer dot products
// (kIntegerDot; see "int8 caches" below).
struct Int8Integer {
  static constexpr float kFactor = 1.0f;
};
// float8 e4m3fn (bias 7, no infinities, S.1111.111 = NaN) to float16 bits: exponent and
// mantissa shifted into place give the value times 2^-8 (bias 15), denormals included; NaN
// is set apart. With AVX-512 a table lookup (two vpermi2w over the 128 magnitudes, NaN in
// the table) converts 32 bytes at once: measured (one core, L1-resident bytes, Sapphire
// Rapids) 0.090 ns per element against 0.119 for the shifts with the NaN fix on 16-lane
// halves and 0.16 for a 256-entry float32 table through vgatherdps; vcvtph2ps bounds both
// (int8 through vpmovsxbd + vcvtdq2ps: 0.034).
struct F8E4M3Halves {
  uint16_t half[128];  // float16 bits of e4m3 magnitude i, times 2^-8
};
static constexpr F8E4M3Halves MakeF8E4M3Halves() {
  F8E4M3Halves t{};
  for (int i = 0; i < 128; ++i) t.half[i] = i == 0x7f ? 0x7e00 : static_cast<uint16_t>(i << 7);
  return t;
}
static constexpr F8E4M3Halves kF8E4M3Halves = MakeF8E4M3Halves();

struct F8E4M3ToFloat {
  static constexpr float kFactor = 256.0f;
  static inline VF Convert(VSB x) {
    // Sign-extend, shift, and clear bit 14 (a copy of the sign).
    const VUS h = ((VUS) __builtin_convertvector(x, VS) << 7) & 0xbf80;
    const VUS nan = (VUS)((h & 0x3f80) == 0x3f80);
    return HalfBitsToFloat(h | (nan & 0x7c00));
  }
#if JAXATTN_VL == 16
  static inline void Convert2(const char* bytes, VF* a, VF* b) {
    const uint16_t* t = kF8E4M3Halves.half;
    const __m512i w =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    const __m512i lo =
        _mm512_permutex2var_epi16(_mm512_loadu_si512(t), w, _mm512_loadu_si512(t + 32));
    const __m512i hi =
        _mm512_permutex2var_epi16(_mm512_loadu_si512(t + 64), w, _mm512_loadu_si512(t + 96));
    const __mmask32 upper = _mm512_test_epi16_mask(w, _mm512_set1_epi16(0x40));
    // magnitude | (sign << 8): vpternlog picks bit 15 from the shifted byte.
    const __m512i h =
        _mm512_ternarylogic_epi32(_mm512_mask_blend_epi16(upper, lo, hi), _mm512_slli_epi16(w, 8),
                                  _mm512_set1_epi16(static_cast<int16_t>(0x8000)),
                                  0xf8);  // a | (b & c)
    *a = (VF)_mm512_maskz_cvtph_ps(0xffff, _mm512_maskz_extracti64x4_epi64(0xff, h, 0));
    *b = (VF)_mm512_maskz_cvtph_ps(0xffff, _mm512_maskz_extracti64x4_epi64(0xff, h, 1));
  }
#endif
};
// float8 e5m2 is the upper byte of a float16 (infinities and NaN included).
struct F8E5M2ToFloat {
  static constexpr float kFactor = 1.0f;
  static inline VF Convert(VSB x) {
    return HalfBitsToFloat((VUS) __builtin_convertvector(x, VS) << 8);
  }
};

// Whether converter C has a 32-byte Convert2 of its own (else two 16-lane Convert calls).
template <class C, class = void>
struct HasConvert2 {
  static constexpr bool value = false;
};
template <class C>
struct HasConvert2<C, decltype(void(&C::Convert2))> {
  static constexpr bool value = true;
};

template <class C>
struct QuantElems {
  typedef int8_t T;
  static constexpr bool kQuantized = true;
  // int8: scores and the value accumulation in 16-bit integer arithmetic (see
  // QkTileI8), not through a conversion to float (Load2 is never used).
  static constexpr bool kIntegerDot = __is_same(C, Int8Integer);
  static constexpr float kFactor = C::kFactor;
  static constexpr bool kInterleaved = false;
  static constexpr bool kNativeDot = false;
  static inline void Load2(const char* row, int64_t h, VF* a, VF* b) {
    if constexpr (HasConvert2<C>::value) {
      C::Convert2(row + h, a, b);
    } else {
      const VSBu* x = reinterpret_cast<const VSBu*>(row + h);
      *a = C::Convert(x[0]);
      *b = C::Convert(x[1]);
    }
  }
};
typedef QuantElems<Int8Integer> I8Elems;
typedef QuantElems<F8E4M3ToFloat> F8E4M3Elems;
typedef QuantElems<F8E5M2ToFloat> F8E5M2Elems;

// Load2 of n < kPair elements, zero-filled (never reads past the row).
template <class E>
static inline void PartLoad2(const char* row, int64_t h, int64_t n, VF* a, VF* b) {
  typename E::T buf[kPair];
  __builtin_memset(buf, 0, sizeof(buf));
  __builtin_memcpy(buf, row + h * sizeof(typename E::T), n * sizeof(typename E::T));
  E::Load2(reinterpret_cast<const char*>(buf), 0, a, b);
}

// Where element h of a row sits in the lanes Load2 produces (E::kInterleaved).
static inline int64_t PairLane(bool interleaved, int64_t h) {
  if (!interleaved) return h;
  const int64_t w = h % kPair;
  return h - w + (w % 2) * kVL + w / 2;
}

// ---------------------------------------------------------------------- vector helpers

// The lane permutations of TransposeSum: at level i segments of width w = kVL >> i halve;
// masks[i][high][lane] picks the low (high = 0) or high half of each segment of a and b.
struct FoldMasks {
  int32_t masks[8][2][kVL];
};
static constexpr FoldMasks MakeFoldMasks() {
  FoldMasks f{};
  const int half = kVL / 2;
  for (int level = 0; level < kLog2VL; ++level) {
    const int w = kVL >> level, h = w / 2;
    for (int high = 0; high < 2; ++high) {
      for (int i = 0; i < kVL; ++i) {
        const int ii = i % half;
        f.masks[level][high][i] = (i < half ? 0 : kVL) + (ii / h) * w + ii % h + high * h;
      }
    }
  }
  return f;
}
static constexpr FoldMasks kFoldMasks = MakeFoldMasks();

// Returns r with r[i] = sum of the lanes of v[i], for kVL vectors (v is overwritten): float
// vectors, or int32 ones (exact while no partial sum leaves int32).
template <class V>
static inline V TransposeSum(V* v) {
  int n = kVL;
#pragma GCC unroll 8
  for (int level = 0; level < kLog2VL; ++level) {
    const VI lo = *reinterpret_cast<const VIu*>(kFoldMasks.masks[level][0]);
    const VI hi = *reinterpret_cast<const VIu*>(kFoldMasks.masks[level][1]);
#pragma GCC unroll 16
    for (int i = 0; i < n / 2; ++i) {
      const V a = v[2 * i], b = v[2 * i + 1];
      v[i] = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
    }
    n /= 2;
  }
  return v[0];
}

// ---------------------------------------------------------------------- micro-kernels

// Adds the partial sums of the last n < kPair elements of a key row (see QkPartials).
template <class E>
__attribute__((noinline)) static void QkTailPartials(const float* q, int64_t ldq, int64_t rows,
                                                     int64_t n, const char* k, float* red) {
  VF a, b;
  PartLoad2<E>(k, 0, n, &a, &b);
  for (int64_t r = 0; r < rows; ++r) {
    float* out = red + r * kQkKeys * kVL;
    Store(out, Load(out) + Load(q + r * ldq) * a + Load(q + r * ldq + kVL) * b);
  }
}

// Lane partial sums of q_r . k for RT rows (row r at q + r * ldq: scaled f32 in Load2 lane
// order, zero padded to a multiple of kPair) and one key row k: red[r * kQkKeys * kVL].
// Inlined into the key loop (a call per key row costs as much as the work for short rows).
template <class E, int RT>
__attribute__((always_inline)) static inline void QkPartials(const float* q, int64_t ldq,
                                                             int64_t head_dim, const char* k,
                                                             float* red) {
  // Two accumulators per row (acc for the first vector of a pair, acc2 for the second, or
  // for every other pair with vdpbf16ps): 2 * RT independent FMA chains hide the FMA latency.
  const int64_t hf = head_dim / kPair * kPair;
  VF acc[RT], acc2[RT];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) acc[r] = acc2[r] = VF{};
#if JAXATTN_VL == 16
  if constexpr (E::kNativeDot) {
    // q rows hold bf16 (natural order) in the first half of each row's floats.
    const uint16_t* qh = reinterpret_cast<const uint16_t*>(q);
    const int64_t ldqh = 2 * ldq;
    int64_t h = 0;
    for (; h + 2 * kPair <= hf; h += 2 * kPair) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + 2 * h);
      const __m512bh kv2 = (__m512bh)_mm512_loadu_si512(k + 2 * (h + kPair));
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        acc[r] = (VF)_mm512_dpbf16_ps((__m512)acc[r],
                                      (__m512bh)_mm512_loadu_si512(qh + r * ldqh + h), kv);
        acc2[r] = (VF)_mm512_dpbf16_ps(
            (__m512)acc2[r], (__m512bh)_mm512_loadu_si512(qh + r * ldqh + h + kPair), kv2);
      }
    }
    for (; h < hf; h += kPair) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + 2 * h);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        acc[r] = (VF)_mm512_dpbf16_ps((__m512)acc[r],
                                      (__m512bh)_mm512_loadu_si512(qh + r * ldqh + h), kv);
      }
    }
    if (hf < head_dim) {
      uint16_t buf[kPair];
      __builtin_memset(buf, 0, sizeof(buf));
      __builtin_memcpy(buf, k + 2 * hf, (head_dim - hf) * 2);
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(buf);
      for (int r = 0; r < RT; ++r) {
        acc[r] = (VF)_mm512_dpbf16_ps((__m512)acc[r],
                                      (__m512bh)_mm512_loadu_si512(qh + r * ldqh + hf), kv);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) Store(red + r * kQkKeys * kVL, acc[r] + acc2[r]);
    return;
  }
#endif
  for (int64_t h = 0; h < hf; h += kPair) {
    VF a, b;
    E::Load2(k, h, &a, &b);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      acc[r] += Load(q + r * ldq + h) * a;
      acc2[r] += Load(q + r * ldq + h + kVL) * b;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) Store(red + r * kQkKeys * kVL, acc[r] + acc2[r]);
  if (hf < head_dim) {
    QkTailPartials<E>(q + hf, ldq, RT, head_dim - hf, k + hf * sizeof(typename E::T), red);
  }
}

// Lane partial sums for `rows` rows against one key row: red holds, per tile of kQkRows rows,
// kVL vectors ordered (row, key slot); the key goes to slot c.
template <class E>
static void KeyPartials(const float* q, int64_t ldq, int64_t rows, int64_t head_dim, const char* k,
                        int c, float* red) {
  for (int64_t r0 = 0, tile = 0; r0 < rows; r0 += kQkRows, ++tile) {
    const float* qr = q + r0 * ldq;
    float* rt = red + (tile * kVL + c) * kVL;
    switch (MinI(kQkRows, rows - r0)) {
      case 1: QkPartials<E, 1>(qr, ldq, head_dim, k, rt); break;
#if JAXATTN_VL >= 8
      case 2: QkPartials<E, 2>(qr, ldq, head_dim, k, rt); break;
#endif
#if JAXATTN_VL >= 16
      case 3: QkPartials<E, 3>(qr, ldq, head_dim, k, rt); break;
      case 4: QkPartials<E, 4>(qr, ldq, head_dim, k, rt); break;
#endif
    }
  }
}

// s[r * lds + c] = scale * the sums of the partials of KeyPartials for key slots
// c < kQkKeys: one TransposeSum per tile of kQkRows rows.
static void ReducePartials(const float* red, int64_t rows, float scale, float* s, int64_t lds) {
  for (int64_t r0 = 0, tile = 0; r0 < rows; r0 += kQkRows, ++tile) {
    VF v[kVL];
#pragma GCC unroll 16
    for (int i = 0; i < kVL; ++i) v[i] = Load(red + (tile * kVL + i) * kVL);
    float lanes[kVL];
    Store(lanes, TransposeSum(v) * scale);
    const int64_t rt = MinI(kQkRows, rows - r0);
    for (int64_t r = 0; r < rt; ++r) {
      __builtin_memcpy(s + (r0 + r) * lds, lanes + r * kQkKeys, sizeof(float) * kQkKeys);
    }
  }
}

// o[r * ldo + h0 + ...] += sum_j p[r * ldp + j] v_j[h0 + ...] for RT rows and NP paired
// loads from element h0 (with kPartial, one paired load of n < kPair elements). o is in
// Load2 lane order.
template <class E, int RT, int NP, bool kPartial>
static inline void PvTile(const float* p, int64_t ldp, const char* const* vrow, int64_t nk,
                          int64_t h0, int64_t n, float* o, int64_t ldo) {
  VF acc[RT][2 * NP];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < 2 * NP; ++c) acc[r][c] = Load(o + r * ldo + h0 + c * kVL);
  }
  for (int64_t j = 0; j < nk; ++j) {
    VF vv[2 * NP];
#pragma GCC unroll 4
    for (int c = 0; c < NP; ++c) {
      if (kPartial) {
        PartLoad2<E>(vrow[j], h0, n, &vv[2 * c], &vv[2 * c + 1]);
      } else {
        E::Load2(vrow[j], h0 + c * kPair, &vv[2 * c], &vv[2 * c + 1]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const VF pb = Splat(p[r * ldp + j]);
#pragma GCC unroll 8
      for (int c = 0; c < 2 * NP; ++c) acc[r][c] += pb * vv[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < 2 * NP; ++c) Store(o + r * ldo + h0 + c * kVL, acc[r][c]);
  }
}

template <class E, int RT>
static inline void PvRows(const float* p, int64_t ldp, const char* const* vrow, int64_t nk,
                          int64_t value_dim, float* o, int64_t ldo) {
  const int64_t full = value_dim / kPair;
  int64_t c = 0;
  for (; c + kPvPairs <= full; c += kPvPairs) {
    PvTile<E, RT, kPvPairs, false>(p, ldp, vrow, nk, c * kPair, kPair, o, ldo);
  }
  for (; c < full; ++c) PvTile<E, RT, 1, false>(p, ldp, vrow, nk, c * kPair, kPair, o, ldo);
  if (full * kPair < value_dim) {
    PvTile<E, RT, 1, true>(p, ldp, vrow, nk, full * kPair, value_dim - full * kPair, o, ldo);
  }
}

// o[r] += sum_j p[r, j] v_j for `rows` rows.
template <class E>
static void AccumulateValues(const float* p, int64_t ldp, int64_t rows, const char* const* vrow,
                             int64_t nk, int64_t value_dim, float* o, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += kPvRows) {
    const float* pr = p + r0 * ldp;
    float* orow = o + r0 * ldo;
    switch (MinI(kPvRows, rows - r0)) {
      case 1: PvRows<E, 1>(pr, ldp, vrow, nk, value_dim, orow, ldo); break;
      case 2: PvRows<E, 2>(pr, ldp, vrow, nk, value_dim, orow, ldo); break;
#if JAXATTN_VL >= 16
      case 3: PvRows<E, 3>(pr, ldp, vrow, nk, value_dim, orow, ldo); break;
      case 4: PvRows<E, 4>(pr, ldp, vrow, nk, value_dim, orow, ldo); break;
#endif
    }
  }
}

// ---------------------------------------------------------------------- int8 caches

// An int8 cache is decoded in integer arithmetic: converting each byte to float costs two
// instructions per kVL elements, and the float FMAs of the products alone then bound the
// step (measured through floats: 1.13-1.42x the bfloat16 cache's speed on 2 AVX2 cores,
// 1.31-1.35x on 16 Xeon cores, at half its bytes). Instead:
//  - scores: the scaled query row is rounded to int16 against its largest magnitude (a
//    row scale), the key bytes are sign-extended to int16 (vpmovsxbw), and vpdpwssd
//    (AVX512-VNNI; vpmaddwd + vpaddd on the other kernel sets) adds the products of pairs of
//    elements to int32 lanes. A tile of kQkRows query rows x kQkKeys keys accumulates in
//    registers (each key row widened once for the tile's rows) and is reduced by one
//    TransposeSum to a vector of the tile's scores: in int32, exact while head_dim <=
//    kI8ExactDim (a score is at most head_dim * 128 * 32767 in magnitude), else in float.
//    score = row scale * key scale * that integer dot.
//  - values: each row's probabilities times the value rows' scales in a block of
//    kI8Block keys are rounded to int16 against their largest (a block row scale), the
//    value bytes of two keys are sign-extended and interleaved (vpmovsxbw, vpunpck*wd), and
//    vpdpwssd adds the two keys' products, times the pair of weights broadcast from memory,
//    to int32 lanes (exact: <= 32767 * 128 * kI8Block), added to the float output row
//    times the block row scale once per block. On AVX-512 the 16-bit unpacks work within
//    128-bit lanes, so the output rows hold the elements in I8Lane order, put back when a
//    row is written (FinishRow).
// Both roundings are to 16 bits against the row's largest magnitude (relative error below
// 2^-16 of it), far below the int8 cache's own 2^-8; the results are bitwise deterministic.
typedef int16_t VW __attribute__((vector_size(kVL * 4)));  // 2 kVL int16 lanes
typedef int16_t VWu __attribute__((vector_size(kVL * 4), aligned(2), may_alias));
static_assert(kI8Block % 2 == 0, "keys go in pairs");
constexpr int64_t kI8ExactDim = 512;  // 512 * 128 * 32767 < 2^31

// The kPair bytes at x sign-extended to int16.
static inline VW WidenBytes(const char* x) {
#if JAXATTN_VL == 16
  return (VW)_mm512_maskz_cvtepi8_epi16(  // maskz: see F16Elems
      ~__mmask32{0}, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
#elif JAXATTN_VL == 8
  return (VW)_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
#else
  int8_t b[kPair];
  __builtin_memcpy(b, x, kPair);
  VW w;
#pragma GCC unroll 8
  for (int i = 0; i < kPair; ++i) w[i] = b[i];
  return w;
#endif
}

// acc + (lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1]) in int32 (vpdpwssd, or vpmaddwd and
// vpaddd; both wrap, and no sum here leaves int32).
static inline VI DotPairs(VI acc, VW a, VW b) {
#if JAXATTN_VL == 16
  return (VI)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#elif JAXATTN_VL == 8
  return acc + (VI)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#else
  return acc + (VI)_mm_madd_epi16((__m128i)a, (__m128i)b);
#endif
}

// The int16 pair w[0], w[1] in every int32 lane (vpdpwssd takes it as a broadcast operand).
static inline VW BroadcastPair(const int16_t* w) {
  int32_t pair;
  __builtin_memcpy(&pair, w, sizeof(pair));
  return (VW)(VI{} + pair);
}

// Elements [h, h + kPair) of two value rows a and b as interleaved int16 pairs (a[e], b[e])
// in the int32 lanes of *lo and *hi, element e of the kPair at lane I8Lane(e) of the two.
static inline void InterleaveRows(const char* a, const char* b, VW* lo, VW* hi) {
#if JAXATTN_VL == 16
  const __m512i x = (__m512i)WidenBytes(a), y = (__m512i)WidenBytes(b);
  *lo = (VW)_mm512_unpacklo_epi16(x, y);  // per 128-bit lane: elements 0-3 | 8-11 | ...
  *hi = (VW)_mm512_unpackhi_epi16(x, y);  // 4-7 | 12-15 | ...
#elif JAXATTN_VL == 8
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  *lo = (VW)_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, y));
  *hi = (VW)_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x, y));
#else
  int8_t x[kPair], y[kPair];
  __builtin_memcpy(x, a, kPair);
  __builtin_memcpy(y, b, kPair);
#pragma GCC unroll 8
  for (int i = 0; i < kVL; ++i) {
    (*lo)[2 * i] = x[i];
    (*lo)[2 * i + 1] = y[i];
    (*hi)[2 * i] = x[kVL + i];
    (*hi)[2 * i + 1] = y[kVL + i];
  }
#endif
}

// Where element h of a value row sits in the output rows of an int8 cache's value pass
// (InterleaveRows' lanes: lo then hi of each kPair elements).
constexpr bool kI8LanesPermuted = kVL == 16;
static inline int64_t I8Lane(int64_t h) {
  if (!kI8LanesPermuted) return h;
  const int64_t w = h % kPair, within = w % 8;
  return h - w + (within < 4 ? 0 : kVL) + (w / 8) * 4 + within % 4;
}

// Rounds the n floats x (n a multiple of kVL) to int16 against their largest magnitude:
// out[i] = round(x[i] * 32767 / max |x|), zero padded to `padded`. Returns the scale
// (max |x| / 32767: out * scale ~ x), 0 when every x is 0, NaN when some x is NaN or
// infinite (so that it reaches the output as in float arithmetic).
static inline float RoundToInt16(const float* x, int64_t n, int64_t padded, int16_t* out) {
  VF mx = VF{};
  VI bad = VI{};
  const VF inf = Splat(kInf);
  for (int64_t i = 0; i < n; i += kVL) {
    const VF v = Load(x + i);
    const VF a = v < VF{} ? -v : v;
    bad |= !(a < inf);  // NaN or infinite
    mx = a > mx ? a : mx;
  }
  const float largest = HorizontalMax(mx);
  if (AnyLane(bad)) {
    __builtin_memset(out, 0, padded * sizeof(int16_t));
    return __builtin_nanf("");
  }
  if (largest == 0.0f) {
    __builtin_memset(out, 0, padded * sizeof(int16_t));
    return 0.0f;
  }
  const VF up = Splat(32767.0f / largest);
  for (int64_t i = 0; i < n; i += kVL) {
    // Round to nearest even (vcvtps2dq); |x * up| <= 32767 * (1 + 2^-23) rounds to 32767.
    const VF y = Load(x + i) * up;
    VI r;
#if JAXATTN_VL == 16
    r = (VI)_mm512_maskz_cvtps_epi32(0xffff, (__m512)y);  // maskz: see F16Elems
#elif JAXATTN_VL == 8
    r = (VI)_mm256_cvtps_epi32((__m256)y);
#else
    r = (VI)_mm_cvtps_epi32((__m128)y);
#endif
#pragma GCC unroll 16
    for (int l = 0; l < kVL; ++l) out[i + l] = static_cast<int16_t>(r[l]);
  }
  for (int64_t i = n; i < padded; ++i) out[i] = 0;
  return largest / 32767.0f;
}

// Integer dot products of RT <= kQkRows int16 query rows (row r at q + r * ldq, zero padded
// to a multiple of kPair) with the kQkKeys int8 key rows k[c] (head_dim bytes; a shorter last
// pair read through zero-padded copies): s[r * lds + c], as floats. kExact: head_dim <=
// kI8ExactDim, the lane sums are reduced in int32.
template <int RT, bool kExact>
__attribute__((always_inline)) static inline void QkTileI8(const int16_t* q, int64_t ldq,
                                                           int64_t head_dim, const char* const* k,
                                                           float* s, int64_t lds) {
  VI acc[kVL];  // row r, key c at r * kQkKeys + c (TransposeSum's order); rows past RT: 0
#pragma GCC unroll 16
  for (int i = 0; i < kVL; ++i) acc[i] = VI{};
  auto step = [&](const char* const* rows, int64_t h, int64_t qh) __attribute__((always_inline)) {
    VW kw[kQkKeys];
#pragma GCC unroll 4
    for (int c = 0; c < kQkKeys; ++c) kw[c] = WidenBytes(rows[c] + h);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const VW qv = *reinterpret_cast<const VWu*>(q + r * ldq + qh);
#pragma GCC unroll 4
      for (int c = 0; c < kQkKeys; ++c) {
        acc[r * kQkKeys + c] = DotPairs(acc[r * kQkKeys + c], qv, kw[c]);
      }
    }
  };
  const int64_t hf = head_dim / kPair * kPair;
  for (int64_t h = 0; h < hf; h += kPair) step(k, h, h);
  if (hf < head_dim) {
    char buf[kQkKeys][kPair];
    const char* rows[kQkKeys];
    for (int c = 0; c < kQkKeys; ++c) {
      __builtin_memset(buf[c], 0, kPair);
      __builtin_memcpy(buf[c], k[c] + hf, head_dim - hf);
      rows[c] = buf[c];
    }
    step(rows, 0, hf);
  }
  float lanes[kVL];
  if constexpr (kExact) {
    Store(lanes, __builtin_convertvector(TransposeSum(acc), VF));
  } else {
    VF f[kVL];
#pragma GCC unroll 16
    for (int i = 0; i < kVL; ++i) f[i] = __builtin_convertvector(acc[i], VF);
    Store(lanes, TransposeSum(f));
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    __builtin_memcpy(s + r * lds, lanes + r * kQkKeys, sizeof(float) * kQkKeys);
  }
}

// QkTileI8 for `rows` rows (row tiles of kQkRows).
template <bool kExact>
static void KeyScoresI8(const int16_t* q, int64_t ldq, int64_t rows, int64_t head_dim,
                        const char* const* k, float* s, int64_t lds) {
  for (int64_t r0 = 0; r0 < rows; r0 += kQkRows) {
    const int16_t* qr = q + r0 * ldq;
    float* sr = s + r0 * lds;
    switch (MinI(kQkRows, rows - r0)) {
      case 1: QkTileI8<1, kExact>(qr, ldq, head_dim, k, sr, lds); break;
#if JAXATTN_VL >= 8
      case 2: QkTileI8<2, kExact>(qr, ldq, head_dim, k, sr, lds); break;
#endif
#if JAXATTN_VL >= 16
      case 3: QkTileI8<3, kExact>(qr, ldq, head_dim, k, sr, lds); break;
      case 4: QkTileI8<4, kExact>(qr, ldq, head_dim, k, sr, lds); break;
#endif
    }
  }
}

constexpr int kI8Rows = kVL >= 8 ? 4 : 2;  // query rows per pass over a value chunk

// o[r * ldo ..] += scale[r] * sum_j w_r[j] v_j[h0 ..] for RT rows and the kPair elements
// from h0 (in I8Lane order): row r's int16 weights at w + r * ldw, 2 npairs of them; v_j at
// vrow[j] + h0 (an odd last key is paired with a zero weight).
template <int RT>
static inline void PvTileI8(const int16_t* w, int64_t ldw, const float* scale,
                            const char* const* vrow, int64_t npairs, int64_t h0, float* o,
                            int64_t ldo) {
  VI lo[RT], hi[RT];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) lo[r] = hi[r] = VI{};
  for (int64_t i = 0; i < npairs; ++i) {
    VW vlo, vhi;
    InterleaveRows(vrow[2 * i] + h0, vrow[2 * i + 1] + h0, &vlo, &vhi);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const VW wp = BroadcastPair(w + r * ldw + 2 * i);
      lo[r] = DotPairs(lo[r], vlo, wp);
      hi[r] = DotPairs(hi[r], vhi, wp);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const VF sc = Splat(scale[r]);
    float* orow = o + r * ldo;
    Store(orow, Load(orow) + sc * __builtin_convertvector(lo[r], VF));
    Store(orow + kVL, Load(orow + kVL) + sc * __builtin_convertvector(hi[r], VF));
  }
}

// PvTileI8 over the kPair-element chunks [0, n) (n a multiple of kPair) of `rows` rows.
static void PvRowsI8(const int16_t* w, int64_t ldw, const float* scale, int64_t rows,
                     const char* const* vrow, int64_t npairs, int64_t n, float* o, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += kI8Rows) {
    const int16_t* wr = w + r0 * ldw;
    const float* sr = scale + r0;
    for (int64_t h0 = 0; h0 < n; h0 += kPair) {
      float* oc = o + r0 * ldo + h0;
      switch (MinI(kI8Rows, rows - r0)) {
        case 1: PvTileI8<1>(wr, ldw, sr, vrow, npairs, h0, oc, ldo); break;
        case 2: PvTileI8<2>(wr, ldw, sr, vrow, npairs, h0, oc, ldo); break;
#if JAXATTN_VL >= 8
        case 3: PvTileI8<3>(wr, ldw, sr, vrow, npairs, h0, oc, ldo); break;
        case 4: PvTileI8<4>(wr, ldw, sr, vrow, npairs, h0, oc, ldo); break;
#endif
      }
    }
  }
}

// The value pass of an int8 cache for `rows` rows (int16 weights, ldw to a row, zero from
// key nk on; scales [rows]; nk keys; vrow holds a valid row at nk when nk is odd). The last
// value_dim % kPair elements of each row are read through zero-padded copies in `tail`
// (kI8Block rows of kPair bytes).
static void AccumulateValuesI8(const int16_t* w, int64_t ldw, const float* scale, int64_t rows,
                               const char* const* vrow, int64_t nk, int64_t value_dim, char* tail,
                               float* o, int64_t ldo) {
  const int64_t npairs = (nk + 1) / 2, full = value_dim / kPair * kPair;
  PvRowsI8(w, ldw, scale, rows, vrow, npairs, full, o, ldo);
  if (full == value_dim) return;
  const char* tail_rows[kI8Block];
  for (int64_t j = 0; j < 2 * npairs; ++j) {
    char* t = tail + j * kPair;
    __builtin_memset(t, 0, kPair);
    __builtin_memcpy(t, vrow[j] + full, value_dim - full);
    tail_rows[j] = t;
  }
  PvRowsI8(w, ldw, scale, rows, tail_rows, npairs, kPair, o + full, ldo);
}

// ---------------------------------------------------------------------- the job

struct DecodeJob {
  const DecodeAttentionProblem* p = nullptr;
  DecodeResult res;
  int64_t group = 1;        // G = N / K
  int64_t rows = 1;         // T * G, row r = t * G + g
  int64_t hp = 0, hvp = 0;  // head dims rounded up to a paired load
  // The order of the elements in the output rows accumulated: as in the value row, bf16
  // Load2 lane order (PairLane), or an int8 cache's value pass order (I8Lane).
  enum class Lanes { kNatural, kBF16Pairs, kInt8Pairs } lanes = Lanes::kNatural;
  int64_t capacity = 0;   // max_pages * page_size
  int64_t partition = 0;  // keys per partition (DecodePartitionSize)
  int64_t heads_per_task = 1, head_groups = 1;
  // Partitions are laid out by what the lengths reach, not by the capacity: sequence b has
  // part_count[b] = max(1, ceil(len_b / partition)) partitions, numbered from part_start[b]
  // in one list; task t covers partition part_of_task[t / head_groups].
  const int64_t* part_start = nullptr;  // [B + 1]
  const int64_t* part_seq = nullptr;    // [total partitions]: the sequence of each
  float* part_o = nullptr;              // [partitions, K, rows, hvp] unnormalised outputs
  float* part_ml = nullptr;             // [partitions, K, rows, 2] running max and sum
  int64_t scratch_failed = 0;           // bytes a task could not allocate (0: none), set atomically
};

static inline int64_t PartCount(const DecodeJob& job, int64_t b) {
  return job.part_start[b + 1] - job.part_start[b];
}

// A task's per-thread scratch, or nullptr (the request is recorded in the job) when it
// cannot be allocated.
static float* DecodeScratch(const DecodeJob& job, int64_t floats) {
  float* data = tls_scratch.Get(floats);
  if (data == nullptr) {
    __atomic_store_n(&const_cast<DecodeJob&>(job).scratch_failed,
                     floats * static_cast<int64_t>(sizeof(float)), __ATOMIC_RELAXED);
  }
  return data;
}

static inline int64_t DecodeLength(const DecodeAttentionProblem& p, int64_t capacity, int64_t b) {
  return MinI(capacity, MaxI(0, p.kv_lengths[b % p.kv_lengths_batch]));
}

// Sequence b's new tokens: query rows t < this count are live, the rest output 0.
static inline int64_t DecodeQueryCount(const DecodeAttentionProblem& p, int64_t b) {
  if (p.q_lengths == nullptr) return p.q_len;
  return MinI(p.q_len, MaxI(0, p.q_lengths[b % p.q_lengths_batch]));
}

// Sequence b's query and key positions (nullptr: the defaults) and ALiBi slopes.
struct DecodePositions {
  const int32_t* q_pos = nullptr;
  const int32_t* kv_pos = nullptr;
  const float* slopes = nullptr;
  int64_t q_offset = 0;  // default query position of token 0: len - T
  int64_t QueryPosition(int64_t t) const {
    return q_pos != nullptr ? ClampDecodePosition(q_pos[t]) : q_offset + t;
  }
  int64_t KeyPosition(int64_t j) const {
    return kv_pos != nullptr ? ClampDecodePosition(kv_pos[j]) : j;
  }
  static int64_t ClampDecodePosition(int32_t x) {
    const int64_t limit = int64_t{1} << 30;
    return x < -limit ? -limit : x > limit ? limit : x;
  }
};

static inline DecodePositions DecodePositionsOf(const DecodeAttentionProblem& p, int64_t b,
                                                int64_t len) {
  DecodePositions dp;
  const int64_t capacity = p.max_pages * p.page_size;
  if (p.q_positions) dp.q_pos = p.q_positions + (b % p.q_positions_batch) * p.q_len;
  if (p.kv_positions) dp.kv_pos = p.kv_positions + (b % p.kv_positions_batch) * capacity;
  if (p.alibi_slopes) dp.slopes = p.alibi_slopes + (b % p.alibi_batch) * p.num_heads;
  dp.q_offset = len - DecodeQueryCount(p, b);
  return dp;
}

static inline int64_t DecodePage(const DecodeAttentionProblem& p, int64_t b, int64_t page_index) {
  if (p.block_tables == nullptr) return b % p.num_pages;
  const int64_t page = p.block_tables[(b % p.block_tables_batch) * p.max_pages + page_index];
  return MinI(p.num_pages - 1, MaxI(0, page));  // ValidateDecodePages rejected these already
}

// Rows between a sequence's key rows and its value rows: nonzero only for a contiguous value
// cache whose batch differs from the key cache's.
static inline int64_t DecodeValueShift(const DecodeAttentionProblem& p, int64_t b) {
  if (p.block_tables != nullptr || p.value_num_pages == 0) return 0;
  return (b % p.value_num_pages - b % p.num_pages) * p.page_size;
}

// Global row index (page * page_size + offset) of keys [s0, s0 + nk) of sequence b.
static void KeyRows(const DecodeAttentionProblem& p, int64_t b, int64_t s0, int64_t nk,
                    int64_t* out) {
  int64_t page_index = s0 / p.page_size, offset = s0 % p.page_size;
  int64_t base = DecodePage(p, b, page_index) * p.page_size;
  for (int64_t j = 0; j < nk; ++j) {
    out[j] = base + offset;
    if (++offset == p.page_size && j + 1 < nk) {
      offset = 0;
      base = DecodePage(p, b, ++page_index) * p.page_size;
    }
  }
}

// Keys per partition for caches whose longest (clamped) length is `longest`: a function of
// the shape and that length only, never of the thread count (bitwise identical results for
// any thread count) nor of the capacity (padding a block table changes neither the cost nor
// the result).
static int64_t PartitionSize(const DecodeAttentionProblem& p, int64_t longest) {
  const int64_t keys = MaxI(1, longest);
  const int64_t rows = p.q_len * (p.num_heads / p.num_kv_heads);
  // A partition's partial result (rows x Hv floats) must stay small next to its KV bytes.
  const int64_t min_partition = MaxI(kDecodeMinPartition, 8 * rows);
  int64_t parts = CeilDiv(kDecodeTargetTasks, p.batch * p.num_kv_heads);
  parts = MinI(parts, MaxI(1, keys / min_partition));
  return RoundUp(CeilDiv(keys, parts), kDecodeBlock);
}

static int64_t LongestLength(const DecodeAttentionProblem& p) {
  const int64_t capacity = p.max_pages * p.page_size;
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = MaxI(longest, DecodeLength(p, capacity, b));
  return longest;
}

// A task streams every kv head of its keys (the rows of all heads of a key are contiguous in
// memory, so a task reads whole pages in order) unless that leaves too few tasks; then the
// heads are split into groups.
static int64_t HeadsPerTask(const DecodeAttentionProblem& p, int64_t total_parts) {
  const int64_t groups = MinI(p.num_kv_heads, CeilDiv(kDecodeMinTasks, total_parts));
  int64_t heads = CeilDiv(p.num_kv_heads, groups);
  // Every key row is scored against the query rows of all the task's heads: keep those in
  // L1 (measured at T = 4, G = 4: 1.7x faster than all 8 heads' 64 KiB). With that many rows
  // the step is compute-bound and the memory order matters less.
  const int64_t q_bytes = p.q_len * (p.num_heads / p.num_kv_heads) * RoundUp(p.head_dim, kPair) *
                          static_cast<int64_t>(sizeof(float));
  heads = MinI(heads, MaxI(1, kDecodeQueryBytes / q_bytes));
  return heads;
}

// Writes out = o / l and lse = m + log(l) for one row (o in Load2 lane order), or 0 and -inf
// when the row saw nothing.
static void FinishRow(const DecodeJob& job, const float* o, float m, float l, int64_t row,
                      float* tmp) {
  const DecodeAttentionProblem& p = *job.p;
  void* out_row = Offset(job.res.out, p.dtype, row * p.value_dim);
  if (l > 0.0f || l != l) {
    const float* src = o;
    if (job.lanes == DecodeJob::Lanes::kBF16Pairs) {
      for (int64_t h = 0; h < p.value_dim; ++h) tmp[h] = o[PairLane(true, h)];
      src = tmp;
    } else if (job.lanes == DecodeJob::Lanes::kInt8Pairs) {
      for (int64_t h = 0; h < p.value_dim; ++h) tmp[h] = o[I8Lane(h)];
      src = tmp;
    }
    StoreRow(p.dtype, src, p.value_dim, 1.0f / l, out_row);
    job.res.lse[row] = m + __builtin_logf(l);
  } else {
    __builtin_memset(out_row, 0, p.value_dim * DTypeSize(p.dtype));
    job.res.lse[row] = -kInf;
  }
}

// Phase 1: one (batch, partition, kv-head group).
template <class E>
static void DecodePartitionTask(void* job_ptr, int64_t task) {
  const DecodeJob& job = *static_cast<const DecodeJob*>(job_ptr);
  const DecodeAttentionProblem& p = *job.p;
  const int64_t hgroup = task % job.head_groups;
  const int64_t slot_part = task / job.head_groups;  // index in the list of all partitions
  const int64_t b = job.part_seq[slot_part];
  const int64_t part = slot_part - job.part_start[b];
  const int64_t kh0 = hgroup * job.heads_per_task;
  const int64_t heads = MinI(job.heads_per_task, p.num_kv_heads - kh0);
  const int64_t T = p.q_len, G = job.group, R = job.rows;
  const int64_t bk = E::kIntegerDot ? kI8Block : kDecodeBlock;  // keys per block
  const int64_t hp = job.hp, hvp = job.hvp, bkp = RoundUp(bk, kVL);
  const int64_t es = sizeof(typename E::T);

  const int64_t row_tiles = CeilDiv(R, kQkRows);
  // Scratch: the sizes of the Take calls below, in order (Take rounds each up to 16 floats).
  const int64_t sizes[] = {heads * R * hp, heads * R * hvp, heads * R, heads * R, heads * R * bkp,
                           heads * row_tiles * kVL * kVL, hp + hvp, (bk + kKeysAhead) * 2, bk * 2,
                           R * 2, R * 2, bkp, bkp,
                           // int8 (E::kIntegerDot): query row scales, the block's int16
                           // weights and their row scales, the value tails
                           heads * R, R * bkp / 2, R, kI8Block * kPair / 4};
  int64_t scratch = kScratchSlack;
  for (int64_t size : sizes) scratch += RoundUp(size, 16);
  float* scratch_data = DecodeScratch(job, scratch);
  if (scratch_data == nullptr) return;
  Carver carve{scratch_data};
  float* q = carve.Take(sizes[0]);
  float* o = carve.Take(sizes[1]);
  float* m = carve.Take(sizes[2]);
  float* l = carve.Take(sizes[3]);
  float* s = carve.Take(sizes[4]);
  float* red = carve.Take(sizes[5]);
  float* tmp = carve.Take(sizes[6]);
  int64_t* key_rows = reinterpret_cast<int64_t*>(carve.Take(sizes[7]));
  const char** vrow = reinterpret_cast<const char**>(carve.Take(sizes[8]));
  int64_t* row_lo = reinterpret_cast<int64_t*>(carve.Take(sizes[9]));
  int64_t* row_hi = reinterpret_cast<int64_t*>(carve.Take(sizes[10]));
  float* key_mult = carve.Take(sizes[11]);    // quantized caches: scale * kFactor of each key
  float* value_mult = carve.Take(sizes[12]);  // and each value row of the block (0 past nk)
  float* q_scale = carve.Take(sizes[13]);
  int16_t* weights = reinterpret_cast<int16_t*>(carve.Take(sizes[14]));  // [R, bkp]
  float* weight_scale = carve.Take(sizes[15]);
  char* value_tail = reinterpret_cast<char*>(carve.Take(sizes[16]));

  // Visible keys of row r (token t): [lo, hi) with hi = position + 1; with explicit
  // positions, the range of key positions it sees (keys below len only).
  const int64_t len = DecodeLength(p, job.capacity, b);
  const DecodePositions dp = DecodePositionsOf(p, b, len);
  const bool by_position = dp.q_pos != nullptr || dp.kv_pos != nullptr;
  // Rows of tokens past the sequence's query count (ragged queries) see no key.
  const int64_t live_tokens = DecodeQueryCount(p, b), live = live_tokens * G;
  int64_t rows_lo = int64_t{1} << 62, rows_hi = -(int64_t{1} << 62);  // by position
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = dp.QueryPosition(t);
    for (int64_t g = 0; g < G; ++g) {
      if (t >= live_tokens) {  // an empty range either way: every key is below lo
        row_lo[t * G + g] = int64_t{1} << 62;
        row_hi[t * G + g] = -(int64_t{1} << 62);
      } else if (by_position) {
        row_hi[t * G + g] = pos + 1;
        row_lo[t * G + g] = p.window_left < 0 ? -(int64_t{1} << 62) : pos - p.window_left;
      } else {
        row_hi[t * G + g] = MaxI(0, pos + 1);
        row_lo[t * G + g] = p.window_left < 0 ? 0 : MaxI(0, pos - p.window_left);
      }
    }
    if (t >= live_tokens) continue;
    rows_lo = MinI(rows_lo, row_lo[t * G]);
    rows_hi = MaxI(rows_hi, row_hi[t * G]);
  }
  const int64_t part_begin = part * job.partition;
  const int64_t part_end = MinI(len, part_begin + job.partition);
  // Row 0 sees the earliest keys, the last row the latest (by index); by position every key
  // below len is a candidate and blocks are cut by their positions below.
  const int64_t begin = by_position || live == 0 ? part_begin : MaxI(part_begin, row_lo[0]);
  const int64_t end = live == 0 ? begin : by_position ? part_end : MinI(part_end, row_hi[live - 1]);

  for (int64_t i = 0; i < heads * R; ++i) {
    m[i] = -kInf;
    l[i] = 0.0f;
  }
  __builtin_memset(o, 0, heads * R * hvp * sizeof(float));
  // Slots of rows past R in the last row tile are reduced (and dropped) but never written.
  __builtin_memset(red, 0, heads * row_tiles * kVL * kVL * sizeof(float));
  if (begin < end) {
    // Scaled query rows in Load2 lane order, zero padded.
    const int64_t qb = b % p.q_batch;
    for (int64_t hh = 0; hh < heads; ++hh) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r / G, n = (kh0 + hh) * G + r % G;
        float* dst = q + (hh * R + r) * hp;
        const void* src = Offset(p.query, p.dtype, ((qb * T + t) * p.num_heads + n) * p.head_dim);
        __builtin_memset(dst, 0, hp * sizeof(float));
        if (E::kNativeDot) {  // unscaled, bf16 as given (the scale is applied to the scores)
          __builtin_memcpy(dst, src, p.head_dim * sizeof(uint16_t));
          continue;
        }
        LoadRow(p.dtype, src, p.head_dim, p.scale, tmp);
        if constexpr (E::kIntegerDot) {  // int16 (2 hp to a row) times a row scale
          for (int64_t h = p.head_dim; h < hp; ++h) tmp[h] = 0.0f;
          q_scale[hh * R + r] = RoundToInt16(tmp, hp, hp, reinterpret_cast<int16_t*>(dst));
          continue;
        }
        for (int64_t h = 0; h < p.head_dim; ++h) dst[PairLane(E::kInterleaved, h)] = tmp[h];
      }
    }
  }

  const int64_t vrow_bytes = p.value_dim * es, krow_bytes = p.head_dim * es;
  const bool has_cap = p.soft_cap > 0.0f;
  const float cap = p.soft_cap, inv_cap = has_cap ? 1.0f / p.soft_cap : 0.0f;
  const char* key_base = static_cast<const char*>(p.key);
  // A contiguous value cache of another batch than the key cache (a vmap mapping one of
  // them): its rows sit this many rows from the key rows.
  const int64_t value_shift = DecodeValueShift(p, b);
  const char* value_base =
      static_cast<const char*>(p.value) + value_shift * p.num_kv_heads * p.value_dim * es;

  const bool has_alibi = dp.slopes != nullptr;
  // The block's key positions (by position or with ALiBi).
  int32_t key_pos[kDecodeBlock > kI8Block ? kDecodeBlock : kI8Block];
  for (int64_t s0 = begin; s0 < end; s0 += bk) {
    const int64_t nk = MinI(bk, end - s0), nkp = RoundUp(nk, kVL);
    bool full = false;
    if (by_position || has_alibi) {
      int64_t k_min = int64_t{1} << 62, k_max = -(int64_t{1} << 62);
      for (int64_t j = 0; j < nk; ++j) {
        key_pos[j] = dp.KeyPosition(s0 + j);
        k_min = MinI(k_min, key_pos[j]);
        k_max = MaxI(k_max, key_pos[j]);
      }
      if (by_position) {
        // No row sees any key of the block: skip it (never read). Every row sees all of it:
        // no mask.
        if (k_min >= rows_hi || k_max < rows_lo) continue;
        full = true;
        for (int64_t r = 0; r < R; r += G) full = full && row_lo[r] <= k_min && k_max < row_hi[r];
      }
    }
    // Rows known, for prefetching the K rows ahead.
    const int64_t nk_ahead = MinI(bk + (E::kIntegerDot ? kI8KeyPrefetch : kKeyPrefetch), end - s0);
    KeyRows(p, b, s0, nk_ahead, key_rows);
    // Rows whose visible range covers the whole block need no mask.
    if (!by_position) full = live == R && row_lo[R - 1] <= s0 && s0 + nk <= row_hi[0];

    // Scores of every head. K is read strictly in memory order (key by key, the heads of a
    // key are adjacent) so the hardware prefetchers see one sequential stream; the V rows
    // are prefetched in the same order for the value pass below. int8: the scores of
    // kQkKeys keys of a head at once (QkTileI8), the task's heads in turn, the K rows
    // prefetched kI8KeyPrefetch keys ahead.
    if constexpr (E::kIntegerDot) {
      for (int64_t j0 = 0; j0 < nk; j0 += kQkKeys) {
        const int64_t nc = MinI(kQkKeys, nk - j0);
        for (int64_t c = 0; c < kQkKeys; ++c) {
          const int64_t jn = j0 + kI8KeyPrefetch + c;
          if (c < nc) {
            const char* v = value_base + (key_rows[j0 + c] * p.num_kv_heads + kh0) * vrow_bytes;
            for (int64_t off = 0; off < heads * vrow_bytes; off += 64) {
              __builtin_prefetch(v + off, 0, kI8PrefetchLocality);
            }
          }
          if (jn < nk_ahead) {
            const char* kn = key_base + (key_rows[jn] * p.num_kv_heads + kh0) * krow_bytes;
            for (int64_t off = 0; off < heads * krow_bytes; off += 64) {
              __builtin_prefetch(kn + off, 0, kI8PrefetchLocality);
            }
          }
        }
        for (int64_t hh = 0; hh < heads; ++hh) {
          // A short last group repeats its last key: scores past nk are masked below.
          const char* k[kQkKeys];
          for (int64_t c = 0; c < kQkKeys; ++c) {
            k[c] = key_base +
                   (key_rows[j0 + MinI(c, nc - 1)] * p.num_kv_heads + kh0 + hh) * krow_bytes;
          }
          const int16_t* qh = reinterpret_cast<const int16_t*>(q + hh * R * hp);
          float* sh = s + hh * R * bkp + j0;
          if (p.head_dim <= kI8ExactDim) {
            KeyScoresI8<true>(qh, 2 * hp, R, p.head_dim, k, sh, bkp);
          } else {
            KeyScoresI8<false>(qh, 2 * hp, R, p.head_dim, k, sh, bkp);
          }
        }
      }
    } else {
      for (int64_t j0 = 0; j0 < nk; j0 += kQkKeys) {
        const int64_t nc = MinI(kQkKeys, nk - j0);
        for (int64_t c = 0; c < kQkKeys; ++c) {
          if (c >= nc) {  // a short last group: zero partials, sliced away with the padding
            for (int64_t hh = 0; hh < heads; ++hh) {
              for (int64_t tile = 0; tile < row_tiles; ++tile) {
                for (int64_t i = c; i < kVL; i += kQkKeys) {
                  Store(red + ((hh * row_tiles + tile) * kVL + i) * kVL, VF{});
                }
              }
            }
            continue;
          }
          const int64_t row = key_rows[j0 + c] * p.num_kv_heads + kh0;
          const char* k = key_base + row * p.head_dim * es;
          const char* v = value_base + row * p.value_dim * es;
          // The hardware prefetchers alone leave the K stream stalling; a short software
          // distance (measured: 1-3 keys best) in the same order helps.
          // The task's heads of a key are adjacent rows: one range each for K and V.
          const int64_t jn = j0 + c + kKeyPrefetch;
          for (int64_t off = 0; off < heads * vrow_bytes; off += 64) {
            __builtin_prefetch(v + off, 0, 3);
          }
          if (jn < nk_ahead) {
            const char* kn = key_base + (key_rows[jn] * p.num_kv_heads + kh0) * krow_bytes;
            for (int64_t off = 0; off < heads * krow_bytes; off += 64) {
              __builtin_prefetch(kn + off, 0, 3);
            }
          }
          for (int64_t hh = 0; hh < heads; ++hh) {
            KeyPartials<E>(q + hh * R * hp, hp, R, p.head_dim, k + hh * p.head_dim * es,
                           static_cast<int>(c), red + hh * row_tiles * kVL * kVL);
          }
        }
        for (int64_t hh = 0; hh < heads; ++hh) {
          ReducePartials(red + hh * row_tiles * kVL * kVL, R, E::kNativeDot ? p.scale : 1.0f,
                         s + hh * R * bkp + j0, bkp);
        }
      }
    }

    for (int64_t hh = 0; hh < heads; ++hh) {
      const int64_t kh = kh0 + hh;
      for (int64_t j = 0; j < nk; ++j) {
        vrow[j] = value_base + (key_rows[j] * p.num_kv_heads + kh) * p.value_dim * es;
      }
      float* sh = s + hh * R * bkp;
      float* oh = o + hh * R * hvp;
      float* mh = m + hh * R;
      float* lh = l + hh * R;
      if constexpr (E::kQuantized) {
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t i = key_rows[j] * p.num_kv_heads + kh;
          key_mult[j] = E::kFactor * (p.key_scale != nullptr ? p.key_scale[i] : 1.0f);
          value_mult[j] = E::kFactor * (p.value_scale != nullptr ? p.value_scale[i] : 1.0f);
        }
        for (int64_t j = nk; j < nkp; ++j) key_mult[j] = value_mult[j] = 0.0f;
      }
      for (int64_t r = 0; r < R; ++r) {
        float* sr = sh + r * bkp;
        if constexpr (E::kIntegerDot) {  // integer dots: times the query and key scales
          const VF qs = Splat(q_scale[hh * R + r]);
          for (int64_t j = 0; j < nkp; j += kVL) {
            Store(sr + j, Load(sr + j) * (qs * Load(key_mult + j)));
          }
        } else if constexpr (E::kQuantized) {  // the key row's scale times its partial score
          for (int64_t j = 0; j < nkp; j += kVL) Store(sr + j, Load(sr + j) * Load(key_mult + j));
        }
        if (has_alibi) {  // after the key scale: the bias applies to the dequantised score
          const float slope = dp.slopes[kh * G + r % G];
          const int64_t qp = dp.QueryPosition(r / G);
          for (int64_t j = 0; j < nk; ++j) {
            const int64_t d = qp - key_pos[j];
            sr[j] -= slope * static_cast<float>(d < 0 ? -d : d);
          }
        }
        if (has_cap) {  // before any masking: the cap of -inf would be -cap
          for (int64_t j = 0; j < nkp; j += kVL) {
            Store(sr + j, Tanh(Load(sr + j) * inv_cap) * cap);
          }
        }
        for (int64_t j = nk; j < nkp; ++j) sr[j] = -kInf;
        if (!full && by_position) {
          for (int64_t j = 0; j < nk; ++j) {
            if (key_pos[j] < row_lo[r] || key_pos[j] >= row_hi[r]) sr[j] = -kInf;
          }
        } else if (!full) {
          const int64_t lo = row_lo[r] - s0, hi = row_hi[r] - s0;
          for (int64_t j = 0; j < nk; ++j) {
            if (j < lo || j >= hi) sr[j] = -kInf;
          }
        }

        OnlineSoftmaxStep(sr, nk, nkp, &mh[r], &lh[r], oh + r * hvp, hvp);
        if constexpr (E::kQuantized) {  // and the value row's scale its probability
          for (int64_t j = 0; j < nkp; j += kVL) {
            Store(sr + j, Load(sr + j) * Load(value_mult + j));
          }
        }
        if constexpr (E::kIntegerDot) {  // as int16 weights times a row scale
          weight_scale[r] = RoundToInt16(sr, nkp, nkp, weights + r * bkp);
        }
      }
      if constexpr (E::kIntegerDot) {
        if (nk % 2 != 0) vrow[nk] = vrow[nk - 1];  // paired with a zero weight
        AccumulateValuesI8(weights, bkp, weight_scale, R, vrow, nk, p.value_dim, value_tail, oh,
                           hvp);
      } else {
        AccumulateValues<E>(sh, bkp, R, vrow, nk, p.value_dim, oh, hvp);
      }
    }
  }

  // Single partition: finish here. Otherwise leave (o, max, sum) for the merge.
  const bool single = PartCount(job, b) == 1;
  for (int64_t hh = 0; hh < heads; ++hh) {
    const int64_t kh = kh0 + hh;
    const float* oh = o + hh * R * hvp;
    if (single) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = (b * T + r / G) * p.num_heads + kh * G + r % G;
        FinishRow(job, oh + r * hvp, m[hh * R + r], l[hh * R + r], row, tmp);
      }
    } else {
      const int64_t slot = slot_part * p.num_kv_heads + kh;
      __builtin_memcpy(job.part_o + slot * R * hvp, oh, R * hvp * sizeof(float));
      float* ml = job.part_ml + slot * R * 2;
      for (int64_t r = 0; r < R; ++r) {
        ml[2 * r] = m[hh * R + r];
        ml[2 * r + 1] = l[hh * R + r];
      }
    }
  }
}

// Phase 2: merges the partitions of one (batch, kv head) in partition order (sequences with
// one partition were finished in phase 1).
static void DecodeMergeTask(void* job_ptr, int64_t task) {
  const DecodeJob& job = *static_cast<const DecodeJob*>(job_ptr);
  const DecodeAttentionProblem& p = *job.p;
  const int64_t kh = task % p.num_kv_heads, b = task / p.num_kv_heads;
  const int64_t parts = PartCount(job, b);
  if (parts == 1) return;
  const int64_t R = job.rows, G = job.group, hvp = job.hvp, K = p.num_kv_heads;
  float* acc = DecodeScratch(job, kScratchSlack + 2 * hvp);
  if (acc == nullptr) return;
  float* tmp = acc + hvp;
  const int64_t part0 = job.part_start[b];
  auto slot = [&](int64_t i) { return (part0 + i) * K + kh; };
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = (b * p.q_len + r / G) * p.num_heads + kh * G + r % G;
    float mx = -kInf;
    for (int64_t i = 0; i < parts; ++i) mx = MaxF(mx, job.part_ml[(slot(i) * R + r) * 2]);
    float sum = 0.0f;
    __builtin_memset(acc, 0, hvp * sizeof(float));
    if (mx != -kInf) {
      for (int64_t i = 0; i < parts; ++i) {
        const float* ml = job.part_ml + (slot(i) * R + r) * 2;
        if (ml[0] == -kInf) continue;  // an empty partition contributes nothing
        const float w = __builtin_expf(ml[0] - mx);
        sum += ml[1] * w;
        const float* po = job.part_o + (slot(i) * R + r) * hvp;
        const VF wv = Splat(w);
        for (int64_t h = 0; h < hvp; h += kVL) Store(acc + h, Load(acc + h) + wv * Load(po + h));
      }
    }
    FinishRow(job, acc, mx, sum, row, tmp);
  }
}

// Frees the job's buffers when it goes out of scope.
struct DecodeBuffers {
  void* blocks[4] = {};
  ~DecodeBuffers() {
    for (void* block : blocks) __builtin_free(block);
  }
};

static int64_t DecodeImpl(const DecodeAttentionProblem& p, const DecodeResult& res,
                          const Parallel& parallel) {
  DecodeJob job;
  job.p = &p;
  job.res = res;
  job.group = p.num_heads / p.num_kv_heads;
  job.rows = p.q_len * job.group;
  job.hp = RoundUp(p.head_dim, kPair);
  job.hvp = RoundUp(p.value_dim, kPair);
  if (p.cache_quant == CacheQuant::kNone && p.dtype == DType::kBF16 && BF16Elems::kInterleaved) {
    job.lanes = DecodeJob::Lanes::kBF16Pairs;
  } else if (p.cache_quant == CacheQuant::kInt8 && kI8LanesPermuted) {
    job.lanes = DecodeJob::Lanes::kInt8Pairs;
  }
  job.capacity = p.max_pages * p.page_size;
  job.partition = PartitionSize(p, LongestLength(p));

  // Every allocation is checked: the bytes of the first that fails are returned.
  DecodeBuffers buffers;
  auto allocate = [&](int slot, int64_t bytes) -> void* {
    buffers.blocks[slot] = __builtin_malloc(MaxI(bytes, 1));
    return buffers.blocks[slot];
  };
  int64_t* part_start = static_cast<int64_t*>(allocate(0, (p.batch + 1) * sizeof(int64_t)));
  if (part_start == nullptr) return (p.batch + 1) * sizeof(int64_t);
  part_start[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = DecodeLength(p, job.capacity, b);
    part_start[b + 1] = part_start[b] + MaxI(1, CeilDiv(len, job.partition));
  }
  const int64_t total_parts = part_start[p.batch];
  int64_t* part_seq = static_cast<int64_t*>(allocate(1, total_parts * sizeof(int64_t)));
  if (part_seq == nullptr) return total_parts * sizeof(int64_t);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = part_start[b]; i < part_start[b + 1]; ++i) part_seq[i] = b;
  }
  job.part_start = part_start;
  job.part_seq = part_seq;
  job.heads_per_task = HeadsPerTask(p, total_parts);
  job.head_groups = CeilDiv(p.num_kv_heads, job.heads_per_task);
  const bool merge = total_parts > p.batch;  // some sequence has several partitions
  if (merge) {
    const int64_t slots = total_parts * p.num_kv_heads * job.rows;
    job.part_o = static_cast<float*>(allocate(2, slots * job.hvp * sizeof(float)));
    if (job.part_o == nullptr) return slots * job.hvp * sizeof(float);
    job.part_ml = static_cast<float*>(allocate(3, slots * 2 * sizeof(float)));
    if (job.part_ml == nullptr) return slots * 2 * sizeof(float);
  }
  TaskFn task = nullptr;
  switch (p.cache_quant) {  // a quantized cache sets the element type; the query keeps its own
    case CacheQuant::kInt8: task = DecodePartitionTask<I8Elems>; break;
    case CacheQuant::kF8E4M3: task = DecodePartitionTask<F8E4M3Elems>; break;
    case CacheQuant::kF8E5M2: task = DecodePartitionTask<F8E5M2Elems>; break;
    case CacheQuant::kNone:
      switch (p.dtype) {
        case DType::kF32: task = DecodePartitionTask<F32Elems>; break;
        case DType::kBF16: task = DecodePartitionTask<BF16Elems>; break;
        case DType::kF16: task = DecodePartitionTask<F16Elems>; break;
        case DType::kF64: return 0;  // never here: float64 runs attention_f64.h's kernels
      }
      break;
  }
  parallel.For(total_parts * job.head_groups, task, &job);
  if (merge && job.scratch_failed == 0) {
    parallel.For(p.batch * p.num_kv_heads, DecodeMergeTask, &job);
  }
  return job.scratch_failed;
}

static int64_t DecodePartitionSizeImpl(const DecodeAttentionProblem& p) {
  return PartitionSize(p, LongestLength(p));
}
