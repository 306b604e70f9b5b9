// Micro-benchmark: our register-blocked GEMM micro-kernel (cc/gemm.h, f32 FMA) against
// oneDNN's BRGEMM ukernel (dnnl::ukernel::brgemm) on the per-tile shapes of flash attention.
//
// Which oneDNN: the PyPI `onednn` wheel is a SYCL build without the (experimental) ukernel
// API, so the ukernel is reached through the oneDNN 3.x that PyTorch links statically into
// libtorch_cpu.so, via its exported wrapper at::native::cpublas::brgemm. That wrapper keeps
// one generated kernel per (M, N, K, ld*, dtypes, add_C) in a thread-local hash map and calls
// set_hw_context when the kernel changes: exactly the caching an adopter would write, so its
// per-call cost is a fair stand-in for a direct use of the API.
//
// For bf16 ("ours bf16"): cc/gemm.h's Gemm<BF16Pairs> (vdpbf16ps) when that gemm.h has it
// (run.sh defines JAXATTN_HAVE_BF16PAIRS), else a bench-local vdpbf16ps micro-kernel with the
// same register blocking as cc/gemm.h's f32 one. Both bf16
// kernels read B in the same VNNI-2 layout (pairs of K rows interleaved), so one packing
// routine serves both and its cost is reported on its own.
//
// Single thread, one process, alternatives interleaved per repetition; medians reported.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <vector>

// As cc/kernels_impl.h does: the per-ISA headers inside a namespace of their own.
#include "../../cc/attention.h"
namespace jaxattn {
namespace ours {
#define JAXATTN_VL 16
#include "../../cc/simd.h"
// run.sh may point JAXATTN_GEMM_H at another gemm.h (e.g. one with the BF16Pairs policy).
#ifdef JAXATTN_GEMM_H
#include JAXATTN_GEMM_H
#else
#include "../../cc/gemm.h"
#endif
}  // namespace ours
}  // namespace jaxattn
namespace ours = jaxattn::ours;

// The exported PyTorch wrappers (ATen/native/CPUBlas.h); declared here so the benchmark
// needs no PyTorch headers. Only pointers to c10::BFloat16 cross, so it may stay incomplete.
namespace c10 {
struct BFloat16;
}
namespace at {
namespace native {
namespace cpublas {
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_C,
            const float* A, const float* B, float* C, bool is_vnni);
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_C,
            const c10::BFloat16* A, const c10::BFloat16* B, float* C, bool is_vnni);
void brgemm_release(bool is_vnni);
}  // namespace cpublas
}  // namespace native
}  // namespace at

namespace {

double Now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

uint16_t ToBF16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
float FromBF16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- bench-local bf16 micro-kernel (vdpbf16ps), blocking as cc/gemm.h: 6 rows x 4 zmm ----
// A: bf16 row-major [m, k] (k even); B: VNNI-2 [k/2][ldb][2]; C: f32 [m, ldc].
template <int MR, int NV>
inline void Bf16Micro(int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + j * 16) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k / 2; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + (p * ldb + j * 16) * 2);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      uint32_t pair;
      memcpy(&pair, a + i * lda + 2 * p, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + j * 16, acc[i][j]);
}

