// The products of flash attention and the packing of their operands, for one instruction
// set (see simd.h for how this file is included): Q K^T, P V and the backward's products,
// as float32 GEMMs or on bf16 pairs (vdpbf16ps, AMX tiles).
#pragma once
#include "flash_context.h"

// dst[r * ld + h] = mult * row r (h < n), zero up to ld.
static void PackRows(DType dtype, const void* base, const int64_t* offsets, int64_t num_rows,
                     int64_t n, float mult, float* dst, int64_t ld) {
  for (int64_t r = 0; r < num_rows; ++r) {
    LoadRow(dtype, Offset(base, dtype, offsets[r]), n, mult, dst + r * ld);
    for (int64_t h = n; h < ld; ++h) dst[r * ld + h] = 0.0f;
  }
}

// dst[j * ld + r] = element j of row r, for rows r < ld (ld a multiple of kVL) and j < width
// (a multiple of kVL): fill_row(r, row) writes row r's width elements (zeros past its end),
// kVL rows at a time into block (kVL * width floats), which are then transposed a kVL x kVL
// block at a time. Rows num_rows..ld are zero.
template <class FillRow>
static void TransposeRows(int64_t num_rows, int64_t width, float* dst, int64_t ld, float* block,
                          FillRow fill_row) {
  for (int64_t r0 = 0; r0 < ld; r0 += kVL) {
    for (int64_t i = 0; i < kVL; ++i) {
      float* row = block + i * width;
      if (r0 + i < num_rows) {
        fill_row(r0 + i, row);
      } else {
        __builtin_memset(row, 0, width * sizeof(float));
      }
    }
    for (int64_t j = 0; j < width; j += kVL) {
      TransposeBlock(block + j, width, dst + j * ld + r0, ld);
    }
  }
}

// dst[h * ld + r] = mult * row r, h < RoundUp(n, kVL) (zero from n), columns num_rows..ld
// zero; ld a multiple of kVL. block holds kVL * RoundUp(n, kVL) floats.
static void PackColumns(DType dtype, const void* base, const int64_t* offsets, int64_t num_rows,
                        int64_t n, float mult, float* dst, int64_t ld, float* block) {
  const int64_t width = RoundUp(n, kVL);
  TransposeRows(num_rows, width, dst, ld, block, [&](int64_t r, float* row) {
    LoadRow(dtype, Offset(base, dtype, offsets[r]), n, mult, row);
    for (int64_t h = n; h < width; ++h) row[h] = 0.0f;
  });
}

// ------------------------------------------------------------ logits and P V products
// With bfloat16 inputs and the avx512bf16 kernel set (CPUs where vdpbf16ps outruns FMAs, see
// dispatch.cc) every product multiplies the inputs' own bf16 pairs (exact products, float32
// sums, twice the FMA's work per instruction, half the packing); otherwise products are
// float32 GEMMs with the queries pre-scaled. Forward and backward pack and multiply the
// logits through the same functions, so the backward recomputes bitwise the logits whose lse
// the forward saved.

#if JAXATTN_VL == 16
// Row r's bf16 pairs: dst[r * ld + w] = elements (2w, 2w + 1), zero past n and up to ld.
static void PackPairRows(const void* base, const int64_t* offsets, int64_t num_rows, int64_t n,
                         uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < num_rows; ++r) {
    uint32_t* d = dst + r * ld;
    __builtin_memset(d, 0, ld * 4);
    __builtin_memcpy(d, Offset(base, DType::kBF16, offsets[r]), n * 2);
  }
}

// The pairs of row r as column r: dst[w * ld + r] for w < RoundUp(CeilDiv(n, 2), kVL), zero
// past the row's pairs and in columns num_rows..ld; ld a multiple of kVL. block holds
// kVL * RoundUp(CeilDiv(n, 2), kVL) words.
static void PackPairColumns(const void* base, const int64_t* offsets, int64_t num_rows, int64_t n,
                            float* dst, int64_t ld, float* block) {
  const int64_t width = RoundUp(CeilDiv(n, 2), kVL);
  TransposeRows(num_rows, width, dst, ld, block, [&](int64_t r, float* row) {
    __builtin_memset(row, 0, width * sizeof(float));
    __builtin_memcpy(row, Offset(base, DType::kBF16, offsets[r]), n * 2);
  });
}

