// C[m, n] (+)= A[m, k] B[k, n], the one GEMM shape every attention product is written as
// (B is a packed panel: row-major, n a multiple of kVL). Register-blocked: kMR rows of A are
// broadcast against kNV vectors of a B row, kMR * kNV accumulators. The multiply-add is a
// policy: float32 FMAs (F32Fma), or on AVX512-BF16 pairs of bf16 per 32-bit element
// (BF16Pairs: one vdpbf16ps does two products per lane, twice the FMA's work). AmxGemm
// multiplies the BF16Pairs layouts on AMX tiles (16 x 16 float32 results per instruction).
// Part of the per-ISA kernel source (see simd.h).
#pragma once
#include "simd.h"

#if JAXATTN_VL >= 16
constexpr int kMR = 6, kNV = 4;  // 24 of 32 zmm registers
#elif JAXATTN_VL == 8
constexpr int kMR = 4, kNV = 3;  // 12 of 16 ymm registers
#else
constexpr int kMR = 4, kNV = 2;  // 8 of 16 xmm registers
#endif

struct F32Fma {
  typedef float Elem;
  static inline VF Broadcast(const float* a) { return Splat(*a); }
  static inline VF LoadB(const float* b) { return Load(b); }
  static inline VF MulAdd(VF acc, VF a, VF b) { return acc + a * b; }
};

#if JAXATTN_VL == 16
// The avx512 kernels are only chosen on CPUs with AVX512-BF16 (dispatch.cc).
constexpr bool kHasBF16Pairs = true;
// Elements are two bf16 (low half first) in 32 bits: acc += a.lo * b.lo + a.hi * b.hi, the
// products exact, rounded once into the float32 accumulator per pair.
struct BF16Pairs {
  typedef uint32_t Elem;
  static inline VF Broadcast(const uint32_t* a) { return (VF)_mm512_set1_epi32(*a); }
  static inline VF LoadB(const uint32_t* b) { return (VF)_mm512_loadu_si512(b); }
  static inline VF MulAdd(VF acc, VF a, VF b) {
    return (VF)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
  }
};
// n floats (a multiple of kVL) rounded to bf16 (nearest even, NaN kept) as n / 2 pairs.
static inline void RoundToPairs(const float* x, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; j += kVL) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + j));
    __builtin_memcpy(dst + j / 2, &h, sizeof(h));
  }
}
#else
constexpr bool kHasBF16Pairs = false;
#endif

#if JAXATTN_VL == 16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define JAXATTN_AMX 1
// The amx kernels are only chosen on CPUs with AMX-BF16 whose tile state Linux granted
// (dispatch.cc).
constexpr bool kHasAmxTiles = true;

// Every tile 16 rows x 64 bytes (palette 1), configured once per task: tmm0-3 accumulate C
// (16 x 16 float32), tmm4-5 hold A (16 rows x 16 words), tmm6-7 B (16 word rows x 16
// columns). Constant data, so no store to it can be optimised away (ldtilecfg's asm tells
// the compiler it reads only 8 bytes); reserved bytes and unused tiles zero.
struct alignas(64) AmxTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
static const AmxTileConfig kAmxTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// Loads the tile configuration for the current task and releases the tiles at its end: the
// configuration is per thread, and XLA's pool threads run other code between our tasks.
class AmxTaskTiles {
 public:
  explicit AmxTaskTiles(bool active) : active_(active) {
    if (active_) _tile_loadconfig(&kAmxTileConfig);
  }
  ~AmxTaskTiles() {
    if (active_) _tile_release();
  }
  AmxTaskTiles(const AmxTaskTiles&) = delete;
  AmxTaskTiles& operator=(const AmxTaskTiles&) = delete;

 private:
  bool active_;
};