template <int NV>
void Bf16Panel(int64_t m, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    Bf16Micro<6, NV>(k, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  a += i * lda;
  c += i * ldc;
  switch (m - i) {
    case 1: Bf16Micro<1, NV>(k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 2: Bf16Micro<2, NV>(k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 3: Bf16Micro<3, NV>(k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 4: Bf16Micro<4, NV>(k, a, lda, b, ldb, c, ldc, accumulate); break;
    case 5: Bf16Micro<5, NV>(k, a, lda, b, ldb, c, ldc, accumulate); break;
  }
}

// n a multiple of 16, k even.
void Bf16Gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n;) {
    const int64_t nv = std::min<int64_t>(4, (n - j) / 16);
    switch (nv) {
      case 1: Bf16Panel<1>(m, k, a, lda, b + j * 2, ldb, c + j, ldc, accumulate); break;
      case 2: Bf16Panel<2>(m, k, a, lda, b + j * 2, ldb, c + j, ldc, accumulate); break;
      case 3: Bf16Panel<3>(m, k, a, lda, b + j * 2, ldb, c + j, ldc, accumulate); break;
      case 4: Bf16Panel<4>(m, k, a, lda, b + j * 2, ldb, c + j, ldc, accumulate); break;
    }
    j += nv * 16;
  }
}

// "ours bf16": the production kernel where the included gemm.h has it.
void OursBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#ifdef JAXATTN_HAVE_BF16PAIRS
  // BF16Pairs counts 32-bit pairs: k and lda halve; a VNNI-2 row of B holds ldb pairs.
  ours::Gemm<ours::BF16Pairs>(m, n, k / 2, reinterpret_cast<const uint32_t*>(a), lda / 2,
                              reinterpret_cast<const uint32_t*>(b), ldb, c, ldc, accumulate);
#else
  Bf16Gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
}

// ---- packing of B from the layout attention holds it in ----
// S = Q K^T: B = K^T, the tile arrives as K row-major [n keys, k dims].
// O += P V:  B = V, the tile arrives row-major [k keys, n dims].
// f32 (ours and oneDNN f32 read the same plain row-major B): transpose K into K^T.
void PackKT_f32(int64_t n, int64_t k, const float* kr, float* out /*[k][n]*/) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) out[p * n + j] = kr[j * k + p];
}
// bf16 VNNI-2 from K [n][k]: out[p/2][j][p%2] = K[j][p]: a transpose of 32-bit pairs.
void PackKT_vnni(int64_t n, int64_t k, const uint16_t* kr, uint16_t* out) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(kr);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t q = 0; q < k / 2; ++q) dst[q * n + j] = src[j * (k / 2) + q];
}
// bf16 VNNI-2 from V [k][n]: interleave row pairs.
void PackV_vnni(int64_t k, int64_t n, const uint16_t* v, uint16_t* out) {
  for (int64_t p = 0; p < k; p += 2) {
    const __m512i* r0 = reinterpret_cast<const __m512i*>(v + p * n);
    const __m512i* r1 = reinterpret_cast<const __m512i*>(v + (p + 1) * n);
    __m512i* o = reinterpret_cast<__m512i*>(out + p * n);
    for (int64_t j = 0; j < n / 32; ++j) {
      const __m512i x0 = _mm512_loadu_si512(r0 + j), x1 = _mm512_loadu_si512(r1 + j);
      // Interleave 16-bit elements of x0, x1: lo/hi unpack work per 128-bit lane, so
      // permute lanes back into order afterwards.
      const __m512i lo = _mm512_unpacklo_epi16(x0, x1), hi = _mm512_unpackhi_epi16(x0, x1);
      const __m512i i0 =
          _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi);
      const __m512i i1 =
          _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), hi);
      _mm512_storeu_si512(o + 2 * j, i0);
      _mm512_storeu_si512(o + 2 * j + 1, i1);
    }
  }
}

template <typename T>
T* Alloc(size_t n) {
  void* p = aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
  memset(p, 0, n * sizeof(T));
  return static_cast<T*>(p);
}