// Rows 2i and 2i + 1 interleaved: dst[i * ld + h] = (row 2i [h], row 2i+1 [h]), a missing
// odd row and h >= n zero.
static void PackRowPairs(const void* base, const int64_t* offsets, int64_t num_rows, int64_t n,
                         uint32_t* dst, int64_t ld) {
  for (int64_t i = 0; 2 * i < num_rows; ++i) {
    const uint16_t* lo = static_cast<const uint16_t*>(Offset(base, DType::kBF16, offsets[2 * i]));
    const uint16_t* hi =
        2 * i + 1 < num_rows
            ? static_cast<const uint16_t*>(Offset(base, DType::kBF16, offsets[2 * i + 1]))
            : nullptr;
    uint32_t* d = dst + i * ld;
    int64_t h = 0;
    typedef uint16_t VH __attribute__((vector_size(kVL * 2)));
    for (; h + kVL <= n; h += kVL) {
      VH l, u = VH{};
      __builtin_memcpy(&l, lo + h, sizeof(l));
      if (hi != nullptr) __builtin_memcpy(&u, hi + h, sizeof(u));
      const VI w = __builtin_convertvector(l, VI) | __builtin_convertvector(u, VI) << 16;
      __builtin_memcpy(d + h, &w, sizeof(w));
    }
    for (; h < n; ++h) d[h] = lo[h] | (hi == nullptr ? 0u : static_cast<uint32_t>(hi[h]) << 16);
    for (; h < ld; ++h) d[h] = 0;
  }
}

#endif

// Every product below is ProductGemm(a, b) with its operands packed by role: the inner
// dimension runs along input rows (Q K^T, dO V^T and their transposes: PackDotRows for the
// left operand, PackDotColumns for the right) or across rows (P V, dS K, P^T dO, dS^T Q:
// a computed left operand, ComputedOperand, and PackAcrossRows for the right). In pairs mode
// packed rows hold words (two bf16), in float32 mode floats.

// Storage per packed row of n elements (floats or words), rounded to whole vectors.
static inline int64_t DotLd(const FlashContext& c, int64_t n) {
  return RoundUp(Pairs(c) ? CeilDiv(n, 2) : n, kVL);
}

// Rows (n elements each) as a left operand: row r at dst + r * DotLd(c, n). Float32 rows are
// multiplied by mult (the scale, for queries), bf16 pairs are not (LogitsGemm scales).
static void PackDotRows(const FlashContext& c, const void* base, const int64_t* offsets,
                        int64_t num_rows, int64_t n, float mult, float* dst) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    PackPairRows(base, offsets, num_rows, n, reinterpret_cast<uint32_t*>(dst), DotLd(c, n));
    return;
  }
#endif
  PackRows(c.p->dtype, base, offsets, num_rows, n, mult, dst, DotLd(c, n));
}

// The same rows as the columns of a right operand (ld columns, a multiple of kVL; storage
// rows written up to RoundUp(n, kVL)). block holds kVL * RoundUp(n, kVL) floats.
static void PackDotColumns(const FlashContext& c, const void* base, const int64_t* offsets,
                           int64_t num_rows, int64_t n, float mult, float* dst, int64_t ld,
                           float* block) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    PackPairColumns(base, offsets, num_rows, n, dst, ld, block);
    return;
  }
#endif
  PackColumns(c.p->dtype, base, offsets, num_rows, n, mult, dst, ld, block);
}

// Rows (n elements each) as a right operand whose inner dimension runs across them: float32
// rows, or rows 2i and 2i + 1 interleaved in pairs; row length RoundUp(n, kVL) either way.
// For AMX, zero word rows follow up to PaddedInner(c, num_rows) / 2 (whole tiles).
static void PackAcrossRows(const FlashContext& c, const void* base, const int64_t* offsets,
                           int64_t num_rows, int64_t n, float* dst) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    const int64_t ld = RoundUp(n, kVL), words = CeilDiv(num_rows, 2);
    PackRowPairs(base, offsets, num_rows, n, reinterpret_cast<uint32_t*>(dst), ld);
    if (c.mode == ProductMode::kAmxTiles) {
      __builtin_memset(dst + words * ld, 0,
                       (PaddedInner(c, num_rows) / 2 - words) * ld * sizeof(float));
    }
    return;
  }