// A block of kRowTiles x kColTiles C tiles (16 x 16 each) over k words (a multiple of 16):
// each A tile meets each B tile, so a 2 x 2 block loads 4 tiles per 4 products. Element
// (i, j) sees the same instruction sequence whatever the block shape, so results do not
// depend on where the block edges fall.
template <int kRowTiles, int kColTiles>
static inline void AmxBlock(int64_t k, const uint32_t* a, int64_t lda, const uint32_t* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;
  float* c1 = c + 16 * ldc;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if (kColTiles > 1) _tile_loadd(1, c + 16, sc);
    if (kRowTiles > 1) _tile_loadd(2, c1, sc);
    if (kRowTiles > 1 && kColTiles > 1) _tile_loadd(3, c1 + 16, sc);
  } else {
    _tile_zero(0);
    if (kColTiles > 1) _tile_zero(1);
    if (kRowTiles > 1) _tile_zero(2);
    if (kRowTiles > 1 && kColTiles > 1) _tile_zero(3);
  }
  const uint32_t* a1 = a + 16 * lda;
  for (int64_t p = 0; p < k; p += 16) {
    const uint32_t* bp = b + p * ldb;
    _tile_loadd(4, a + p, sa);
    _tile_loadd(6, bp, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (kColTiles > 1) {
      _tile_loadd(7, bp + 16, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kRowTiles > 1) {
      _tile_loadd(5, a1 + p, sa);
      _tile_dpbf16ps(2, 5, 6);
      if (kColTiles > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if (kColTiles > 1) _tile_stored(1, c + 16, sc);
  if (kRowTiles > 1) _tile_stored(2, c1, sc);
  if (kRowTiles > 1 && kColTiles > 1) _tile_stored(3, c1 + 16, sc);
}

// C[m, n] (+)= A[m, k] B[k, n] on AMX tiles, in the BF16Pairs layouts (k counts words). The
// caller pads: rows m..RoundUp(m, 16) of a are read and of c written (their values only
// reach those rows of c); n and k are multiples of 16, a and b zero up to k. Needs the
// tiles of an AmxTaskTiles in scope.
static void AmxGemm(int64_t m, int64_t n, int64_t k, const uint32_t* a, int64_t lda,
                    const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Tile loads are asm without memory operands: make the operands' stores happen first.
  __asm__ volatile("" ::: "memory");
  for (int64_t i = 0; i < m; i += 32) {
    const bool two_rows = m - i > 16;
    const uint32_t* ai = a + i * lda;
    float* ci = c + i * ldc;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      if (two_rows) {
        AmxBlock<2, 2>(k, ai, lda, b + j, ldb, ci + j, ldc, accumulate);
      } else {
        AmxBlock<1, 2>(k, ai, lda, b + j, ldb, ci + j, ldc, accumulate);
      }
    }
    if (j < n) {
      if (two_rows) {
        AmxBlock<2, 1>(k, ai, lda, b + j, ldb, ci + j, ldc, accumulate);
      } else {
        AmxBlock<1, 1>(k, ai, lda, b + j, ldb, ci + j, ldc, accumulate);
      }
    }
  }
}
#else
constexpr bool kHasAmxTiles = false;
class AmxTaskTiles {
 public:
  explicit AmxTaskTiles(bool) {}
};
#endif

template <class Op, int MR, int NV, class E = typename Op::Elem>
static inline void MicroKernel(int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb,
                               float* c, int64_t ldc, bool accumulate) {
  VF acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? Load(c + i * ldc + j * kVL) : VF{};
  }
  for (int64_t p = 0; p < k; ++p) {
    VF bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = Op::LoadB(b + p * ldb + j * kVL);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const VF av = Op::Broadcast(a + i * lda + p);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = Op::MulAdd(acc[i][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) Store(c + i * ldc + j * kVL, acc[i][j]);
  }
}

template <class Op, int NV, class E = typename Op::Elem>
static inline void RowPanel(int64_t m, int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb,
                            float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) {
    MicroKernel<Op, kMR, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  }
  const E* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 0: break;
    case 1: MicroKernel<Op, 1, NV>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 2: MicroKernel<Op, 2, NV>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 3: MicroKernel<Op, 3, NV>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
#if JAXATTN_VL >= 16
    case 4: MicroKernel<Op, 4, NV>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    case 5: MicroKernel<Op, 5, NV>(k, ai, lda, b, ldb, ci, ldc, accumulate); break;
#endif
  }
}

// n must be a multiple of kVL; a, c row-major with leading dims lda, ldc; k, lda, ldb count
// Op's elements (pairs, for BF16Pairs).
template <class Op = F32Fma, class E = typename Op::Elem>
static void Gemm(int64_t m, int64_t n, int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) __builtin_memset(c + i * ldc, 0, n * sizeof(float));
    }
    return;
  }
  for (int64_t j = 0; j < n;) {
    const int64_t nv = MinI(kNV, (n - j) / kVL);
    switch (nv) {
      case 1: RowPanel<Op, 1>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
      case 2: RowPanel<Op, 2>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
      case 3: RowPanel<Op, 3>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
      case 4: RowPanel<Op, 4>(m, k, a, lda, b + j, ldb, c + j, ldc, accumulate); break;
    }
    j += nv * kVL;
  }
}

// sum_p a[p] * b[p], rounded exactly as one element of Gemm's result (same order, and fused
// multiply-adds where the micro-kernel's are fused): results that must cancel against a Gemm
// element (the backward's D against dP) then cancel exactly.
static inline float GemmDot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t p = 0; p < n; ++p) {
#ifdef __FMA__
    acc = __builtin_fmaf(a[p], b[p], acc);
#else
    acc += a[p] * b[p];
#endif
  }
  return acc;
}