float MaxAbsDiff(const float* a, const float* b, size_t n) {
  float d = 0;
  for (size_t i = 0; i < n; ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Shape {
  const char* what;
  int64_t m, n, k;
  bool accumulate;
  bool from_k;  // B arrives as K rows (S = Q K^T) rather than as V rows (O += P V)
};

volatile float g_sink;

template <typename F>
double TimeIt(int64_t iters, F&& f) {
  const double t0 = Now();
  for (int64_t i = 0; i < iters; ++i) f();
  return (Now() - t0) / iters;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 21;
  const double target_s = argc > 2 ? atof(argv[2]) : 2e-3;  // per timed block
  using at::native::cpublas::brgemm;
#ifdef JAXATTN_HAVE_BF16PAIRS
  printf("ours bf16 = gemm.h Gemm<BF16Pairs>\n\n");
#else
  printf("ours bf16 = bench-local vdpbf16ps sketch (gemm.h has no BF16Pairs)\n\n");
#endif
  typedef const c10::BFloat16* BP;

  const Shape shapes[] = {
      {"S=QK^T d=64", 64, 64, 64, false, true},     {"S=QK^T d=128", 64, 64, 128, false, true},
      {"O+=PV dv=64", 64, 64, 64, true, false},     {"O+=PV dv=128", 64, 128, 64, true, false},
      {"S=QK^T d=128", 128, 128, 128, false, true}, {"O+=PV dv=128", 128, 128, 128, true, false},
      {"tiny (overhead)", 16, 16, 16, false, true},
  };

  printf(
      "| shape | M | N | K | ours f32 | oneDNN f32 | ours bf16 | oneDNN bf16 | f32 pack | bf16 "
      "pack |"
      " ours bf16 +pack | oneDNN bf16 +pack | oneDNN 1st call (JIT) f32 / bf16 |"
      " max diff f32 / bf16 |\n");
  printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    const int64_t M = s.m, N = s.n, K = s.k;
    const double flops = 2.0 * M * N * K;
    // Operands: A [M, K]; B in its source layout (K tile [N][K] or V tile [K][N]).
    float* a = Alloc<float>(M * K);
    float* bsrc = Alloc<float>(K * N);
    float* bf = Alloc<float>(K * N);  // packed f32 B [K][N]
    uint16_t* a16 = Alloc<uint16_t>(M * K);
    uint16_t* bsrc16 = Alloc<uint16_t>(K * N);
    uint16_t* bv16 = Alloc<uint16_t>(K * N);  // VNNI-2 B
    float* c_ours = Alloc<float>(M * N);
    float* c_dnnl = Alloc<float>(M * N);
    float* c_ours16 = Alloc<float>(M * N);
    float* c_dnnl16 = Alloc<float>(M * N);
    srand(42);
    for (int64_t i = 0; i < M * K; ++i) {
      a16[i] = ToBF16(rand() / (float)RAND_MAX - 0.5f);
      a[i] = FromBF16(a16[i]);
    }
    for (int64_t i = 0; i < K * N; ++i) {
      bsrc16[i] = ToBF16(rand() / (float)RAND_MAX - 0.5f);
      bsrc[i] = FromBF16(bsrc16[i]);
    }
    auto pack_f32 = [&] {
      if (s.from_k)
        PackKT_f32(N, K, bsrc, bf);
      else
        memcpy(bf, bsrc, K * N * sizeof(float));  // V is already row-major [K][N]
    };
    auto pack_bf16 = [&] {
      if (s.from_k)
        PackKT_vnni(N, K, bsrc16, bv16);
      else
        PackV_vnni(K, N, bsrc16, bv16);
    };
    pack_f32();
    pack_bf16();
    auto run_ours = [&] { ours::Gemm(M, N, K, a, K, bf, N, c_ours, N, s.accumulate); };
    auto run_dnnl = [&] { brgemm(M, N, K, K, N, N, s.accumulate, a, bf, c_dnnl, false); };
    auto run_ours16 = [&] { OursBf16(M, N, K, a16, K, bv16, N, c_ours16, N, s.accumulate); };
    auto run_dnnl16 = [&] {
      brgemm(M, N, K, K, N, N, s.accumulate, (BP)a16, (BP)bv16, c_dnnl16, true);
    };

    // First calls: oneDNN generates (JITs) a kernel per new shape here.
    double t0 = Now();
    run_dnnl();
    const double jit_f32 = Now() - t0;
    t0 = Now();
    run_dnnl16();
    const double jit_bf16 = Now() - t0;
    run_ours();
    run_ours16();
    // Correctness on one call from zeroed C (accumulating shapes add once).
    memset(c_ours, 0, M * N * 4);
    memset(c_dnnl, 0, M * N * 4);
    memset(c_ours16, 0, M * N * 4);
    memset(c_dnnl16, 0, M * N * 4);
    run_ours();
    run_dnnl();
    run_ours16();
    run_dnnl16();
    const float d32 = MaxAbsDiff(c_ours, c_dnnl, M * N);
    const float d16 = MaxAbsDiff(c_ours16, c_dnnl16, M * N);
    const float d16v32 = MaxAbsDiff(c_ours16, c_ours, M * N);

    const int64_t iters = std::max<int64_t>(1, (int64_t)(target_s * 50e9 / flops));
    std::vector<double> t_ours, t_dnnl, t_ours16, t_dnnl16, t_pack32, t_pack16;
    for (int r = 0; r < reps; ++r) {
      // Accumulating shapes reset C per block so values stay bounded (not timed).
      t_ours.push_back(TimeIt(iters, run_ours));
      t_dnnl.push_back(TimeIt(iters, run_dnnl));
      t_ours16.push_back(TimeIt(iters, run_ours16));
      t_dnnl16.push_back(TimeIt(iters, run_dnnl16));
      t_pack32.push_back(TimeIt(iters, pack_f32));
      t_pack16.push_back(TimeIt(iters, pack_bf16));
      if (s.accumulate) {
        memset(c_ours, 0, M * N * 4);
        memset(c_dnnl, 0, M * N * 4);
        memset(c_ours16, 0, M * N * 4);
        memset(c_dnnl16, 0, M * N * 4);
      }
    }
    g_sink = c_ours[0] + c_dnnl[0] + c_ours16[0] + c_dnnl16[0];
    const double o = Median(t_ours), d = Median(t_dnnl), o16 = Median(t_ours16),
                 d16t = Median(t_dnnl16), p32 = Median(t_pack32), p16 = Median(t_pack16);
    auto gf = [&](double t) { return flops / t * 1e-9; };
    printf(
        "| %s | %ld | %ld | %ld | %.1f | %.1f (%.2fx) | %.1f | %.1f (%.2fx) | %.2f us | %.2f us |"
        " %.1f | %.1f | %.0f / %.0f us | %.1e / %.1e (bf16 vs f32 %.1e) |\n",
        s.what, (long)M, (long)N, (long)K, gf(o), gf(d), o / d, gf(o16), gf(d16t), o16 / d16t,
        p32 * 1e6, p16 * 1e6, gf(o16 + p16), gf(d16t + p16), jit_f32 * 1e6, jit_bf16 * 1e6, d32,
        d16, d16v32);
    if (s.m == 16) {
      printf(
          "\nper-call time, tiny 16x16x16: ours f32 %.0f ns, oneDNN f32 %.0f ns, ours bf16 %.0f ns,"
          " oneDNN bf16 %.0f ns\n",
          o * 1e9, d * 1e9, o16 * 1e9, d16t * 1e9);
    }
    free(a);
    free(bsrc);
    free(bf);
    free(a16);
    free(bsrc16);
    free(bv16);
    free(c_ours);
    free(c_dnnl);
    free(c_ours16);
    free(c_dnnl16);
  }

  // The flash inner loop: per key block, S = Q K^T (no accumulate) then O += P V, i.e. two
  // different kernels alternate (oneDNN switches its current kernel, set_hw_context, each time).
  printf(
      "\n| flash tile pair (S=QK^T then O+=PV), M=64 keys=64 | ours f32 | oneDNN f32 | ours bf16 | "
      "oneDNN bf16 |\n");
  printf("|---|---|---|---|---|\n");
  for (int64_t d : {64, 128}) {
    const int64_t M = 64, NK = 64, DV = d;
    const double flops = 2.0 * M * NK * d + 2.0 * M * DV * NK;
    float* q = Alloc<float>(M * d);
    float* kt = Alloc<float>(d * NK);
    float* v = Alloc<float>(NK * DV);
    float* sbuf = Alloc<float>(M * NK);
    float* o = Alloc<float>(M * DV);
    uint16_t* q16 = Alloc<uint16_t>(M * d);
    uint16_t* kt16 = Alloc<uint16_t>(d * NK);
    uint16_t* v16 = Alloc<uint16_t>(NK * DV);
    uint16_t* p16 = Alloc<uint16_t>(M * NK);
    for (int64_t i = 0; i < M * d; ++i)
      q[i] = FromBF16(q16[i] = ToBF16(rand() / (float)RAND_MAX - 0.5f));
    for (int64_t i = 0; i < d * NK; ++i)
      kt[i] = FromBF16(kt16[i] = ToBF16(rand() / (float)RAND_MAX - 0.5f));
    for (int64_t i = 0; i < NK * DV; ++i)
      v[i] = FromBF16(v16[i] = ToBF16(rand() / (float)RAND_MAX - 0.5f));
    for (int64_t i = 0; i < M * NK; ++i) p16[i] = ToBF16(rand() / (float)RAND_MAX);
    auto ours32 = [&] {
      ours::Gemm(M, NK, d, q, d, kt, NK, sbuf, NK, false);
      ours::Gemm(M, DV, NK, sbuf, NK, v, DV, o, DV, true);
    };
    auto dnnl32 = [&] {
      brgemm(M, NK, d, d, NK, NK, false, q, kt, sbuf, false);
      brgemm(M, DV, NK, NK, DV, DV, true, sbuf, v, o, false);
    };
    // bf16: P is read as bf16 (in a real kernel S would be rounded to bf16 after softmax).
    auto ours16 = [&] {
      OursBf16(M, NK, d, q16, d, kt16, NK, sbuf, NK, false);
      OursBf16(M, DV, NK, p16, NK, v16, DV, o, DV, true);
    };
    auto dnnl16 = [&] {
      brgemm(M, NK, d, d, NK, NK, false, (BP)q16, (BP)kt16, sbuf, true);
      brgemm(M, DV, NK, NK, DV, DV, true, (BP)p16, (BP)v16, o, true);
    };
    ours32();
    dnnl32();
    ours16();
    dnnl16();
    const int64_t iters = std::max<int64_t>(1, (int64_t)(target_s * 50e9 / flops));
    std::vector<double> t[4];
    for (int r = 0; r < reps; ++r) {
      t[0].push_back(TimeIt(iters, ours32));
      t[1].push_back(TimeIt(iters, dnnl32));
      t[2].push_back(TimeIt(iters, ours16));
      t[3].push_back(TimeIt(iters, dnnl16));
      memset(o, 0, M * DV * 4);
    }
    auto gf = [&](int i) { return flops / Median(t[i]) * 1e-9; };
    printf("| head_dim=%ld | %.1f | %.1f (%.2fx) | %.1f | %.1f (%.2fx) |\n", (long)d, gf(0), gf(1),
           gf(1) / gf(0), gf(2), gf(3), gf(3) / gf(2));
    free(q);
    free(kt);
    free(v);
    free(sbuf);
    free(o);
    free(q16);
    free(kt16);
    free(v16);
    free(p16);
  }
  at::native::cpublas::brgemm_release(true);
  return 0;
}