#endif
  PackRows(c.p->dtype, base, offsets, num_rows, n, 1.0f, dst, RoundUp(n, kVL));
}

// A computed left operand (P or dS: m rows of ld floats, ld = PaddedInner of the valid n):
// itself, or rounded to bf16 pairs into `pairs` (ld / 2 words a row, the element past an
// odd n zero: products over n read it), as a bf16 computation would. AMX products read
// whole tiles, so there everything past n is zero, and the rows up to PaddedRows(c, m)
// (whatever x holds there: the soft cap's tanh is not written past n). *lda receives its
// row length in storage units.
static const float* ComputedOperand(const FlashContext& c, const float* x, int64_t m, int64_t n,
                                    int64_t ld, float* pairs, int64_t* lda) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    uint32_t* words = reinterpret_cast<uint32_t*>(pairs);
    for (int64_t i = 0; i < m; ++i) {
      uint32_t* row = words + i * (ld / 2);
      RoundToPairs(x + i * ld, ld, row);
      if (n % 2 != 0) row[n / 2] &= 0xffffu;
      if (c.mode == ProductMode::kAmxTiles) {
        __builtin_memset(row + CeilDiv(n, 2), 0, (ld / 2 - CeilDiv(n, 2)) * 4);
      }
    }
    ZeroPaddingRows(c, pairs, m, ld / 2);
    *lda = ld / 2;
    return pairs;
  }
#endif
  (void)c, (void)m, (void)n, (void)pairs;
  *lda = ld;
  return x;
}

// out[m, n] (+)= a b over `inner` elements, with the operands packed as above. For AMX the
// operands are padded to whole tiles (PaddedRows, PaddedInner, DotLd) and rows
// m..PaddedRows(c, m) of out are written too.
static void ProductGemm(const FlashContext& c, int64_t m, int64_t n, int64_t inner, const float* a,
                        int64_t lda, const float* b, int64_t ldb, float* out, int64_t ldo,
                        bool accumulate) {
#ifdef JAXATTN_AMX
  if (c.mode == ProductMode::kAmxTiles) {
    AmxGemm(m, n, RoundUp(CeilDiv(inner, 2), 16), reinterpret_cast<const uint32_t*>(a), lda,
            reinterpret_cast<const uint32_t*>(b), ldb, out, ldo, accumulate);
    return;
  }
#endif
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    Gemm<BF16Pairs>(m, n, CeilDiv(inner, 2), reinterpret_cast<const uint32_t*>(a), lda,
                    reinterpret_cast<const uint32_t*>(b), ldb, out, ldo, accumulate);
    return;
  }
#endif
  (void)c;
  Gemm(m, n, inner, a, lda, b, ldb, out, ldo, accumulate);
}

// out[m, n] = scaled logits of packed query (or key) rows a against packed key (or query)
// columns b (n columns of ldb). With scaled = false bf16 pairs are left unscaled: the caller
// multiplies by PairsScale(c) itself.
static void LogitsGemm(const FlashContext& c, int64_t m, int64_t n, const float* a, const float* b,
                       int64_t ldb, float* out, int64_t ldo, bool scaled = true) {
  ProductGemm(c, m, n, c.p->head_dim, a, DotLd(c, c.p->head_dim), b, ldb, out, ldo, false);
  if (!Pairs(c) || !scaled) return;  // the float32 queries were scaled when packed
  const VF scale = Splat(c.p->scale);
  for (int64_t i = 0; i < m; ++i) {
    float* row = out + i * ldo;
    for (int64_t j = 0; j < n; j += kVL) Store(row + j, Load(row + j) * scale);
  }
}

// What LogitsGemm(..., scaled = false) leaves for its caller to multiply the logits by.
static inline float PairsScale(const FlashContext& c) { return Pairs(c) ? c.p->scale : 1.0f; }

// One element of a PackDotRows x PackDotColumns product of n-element rows a and b, rounded
// bitwise as ProductGemm rounds it (the backward's D must cancel against dP exactly).
static inline float RowDot(const FlashContext& c, const float* a, const float* b, int64_t n) {
#if JAXATTN_VL == 16
  if (Pairs(c)) {
    const uint32_t* wa = reinterpret_cast<const uint32_t*>(a);
    const uint32_t* wb = reinterpret_cast<const uint32_t*>(b);
    VF acc = VF{};
    for (int64_t w = 0; w < CeilDiv(n, 2); ++w) {
      acc = BF16Pairs::MulAdd(acc, BF16Pairs::Broadcast(wa + w), BF16Pairs::Broadcast(wb + w));
    }
    return acc[0];
  }
#endif
  (void)c;
  return GemmDot(a, b, n);
}

// dots[r] = row r of the packed left operand a (rows of lda, PackDotRows) times row r of
// `base` (n elements at offsets[r]), for r < num_rows, each rounded bitwise as an element of
// ProductGemm's product of a with those rows packed as columns. AMX rounds inside the tile
// instruction, so there that product is taken (16 x 16 blocks on the diagonal) and its
// diagonal read. block: kVL * RoundUp(n, kVL) floats; scratch (AMX only): 256 +
// DotLd(c, n) * PaddedRows(c, num_rows) floats.
static void RowDots(const FlashContext& c, const void* base, const int64_t* offsets,
                    int64_t num_rows, int64_t n, const float* a, int64_t lda, float* block,
                    float* scratch, float* dots) {
  if (c.mode == ProductMode::kAmxTiles) {
    float* diagonal_block = scratch;
    float* columns = scratch + 256;
    const int64_t ld = PaddedRows(c, num_rows);
    PackDotColumns(c, base, offsets, num_rows, n, 1.0f, columns, ld, block);
    for (int64_t i = 0; i < num_rows; i += 16) {
      ProductGemm(c, 16, 16, n, a + i * lda, lda, columns + i, ld, diagonal_block, 16, false);
      for (int64_t r = i; r < MinI(num_rows, i + 16); ++r) {
        dots[r] = diagonal_block[(r - i) * 17];
      }
    }
    return;
  }
  (void)scratch;
  if (Pairs(c)) {
    for (int64_t r = 0; r < num_rows; ++r) {
      PackDotRows(c, base, offsets + r, 1, n, 1.0f, block);
      dots[r] = RowDot(c, a + r * lda, block, n);
    }
    return;
  }
  // Float32: kVL rows at once, one per lane. Each lane runs GemmDot's chain (p = 0..n-1,
  // a multiply-add each, contracted as in the micro-kernel) on its row: the same bits, with
  // kVL independent chains in flight instead of one latency-bound scalar chain.
  const int64_t width = RoundUp(n, kVL);
  alignas(64) float a_rows[kVL * kVL];
  alignas(64) float a_cols[kVL * kVL];
  alignas(64) float b_cols[kVL * kVL];
  for (int64_t r0 = 0; r0 < num_rows; r0 += kVL) {
    const int64_t m = MinI(kVL, num_rows - r0);
    for (int64_t i = 0; i < kVL; ++i) {
      float* row = block + i * width;
      if (i < m) {
        LoadRow(c.p->dtype, Offset(base, c.p->dtype, offsets[r0 + i]), n, 1.0f, row);
        for (int64_t h = n; h < width; ++h) row[h] = 0.0f;
      } else {
        __builtin_memset(row, 0, width * sizeof(float));
      }
    }
    VF acc = VF{};
    for (int64_t j = 0; j < n; j += kVL) {
      const float* a_block = a + r0 * lda + j;
      int64_t a_ld = lda;
      if (m < kVL) {  // rows past num_rows are not ours to read
        for (int64_t i = 0; i < kVL; ++i) {
          for (int64_t h = 0; h < kVL; ++h) {
            a_rows[i * kVL + h] = i < m ? a_block[i * lda + h] : 0.0f;
          }
        }
        a_block = a_rows;
        a_ld = kVL;
      }
      TransposeBlock(a_block, a_ld, a_cols, kVL);
      TransposeBlock(block + j, width, b_cols, kVL);
      const int64_t steps = MinI(kVL, n - j);
      for (int64_t h = 0; h < steps; ++h) {
        acc = acc + Load(a_cols + h * kVL) * Load(b_cols + h * kVL);
      }
    }
    for (int64_t i = 0; i < m; ++i) dots[r0 + i] = acc[i];
  }
}
